"""presets/frontier.env as one stack: the parts' own tests (tests/test_frontier_*.py) prove each
switch against a reference; these prove that the preset's switches run together, and that the
file `pack.py --preset` specialises for them runs exactly what the readable file runs.

- cpu_frontier.env is frontier.env scaled: the same code paths (switches and choices), but the
  Triton kernels, which a CPU runs only in Triton's interpreter.
- A tiny run of cpu_frontier.env's switches on generated CaseOps data (VARLEN training, the
  two-lane decoder, sparse gate, SmearGate before the norm, Polar Express, bf16 momentum, per-rank
  clip, int7 embedding, asymmetric LQER, SMALL_FP16, the pergroup compressor, phased TTT scored
  through the byte sidecar): the packed file logs every line the readable file logs, numbers
  included; two gloo ranks agree on the weights; EVAL_ONLY of the packed file rescores its artifact.
- The frontier pack holds no code of what the preset turns off, and refuses the settings it pins.
The CUDA-path proofs of the preset's forward (emulated autocast, the FA3 stand-ins, compile
without graph breaks) are tests/test_cuda_path.py's and tests/test_cuda_compile.py's "frontier"
cases, which read their switches from frontier.env through `preset_code_settings`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import pack
import prepare_data
from conftest import (ROOT, TINY_VAL_DOCS, TINY_VOCAB, make_documents, preset_code_settings, read_log, run_script,
                      tiny_run_env)
from specialise import read_preset
from test_pack import check_code_lines, comparable_lines

FRONTIER = ROOT / "presets" / "frontier.env"
CPU_FRONTIER = ROOT / "presets" / "cpu_frontier.env"
TRAIN_GPT = ROOT / "train_gpt.py"
# Triton's kernels: frontier.env trains with them; on a CPU they would run in the interpreter.
CPU_OFF = {"FUSED_CE", "FUSED_MLP"}
# The tiny model of conftest (4 blocks, order 0 1 2 1 2 3 when looping) with the preset's layout:
# the last block as the two-lane decoder, no one-lane parallel block; phased TTT at this size.
TINY_FRONTIER = dict(PARALLEL_LANES_START="3", PARALLEL_RESIDUAL_START="4", PHASED_TTT_LORA_RANK="4",
                     PHASED_TTT_BATCH_DOCS="4", PHASED_TTT_PREFIX_DOCS="8", PHASED_TTT_NUM_PHASES="2",
                     ITERATIONS="6", VAL_LOSS_EVERY="3")

need_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None,
                                reason="lrzip is not installed (apt-get install lrzip): the preset's pergroup runs are skipped")


def test_cpu_frontier_takes_every_code_path_of_frontier():
    """Every switch and choice of frontier.env is in cpu_frontier.env with its value, but the Triton
    kernels (off on a CPU), the lane start (a block of the smaller model) and the loop count (one
    pass more for the looped layers, as cpu_small's; frontier.env: the default two); and the reverse."""
    full, cpu = preset_code_settings(FRONTIER), preset_code_settings(CPU_FRONTIER)
    scaled = {"PARALLEL_LANES_START", "NUM_LOOPS"}
    assert cpu["NUM_LOOPS"] == "1" and "NUM_LOOPS" not in full
    assert {k: v for k, v in full.items() if k not in CPU_OFF | scaled} == {k: v for k, v in cpu.items()
                                                                            if k not in scaled}
    assert all(full[k] == "1" for k in CPU_OFF) and not CPU_OFF & cpu.keys()
    assert full["PARALLEL_LANES_START"] == "8" and cpu["PARALLEL_LANES_START"] == "4"


def test_frontier_preset_obeys_the_600_second_rule():
    """#1855 ran GPTQ_RESERVE_SECONDS=0.5 (calibration after the clock): the preset leaves the
    reserve measured, so training plus calibration fit in MAX_WALLCLOCK_SECONDS, and says so."""
    settings = read_preset(FRONTIER)
    assert "GPTQ_RESERVE_SECONDS" not in settings and "MAX_WALLCLOCK_SECONDS" not in settings
    assert "GPTQ_RESERVE_SECONDS=0.5" in FRONTIER.read_text()  # the comment naming #1855's schedule


@pytest.fixture(scope="module")
def caseops_tiny(tmp_path_factory) -> dict:
    """conftest's generated documents through `prepare_data.py --caseops`: a CaseOps tokenizer of
    the tiny vocabulary, shards, and the validation byte sidecar."""
    root = tmp_path_factory.mktemp("frontier_data")
    jsonl = prepare_data.write_jsonl(root / "docs.jsonl", make_documents(TINY_VAL_DOCS + 640, seed=5))
    prepare_data.prepare([jsonl], root / "data", vocab_size=TINY_VOCAB, val_docs=TINY_VAL_DOCS, quiet=True,
                         caseops=True)
    return {"data_dir": str(root / "data")}


def frontier_run_env(data: dict, **changes: str) -> dict:
    """The tiny run (conftest) with cpu_frontier.env's settings: its code paths win over the tiny
    run's, the tiny run's sizes and schedule over the preset's; the artifact path relative, so
    that two runs' hparam lines are the same text."""
    preset = read_preset(CPU_FRONTIER)
    env = {**preset, **tiny_run_env(data, Path("."), QUANTIZED_MODEL_PATH="final_model.int6.ptz")}
    env.update(preset_code_settings(CPU_FRONTIER))
    return {**env, **TINY_FRONTIER, **changes}


@pytest.fixture(scope="module")
def frontier_pack(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frontier_pack") / "train_gpt.py"
    assert pack.main(["--src", str(TRAIN_GPT), "--out", str(out), "--logs", str(out.parent / "none"),
                      "--preset", str(CPU_FRONTIER)]) == 0
    return out


def test_frontier_pack_leaves_out_what_the_preset_turns_off(frontier_pack):
    """No BigramHash, no record attention gate, no sliding-window or chunk TTT evaluation, no
    Triton kernels, no other compressor: their code is gone, the stack's is there, and the pins
    say which settings the file holds no code for (every choice, each switch the preset has off)."""
    source = pack.unpack(frontier_pack.read_bytes()).decode()
    # Attributes, strings and imports: the packed file renames functions and classes.
    for leak in (".bigram(", ".attn_gate_proj", "'quantized_sliding_window'", "'quantized_ttt'", "triton",
                 "TRITON_INTERPRET", "import lzma"):
        assert leak not in source, leak
    for kept in ("flash_attn_varlen_func", "'lrzip'", "'quantized_ttt_phased'", "fineweb_val_bytes_", ".lane_mix",
                 ".sparse_gate", ".smear_embed_gate", "lqer_a"):
        assert kept in source, kept
    preset, pins = pack.packed_for(source.encode())
    assert preset == str(CPU_FRONTIER)
    assert pins == {"init_state": "", "gptq_hessian_all_ranks": False, "fused_ce": False, "fused_mlp": False,
                    "bigram_vocab_size": 0, "bigram_train_embed": False, "gate_attn_out": False, "lqer_form": "asym",
                    "muon_ns_coeffs": "polar", "compressor": "pergroup", "sliding_window_enabled": False,
                    "ttt_enabled": False}


@pytest.mark.parametrize("setting, value", [("COMPRESSOR", "brotli"), ("BIGRAM_VOCAB_SIZE", "512"),
                                            ("SLIDING_WINDOW_ENABLED", "1")])
def test_frontier_pack_refuses_a_setting_whose_code_it_left_out(frontier_pack, tmp_path, setting, value):
    """The pack runs with its preset's settings in the environment (the defaults are the record's,
    whose code it does not hold); one of them changed stops it before any data is read."""
    env = dict(read_preset(CPU_FRONTIER), DATA_DIR=str(tmp_path / "no_data"), OMP_NUM_THREADS="1")
    proc = run_script(dict(env, **{setting: value}), tmp_path, script=frontier_pack, check=False)
    assert proc.returncode != 0
    assert re.search(rf"ValueError: {setting}=.*this file was packed \(for .*cpu_frontier\.env\) with {setting}=",
                     proc.stderr), proc.stderr[-2000:]


@need_lrzip
def test_frontier_pack_runs_the_preset_line_for_line(frontier_pack, caseops_tiny, tmp_path):
    """The readable file and the frontier pack on the same tiny run of the whole stack: every line
    but the code's size and hash is the same, numbers included, through phased TTT's phases; then
    EVAL_ONLY with the packed file on its own artifact scores what the run scored."""
    env = frontier_run_env(caseops_tiny)
    logs = {}
    for name, script in (("readable", TRAIN_GPT), ("packed", frontier_pack)):
        (tmp_path / name).mkdir()
        run_script(env, tmp_path / name, script=script)
        logs[name] = read_log(tmp_path / name, env["RUN_ID"])
    assert comparable_lines(logs["readable"]) == comparable_lines(logs["packed"])
    log = logs["packed"]
    for line in ("val_byte_sidecar: ", "Serialized model quantized+pergroup:", "lqer:corrected 3 tensors",
                 "quant_category:gptq (int7)", "phased_ttt_phase:2/2", "quantized_ttt_phased val_loss"):
        assert line in log, line
    assert "quantized_sliding_window" not in log and "quantized_ttt val_loss" not in log
    check_code_lines(log, frontier_pack)
    run_script(dict(env, EVAL_ONLY="1", RUN_ID="again"), tmp_path / "packed", script=frontier_pack)
    stages = [l for l in comparable_lines(log) if l.startswith("quantized")]
    assert len(stages) == 2
    assert [l for l in comparable_lines(read_log(tmp_path / "packed", "again")) if l.startswith("quantized")] == stages


@need_lrzip
def test_frontier_pack_under_torchrun(frontier_pack, caseops_tiny, tmp_path):
    """Two gloo ranks through the packed stack: packed rows split over the ranks, each rank's own
    gradient clip before the average (no DDP), rank 0's Hessians, phased TTT's chains on both
    ranks and its SGD phases; the ranks end with the same weights and the run scores."""
    env = frontier_run_env(caseops_tiny, ITERATIONS="4", VAL_LOSS_EVERY="0", GRAD_ACCUM_STEPS="1")
    run_script(env, tmp_path, script=frontier_pack, nproc=2)
    log = read_log(tmp_path, env["RUN_ID"])
    assert "world_size:2" in log and re.search(r"^weights_checksum:\S+ ranks:\S+ ranks_agree:1$", log, re.M)
    assert "phased_ttt_phase:2/2" in log and re.search(r"^quantized_ttt_phased val_loss:[\d.]+ val_bpb:[\d.]+", log, re.M)
