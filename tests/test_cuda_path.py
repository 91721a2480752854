"""The CUDA path, proven on a CPU-only build.

- Activation dtypes: every torch call of the model is replayed on fake CUDA tensors under PyTorch's
  real CUDA bf16 autocast rules (bench.CudaAutocastEmulation) and run on CPU with the dtype those
  rules give, with a FlashAttention-3 stand-in that refuses what FA3 refuses.
- The record's GPU setup: optimize_ddp off, Newton-Schulz compiled, bf16 inv_freq, one gradient
  all-reduce per TTT step, scoring without host syncs.
- torch.compile (aot_eager backend, bf16 CPU autocast): no graph breaks, the intended graph count.
The two-process checks (DDP under compile, rank 0's Hessians) are in test_cuda_dist.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import train_gpt as tg

from conftest import ROOT, TINY_VOCAB as V, need_triton, preset_code_settings, tiny_hparams

HEAD_DIM = 64  # the record's head dimension (512 / 8), the one its FA3 calls get
# conftest's tiny model, widened to the record's head dimension and rotary width (4 heads of 64,
# 2 KV heads as the record's group of 2), with short sequences and small batches: every path
# below runs in milliseconds.
SHORT = dict(model_dim=4 * HEAD_DIM, num_heads=4, num_kv_heads=2, rope_dims=16, train_seq_len=32,
             train_batch_tokens=128, grad_accum_steps=1, eval_seq_len=32, eval_stride=16, eval_batch_seqs=4,
             ttt_chunk_tokens=128, ttt_epochs=1, ttt_batch_seqs=4, compile=False, run_id="test_cuda_path", seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_h(**overrides) -> tg.Hyperparameters:
    return tiny_hparams(**{**SHORT, **overrides})


def cpu_runtime(h, **overrides):
    """The real single-process CPU Runtime, with the attributes named replaced (a stub all_reduce)."""
    rt = tg.Runtime(h, environ={})
    for name, value in overrides.items():
        setattr(rt, name, value)
    return rt


def fake_luts(vocab: int = V):
    ids = torch.arange(vocab)
    return (torch.where(ids < 4, 0, 1 + ids % 3).to(torch.int16), (ids % 2 == 0) & (ids >= 4), ids < 4)


class FA3StandIn:
    """flash_attn_interface.flash_attn_func's input contract: q, k, v in one dtype, fp16 or bf16,
    (B, T, heads, 64) with a contiguous last dim, k and v with NUM_KV_HEADS heads. It
    computes with SDPA and records the dtypes it was given."""

    def __init__(self, h):
        self.h, self.dtypes, self.varlen_calls = h, [], []

    def __call__(self, q, k, v, causal=False):
        h = self.h
        if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16, one dtype for q/k/v: got {q.dtype}, {k.dtype}, {v.dtype}")
        B, T = q.shape[:2]
        for name, t, heads in (("q", q, h.num_heads), ("k", k, h.num_kv_heads), ("v", v, h.num_kv_heads)):
            if t.shape != (B, T, heads, HEAD_DIM):
                raise RuntimeError(f"{name} has shape {tuple(t.shape)}, expected {(B, T, heads, HEAD_DIM)}")
            if t.stride(-1) != 1:
                raise RuntimeError(f"{name} must have contiguous last dimension")
        if not causal:
            raise RuntimeError("the record calls FA3 with causal=True")
        self.dtypes.append((q.dtype, k.dtype, v.dtype))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return y.transpose(1, 2), None  # some FA3 builds return (out, softmax_lse)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        """flash_attn_interface.flash_attn_varlen_func's contract (VARLEN=1): q (total, heads, 64),
        k and v with NUM_KV_HEADS heads, one dtype, fp16 or bf16, contiguous last dim; cu_seqlens int32,
        1-D, on q's device, from 0 up to total without decreasing, the same for q and k; max_seqlen an
        int no segment exceeds. It computes each segment alone with SDPA and records the dtypes."""
        h = self.h
        if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16, one dtype for q/k/v: got {q.dtype}, {k.dtype}, {v.dtype}")
        total = q.size(0)
        for name, t, heads in (("q", q, h.num_heads), ("k", k, h.num_kv_heads), ("v", v, h.num_kv_heads)):
            if t.shape != (total, heads, HEAD_DIM):
                raise RuntimeError(f"{name} has shape {tuple(t.shape)}, expected {(total, heads, HEAD_DIM)}")
            if t.stride(-1) != 1:
                raise RuntimeError(f"{name} must have contiguous last dimension")
        for cu in (cu_seqlens_q, cu_seqlens_k):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
                raise RuntimeError(f"cu_seqlens must be int32, 1-D, on {q.device}: got {cu.dtype}, {cu.dim()}-D, {cu.device}")
        if not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise RuntimeError("the record attends each segment to itself: cu_seqlens_q == cu_seqlens_k")
        bounds = cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise RuntimeError(f"cu_seqlens must rise from 0 to total={total} without decreasing: {bounds}")
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if not (isinstance(max_seqlen_q, int) and max_seqlen_q == max_seqlen_k and longest <= max_seqlen_q):
            raise RuntimeError(f"max_seqlen {max_seqlen_q!r}/{max_seqlen_k!r} must be an int >= the longest segment ({longest})")
        if not causal:
            raise RuntimeError("the record calls FA3 with causal=True")
        self.varlen_calls.append((q.dtype, k.dtype, v.dtype, len(bounds)))
        out = torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                                        is_causal=True, enable_gqa=True).transpose(0, 1)
                         for a, b in zip(bounds, bounds[1:]) if b > a])
        return out, None  # as flash_attn_func, some builds return (out, softmax_lse)


def test_fa3_varlen_stand_in_refuses_what_fa3_refuses():
    h = make_h()
    fa3 = FA3StandIn(h)
    T = 40
    q = torch.randn(T, h.num_heads, h.head_dim, dtype=torch.bfloat16)
    kv = torch.randn(T, h.num_kv_heads, h.head_dim, dtype=torch.bfloat16)
    cu = torch.tensor([0, 7, 20, 40, 40], dtype=torch.int32)
    out, _ = fa3.varlen(q, kv, kv, cu, cu, 20, 20, causal=True)
    assert out.shape == q.shape
    for bad, match in (((q.float(), kv, kv, cu, cu, 20, 20), "one dtype"),
                       ((q, q, q, cu, cu, 20, 20), "shape"),  # GQA not applied by the caller
                       ((q[None], kv, kv, cu, cu, 20, 20), "shape"),  # the batch dimension not flattened
                       ((q, kv, kv, cu.long(), cu.long(), 20, 20), "int32"),
                       ((q, kv, kv, cu[None], cu[None], 20, 20), "1-D"),
                       ((q, kv, kv, cu[:-2], cu[:-2], 20, 20), "total"),  # does not end at the last token
                       ((q, kv, kv, cu.flip(0), cu.flip(0), 20, 20), "rise"),
                       ((q, kv, kv, cu, cu.clone().fill_(40).index_fill_(0, torch.tensor([0]), 0), 20, 20), "cu_seqlens_q =="),
                       ((q, kv, kv, cu, cu, 12, 12), "longest"),  # a segment of 13
                       ((q, kv, kv, cu, cu, torch.tensor(20), 20), "int")):
        with pytest.raises(RuntimeError, match=match):
            fa3.varlen(*bad, causal=True)
    with pytest.raises(RuntimeError, match="causal"):
        fa3.varlen(q, kv, kv, cu, cu, 20, 20)


def test_fa3_stand_in_refuses_what_fa3_refuses():
    h = make_h()
    fa3 = FA3StandIn(h)
    q = torch.randn(2, 8, h.num_heads, h.head_dim, dtype=torch.bfloat16)
    kv = torch.randn(2, 8, h.num_kv_heads, h.head_dim, dtype=torch.bfloat16)
    fa3(q, kv, kv, causal=True)
    with pytest.raises(RuntimeError, match="one dtype"):
        fa3(q.float(), kv, kv, causal=True)
    with pytest.raises(RuntimeError, match="one dtype"):
        fa3(q.float(), kv.float(), kv.float(), causal=True)
    with pytest.raises(RuntimeError, match="shape"):
        fa3(q, q, q, causal=True)  # k/v with NUM_HEADS heads: GQA not applied by the caller
    with pytest.raises(RuntimeError, match="contiguous"):
        fa3(q.transpose(-1, -2).contiguous().transpose(-1, -2), kv, kv, causal=True)
    with pytest.raises(RuntimeError, match="shape"):
        fa3(q[..., :32], kv[..., :32], kv[..., :32], causal=True)  # not the record's head dimension


# -----------------------------------------------------------------------------------------
# activation dtypes under CUDA autocast
# -----------------------------------------------------------------------------------------

# Calls the CPU-only build cannot replay on fake CUDA: indexing returns its input's dtype on every
# device; backward is not an op (the gradients' dtypes follow the forward's); torch 2.9's fake SDPA
# asks the (absent) device which kernel to use - it is on autocast's bf16 list, so bf16 in, bf16
# out, as on CPU.
UNPROBED_OK = {"TensorBase.__getitem__", "Tensor.backward", "scaled_dot_product_attention"}


def frontier_model_switches(**tiny) -> dict:
    """presets/frontier.env's switches and choices, parsed, at this file's tiny sizes (`tiny`), but
    phased TTT's (an evaluation stage, whose adapted forward has its own test below) and the
    compressor's (pergroup needs lrzip at construction, and no forward sees it): the frontier case
    follows the preset as it changes."""
    settings = tg.env_settings(preset_code_settings(ROOT / "presets" / "frontier.env"))
    return {**{k: v for k, v in settings.items() if not k.startswith("phased_ttt") and k != "compressor"}, **tiny}


KERNEL_SWITCHES = {"math": {}, "kernels": dict(fused_ce=True, fused_mlp=True), "varlen": dict(varlen=True),
                   # every switch of the frontier preset, the Triton kernels and VARLEN's packed rows
                   # included; its two-lane decoder from block 3 of the tiny model's 4
                   "frontier": frontier_model_switches(parallel_lanes_start=3)}


def varlen_batch(h, g):
    """A packed row of two micro-batch rows' tokens (VARLEN=1): documents start at 0, 5 and 23, the
    last longer than TRAIN_SEQ_LEN (split), and cu_seqlens padded to 64 entries."""
    n = 2 * h.train_seq_len
    x, y = torch.randint(0, V, (1, n), generator=g), torch.randint(0, V, (1, n), generator=g)
    return x, y, tg.packed_cu_seqlens([0, 5, 23], n, h.train_seq_len)


@pytest.fixture(scope="module", params=sorted(KERNEL_SWITCHES))
def cuda_dtype_run(request):
    """Training micro-batch forward + backward and evaluation forward, looping off and on, of the
    model as built for CUDA, under emulated CUDA autocast; with the FA3 stand-in and with SDPA;
    with the record's math, with the Triton kernels (FUSED_CE, FUSED_MLP) switched on, with the
    frontier preset's switches (sparse gate, SmearGate before the norm, the two-lane decoder, the
    kernels, Polar Express and the rest, on packed rows), and
    with VARLEN=1 (a packed row and its cu_seqlens, through both FA3 functions' stand-ins)."""
    if KERNEL_SWITCHES[request.param].get("fused_ce"):
        need_triton()
    results = {}
    for attention in ("fa3", "sdpa"):
        h = make_h(**KERNEL_SWITCHES[request.param])
        torch.manual_seed(0)
        model = tg.build_model(h, torch.device("cpu"), is_cuda=True)
        fa3 = FA3StandIn(h)
        outputs: dict[str, set] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(
                    lambda m, a, out, name=name: outputs.setdefault(name, set()).add(out.dtype))
        g = torch.Generator().manual_seed(1)
        if h.varlen:
            batch = varlen_batch(h, g)
        else:
            batch = torch.randint(0, V, (2, h.train_seq_len), generator=g), torch.randint(0, V, (2, h.train_seq_len), generator=g)
        losses, nlls = [], []
        old = tg.FLASH_ATTN_FUNC, tg.FLASH_ATTN_VARLEN_FUNC
        tg.FLASH_ATTN_FUNC, tg.FLASH_ATTN_VARLEN_FUNC = (fa3, fa3.varlen) if attention == "fa3" else (None, None)
        try:
            with bench.CudaAutocastEmulation() as emulation:
                for looping in (False, True):
                    model.looping_active = looping
                    model.train()
                    loss = model(*batch[:2], cu_seqlens=batch[2] if h.varlen else None)
                    loss.backward()
                    losses.append(loss.dtype)
                    model.eval()
                    with torch.no_grad():
                        nlls.append(model(*batch[:2], reduction="none", cu_seqlens=batch[2] if h.varlen else None).dtype)
        finally:
            tg.FLASH_ATTN_FUNC, tg.FLASH_ATTN_VARLEN_FUNC = old
        results[attention] = dict(model=model, fa3=fa3, outputs=outputs, losses=losses, nlls=nlls,
                                  emulation=emulation, kernels=h.fused_ce, varlen=h.varlen)
    return results


@pytest.mark.parametrize("attention", ["fa3", "sdpa"])
def test_cuda_activation_dtypes_are_the_records(cuda_dtype_run, attention):
    """On torch 2.9.1 (the record's) every module of the model hands back bf16 under CUDA autocast;
    since 2.12 F.rms_norm returns fp32 there, which made q/k fp32 next to a bf16 v (FA3 refuses)
    and, with SDPA, the whole residual stream fp32. The norms now cast back."""
    run = cuda_dtype_run[attention]
    assert run["emulation"].unprobed <= UNPROBED_OK, run["emulation"].unprobed
    if attention == "fa3" and run["varlen"]:  # every call with the packed row: the varlen function alone
        assert not run["fa3"].dtypes and run["fa3"].varlen_calls
        assert {c[:3] for c in run["fa3"].varlen_calls} == {(torch.bfloat16,) * 3}
        assert {c[3] for c in run["fa3"].varlen_calls} == {64}
    elif attention == "fa3":
        assert run["fa3"].dtypes and set(run["fa3"].dtypes) == {(torch.bfloat16,) * 3}
    model, outputs = run["model"], run["outputs"]
    assert {n for n in outputs if n.startswith("blocks.") and n.count(".") == 1} == {f"blocks.{i}" for i in range(4)}
    wrong = {name: dtypes for name, dtypes in outputs.items() if dtypes != {torch.bfloat16}}
    assert not wrong, f"modules whose output is not bf16: {wrong}"
    assert run["losses"] == [torch.float32] * 2 and run["nlls"] == [torch.float32] * 2


def test_cuda_parameter_and_gradient_dtypes(cuda_dtype_run):
    """tok_emb and bigram.embed are stored (and receive gradients) in bf16 as the record's
    model.bfloat16() leaves them; every linear and control tensor stays fp32."""
    model = cuda_dtype_run["fa3"]["model"]
    for name, p in model.named_parameters():
        want = torch.bfloat16 if name in ("tok_emb.weight", "bigram.embed.weight") else torch.float32
        assert p.dtype == want, name
        assert p.grad is not None and p.grad.dtype == want, name


def test_cuda_rules_reached_through_fake_tensors(cuda_dtype_run):
    """The emulation really consulted the CUDA rules: linear runs in bf16 even on fp32 input, and
    the ops on autocast's fp32 list (F.normalize in XSA, square in the MLP, cross-entropy) give
    fp32 - on the record's torch as now, so the record's XSA output and MLP hidden were fp32 too."""
    run = cuda_dtype_run["fa3"]
    probed = run["emulation"].probed
    assert probed["linear"] == {torch.bfloat16}
    # With the kernels on, the MLP activation and the loss are custom ops (no autocast rule: they
    # take the bf16 input and compute in fp32 inside), so square and cross_entropy are never called.
    fp32_list = ("normalize",) if run["kernels"] else ("normalize", "TensorBase.square", "cross_entropy")
    for name in fp32_list:
        assert probed[name] == {torch.float32}, name
    if run["kernels"]:
        assert "TensorBase.square" not in probed and "cross_entropy" not in probed, sorted(probed)


# -----------------------------------------------------------------------------------------
# RoPE frequencies
# -----------------------------------------------------------------------------------------


def angles(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.atan2(sin.double(), cos.double())[0, :, 0, :]


def test_rope_rotates_with_bf16_inv_freq_on_cuda_only():
    rope_dims, base, T = 16, 10000.0, 2048
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
    want = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq.bfloat16().float())
    cos, sin = tg.rotary_cos_sin(T, rope_dims, base, T, "cpu", torch.float32, bf16_inv_freq=True)
    assert torch.equal(cos[0, :, 0], want.cos()) and torch.equal(sin[0, :, 0], want.sin())
    cos32, sin32 = tg.rotary_cos_sin(T, rope_dims, base, T, "cpu", torch.float32)
    diff = (angles(cos, sin) - angles(cos32, sin32)).abs()
    diff = torch.minimum(diff, 2 * math.pi - diff)
    assert 0.3 < diff.max() < 0.4  # the record's rotation at distance 2047 is up to 0.36 rad off fp32
    # A stretched base (T > TRAIN_SEQ_LEN) is computed afresh in fp32 by the record: no rounding.
    long = tg.rotary_cos_sin(T, rope_dims, base, T // 2, "cpu", torch.float32, bf16_inv_freq=True)
    assert all(torch.equal(a, b) for a, b in zip(long, tg.rotary_cos_sin(T, rope_dims, base, T // 2, "cpu", torch.float32)))


@pytest.mark.parametrize("is_cuda", [False, True])
def test_model_rounds_inv_freq_exactly_when_built_for_cuda(monkeypatch, is_cuda):
    h = make_h()
    model = tg.build_model(h, torch.device("cpu"), is_cuda=is_cuda)
    seen = []
    real = tg.rotary_cos_sin
    monkeypatch.setattr(tg, "rotary_cos_sin", lambda *a, **k: seen.append(a[-1] if len(a) > 6 else k.get("bf16_inv_freq", False)) or real(*a, **k))
    with torch.no_grad():
        model.forward_hidden(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [is_cuda]


# -----------------------------------------------------------------------------------------
# the record's GPU setup
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile_", [False, True])
def test_runtime_turns_optimize_ddp_off_when_compiling(compile_):
    with torch._dynamo.config.patch(optimize_ddp=True):
        tg.Runtime(make_h(compile=compile_))
        assert torch._dynamo.config.optimize_ddp is (not compile_)


def test_newton_schulz_compiled_on_cuda_eager_fp32_on_cpu(monkeypatch):
    compiled = []

    def fake_compile(fn=None, **kwargs):
        compiled.append((fn, kwargs))
        return functools.partial(fn)

    monkeypatch.setattr(torch, "compile", fake_compile)
    h = make_h()
    model = tg.GPT(h)
    muon = tg.build_optimizers(model, h, is_cuda=False, compile=True)[-1]
    assert muon.orthogonalize is tg.zeropower_via_newtonschulz5 and not compiled
    # The CUDA build (fused AdamW, compiled Newton-Schulz) on CPU parameters: only the choice is checked.
    muon = tg.build_optimizers(model, h, is_cuda=True, compile=True)[-1]
    assert compiled == [(tg.zeropower_via_newtonschulz5, {})]  # the record's plain torch.compile(fn)
    assert isinstance(muon.orthogonalize, functools.partial) and muon.orthogonalize.func is tg.zeropower_via_newtonschulz5
    assert tg.build_optimizers(model, h, is_cuda=True, compile=False)[-1].orthogonalize is tg.zeropower_via_newtonschulz5
    # The CPU path is fp32 whatever the gradient's dtype.
    assert tg.zeropower_via_newtonschulz5(torch.randn(8, 16, dtype=torch.bfloat16), 2).dtype == torch.float32


def test_scoring_has_no_data_dependent_shapes():
    """Run under FakeTensorMode, where an op whose output size depends on the data (nll[mask]) or
    a host read (.item()) raises: each would be a device-to-host sync per batch on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    h = make_h()
    rt = cpu_runtime(h, compile=True)  # padded batches, as compiled
    torch.manual_seed(0)
    model = tg.GPT(h)
    model.looping_active = True
    tokens = torch.randint(4, V, (5 * h.eval_seq_len + 1,))
    windows = tg.make_windows(tokens.numel() - 1, h.eval_seq_len, h.eval_stride)
    real = tg.score_windows(model, tokens, windows, h, rt, fake_luts())
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = tg.score_windows(model, tokens, windows, h, rt, fake_luts())
    assert fake.shape == real.shape == (3,)
    # And the masked sums count what the boolean indexing counted.
    assert real[1].item() == tokens.numel() - 1


class DeviceCopies(torch.overrides.TorchFunctionMode):
    """Stands in for a GPU's host-to-device copies on CPU: records each Tensor.to in train_gpt.py
    that names a device as (source pinned and contiguous, non_blocking) and performs it on CPU;
    torch.empty(pin_memory=True) makes a tensor it counts as pinned (a CPU-only build cannot pin).
    torch's own same-device moves are not copies."""

    def __init__(self):
        super().__init__()
        self.copies, self.pinned = [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.pop("pin_memory", False):
            t = func(*args, **kwargs)
            self.pinned.add(id(t))
            return t
        caller = sys._getframe(1).f_code.co_filename
        if func is torch.Tensor.to and caller == tg.__file__ and any(isinstance(a, torch.device) for a in args[1:]):
            source = args[0]
            self.copies.append((id(source) in self.pinned and source.is_contiguous(), kwargs.get("non_blocking", False)))
            return source
        return func(*args, **kwargs)


def test_batches_reach_the_device_without_waiting_for_it():
    """From pageable memory a host-to-device copy may synchronize the stream, so the host would
    wait for the previous batch to finish before preparing the next: once per batch of training,
    scoring, TTT and GPTQ calibration. Each batch is pinned and copied non-blocking instead."""
    h = make_h()
    rt = cpu_runtime(h, is_cuda=True, autocast=contextlib.nullcontext)  # copies as on a GPU, math on CPU
    torch.manual_seed(0)
    model = tg.GPT(h)
    tokens = torch.randint(4, V, (5 * h.eval_seq_len + 1,))

    class Loader:
        def next_batch(self, rows):
            t = torch.randint(4, V, (rows, h.train_seq_len + 1))
            return t[:, :-1], t[:, 1:]

    trainer = tg.Trainer(h, cpu_runtime(h), model)
    trainer.rt = rt
    with DeviceCopies() as mode:
        trainer.step(Loader(), 0, 1.0)
        counts = [len(mode.copies)]
        model.looping_active = True
        tg.score_windows(model, tokens, tg.make_windows(tokens.numel() - 1, h.eval_seq_len, h.eval_stride), h, rt,
                         fake_luts())
        counts.append(len(mode.copies))
        tg._ttt_adapt(h, rt, model, torch.optim.SGD(model.parameters(), lr=0.0), tokens,
                      tg.ttt_batches(h, rt, 0, 4 * h.eval_seq_len))
        counts.append(len(mode.copies))
        tg.collect_hessians(model, Loader(), 2, 2, rt)
        counts.append(len(mode.copies))
    # training x and y; scoring x, y and mask per batch; TTT x and y per step; calibration x.
    assert counts[0] == 2 and counts[1] - counts[0] >= 6 and counts[2] - counts[1] >= 2 and counts[3] - counts[2] == 2
    assert set(mode.copies) == {(True, True)}, mode.copies


def test_ttt_averages_gradients_in_one_all_reduce_per_step_and_dtype():
    """A per-parameter all-reduce is ~100 collectives per step in the full model. A stub process
    group of two identical ranks counts the calls; the averaged gradients must come back unchanged."""
    calls = []

    def all_reduce(t, op=None):
        calls.append((t.dtype, t.numel()))
        return t.mul_(2)  # two ranks holding the same gradient

    for is_cuda, n_dtypes in ((False, 1), (True, 2)):
        h = make_h(ttt_epochs=2)
        torch.manual_seed(0)
        model = tg.build_model(h, torch.device("cpu"), is_cuda=is_cuda)
        model.looping_active = True
        rt = cpu_runtime(h, distributed=True, all_reduce=all_reduce)
        tokens = torch.randint(4, V, (3 * h.ttt_chunk_tokens + 1,))
        calls.clear()
        tg.evaluate_ttt(h, rt, model, tokens, fake_luts())
        n_params = sum(p.numel() for p in model.parameters())
        steps = 2 * h.ttt_epochs  # two trained chunks (the last is never trained on)
        grads = [c for c in calls if c[1] != 3]  # the 3-value sums of summarize()
        assert len(grads) == steps * n_dtypes, calls
        assert sum(n for _, n in grads) == steps * n_params

    # Sum-then-divide over two equal ranks returns each gradient exactly.
    h = make_h()
    model = tg.build_model(h, torch.device("cpu"), is_cuda=True)
    model(torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    cpu_runtime(h, distributed=True, world_size=2, all_reduce=all_reduce).average_gradients(list(model.parameters()))
    for n, p in model.named_parameters():
        assert p.grad.dtype == before[n].dtype and torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize("model", ["record", "frontier"])
def test_phased_ttt_adapters_keep_the_records_dtypes(model):
    """Phased TTT's adapted forward (PHASED_TTT_ENABLED), on the model as built for CUDA under
    emulated CUDA autocast with the FA3 stand-in: an adapter's output added to c_q, c_k or c_v is
    bf16 as theirs is, so FA3 gets one dtype; every module still hands back bf16, the per-token NLL
    is fp32, and the adapters keep fp32 parameters and gradients. On the record's model and on the
    frontier preset's (its adapters in the two-lane block too)."""
    switches = frontier_model_switches(parallel_lanes_start=3) if model == "frontier" else {}
    if switches.get("fused_ce"):
        need_triton()
    h = make_h(**switches, phased_ttt_enabled=True, phased_ttt_lora_rank=4, train_seq_len=64, eval_seq_len=64,
               ttt_chunk_tokens=128)
    torch.manual_seed(0)
    model = tg.build_model(h, torch.device("cpu"), is_cuda=True)
    model.looping_active = True
    lora = tg.DocumentLoRA(h, model, 2)
    lora.start_batch(tg.fresh_lora_a(lora, 0))
    with torch.no_grad():
        for m in lora.adapters():
            m.B.normal_(0, 0.1)
    outputs: dict[str, set] = {}
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, set()).add(out.dtype))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (2, 48), generator=g), torch.randint(0, V, (2, 48), generator=g)
    fa3, old = FA3StandIn(h), tg.FLASH_ATTN_FUNC
    tg.FLASH_ATTN_FUNC = fa3
    try:
        with bench.CudaAutocastEmulation() as emulation:
            model.eval()
            with torch.no_grad():
                scored = model(x, y, reduction="none", lora=lora)
            model(x, y, reduction="none", lora=lora).mean().backward()
    finally:
        tg.FLASH_ATTN_FUNC = old
    assert emulation.unprobed <= UNPROBED_OK, emulation.unprobed
    assert fa3.dtypes and set(fa3.dtypes) == {(torch.bfloat16,) * 3}
    wrong = {name: dtypes for name, dtypes in outputs.items() if dtypes != {torch.bfloat16}}
    assert not wrong, f"modules whose output is not bf16: {wrong}"
    assert scored.dtype == torch.float32
    for p in lora.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
