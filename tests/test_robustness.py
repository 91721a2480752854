"""Bad input, bad settings and interrupted runs: each stops at once with the file or value named,
and nothing is lost. Every test here failed on the code before its fix."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, read_log, run_script

import bench
import train_gpt
from prepare_data import write_shard


# -----------------------------------------------------------------------------
# Data loss
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../victim", "", ".", "..", "/abs/victim", ".hidden", "a/b"])
def test_bench_name_never_deletes_outside_build_bench(name, tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    (root / "build" / "bench").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (root / "build" / "bench" / "earlier").mkdir()
    (root / "build" / "bench" / "earlier" / "log.txt").write_text("an earlier benchmark")
    monkeypatch.setattr(bench, "ROOT", root)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("ran train_gpt.py with a bad NAME"))
    name = str(victim) if name == "/abs/victim" else name
    with pytest.raises(SystemExit, match="NAME .* is not a plain name"):
        bench.main(["run", name, "--data", str(tmp_path)])
    assert (victim / "keep.txt").read_text() == "precious"
    assert (root / "build" / "bench" / "earlier" / "log.txt").is_file()


def test_bench_name_accepts_plain_names():
    assert bench.bench_dir("cpu_small-v2.1+x").name == "cpu_small-v2.1+x"
