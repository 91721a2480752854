"""Benchmarks for train_gpt.py. Not part of the artifact, so it may be as long as it needs.

  python bench.py run NAME --preset presets/cpu_small.env --data DATA_DIR [--set KEY=VALUE ...]
      Runs train_gpt.py with the preset's environment in build/bench/NAME/, then writes
      logs/NAME.txt (the training log) and logs/NAME.json: tok/s, step time, peak memory,
      every stage's loss/bpb and eval time, blob and total bytes, git commit, hardware.
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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def read_preset(path: Path) -> dict[str, str]:
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise SystemExit(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        key, value = line.split("=", 1)
        env[key.strip()] = value.strip()
    return env


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_benchmark(args) -> int:
    import pack

    env = read_preset(Path(args.preset)) if args.preset else {}
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(DATA_DIR=str(Path(args.data).resolve()), RUN_ID=args.name)
    work = ROOT / "build" / "bench" / args.name
    if work.exists():
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
    shutil.copyfile(log_path, out_dir / f"{args.name}.txt")
    text = log_path.read_text()
    log = pack.parse_log(log_path)
    tok_s = [int(x) for x in re.findall(r"tok/s: (\d+)", text)]
    gpu_peak = re.search(r"peak_memory_allocated:(\d+) MiB", text)
    steps, train_ms = log.get("steps"), log.get("train_time_ms")
    result = {
        "name": args.name,
        "command": f"python bench.py run {args.name} --preset {args.preset} --data {args.data}"
                   + "".join(f" --set {s}" for s in args.set),
        "settings": env,
        "git_commit": git_commit(),
        "hardware": log.get("hardware"),
        "versions": log.get("versions"),
        "model_params": log.get("model_params"),
        "steps": steps,
        "train_time_ms": train_ms,
        "step_time_ms": train_ms / steps if steps else None,
        "tokens_per_second": tok_s[-1] if tok_s else None,
        # CPU: the largest resident set of any child process (Linux reports KiB).
        "peak_memory_mib": int(gpu_peak.group(1)) if gpu_peak else
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "peak_memory_kind": "cuda max_memory_allocated" if gpu_peak else "max RSS of the training process",
        "stages": log["stages"],
        "model_bytes": log.get("model_bytes"),
        "code_bytes": log.get("code_bytes"),
        "total_bytes": log.get("total_bytes"),
        "wall_seconds": round(wall, 1),
    }
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "step_time_ms", "tokens_per_second", "peak_memory_mib",
                                              "model_bytes", "wall_seconds")}))
    for stage, v in log["stages"].items():
        print(f"{stage:28s} val_bpb {v['val_bpb']:.5f}  eval {v.get('eval_time_ms', 0) / 1000:.1f}s")
    return 0


def run_gptq(args) -> int:
    import torch

    import train_gpt as tg

    torch.manual_seed(0)
    h = tg.Hyperparameters(train_seq_len=args.seq_len)
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
        mlps[fused] = tg.MLP(tg.Hyperparameters(**{**vars_of(h), "fused_mlp": fused})).to(device)
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
    h = tg.Hyperparameters(**overrides)
    rt = tg.Runtime(h)
    torch.manual_seed(0)
    model = tg.build_model(h, rt.device, rt.is_cuda)
    trainer = tg.Trainer(h, rt, model, tg.Logger(None))

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

    h = tg.Hyperparameters(fused_ce=True, fused_mlp=True)
    rt = tg.Runtime(h)
    result = {
        "command": "python bench.py kernels " + " ".join(sys.argv[2:]),
        "hardware": f"{torch.cuda.get_device_name(rt.device)}, torch {torch.__version__}",
        "git_commit": git_commit(),
        "isolation_rows": args.rows,
        "isolation": kernel_isolation(h, rt.device, args.rows, iters=20),
        "full_config": [full_config_steps({"fused_ce": ce, "fused_mlp": mlp}, args.steps)
                        for ce, mlp in ((False, False), (True, False), (False, True), (True, True))],
    }
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["isolation"]:
        print(f"{r['part']:14s} compiled={int(r['compiled'])} {r['ms']:8.3f} ms  peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB")
    for r in result["full_config"]:
        print(f"full config FUSED_CE={int(r['fused_ce'])} FUSED_MLP={int(r['fused_mlp'])}: "
              f"{r['step_ms']} ms/step, peak {r['peak_bytes'] / 2**20:.0f} MiB, last loss {r['losses'][-1]}")
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
    args = ap.parse_args(argv)
    return {"run": run_benchmark, "gptq": run_gptq, "compress": run_compress, "kernels": run_kernels}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
