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
  python bench.py quant NAME --model final_model.pt --log TRAIN_LOG --preset P --data DATA_DIR
                        [--variant LABEL:KEY=VALUE,KEY=VALUE ...] [--full LABEL ...]
      Quantization switches applied to one run's saved EMA weights (quantization needs no
      retraining): for each variant, blob bytes with the record's single brotli stream and with
      COMPRESSOR=family, the quantized bpb and its penalty over the run's post-EMA bpb; sliding
      and TTT bpb for the --full variants. Writes logs/NAME.{txt,json}.
  python bench.py plot OUT.png JSON ...
      Bytes-vs-penalty plot of `quant` results (needs matplotlib: requirements-bench.txt).
  python bench.py table JSON ...
      The same results as a markdown table (bytes relative to each run's record row).
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

    import train_gpt as tg

    env = read_preset(Path(args.preset)) if args.preset else {}
    env.update(DATA_DIR=str(Path(args.data).resolve()), SEED=str(args.seed))
    os.environ.update(env)
    log_text = Path(args.log).read_text()
    stage = {k: float(v) for k, v in re.findall(r"^(pre-quantization post-ema|quantized) val_loss:\S+ val_bpb:(\S+)",
                                                 log_text, re.M)}
    post_ema = stage["pre-quantization post-ema"]
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    h0 = tg.Hyperparameters()
    rt = tg.Runtime(h0)
    state = torch.load(args.model, map_location="cpu", weights_only=True)
    model = tg.build_model(h0, rt.device, rt.is_cuda)
    tg.load_into_model(model, state, args.model)
    model.looping_active = h0.num_loops > 0
    t0 = time.perf_counter()
    loader = tg.ShuffledSequenceLoader(h0.train_files, h0.train_seq_len, 0, 1)
    hessians = tg.collect_hessians(model, loader, h0.gptq_calibration_batches, h0.micro_batch_seqs, rt)
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
        h = tg.Hyperparameters(**kw)
        t0 = time.perf_counter()
        w, m = tg.quantize_state_dict(state, hessians, h)
        t_quant = time.perf_counter() - t0
        blobs = {c: tg.compress_blob(w, m, c) for c in ("brotli", "family")}
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
               "quant_seconds": round(t_quant, 1), "lqer": [x for x in tg.category_table(m, w) if x.startswith("lqer:")],
               "families": families}
        if key in evaluated:
            row.update(evaluated[key], same_weights_as=evaluated[key]["variant"])
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
    result = {"name": args.name, "command": command, "git_commit": git_commit(), "hardware": lines[1],
              "post_ema_bpb": post_ema, "training_run_quantized_bpb": stage.get("quantized"), "rows": rows}
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{args.name}.txt").write_text(command + "\n" + "\n".join(lines) + "\n")
    return 0


def run_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in args.results:
        res = json.loads(Path(path).read_text())
        for column, marker in (("brotli_bytes", "o"), ("family_bytes", "s")):
            xs = [r[column] / 1000 for r in res["rows"]]
            ys = [r["penalty"] * 1000 for r in res["rows"]]
            ax.scatter(xs, ys, marker=marker, label=f"{res['name']} ({column.split('_')[0]})")
            for r, x, y in zip(res["rows"], xs, ys):
                ax.annotate(r["variant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("artifact model blob (kB)")
    ax.set_ylabel("quantization penalty (milli-bpb: quantized - post-EMA)")
    ax.set_title("Quantization switches on saved cpu_small weights (2-core CPU)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
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
    p = sub.add_parser("plot", help="bytes-vs-penalty PNG of quant results")
    p.add_argument("out")
    p.add_argument("results", nargs="+")
    t = sub.add_parser("table", help="markdown table of quant results")
    t.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    return {"run": run_benchmark, "gptq": run_gptq, "compress": run_compress, "quant": run_quant,
            "plot": run_plot, "table": run_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
