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
NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")  # a plain name: never a path, never hidden


def bench_dir(name: str) -> Path:
    """build/bench/NAME, which run_benchmark empties: NAME must be a plain name, so nothing outside
    build/bench/ (the checkout, an earlier benchmark, an absolute path) can be deleted."""
    if not NAME_RE.fullmatch(name):
        raise SystemExit(f"bench.py: NAME {name!r} is not a plain name: use letters, digits, '.', '_', '+', '-', "
                         "not starting with '.'")
    base = (ROOT / "build" / "bench").resolve()
    work = base / name
    if work.resolve().parent != base:  # e.g. build/bench/NAME is a symlink out of build/bench/
        raise SystemExit(f"bench.py: {work} resolves to {work.resolve()}, outside {base}")
    return work


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
    args = ap.parse_args(argv)
    return {"run": run_benchmark, "gptq": run_gptq, "compress": run_compress}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
