"""The Triton kernels (FUSED_CE, FUSED_MLP) against the PyTorch math they replace, run on CPU
by Triton's interpreter: values and input gradients, odd shapes, extreme logits, the custom-op
registrations, torch.compile without graph breaks, and a tiny training run and its evaluations
with the switches on and off.

Tolerances. fp32: relative to the largest reference value, 1e-5 (the kernels compute tanh from
exp, the reference calls torch.tanh: both are within a few ulp). bf16: torch's own bf16 defaults
(rtol 1.6e-2, atol 1e-5), i.e. about one bf16 ulp: the kernels compute in fp32 and round once on
store, the reference's rounding points differ.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import need_triton

need_triton(module=True)

SOFTCAP = 30.0
TINY = dict(vocab_size=384, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
            xsa_last_n=4, parallel_residual_start=3, loop_start=1, loop_end=2, num_loops=1,
            bigram_vocab_size=512, bigram_dim=16, train_seq_len=64, train_batch_tokens=1024, grad_accum_steps=2,
            eval_seq_len=64, eval_stride=16, eval_batch_seqs=16, ttt_chunk_tokens=256, ttt_epochs=1,
            ttt_lr=0.05, warmup_steps=0, muon_momentum_warmup_steps=5, compile=False, run_id="test_kernels", seed=3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets it: the kernels must be built for the interpreter"
    tg.Hyperparameters(**TINY, fused_ce=True, fused_mlp=True)
    assert tg.KERNELS_LOADED


def assert_close(actual, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1.6e-2, atol=1e-5)


def reference_ce(z, y):
    """Soft-cap then cross-entropy, in fp32 (the record's math on CPU)."""
    return F.cross_entropy(SOFTCAP * torch.tanh(z / SOFTCAP), y, reduction="none")


def check_ce(z, y, dtype):
    """Per-token losses, and the logits' gradient for a random weight per token (evaluation's
    reduction='none' as well as training's mean go through the same backward). The reference
    for bf16 logits is the fp32 math on the same (bf16-valued) logits, its gradient rounded to
    bf16: that is the kernel's contract. The record's CUDA path soft-caps in bf16 instead, which
    is coarser (a capped logit near 20 has a bf16 step of 0.125); that difference is why the
    switch is off by default."""
    g = torch.randn(z.size(0), generator=torch.Generator().manual_seed(1))
    z1 = z.to(dtype).requires_grad_()
    z2 = z.to(dtype).float().requires_grad_()
    losses = tg.fused_softcap_cross_entropy(z1, y, SOFTCAP)
    expected = reference_ce(z2, y)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert_close(losses, expected, torch.float32)  # fp32 math whatever the input dtype
    losses.backward(g)
    expected.backward(g)
    assert z1.grad.dtype == dtype and torch.isfinite(z1.grad).all()
    assert_close(z1.grad, z2.grad.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [
    (1, 300),     # a single row; vocabulary not a multiple of the 128-wide block
    (70, 1000),   # fewer rows than the 128-row tile
    (130, 128),   # exactly one block per row, two rows into the second tile
    (3, 5000),    # long rows: 40 blocks each
])
def test_softcap_ce_matches_reference(rows, vocab, dtype):
    gen = torch.Generator().manual_seed(rows * vocab)
    z = torch.randn(rows, vocab, generator=gen) * 8  # spans the soft-cap's curved part
    y = torch.randint(0, vocab, (rows,), generator=gen)
    check_ce(z, y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_ce_extreme_logits(dtype):
    """Logits of +-1e4 saturate the cap; nothing overflows, the target may sit at either end."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 257, generator=gen)
    z[:, ::3] = 1e4
    z[:, 1::3] = -1e4
    z[5] = -1e4  # a row that is -1e4 everywhere
    y = torch.tensor([0, 1, 2, 256, 255, 7])
    check_ce(z, y, dtype)


def test_mean_loss_backward_through_a_stride_zero_gradient():
    """Training takes the mean: its gradient reaches the op as an expanded (stride-0) tensor."""
    z = torch.randn(40, 200, generator=torch.Generator().manual_seed(2)) * 5
    y = torch.randint(0, 200, (40,))
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    tg.fused_softcap_cross_entropy(z1, y, SOFTCAP).mean().backward()
    reference_ce(z2, y).mean().backward()
    assert_close(z1.grad, z2.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 130), (2, 11, 1500)])  # 16,384-element blocks: 7 .. 33,000
def test_leaky_relu_sq_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    u = torch.randn(shape, generator=gen) * 3
    u.view(-1)[0] = 0.0
    g = torch.randn(shape, generator=gen)
    u1, u2 = u.to(dtype).requires_grad_(), u.to(dtype).requires_grad_()
    out = tg.fused_leaky_relu_sq(u1)
    expected = F.leaky_relu(u2, 0.5).square()
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    out.backward(g.to(dtype))
    expected.backward(g.to(dtype))
    assert_close(u1.grad, u2.grad, dtype)


def test_leaky_relu_sq_takes_a_non_contiguous_input():
    u = torch.randn(40, 24, generator=torch.Generator().manual_seed(3)).t()
    assert not u.is_contiguous()
    torch.testing.assert_close(tg.fused_leaky_relu_sq(u), F.leaky_relu(u, 0.5).square(), rtol=0, atol=0)


def test_gpu_tiles_give_the_same_results(monkeypatch):
    """The interpreter runs the CUDA tile sizes too (one row per program, 1024-wide blocks),
    so the configuration a GPU launches is checked here as well."""
    monkeypatch.setitem(tg.CE_TILES, "cpu", tg.CE_TILES["cuda"])
    monkeypatch.setitem(tg.ACT_BLOCK, "cpu", tg.ACT_BLOCK["cuda"])
    gen = torch.Generator().manual_seed(4)
    check_ce(torch.randn(3, 2100, generator=gen) * 8, torch.randint(0, 2100, (3,), generator=gen), torch.float32)
    u = torch.randn(2, 1100, generator=gen).requires_grad_()
    u.grad = None
    out = tg.fused_leaky_relu_sq(u)
    out.sum().backward()
    torch.testing.assert_close(out, F.leaky_relu(u, 0.5).square(), rtol=0, atol=0)
    torch.testing.assert_close(u.grad, torch.where(u > 0, 2 * u, 0.5 * u).detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("op,args", [
    ("softcap_ce", lambda: (torch.randn(5, 130) * 4, torch.randint(0, 130, (5,)), SOFTCAP)),
    ("leaky_relu_sq", lambda: (torch.randn(3, 40),)),
])
def test_custom_op_registrations(op, args):
    """torch.library.opcheck: schema, fake (shape-only) implementation and autograd registration
    agree with the real kernels, which is what torch.compile relies on."""
    a = args()
    a[0].requires_grad_()
    torch.library.opcheck(getattr(torch.ops.train_gpt, op).default, a)


def tiny_model(**overrides):
    h = tg.Hyperparameters(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = tg.GPT(h)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight nonzero, so the zero-initialised projections carry signal
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.looping_active = True
    return h, model


def test_compiled_model_has_no_graph_break_and_matches_eager():
    """torch.compile(fullgraph=True) traces both kernels as single ops: one graph, the custom ops
    in it, and the compiled forward and backward equal eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    h, model = tiny_model(fused_ce=True, fused_mlp=True, num_layers=2, num_loops=0, xsa_last_n=2,
                          parallel_residual_start=1)  # every block kind, less to trace
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    ids = torch.randint(0, h.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    y = torch.roll(ids, -1, 1)
    loss = compiled(ids, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(graphs) == 1 and not counters["graph_break"], dict(counters["graph_break"])
    ops = {n.target for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {torch.ops.train_gpt.softcap_ce, torch.ops.train_gpt.leaky_relu_sq} <= ops, ops
    model.zero_grad(set_to_none=True)
    eager = model(ids, y)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    torch._dynamo.reset()


def test_model_losses_match_with_switches_on(monkeypatch):
    """Same weights: per-token losses (what evaluation scores) and every parameter's gradient
    of the mean loss agree between the fused and the PyTorch paths."""
    _, ref = tiny_model()
    _, fused = tiny_model(fused_ce=True, fused_mlp=True)
    ids = torch.randint(0, 384, (3, 64), generator=torch.Generator().manual_seed(6))
    y = torch.roll(ids, -1, 1)
    with torch.no_grad():
        per_token = fused(ids, y, reduction="none")
        expected = ref(ids, y, reduction="none")
    assert per_token.shape == y.shape and per_token.dtype == torch.float32
    assert_close(per_token, expected, torch.float32)
    fused(ids, y).backward()
    ref(ids, y).backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * b.grad.abs().max().item(), msg=n)


def test_tiny_training_and_evaluation_match_with_switches_on(tiny_data):
    """Six optimizer steps on the tiny data with FUSED_CE=1 FUSED_MLP=1 and with both off, then
    sliding-window and score-first TTT evaluation of the trained models: losses, bpb and TTT
    (which trains through the kernels too) agree to 1e-5 relative (measured: under 1e-7)."""
    results = {}
    for fused in (False, True):
        h = tg.Hyperparameters(**{**TINY, "vocab_size": tiny_data["vocab_size"]}, data_dir=tiny_data["data_dir"],
                               fused_ce=fused, fused_mlp=fused)
        rt = tg.Runtime(h)
        torch.manual_seed(h.seed)
        model = tg.build_model(h, rt.device, rt.is_cuda)
        trainer = tg.Trainer(h, rt, model)
        loader = tg.ShuffledSequenceLoader(h.train_files, h.train_seq_len, rt.rank, rt.world_size)
        losses = [trainer.step(loader, step, 1.0).item() for step in range(6)]
        val = tg.load_validation_tokens(h.val_files, h.eval_seq_len, h.vocab_size)[: 2 * 256 + 1]
        luts = (torch.ones(h.vocab_size, dtype=torch.int16), torch.zeros(h.vocab_size, dtype=torch.bool),
                torch.zeros(h.vocab_size, dtype=torch.bool))
        sliding = tg.evaluate_sliding(h, rt, model, val, luts)[:2]
        ttt = tg.evaluate_ttt(h, rt, model, val, luts)[:2]
        results[fused] = losses, sliding, ttt
    (l0, s0, t0), (l1, s1, t1) = results[False], results[True]
    assert l0[-1] < l0[0] - 0.5, l0  # it learns
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert s1 == pytest.approx(s0, rel=1e-5)
    assert t1 == pytest.approx(t0, rel=1e-5)


def test_switch_without_triton_fails_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setattr(tg, "KERNELS_LOADED", False)
    with pytest.raises(RuntimeError, match=r"FUSED_MLP=1 needs Triton, which is not installed"):
        tg.Hyperparameters(**TINY, fused_mlp=True)
    monkeypatch.setenv("FUSED_CE", "1")
    with pytest.raises(RuntimeError, match=r"FUSED_CE=1 needs Triton"):
        tg.Hyperparameters.from_env(**TINY)


def test_switches_off_need_no_triton(monkeypatch):
    """A CPU user without Triton: the default settings build, run and train the model."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(tg, "KERNELS_LOADED", False)
    h = tg.Hyperparameters(**TINY)
    assert not h.fused_ce and not h.fused_mlp
    tg.Runtime(h)
    ids = torch.randint(0, 384, (1, 16))
    tg.GPT(h)(ids, ids).backward()
    assert not tg.KERNELS_LOADED


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    h = tg.Hyperparameters(**TINY, fused_ce=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=r"FUSED_CE=1 FUSED_MLP=0 on CPU.*TRITON_INTERPRET=1"):
        tg.Runtime(h)


# The packed file's module-level names are renamed: its config is found as the dataclass with a
# fused_ce field, and the kernels through the torch ops they register (names that are strings).
PACKED_CHECK = """
import dataclasses, runpy, sys, torch, torch.nn.functional as F
ns = runpy.run_path(sys.argv[1], run_name="packed")
config = next(v for v in ns.values() if dataclasses.is_dataclass(v) and "fused_ce" in {f.name for f in dataclasses.fields(v)})
config(vocab_size=300, num_loops=0, fused_ce=True, fused_mlp=True)
gen = torch.Generator().manual_seed(0)
z, y, u = torch.randn(5, 300, generator=gen) * 8, torch.randint(0, 300, (5,), generator=gen), torch.randn(7, 9, generator=gen)
ref = F.cross_entropy(30 * torch.tanh(z / 30), y, reduction="none")
ops = torch.ops.train_gpt
torch.testing.assert_close(ops.softcap_ce(z, y, 30.0)[0], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
torch.testing.assert_close(ops.leaky_relu_sq(u), F.leaky_relu(u, 0.5).square(), rtol=0, atol=0)
z.requires_grad_(True)
ops.softcap_ce(z, y, 30.0)[0].sum().backward()
zr = z.detach().clone().requires_grad_(True)
F.cross_entropy(30 * torch.tanh(zr / 30), y, reduction="sum").backward()
torch.testing.assert_close(z.grad, zr.grad, rtol=1e-4, atol=1e-6)
print("packed kernels ok")
"""


def test_packed_script_keeps_the_kernels_working(tmp_path):
    """A file packed for a preset with both kernels on holds them, and Triton reads `tl.constexpr`
    from the kernels' argument annotations, so the packer must not strip them: the packed file's
    kernels run and match the reference."""
    import subprocess

    import pack

    preset = tmp_path / "kernels.env"
    preset.write_text("FUSED_CE=1\nFUSED_MLP=1\n")
    spec = pack.specialise_source(Path(tg.__file__).read_bytes(), str(preset))
    assert "fused_ce" not in spec.pinned and "fused_mlp" not in spec.pinned and "load_kernels" not in spec.removed
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes(pack.pack_source(spec.source.encode()).wrapped)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PACKED_CHECK, str(packed)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "packed kernels ok" in proc.stdout, proc.stderr[-3000:]


def test_bench_kernel_ab_runs_end_to_end(capsys):
    """bench.py kernels is for a GPU; its parts run here on tiny shapes (eager, interpreter), so
    what a GPU session runs has been executed. Without CUDA the command refuses clearly."""
    import bench

    h = tg.Hyperparameters(**TINY, fused_ce=True, fused_mlp=True)
    rows = bench.kernel_isolation(h, torch.device("cpu"), rows=96, iters=1, compile_modes=(False,))
    assert [r["part"] for r in rows] == ["loss math", "loss FUSED_CE", "mlp math", "mlp FUSED_MLP"]
    assert all(r["ms"] > 0 for r in rows)
    off, on = (bench.full_config_steps({**TINY, "fused_ce": f, "fused_mlp": f}, steps=1) for f in (False, True))
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-5)
    if not torch.cuda.is_available():
        assert bench.main(["kernels"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_packer_keeps_only_the_annotations_that_are_read():
    """The packer drops argument and return annotations except where a decorator reads them
    (Triton's jit, torch.library.custom_op); it keeps tl.constexpr arguments' names."""
    import pack

    src = (
        "import triton\nimport triton.language as tl\nimport torch\n"
        "def plain(width: int, *, scale: float = 2.0) -> float:\n    return width * scale\n"
        "def load():\n"
        "    @triton.jit\n    def kernel(x_ptr, n, BLOCK_SIZE: tl.constexpr):\n"
        "        offsets = tl.arange(0, BLOCK_SIZE) + BLOCK_SIZE * tl.program_id(0) + BLOCK_SIZE\n"
        "    @torch.library.custom_op('ns::op', mutates_args=())\n"
        "    def op(tensor_in: torch.Tensor, factor: float) -> torch.Tensor:\n        return tensor_in * factor\n"
    )
    minified = pack.minify_source(src, keep_names=True)
    assert "def plain(width,*,scale=2.):" in minified
    assert "BLOCK_SIZE:tl.constexpr" in minified and "tl.arange(0,BLOCK_SIZE)" in minified
    assert "tensor_in:torch.Tensor,factor:float)->torch.Tensor" in minified
    renamed = pack.minify_source(src)  # module-level names renamed, but `tl`: Triton reads "tl.constexpr"
    assert "BLOCK_SIZE:tl.constexpr" in renamed and "import triton.language as tl" in renamed
