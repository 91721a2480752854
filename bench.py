"""Benchmarks for train_gpt.py. Not part of the artifact, so it may be as long as it needs.

  python bench.py run NAME --preset presets/cpu_small.env --data DATA_DIR [--set KEY=VALUE ...]
      Runs train_gpt.py with the preset's environment in build/bench/NAME/, then writes
      logs/NAME.txt (the training log) and logs/NAME.json: tok/s, step time, peak memory,
      every stage's loss/bpb and eval time, blob and total bytes, git commit (and git_dirty: true
      when tracked files differed from it), hardware; paths relative to the repository.
  python bench.py gptq [--batches N] [--rows R]
      Wall time of Hessian collection and GPTQ for the full 36.5M-parameter config
      (random weights and tokens: the time does not depend on the values).
  python bench.py compress ARTIFACT
      Blob bytes of an artifact's quantized tensors with brotli vs lzma, with and without the
      byte shuffle.
  python bench.py kernels [--rows N] [--steps S] [--out logs/kernels_ab.json]
      CUDA only. A/B of the Triton kernels (FUSED_CE, FUSED_MLP) against the PyTorch math, eager
      and compiled: time and peak memory of the loss and of the MLP alone (forward + backward on
      one micro-batch), then S timed training steps of the full config on random tokens with each
      switch off/on. On a machine without CUDA it says so and exits 2.
  python bench.py memory [--rows 48] [--out logs/cpu_cuda_memory.json]
      Bytes autograd saves for one full-config training micro-batch (looping on) under CUDA's
      bf16 autocast rules, emulated on a CPU-only build with meta and fake CUDA tensors; printed,
      and written to --out when given.
  python bench.py gpu-check [--steps 20]
      On one CUDA GPU: versions, activation dtypes, a compiled full-config training (graph
      count, recompiles, tok/s, peak memory), compiled evaluation throughput and TTT at the 8-GPU
      record's per-rank batch, written to logs/gpu_check_*.{txt,json}, also when a check crashes
      (what was measured before it, the check and the exception). Exits 1 if a check fails or
      crashes; refuses to run without CUDA.
  python bench.py quant NAME --model final_model.pt --log TRAIN_LOG --preset P --data DATA_DIR
                        [--variant LABEL:KEY=VALUE,KEY=VALUE ...] [--full LABEL ...]
      Quantization switches applied to one run's saved EMA weights (quantization needs no
      retraining): for each variant, blob bytes with the record's single brotli stream and with
      COMPRESSOR=family, the quantized bpb and its penalty over the run's post-EMA bpb; sliding
      and TTT bpb for the --full variants. Writes logs/NAME.{txt,json} (NAME: a plain name, as for run).
  python bench.py project [--preset FILE] [--code PACKED_FILE]
      The size projection a run logs before training (projected_model_bytes), for the full
      36.5M-parameter config with the preset's settings over the record's defaults, plus the code
      bytes of PACKED_FILE (e.g. what `pack.py --preset FILE` wrote). A projection, not a measurement.
  python bench.py plot OUT.png JSON ...
      Bytes-vs-penalty plot of `quant` results (needs matplotlib: requirements-bench.txt).
  python bench.py table JSON ...
      The same results as a markdown table (bytes relative to each run's record row).
  python bench.py curves OUT.png LOG ... [--title TEXT] [--from-step N]
      Training-loss curves of training logs (every logged train_loss, and the val_loss points,
      from step N on), one colour per log (needs matplotlib: requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")  # a plain name: never a path, never hidden


def plain_name(name: str) -> str:
    """NAME of every subcommand that takes one (run, quant), checked before any work: it names
    build/bench/NAME and logs/NAME.{txt,json}, so a path (../submission) would delete or overwrite
    files outside them."""
    if not NAME_RE.fullmatch(name):
        raise SystemExit(f"bench.py: NAME {name!r} is not a plain name: use letters, digits, '.', '_', '+', '-', "
                         "not starting with '.'")
    return name


def bench_dir(name: str) -> Path:
    """build/bench/NAME, which run_benchmark empties: NAME must be a plain name, so nothing outside
    build/bench/ (the checkout, an earlier benchmark, an absolute path) can be deleted."""
    plain_name(name)
    base = (ROOT / "build" / "bench").resolve()
    work = base / name
    if work.resolve().parent != base:  # e.g. build/bench/NAME is a symlink out of build/bench/
        raise SystemExit(f"bench.py: {work} resolves to {work.resolve()}, outside {base}")
    return work


def read_preset(path: Path) -> dict[str, str]:
    """A preset's KEY=VALUE settings, read as pack.py reads them (specialise.read_preset)."""
    from specialise import read_preset as read

    try:
        return read(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.py: preset {e}") from None


def write_record(path: Path, text: str) -> None:
    """Benchmark records are committed files: replace one whole or not at all, through
    train_gpt's one atomic writer (an interrupted benchmark leaves the previous record)."""
    import train_gpt as tg

    tg.atomic_write(str(path), text.encode("utf-8"))


def git_state() -> dict:
    """{"git_commit": HEAD or None, "git_dirty": whether tracked files differ from it}: a record
    says plainly when what ran was not exactly the commit."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return {"git_commit": out.stdout.strip(), "git_dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}


def repo_relative(path: str) -> str:
    """A path as the record stores it: relative to the repository, so a record names no machine's
    folders (data kept beside the repository reads ../data_pydocs)."""
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


class CudaAutocastEmulation:
    """Runs ordinary CPU (or meta) tensors with every op's output dtype set by PyTorch's real CUDA
    bf16 autocast rules, so a CPU-only build shows the activation dtypes of the GPU run.

    Each torch call is first replayed on fake CUDA tensors of the same shapes and dtypes under CUDA
    autocast (switched on by hand: torch.autocast("cuda") refuses without a device); the floating
    inputs are then cast to the dtype that replay returned, which is what autocast's casting
    policies do, and the call runs for real. Calls a CPU-only build cannot fake on CUDA (indexed
    assignment, for one) keep their CPU behaviour and are listed in `unprobed`.
    """

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        emulation = self
        self.cache: dict = {}
        self.unprobed: set[str] = set()
        self.probed: dict[str, set] = {}
        self.parameter_casts: set[int] = set()  # storages of dtype casts of parameters (bf16 weight copies)

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return emulation.call(func, args, kwargs or {})

        self.mode = Mode()
        self.torch = torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.fake_mode = FakeTensorMode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    @staticmethod
    def func_name(func) -> str:
        return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)

    def cuda_dtype(self, func, args, kwargs):
        """Output dtype of func on fake CUDA tensors under CUDA bf16 autocast, or None."""
        torch = self.torch
        import torch.utils._pytree as pytree

        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not any(t.is_floating_point() for t in tensors):
            return None
        key = (func, tuple((t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else repr(t) for t in leaves))
        if key in self.cache:
            return self.cache[key]
        dtype = None
        try:
            with self.fake_mode:
                fake_args, fake_kwargs = pytree.tree_map(
                    lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                    if isinstance(t, torch.Tensor) else t, (args, kwargs))
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", torch.bfloat16)
                torch.autocast_increment_nesting()
                try:
                    out = func(*fake_args, **fake_kwargs)
                finally:
                    torch.autocast_decrement_nesting()
                    torch.set_autocast_enabled("cuda", False)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                dtype = out.dtype
                self.probed.setdefault(self.func_name(func), set()).add(dtype)
        except Exception:  # an op this build cannot fake on CUDA: keep its CPU behaviour, say so
            self.unprobed.add(self.func_name(func))
        self.cache[key] = dtype
        return dtype

    def call(self, func, args, kwargs):
        torch = self.torch
        import torch.utils._pytree as pytree

        name = self.func_name(func).rsplit(".", 1)[-1]
        first = args[0] if args else None
        if name.endswith("_") and not name.endswith("__") or name.startswith("__i") or name == "__setitem__":
            return func(*args, **kwargs)  # in place: a cast copy would take the write, so leave it alone
        dtype = self.cuda_dtype(func, args, kwargs)
        if dtype is not None:
            args, kwargs = pytree.tree_map(lambda t: self.cast(t, dtype), (args, kwargs))
        out = func(*args, **kwargs)
        if name == "to" and isinstance(first, torch.nn.Parameter) and out.dtype != first.dtype:
            self.parameter_casts.add(out.untyped_storage()._cdata)
        return out

    def cast(self, t, dtype):
        if not isinstance(t, self.torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        out = t.to(dtype)
        if isinstance(t, self.torch.nn.Parameter):
            self.parameter_casts.add(out.untyped_storage()._cdata)
        return out


RECORD_PEAK_GIB = 39.5  # the record's measured peak memory per GPU (8xH100 training log)


def saved_activations(h, rows: int) -> dict:
    """Bytes autograd keeps for the backward of one training micro-batch of `rows` sequences, the
    model as built for CUDA (bf16 embeddings) under emulated CUDA bf16 autocast, looping on,
    attention through a stand-in that keeps what FlashAttention-3's backward keeps (q, k, v, out
    and the fp32 log-sum-exp). Meta tensors: shapes and dtypes only, no memory, no compute.
    This is eager PyTorch's bookkeeping; torch.compile may recompute or fuse some of it away."""
    import torch

    import train_gpt as tg

    class FlashAttention3Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
                raise RuntimeError(f"FA3 would refuse q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}")
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    with torch.device("meta"):
        model = tg.build_model(h, torch.device("meta"), is_cuda=True)
    model.looping_active = True
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, torch.dtype]] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in param_storages:  # a tensor saved twice, or a view of one, counts once
            saved[key] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    ids = torch.zeros(rows, h.train_seq_len, dtype=torch.long, device="meta")
    old = tg.FLASH_ATTN_FUNC
    tg.FLASH_ATTN_FUNC = lambda q, k, v, causal: FlashAttention3Saves.apply(q, k, v)
    try:
        with CudaAutocastEmulation() as emulation, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, ids)
    finally:
        tg.FLASH_ATTN_FUNC = old
    if loss.dtype != torch.float32:
        raise RuntimeError(f"loss dtype {loss.dtype}")
    weight_copies = sum(saved.pop(k)[0] for k in list(saved) if k in emulation.parameter_casts)
    by_dtype: dict[str, int] = {}
    for nbytes, dtype in saved.values():
        by_dtype[str(dtype).replace("torch.", "")] = by_dtype.get(str(dtype).replace("torch.", ""), 0) + nbytes
    params = {str(dt).replace("torch.", ""): sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == dt)
              for dt in {p.dtype for p in model.parameters()}}
    return dict(saved_bytes=sum(n for n, _ in saved.values()), saved_tensors=len(saved), saved_by_dtype=by_dtype,
                saved_weight_copy_bytes=weight_copies,
                parameter_bytes=params, unprobed_ops=sorted(emulation.unprobed))


def run_memory(args) -> int:
    import torch

    import train_gpt as tg

    h = tg.Hyperparameters.from_env(train_seq_len=args.seq_len, compile=False)
    t0 = time.perf_counter()
    est = saved_activations(h, args.rows)
    gib = est["saved_bytes"] / 2**30
    # Static per GPU: fp32 master weights (bf16 embeddings), their gradients, AdamW's two moments
    # for the token and control groups, Muon's momentum for the matrices, the fp32 EMA copy.
    p32 = est["parameter_bytes"].get("float32", 0)
    pbf = est["parameter_bytes"].get("bfloat16", 0)
    model = None
    with torch.device("meta"):
        model = tg.build_model(h, torch.device("meta"), is_cuda=True)
    matrix, scalar, token = tg.split_params(model, h)
    adam_bytes = sum(2 * p.numel() * p.element_size() for p in scalar + token)
    muon_bytes = sum(p.numel() * p.element_size() for p in matrix)
    ema_bytes = sum(4 * p.numel() for p in model.parameters())
    static = 2 * (p32 + pbf) + adam_bytes + muon_bytes + ema_bytes
    result = {
        "command": "python bench.py memory" + (f" --rows {args.rows}" if args.rows != 48 else "")
                   + (f" --seq-len {args.seq_len}" if args.seq_len != 2048 else "")
                   + (f" --out {args.out}" if args.out else ""),
        "torch": torch.__version__,
        "micro_batch": f"{args.rows} x {h.train_seq_len} tokens per rank, looping on",
        "saved_activation_bytes": est["saved_bytes"], "saved_activation_gib": round(gib, 2),
        "saved_tensors": est["saved_tensors"],
        "saved_gib_by_dtype": {k: round(v / 2**30, 2) for k, v in sorted(est["saved_by_dtype"].items())},
        # bf16 copies of the fp32 linear weights, one per use (looped layers three times), that eager
        # autocast keeps for the backward; not counted above, compile may recompute them instead.
        "saved_weight_copies_gib": round(est["saved_weight_copy_bytes"] / 2**30, 2),
        "static_gib": round(static / 2**30, 2),
        "static_parts_mib": {"weights": round((p32 + pbf) / 2**20), "gradients": round((p32 + pbf) / 2**20),
                             "adamw_moments": round(adam_bytes / 2**20), "muon_momentum": round(muon_bytes / 2**20),
                             "ema": round(ema_bytes / 2**20)},
        "record_peak_gib_per_gpu": RECORD_PEAK_GIB,
        "unprobed_ops": est["unprobed_ops"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.out:
        out = ROOT / args.out  # relative to the repository, as every record path; an absolute one stays
        out.parent.mkdir(parents=True, exist_ok=True)
        write_record(out, text)
    return 0


class RandomTokens:
    """The training loader's interface with random tokens: speed and memory do not depend on them."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        import torch

        self.g, self.vocab_size, self.seq_len = torch.Generator().manual_seed(seed), vocab_size, seq_len

    def next_batch(self, rows: int):
        import torch

        t = torch.randint(0, self.vocab_size, (rows, self.seq_len + 1), generator=self.g)
        return t[:, :-1], t[:, 1:]


def compiled_graphs(fn) -> int:
    """How many graphs Dynamo holds for a function's code (one per recompilation)."""
    import torch._dynamo.eval_frame as eval_frame

    return len(eval_frame._debug_get_cache_entry_list(fn.__code__))


def graph_counts() -> dict[str, int]:
    """The compiled graphs gpu-check counts, by function."""
    import train_gpt as tg

    return {"GPT.forward": compiled_graphs(tg.GPT.forward),
            "zeropower_via_newtonschulz5": compiled_graphs(tg.zeropower_via_newtonschulz5)}


RECORD_WORLD_SIZE = 8  # the record's GPUs: TTT splits each chunk's sequences over them


@dataclasses.dataclass
class CheckReport:
    """What gpu_check has found so far, filled in as it goes, so that a check that crashes (out of
    memory, FlashAttention-3 under fullgraph) still leaves everything measured before it."""

    lines: list[str] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    running: str | None = None  # the stage in progress: the one to blame for a crash
    failure: dict | None = None  # the crash: {"check", "type", "message"}

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, bool(ok), detail))
        self.say(f"check {'PASS' if ok else 'FAIL'}: {name} ({detail})")


def gpu_check(h, rt, steps: int, report: CheckReport) -> None:
    """The record's training path on this device: activation dtypes (eager, real autocast),
    compiled training looping off and on, timed steps, compiled evaluation, TTT at the 8-GPU
    record's per-rank batch. Fills `report` stage by stage. Runs on any Runtime; gpu-check gives
    it the GPU and full config."""
    import torch

    import train_gpt as tg

    check, figures = report.check, report.figures
    torch.manual_seed(0)
    model = tg.build_model(h, rt.device, rt.is_cuda)

    # 1. Dtypes in eager mode under the real autocast, two sequences, looping off and on.
    report.running = "activation dtypes (eager)"
    block_dtypes, attn_dtypes, hooks = set(), set(), []
    for block in model.blocks:
        hooks.append(block.register_forward_hook(lambda m, a, out: block_dtypes.add(str(out.dtype))))
    attention = tg.FLASH_ATTN_FUNC
    if attention is not None:
        tg.FLASH_ATTN_FUNC = lambda q, k, v, causal: attn_dtypes.add(f"{q.dtype},{k.dtype},{v.dtype}") or attention(q, k, v, causal=causal)
    x, y = RandomTokens(h.vocab_size, h.train_seq_len, 1).next_batch(2)
    losses = set()
    try:
        for looping in (False, True):
            model.looping_active = looping
            with rt.autocast():
                loss = model(x.to(rt.device), y.to(rt.device))
            loss.backward()
            losses.add(str(loss.dtype))
    finally:
        tg.FLASH_ATTN_FUNC = attention
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    want = "torch.bfloat16" if rt.is_cuda else "torch.float32"
    check("residual stream dtype after every block", block_dtypes == {want}, f"{sorted(block_dtypes)}, want {want}")
    if attention is not None:
        check("FA3 gets q, k, v in bf16", attn_dtypes == {",".join(["torch.bfloat16"] * 3)}, str(sorted(attn_dtypes)))
    check("loss dtype", losses == {"torch.float32"}, str(sorted(losses)))
    emb = {n: str(p.dtype) for n, p in model.named_parameters() if n in ("tok_emb.weight", "bigram.embed.weight")}
    others = {str(p.dtype) for n, p in model.named_parameters() if n not in emb}
    check("embeddings bf16 on CUDA, everything else fp32",
          set(emb.values()) == {"torch.bfloat16" if rt.is_cuda else "torch.float32"} and others == {"torch.float32"},
          f"{emb}, others {sorted(others)}")

    # 2. Compiled training, looping off then on (the warm-up's two graphs), then timed steps.
    report.running = "compiled training, looping off then on"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = tg.Trainer(h, rt, model)
    loader = RandomTokens(h.vocab_size, h.train_seq_len)
    figures.update(micro_batch=f"{rt.micro_batch_seqs} x {h.train_seq_len}", grad_accum_steps=rt.grad_accum_steps)
    t0 = time.perf_counter()
    for looping in (False, True):
        model.looping_active = looping
        for step in range(3):
            trainer.step(loader, step, 1.0)
    rt.synchronize()
    figures["compile_and_warmup_seconds"] = round(time.perf_counter() - t0, 1)
    train_graphs = compiled_graphs(tg.GPT.forward)
    check("training: one graph per looping mode", train_graphs == 2, f"{train_graphs} graphs of GPT.forward")

    report.running = "timed training steps"
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = trainer.step(loader, step, 1.0)
    rt.synchronize()
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    tokens = rt.micro_batch_seqs * h.train_seq_len * rt.grad_accum_steps
    figures.update(timed_steps=steps, step_ms=round(1000 * step_s, 1), train_tokens_per_second=round(tokens / step_s))
    if rt.is_cuda:
        figures["peak_memory_allocated_gib_timed_steps"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        figures["peak_memory_reserved_gib_timed_steps"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    check("no recompilation in timed steps", compiled_graphs(tg.GPT.forward) == train_graphs,
          f"{compiled_graphs(tg.GPT.forward)} graphs after, {train_graphs} before")
    check("finite training loss", bool(torch.isfinite(loss)), f"{float(loss):.4f}")

    # 3. Compiled evaluation: plain windows of EVAL_SEQ_LEN, padded batches, looping on.
    report.running = "compiled evaluation"
    model.looping_active = True
    luts = (torch.ones(h.vocab_size, dtype=torch.int16, device=rt.device),
            torch.zeros(h.vocab_size, dtype=torch.bool, device=rt.device),
            torch.zeros(h.vocab_size, dtype=torch.bool, device=rt.device))
    stream = RandomTokens(h.vocab_size, 4 * h.eval_batch_seqs * h.eval_seq_len, 2).next_batch(1)[0][0]
    tg.evaluate_plain(h, rt, trainer.compiled, stream[: h.eval_seq_len + 1], luts)  # compiles the evaluation graph
    before = compiled_graphs(tg.GPT.forward)
    _, _, eval_ms = tg.evaluate_plain(h, rt, trainer.compiled, stream, luts)
    figures["eval_tokens_per_second"] = round((stream.numel() - 1) / (eval_ms / 1000))
    eval_graphs = compiled_graphs(tg.GPT.forward)
    check("evaluation: one graph, padded batches reuse it", before == train_graphs + 1 == eval_graphs,
          f"{train_graphs} training + {eval_graphs - train_graphs} evaluation graphs")

    # 4. TTT trains through the same compiled forward (looping on) on a batch of its own: its
    # chunk's sequences split over the ranks. On the 8-GPU record that is 16 sequences of 2048 over
    # 8 ranks, 2 x 2048 per rank, not the training micro-batch (48 x 2048), and with dynamic=False
    # another shape is another graph. One GPU runs TTT with TTT_BATCH_SEQS set to rank 0's share, as
    # ttt_batches gives it for 8 ranks: every TTT step at that shape, on a fresh model as the run's
    # TTT stage gets, over two chunks (the first is scored, then trained on; the second scored).
    report.running = "TTT at the 8-GPU record's per-rank batch"
    rows = len(tg.ttt_batches(h, SimpleNamespace(rank=0, world_size=RECORD_WORLD_SIZE), 0, h.ttt_chunk_tokens)[0])
    if rows == 0:
        raise ValueError(f"TTT_CHUNK_TOKENS={h.ttt_chunk_tokens} holds {h.ttt_chunk_tokens // h.eval_seq_len} "
                         f"sequences of EVAL_SEQ_LEN={h.eval_seq_len}: none for rank 0 of {RECORD_WORLD_SIZE}")
    fresh = tg.build_model(h, rt.device, rt.is_cuda)
    fresh.looping_active = True
    ttt_stream = RandomTokens(h.vocab_size, 2 * h.ttt_chunk_tokens + 1, 3).next_batch(1)[0][0]
    t0 = time.perf_counter()
    _, ttt_bpb, _ = tg.evaluate_ttt(dataclasses.replace(h, ttt_batch_seqs=rows), rt, tg.maybe_compile(fresh, rt),
                                    ttt_stream, luts)
    # The time includes compiling TTT's graph, and is one rank doing all 8 ranks' work of a chunk.
    figures.update(ttt_batch_per_rank=f"{rows} x {h.eval_seq_len}", ttt_two_chunks_seconds=round(time.perf_counter() - t0, 1))
    ttt_graphs = compiled_graphs(tg.GPT.forward) - eval_graphs
    # Both batches reach the GPU as contiguous copies (Runtime.to_device), so only the shape decides.
    reuses = (rows, h.eval_seq_len) == (rt.micro_batch_seqs, h.train_seq_len)
    check("TTT: " + ("reuses the training graph (same batch shape)" if reuses else
                     "one graph of its own for its batch shape, reused by every TTT step"),
          ttt_graphs == (0 if reuses else 1),
          f"{ttt_graphs} new graphs for {rows} x {h.eval_seq_len} per rank against training's "
          f"{rt.micro_batch_seqs} x {h.train_seq_len}")
    check("finite TTT bpb", math.isfinite(ttt_bpb), f"{ttt_bpb:.4f}")

    report.running = "graph breaks and recompile limits"
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    check("no graph breaks", not breaks, str(breaks))
    limit = torch._dynamo.config.recompile_limit
    graphs = graph_counts()
    # Past the limit Dynamo stops compiling that code and silently runs it eagerly.
    check("GPT.forward compiled within the recompile limit", graphs["GPT.forward"] <= limit,
          f"{graphs['GPT.forward']} graphs, limit {limit}")
    ns_graphs = graphs["zeropower_via_newtonschulz5"]
    check("Newton-Schulz compiled within the recompile limit", (1 <= ns_graphs <= limit) if rt.is_cuda else ns_graphs == 0,
          f"{ns_graphs} graphs, limit {limit}")
    report.running = None


def record_gpu_check(h, rt, steps: int, report: CheckReport, head: dict, out_dir: Path, name: str) -> int:
    """Runs gpu_check and writes out_dir/NAME.{txt,json} however it ends: after a crash, with
    everything measured before it, the check that was running and the exception (its traceback in
    the .txt). Returns 0 when every check ran and passed, else 1."""
    t0 = time.perf_counter()
    try:
        gpu_check(h, rt, steps, report)
    except Exception as e:  # any crash is a finding: keep it with what came before, then exit 1
        report.failure = {"check": report.running, "type": type(e).__name__, "message": str(e)}
        report.say(f"check CRASH: {report.running} ({type(e).__name__}: {e})")
        trace = traceback.format_exc().rstrip()
        print(trace, file=sys.stderr, flush=True)
        report.lines.append(trace)
    report.figures["graphs"] = graph_counts()
    report.figures["wall_seconds"] = round(time.perf_counter() - t0, 1)
    checks = report.checks
    ok = report.failure is None and all(c[1] for c in checks)
    report.say("figures: " + json.dumps(report.figures))
    report.say(f"gpu_check:{'PASS' if ok else 'FAIL'} ({sum(c[1] for c in checks)}/{len(checks)} checks"
               + (f", then a crash in: {report.failure['check']}" if report.failure else "") + ")")
    result = {**head, "figures": report.figures, "passed": ok, "failure": report.failure,
              "checks": [{"check": n, "passed": o, "detail": d} for n, o, d in checks]}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_record(out_dir / f"{name}.txt", "\n".join(report.lines) + "\n")
    write_record(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_dir / name}.txt and .json")
    return 0 if ok else 1


def run_gpu_check(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Nothing was run.")
    for var in ("RANK", "WORLD_SIZE"):
        if var in os.environ:
            raise SystemExit(f"gpu-check runs on one GPU without torchrun: unset {var}")
    import train_gpt as tg

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    gpu = torch.cuda.get_device_name(0)
    name = f"gpu_check_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}_{stamp}"
    report = CheckReport()
    say = report.say

    tg.enable_flash_attention()
    fa3 = tg.FLASH_ATTN_FUNC is not None
    fa3_version = None
    if fa3:
        import flash_attn_interface

        fa3_version = getattr(flash_attn_interface, "__version__", "unknown")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "gpu": gpu, "gpus": torch.cuda.device_count(),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "flash_attn_3": fa3_version if fa3 else "not importable (SDPA is used)"}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    say("versions: " + " ".join(f"{k}:{v}" for k, v in versions.items()))
    # The record's per-GPU micro-batch (48 x 2048, full config), one micro-batch per step.
    h = tg.Hyperparameters.from_env(train_batch_tokens=args.rows * 2048, grad_accum_steps=1, compile=True, run_id=name)
    rt = tg.Runtime(h)
    say(f"config: full model, micro-batch {rt.micro_batch_seqs} x {h.train_seq_len}, compile on, "
        f"attention {'flash_attn_3' if fa3 else 'sdpa'}")
    head = {"command": "python bench.py gpu-check" + (f" --steps {args.steps}" if args.steps != 20 else "")
            + (f" --rows {args.rows}" if args.rows != 48 else ""),
            **git_state(), "versions": versions}
    return record_gpu_check(h, rt, args.steps, report, head, ROOT / args.out_dir, name)


def run_benchmark(args) -> int:
    import logformat

    work = bench_dir(args.name)  # before anything else: a bad NAME costs nothing
    env = read_preset(Path(args.preset)) if args.preset else {}
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(DATA_DIR=str(Path(args.data).resolve()), RUN_ID=args.name)
    if work.is_symlink():
        work.unlink()
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env.setdefault("QUANTIZED_MODEL_PATH", str(work / "final_model.int6.ptz"))
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(ROOT / "train_gpt.py")]
    print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, **env})
    wall = time.perf_counter() - t0
    log_path = work / "logs" / f"{args.name}.txt"
    if proc.returncode != 0:
        raise SystemExit(f"train_gpt.py exited {proc.returncode}; log: {log_path}")
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_record(out_dir / f"{args.name}.txt", Path(log_path).read_text(encoding="utf-8"))
    log = logformat.parse_log(log_path)
    result = benchmark_record(args, env, log, wall)
    write_record(out_dir / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "step_time_ms", "tokens_per_second", "peak_memory_mib",
                                              "model_bytes", "wall_seconds")}))
    for stage, v in log["stages"].items():
        print(f"{stage:28s} val_bpb {v['val_bpb']:.5f}  eval {v.get('eval_time_ms', 0) / 1000:.1f}s")
    return 0


def benchmark_record(args, env: dict, log: dict, wall: float) -> dict:
    """logs/NAME.json: the run's figures from its parsed log, its settings with paths relative to
    the repository, and the commit (dirty or not) it ran from."""
    import logformat

    gpu_peak = log.get("peak_memory_mib")
    steps, train_ms = log.get("steps"), log.get("train_time_ms")
    return {
        "name": args.name,
        "command": f"python bench.py run {args.name} --preset {args.preset} --data {args.data}"
                   + "".join(f" --set {s}" for s in args.set),
        "settings": {k: repo_relative(v) if k in logformat.PATH_HPARAMS else v for k, v in env.items()},
        **git_state(),
        "hardware": log.get("hardware"),
        "versions": log.get("versions"),
        "model_params": log.get("model_params"),
        "steps": steps,
        "train_time_ms": train_ms,
        "step_time_ms": train_ms / steps if steps else None,
        "tokens_per_second": log.get("tokens_per_second"),
        # CPU: the largest resident set of any child process (Linux reports KiB).
        "peak_memory_mib": gpu_peak if gpu_peak is not None else
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "peak_memory_kind": "cuda max_memory_allocated" if gpu_peak is not None else "max RSS of the training process",
        "stages": log["stages"],
        "model_bytes": log.get("model_bytes"),
        "code_bytes": log.get("code_bytes"),
        "total_bytes": log.get("total_bytes"),
        "wall_seconds": round(wall, 1),
    }


def run_gptq(args) -> int:
    import torch

    import train_gpt as tg

    torch.manual_seed(0)
    h = tg.Hyperparameters.from_env(train_seq_len=args.seq_len)
    rt = tg.Runtime(h)
    t0 = time.perf_counter()
    model = tg.GPT(h)
    model.looping_active = True
    print(f"built full model ({sum(p.numel() for p in model.parameters())} params) in {time.perf_counter() - t0:.1f}s")

    class RandomLoader:  # the loader's interface, with random tokens: timing does not depend on them
        def next_batch(self, rows):
            x = torch.randint(0, h.vocab_size, (rows, h.train_seq_len))
            return x, x

    t0 = time.perf_counter()
    hessians = tg.collect_hessians(model, RandomLoader(), args.batches, args.rows, rt)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    w, m = tg.quantize_state_dict(model.state_dict(), hessians, h)
    t_q = time.perf_counter() - t0
    per_batch = t_h / args.batches
    result = {
        "hardware": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "hessians": len(hessians), "calibration_batches": args.batches, "rows_per_batch": args.rows,
        "seq_len": h.train_seq_len, "hessian_seconds": round(t_h, 2), "hessian_seconds_per_batch": round(per_batch, 2),
        "gptq_seconds": round(t_q, 2), "quantized_tensors": len(m),
    }
    print(json.dumps(result, indent=2))
    return 0


def run_compress(args) -> int:
    import io
    import lzma

    import brotli
    import torch

    import train_gpt as tg

    w, m = tg.decompress_blob(Path(args.artifact).read_bytes(), args.artifact)
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    raw = buf.getvalue()
    rows = []
    for shuffled in (False, True):
        data = tg.byte_shuffle(raw) if shuffled else raw
        for name, fn in (("brotli q11", lambda d: brotli.compress(d, quality=11)),
                         ("lzma 9e", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME))):
            t0 = time.perf_counter()
            n = len(fn(data))
            rows.append((name, "shuffle" if shuffled else "plain", n, time.perf_counter() - t0))
    print(f"artifact {args.artifact}: torch.save payload {len(raw)} bytes")
    print(f"{'compressor':12s} {'layout':8s} {'bytes':>10s} {'seconds':>8s}")
    for name, layout, n, s in rows:
        print(f"{name:12s} {layout:8s} {n:10d} {s:8.2f}")
    return 0


def timed(fn, device, iters: int) -> tuple[float, int | None]:
    """Median milliseconds of fn() after two warm-up calls, and its peak extra memory (CUDA: bytes
    above what was allocated before; CPU: None)."""
    import statistics

    import torch

    is_cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if is_cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() - base if is_cuda else None
    return statistics.median(times), peak


def kernel_isolation(h, device, rows: int, iters: int, compile_modes=(False, True)) -> list[dict]:
    """The loss (raw logits -> per-token CE -> mean -> backward) and the MLP (forward + backward)
    on `rows` tokens of one micro-batch, PyTorch math vs the kernels, eager and compiled."""
    import torch
    import torch.nn.functional as F

    import train_gpt as tg

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    z = (torch.randn(rows, h.vocab_size, device=device, generator=gen) * 10).to(dtype).requires_grad_()
    y = torch.randint(0, h.vocab_size, (rows,), device=device, generator=gen)
    x = torch.randn(rows, h.model_dim, device=device, generator=gen).to(dtype).requires_grad_()

    def loss_math(z, y):
        return F.cross_entropy((h.logit_softcap * torch.tanh(z / h.logit_softcap)).float(), y)

    def loss_fused(z, y):
        return tg.fused_softcap_cross_entropy(z, y, h.logit_softcap).mean()

    mlps = {}
    for fused in (False, True):
        torch.manual_seed(0)
        mlps[fused] = tg.MLP(tg.Hyperparameters.from_env(**{**vars_of(h), "fused_mlp": fused})).to(device)
    results = []
    for compiled in compile_modes:
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compiled else (lambda f: f)
        for name, fn in (("loss math", wrap(loss_math)), ("loss FUSED_CE", wrap(loss_fused))):
            def step(fn=fn):
                z.grad = None
                fn(z, y).backward()
            ms, peak = timed(step, device, iters)
            results.append({"part": name, "compiled": compiled, "ms": round(ms, 3), "peak_extra_bytes": peak})
        for fused, mlp in mlps.items():
            fn = wrap(mlp)

            def step(fn=fn, mlp=mlp):
                mlp.zero_grad(set_to_none=True)
                x.grad = None
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = fn(x)
                out.float().square().mean().backward()
            ms, peak = timed(step, device, iters)
            results.append({"part": "mlp FUSED_MLP" if fused else "mlp math", "compiled": compiled,
                            "ms": round(ms, 3), "peak_extra_bytes": peak})
    return results


def vars_of(h) -> dict:
    """The settings of a Hyperparameters, as keyword overrides for another one."""
    import train_gpt as tg

    return {name: getattr(h, name) for name, _, _ in tg.HPARAMS}


def full_config_steps(overrides: dict, steps: int) -> dict:
    """`steps` timed training steps (after 2 untimed) of the full config on random tokens, with the
    record's step (grad accumulation, clipping, Muon/AdamW, compile on CUDA)."""
    import torch

    import train_gpt as tg

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env(**overrides)
    rt = tg.Runtime(h)
    torch.manual_seed(0)
    model = tg.build_model(h, rt.device, rt.is_cuda)
    trainer = tg.Trainer(h, rt, model)

    class RandomLoader:  # the loader's interface: speed does not depend on the token values
        def next_batch(self, rows):
            x = torch.randint(0, h.vocab_size, (rows, h.train_seq_len))
            return x, torch.roll(x, -1, 1)

    loader = RandomLoader()
    losses = [trainer.step(loader, s, 1.0).item() for s in range(2)]
    if rt.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(steps):
        losses.append(trainer.step(loader, 2 + s, 1.0).item())
    ms = 1000 * (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if rt.is_cuda else None
    return {"fused_ce": h.fused_ce, "fused_mlp": h.fused_mlp, "step_ms": round(ms, 1), "peak_bytes": peak,
            "losses": [round(v, 4) for v in losses]}


def run_kernels(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"bench.py kernels needs a CUDA GPU and this machine has none (torch {torch.__version__}). "
              "The kernels are proven exact on CPU by tests/test_kernels.py (Triton's interpreter); "
              "their speed and memory can only be measured on a GPU.", file=sys.stderr)
        return 2
    import train_gpt as tg

    h = tg.Hyperparameters.from_env(fused_ce=True, fused_mlp=True)
    rt = tg.Runtime(h)
    result = {
        "command": "python bench.py kernels " + " ".join(sys.argv[2:]),
        "hardware": f"{torch.cuda.get_device_name(rt.device)}, torch {torch.__version__}",
        **git_state(),
        "isolation_rows": args.rows,
        "isolation": kernel_isolation(h, rt.device, args.rows, iters=20),
        "full_config": [full_config_steps({"fused_ce": ce, "fused_mlp": mlp}, args.steps)
                        for ce, mlp in ((False, False), (True, False), (False, True), (True, True))],
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_record(out, json.dumps(result, indent=2) + "\n")
    for r in result["isolation"]:
        print(f"{r['part']:14s} compiled={int(r['compiled'])} {r['ms']:8.3f} ms  peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB")
    for r in result["full_config"]:
        print(f"full config FUSED_CE={int(r['fused_ce'])} FUSED_MLP={int(r['fused_mlp'])}: "
              f"{r['step_ms']} ms/step, peak {r['peak_bytes'] / 2**20:.0f} MiB, last loss {r['losses'][-1]}")
    return 0


DEFAULT_VARIANTS = (
    "record:",
    "embed7:EMBED_BITS=7",
    "embed7_clip14:EMBED_BITS=7,EMBED_CLIP_SIGMAS=14",
    "mlp12:MLP_CLIP_SIGMAS=12",
    "lqer3:LQER_TOP_K=3,LQER_RANK=4,LQER_GROUP=64",
    "combo:EMBED_BITS=7,EMBED_CLIP_SIGMAS=14,MLP_CLIP_SIGMAS=12,LQER_TOP_K=3,LQER_RANK=4,LQER_GROUP=64",
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, settings = text.partition(":")
    if not label:
        raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE,... (settings may be empty)")
    out = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        out[key.strip().upper()] = value.strip()
    return label, out


def run_quant(args) -> int:
    import hashlib
    import lzma

    import numpy as np
    import torch

    import logformat
    import train_gpt as tg

    plain_name(args.name)  # before anything else: logs/NAME.{txt,json} must stay in --out-dir
    env = read_preset(Path(args.preset)) if args.preset else {}
    env.update(DATA_DIR=str(Path(args.data).resolve()), SEED=str(args.seed))
    os.environ.update(env)
    stage = {k: v["val_bpb"] for k, v in logformat.scan_log(Path(args.log).read_text(), args.log)["stages"].items()}
    post_ema = stage["pre_quant_post_ema"]
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    h0 = tg.Hyperparameters.from_env()
    rt = tg.Runtime(h0)
    state = torch.load(args.model, map_location="cpu", weights_only=True)
    model = tg.build_model(h0, rt.device, rt.is_cuda)
    tg.load_into_model(model, state, args.model)
    model.looping_active = h0.num_loops > 0
    t0 = time.perf_counter()
    loader = tg.ShuffledSequenceLoader(h0.train_files, h0.train_seq_len, 0, 1)
    hessians = tg.collect_hessians(model, loader, h0.gptq_calibration_batches, rt.micro_batch_seqs, rt)
    print(f"hessians: {len(hessians)} in {time.perf_counter() - t0:.1f}s", flush=True)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(h0), h0.vocab_size, rt.device)
    val = tg.load_validation_tokens(h0.val_files, h0.eval_seq_len, h0.vocab_size)
    lines = [f"quant benchmark {args.name}: model {args.model}, post-EMA val_bpb {post_ema:.8f} (from {args.log})",
             f"hardware: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"]
    print(lines[0], flush=True)
    rows, evaluated = [], {}
    for label, settings in variants:
        kw = {k.lower(): tg._parse_env(k, next(t for n, t, _ in tg.HPARAMS if n == k.lower()), v)
              for k, v in settings.items()}
        h = tg.Hyperparameters.from_env(**kw)
        t0 = time.perf_counter()
        w, m = tg.quantize_state_dict(state, hessians, h)
        t_quant = time.perf_counter() - t0
        blobs = {c: tg.compress_blob(w, m, c) for c in ("brotli", "family")}
        t0 = time.perf_counter()
        if h.compressor not in blobs:  # the variant's own compressor (pergroup) as a third column
            blobs[h.compressor] = tg.compress_blob(w, m, h.compressor)
        t_compress = time.perf_counter() - t0
        sizes = {c: len(b) for c, b in blobs.items()}
        n = int.from_bytes(blobs["family"][5:9], "little")
        header = json.loads(lzma.decompress(blobs["family"][9:9 + n]))
        values = {}
        for key, _, shape, fam in header["tensors"]:
            values[fam] = values.get(fam, 0) + int(np.prod(shape))
        families = {fam: {"codec": codec, "bytes": comp, "values": values[fam], "bytes_per_value": comp / max(1, values[fam])}
                    for fam, codec, _, comp, _ in header["groups"]}
        families["header"] = {"bytes": n + 9}
        deq = tg.dequantize_state_dict(w, m)
        key = hashlib.sha256(b"".join(deq[k].numpy().tobytes() for k in sorted(deq))).hexdigest()
        row = {"variant": label, "settings": settings, "brotli_bytes": sizes["brotli"], "family_bytes": sizes["family"],
               "quant_seconds": round(t_quant, 1), "lqer": [x for x in tg.category_table(w, m) if x.startswith("lqer:")],
               "families": families}
        if h.compressor == "pergroup":
            streams = tg.split_pergroup_streams(blobs["pergroup"], label)
            t0 = time.perf_counter()
            w2, m2 = tg.decompress_blob(blobs["pergroup"], label, "pergroup")
            exact = m2 == m and set(w2) == set(w) and all(w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k]) for k in w)
            if not exact:
                raise SystemExit(f"{label}: the pergroup blob did not read back exactly")
            row.update(pergroup_bytes=sizes["pergroup"], pergroup_seconds=round(t_compress, 1),
                       pergroup_read_seconds=round(time.perf_counter() - t0, 1), pergroup_round_trip="exact",
                       pergroup_streams={n: len(s) for n, s in zip(tg.PERGROUP_NAMES, streams)})
        if key in evaluated:
            # the same dequantized weights as an earlier variant: its score (the label stays this row's own)
            row.update({k: v for k, v in evaluated[key].items() if k != "variant"}, same_weights_as=evaluated[key]["variant"])
        elif args.reuse_run_quantized and not settings and "quantized" in stage and label not in args.full:
            # the record's settings on the run's own weights: the run already evaluated this artifact
            row.update(quantized_bpb=stage["quantized"], penalty=stage["quantized"] - post_ema, from_training_log=True)
            evaluated[key] = {k: row[k] for k in ("variant", "quantized_bpb", "penalty")}
        else:
            qmodel = tg.build_model(h0, rt.device, rt.is_cuda)
            tg.load_into_model(qmodel, deq, label)
            qmodel.looping_active = h0.num_loops > 0
            _, bpb, ms = tg.evaluate_plain(h0, rt, qmodel, val, luts)
            row.update(quantized_bpb=bpb, penalty=bpb - post_ema, eval_seconds=round(ms / 1000, 1))
            if label in args.full:
                _, row["sliding_bpb"], _ = tg.evaluate_sliding(h0, rt, qmodel, val, luts)
                qmodel = tg.build_model(h0, rt.device, rt.is_cuda)  # TTT trains: start from the artifact again
                tg.load_into_model(qmodel, deq, label)
                qmodel.looping_active = h0.num_loops > 0
                _, row["ttt_bpb"], _ = tg.evaluate_ttt(h0, rt, qmodel, val, luts)
            evaluated[key] = {k: row[k] for k in ("variant", "quantized_bpb", "penalty", "eval_seconds",
                                                  "sliding_bpb", "ttt_bpb") if k in row}
        rows.append(row)
        line = (f"{label:16s} brotli {row['brotli_bytes']:>9,d}  family {row['family_bytes']:>9,d}  "
                + (f"pergroup {row['pergroup_bytes']:>9,d}  " if "pergroup_bytes" in row else "")
                + 
                f"quantized {row['quantized_bpb']:.5f}  penalty {row['penalty']:+.5f}"
                + (f"  sliding {row['sliding_bpb']:.5f}" if "sliding_bpb" in row else "")
                + (f"  ttt {row['ttt_bpb']:.5f}" if "ttt_bpb" in row else "")
                + (f"  {row['lqer'][0]}" if row["lqer"] else ""))
        lines.append(line)
        print(line, flush=True)
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    command = (f"python bench.py quant {args.name} --model {args.model} --log {args.log} --preset {args.preset} "
               f"--data {args.data} --seed {args.seed}" + "".join(f" --variant {v}" for v in args.variant or [])
               + "".join(f" --full {v}" for v in args.full) + (" --reuse-run-quantized" if args.reuse_run_quantized else ""))
    result = {"name": args.name, "command": command, **git_state(), "hardware": lines[1],
              "post_ema_bpb": post_ema, "training_run_quantized_bpb": stage.get("quantized"), "rows": rows}
    write_record(out_dir / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    write_record(out_dir / f"{args.name}.txt", command + "\n" + "\n".join(lines) + "\n")
    return 0


def run_project(args) -> int:
    import torch

    import train_gpt as tg

    settings = read_preset(Path(args.preset)) if args.preset else {}
    h = tg.Hyperparameters.from_env(settings)
    with torch.device("meta"):
        state = tg.GPT(h).state_dict()
    projected = tg.projected_model_bytes(state, h)
    model, code = sum(projected.values()), Path(args.code).stat().st_size if args.code else 0
    print(f"settings: {' '.join(f'{k}={v}' for k, v in settings.items()) or 'the record defaults'}; "
          f"code: {args.code or 'not counted'}")
    # the line a run with these settings logs before training (MAIN)
    print(f"projected_artifact_bytes:{model + code} (model {model} + code {code}; limit {h.size_limit_bytes}) "
          + " ".join(f"[{k}]:{v}" for k, v in sorted(projected.items())))
    return 0


def new_plot():
    """(figure, axes) of one PNG plot, without a display (matplotlib: requirements-bench.txt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_plot(fig, ax, out: str, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def run_plot(args) -> int:
    fig, ax = new_plot()
    for path in args.results:
        res = json.loads(Path(path).read_text())
        for column, marker in (("brotli_bytes", "o"), ("family_bytes", "s")):
            xs = [r[column] / 1000 for r in res["rows"]]
            ys = [r["penalty"] * 1000 for r in res["rows"]]
            ax.scatter(xs, ys, marker=marker, label=f"{res['name']} ({column.split('_')[0]})")
            for r, x, y in zip(res["rows"], xs, ys):
                ax.annotate(r["variant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    save_plot(fig, ax, args.out, f"Quantization switches on saved {args.model} weights (2-core CPU)",
              "artifact model blob (kB)", "quantization penalty (milli-bpb: quantized - post-EMA)")
    return 0


def loss_curves(path: Path) -> dict:
    """{"train": [(step, loss)], "val": [(step, loss)]} of one training log."""
    from logformat import lines_of

    text = path.read_text(encoding="utf-8")
    curves = {"train": [(int(m.group(1)), float(m.group(3))) for m in lines_of(text, "train_loss")],
              "val": [(int(m.group(1)), float(m.group(3))) for m in lines_of(text, "val")]}
    if not curves["train"]:
        raise SystemExit(f"bench.py: {path} has no train_loss lines")
    return curves


def run_curves(args) -> int:
    fig, ax = new_plot()
    for i, path in enumerate(map(Path, args.logs)):
        curves, colour = loss_curves(path), f"C{i}"
        train = [(s, v) for s, v in curves["train"] if s >= args.from_step]
        val = [(s, v) for s, v in curves["val"] if s >= args.from_step]
        ax.plot(*zip(*train), color=colour, lw=1.2, label=f"{path.stem} train")
        if val:
            ax.plot(*zip(*val), "o", color=colour, ms=5, label=f"{path.stem} val")
    save_plot(fig, ax, args.out, args.title, "step", "loss (nats per token)")
    return 0


def run_table(args) -> int:
    """Markdown table of `quant` results: one row per variant and seed file."""
    print("| variant | run | brotli bytes | family bytes | quantized bpb | penalty | sliding | TTT |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.results:
        res = json.loads(Path(path).read_text())
        base = res["rows"][0]
        for r in res["rows"]:
            d_b, d_f = r["brotli_bytes"] - base["brotli_bytes"], r["family_bytes"] - base["brotli_bytes"]
            print(f"| {r['variant']} | {res['name']} | {r['brotli_bytes']:,} ({d_b:+,}) | {r['family_bytes']:,} ({d_f:+,}) "
                  f"| {r['quantized_bpb']:.5f} | {r['penalty']:+.5f} | "
                  + (f"{r['sliding_bpb']:.5f}" if "sliding_bpb" in r else "–") + " | "
                  + (f"{r['ttt_bpb']:.5f}" if "ttt_bpb" in r else "–") + " |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train + evaluate a named config, write logs/NAME.{txt,json}")
    r.add_argument("name")
    r.add_argument("--preset", help="KEY=VALUE file of environment settings")
    r.add_argument("--data", required=True, help="DATA_DIR in the challenge's layout")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    r.add_argument("--nproc", type=int, default=1, help="processes (torchrun) ")
    r.add_argument("--out-dir", default="logs")
    g = sub.add_parser("gptq", help="time Hessian collection + GPTQ on the full config")
    g.add_argument("--batches", type=int, default=2)
    g.add_argument("--rows", type=int, default=1)
    g.add_argument("--seq-len", type=int, default=2048)
    c = sub.add_parser("compress", help="compare compressors on an artifact")
    c.add_argument("artifact")
    k = sub.add_parser("kernels", help="CUDA: A/B of the Triton kernels (loss and MLP alone, full-config steps)")
    k.add_argument("--rows", type=int, default=48 * 2048, help="tokens in the isolated loss/MLP (one micro-batch)")
    k.add_argument("--steps", type=int, default=10)
    k.add_argument("--out", default="logs/kernels_ab.json")
    gc = sub.add_parser("gpu-check", help="one GPU, a few minutes: will the record run work here? (logs/gpu_check_*)")
    gc.add_argument("--steps", type=int, default=20, help="timed training steps after the compile warm-up")
    gc.add_argument("--rows", type=int, default=48, help="sequences per micro-batch (the record: 48 per GPU)")
    gc.add_argument("--out-dir", default="logs")
    mem = sub.add_parser("memory", help="saved activations of one full-config micro-batch under the CUDA dtype policy")
    mem.add_argument("--rows", type=int, default=48, help="sequences per micro-batch (the record: 48 per rank)")
    mem.add_argument("--seq-len", type=int, default=2048)
    mem.add_argument("--out", help="also write the JSON here (the committed estimate: logs/cpu_cuda_memory.json)")
    q = sub.add_parser("quant", help="quantization switches on a run's saved weights: bytes and bpb penalty")
    q.add_argument("name")
    q.add_argument("--model", required=True, help="the run's final_model.pt (EMA weights)")
    q.add_argument("--log", required=True, help="the run's log (its post-EMA val_bpb is the reference)")
    q.add_argument("--preset", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--seed", type=int, default=1337, help="the run's SEED (for the record of the settings)")
    q.add_argument("--variant", action="append", metavar="LABEL:KEY=VALUE,...",
                   help="a quantization setting to try (default: a built-in list)")
    q.add_argument("--full", action="append", default=[], metavar="LABEL", help="also sliding and TTT bpb")
    q.add_argument("--reuse-run-quantized", action="store_true",
                   help="take the record's settings' quantized bpb from the run's log instead of evaluating again")
    q.add_argument("--out-dir", default="logs")
    pj = sub.add_parser("project", help="the projected artifact bytes of the full config with a preset's settings")
    pj.add_argument("--preset", help="KEY=VALUE settings over the record's defaults")
    pj.add_argument("--code", help="a packed file whose bytes the projection adds")
    p = sub.add_parser("plot", help="bytes-vs-penalty PNG of quant results")
    p.add_argument("out")
    p.add_argument("results", nargs="+")
    p.add_argument("--model", default="cpu_small", help="the preset whose weights the results are, for the title")
    cv = sub.add_parser("curves", help="training-loss curves PNG of training logs")
    cv.add_argument("out")
    cv.add_argument("logs", nargs="+")
    cv.add_argument("--title", default="Training loss (2-core CPU)")
    cv.add_argument("--from-step", type=int, default=0, help="leave out the steps before this one")
    t = sub.add_parser("table", help="markdown table of quant results")
    t.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    return {"run": run_benchmark, "gptq": run_gptq, "compress": run_compress, "memory": run_memory,
            "gpu-check": run_gpu_check, "kernels": run_kernels,
            "quant": run_quant, "project": run_project, "plot": run_plot, "curves": run_curves,
            "table": run_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
