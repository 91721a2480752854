"""End-to-end runs of train_gpt.py on generated data, configured by environment variables. The
runs whose subject is the script as a user starts it are subprocesses (one full tiny run shared by
this module, conftest's shared quick run, torchrun); runs that only load, break or feed a model
call main() in this process, which saves the interpreter and import start-up of each."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_MODEL, read_log, run_main, run_script, tiny_hparams, tiny_run_env

import logformat
import train_gpt


def train_losses(log: str) -> list[float]:
    return [float(m.group(3)) for m in logformat.lines_of(log, "train_loss")]


def val_lines(log: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in logformat.lines_of(log, "val")]


def final(log: str, label: str) -> tuple[float, float]:
    stage = logformat.scan_log(log)["stages"].get(logformat.STAGES[label])
    assert stage, f"no '{label}' line in log"
    return stage["val_loss"], stage["val_bpb"]


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    """One tiny run through training, GPTQ, the artifact and all three evaluations."""
    cwd = tmp_path_factory.mktemp("full_run")
    env = tiny_run_env(tiny_data, cwd)
    proc = run_script(env, cwd)
    return {"cwd": cwd, "env": env, "log": read_log(cwd, env["RUN_ID"]), "stdout": proc.stdout}


def test_tiny_run_learns_and_logs_every_line(full_run):
    log = full_run["log"]
    losses = train_losses(log)
    assert len(losses) == 12
    for m in logformat.lines_of(log, "train_loss"):  # each step line's exact text, read back by logformat
        step, iterations, loss, tokens_per_second = m.groups()
        minutes = m.string.split()[4]
        assert m.string == f"{step}/{iterations} train_loss: {float(loss):.4f} train_time: {float(minutes[:-1]):.1f}m " \
                           f"tok/s: {int(tokens_per_second)}", m.string
    assert losses[-1] < losses[0] - 1.0, losses
    assert f"model_params:{sum(p.numel() for p in train_gpt.GPT(tiny_hparams()).parameters())}" in log
    assert len(val_lines(log)) == 3  # steps 0, 6 and 12
    scores = {label: final(log, label) for label in
              ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt")}
    # the result lines' exact text, 8 decimals, as train_gpt writes them and logformat reads them
    stated = logformat.scan_log(log)
    for label, (loss, bpb) in scores.items():
        ms = stated["stages"][logformat.STAGES[label]]["eval_time_ms"]
        assert f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms" in log.splitlines(), label
    # Every evaluation scores the same validation tokens against the same bytes: bpb / loss is one
    # constant (tokens per byte / ln 2), to the 8 printed decimals, for each of them.
    ratio = scores["quantized"][1] / scores["quantized"][0]
    for label, (loss, bpb) in scores.items():
        assert bpb == pytest.approx(loss * ratio, abs=2e-8), label
    assert scores["quantized"][0] == pytest.approx(scores["pre-quantization post-ema"][0], abs=0.01)
    assert scores["quantized_sliding_window"][0] == pytest.approx(scores["quantized"][0], abs=0.01)
    assert scores["quantized_ttt"][0] < scores["quantized_sliding_window"][0]  # TTT adapts on scored chunks
    assert f"Serialized model quantized+lzma: {stated['model_bytes']} bytes" in log.splitlines()
    assert f"Total submission size quantized+lzma: {stated['total_bytes']} bytes" in log.splitlines()
    assert stated["code_sha256"] == hashlib.sha256(Path(train_gpt.__file__).read_bytes()).hexdigest()
    assert "hparam:ITERATIONS=12" in log
    assert (full_run["cwd"] / "final_model.pt").is_file()
    assert Path(full_run["env"]["QUANTIZED_MODEL_PATH"]).is_file()


def test_log_header_names_the_running_file(full_run):
    code = (Path(train_gpt.__file__)).read_bytes()
    assert f"code_bytes:{len(code)}\n" in full_run["log"]


def test_same_seed_gives_identical_losses(quick_run, tmp_path):
    env = dict(quick_run["env"], RUN_ID="again", QUANTIZED_MODEL_PATH=str(tmp_path / "again.ptz"))
    run_script(env, tmp_path)
    log = read_log(tmp_path, "again")
    assert len(train_losses(log)) == 4 and len(val_lines(log)) == 3  # steps 0, 2 and 4
    assert train_losses(log) == train_losses(quick_run["log"])
    assert val_lines(log) == val_lines(quick_run["log"])
    assert final(log, "pre-quantization post-ema") == final(quick_run["log"], "pre-quantization post-ema")
    assert final(log, "quantized") == final(quick_run["log"], "quantized")


# The runs below load or break a model: in this process, one thread as the shared quick run.

def test_init_state_reproduces_the_saving_runs_start(quick_run, tmp_path, monkeypatch, one_thread):
    """A state dict saved from the same seeded construction, loaded by a run with another
    SEED, gives the first training loss of the run that made it."""
    env = quick_run["env"]
    torch.manual_seed(int(env["SEED"]))
    model = train_gpt.GPT(tiny_hparams())
    torch.save(model.state_dict(), tmp_path / "init.pt")
    run_env = dict(env, RUN_ID="init", SEED="99", INIT_STATE=str(tmp_path / "init.pt"), ITERATIONS="1",
                   VAL_LOSS_EVERY="0", QUANTIZED_MODEL_PATH=str(tmp_path / "init.ptz"))
    assert run_main(run_env, monkeypatch, tmp_path) == 0
    assert train_losses(read_log(tmp_path, "init"))[0] == train_losses(quick_run["log"])[0]


def test_init_state_continues_from_a_checkpoint(quick_run, tmp_path, monkeypatch, one_thread):
    """final_model.pt loaded with ITERATIONS=0 scores exactly what the saving run scored."""
    env = dict(quick_run["env"], RUN_ID="resume", ITERATIONS="0", INIT_STATE=str(quick_run["cwd"] / "final_model.pt"),
               QUANTIZED_MODEL_PATH=str(tmp_path / "resume.ptz"))
    assert run_main(env, monkeypatch, tmp_path) == 0
    log = read_log(tmp_path, "resume")
    assert final(log, "pre-quantization post-ema") == final(quick_run["log"], "pre-quantization post-ema")


def test_nan_loss_stops_with_a_clear_message(quick_run, tmp_path, monkeypatch, one_thread):
    env = dict(quick_run["env"], RUN_ID="nan", TIED_EMBED_LR="nan", VAL_LOSS_EVERY="0",
               QUANTIZED_MODEL_PATH=str(tmp_path / "nan.ptz"))
    with pytest.raises(FloatingPointError, match="^training loss is nan at step"):
        run_main(env, monkeypatch, tmp_path)
    assert not (tmp_path / "nan.ptz").exists()


def test_missing_tokenizer_is_named(tmp_path):
    h = train_gpt.Hyperparameters(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(h.tokenizer_path)):
        train_gpt.load_tokenizer(h)


def test_torchrun_two_ranks_agree(full_run, tmp_path):
    env = dict(full_run["env"], RUN_ID="ddp", ITERATIONS="4", VAL_LOSS_EVERY="0", SLIDING_WINDOW_ENABLED="0",
               TTT_ENABLED="0", QUANTIZED_MODEL_PATH=str(tmp_path / "ddp.ptz"), OMP_NUM_THREADS="1")
    run_script(env, tmp_path, nproc=2)
    log = read_log(tmp_path, "ddp")
    assert "world_size:2" in log
    stated = logformat.scan_log(log)
    assert stated.get("ranks_agree"), "ranks disagree or no checksum line"
    assert stated["rank_checksums"] == [stated["weights_checksum"]] * 2
    assert len(train_losses(log)) == 4
    final(log, "quantized")


def test_demo_data_trains(tmp_path, monkeypatch, one_thread):
    """prepare_data.py --demo (the command the README gives) writes data train_gpt.py accepts as it
    is: the README's main job. The training runs in this process: the data is under test."""
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--demo", "--vocab-size", "512",
                    "--out", str(tmp_path / "demo"), "--quiet"], check=True, capture_output=True, timeout=120)
    env = dict(TINY_MODEL, VOCAB_SIZE="512", DATA_DIR=str(tmp_path / "demo"), RUN_ID="demo",
               ITERATIONS="3", TRAIN_BATCH_TOKENS="1024", GRAD_ACCUM_STEPS="1", TRAIN_SEQ_LEN="128",
               EVAL_SEQ_LEN="128", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0",
               GPTQ_CALIBRATION_BATCHES="2", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0",
               QUANTIZED_MODEL_PATH=str(tmp_path / "demo.ptz"))
    assert run_main(env, monkeypatch, tmp_path) == 0
    log = read_log(tmp_path, "demo")
    assert len(train_losses(log)) == 3
    final(log, "quantized")
