"""pack.py: the packed file runs exactly the minified source, the latin-1 literal carries every
byte, and the record builder computes and refuses what it should."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import lzma
import math
import os
import random
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

import logformat  # noqa: E402
import pack  # noqa: E402
import record  # noqa: E402
from conftest import read_log, run_script  # noqa: E402

SCRIPT = textwrap.dedent('''\
    """A small script in the style of train_gpt.py: minification removes this docstring."""
    from __future__ import annotations

    import hashlib
    import os
    import sys
    from dataclasses import dataclass


    @dataclass
    class Settings:
        """Fields come from class-body annotations, which must survive."""
        learning_rate: float = 0.25
        num_layers: int = 3


    class Model:
        def __init__(self, width: int) -> None:
            self.tok_emb = [0.5] * width
            self.blocks = [index * 0.25 for index in range(width)]

        def state_keys(self) -> list[str]:
            return sorted(self.__dict__)


    def weighted_total(values: list[float], *, scale: float = 2.0) -> float:
        running_total = 0.0
        for item_value in values:
            running_total += item_value * scale
        return running_total


    def main() -> int:
        settings = Settings(learning_rate=float(os.environ.get("LEARNING_RATE", "0.5")))
        model = Model(settings.num_layers + 1)
        print("keys", model.state_keys())
        print("total", weighted_total(model.blocks, scale=settings.learning_rate))
        print("name", __name__)
        print("unicode", "\\u2581caf\\u00e9 ▁")
        code = open(__file__, "rb").read()
        print("file", os.path.abspath(__file__))
        print("code", len(code), hashlib.sha256(code).hexdigest())
        return 0


    if __name__ == "__main__":
        sys.exit(main())
    ''')


def run_py(path: Path, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def latin1_literal_value(body: bytes) -> bytes:
    """Compile a latin-1 module holding body inside \"\"\"...\"\"\" and return its value's bytes."""
    source = pack.LATIN1_HEADER + b'x = """' + body + b'"""\n'
    scope: dict = {}
    exec(compile(source, "<literal>", "exec"), scope)
    return scope["x"].encode("latin-1")


# -----------------------------------------------------------------------------
# round trip
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_script(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    src = d / "script.py"
    src.write_text(SCRIPT, encoding="utf-8")
    out = d / "build" / "script.py"
    assert pack.main(["--src", str(src), "--out", str(out), "--logs", str(d / "no_logs")]) == 0
    return src, out


def test_payload_round_trip(packed_script):
    src, out = packed_script
    wrapped = out.read_bytes()
    assert pack.unpack(wrapped) == pack.minify_source(SCRIPT).encode("utf-8")
    compile(wrapped, str(out), "exec")
    minified = pack.unpack(wrapped).decode()
    assert '"""A small script' not in minified and "Fields come from" not in minified
    assert "running_total" not in minified  # locals renamed
    for kept in ("tok_emb", "blocks", "learning_rate:float", "LEARNING_RATE", "weighted_total", "scale"):
        assert kept in minified


def test_packed_runs_like_readable(packed_script, tmp_path):
    src, out = packed_script
    readable = run_py(src, tmp_path, {"LEARNING_RATE": "0.75"}).splitlines()
    packed = run_py(out, tmp_path, {"LEARNING_RATE": "0.75"}).splitlines()
    assert readable[:-2] == packed[:-2]  # everything but __file__ and its bytes
    assert "name __main__" in packed and "keys ['blocks', 'tok_emb']" in packed
    assert packed[-2] == f"file {out.resolve()}"
    data = out.read_bytes()
    assert packed[-1] == f"code {len(data)} {hashlib.sha256(data).hexdigest()}"
    assert readable[-2] == f"file {src.resolve()}"


def test_packed_imports_as_module(packed_script):
    _, out = packed_script
    spec = importlib.util.spec_from_file_location("packed_module", out)
    module = importlib.util.module_from_spec(spec)
    sys.modules["packed_module"] = module  # as `import` does; dataclasses look the module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["packed_module"]
    assert module.__name__ == "packed_module" and module.__file__ == str(out)
    assert module.Settings().learning_rate == 0.25  # dataclass fields intact
    assert module.weighted_total([1.0, 2.0], scale=3.0) == 9.0  # keyword names intact
    assert module.Model.__module__ == "packed_module"
    assert inspect.getsource(module.weighted_total).startswith("def weighted_total(")  # via linecache


def test_packed_runs_under_torchrun(packed_script, tmp_path):
    _, out = packed_script
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # Each rank's stdout goes to its own file: two ranks sharing one pipe interleave mid-line.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--log-dir", str(tmp_path / "ranks"), "--redirects", "1", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [p.read_text() for p in sorted((tmp_path / "ranks").rglob("stdout.log"))]
    assert len(outputs) == 2
    for text in outputs:
        assert "name __main__" in text.splitlines()
        assert f"file {out.resolve()}" in text.splitlines()


def test_packing_is_deterministic(packed_script, tmp_path):
    src, out = packed_script
    for seed in ("1", "2"):
        again = tmp_path / f"again{seed}.py"
        subprocess.run([sys.executable, str(ROOT / "pack.py"), "--src", str(src), "--out", str(again)],
                       cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": seed}, check=True, capture_output=True)
        assert again.read_bytes() == out.read_bytes()


def test_base85_is_ascii_and_runs(packed_script, tmp_path):
    src, _ = packed_script
    out = tmp_path / "b85.py"
    assert pack.main(["--src", str(src), "--out", str(out), "--encoding", "base85"]) == 0
    data = out.read_bytes()
    assert data.isascii()
    assert pack.unpack(data) == pack.minify_source(SCRIPT).encode()
    assert run_py(out, tmp_path).splitlines()[:-2] == run_py(src, tmp_path).splitlines()[:-2]


def test_minifier_keeps_interface():
    source = textwrap.dedent('''\
        import os
        TABLE = {"alpha": 1}
        class Block:
            scale_factor = 2
            def forward(self, input_ids, *, target_ids=None):
                hidden_state = input_ids * self.scale_factor
                return hidden_state if target_ids is None else hidden_state - target_ids
        def helper(long_argument_name, **extra_options):
            intermediate_value = long_argument_name + len(extra_options)
            print(f"{intermediate_value=}")
            return intermediate_value, os.environ.get("SOME_SETTING")
        ''')
    minified = pack.minify_source(source)
    pack.check_interface(source, minified)
    scope_a, scope_b = {}, {}
    exec(source, scope_a)
    exec(minified, scope_b)
    assert scope_a["helper"](long_argument_name=3, x=1) == scope_b["helper"](long_argument_name=3, x=1)
    assert scope_b["Block"]().forward(2, target_ids=1) == 3
    with pytest.raises(pack.PackError, match="module names"):
        pack.check_interface(source, source.replace("TABLE", "T"))
    with pytest.raises(pack.PackError, match="attributes"):
        pack.check_interface(source, source.replace("self.scale_factor", "self.s"))


def test_pack_cli_reports_sizes_and_budget(packed_script, tmp_path, capsys):
    src, _ = packed_script
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.txt").write_text("Serialized model quantized+brotli: 15000000 bytes\n")
    (logs / "b.txt").write_text("x\nSerialized model quantized+lzma: 15999900 bytes\nSerialized model: 9 bytes\n")
    out = tmp_path / "p.py"
    assert pack.main(["--src", str(src), "--out", str(out), "--logs", str(logs)]) == 3  # 15,999,900 + code
    text = capsys.readouterr().out
    for word in ("raw", "minified", "lzma", "wrapped", "over the raw stream", "OVER BUDGET", "b.txt"):
        assert word in text
    blob = tmp_path / "model.ptz"
    blob.write_bytes(b"\0" * 1000)
    assert pack.main(["--src", str(src), "--out", str(out), "--artifact", str(blob)]) == 0
    assert "margin" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# escaping
# -----------------------------------------------------------------------------

TRICKY = [
    b"", bytes(range(256)), bytes(range(255, -1, -1)) * 2,
    b"\x000\x001\x007\x008\x009\x00\x00", b"\x00", b"a\x00",
    b"\r\n", b"\r", b"\n\r", b"a\r\rb\r", b"\r\r\n\n",
    b"\\", b"\\\\\\", b"ends with a backslash\\", b"\\0", b"\\\n", b"\\x00", b"\\N{DASH}",
    b'"', b'""', b'"""', b'""""""""', b'ends with a quote"', b'a""', b'"start', b'\\"', b'"\\""', b'x"""y""""z',
    b"'''", b"#", b"\x0c\x1a\x85\xa0\xff",
]


@pytest.mark.parametrize("payload", TRICKY + [random.Random(s).randbytes(50_000) for s in range(3)],
                         ids=lambda p: repr(p[:12]))
def test_latin1_literal_carries_bytes(payload):
    body = pack.escape_latin1(payload)
    assert b"\x00" not in body and b"\r" not in body
    assert latin1_literal_value(body) == payload


def test_wrapper_carries_raw_payloads():
    dec = {"id": lzma.FILTER_LZMA2, "dict_size": 4096, "lc": 3, "lp": 0, "pb": 0}
    for payload in TRICKY + [random.Random(7).randbytes(20_000)]:
        for encoding in ("latin1", "base85"):
            stream, filters = pack.unwrap(pack.wrap(payload, dec, encoding))
            assert stream == payload and filters == [dec]


def test_wrapper_through_lzma():
    rng = random.Random(3)
    for n in (0, 1, 100, 5000):
        # text that makes LZMA emit plenty of every byte value
        data = bytes(rng.choice(b'\x00\r\n\\"ab0') for _ in range(n)) + rng.randbytes(n)
        stream, enc = pack.compress(data)
        for encoding in ("latin1", "base85"):
            assert pack.unpack(pack.wrap(stream, pack.decoder_filter(enc), encoding)) == data


def test_overhead_within_five_percent():
    stream = random.Random(11).randbytes(40_000)  # incompressible: worst case for escapes
    dec = {"id": lzma.FILTER_LZMA2, "dict_size": 65536, "lc": 3, "lp": 0, "pb": 0}
    wrapped = pack.wrap(stream, dec)
    assert (len(wrapped) - len(stream)) / len(stream) <= 0.05
    assert len(pack.wrap(stream, dec, "base85")) > 1.2 * len(stream)


# -----------------------------------------------------------------------------
# record builder
# -----------------------------------------------------------------------------

HPARAMS = dict(DATA_DIR="./data/", DATA_PATH="./data/datasets/fineweb10B_sp8192", RUN_ID="r", SEED="1",
               ITERATIONS="20000", MATRIX_LR="0.022", QUANTIZED_MODEL_PATH="final_model.int6.ptz", TTT_ENABLED="True")


def make_log(path: Path, seed: int, code: bytes, loss: float, *, ratio: float = 0.3855, model: int = 15_973_106,
             over: bool = False, drop: str | None = None, **hparams) -> Path:
    """A log in train_gpt.py's format; `loss` is the final (TTT) val_loss."""
    hp = dict(HPARAMS, SEED=str(seed), RUN_ID=f"run{seed}", **hparams)
    total = model + len(code)
    lines = [f"code_bytes:{len(code)}", f"code_sha256:{hashlib.sha256(code).hexdigest()}",
             "hardware: device:cuda gpu:NVIDIA H100 80GB HBM3 world_size:8 cpus:208",
             "versions: python:3.11.7 torch:2.13.0 numpy:2.4.6 cuda:12.8"]
    lines += [f"hparam:{k}={v}" for k, v in hp.items()]
    lines += ["model_params:36486278", "0/20000 val_loss: 9.0109 val_bpb: 3.4737",
              "500/20000 train_loss: 3.1234 train_time: 1.2m tok/s: 7912345", "an unknown line",
              "4000/20000 val_loss: 2.9000 val_bpb: 1.1200",
              "stopping_early: wallclock_cap train_time:588000ms step:4393/20000",
              "train_done steps:4393 train_time:588012ms",
              f"pre-quantization post-ema val_loss:{loss + 0.018:.8f} val_bpb:{(loss + 0.018) * ratio:.8f} eval_time:24012ms",
              "Serialized model: 140000000 bytes (final_model.pt, EMA weights)",
              f"Serialized model quantized+brotli: {model} bytes",
              f"Total submission size quantized+brotli: {total} bytes",
              f"quantized val_loss:{loss + 0.045:.8f} val_bpb:{(loss + 0.045) * ratio:.8f} eval_time:24001ms",
              f"quantized_sliding_window val_loss:{loss + 0.008:.8f} val_bpb:{(loss + 0.008) * ratio:.8f} eval_time:120001ms",
              f"quantized_ttt val_loss:{loss:.8f} val_bpb:{loss * ratio:.8f} eval_time:336001ms"]
    if over:
        lines.append(f"OVER BUDGET by {total - 16_000_000} bytes: total {total} > limit 16000000")
    if drop:
        lines = [l for l in lines if not l.startswith(drop)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def record_setup(packed_script, tmp_path):
    src, out = packed_script
    code = out.read_bytes()
    losses = {42: 2.7871, 314: 2.7859, 999: 2.7866}
    logs = [make_log(tmp_path / f"seed{s}.txt", s, code, l) for s, l in losses.items()]
    return src, out, code, losses, logs


def test_record_folder_and_statistics(record_setup, tmp_path):
    src, out, code, losses, logs = record_setup
    baseline_loss = 2.7962
    rc = record.main(["--record", "TestRecord", "--logs", *map(str, logs), "--src", str(src), "--out", str(out),
                    "--out-dir", str(tmp_path / "records"), "--date", "2025-01-02",
                    "--baseline-loss", str(baseline_loss)])
    assert rc == 0
    folder = tmp_path / "records" / "2025-01-02_TestRecord"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["README.md", "submission.json", "train_gpt.py", "train_gpt_readable.py",
                            "train_seed42.log", "train_seed314.log", "train_seed999.log"]
                           + (["requirements.txt"] if (ROOT / "requirements.txt").exists() else []))
    assert (folder / "train_gpt.py").read_bytes() == code
    assert (folder / "train_gpt_readable.py").read_bytes() == src.read_bytes()
    s = json.loads((folder / "submission.json").read_text())
    vals = [losses[k] for k in sorted(losses)]
    assert s["seeds"] == [42, 314, 999] and s["final_stage"] == "quantized_ttt" and s["n_seeds"] == 3
    assert s["val_loss"] == pytest.approx(statistics.mean(vals), abs=1e-12)
    assert s["val_loss_std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
    assert s["val_bpb"] == pytest.approx(statistics.mean(round(v * 0.3855, 8) for v in vals), abs=1e-12)
    assert "H100" in s["hardware"] and s["bytes_code"] == len(code)
    run = s["runs"][0]
    assert run["seed"] == 42 and run["steps"] == 4393 and run["train_time_ms"] == 588012
    assert run["model_bytes"] == 15_973_106 and run["total_bytes"] == 15_973_106 + len(code)
    assert run["stages"]["pre_quant_post_ema"]["val_loss"] == pytest.approx(2.8051)
    assert run["eval_time_ms"]["quantized_ttt"] == 336001 and run["eval_time_quantized_total_ms"] == 480003
    sig = s["significance"]
    from scipy import stats

    target = baseline_loss - 0.005
    t = stats.ttest_1samp(vals, target, alternative="less")
    assert sig["df"] == 2 and sig["target_loss"] == pytest.approx(target)
    assert sig["t_test"]["statistic"] == pytest.approx(t.statistic, rel=1e-9)
    assert sig["t_test"]["p_value"] == pytest.approx(t.pvalue, rel=1e-9)
    z = (statistics.mean(vals) - target) / (statistics.stdev(vals) / math.sqrt(3))
    assert sig["z_test"]["p_value"] == pytest.approx(stats.norm.cdf(z), rel=1e-9)
    assert "t-test" in sig["t_test"]["name"] and "z-test" in sig["z_test"]["name"]
    assert sig["significant"] == (t.pvalue < 0.01)
    readme = (folder / "README.md").read_text()
    assert "TestRecord" in readme and "| 42 |" in readme and "H100" in readme and "quantized_ttt" in readme


def test_summary_converts_bpb_baseline(record_setup, tmp_path):
    *_, losses, logs = record_setup
    out = tmp_path / "submission.json"
    assert record.main(["--summary", *map(str, logs), "--out-json", str(out), "--baseline-bpb", "1.07882"]) == 0
    s = json.loads(out.read_text())
    sig = s["significance"]
    assert sig["bpb_per_nat"] == pytest.approx(0.3855, rel=1e-6)
    assert sig["baseline_loss"] == pytest.approx(1.07882 / 0.3855, rel=1e-6)
    assert "H100" in s["hardware"]


def test_single_log_has_no_std(record_setup, tmp_path):
    *_, logs = record_setup
    s = record.summarize([logformat.parse_log(logs[0])], 1.07882)
    assert s["val_loss_std"] is None and s["significance"]["t_test"]["p_value"] is None
    assert "one run" in s["significance"]["note"]


@pytest.mark.parametrize("change, message", [
    (dict(code=b"other code"), "code_sha256 differs"),
    (dict(MATRIX_LR="0.03"), "MATRIX_LR differs"),
    (dict(seed=42), "SEED=42 appears twice"),
    (dict(over=True), "OVER BUDGET"),
    (dict(model=15_999_990), "16000000"),
    (dict(drop="quantized val_loss"), "missing the final result lines"),
    (dict(drop="Total submission"), "missing the final result lines"),
])
def test_builder_refuses(record_setup, tmp_path, capsys, change, message):
    src, out, code, _, logs = record_setup
    args = dict(seed=7, code=code, loss=2.787)
    args.update(change)
    bad = make_log(tmp_path / "bad.txt", args.pop("seed"), args.pop("code"), args.pop("loss"), **args)
    rc = record.main(["--record", "X", "--logs", str(logs[0]), str(bad), "--src", str(src), "--out", str(out),
                    "--out-dir", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert rc == 1 and message in err, err
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())


def test_builder_accepts_path_differences(record_setup, tmp_path):
    *_, code, _, logs = record_setup
    other = make_log(tmp_path / "other.txt", 5, code, 2.7868, DATA_DIR="/elsewhere/")
    s = record.summarize([logformat.parse_log(p) for p in (*logs, other)])
    assert s["n_seeds"] == 4


def test_builder_refuses_code_that_did_not_run(record_setup, tmp_path, capsys):
    src, _, _, _, _ = record_setup
    logs = [make_log(tmp_path / f"s{s}.txt", s, b"some other file", 2.78) for s in (1, 2)]
    rc = record.main(["--record", "X", "--logs", *map(str, logs), "--src", str(src),
                    "--out", str(tmp_path / "missing.py"), "--out-dir", str(tmp_path / "records")])
    assert rc == 1 and "no file matches the logs' code_sha256" in capsys.readouterr().err


def test_builder_ships_the_readable_file_when_it_ran(record_setup, tmp_path):
    src, out, _, _, _ = record_setup
    logs = [make_log(tmp_path / f"s{s}.txt", s, src.read_bytes(), 2.78 + s / 1000) for s in (1, 2)]
    folder = record.build_record("Readable", logs, src, out, tmp_path / "records", "2025-01-01", 1.07882, None)
    assert (folder / "train_gpt.py").read_bytes() == src.read_bytes()
    assert not (folder / "train_gpt_readable.py").exists()


def test_log_with_two_runs_is_refused(record_setup, tmp_path):
    *_, logs = record_setup
    twice = tmp_path / "twice.txt"
    twice.write_text(logs[0].read_text() * 2)
    with pytest.raises(logformat.LogError, match="holds 2 runs"):
        logformat.parse_log(twice)


# -----------------------------------------------------------------------------
# the real train_gpt.py
# -----------------------------------------------------------------------------

TRAIN_GPT = ROOT / "train_gpt.py"
needs_train_gpt = pytest.mark.skipif(not TRAIN_GPT.exists(), reason="train_gpt.py does not exist yet")


def comparable(log: str) -> list[str]:
    """Loss and size lines without the timing fields."""
    keep = re.compile(r"(\d+/\d+ (train|val)_loss|weights_checksum|pre-quantization|quantized|Serialized model quantized)")
    out = []
    for line in log.splitlines():
        if keep.match(line):
            out.append(re.sub(r" (train_time|tok/s|eval_time):\s*\S+", "", line))
    return out


@needs_train_gpt
def test_real_script_packs_within_overhead():
    result = pack.pack_source(TRAIN_GPT.read_bytes())
    assert result.overhead <= 0.05
    assert len(result.wrapped) < len(result.raw) // 3


@needs_train_gpt
def test_packed_training_matches_readable(quick_run, tmp_path):
    packed = tmp_path / "build" / "train_gpt.py"
    assert pack.main(["--src", str(TRAIN_GPT), "--out", str(packed), "--logs", str(tmp_path / "none")]) == 0
    # The packed file runs the settings of the shared quick run of the readable one: one thread, the
    # sliding-window and TTT evaluations off (they exercise nothing the packing could change).
    env = dict(quick_run["env"], QUANTIZED_MODEL_PATH=str(tmp_path / "packed" / "final_model.int6.ptz"))
    (tmp_path / "packed").mkdir()
    run_script(env, tmp_path / "packed", script=packed)
    readable_log, packed_log = quick_run["log"], read_log(tmp_path / "packed", env["RUN_ID"])
    a, b = comparable(readable_log), comparable(packed_log)
    assert any("quantized val_loss" in line for line in b) and len(a) > 5
    assert a == b
    data = packed.read_bytes()
    assert f"code_bytes:{len(data)}" in packed_log.splitlines()
    assert f"code_sha256:{hashlib.sha256(data).hexdigest()}" in packed_log.splitlines()
    stated = logformat.scan_log(packed_log)
    assert stated["compressor"] == env["COMPRESSOR"]
    assert stated["total_bytes"] == stated["model_bytes"] + len(data)
    # the builder finds the packed file by the hash the run logged
    folder = record.build_record("tiny", [tmp_path / "packed" / "logs" / f"{env['RUN_ID']}.txt"], TRAIN_GPT, packed,
                               tmp_path / "records", "2025-01-01", 1.07882, None)
    s = json.loads((folder / "submission.json").read_text())
    assert s["bytes_code"] == len(data) and s["hardware"].startswith("device:cpu")
    assert (folder / "train_gpt.py").read_bytes() == data



def test_baseline_none_skips_the_significance_test(record_setup, tmp_path):
    """Logs of another data set (a CPU benchmark) cannot be tested against the record's bpb."""
    *_, logs = record_setup
    out = tmp_path / "s.json"
    assert record.main(["--summary", *map(str, logs), "--out-json", str(out), "--baseline-bpb", "none"]) == 0
    sig = json.loads(out.read_text())["significance"]
    assert sig["note"] == "no baseline given"
    assert "t_test" not in sig and "baseline_bpb" not in sig


@pytest.mark.parametrize("name", ["cpu_small_seed1", "cpu_small_smearmask_seed2"])
def test_parse_log_reads_a_real_log_as_bench_recorded_it(name):
    """A committed CPU benchmark log gives back the figures bench.py stored next to it."""
    log = logformat.parse_log(ROOT / "logs" / f"{name}.txt")
    stored = json.loads((ROOT / "logs" / f"{name}.json").read_text())
    assert log["stages"] == stored["stages"] and log["final_stage"] == "quantized_ttt"
    for key in ("model_bytes", "code_bytes", "total_bytes", "steps", "train_time_ms", "tokens_per_second",
                "model_params", "hardware", "versions"):
        assert log[key] == stored[key], key
    assert log["total_bytes"] == log["model_bytes"] + log["code_bytes"] <= logformat.SIZE_LIMIT_BYTES


def test_logformat_reads_the_lines_train_gpt_writes():
    """The size and checksum lines as train_gpt's own writers print them, in their exact text, read
    back by logformat: a format change on either side fails here."""
    import train_gpt
    from conftest import tiny_hparams

    lines = []
    assert train_gpt.log_artifact_size(lines.append, "brotli", 15_973_106, 26_894) == 16_000_000
    assert lines == ["Serialized model quantized+brotli: 15973106 bytes",
                     "Total submission size quantized+brotli: 16000000 bytes"]
    h = tiny_hparams()
    train_gpt.log_weights_checksum(train_gpt.GPT(h), train_gpt.Runtime(h, environ={}), lines.append)
    checksum = re.fullmatch(r"weights_checksum:([0-9a-f]{14}) ranks:\1 ranks_agree:1", lines[-1])
    assert checksum, lines[-1]
    stated = logformat.scan_log("\n".join(lines))
    assert (stated["compressor"], stated["model_bytes"], stated["total_bytes"]) == ("brotli", 15_973_106, 16_000_000)
    assert (stated["weights_checksum"], stated["rank_checksums"], stated["ranks_agree"]) == \
        (checksum.group(1), [checksum.group(1)], True)
    assert logformat.scan_log("weights_checksum:0a ranks:0a,0b ranks_agree:0")["ranks_agree"] is False


def test_lines_of_gives_every_line_of_a_kind_in_order(tmp_path):
    text = make_log(tmp_path / "run.txt", 1, b"code", 2.8).read_text()
    assert [m.group(1, 3, 4) for m in logformat.lines_of(text, "val")] == [("0", "9.0109", "3.4737"),
                                                                          ("4000", "2.9000", "1.1200")]
    assert [m.group(1, 2, 3) for m in logformat.lines_of(text, "train_loss")] == [("500", "20000", "3.1234")]
    assert [m.group(1) for m in logformat.lines_of(text, "stage")] == list(logformat.STAGES)
    assert logformat.lines_of(text, "weights_checksum") == []


def test_bench_record_names_no_machine_folder_and_says_when_dirty(tmp_path, monkeypatch):
    import argparse

    import bench

    monkeypatch.setattr(bench, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(bench, "git_state", lambda: {"git_commit": "0" * 40, "git_dirty": True})
    log = logformat.parse_log(make_log(tmp_path / "run.txt", 1, b"code", 2.8))
    env = {"DATA_DIR": str(tmp_path / "data_pydocs"), "SEED": "1",
           "QUANTIZED_MODEL_PATH": str(tmp_path / "repo" / "build" / "bench" / "x" / "final_model.int6.ptz")}
    args = argparse.Namespace(name="x", preset="presets/cpu_small.env", data="../data_pydocs", set=["SEED=1"])
    result = bench.benchmark_record(args, env, log, 12.34)
    assert result["settings"] == {"DATA_DIR": "../data_pydocs", "SEED": "1",
                                  "QUANTIZED_MODEL_PATH": "build/bench/x/final_model.int6.ptz"}
    assert result["git_commit"] == "0" * 40 and result["git_dirty"] is True
    assert result["stages"] == log["stages"] and result["tokens_per_second"] == 7912345


def test_bench_record_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A benchmark interrupted while writing (here: a full disk at the rename) keeps the committed
    record it would have replaced, names the file, and leaves no temporary file beside it."""
    import bench
    import train_gpt

    path = tmp_path / "cpu_small_seed1.json"
    path.write_text("the committed record\n")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_gpt.os, "replace", full_disk)
    with pytest.raises(OSError, match="cpu_small_seed1.json"):
        bench.write_record(path, "a new record\n")
    assert path.read_text() == "the committed record\n"
    assert sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("name", ["../submission", "victim_abs", ".hidden", "a/b", ""])
def test_bench_quant_name_never_writes_outside_the_logs(name, tmp_path, monkeypatch):
    """bench.py quant writes logs/NAME.{txt,json}: NAME=../submission would replace the checkout's
    submission.json, an absolute NAME any file. It is refused before anything is read or run."""
    import bench

    root = tmp_path / "checkout"
    (root / "logs").mkdir(parents=True)
    (root / "submission.json").write_text("the submission\n")
    monkeypatch.setattr(bench, "ROOT", root)
    name = str(tmp_path / "victim") if name == "victim_abs" else name
    with pytest.raises(SystemExit, match="NAME .* is not a plain name"):
        bench.main(["quant", name, "--model", str(tmp_path / "final_model.pt"), "--log", str(tmp_path / "run.txt"),
                    "--preset", str(tmp_path / "preset.env"), "--data", str(tmp_path)])
    assert (root / "submission.json").read_text() == "the submission\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["submission.json"]


def test_bench_memory_estimate_is_printed_and_written_to_out(tmp_path, monkeypatch, capsys, one_thread):
    """bench.py memory on the tiny model (read from the environment, as the full-config estimate
    reads the defaults): the record it prints is the one --out writes, through the atomic writer,
    and its figures are saved_activations' own: bf16 and fp32 activations under the emulated CUDA
    policy, the model's parameter bytes with bf16 embeddings as built for CUDA."""
    import bench
    import train_gpt
    from conftest import TINY_MODEL

    for key, value in TINY_MODEL.items():
        monkeypatch.setenv(key, value)
    estimates, writes = [], []  # what run_memory's own saved_activations returned; what it wrote
    saved_activations, write_record = bench.saved_activations, bench.write_record

    def recorded_estimate(h, rows):
        estimates.append(saved_activations(h, rows))
        return estimates[-1]

    def recorded_write(path, text):
        writes.append(path)
        write_record(path, text)

    monkeypatch.setattr(bench, "saved_activations", recorded_estimate)
    monkeypatch.setattr(bench, "write_record", recorded_write)
    out = tmp_path / "records" / "memory.json"
    assert bench.main(["memory", "--rows", "2", "--seq-len", "32", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written and writes == [out]
    assert set(written) == {"command", "torch", "micro_batch", "saved_activation_bytes", "saved_activation_gib",
                            "saved_tensors", "saved_gib_by_dtype", "saved_weight_copies_gib", "static_gib",
                            "static_parts_mib", "record_peak_gib_per_gpu", "unprobed_ops", "seconds"}
    assert written["command"] == f"python bench.py memory --rows 2 --seq-len 32 --out {out}"
    assert written["micro_batch"] == "2 x 32 tokens per rank, looping on"
    (est,) = estimates
    assert written["saved_activation_bytes"] == est["saved_bytes"] == sum(est["saved_by_dtype"].values()) > 0
    assert est["saved_by_dtype"]["bfloat16"] > 0 and est["saved_by_dtype"]["float32"] > 0
    assert written["saved_tensors"] == est["saved_tensors"] > 0 and est["saved_weight_copy_bytes"] > 0
    model = train_gpt.GPT(train_gpt.Hyperparameters.from_env())
    embeddings = {"tok_emb.weight", "bigram.embed.weight"}
    assert est["parameter_bytes"] == {
        "bfloat16": sum(2 * p.numel() for n, p in model.named_parameters() if n in embeddings),
        "float32": sum(4 * p.numel() for n, p in model.named_parameters() if n not in embeddings)}
    assert set(written["static_parts_mib"]) == {"weights", "gradients", "adamw_moments", "muon_momentum", "ema"}
