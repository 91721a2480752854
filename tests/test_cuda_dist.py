"""Two gloo ranks under torchrun (tests/cuda_dist_worker.py), compile on:

- DDP under compile: each training mode (looping off, looping on) is one compiled graph, i.e.
  Dynamo's DDPOptimizer, which would cut the graph at every DDP bucket boundary, is off.
- GPTQ Hessians: the artifact is the one quantized from rank 0's own calibration batches (as the
  record: no all-reduce, only rank 0 writes), and the other rank does not calibrate at all;
  GPTQ_HESSIAN_ALL_RANKS=1 quantizes from the average of both ranks' Hessians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

import train_gpt as tg  # noqa: E402

# Two layers (looped: 0, 0, 0, 1) keep Dynamo's tracing short; every block feature is still there.
SETTINGS = dict(
    TINY_MODEL, NUM_LAYERS="2", LOOP_START="0", LOOP_END="0", PARALLEL_RESIDUAL_START="1", XSA_LAST_N="2",
    TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1", EVAL_SEQ_LEN="64",
    GPTQ_CALIBRATION_BATCHES="3", COMPRESSOR="lzma", RUN_ID="cuda_dist", SEED="3",
)


@pytest.fixture(scope="module")
def dist_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_dist")
    env = dict(os.environ, **SETTINGS, DATA_DIR=tiny_data["data_dir"], OMP_NUM_THREADS="1")  # clean: conftest's clean_env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "cuda_dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return dict(out=out, ranks=ranks, data_dir=tiny_data["data_dir"])


def test_ddp_under_compile_one_graph_per_mode(dist_run):
    for r in dist_run["ranks"]:
        assert r["world_size"] == 2 and r["optimize_ddp"] is False
        # One graph for looping off, one for looping on; the second step of each reuses it.
        assert r["graphs_per_mode"] == {"False": 1, "True": 1}, r


def rank_hessians(model, h, rank: int) -> dict:
    rt = tg.Runtime(h)  # single process: collect_hessians reduces nothing
    loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len, rank, 2)
    return tg.collect_hessians(model, loader, h.gptq_calibration_batches, rt.micro_batch_seqs, rt)


def artifact(path: Path) -> dict:
    w, _ = tg.decompress_blob(path.read_bytes(), str(path))
    return w


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_artifact_is_quantized_from_rank0_hessians_alone(dist_run, monkeypatch, one_thread):
    """Quantized here with one thread, as each rank quantized, so that the artifacts can be
    compared exactly."""
    ranks, out = dist_run["ranks"], dist_run["out"]
    batches = int(SETTINGS["GPTQ_CALIBRATION_BATCHES"])
    assert ranks[0]["calibration_forwards"] == {"rank0": batches, "all_ranks": batches}
    assert ranks[1]["calibration_forwards"] == {"rank0": 0, "all_ranks": batches}

    # This process is one rank: half the batch gives the micro-batch each of the two ranks had.
    for k, v in dict(SETTINGS, TRAIN_BATCH_TOKENS=str(int(SETTINGS["TRAIN_BATCH_TOKENS"]) // 2),
                     DATA_DIR=dist_run["data_dir"]).items():
        monkeypatch.setenv(k, v)
    h = tg.Hyperparameters.from_env()
    model = tg.build_model(h, torch.device("cpu"), is_cuda=False)
    tg.load_into_model(model, torch.load(out / "model.pt", weights_only=True), "model.pt")
    model.looping_active = True
    h0, h1 = rank_hessians(model, h, 0), rank_hessians(model, h, 1)
    assert any(not torch.equal(h0[k], h1[k]) for k in h0), "the ranks calibrated on different batches"

    expected, _ = tg.quantize_state_dict(model.state_dict(), h0, h)
    assert_same_tensors(artifact(out / "artifact.ptz"), expected)

    # GPTQ_HESSIAN_ALL_RANKS=1: the Hessians rank 0 quantized from are both ranks' mean (equal token
    # counts), to rounding, since the all-reduce sums in its own order; and the artifact is exactly
    # the one quantized from them (a last-bit change in H can move a GPTQ code by several steps).
    used = torch.load(out / "hessians_all_ranks.pt", weights_only=True)
    assert used.keys() == h0.keys()
    for k in used:
        torch.testing.assert_close(used[k], (h0[k] + h1[k]) / 2, rtol=1e-5, atol=1e-6, msg=k)
    got = artifact(out / "artifact_all.ptz")
    assert_same_tensors(got, tg.quantize_state_dict(model.state_dict(), used, h)[0])
    assert any(not torch.equal(got[k], expected[k]) for k in got), "averaging changed the artifact"
