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
from conftest import read_log, run_script, tiny_run_env  # noqa: E402

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
    assert pack.main(["--src", str(src), "--out", str(out), "--logs", str(d / "no_logs"), "--every-switch"]) == 0
    return src, out


def test_payload_round_trip(packed_script):
    src, out = packed_script
    wrapped = out.read_bytes()
    assert pack.unpack(wrapped) == pack.minify_source(SCRIPT).encode("utf-8")
    compile(wrapped, str(out), "exec")
    minified = pack.unpack(wrapped).decode()
    assert '"""A small script' not in minified and "Fields come from" not in minified
    assert "running_total" not in minified  # locals renamed
    for kept in ("tok_emb", "blocks", "learning_rate:float", "LEARNING_RATE", "scale"):
        assert kept in minified
    assert "weighted_total" not in minified and "Settings" not in minified  # module-level names renamed


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


def test_packed_imports_as_module_with_keep_names(packed_script, tmp_path):
    src, _ = packed_script
    out = tmp_path / "named.py"
    assert pack.main(["--src", str(src), "--out", str(out), "--every-switch", "--keep-names"]) == 0
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
        subprocess.run([sys.executable, str(ROOT / "pack.py"), "--src", str(src), "--out", str(again), "--every-switch"],
                       cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": seed}, check=True, capture_output=True)
        assert again.read_bytes() == out.read_bytes()


def test_base85_is_ascii_and_runs(packed_script, tmp_path):
    src, _ = packed_script
    out = tmp_path / "b85.py"
    assert pack.main(["--src", str(src), "--out", str(out), "--encoding", "base85", "--every-switch"]) == 0
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
    pack.check_interface(source, minified, globals_renamed=True)
    assert "TABLE" not in minified and "helper" not in minified  # module-level names renamed
    pack.check_interface(source, pack.minify_source(source, keep_names=True))
    with pytest.raises(pack.PackError, match="module names"):  # a kept global may not change
        pack.check_interface("PINNED = {}\n", "P = {}\n", globals_renamed=True)
    scope_a, scope_b = {}, {}
    exec(source, scope_a)
    exec(minified, scope_b)
    # Renamed, the functions are found by what they are: the one taking long_argument_name, the class.
    helper_b = next(v for v in scope_b.values() if callable(v) and "long_argument_name" in getattr(
        getattr(v, "__code__", None), "co_varnames", ()))
    block_b = next(v for v in scope_b.values() if isinstance(v, type) and hasattr(v, "forward"))
    assert scope_a["helper"](long_argument_name=3, x=1) == helper_b(long_argument_name=3, x=1)
    assert block_b().forward(2, target_ids=1) == 3
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
    assert pack.main(["--src", str(src), "--out", str(out), "--logs", str(logs), "--every-switch"]) == 3  # 15,999,900 + code
    text = capsys.readouterr().out
    for word in ("source", "minified", "brotli", "wrapped", "over the stream", "OVER BUDGET", "b.txt"):
        assert word in text
    blob = tmp_path / "model.ptz"
    blob.write_bytes(b"\0" * 1000)
    assert pack.main(["--src", str(src), "--out", str(out), "--artifact", str(blob), "--every-switch"]) == 0
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
    lzma_filter = {"id": lzma.FILTER_LZMA2, "dict_size": 4096, "lc": 3, "lp": 0, "pb": 0}
    for payload in TRICKY + [random.Random(7).randbytes(20_000)]:
        for dec in (lzma_filter, None):  # None: a brotli stream
            for encoding in ("latin1", "base85"):
                stream, filters = pack.unwrap(pack.wrap(payload, dec, encoding))
                assert stream == payload and filters == ([dec] if dec else None)


@pytest.mark.parametrize("codec", pack.CODECS)
def test_wrapper_through_each_codec(codec):
    rng = random.Random(3)
    for n in (0, 1, 100, 5000):
        # text that makes the codec emit plenty of every byte value
        data = bytes(rng.choice(b'\x00\r\n\\"ab0') for _ in range(n)) + rng.randbytes(n)
        stream, enc = pack.compress(data, codec)
        for encoding in ("latin1", "base85"):
            wrapped = pack.wrap(stream, None if codec == "brotli" else pack.decoder_filter(enc), encoding)
            assert pack.unpack(wrapped) == data
            assert f"import {'base64,' if encoding == 'base85' else ''}{codec},linecache".encode() in wrapped


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


# -----------------------------------------------------------------------------
# the packed file of the record's defaults: specialised, and still the record's run
# -----------------------------------------------------------------------------

# Lines that carry the file's own size or hash; each is checked against the file instead.
CODE_LINES = ("code_bytes:", "code_sha256:", "projected_artifact_bytes:", "Total submission size")
TIMINGS = re.compile(r"((?:train_time|tok/s|eval_time|elapsed|eta|train_plus_calibration_time):\s*)[\d.]+(ms|m|s)?"
                     r"| in \d+ms")


def comparable_lines(log: str) -> list[str]:
    """Every line of a log but the code-size lines, with the wall-clock figures masked."""
    return [TIMINGS.sub(lambda m: (m.group(1) or " in ") + "T", line) for line in log.splitlines()
            if not line.startswith(CODE_LINES)]


def check_code_lines(log: str, packed: Path) -> None:
    data, lines = packed.read_bytes(), log.splitlines()
    assert f"code_bytes:{len(data)}" in lines and f"code_sha256:{hashlib.sha256(data).hexdigest()}" in lines
    stated = logformat.scan_log(log)
    assert stated["total_bytes"] == stated["model_bytes"] + len(data)
    assert re.search(rf"^projected_artifact_bytes:\d+ \(model \d+ \+ code {len(data)};", log, re.M)


@pytest.fixture(scope="module")
def default_pack(tmp_path_factory) -> Path:
    """`python pack.py`: the record's defaults."""
    out = tmp_path_factory.mktemp("default_pack") / "build" / "train_gpt.py"
    assert pack.main(["--src", str(TRAIN_GPT), "--out", str(out), "--logs", str(out.parent / "none")]) == 0
    return out


def record_default_env(tiny_data, **changes) -> dict:
    """The tiny run with the record's compressor (the default pack pins COMPRESSOR=brotli) and a
    relative artifact path, so that the two runs' hparam lines are the same text."""
    return tiny_run_env(tiny_data, Path("."), COMPRESSOR="brotli", QUANTIZED_MODEL_PATH="final_model.int6.ptz",
                        **changes)


@needs_train_gpt
def test_default_pack_leaves_out_every_off_switch(default_pack):
    """No code of a switch the record has off is in its packed file: not the Triton kernels, not
    LQER in either form, not SMALL_FP16, not the per-family, per-group or LZMA compressors, not the
    Polar Express schedule, not INIT_STATE (the family and pergroup formats' magics stay: the reader
    names a blob's format when it refuses it)."""
    source = pack.unpack(default_pack.read_bytes()).decode()
    for leak in ("triton", "tl.", "load_kernels", "softcap_ce", "lqer_factors", "lqer_dequantize", "family_codecs",
                 "compress_by_family", "decompress_by_family", "8.156554524902461", "load_init_state",
                 "TRITON_INTERPRET", "lzma.", "import lzma", "load_validation_sidecar", "sidecar_window_bytes",
                 "fineweb_val_[0-9]", "varlen_attention", "packed_cu_seqlens", "DocumentPackedLoader", "searchsorted",
                 "flash_attn_varlen_func", "concurrent", "lqer_asym", "lqer_correction", "small_fp16_category",
                 "lrzip", "l1_row_order", "compress_by_group", "decompress_by_group", "PERGROUP_STREAMS"):
        assert leak not in source, leak
    preset, pins = pack.packed_for(source.encode())
    assert preset == pack.RECORD_DEFAULTS
    assert pins == {"val_byte_sidecar": False, "init_state": "", "gptq_hessian_all_ranks": False, "fused_ce": False,
                    "fused_mlp": False, "bigram_train_embed": False, "smear_mask_bos": False, "varlen": False,
                    "attn_clip_sigmas": None, "mlp_clip_sigmas": None, "lqer_top_k": 0, "lqer_form": "packed",
                    "small_fp16": False, "muon_ns_coeffs": "record", "compressor": "brotli", "smear_pre_norm": False,
                    "sparse_gate_scale": 0.0, "parallel_lanes_start": 0, "muon_bf16_momentum": False,
                    "grad_clip_per_rank": False,
                    "phased_ttt_enabled": False, "phased_ttt_shared_forward": False}
    assert len(default_pack.read_bytes()) < 18_097  # the record's own packed file


@needs_train_gpt
def test_default_pack_is_the_record_run_line_for_line(default_pack, tiny_data, tmp_path):
    """The readable file and the packed one on the same run (training, GPTQ, the artifact, all
    three evaluations): every line but the code's size and hash is the same, numbers included.
    Then EVAL_ONLY with the packed file on its own artifact scores what the run scored, and the
    record builder ships it, saying what it was packed for."""
    env = record_default_env(tiny_data)
    logs = {}
    for name, script in (("readable", TRAIN_GPT), ("packed", default_pack)):
        (tmp_path / name).mkdir()
        run_script(env, tmp_path / name, script=script)
        logs[name] = read_log(tmp_path / name, env["RUN_ID"])
    assert comparable_lines(logs["readable"]) == comparable_lines(logs["packed"])
    assert "quantized_ttt val_loss" in logs["packed"] and "hparam:COMPRESSOR=brotli" in logs["packed"]
    check_code_lines(logs["packed"], default_pack)
    run_script(dict(env, EVAL_ONLY="1", RUN_ID="again"), tmp_path / "packed", script=default_pack)
    again = read_log(tmp_path / "packed", "again")
    stages = [l for l in comparable_lines(logs["packed"]) if l.startswith("quantized")]
    assert len(stages) == 3 and [l for l in comparable_lines(again) if l.startswith("quantized")] == stages
    folder = record.build_record("tiny", [tmp_path / "packed" / "logs" / f"{env['RUN_ID']}.txt"], TRAIN_GPT,
                                 default_pack, tmp_path / "records", "2025-01-01", 1.07882, None)
    s = json.loads((folder / "submission.json").read_text())
    assert s["bytes_code"] == len(default_pack.read_bytes()) and s["hardware"].startswith("device:cpu")
    assert (folder / "train_gpt.py").read_bytes() == default_pack.read_bytes()
    assert s["code_packed_for"] == pack.RECORD_DEFAULTS and s["code_pins"]["compressor"] == "brotli"
    assert pack.RECORD_DEFAULTS in (folder / "README.md").read_text()


@needs_train_gpt
def test_default_pack_is_the_record_run_under_torchrun(default_pack, tiny_data, tmp_path):
    """The same comparison with two ranks (gloo): the split batches, Muon's sharded update, rank 0's
    Hessians, the sliding windows and TTT's averaged gradients all go through the packed code."""
    env = record_default_env(tiny_data, ITERATIONS="4", VAL_LOSS_EVERY="2", TTT_CHUNK_TOKENS="2048")
    logs = {}
    for name, script in (("readable", TRAIN_GPT), ("packed", default_pack)):
        (tmp_path / name).mkdir()
        run_script(env, tmp_path / name, script=script, nproc=2)
        logs[name] = read_log(tmp_path / name, env["RUN_ID"])
    assert "world_size:2" in logs["packed"] and "quantized_ttt val_loss" in logs["packed"]
    assert comparable_lines(logs["readable"]) == comparable_lines(logs["packed"])
    check_code_lines(logs["packed"], default_pack)


@needs_train_gpt
@pytest.mark.parametrize("setting, value", [("FUSED_CE", "1"), ("COMPRESSOR", "lzma"), ("LQER_TOP_K", "2"),
                                            ("INIT_STATE", "final_model.pt")])
def test_default_pack_refuses_a_setting_whose_code_it_left_out(default_pack, tmp_path, setting, value):
    """A pinned setting with another value stops the run at construction, before any data is read
    (DATA_DIR does not exist here), naming the setting and how to get a file that has its code."""
    proc = run_script({"DATA_DIR": str(tmp_path / "no_data"), setting: value, "OMP_NUM_THREADS": "1"}, tmp_path,
                      script=default_pack, check=False)
    assert proc.returncode != 0
    assert re.search(rf"ValueError: {setting}=.*this file was packed \(for {re.escape(pack.RECORD_DEFAULTS)}\) "
                     rf"with {setting}=.* and holds no code for other values", proc.stderr), proc.stderr[-2000:]
    assert "python pack.py --preset" in proc.stderr and "no_data" not in proc.stderr


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
    assert [m.group(1) for m in logformat.lines_of(text, "stage")] == [s for s in logformat.STAGES
                                                                       if s != "quantized_ttt_phased"]
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


@needs_train_gpt
def test_specialised_packing_is_deterministic(default_pack, tmp_path):
    """Specialising walks sets and dicts: the packed bytes must not depend on hash seeds."""
    for seed in ("1", "2"):
        again = tmp_path / f"again{seed}.py"
        subprocess.run([sys.executable, str(ROOT / "pack.py"), "--src", str(TRAIN_GPT), "--out", str(again),
                        "--logs", str(tmp_path / "none")], cwd=tmp_path, env={**os.environ, "PYTHONHASHSEED": seed},
                       check=True, capture_output=True)
        assert again.read_bytes() == default_pack.read_bytes()


SWITCHED = textwrap.dedent('''\
    from __future__ import annotations
    import dataclasses
    import os


    def switch(default):
        return dataclasses.field(default=default, metadata={"switch": True})


    PINNED: dict = {}
    PACKED_FOR = ""


    @dataclasses.dataclass
    class Hyperparameters:
        fast: bool = switch(False)
        width: int = 4

        def __post_init__(self):
            for name, value in PINNED.items():
                if getattr(self, name) != value:
                    raise ValueError(f"{name.upper()}={getattr(self, name)!r}: packed for {PACKED_FOR}")


    HPARAMS = tuple((f.name, {"int": int, "bool": bool}[f.type], f.default)
                    for f in dataclasses.fields(Hyperparameters))


    def env_settings(environ):
        return {n: t(environ[n.upper()]) if t is not bool else environ[n.upper()] == "1" for n, t, _ in HPARAMS
                if n.upper() in environ}


    def misspelt_settings(environ):
        return [f"{k} is not a setting; did you mean {k[:-1]}?" for k in environ if k[:-1] in ("FAST", "WIDTH")]


    def fast_path(h):
        return h.width * 2


    def main():
        h = Hyperparameters(**env_settings(os.environ))
        print(fast_path(h) if h.fast else h.width)


    if __name__ == "__main__":
        main()
    ''')


def test_pack_reads_a_preset_and_refuses_a_bad_one(tmp_path, capsys):
    """A preset is read as the source reads its environment: its own parsing applies, a misspelt
    key is refused with the setting it resembles, and a missing file is named. Packed for it, the
    file runs the preset's code; packed for the defaults, it refuses the switch it left out."""
    src = tmp_path / "switched.py"
    src.write_text(SWITCHED)
    preset = tmp_path / "on.env"
    preset.write_text("# the fast path on\nFAST=1\nWIDTH=3\n")
    on, off = tmp_path / "on.py", tmp_path / "off.py"
    assert pack.main(["--src", str(src), "--out", str(on), "--preset", str(preset), "--logs", str(tmp_path)]) == 0
    assert pack.packed_for(pack.unpack(on.read_bytes())) == (str(preset), {})  # FAST is on: free
    assert run_py(on, tmp_path, {"FAST": "1", "WIDTH": "5"}) == "10\n"
    assert run_py(on, tmp_path, {"WIDTH": "5"}) == "5\n"
    assert pack.main(["--src", str(src), "--out", str(off), "--logs", str(tmp_path)]) == 0  # defaults: FAST off
    assert pack.packed_for(pack.unpack(off.read_bytes())) == (pack.RECORD_DEFAULTS, {"fast": False})
    assert len(off.read_bytes()) < len(on.read_bytes())
    assert run_py(off, tmp_path, {"WIDTH": "5"}) == "5\n"
    proc = subprocess.run([sys.executable, str(off)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "FAST": "1"})
    assert proc.returncode != 0 and f"FAST=True: packed for {pack.RECORD_DEFAULTS}" in proc.stderr
    capsys.readouterr()
    for text, message in (("FASTT=1\n", "FASTT is not a setting; did you mean FAST"),
                          ("WIDTH=wide\n", "invalid literal"), ("FAST\n", "expected KEY=VALUE")):
        preset.write_text(text)
        assert pack.main(["--src", str(src), "--out", str(on), "--preset", str(preset)]) == 1
        err = capsys.readouterr().err
        assert f"--preset {preset}" in err and message in err, err
    assert pack.main(["--src", str(src), "--out", str(on), "--preset", str(tmp_path / "missing.env")]) == 1
    assert "missing.env" in capsys.readouterr().err


def test_pack_measure_prints_what_each_pin_saves(tmp_path, capsys):
    src = tmp_path / "switched.py"
    src.write_text(SWITCHED)
    assert pack.main(["--src", str(src), "--measure"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^specialised to the record's defaults: [\d,]+ B of brotli stream \(every switch: [\d,]+ B, "
                     r"so [\d,]+ B saved\); 1 settings pinned", out, re.M), out
    assert re.search(r"^  FAST=False: [1-9][\d,]* B  \(removes fast_path\)$", out, re.M), out
    assert "codecs on the minified source: brotli" in out and "wrapped lzma latin1" in out
