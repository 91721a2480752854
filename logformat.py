"""The training log's format, in one place: the line patterns train_gpt.py writes (SPEC §7),
`scan_log` (what a log states), `lines_of` (every line of one kind), `parse_log` (a finished
run's log, checked) and the 16,000,000-byte budget. pack.py, record.py, bench.py and the tests
read logs through this module.

SIZE_LIMIT_BYTES lives in train_gpt.py, the file the budget is about (it checks itself against
it and must stay one self-contained file); it is imported from there, which imports torch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from train_gpt import SIZE_LIMIT_BYTES  # noqa: F401  (re-exported: the budget's one home)


class LogError(Exception):
    """A log that cannot be used: the message names the file and what is missing or wrong."""


STAGES = {  # log label -> JSON key, in evaluation order
    "pre-quantization post-ema": "pre_quant_post_ema",
    "quantized": "quantized",
    "quantized_sliding_window": "quantized_sliding_window",
    "quantized_ttt": "quantized_ttt",
    "quantized_ttt_phased": "quantized_ttt_phased",
}
FINAL_ORDER = ("quantized_ttt_phased", "quantized_ttt", "quantized_sliding_window", "quantized")  # first present is final
QUANTIZED_STAGES = ("quantized", "quantized_sliding_window", "quantized_ttt", "quantized_ttt_phased")
PATH_HPARAMS = {"DATA_DIR", "DATA_PATH", "TOKENIZER_PATH", "QUANTIZED_MODEL_PATH", "INIT_STATE"}
RUN_HPARAMS = {"SEED", "RUN_ID"}

NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
LINE_RES = {
    "code_bytes": re.compile(r"code_bytes:(\d+)\s*$"),
    "code_sha256": re.compile(r"code_sha256:([0-9a-f]{64})\s*$"),
    "hardware": re.compile(r"hardware:\s*(.*?)\s*$"),
    "versions": re.compile(r"versions:\s*(.*?)\s*$"),
    "hparam": re.compile(r"hparam:([A-Za-z_][A-Za-z0-9_]*)=(.*?)\s*$"),
    "model_params": re.compile(r"model_params:(\d+)\s*$"),
    "train_done": re.compile(r"train_done steps:(\d+) train_time:(" + NUM + r")ms"),
    "stopping_early": re.compile(r"stopping_early: (\S+) train_time:(" + NUM + r")ms step:(\d+)/(\d+)"),
    "serialized": re.compile(r"Serialized model quantized\+(\w+): (\d+) bytes"),
    "total": re.compile(r"Total submission size quantized\+(\w+): (\d+) bytes"),
    "over_budget": re.compile(r"OVER BUDGET by (-?\d+) bytes"),
    "stage": re.compile(r"(" + "|".join(re.escape(s) for s in STAGES) + r") val_loss:(" + NUM + r") val_bpb:("
                        + NUM + r")(?: eval_time:(" + NUM + r")ms)?\s*$"),
    "calibration": re.compile(r"gptq:collected \d+ hessians from \d+ training batches in (" + NUM + r")ms"),
    "train_plus_calibration": re.compile(r"train_plus_calibration_time:(" + NUM + r")ms"),
    "train_loss": re.compile(r"(\d+)/(\d+) train_loss: (" + NUM + r") train_time: \S+ tok/s: (" + NUM + r")"),
    "val": re.compile(r"(\d+)/(\d+) val_loss: (" + NUM + r") val_bpb: (" + NUM + r")\s*$"),
    "weights_checksum": re.compile(r"weights_checksum:([0-9a-f]+) ranks:([0-9a-f,]+) ranks_agree:([01])\s*$"),
    "peak_memory": re.compile(r"peak_memory_allocated:(\d+) MiB"),
}


def _num(s: str) -> float | int:
    v = float(s)
    return int(v) if v.is_integer() and re.fullmatch(r"-?\d+", s) else v


def scan_log(text: str, path: str | Path = "<log>") -> dict:
    """What a log's lines state, unchecked: {"path", "hparams", "stages", and one key per line
    kind seen}; a repeated line keeps its last value. `counts` says how often each kind appeared."""
    log: dict = {"path": str(path), "hparams": {}, "stages": {}, "counts": {}}
    counts = log["counts"]
    for raw_line in text.splitlines():
        line = raw_line.strip()
        for key, rx in LINE_RES.items():
            m = rx.match(line)
            if not m:
                continue
            counts[key] = counts.get(key, 0) + 1
            g = m.groups()
            if key in ("code_bytes", "model_params"):
                log[key] = int(g[0])
            elif key in ("code_sha256", "hardware", "versions"):
                log[key] = g[0]
            elif key == "hparam":
                log["hparams"][g[0]] = g[1]
            elif key == "train_done":
                log["steps"], log["train_time_ms"] = int(g[0]), _num(g[1])
            elif key == "stopping_early":
                log["stopped_early"] = {"reason": g[0], "train_time_ms": _num(g[1]), "step": int(g[2])}
            elif key == "serialized":
                log["compressor"], log["model_bytes"] = g[0], int(g[1])
            elif key == "total":
                log["total_bytes"] = int(g[1])
            elif key == "over_budget":
                log["over_budget_bytes"] = int(g[0])
            elif key == "stage":
                stage = {"val_loss": float(g[1]), "val_bpb": float(g[2])}
                if g[3] is not None:
                    stage["eval_time_ms"] = _num(g[3])
                log["stages"][STAGES[g[0]]] = stage
            elif key == "calibration":
                log["calibration_time_ms"] = _num(g[0])
            elif key == "train_plus_calibration":
                log["train_plus_calibration_time_ms"] = _num(g[0])
            elif key == "train_loss":
                log["iterations"] = int(g[1])
                log["tokens_per_second"] = _num(g[3])
            elif key == "peak_memory":
                log["peak_memory_mib"] = int(g[0])
            elif key == "weights_checksum":
                log["weights_checksum"], log["rank_checksums"], log["ranks_agree"] = g[0], g[1].split(","), g[2] == "1"
            break
    return log


def lines_of(text: str, kind: str) -> list[re.Match]:
    """Every line of one kind (a LINE_RES key), in order, as its match: the series a log states
    (per-step losses, one line per stage) where scan_log keeps only the last value."""
    rx = LINE_RES[kind]
    return [m for m in (rx.match(line.strip()) for line in text.splitlines()) if m]


def parse_log(path: str | Path) -> dict:
    """One finished training log -> dict of what it states (see scan_log). Raises LogError when
    the final result lines are missing or the file holds more than one run."""
    path = Path(path)
    log = scan_log(path.read_text(encoding="utf-8", errors="replace"), path)
    counts = log.pop("counts")
    if counts.get("code_sha256", 0) > 1:
        raise LogError(f"{path}: holds {counts['code_sha256']} runs (code_sha256 appears more than once; "
                       "a RUN_ID reused appends to the same log)")
    missing = [what for what, ok in (
        ("code_bytes:", "code_bytes" in log), ("code_sha256:", "code_sha256" in log),
        ("hparam:SEED=", "SEED" in log["hparams"]),
        ("Serialized model quantized+...: N bytes", "model_bytes" in log),
        ("Total submission size quantized+...: N bytes", "total_bytes" in log),
        ("quantized val_loss:... val_bpb:...", "quantized" in log["stages"])) if not ok]
    if missing:
        raise LogError(f"{path}: missing the final result lines {missing}; did the run finish?")
    log["seed"] = _num(log["hparams"]["SEED"])
    log["run_id"] = log["hparams"].get("RUN_ID")
    log["final_stage"] = next(s for s in FINAL_ORDER if s in log["stages"])
    # A run killed mid-evaluation still has its earlier stages: the settings say which must be there.
    for stage, switch in (("quantized_sliding_window", "SLIDING_WINDOW_ENABLED"), ("quantized_ttt", "TTT_ENABLED"),
                          ("quantized_ttt_phased", "PHASED_TTT_ENABLED")):
        if log["hparams"].get(switch, "").lower() in ("true", "1") and stage not in log["stages"]:
            raise LogError(f"{path}: {switch} is on but there is no '{stage} val_loss:...' line; "
                           "the run did not finish its evaluation")
    for stage, values in log["stages"].items():
        if not all(math.isfinite(v) for v in values.values()):
            raise LogError(f"{path}: stage {stage} has a non-finite result {values}")
    return log


def log_files(paths: list[str], must_exist: bool = True) -> list[Path]:
    """Files as given; a folder stands for its *.txt and *.log files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.txt")) + sorted(p.glob("*.log")))
        elif p.is_file() or not must_exist:
            out.append(p)
        else:
            raise LogError(f"no such log file or folder: {p}")
    return out


def found_logs(paths: list[str]) -> list[Path]:
    files = log_files(paths)
    if not files:
        raise LogError(f"no *.txt or *.log file in {' '.join(paths)}")
    return files
