"""torch.compile as the CUDA path uses it, on CPU: fullgraph=True, dynamic=False, bf16 autocast.

Dynamo's "eager" backend stands in for inductor: the graphs Dynamo captures, its graph breaks and
its recompilations do not depend on the backend, and "eager" compiles none of them (inductor on
two CPU cores would take minutes). What the code intends, and this test pins: FOUR graphs of
GPT.forward in a whole run - {training, evaluation} x {looping off, looping on}. Every padded
evaluation batch, sliding windows, a freshly loaded model and the TTT steps reuse them.
"""

from __future__ import annotations

import functools

import pytest
import torch

import bench
import train_gpt as tg
from conftest import need_triton

V = 384
# Two layers (looped order 0, 0, 0, 1) keep tracing short; every block feature is there.
TINY = dict(
    vocab_size=V, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
    xsa_last_n=2, parallel_residual_start=1, loop_start=0, loop_end=0, num_loops=1,
    bigram_vocab_size=512, bigram_dim=16, train_seq_len=32, train_batch_tokens=128, grad_accum_steps=1,
    eval_seq_len=32, eval_stride=16, eval_batch_seqs=4, ttt_chunk_tokens=128, ttt_epochs=1, ttt_batch_seqs=4,
    compile=True, run_id="test_cuda_compile", seed=0,
)

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


@pytest.mark.parametrize("kernels", [{}, dict(fused_ce=True, fused_mlp=True)], ids=["math", "kernels"])
def test_whole_run_compiles_four_graphs_without_breaks(graphs, kernels):
    if kernels:
        need_triton()
    h = tg.Hyperparameters(**TINY, **kernels)
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
    assert len(graphs) == 2, graphs  # one per mode; the second step of each reuses it

    for looping in (False, True):
        model.looping_active = looping
        for n_windows in (1, 3, 4, 7, 10):  # padded to EVAL_BATCH_SEQS rows: one shape
            tg.evaluate_plain(h, rt, trainer.compiled, tokens[: n_windows * h.eval_seq_len + 1], luts)
        tg.evaluate_sliding(h, rt, trainer.compiled, tokens, luts)
    assert len(graphs) == 4, graphs  # one evaluation graph (no_grad, per-token NLL) per mode

    # After quantization every stage loads a fresh model and compiles it anew: the graphs are reused.
    for stage in (tg.evaluate_sliding, tg.evaluate_ttt):
        fresh = tg.build_model(h, torch.device("cpu"), is_cuda=True)
        fresh.looping_active = True
        stage(h, rt, tg.maybe_compile(fresh, rt), tokens, luts)
    assert len(graphs) == 4, graphs
    assert graph_breaks() == {}
    assert len(graphs) <= torch._dynamo.config.recompile_limit  # beyond it Dynamo silently runs eager


def test_compiled_newton_schulz_stays_within_the_recompile_limit(graphs):
    """The record's torch.compile(zeropower_via_newtonschulz5) meets one matrix shape per Muon
    parameter kind (c_q, c_k/c_v, fc, mlp.proj, bigram.proj, smear_gate): shapes of the same
    aspects, scaled down. Each must compile without a break, and all of them within Dynamo's
    recompile limit, or the last shapes would silently run eager."""
    compiled = torch.compile(tg.zeropower_via_newtonschulz5)
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 64), (32, 64), (256, 64), (64, 256), (64, 4), (1, 12)] * 2:
        G = torch.randn(*shape, generator=g)
        assert torch.allclose(compiled(G, 5), tg.zeropower_via_newtonschulz5(G, 5), atol=1e-5), shape
    assert graph_breaks() == {}
    assert 1 <= len(graphs) <= torch._dynamo.config.recompile_limit, graphs


def test_gpu_check_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*Nothing was run"):
        bench.main(["gpu-check", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_gpu_check_logic_on_cpu(graphs):
    """bench.py gpu-check's checks, run on CPU with a tiny model (fp32 there, no compiled
    Newton-Schulz): every check passes and the figures are filled in."""
    h = tg.Hyperparameters(**TINY)
    lines = []
    figures, checks = bench.gpu_check(h, tg.Runtime(h), 2, lines.append)
    assert all(ok for _, ok, _ in checks), checks
    assert len(lines) == len(checks) and figures["graphs"] == {"GPT.forward": 3, "zeropower_via_newtonschulz5": 0}
    assert figures["train_tokens_per_second"] > 0 and figures["eval_tokens_per_second"] > 0
