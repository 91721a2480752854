"""Build a record folder or a submission.json from training logs.

  python record.py --record NAME --logs LOG1 LOG2 ... [--baseline-bpb 1.07882] [--date YYYY-MM-DD]
                   [--src train_gpt.py] [--out build/train_gpt.py] [--out-dir records] [--force]
      write records/<date>_<NAME>/: the file that ran (found by the sha256 the logs state: the
      packed --out, the readable --src, or --src packed now), the readable source, README.md,
      submission.json, the logs and requirements.txt.
  python record.py --summary LOG1 LOG2 ... [--out-json submission.json]
      only the submission.json summary of a set of logs.

Logs are read by logformat.py; the file that ran is packed and checked by pack.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from scipy import stats as scipy_stats

from logformat import (PATH_HPARAMS, QUANTIZED_STAGES, RUN_HPARAMS, SIZE_LIMIT_BYTES, STAGES, LogError, found_logs,
                       parse_log)
from pack import (RECORD_DEFAULTS, PackError, minify_source, pack_source, packed_for, sha256, specialise_source,
                  unpack)
from train_gpt import atomic_write

ROOT = Path(__file__).resolve().parent


class RecordError(Exception):
    """A refusal: the message names the file and the offending value."""


# -----------------------------------------------------------------------------
# CHECKS
# Logs that do not belong to one within-budget run of one file are refused, never averaged.
# -----------------------------------------------------------------------------

def check_budget(log: dict) -> None:
    path, total = log["path"], log["total_bytes"]
    if "over_budget_bytes" in log:
        raise RecordError(f"{path}: the run reports OVER BUDGET by {log['over_budget_bytes']} bytes")
    if total > SIZE_LIMIT_BYTES:
        raise RecordError(f"{path}: total submission size {total} > {SIZE_LIMIT_BYTES} bytes")
    if total != log["model_bytes"] + log["code_bytes"]:
        raise RecordError(f"{path}: total {total} != model {log['model_bytes']} + code {log['code_bytes']} bytes")


RECORD_SECONDS = 600  # the record track: training plus GPTQ calibration within 10 minutes on 8 GPUs


def check_record_time(log: dict) -> None:
    """Refuse a record-track log (8 CUDA ranks) whose training plus calibration exceeds 600 s.
    Logs from before the train_plus_calibration_time line are summed from their own lines."""
    hardware = log.get("hardware") or ""
    if "device:cuda" not in hardware or "world_size:8" not in hardware:
        return
    total = log.get("train_plus_calibration_time_ms")
    if total is None and "train_time_ms" in log and "calibration_time_ms" in log:
        total = log["train_time_ms"] + log["calibration_time_ms"]
    if total is not None and total > 1000 * RECORD_SECONDS:
        raise RecordError(f"{log['path']}: training plus GPTQ calibration took {total / 1000:.1f}s, over the "
                        f"{RECORD_SECONDS}s limit by {total / 1000 - RECORD_SECONDS:.1f}s")


def check_consistent(logs: list[dict]) -> None:
    """Refuse logs that are not seeds of one and the same run."""
    first = logs[0]
    for log in logs[1:]:
        if log["code_sha256"] != first["code_sha256"]:
            raise RecordError(f"code_sha256 differs: {first['path']} has {first['code_sha256']}, "
                            f"{log['path']} has {log['code_sha256']}")
        names = set(first["hparams"]) | set(log["hparams"])
        for name in sorted(names - RUN_HPARAMS):
            a, b = first["hparams"].get(name), log["hparams"].get(name)
            if name in PATH_HPARAMS or name.endswith(("_PATH", "_DIR")):
                a, b = None if a is None else bool(a), None if b is None else bool(b)  # set vs unset
            if a != b:
                raise RecordError(f"hyperparameter {name} differs: {first['path']} has {first['hparams'].get(name)!r}, "
                                f"{log['path']} has {log['hparams'].get(name)!r}")
        if log["final_stage"] != first["final_stage"]:
            raise RecordError(f"final evaluation differs: {first['path']} ends with {first['final_stage']}, "
                            f"{log['path']} with {log['final_stage']}")
    seen: dict = {}
    for log in logs:
        if log["seed"] in seen:
            raise RecordError(f"SEED={log['seed']} appears twice: {seen[log['seed']]} and {log['path']}")
        seen[log["seed"]] = log["path"]


# -----------------------------------------------------------------------------
# SUBMISSION
# -----------------------------------------------------------------------------

IMPROVEMENT_NATS = 0.005
ALPHA = 0.01


def run_entry(log: dict) -> dict:
    final = log["stages"][log["final_stage"]]
    entry = {"seed": log["seed"], "run_id": log["run_id"], "log": Path(log["path"]).name,
             "final_stage": log["final_stage"], "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
             "stages": log["stages"], "model_bytes": log["model_bytes"], "compressor": log["compressor"],
             "code_bytes": log["code_bytes"], "total_bytes": log["total_bytes"]}
    for key in ("steps", "iterations", "train_time_ms", "stopped_early", "model_params", "hardware"):
        if key in log:
            entry[key] = log[key]
    times = {s: log["stages"][s]["eval_time_ms"] for s in STAGES.values()
             if "eval_time_ms" in log["stages"].get(s, {})}
    if times:
        entry["eval_time_ms"] = times
        quantized = [times[s] for s in QUANTIZED_STAGES if s in times]
        if quantized:
            entry["eval_time_quantized_total_ms"] = sum(quantized)
    return entry


def significance(losses: list[float], bpbs: list[float], baseline_bpb: float | None,
                 baseline_loss: float | None) -> dict:
    """One-sided test of `mean val_loss <= baseline_loss - 0.005 nats`.

    The test runs in nats. Without --baseline-loss the baseline's loss is baseline_bpb divided by
    the logs' own bpb-per-nat ratio (val_bpb / val_loss = tokens per byte / ln 2), which holds
    when the logs evaluate the same validation set as the baseline."""
    n = len(losses)
    ratio = statistics.fmean(b / l for b, l in zip(bpbs, losses))
    out: dict = {"claim": f"mean val_loss <= baseline val_loss - {IMPROVEMENT_NATS} nats", "unit": "nats per token",
                 "alpha": ALPHA, "n": n, "df": n - 1, "bpb_per_nat": ratio,
                 "tokens_per_byte": ratio * math.log(2), "threshold_nats": IMPROVEMENT_NATS,
                 "threshold_bpb": IMPROVEMENT_NATS * ratio}
    if baseline_loss is not None:
        out.update(baseline_loss=baseline_loss, baseline_loss_source="given (--baseline-loss)")
        if baseline_bpb is not None:
            out["baseline_bpb"] = baseline_bpb
    elif baseline_bpb is not None:
        baseline_loss = baseline_bpb / ratio
        out.update(baseline_bpb=baseline_bpb, baseline_loss=baseline_loss,
                   baseline_loss_source="baseline_bpb / bpb_per_nat, the ratio val_bpb/val_loss of these logs "
                                        "(valid when they evaluate the baseline's validation set)")
    else:
        out["note"] = "no baseline given"
        return out
    target = baseline_loss - IMPROVEMENT_NATS
    mean = statistics.fmean(losses)
    out.update(target_loss=target, mean_val_loss=mean, improvement_nats=baseline_loss - mean)
    t_name = "one-sided one-sample Student t-test of mean val_loss < target_loss (scipy.stats.ttest_1samp, df = n-1)"
    z_name = "one-sided one-sample z-test of mean val_loss < target_loss (normal cdf, sample std as sigma)"
    if n < 2:
        out.update(t_test={"name": t_name, "statistic": None, "p_value": None},
                   z_test={"name": z_name, "statistic": None, "p_value": None}, significant=None,
                   note="one run: no sample std, so no test; run more seeds")
        return out
    sd = statistics.stdev(losses)
    if sd == 0:
        p = 0.0 if mean < target else 1.0
        out.update(t_test={"name": t_name, "statistic": None, "p_value": p},
                   z_test={"name": z_name, "statistic": None, "p_value": p}, significant=p < ALPHA,
                   note="all runs have the same val_loss (std 0); the test degenerates to a comparison")
        return out
    t = scipy_stats.ttest_1samp(losses, target, alternative="less")
    stat = float(t.statistic)  # (mean - target) / (sd / sqrt(n)), the z-test's statistic too
    out.update(t_test={"name": t_name, "statistic": stat, "p_value": float(t.pvalue)},
               z_test={"name": z_name, "statistic": stat, "p_value": statistics.NormalDist().cdf(stat)},
               significant=bool(t.pvalue < ALPHA))
    return out


def summarize(logs: list[dict], baseline_bpb: float | None = None, baseline_loss: float | None = None) -> dict:
    """The submission.json content of a set of consistent, within-budget logs."""
    if not logs:
        raise RecordError("no logs given")
    for log in logs:
        check_budget(log)
    check_consistent(logs)
    logs = sorted(logs, key=lambda g: g["seed"])
    runs = [run_entry(g) for g in logs]
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    n = len(runs)
    hardware = sorted({g.get("hardware") for g in logs if g.get("hardware")})
    versions = sorted({g.get("versions") for g in logs if g.get("versions")})
    out = {
        "val_bpb": statistics.fmean(bpbs), "val_loss": statistics.fmean(losses),
        "val_bpb_std": statistics.stdev(bpbs) if n > 1 else None,
        "val_loss_std": statistics.stdev(losses) if n > 1 else None,
        "std_note": "sample std (n-1)" if n > 1 else "one run: no std",
        "final_stage": logs[0]["final_stage"], "n_seeds": n, "seeds": [r["seed"] for r in runs],
        "bytes_total": max(r["total_bytes"] for r in runs), "bytes_code": logs[0]["code_bytes"],
        "bytes_model_max": max(r["model_bytes"] for r in runs), "size_limit_bytes": SIZE_LIMIT_BYTES,
        "code_sha256": logs[0]["code_sha256"],
        "hardware": hardware[0] if len(hardware) == 1 else (hardware or None),
        "versions": versions[0] if len(versions) == 1 else (versions or None),
        "significance": significance(losses, bpbs, baseline_bpb, baseline_loss),
        "hparams": {k: v for k, v in logs[0]["hparams"].items() if k not in RUN_HPARAMS | PATH_HPARAMS},
        "runs": runs,
    }
    return out


def _fmt(x, digits=5) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _ms(x) -> str:
    return "—" if x is None else f"{x / 1000:.1f} s"


def repack_command(packed_for: str | None) -> str:
    """The pack.py command that rebuilds a packed file from its readable source."""
    command = "python pack.py --src train_gpt_readable.py --out train_gpt.py"
    if packed_for is None:
        return command + " --every-switch"
    return command if packed_for == RECORD_DEFAULTS else f"{command} --preset {packed_for}"


def readme(name: str, date: str, summary: dict, packed: bool) -> str:
    runs, sig = summary["runs"], summary["significance"]
    stages = [s for s in STAGES.values() if any(s in r["stages"] for r in runs)]
    head = ["seed", "steps", "train time"] + [f"{s} loss / bpb" for s in stages] + [
        "model bytes", "code bytes", "total bytes", "eval time (quantized stages)"]
    rows = []
    for r in runs:
        cells = [str(r["seed"]), _fmt(r.get("steps")), _ms(r.get("train_time_ms"))]
        for s in stages:
            st = r["stages"].get(s)
            cells.append(f"{st['val_loss']:.5f} / {st['val_bpb']:.5f}" if st else "—")
        cells += [_fmt(r["model_bytes"]), _fmt(r["code_bytes"]), _fmt(r["total_bytes"]),
                  _ms(r.get("eval_time_quantized_total_ms"))]
        rows.append(cells)
    lines = [f"# {name}", "",
             f"{date} · {summary['n_seeds']} seed(s) · final stage `{summary['final_stage']}` · "
             f"hardware: {summary['hardware']}", "",
             f"**val_bpb {summary['val_bpb']:.5f}** (std {_fmt(summary['val_bpb_std'])}), "
             f"val_loss {summary['val_loss']:.5f} nats (std {_fmt(summary['val_loss_std'])}); "
             f"largest total {summary['bytes_total']:,} bytes of {SIZE_LIMIT_BYTES:,}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    lines += ["", "## Significance", ""]
    if "target_loss" in sig:
        lines.append(f"Claim: {sig['claim']}. Baseline val_bpb {_fmt(sig.get('baseline_bpb'))}, val_loss "
                     f"{sig['baseline_loss']:.5f} ({sig['baseline_loss_source']}); target {sig['target_loss']:.5f}; "
                     f"mean improvement {sig['improvement_nats']:.5f} nats.")
        for key in ("t_test", "z_test"):
            t = sig[key]
            p = "—" if t["p_value"] is None else f"{t['p_value']:.3g}"
            lines.append(f"- {t['name']}: statistic {_fmt(t['statistic'], 3)}, p = {p}")
        lines.append(f"- significant at alpha {ALPHA}: {sig['significant']}")
    if sig.get("note"):
        lines.append(f"- note: {sig['note']}")
    what = "readable"
    if packed:
        pins = ", ".join(f"`{k.upper()}={v!r}`" for k, v in summary.get("code_pins", {}).items())
        what = ("packed: compressed and self-extracting, "
                + (f"specialised to {summary['code_packed_for']}, so it holds only the code of those settings and "
                   f"refuses other values of {pins}" if summary.get("code_packed_for") else "every switch included"))
    lines += ["", "## Files", "",
              f"- `train_gpt.py`: the file that ran ({what}; {summary['bytes_code']:,} bytes, "
              f"sha256 `{summary['code_sha256']}`)"]
    if packed:
        lines.append(f"- `train_gpt_readable.py`: the readable source it was packed from "
                     f"(`{repack_command(summary.get('code_packed_for'))}` rebuilds it)")
    lines += ["- `submission.json`: every number above, per seed", "- `train_seed*.log`: the training logs",
              "", "## Settings", "", "Shared by every run (SEED and paths aside):", "", "```"]
    lines += [f"{k}={v}" for k, v in summary["hparams"].items()]
    lines += ["```", "", f"Versions: {summary['versions']}", ""]
    world = re.search(r"world_size:(\d+)", summary["hardware"] or "") if isinstance(summary["hardware"], str) else None
    launcher = f"torchrun --standalone --nproc_per_node={world.group(1)}" if world else "python"
    lines += ["Run: `SEED=<seed> " + launcher + " train_gpt.py` (with the data layout of the upstream repository).", ""]
    return "\n".join(lines)


def find_shipped_code(sha: str, src: Path, packed_path: Path, preset: str | None = None) -> tuple[bytes, bool]:
    """(bytes of the file whose sha256 the logs carry, whether it is a packed file). `preset`: what
    `src packed now` is specialised to (None: the record's defaults, as `python pack.py`)."""
    tried = []
    if packed_path.is_file():
        data = packed_path.read_bytes()
        tried.append(f"{packed_path} {sha256(data)}")
        if sha256(data) == sha:
            return data, True
    if src.is_file():
        data = src.read_bytes()
        tried.append(f"{src} {sha256(data)}")
        if sha256(data) == sha:
            return data, False
        try:
            fresh = pack_source(specialise_source(data, preset, src.name).source.encode(), filename=src.name).wrapped
        except PackError as e:
            tried.append(f"{src} packed now: {e}")
        else:
            tried.append(f"{src} packed now {sha256(fresh)}")
            if sha256(fresh) == sha:
                return fresh, True
    raise RecordError(f"no file matches the logs' code_sha256 {sha}: tried " + "; ".join(tried or ["nothing"]))


def check_packed_from(code: bytes, readable: bytes, src: Path, packed_path: Path) -> tuple[str, dict]:
    """(what the packed file was specialised to, its pins), once the readable source is proven to
    be what it was packed from: specialised again with the pins the packed file states, and
    minified, it must be the packed payload byte for byte."""
    payload = unpack(code)
    preset, pins = packed_for(payload)
    text = readable.decode("utf-8")
    if preset:
        from specialise import specialise

        text = specialise(text, pins, preset).source
    if payload != minify_source(text, src.name).encode("utf-8"):
        raise RecordError(f"{packed_path} was not packed from the current {src} (edited since?): "
                          "the readable copy would not match the file that ran")
    return preset, pins


def build_record(name: str, log_paths: list[Path], src: Path, packed_path: Path, out_dir: Path, date: str,
                 baseline_bpb: float | None, baseline_loss: float | None, force: bool = False,
                 preset: str | None = None) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise RecordError(f"record name {name!r}: use letters, digits, '.', '_', '+', '-'")
    logs = [parse_log(p) for p in log_paths]
    for log in logs:
        check_record_time(log)
    summary = summarize(logs, baseline_bpb, baseline_loss)
    code, packed = find_shipped_code(summary["code_sha256"], src, packed_path, preset)
    readable = src.read_bytes() if packed else code
    specialised_for, pins = check_packed_from(code, readable, src, packed_path) if packed else ("", {})
    folder = out_dir / f"{date}_{name}"
    if folder.exists() and not force:
        raise RecordError(f"{folder} exists; pass --force to replace it")
    record = {"name": name, "date": date, **summary, "code_packed_for": specialised_for or None, "code_pins": pins}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / "train_gpt.py").write_bytes(code)
        if packed:
            (tmp / "train_gpt_readable.py").write_bytes(readable)
        for log in logs:
            shutil.copyfile(log["path"], tmp / f"train_seed{log['seed']}.log")
        for run in record["runs"]:
            run["log"] = f"train_seed{run['seed']}.log"
        (tmp / "submission.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(name, date, record, packed), encoding="utf-8")
        requirements = ROOT / "requirements.txt"
        if requirements.is_file():
            shutil.copyfile(requirements, tmp / "requirements.txt")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", metavar="NAME", help="build records/<date>_<NAME>/ from --logs")
    ap.add_argument("--logs", nargs="+", metavar="PATH", help="training logs or folders of them (--record)")
    ap.add_argument("--summary", nargs="+", metavar="LOG", help="write only a submission.json from these logs")
    ap.add_argument("--out-json", default="submission.json", help="--summary's output (default submission.json)")
    ap.add_argument("--src", default="train_gpt.py", help="readable source (default train_gpt.py)")
    ap.add_argument("--out", default="build/train_gpt.py", help="packed file (default build/train_gpt.py)")
    ap.add_argument("--preset", metavar="FILE", help="what --src is specialised to when packed now, if --out is "
                    "not the file that ran (default: the record's defaults, as python pack.py)")
    ap.add_argument("--baseline-bpb", type=lambda v: None if v.lower() == "none" else float(v), default=1.07882,
                    help="val_bpb to beat (default 1.07882, the record); 'none' for logs of another data set")
    ap.add_argument("--baseline-loss", type=float, help="val_loss to beat, in nats (else converted from bpb)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out-dir", default="records")
    ap.add_argument("--force", action="store_true", help="replace an existing record folder")
    args = ap.parse_args(argv)
    if bool(args.record) == bool(args.summary):
        ap.error("give either --record NAME --logs ... or --summary LOG ...")
    try:
        if args.record:
            if not args.logs:
                ap.error("--record needs --logs LOG1 LOG2 ...")
            folder = build_record(args.record, found_logs(args.logs), Path(args.src), Path(args.out),
                                  Path(args.out_dir), args.date, args.baseline_bpb, args.baseline_loss, args.force,
                                  args.preset)
            s = json.loads((folder / "submission.json").read_text())
            print(f"wrote {folder}: val_bpb {s['val_bpb']:.5f} over {s['n_seeds']} seed(s), "
                  f"t-test p = {s['significance'].get('t_test', {}).get('p_value')}")
            return 0
        summary = summarize([parse_log(p) for p in found_logs(args.summary)], args.baseline_bpb, args.baseline_loss)
        atomic_write(args.out_json, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        print(f"wrote {args.out_json}: val_bpb {summary['val_bpb']:.5f} over {summary['n_seeds']} seed(s) "
              f"on {summary['hardware']}")
        return 0
    except (RecordError, LogError, PackError) as e:
        print(f"record.py: refused: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
