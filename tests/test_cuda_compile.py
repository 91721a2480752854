"""torch.compile as the CUDA path uses it, on CPU: fullgraph=True, dynamic=False, bf16 autocast.

Dynamo's "eager" backend stands in for inductor: the graphs Dynamo captures, its graph breaks and
its recompilations do not depend on the backend, and "eager" compiles none of them (inductor on
two CPU cores would take minutes). What this pins: GPT.forward compiles one graph per
{training, evaluation} x {looping off, looping on} - every padded evaluation batch, sliding windows
and a freshly loaded model reuse them - plus one per TTT batch shape that differs from the training
micro-batch. TTT's steps are training steps (looping on), and with dynamic=False Dynamo guards the
input's shape and strides, so they reuse the training graph only when TTT's per-rank batch (a
chunk's EVAL_SEQ_LEN sequences split over the ranks, at most TTT_BATCH_SEQS per step) has the
training micro-batch's shape; each other shape is a graph of its own. In the 8-GPU record it does
not: 16 sequences of 2048 per chunk over 8 ranks are 2 x 2048 per rank against 48 x 2048 in
training, so a whole run compiles FIVE graphs. (On CUDA both batches arrive as contiguous copies,
so only the shape differs; on CPU both are views with a row stride of L + 1.) Every count must stay
within Dynamo's recompile limit. VARLEN=1 makes training one graph per padded cu_seqlens length
and looping mode instead (the record's rows: 64 to 256 entries, 8 graphs, compiled in warm-up),
and the Runtime raises the limit to 64.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

import bench
import train_gpt as tg
from conftest import ROOT, need_triton, preset_code_settings

V = 384
# Two layers (looped order 0, 0, 0, 1) keep tracing short; every block feature is there.
TINY = dict(
    vocab_size=V, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
    xsa_last_n=2, parallel_residual_start=1, loop_start=0, loop_end=0, num_loops=1,
    bigram_vocab_size=512, bigram_dim=16, train_seq_len=32, train_batch_tokens=128, grad_accum_steps=1,
    eval_seq_len=32, eval_stride=16, eval_batch_seqs=4, ttt_chunk_tokens=128, ttt_epochs=1, ttt_batch_seqs=4,
    compile=True, run_id="test_cuda_compile", seed=0,
)
# TTT laid out as in the record: 16 sequences per chunk, which 8 ranks split into 2 x 32 each, where
# training takes 4 x 32 (the record: 2 x 2048 per rank against 48 x 2048).
RECORD_LIKE_TTT = dict(TINY, ttt_chunk_tokens=16 * TINY["eval_seq_len"])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def graphs(monkeypatch):
    """Every graph Dynamo hands the backend (its node count); Dynamo's caches cleared around."""
    seen: list[int] = []

    def backend(gm, example_inputs):
        seen.append(len(gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield seen
    torch._dynamo.reset()


def graph_breaks() -> dict:
    return dict(torch._dynamo.utils.counters["graph_break"])


class RandomLoader:
    def __init__(self, seq_len: int):
        self.g, self.seq_len = torch.Generator().manual_seed(0), seq_len

    def next_batch(self, rows: int):
        t = torch.randint(0, V, (rows, self.seq_len + 1), generator=self.g)
        return t[:, :-1], t[:, 1:]


# presets/frontier.env's switches and choices but VARLEN's packed rows (compiled in
# test_varlen_compiles_a_graph_per_cu_seqlens_length_before_the_clock, with these too), phased TTT
# (test_phased_ttt_compiles_without_breaks_within_the_recompile_limit, these too) and the
# compressor and the byte sidecar (no part of any graph; pergroup needs lrzip at construction, and
# the evaluations here count bytes from tables): the two-lane decoder is
# block 1 (looped decoder [0, 1], unlooped [1]); the Triton kernels, Muon in bf16, each rank's clip.
FRONTIER = {k: v for k, v in tg.env_settings(preset_code_settings(ROOT / "presets" / "frontier.env")).items()
            if k not in ("varlen", "compressor", "val_byte_sidecar") and not k.startswith("phased_ttt")
            } | dict(parallel_lanes_start=1)
# The same without the Triton kernels, which the whole-run test compiles with the rest: on a CPU
# they run in Triton's interpreter, and the VARLEN and phased-TTT checks run many steps.
FRONTIER_MATH = {k: v for k, v in FRONTIER.items() if k not in ("fused_ce", "fused_mlp")}


@pytest.mark.parametrize("kernels", [{}, dict(fused_ce=True, fused_mlp=True), FRONTIER],
                         ids=["math", "kernels", "frontier"])
def test_whole_run_compiles_a_graph_per_mode_and_ttt_shape_without_breaks(graphs, kernels):
    if kernels.get("fused_ce"):
        need_triton()
    h = tg.Hyperparameters(**{**TINY, **kernels})
    rt = tg.Runtime(h, environ={})  # one CPU process, compiling, with CPU bf16 autocast standing in for CUDA's
    rt.compile, rt.autocast = True, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    luts = (torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    tokens = torch.randint(4, V, (10 * h.eval_seq_len + 1,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"), is_cuda=True)  # bf16 embeddings and inv_freq, as on GPU
    trainer = tg.Trainer(h, rt, model)
    loader = RandomLoader(h.train_seq_len)

    for looping in (False, True):
        model.looping_active = looping
        for step in range(2):
            trainer.step(loader, step, 1.0)
    assert len(graphs) == 2, graphs  # 1, 2: training, looping off and on; each mode's second step reuses its graph

    for looping in (False, True):
        model.looping_active = looping
        for n_windows in (1, 3, 4, 7, 10):  # padded to EVAL_BATCH_SEQS rows: one shape
            tg.evaluate_plain(h, rt, trainer.compiled, tokens[: n_windows * h.eval_seq_len + 1], luts)
        tg.evaluate_sliding(h, rt, trainer.compiled, tokens, luts)
    assert len(graphs) == 4, graphs  # 3, 4: evaluation (no_grad, per-token NLL), looping off and on

    # After quantization every stage loads a fresh model and compiles it anew: the graphs are reused.
    # Here TTT trains on 4 x 32 per step (TTT_BATCH_SEQS=4 of a chunk's 4 sequences), the training
    # micro-batch's shape, and both inputs are views of (4, 33) rows: its steps reuse graph 2.
    for stage in (tg.evaluate_sliding, tg.evaluate_ttt):
        fresh = tg.build_model(h, torch.device("cpu"), is_cuda=True)
        fresh.looping_active = True
        stage(h, rt, tg.maybe_compile(fresh, rt), tokens, luts)
    assert len(graphs) == 4, graphs

    # TTT on 2 x 32 per step, as each rank of the record trains on 2 x 2048: graph 5, training mode,
    # looping on, at that shape; both of its steps per chunk, and the next chunk's, reuse it.
    small_ttt = tg.Hyperparameters(**{**TINY, "ttt_batch_seqs": 2, **kernels})
    fresh = tg.build_model(h, torch.device("cpu"), is_cuda=True)
    fresh.looping_active = True
    tg.evaluate_ttt(small_ttt, rt, tg.maybe_compile(fresh, rt), tokens, luts)
    assert len(graphs) == 5, graphs
    assert graph_breaks() == {}
    assert len(graphs) <= torch._dynamo.config.recompile_limit  # beyond it Dynamo silently runs eager

    # The strides are guarded too: the training shape as one contiguous tensor is graph 6. On CUDA
    # Runtime.to_device hands every batch over as a contiguous copy, so there only shapes differ.
    x, y = loader.next_batch(rt.micro_batch_seqs)
    with rt.autocast():
        trainer.compiled(x.contiguous(), y.contiguous()).backward()
    assert len(graphs) == 6, graphs


@pytest.mark.parametrize("schedule, dtype", [("record", torch.float32), ("polar", torch.bfloat16)])
def test_compiled_newton_schulz_stays_within_the_recompile_limit(graphs, schedule, dtype):
    """The record's torch.compile(zeropower_via_newtonschulz5) meets one matrix shape per Muon
    parameter kind (c_q, c_k/c_v, fc, mlp.proj, bigram.proj, smear_gate): shapes of the same
    aspects, scaled down. Each must compile without a break, and all of them within Dynamo's
    recompile limit, or the last shapes would silently run eager. Also with the Polar Express
    schedule on the bf16 input MUON_BF16_MOMENTUM=1 hands it."""
    compiled = torch.compile(tg.zeropower_via_newtonschulz5)
    coeffs = tg.NS_SCHEDULES[schedule]
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (32, 64), (256, 64), (64, 256), (64, 4), (1, 12)] * 2:
        G = torch.randn(*shape, generator=g).to(dtype)
        assert torch.allclose(compiled(G, 5, coeffs), tg.zeropower_via_newtonschulz5(G, 5, coeffs), atol=1e-5), shape
    assert graph_breaks() == {}
    assert 1 <= len(graphs) <= torch._dynamo.config.recompile_limit, graphs


def test_gpu_check_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*Nothing was run"):
        bench.main(["gpu-check", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_gpu_check_logic_on_cpu(graphs, tmp_path):
    """bench.py gpu-check's checks, run on CPU with a tiny model (fp32 there, no compiled
    Newton-Schulz): every check passes, the figures are filled in, and both records are written.
    GPT.forward's graphs: training looping off, on; evaluation; TTT at 2 x 32 per rank."""
    h = tg.Hyperparameters(**RECORD_LIKE_TTT)
    report = bench.CheckReport()
    assert bench.record_gpu_check(h, tg.Runtime(h), 2, report, {"command": "test"}, tmp_path, "gpu_check_cpu") == 0
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert result["passed"] and result["failure"] is None
    assert all(c["passed"] for c in result["checks"]) and len(result["checks"]) == len(report.checks) == 12
    figures = result["figures"]
    assert figures["graphs"] == {"GPT.forward": 4, "zeropower_via_newtonschulz5": 0}
    assert figures["ttt_batch_per_rank"] == "2 x 32"
    assert figures["train_tokens_per_second"] > 0 and figures["eval_tokens_per_second"] > 0
    assert (tmp_path / "gpu_check_cpu.txt").read_text().splitlines() == report.lines
    assert report.lines[-1] == "gpu_check:PASS (12/12 checks)"


def test_gpu_check_records_a_crash_with_what_it_measured(graphs, tmp_path, monkeypatch):
    """A check that raises (here evaluation, standing in for an out-of-memory or FA3 failure)
    still leaves both records: the training figures and checks measured before it, the check that
    was running, the exception's type and message; and gpu-check exits 1."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(tg, "evaluate_plain", out_of_memory)
    h = tg.Hyperparameters(**RECORD_LIKE_TTT)
    assert bench.record_gpu_check(h, tg.Runtime(h), 1, bench.CheckReport(), {"command": "test"}, tmp_path, "crash") == 1
    result = json.loads((tmp_path / "crash.json").read_text())
    assert result["passed"] is False
    assert result["failure"] == {"check": "compiled evaluation", "type": "RuntimeError",
                                 "message": "CUDA out of memory (stand-in)"}
    assert [c["check"] for c in result["checks"]][-2:] == ["no recompilation in timed steps", "finite training loss"]
    assert all(c["passed"] for c in result["checks"])
    assert result["figures"]["step_ms"] > 0 and "eval_tokens_per_second" not in result["figures"]
    assert result["figures"]["graphs"]["GPT.forward"] == 2
    text = (tmp_path / "crash.txt").read_text()
    assert "check CRASH: compiled evaluation (RuntimeError: CUDA out of memory (stand-in))" in text
    assert "Traceback" in text and text.splitlines()[-1].startswith("gpu_check:FAIL (")


class PackedLoader:
    """VARLEN=1 micro-batches of the tiny config (one row of 4 x 32 tokens): documents every 50
    tokens (cu_seqlens of 64 entries) or every 2 (65 segments: 128 entries), in turn."""

    def __init__(self, h):
        self.g, self.h, self.calls = torch.Generator().manual_seed(0), h, 0

    def next_batch(self, rows: int):
        n = rows * self.h.train_seq_len
        t = torch.randint(2, V, (1, n + 1), generator=self.g)
        starts = range(0, n, 50 if self.calls % 2 == 0 else 2)
        t[0, list(starts)] = tg.BOS_ID
        self.calls += 1
        return t[:, :-1], t[:, 1:], tg.packed_cu_seqlens(list(starts), n, self.h.train_seq_len)


@pytest.mark.parametrize("switches", [{}, FRONTIER_MATH], ids=["varlen", "frontier"])
def test_varlen_compiles_a_graph_per_cu_seqlens_length_before_the_clock(graphs, monkeypatch, switches):
    """VARLEN=1: shapes are static (dynamic=False), so each padded cu_seqlens length is a graph of
    its own per looping mode. warm_up() compiles the first VARLEN_WARM_LENGTHS lengths in both modes
    (here 2: 64 and 128 entries, so 4 graphs), and no training step after it compiles again, at
    either length. Evaluation (no cu_seqlens) adds its 2: 6 in all, within the limit the Runtime
    raised, and no graph breaks. (The record's rows of 98,304 tokens: 4 lengths, 8 training graphs.)
    Alone and with the rest of the frontier preset's switches."""
    if switches.get("fused_ce"):
        need_triton()
    monkeypatch.setattr(tg, "VARLEN_WARM_LENGTHS", 2)
    with torch._dynamo.config.patch(recompile_limit=8):
        h = tg.Hyperparameters(**{**TINY, "warmup_steps": 1, **switches, "varlen": True})
        rt = tg.Runtime(h, environ={})
        assert torch._dynamo.config.recompile_limit == tg.VARLEN_RECOMPILE_LIMIT == 64
        rt.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        torch.manual_seed(0)
        model = tg.build_model(h, torch.device("cpu"), is_cuda=True)
        trainer = tg.Trainer(h, rt, model)
        loader = PackedLoader(h)
        tg.warm_up(h, trainer, loader)
        assert len(graphs) == 4, graphs  # (64, 128 entries) x (looping off, on)
        for looping in (False, True):
            model.looping_active = looping
            for step in range(2):  # one micro-batch of each length
                trainer.step(loader, step, 1.0)
        assert len(graphs) == 4, graphs
        luts = (torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
        tokens = torch.randint(4, V, (4 * h.eval_seq_len + 1,), generator=torch.Generator().manual_seed(1))
        for looping in (False, True):
            model.looping_active = looping
            tg.evaluate_plain(h, rt, trainer.compiled, tokens, luts)
        assert len(graphs) == 6, graphs
        assert graph_breaks() == {}
        assert len(graphs) <= torch._dynamo.config.recompile_limit


def test_varlen_fa3_branch_compiles_without_breaks(graphs, monkeypatch):
    """The FA3 branch of varlen_attention under fullgraph=True: FA3's varlen function is a torch
    custom op there, stood in for by one with a shape-only fake (the stand-in of test_cuda_path is
    plain Python, which Dynamo would trace into). It returns (out, lse), as some builds do."""
    @torch.library.custom_op("test_varlen::fa3_varlen", mutates_args=())
    def fa3_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        bounds = cu.tolist()  # each segment alone (eager, inside the op)
        y = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                      enable_gqa=True).transpose(0, 1)
                       for a, b in zip(bounds, bounds[1:]) if b > a])
        return y, torch.zeros(q.size(1), q.size(0))

    @fa3_varlen.register_fake
    def _(q, k, v, cu, max_seqlen):
        return torch.empty_like(q), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)

    calls = []

    def standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        calls.append((q.shape, cu_seqlens_q.shape, max_seqlen_q, causal))
        return fa3_varlen(q, k, v, cu_seqlens_q, max_seqlen_q)

    h = tg.Hyperparameters(**TINY, varlen=True)
    torch.manual_seed(0)
    model = tg.GPT(h).eval()
    x, y, cu = PackedLoader(h).next_batch(4)
    want = model(x, y, cu_seqlens=cu)
    monkeypatch.setattr(tg, "FLASH_ATTN_VARLEN_FUNC", standin)
    with torch.no_grad():
        got = torch.compile(model, dynamic=False, fullgraph=True)(x, y, cu_seqlens=cu)
    assert graph_breaks() == {} and len(graphs) == 1
    assert calls and set(calls) == {((128, 4, 16), (64,), 32, True)}  # traced once per layer
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("switches", [{}, FRONTIER_MATH], ids=["record", "frontier"])
def test_phased_ttt_compiles_without_breaks_within_the_recompile_limit(graphs, monkeypatch, switches):
    """Phased TTT (PHASED_TTT_ENABLED) compiles its own forward with dynamic shapes, since its
    windows grow chunk by chunk and its SGD steps' pieces vary: scoring (no_grad, adapters),
    adapter steps (gradients, adapters) and global SGD steps (training mode, no adapters), the short
    batch's adapters of their own size once more; no graph break, all within Dynamo's recompile
    limit, and the compiled stage scores what the eager one does. On the record's model and on the
    frontier preset's."""
    if switches.get("fused_ce"):
        need_triton()
    monkeypatch.setattr(tg, "PHASED_CHUNK", 8)
    h = tg.Hyperparameters(**{**TINY, **switches, **dict(phased_ttt_enabled=True, phased_ttt_batch_docs=2,
                                                         phased_ttt_prefix_docs=3, phased_ttt_num_phases=2,
                                                         phased_ttt_lora_rank=4, ttt_chunk_tokens=64)})
    g = torch.Generator().manual_seed(3)
    tokens = torch.cat([torch.cat((torch.tensor([1]), torch.randint(4, V, (n - 1,), generator=g)))
                        for n in (40, 12, 70, 25, 33)])
    luts = (torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    results = []
    for compile_ in (True, False):
        rt = tg.Runtime(h, environ={})
        rt.compile, rt.autocast = compile_, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        torch.manual_seed(0)
        model = tg.build_model(h, torch.device("cpu"), is_cuda=True)
        model.looping_active = True
        results.append(tg.evaluate_ttt_phased(h, rt, tg.maybe_compile(model, rt), tokens, luts)[:2])
    assert graph_breaks() == {}
    assert 3 <= len(graphs) <= torch._dynamo.config.recompile_limit, graphs
    assert results[0] == pytest.approx(results[1], rel=1e-3)
