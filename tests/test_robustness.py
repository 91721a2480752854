"""Bad input, bad settings and interrupted runs: each stops at once with the file or value named,
and nothing is lost. Every test here failed on the code before its fix."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, read_log, use_run_env

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
    """The environment of a short tiny run, for train_gpt.main() in this process."""
    use_run_env({**tiny_env, "ITERATIONS": "3", "VAL_LOSS_EVERY": "0", "WARMUP_STEPS": "0", **changes}, monkeypatch, tmp_path)


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
    (dict(GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS=-1.0 must be >= 0"),  # was told "no training time"
    (dict(MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS=-1.0 must be >= 0 (unset"),
    (dict(TRAIN_BATCH_TOKENS="786433"), "TRAIN_BATCH_TOKENS=786433"),  # silently rounded down before
    (dict(GRAD_ACCUM_STEPS="5"), "GRAD_ACCUM_STEPS=5"),
    (dict(COMPRESSOR="zstd"), "COMPRESSOR='zstd' must be one of brotli, lzma, family"),
    (dict(MUON_NS_COEFFS="cubic"), "MUON_NS_COEFFS='cubic' must be one of record, polar"),
]


def test_choices_are_the_values_the_code_handles():
    """A choice's values are stated once, in its field; the code behind each must exist."""
    import dataclasses

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(train_gpt.Hyperparameters)
               if "choices" in f.metadata}
    assert set(choices) == {"muon_ns_coeffs", "compressor", "lqer_form"}
    assert set(choices["muon_ns_coeffs"]) == set(train_gpt.NS_SCHEDULES)
    E = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    for form in choices["lqer_form"]:
        factors = (train_gpt.lqer_asym_factors if form == "asym" else train_gpt.lqer_factors)(E, 2, 8)
        w = {"x.q": torch.zeros(12, 16, dtype=torch.int8), "x.scale": torch.ones(12, dtype=torch.float16),
             **{f"x.{k}": v for k, v in factors.items()}}
        assert (train_gpt.dequantize_state_dict(w, {"x": "gptq (int6)"}, True, form)["x"] - E).norm() < E.norm()
    w, m = {"x.q": torch.ones(3, dtype=torch.int8), "x.scale": torch.ones(1, dtype=torch.float16)}, {"x": "gptq (int6)"}
    for compressor in choices["compressor"]:
        if compressor == "pergroup" and shutil.which("lrzip") is None:
            continue  # Debian's lrzip is missing: test_frontier_quant.py's pergroup tests skip, saying so
        blob = train_gpt.compress_blob(w, m, compressor)
        assert train_gpt.blob_compressor(blob) == compressor
        assert torch.equal(train_gpt.decompress_blob(blob, "b", compressor)[0]["x.q"], w["x.q"])


@pytest.mark.parametrize("env, named", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_bad_setting_is_refused_with_variable_and_value(env, named, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as exc:  # the batch split is checked by Runtime, before any device work
        train_gpt.Runtime(train_gpt.Hyperparameters.from_env())
    assert named in str(exc.value)


def test_misspelt_setting_gets_a_warning_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("NUM_LAYER", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not a setting, and nothing like one
    h = train_gpt.Hyperparameters.from_env()
    assert h.env_warnings == ["environment variable NUM_LAYER='3' is not a setting; did you mean NUM_LAYERS?"]
    log = train_gpt.Logger(str(tmp_path / "log.txt"))
    train_gpt.log_header(h, train_gpt.Runtime(h), log, b"code")
    assert "WARNING: environment variable NUM_LAYER='3' is not a setting; did you mean NUM_LAYERS?" in \
        (tmp_path / "log.txt").read_text()


# -----------------------------------------------------------------------------
# Results that look fine but are not
# -----------------------------------------------------------------------------


def tiny_h(**kw) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters(**dict(
        vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0, rope_dims=8,
        xsa_last_n=1, parallel_residual_start=1, loop_start=0, loop_end=1, num_loops=1, bigram_vocab_size=32,
        bigram_dim=8, train_seq_len=16, train_batch_tokens=128, grad_accum_steps=1, eval_seq_len=16,
        eval_stride=8, ttt_chunk_tokens=64, compile=False, **kw))


@pytest.mark.parametrize("bad_stage", ["quantized", "quantized_sliding_window", "quantized_ttt"])
def test_non_finite_evaluation_fails_naming_the_stage(bad_stage, monkeypatch, tmp_path):
    h = tiny_h()
    rt = train_gpt.Runtime(h)
    monkeypatch.setattr(train_gpt, "load_quantized_model", lambda *a: train_gpt.GPT(h))
    fns = {"quantized": "evaluate_plain", "quantized_sliding_window": "evaluate_sliding",
           "quantized_ttt": "evaluate_ttt"}
    for stage, fn in fns.items():
        value = math.nan if stage == bad_stage else 1.0
        monkeypatch.setattr(train_gpt, fn, lambda *a, v=value, **k: (v, v, 1.0))
    log = train_gpt.Logger(str(tmp_path / "log.txt"))
    with pytest.raises(FloatingPointError, match=f"^{bad_stage} evaluation gave val_loss nan"):
        train_gpt.run_evaluations(h, rt, None, None, log)


def pack_log(tmp_path: Path, **kw) -> Path:
    from test_pack import make_log

    return make_log(tmp_path / f"seed{kw.get('seed', 1)}.txt", kw.pop("seed", 1), b"code", kw.pop("loss", 2.8), **kw)


@pytest.mark.parametrize("case", ["ttt_missing", "sliding_missing", "nan", "inf"])
def test_pack_summary_refuses_incomplete_or_non_finite_runs(case, tmp_path, capsys):
    if case == "ttt_missing":  # killed during TTT: the sliding result would pass as final
        log = pack_log(tmp_path, drop="quantized_ttt")
    elif case == "sliding_missing":
        log = pack_log(tmp_path, drop="quantized_sliding_window", TTT_ENABLED="False",
                       SLIDING_WINDOW_ENABLED="True")
    else:
        log = pack_log(tmp_path, loss=math.nan if case == "nan" else math.inf)
    out = tmp_path / "submission.json"
    import record

    assert record.main(["--summary", str(log), "--out-json", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(log) in err and ("did not finish" in err or "non-finite" in err)
    assert not out.exists()


def test_pack_json_is_never_written_with_nan(tmp_path, monkeypatch):
    import record

    monkeypatch.setattr(record, "summarize", lambda *a: {"val_bpb": math.nan, "n_seeds": 1, "hardware": "x"})
    out = tmp_path / "submission.json"
    with pytest.raises(ValueError, match="not JSON compliant"):
        record.main(["--summary", str(pack_log(tmp_path)), "--out-json", str(out)])
    assert not out.exists()


def test_pack_artifact_folder_is_named_as_a_folder(tmp_path, capsys):
    import pack

    src = tmp_path / "t.py"
    src.write_text("x = 1\n")
    assert pack.main(["--src", str(src), "--out", str(tmp_path / "o.py"), "--artifact", str(tmp_path),
                      "--every-switch"]) == 1
    assert f"--artifact {tmp_path}: is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["lzma_blob", "family_blob", "folder"])
def test_eval_only_reads_the_blob_its_compressor_wrote_and_names_a_folder(case, tiny_env, tmp_path, monkeypatch,
                                                                           one_thread):
    """EVAL_ONLY reads an artifact with the settings that wrote it: a blob of another COMPRESSOR is
    refused at once, naming the setting that reads it (a packed file holds its own format's reader
    alone); with that setting the log labels the blob by it. A folder is named as a folder."""
    import lzma

    artifact = tmp_path / "blob.ptz"
    label = {"lzma_blob": "lzma", "family_blob": "family"}.get(case)
    if case == "lzma_blob":
        artifact.write_bytes(lzma.compress(b"not read: evaluation is stubbed"))
    elif case == "family_blob":
        artifact.write_bytes(train_gpt.FAMILY_MAGIC + b"not read: evaluation is stubbed")
    else:
        artifact.mkdir()
    tiny_main_env(tiny_env, monkeypatch, tmp_path, RUN_ID="evalonly", EVAL_ONLY="1", COMPRESSOR="brotli",
                  QUANTIZED_MODEL_PATH=str(artifact))
    monkeypatch.setattr(train_gpt, "run_evaluations", lambda *a: None)
    if case == "folder":
        with pytest.raises(OSError, match=re.escape(f"QUANTIZED_MODEL_PATH={artifact} is a folder")):
            train_gpt.main()
        return
    with pytest.raises(ValueError, match=re.escape(f"EVAL_ONLY=1: {artifact} was written with COMPRESSOR={label}, "
                                                   f"but this run has COMPRESSOR=brotli: set COMPRESSOR={label}")):
        train_gpt.main()
    monkeypatch.setenv("COMPRESSOR", label)
    assert train_gpt.main() == 0
    log = read_log(tmp_path, "evalonly")
    assert f"Serialized model quantized+{label}: {artifact.stat().st_size} bytes" in log
    assert "quantized+brotli" not in log


# -----------------------------------------------------------------------------
# The 600-second rule: training plus GPTQ calibration within MAX_WALLCLOCK_SECONDS
# -----------------------------------------------------------------------------


class FakeClock:
    """train_gpt's clock: a training step takes 1 s and a calibration batch 0.5 s, whatever the
    machine's load, so the schedule's arithmetic is tested exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def clocked_run(tiny_env, tmp_path, monkeypatch, run_id: str, limit: str, **env) -> tuple[str, list[int]]:
    clock, calibrations = FakeClock(), []
    step, collect = train_gpt.Trainer.step, train_gpt.collect_hessians

    def timed_step(self, *a):
        clock.now += 1.0
        return step(self, *a)

    def timed_collect(model, loader, batches, *a, **kw):
        calibrations.append(batches)
        clock.now += 0.5 * batches
        return collect(model, loader, batches, *a, **kw)

    monkeypatch.setattr(train_gpt, "time", clock)
    monkeypatch.setattr(train_gpt.Trainer, "step", timed_step)
    monkeypatch.setattr(train_gpt, "collect_hessians", timed_collect)
    monkeypatch.setattr(train_gpt, "evaluate_plain", lambda *a: (1.0, 1.0, 0.0))
    monkeypatch.setattr(train_gpt, "run_evaluations", lambda *a: None)
    tiny_main_env(tiny_env, monkeypatch, tmp_path, RUN_ID=run_id, ITERATIONS="1000", MAX_WALLCLOCK_SECONDS=limit,
                  GPTQ_CALIBRATION_BATCHES="4", TRAIN_LOG_EVERY="0", TRAIN_BATCH_TOKENS="512", GRAD_ACCUM_STEPS="1",
                  **env)
    if "GPTQ_RESERVE_SECONDS" not in env:
        monkeypatch.delenv("GPTQ_RESERVE_SECONDS", raising=False)
    assert train_gpt.main() == 0
    return read_log(tmp_path, run_id), calibrations


def test_default_schedule_keeps_training_plus_calibration_within_the_limit(tiny_env, tmp_path, monkeypatch,
                                                                          one_thread):
    log, calibrations = clocked_run(tiny_env, tmp_path, monkeypatch, "auto", "10")
    assert calibrations == [1, 4]  # one batch timed before the clock starts, then the real calibration
    assert "gptq_reserve:auto calibration_batch:500ms x 4 batches x 1.25 margin = 2500ms" in log
    # cap 10 - 2.5 = 7.5 s; after step 7 the next step would cross it, so training stops there.
    assert "train_done steps:7 train_time:7000ms" in log
    import logformat  # record.py reads this line through logformat to check the record's time

    assert "train_plus_calibration_time:9000ms limit:10000ms" in log.splitlines()
    assert logformat.scan_log(log)["train_plus_calibration_time_ms"] == 9000


def test_measured_reserve_that_fills_the_limit_stops_before_the_clock_starts(tiny_env, tmp_path, monkeypatch,
                                                                             one_thread):
    """With GPTQ_RESERVE_SECONDS unset the reserve is known only once measured (one timed batch:
    0.5 s x 4 batches x 1.25 = 2.5 s here): a limit inside it stops there, named, before step 0."""
    with pytest.raises(ValueError, match=r"MAX_WALLCLOCK_SECONDS=2\.0 leaves no training time: GPTQ calibration "
                                         r"\(4 batches\) needs about 2\.5s here"):
        clocked_run(tiny_env, tmp_path, monkeypatch, "tight", "2")
    log = read_log(tmp_path, "tight")
    assert "gptq_reserve:auto" in log and "train_loss" not in log and "train_done" not in log


def test_fixed_reserve_of_12_reproduces_the_records_schedule(tiny_env, tmp_path, monkeypatch, one_thread):
    log, calibrations = clocked_run(tiny_env, tmp_path, monkeypatch, "fixed", "20", GPTQ_RESERVE_SECONDS="12")
    assert calibrations == [4] and "gptq_reserve:auto" not in log  # nothing measured, nothing changed
    # The record's rule: frac = elapsed / (600 - 12), stop after the first step at or past the cap.
    assert "stopping_early: wallclock_cap train_time:8000ms step:8/1000" in log
    assert "train_done steps:8 train_time:8000ms" in log
    assert "train_plus_calibration_time:10000ms limit:20000ms" in log
    h = train_gpt.Hyperparameters(max_wallclock_seconds=600.0, gptq_reserve_seconds=12.0)
    assert train_gpt.training_frac(h, 0, 294_000.0) == 0.5


def record_track_log(tmp_path: Path, *extra: str) -> Path:
    log = pack_log(tmp_path, seed=42)  # 8xH100 hardware line, train_done train_time:588012ms
    log.write_text(log.read_text() + "".join(line + "\n" for line in extra))
    return log


def test_pack_record_refuses_a_log_over_600_seconds(tmp_path, capsys):
    import logformat
    import record

    over = record_track_log(tmp_path, "gptq:collected 67 hessians from 64 training batches in 13100ms")
    assert record.main(["--record", "R", "--logs", str(over), "--out-dir", str(tmp_path / "records")]) == 1
    assert "training plus GPTQ calibration took 601.1s, over the 600s limit by 1.1s" in capsys.readouterr().err
    stated = record_track_log(tmp_path, "train_plus_calibration_time:600500ms limit:600000ms")
    with pytest.raises(record.RecordError, match="over the 600s limit by 0.5s"):
        record.check_record_time(logformat.parse_log(stated))
    within = record_track_log(tmp_path, "gptq:collected 67 hessians from 64 training batches in 11000ms")
    record.check_record_time(logformat.parse_log(within))
    cpu = tmp_path / "cpu.txt"  # another track: no 600 s rule
    cpu.write_text(over.read_text().replace("device:cuda gpu:NVIDIA H100 80GB HBM3 world_size:8", "device:cpu"))
    record.check_record_time(logformat.parse_log(cpu))


# -----------------------------------------------------------------------------
# Distributed runs
# -----------------------------------------------------------------------------

STOPPED_PEER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import torch, train_gpt
# Both ranks ready before the group forms: under load, interpreter start-up alone can differ by
# more than DIST_TIMEOUT_SECONDS, which also bounds the rendezvous.
open(sys.argv[2] + os.environ["RANK"], "w").close()
while not all(os.path.exists(sys.argv[2] + r) for r in "01"):
    time.sleep(0.05)
h = train_gpt.Hyperparameters.from_env()
rt = train_gpt.Runtime(h)
rt.all_reduce(torch.ones(1))  # both ranks alive and connected
if rt.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # a stopped peer: alive, silent
t0 = time.perf_counter()

def wait_for_the_peer():
    try:
        rt.all_reduce(torch.ones(1))
    finally:
        print(f"rank {rt.rank} failed after {time.perf_counter() - t0:.0f}s", flush=True)

train_gpt.run_and_exit(wait_for_the_peer)  # as train_gpt.py's __main__ runs main()
"""


def start_two_ranks(source: str, path: Path, *args: str, **env: str) -> list[subprocess.Popen]:
    """Write `source` to `path` and start it as ranks 0 and 1 of a gloo job on a free local port
    (without torchrun, so that a test controls each rank), stdout and stderr together."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path.write_text(source)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return [subprocess.Popen([sys.executable, str(path), str(ROOT), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env))
            for r in range(2)]


def test_stopped_peer_fails_the_run_after_dist_timeout_seconds(tmp_path):
    procs = start_two_ranks(STOPPED_PEER, tmp_path / "peer.py", str(tmp_path / "ready"), DIST_TIMEOUT_SECONDS="10")
    try:
        out, _ = procs[0].communicate(timeout=120)  # without a timeout it waits forever
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, out
    assert "rank 0 failed after" in out
    assert "rank 0: a peer rank did not answer within DIST_TIMEOUT_SECONDS" in out, out


def test_rank_without_a_shard_is_told_how_to_fix_it(tiny_data):
    pattern = str(Path(tiny_data["data_dir"]) / "datasets" / "fineweb10B_sp384" / "fineweb_train_*.bin")
    with pytest.raises(ValueError, match=r"rank 3 of 4 has no training shard: .* has 3, .* "
                                         r"prepare_data.py --shard-tokens \d+"):
        train_gpt.ShuffledSequenceLoader(pattern, 128, 3, 4)


def test_demo_data_has_a_training_shard_for_each_of_8_ranks(tmp_path):
    import prepare_data

    assert prepare_data.main(["--demo", "--vocab-size", "512", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    shards = sorted((tmp_path / "demo" / "datasets" / "fineweb10B_sp512").glob("fineweb_train_*.bin"))
    assert len(shards) >= 8
    for rank in range(8):  # every rank of an 8-process torchrun finds its shard
        train_gpt.ShuffledSequenceLoader(str(shards[0].parent / "fineweb_train_*.bin"), 128, rank, 8)


# -----------------------------------------------------------------------------
# Data preparation
# -----------------------------------------------------------------------------


def docs_jsonl(tiny_data, path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_data["docs"][:n]), encoding="utf-8")
    return path


def prep_args(tiny_data, src: Path, out: Path, *extra: str) -> list[str]:
    return [str(src), "--tokenizer", tiny_data["tokenizer_path"], "--val-docs", "3", "--out", str(out), "--quiet",
            *extra]


SIGTERM_MID_RUN = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import prepare_data
build = prepare_data._build
def build_then_terminated(*a, **k):
    build(*a, **k)  # the staging folder is full: SIGTERM arrives before the final cleanup
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
prepare_data._build = build_then_terminated
sys.exit(prepare_data.main(sys.argv[2:]))
"""


def test_sigterm_removes_the_staging_folder(tiny_data, tmp_path):
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_MID_RUN)
    out = tmp_path / "out"
    args = prep_args(tiny_data, docs_jsonl(tiny_data, tmp_path / "d.jsonl"), out)
    proc = subprocess.run([sys.executable, str(script), str(ROOT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "stopped by signal 15" in proc.stderr, proc.stderr
    assert list(out.glob(".prepare_data-*")) == []


def test_stale_staging_folder_is_removed_at_start(tiny_data, tmp_path):
    import prepare_data

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".prepare_data-{dead.stdout.strip()}-abcd1234"  # its process has exited
    (stale / "datasets").mkdir(parents=True)
    (stale / "datasets" / "big.bin").write_bytes(b"\0" * 4096)
    assert prepare_data.main(prep_args(tiny_data, docs_jsonl(tiny_data, tmp_path / "d.jsonl"), out)) == 0
    assert not stale.exists() and list(out.glob(".prepare_data-*")) == []


def test_lone_surrogate_names_file_and_line(tiny_data, tmp_path):
    import prepare_data

    src = docs_jsonl(tiny_data, tmp_path / "d.jsonl", 5)
    src.write_text(src.read_text() + '{"text": "fine until \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=re.escape(f"{src}: line 6: \"text\" holds a lone surrogate '\\ud800'")):
        prepare_data.main(prep_args(tiny_data, src, tmp_path / "out"))


def test_second_vocab_size_does_not_overwrite_the_manifest(tiny_data, tmp_path):
    import prepare_data

    out = tmp_path / "out"
    src = docs_jsonl(tiny_data, tmp_path / "d.jsonl")
    assert prepare_data.main(prep_args(tiny_data, src, out)) == 0
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(SystemExit, match=r"manifest.json already describes the vocab-384 dataset .*--overwrite"):
        prepare_data.main([str(src), "--vocab-size", "400", "--val-docs", "3", "--out", str(out), "--quiet"])
    assert (out / "manifest.json").read_text() == manifest
    assert not (out / "datasets" / "fineweb10B_sp400").exists()


def test_disk_full_names_the_path(tiny_data, tmp_path, monkeypatch):
    import errno

    import prepare_data

    class FullDisk:
        def __init__(self, path, mode):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_gpt, "open", FullDisk, raising=False)  # atomic_write's open() only
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"writing .*fineweb_384_bpe\.model: No space left on device"):
        prepare_data.main(prep_args(tiny_data, docs_jsonl(tiny_data, tmp_path / "d.jsonl"), out))


def test_atomic_write_that_fails_midway_names_the_path_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(b"old shard")

    class FullDiskAfterFirstChunk:
        def __init__(self, name, mode):
            self.f = open(name, mode)  # the temporary file exists on disk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            if self.f.tell():
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.write(data)

    monkeypatch.setattr(train_gpt, "open", FullDiskAfterFirstChunk, raising=False)
    with pytest.raises(OSError, match=rf"writing {re.escape(str(path))}: No space left on device"):
        train_gpt.atomic_write(str(path), b"header", b"tokens")
    assert path.read_bytes() == b"old shard"
    assert os.listdir(tmp_path) == [path.name], "a failed write left its temporary file behind"


def test_empty_tokenizer_is_named(tmp_path):
    empty = tmp_path / "fineweb_384_bpe.model"
    empty.write_bytes(b"")
    h = train_gpt.Hyperparameters(tokenizer_path=str(empty), vocab_size=384)
    with pytest.raises(ValueError, match=re.escape(f"{empty} (0 bytes) is not a SentencePiece model")):
        train_gpt.load_tokenizer(h)


@pytest.mark.parametrize("kind", ["ptz", "random"])
def test_init_state_that_is_not_a_state_dict_is_named(kind, tmp_path):
    import lzma

    path = tmp_path / ("final_model.int6.ptz" if kind == "ptz" else "noise.pt")
    path.write_bytes(lzma.compress(b"artifact") if kind == "ptz" else os.urandom(4096))
    with pytest.raises(ValueError) as exc:
        train_gpt.load_init_state(str(path))
    assert f"INIT_STATE={path} is not a state dict saved with torch.save" in str(exc.value)
    assert ("EVAL_ONLY=1" in str(exc.value)) == (kind == "ptz")
    assert "weights_only" not in str(exc.value)


TWO_RANK_DDP = """
import atexit, os, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import torch, train_gpt
from test_robustness import tiny_h

def threads_at_finalization():  # only runs if the interpreter finalizes
    with open(sys.argv[2] + os.environ["RANK"], "w") as f:
        f.write(str(len(os.listdir("/proc/self/task"))))

atexit.register(threads_at_finalization)
torch.set_num_threads(1)
h = tiny_h()
rt = train_gpt.Runtime(h)
trainer = train_gpt.Trainer(h, rt, train_gpt.GPT(h))  # wraps the model in DDP
x = torch.randint(0, h.vocab_size, (2, h.train_seq_len))
trainer.fwd(x, x).backward()
"""
TEARDOWN = TWO_RANK_DDP + """
del trainer
sys.exit(rt.close(0))
"""
FAILING_RANK = TWO_RANK_DDP + """
def fail():
    raise RuntimeError("evaluation crashed on rank " + os.environ["RANK"])

train_gpt.run_and_exit(fail)  # what train_gpt.py's __main__ runs
"""


def test_distributed_run_ends_without_gloo_threads_meeting_finalization(tmp_path):
    """The cause of the intermittent rank SIGABRT at the end of two-rank runs: DDP keeps the process
    group referenced, so gloo's threads outlive destroy_process_group() into interpreter
    finalization, where one needing the GIL aborts the process."""
    procs = start_two_ranks(TEARDOWN, tmp_path / "teardown.py", str(tmp_path / "threads"))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for r in range(2):
        left = tmp_path / f"threads{r}"
        assert not left.exists() or int(left.read_text()) == 1, f"rank {r}: {left.read_text()} threads at finalization"


def test_failing_rank_exits_with_its_status_without_finalization(tmp_path):
    """A rank that raises (after DDP holds the process group) used to leave through interpreter
    finalization with gloo's threads alive, where it could abort (-6) instead of exiting 1."""
    procs = start_two_ranks(FAILING_RANK, tmp_path / "failing.py", str(tmp_path / "threads"))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    for r in range(2):
        assert f"RuntimeError: evaluation crashed on rank {r}" in outs[r]
        assert not (tmp_path / f"threads{r}").exists(), f"rank {r} went through interpreter finalization"
