"""Bad input, bad settings and interrupted runs: each stops at once with the file or value named,
and nothing is lost. Every test here failed on the code before its fix."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, read_log, run_script

import bench
import train_gpt
from prepare_data import write_shard


# -----------------------------------------------------------------------------
# Data loss
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../victim", "", ".", "..", "/abs/victim", ".hidden", "a/b"])
def test_bench_name_never_deletes_outside_build_bench(name, tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    (root / "build" / "bench").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (root / "build" / "bench" / "earlier").mkdir()
    (root / "build" / "bench" / "earlier" / "log.txt").write_text("an earlier benchmark")
    monkeypatch.setattr(bench, "ROOT", root)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("ran train_gpt.py with a bad NAME"))
    name = str(victim) if name == "/abs/victim" else name
    with pytest.raises(SystemExit, match="NAME .* is not a plain name"):
        bench.main(["run", name, "--data", str(tmp_path)])
    assert (victim / "keep.txt").read_text() == "precious"
    assert (root / "build" / "bench" / "earlier" / "log.txt").is_file()


def test_bench_name_accepts_plain_names():
    assert bench.bench_dir("cpu_small-v2.1+x").name == "cpu_small-v2.1+x"


def tiny_main_env(tiny_env: dict, monkeypatch, tmp_path: Path, **changes) -> None:
    """train_gpt.main() in this process (no interpreter start-up) with the tiny run's settings."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(tiny_env, ITERATIONS="3", VAL_LOSS_EVERY="0", WARMUP_STEPS="0", **changes).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)


def copy_data(tiny_data: dict, dest: Path) -> Path:
    import shutil

    shutil.copytree(tiny_data["data_dir"], dest)
    return dest / "datasets" / f"fineweb10B_sp{tiny_data['vocab_size']}"


@pytest.mark.parametrize("split", ["train", "val"])
def test_shard_with_an_id_beyond_the_vocabulary_is_refused_before_step_0(split, tiny_data, tiny_env, tmp_path,
                                                                        monkeypatch, one_thread):
    ds = copy_data(tiny_data, tmp_path / "data")
    bad = ds / f"fineweb_{split}_000000.bin"
    tokens = np.asarray(train_gpt.read_shard(str(bad))).copy()
    tokens[len(tokens) // 2] = 999  # >= VOCAB_SIZE=384, deep inside the shard
    write_shard(bad, tokens)
    tiny_main_env(tiny_env, monkeypatch, tmp_path, DATA_DIR=str(tmp_path / "data"), RUN_ID="badid")
    monkeypatch.setattr(train_gpt.Trainer, "step", lambda *a: pytest.fail("trained on a shard of another vocabulary"))
    with pytest.raises(ValueError, match=re.escape(f"shard {bad} holds token id 999 >= VOCAB_SIZE=384")):
        train_gpt.main()


def test_final_model_is_on_disk_before_any_evaluation(tiny_env, tmp_path, monkeypatch, one_thread):
    tiny_main_env(tiny_env, monkeypatch, tmp_path, RUN_ID="crash")
    seen = []

    def crashing_eval(*args, **kwargs):
        seen.append(Path("final_model.pt").is_file())
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(train_gpt, "evaluate_plain", crashing_eval)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train_gpt.main()
    assert seen == [True]
    torch.manual_seed(0)
    state = torch.load(tmp_path / "final_model.pt", map_location="cpu", weights_only=True)
    assert "tok_emb.weight" in state and all(torch.isfinite(v.float()).all() for v in state.values())
    assert "Serialized model: " in read_log(tmp_path, "crash")


# -----------------------------------------------------------------------------
# Settings: every bad value stops at construction, named
# -----------------------------------------------------------------------------

BAD_SETTINGS = [
    (dict(EVAL_STRIDE="-64"), "EVAL_STRIDE=-64"),  # trained, wrote the artifact, then hung in the sliding pass
    (dict(EVAL_STRIDE="0"), "EVAL_STRIDE=0"),
    (dict(ITERATIONS="-1"), "ITERATIONS=-1"),  # trained forever at lr 0
    (dict(EVAL_BATCH_SEQS="0"), "EVAL_BATCH_SEQS=0"),
    (dict(EVAL_BATCH_SEQS="-2"), "EVAL_BATCH_SEQS=-2"),
    (dict(TTT_BATCH_SEQS="0"), "TTT_BATCH_SEQS=0"),
    (dict(TTT_CHUNK_TOKENS="0"), "TTT_CHUNK_TOKENS=0"),
    (dict(GPTQ_CALIBRATION_BATCHES="0"), "GPTQ_CALIBRATION_BATCHES=0"),
    (dict(NUM_KV_HEADS="0"), "NUM_KV_HEADS=0"),
    (dict(TRAIN_SEQ_LEN="0"), "TRAIN_SEQ_LEN=0"),
    (dict(EVAL_SEQ_LEN="0"), "EVAL_SEQ_LEN=0"),
    (dict(MAX_WALLCLOCK_SECONDS="12", GPTQ_RESERVE_SECONDS="12"), "MAX_WALLCLOCK_SECONDS=12.0"),
    (dict(MAX_WALLCLOCK_SECONDS="5", GPTQ_RESERVE_SECONDS="12"), "GPTQ_RESERVE_SECONDS=12.0"),
    (dict(TRAIN_BATCH_TOKENS="786433"), "TRAIN_BATCH_TOKENS=786433"),  # silently rounded down before
    (dict(GRAD_ACCUM_STEPS="5"), "GRAD_ACCUM_STEPS=5"),
]


@pytest.mark.parametrize("env, named", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_bad_setting_is_refused_with_variable_and_value(env, named, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as exc:
        train_gpt.Hyperparameters()
    assert named in str(exc.value)


def test_misspelt_setting_gets_a_warning_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("NUM_LAYER", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not a setting, and nothing like one
    h = train_gpt.Hyperparameters()
    assert h.env_warnings == ["environment variable NUM_LAYER='3' is not a setting; did you mean NUM_LAYERS?"]
    log = train_gpt.Logger(str(tmp_path / "log.txt"))
    train_gpt.log_header(h, train_gpt.Runtime(h), log, b"code")
    assert "WARNING: environment variable NUM_LAYER='3' is not a setting; did you mean NUM_LAYERS?" in \
        (tmp_path / "log.txt").read_text()
