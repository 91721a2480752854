"""Quantization and the artifact (SPEC §5): GPTQ against a naive reference written here, the
per-tensor categories, quantize/dequantize round trips, the byte-shuffled compressed blob, a blob
atomic writes, and the artifact a tiny CPU run writes and re-reads.
Expected values are computed here from SPEC's description, not with train_gpt's helpers (the
round trip re-runs gptq_quantize_weight only to check which Hessian and settings went in; that
function has its own reference test)."""

from __future__ import annotations

import io
import lzma
import os
import random
import re
from pathlib import Path

import brotli
import pytest
import torch

from conftest import ROOT, TINY_MODEL, read_log, run_main, tiny_hparams

import logformat
import train_gpt

# The record's categories, by the implementation's labels.
GPTQ6, GPTQ8, INT6_ROW = "gptq_int6", "gptq_int8", "int6_row"
INT8_TENSOR, INT8_ROW, FP16 = "int8_tensor", "int8_row", "fp16"
# The method label the record writes into the blob for each (SPEC §5).
LABEL = {GPTQ6: "gptq (int6)", GPTQ8: "gptq (int8)", INT6_ROW: "simple int6 (bigram embed)",
         INT8_ROW: "simple int8 (small matrix)", INT8_TENSOR: "pertensor int8 (control)",
         FP16: "passthrough (float16)"}
BIG_CATEGORIES = {GPTQ6, GPTQ8, INT6_ROW}  # tensors with > 65,536 values
PATH_A_CATEGORIES = {INT8_TENSOR, INT8_ROW, FP16}  # tensors with <= 65,536 values

# SPEC §5, written out name by name.
GLOBAL_TABLE = {
    "tok_emb.weight": GPTQ8,
    "bigram.embed.weight": INT6_ROW,
    "bigram.proj.weight": INT8_ROW,
    "bigram.scale": FP16,
    "smear_gate.weight": INT8_ROW,
    "smear_lambda": FP16,
    "skip_weights": INT8_TENSOR,
    "skip_gates": INT8_TENSOR,
}
LAYER_TABLE = {
    "attn_scale": INT8_TENSOR,
    "mlp_scale": INT8_TENSOR,
    "resid_mix": INT8_TENSOR,
    "attn.c_q.weight": GPTQ6,
    "attn.c_k.weight": GPTQ6,
    "attn.c_v.weight": GPTQ6,
    "attn.proj.weight": GPTQ6,
    "attn.q_gain": FP16,
    "attn.attn_gate_proj.weight": INT8_ROW,
    "mlp.fc.weight": GPTQ6,
    "mlp.proj.weight": GPTQ6,
}


def spec_table(num_layers: int) -> dict[str, str]:
    table = dict(GLOBAL_TABLE)
    for layer in range(num_layers):
        table.update({f"blocks.{layer}.{k}": v for k, v in LAYER_TABLE.items()})
    return table


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Independent references
# -----------------------------------------------------------------------------


def ref_sdclip_scale(w: torch.Tensor, clip_sigmas: float, clip_range: int) -> torch.Tensor:
    """clip_sigmas * std(row) / clip_range, fp16. torch.std is unbiased; the row is the weight as
    given, before dead columns are zeroed."""
    return (clip_sigmas * w.double().std(dim=1) / clip_range).half()


def ref_gptq(w: torch.Tensor, H: torch.Tensor, clip_sigmas: float, clip_range: int):
    """Textbook OBQ/GPTQ in float64, one column at a time, no blocking: quantize column j, spread
    its error over every remaining column through the full inverse Hessian of the remaining
    columns, then remove j from that inverse (rank-one downdate)."""
    W, H = w.double().clone(), H.double().clone()
    rows, cols = W.shape
    scale = ref_sdclip_scale(w, clip_sigmas, clip_range)
    s = scale.double()
    for j in range(cols):
        if H[j, j] == 0:  # a dead input: its weights cannot matter, zero them
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += torch.eye(cols, dtype=H.dtype) * (0.01 * torch.diag(H).mean())
    order = sorted(range(cols), key=lambda j: -H[j, j].item())  # act-order (stable on ties)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros(rows, cols, dtype=torch.int64)
    for j in order:
        q = torch.clamp(torch.round(W[:, j] / s), -clip_range, clip_range)
        Q[:, j] = q.long()
        err = (W[:, j] - q * s) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return Q, scale


def correlated_hessian(cols: int, n: int, seed: int) -> torch.Tensor:
    """X^T X / n of inputs with a shared component and mixed features: far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 2.0 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(n, cols, generator=g) @ mix + 0.5 * torch.randn(n, 1, generator=g)
    return X.T @ X / n


def random_weight(rows: int, cols: int, seed: int, std: float = 0.05) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std


def assert_q_close(q: torch.Tensor, q_ref: torch.Tensor, what: str) -> None:
    """Same integers except rare float ties: at most 0.5% of entries, each off by one."""
    diff = (q.long() - q_ref).abs()
    assert diff.max().item() <= 1, f"{what}: a quantized value is off by {diff.max().item()}"
    frac = (diff > 0).float().mean().item()
    assert frac <= 0.005, f"{what}: {100 * frac:.2f}% of quantized values differ from the reference"


def assert_within_half_step(name: str, t: torch.Tensor, got: torch.Tensor, s: torch.Tensor, R: int) -> None:
    """Round to nearest on the grid s*[-R..R]: within half a step where |t| <= R*s, and exactly
    the grid's end where t lies beyond it (fp16 rounding of a tiny scale can put it there)."""
    s = s.float().expand_as(t)
    clipped = t.abs() > R * s * (1 + 1e-6)
    assert torch.equal(got[clipped], (torch.sign(t) * R * s)[clipped]), f"{name}: clipped values off the grid's end"
    err = (got - t).abs()[~clipped]
    assert (err <= s[~clipped] / 2 * (1 + 1e-5) + 1e-9).all(), f"{name}: error beyond half a step"


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return torch.trace(d @ H.double() @ d.T).item()


# -----------------------------------------------------------------------------
# GPTQ
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("case,clip_sigmas,clip_range", [
    ("correlated", 12.85, 31),   # the matrices' settings
    ("correlated", 20.0, 127),   # the embedding's settings
    ("correlated", 2.5, 31),     # tight clip: the clamp is hit and its error propagated
    ("dead", 12.85, 31),         # dead inputs: zero rows/cols in H
])
def test_gptq_matches_naive_reference(case, clip_sigmas, clip_range):
    rows, cols = 24, 200
    w = random_weight(rows, cols, seed=1)
    w[3, 17] = 0.6  # an outlier
    H = correlated_hessian(cols, 600, seed=2)
    if case == "dead":
        dead = torch.tensor([0, 5, 64, 65, 199])
        H[dead, :] = 0.0
        H[:, dead] = 0.0
    q, scale = train_gpt.gptq_quantize_weight(w, H, clip_sigmas, clip_range, block_size=64)
    q_ref, scale_ref = ref_gptq(w, H, clip_sigmas, clip_range)
    assert q.dtype == torch.int8 and q.shape == (rows, cols)
    assert scale.dtype == torch.float16 and scale.shape == (rows,)
    assert torch.equal(scale, scale_ref), "SDClip scale differs from clip_sigmas*std(row)/clip_range in fp16"
    assert q.abs().max().item() <= clip_range
    assert_q_close(q, q_ref, f"gptq {case} {clip_sigmas}/{clip_range}")
    if case == "dead":
        assert (q[:, dead] == 0).all(), "dead columns must quantize to zero"
    if clip_sigmas == 2.5:
        assert (q.abs() == clip_range).any(), "the tight-clip case should reach the clamp"


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    rows, cols = 32, 160
    w = random_weight(rows, cols, seed=3)
    H = correlated_hessian(cols, 800, seed=4)
    q, scale = train_gpt.gptq_quantize_weight(w, H, 12.85, 31, block_size=64)
    s = scale.float()[:, None]
    rtn = torch.clamp(torch.round(w / s), -31, 31)
    err_gptq = hessian_error(w, q.float() * s, H)
    err_rtn = hessian_error(w, rtn * s, H)
    assert err_gptq < 0.8 * err_rtn, f"GPTQ error {err_gptq:.4g} is not clearly below RTN's {err_rtn:.4g}"


def _ill_conditioned(cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    eig = torch.logspace(-8, 3, cols, dtype=torch.float64)
    return (basis * eig) @ basis.T


def _rank_deficient(cols: int) -> torch.Tensor:
    X = torch.randn(20, cols, generator=torch.Generator().manual_seed(6))
    return X.T @ X / 20


def _dead_and_correlated(cols: int) -> torch.Tensor:
    H = correlated_hessian(cols, 300, seed=7)
    H[::3, :] = 0.0
    H[:, ::3] = 0.0
    return H


@pytest.mark.parametrize("make_h", [_ill_conditioned, _rank_deficient, _dead_and_correlated,
                                    lambda cols: torch.zeros(cols, cols)],
                         ids=["ill_conditioned", "rank_deficient", "dead_columns", "all_zero"])
@pytest.mark.parametrize("clip_sigmas,clip_range", [(12.85, 31), (20.0, 127)])
def test_gptq_survives_degenerate_hessians(make_h, clip_sigmas, clip_range):
    rows, cols = 16, 96
    w = random_weight(rows, cols, seed=8)
    w[5] = 0.0  # an all-zero row: std 0
    H = make_h(cols).float()
    q, scale = train_gpt.gptq_quantize_weight(w, H, clip_sigmas, clip_range, block_size=32)
    assert q.dtype == torch.int8 and q.shape == (rows, cols)
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    assert q.abs().max().item() <= clip_range
    assert (q[5] == 0).all()
    assert torch.isfinite(q.float() * scale.float()[:, None]).all()
    dead = torch.diag(H) == 0
    assert (q[:, dead] == 0).all(), "dead columns must quantize to zero"


# -----------------------------------------------------------------------------
# Categories
# -----------------------------------------------------------------------------


def test_categories_of_the_full_config_follow_spec():
    with torch.device("meta"):
        model = train_gpt.GPT(train_gpt.Hyperparameters())
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 36_486_278
    table = spec_table(11)
    assert set(state) == set(table)
    for name, t in state.items():
        cat = train_gpt.quant_category(name, t)
        assert cat == table[name], f"{name}: {cat}, SPEC says {table[name]}"
        # The record's size rule: > 65,536 values -> GPTQ / int6; the rest -> Path A v3.
        if t.numel() > 65536:
            assert cat in BIG_CATEGORIES, f"{name} ({t.numel()} values) should be GPTQ/int6, is {cat}"
        else:
            assert cat in PATH_A_CATEGORIES, f"{name} ({t.numel()} values) should be Path A, is {cat}"


def test_unknown_big_tensor_is_refused():
    with pytest.raises(ValueError, match="extra.weight"):
        train_gpt.quant_category("extra.weight", torch.empty(300, 300, device="meta"))


# -----------------------------------------------------------------------------
# Round trip of a whole state dict
# -----------------------------------------------------------------------------


def random_tiny_state(seed: int = 0) -> tuple[train_gpt.Hyperparameters, dict]:
    h = tiny_hparams()
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for p in model.parameters():  # bigram.embed and the zero-init layers too
            p.copy_(torch.randn_like(p) * 0.05 + 0.01)
    return h, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_quantize_dequantize_round_trip_per_category():
    h, state = random_tiny_state()
    table = spec_table(h.num_layers)
    hessians = {name: correlated_hessian(t.shape[1], 4 * t.shape[1], seed=i)
                for i, (name, t) in enumerate(state.items()) if table[name] in (GPTQ6, GPTQ8)}
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    out = train_gpt.dequantize_state_dict(w, m)
    assert set(m) == set(state) == set(out)
    seen = set()
    for name, t in state.items():
        cat = table[name]
        seen.add(cat)
        assert m[name] == LABEL[cat]
        got = out[name]
        assert got.dtype == torch.float32 and got.shape == t.shape, name
        if cat == FP16:
            assert w[name].dtype == torch.float16
            assert torch.equal(got, t.half().float()), name
            continue
        q, scale = (w[name + ".q_pt"], w[name + ".scale_pt"]) if cat == INT8_TENSOR else (w[name + ".q"], w[name + ".scale"])
        assert q.dtype == torch.int8 and q.shape == t.shape, name
        if cat in (GPTQ6, GPTQ8):
            sigmas, R = (12.85, 31) if cat == GPTQ6 else (20.0, 127)
            assert scale.dtype == torch.float16 and scale.shape == (t.shape[0],), name
            assert torch.equal(scale, ref_sdclip_scale(t, sigmas, R)), name
            assert q.abs().max().item() <= R, name
            s = scale.float()[:, None]
            assert torch.equal(got, q.float() * s), name
            assert (got.abs() <= R * s).all(), f"{name}: dequantized value beyond the clip bound"
            # the right Hessian and settings went in: the same call on this tensor alone agrees
            # (gptq_quantize_weight itself is checked against ref_gptq above; re-check two here)
            q_alone, _ = train_gpt.gptq_quantize_weight(t, hessians[name], sigmas, R)
            assert torch.equal(q, q_alone), name
            if name in ("tok_emb.weight", "blocks.1.mlp.proj.weight"):
                assert_q_close(q, ref_gptq(t, hessians[name], sigmas, R)[0], name)
        elif cat in (INT6_ROW, INT8_ROW):
            R = 31 if cat == INT6_ROW else 127
            assert scale.dtype == torch.float16 and scale.shape == (t.shape[0],), name
            expected_scale = (t.abs().amax(dim=1) / R).half()
            assert torch.equal(scale, expected_scale), name
            assert q.abs().max().item() <= R, name
            assert_within_half_step(name, t, got, scale[:, None], R)
        else:  # INT8_TENSOR
            assert scale.dtype == torch.float32 and scale.shape == (), name
            assert name + ".q" not in w and name + ".scale" not in w, name
            s = t.abs().max() / 127
            assert torch.allclose(scale.reshape(()), s, rtol=1e-6, atol=0), name
            assert q.abs().max().item() <= 127, name
            assert_within_half_step(name, t, got, scale.reshape(()), 127)
    assert seen == BIG_CATEGORIES | PATH_A_CATEGORIES
    # and the result loads into a model of the same config
    model = train_gpt.GPT(h)
    train_gpt.load_into_model(model, out, "round trip")
    assert torch.equal(model.bigram.embed.weight, out["bigram.embed.weight"])


# -----------------------------------------------------------------------------
# Blob: byte shuffle and compression
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1001])
def test_byte_shuffle_layout_and_round_trip(n):
    data = bytes(random.Random(n).getrandbits(8) for _ in range(n))
    shuffled = train_gpt.byte_shuffle(data)
    assert shuffled == b"BSHF" + bytes([2]) + data[0::2] + data[1::2]
    assert train_gpt.byte_unshuffle(shuffled) == data


def sample_blob_contents():
    g = torch.Generator().manual_seed(0)
    w = {"a.q": torch.randint(-31, 32, (48, 40), generator=g, dtype=torch.int8),
         "a.scale": torch.rand(48, generator=g).half(),
         "b.q": torch.randint(-127, 128, (2, 64), generator=g, dtype=torch.int8),
         "b.scale": torch.tensor(0.013),
         "c": torch.randn(7, generator=g).half()}
    m = {"a": GPTQ6, "b": INT8_TENSOR, "c": FP16}
    return w, m


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_compress_round_trip(compressor):
    w, m = sample_blob_contents()
    blob = train_gpt.compress_blob(w, m, compressor)
    raw = brotli.decompress(blob) if compressor == "brotli" else lzma.decompress(blob)
    assert raw[:5] == b"BSHF\x02"
    w2, m2 = train_gpt.decompress_blob(blob, "sample.ptz")
    assert m2 == m and set(w2) == set(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k]), k


def _corruptions(blob: bytes, compressor: str):
    n = len(blob)
    yield "truncated", blob[: n // 2]
    yield "truncated_tail", blob[:-3]
    for pos in [n // 2] + list(range(n // 4, 3 * n // 4, max(1, n // 80))):  # flips across the middle
        b = bytearray(blob)
        b[pos] ^= 0x5A
        yield f"flipped@{pos}", bytes(b)
    buf = io.BytesIO()
    torch.save(dict(zip(("w", "m"), sample_blob_contents())), buf)
    unshuffled = buf.getvalue()  # a valid stream whose contents lack the BSHF header
    yield "no_header", brotli.compress(unshuffled) if compressor == "brotli" else lzma.compress(unshuffled)
    rng = random.Random(compressor)
    yield "random", bytes(rng.getrandbits(8) for _ in range(2000))
    yield "random_xz_magic", b"\xfd7zXZ\x00" + bytes(rng.getrandbits(8) for _ in range(2000))
    yield "empty", b""


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_corrupt_blobs_raise_a_clear_value_error(compressor):
    """Every corruption raises ValueError naming the file, except a flipped byte that lands in
    zip padding and changes no content. Brotli has no checksum of its own, so a flip in its
    stream decodes to altered bytes: those must still be refused, never loaded as weights."""
    w, m = sample_blob_contents()
    blob = train_gpt.compress_blob(w, m, compressor)
    silent = []
    for kind, bad in _corruptions(blob, compressor):
        source = f"/artifacts/{kind}.ptz"
        try:
            w2, m2 = train_gpt.decompress_blob(bad, source)
        except ValueError as e:
            assert source in str(e), f"{kind}: message does not name the file: {e}"
            if kind == "no_header":
                assert "BSHF" in str(e), e
            continue
        harmless = kind.startswith("flipped@") and kind != f"flipped@{len(blob) // 2}" and m2 == m \
            and set(w2) == set(w) and all(torch.equal(w2[k], w[k]) for k in w)
        if not harmless:
            silent.append(kind)
    assert not silent, f"{compressor}: corrupt blobs loaded without an error: {silent}"


# -----------------------------------------------------------------------------
# atomic_write
# -----------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out" / "model.ptz"
    train_gpt.atomic_write(str(path), b"first")
    train_gpt.atomic_write(str(path), b"second version")
    assert path.read_bytes() == b"second version"
    assert os.listdir(path.parent) == ["model.ptz"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.ptz"
    path.write_bytes(b"old artifact")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        train_gpt.atomic_write(str(path), b"new artifact that never lands")
    monkeypatch.undo()
    assert path.read_bytes() == b"old artifact"
    assert os.listdir(tmp_path) == ["model.ptz"], "a failed write left its temp file behind"


# -----------------------------------------------------------------------------
# End to end: a tiny CPU run writes the artifact, EVAL_ONLY re-reads it
# -----------------------------------------------------------------------------

def stated_once(log: str) -> dict:
    """What the log states (logformat.scan_log), checked to hold each size line and the quantized
    result exactly once."""
    stated = logformat.scan_log(log)
    once = {kind: stated["counts"].get(kind, 0) for kind in ("code_bytes", "serialized", "total")}
    once["quantized"] = [m.group(1) for m in logformat.lines_of(log, "stage")].count("quantized")
    assert set(once.values()) == {1}, f"expected each line once, found {once}"
    return stated


@pytest.fixture
def trained(quick_run):
    """conftest's shared short run: train, GPTQ, write the artifact, evaluate it."""
    return quick_run


def test_run_writes_artifact_and_logs_its_size(trained):
    log, artifact = trained["log"], trained["artifact"]
    assert artifact.is_file() and (trained["cwd"] / "final_model.pt").is_file()
    stated = stated_once(log)
    assert stated["code_bytes"] == (ROOT / "train_gpt.py").stat().st_size
    assert stated["compressor"] == "lzma" and stated["model_bytes"] == artifact.stat().st_size
    assert artifact.read_bytes()[:6] == b"\xfd7zXZ\x00"
    assert stated["total_bytes"] == stated["model_bytes"] + stated["code_bytes"]
    assert "OVER BUDGET" not in log
    # the category table, counted here from SPEC's table on the tiny model
    with torch.device("meta"):
        state = train_gpt.GPT(tiny_hparams()).state_dict()
    table = spec_table(int(TINY_MODEL["NUM_LAYERS"]))
    counts: dict[str, list[int]] = {}
    for name, t in state.items():
        c = counts.setdefault(table[name], [0, 0])
        c[0] += 1
        c[1] += t.numel()
    logged = re.findall(r"^quant_category:(.+) tensors:(\d+) values:(\d+)$", log, re.M)
    assert {cat: [int(a), int(b)] for cat, a, b in logged} == {LABEL[c]: v for c, v in counts.items()}


def test_artifact_is_the_quantized_final_model(trained):
    """The shipped blob quantizes exactly the EMA weights saved in final_model.pt."""
    final = torch.load(trained["cwd"] / "final_model.pt", map_location="cpu", weights_only=True)
    w, m = train_gpt.decompress_blob(trained["artifact"].read_bytes(), "artifact")
    out = train_gpt.dequantize_state_dict(w, m)
    table = spec_table(int(TINY_MODEL["NUM_LAYERS"]))
    assert set(m) == set(final) == set(table)
    for name, t in final.items():
        t = t.float()
        cat = table[name]
        assert m[name] == LABEL[cat]
        if cat == FP16:
            assert torch.equal(out[name], t.half().float()), name
        elif cat in (GPTQ6, GPTQ8):
            sigmas, R = (12.85, 31) if cat == GPTQ6 else (20.0, 127)
            assert torch.equal(w[name + ".scale"], ref_sdclip_scale(t, sigmas, R)), name
            assert w[name + ".q"].abs().max().item() <= R
        elif cat == INT8_TENSOR:
            assert torch.allclose(w[name + ".scale_pt"], t.abs().max() / 127, rtol=1e-6, atol=0), name
            assert_within_half_step(name, t, out[name], w[name + ".scale_pt"], 127)
        else:
            R = 31 if cat == INT6_ROW else 127
            scale, expected = w[name + ".scale"], (t.abs().amax(dim=1) / R).half()
            live = t.abs().amax(dim=1) / R >= 1e-6  # all-zero rows get a floor scale instead
            assert torch.equal(scale[live], expected[live]) and (scale > 0).all(), name
            assert_within_half_step(name, t, out[name], scale[:, None], R)
    # BIGRAM_TRAIN_EMBED is off: the record's bigram.embed never leaves zero
    assert not final["bigram.embed.weight"].any() and not out["bigram.embed.weight"].any()


def test_eval_only_reproduces_the_score_then_enforces_the_budget(trained, tmp_path, monkeypatch, one_thread):
    """EVAL_ONLY=1 on the shipped artifact gives the training run's quantized score; with a
    1,000-byte limit the run still evaluates, then logs OVER BUDGET and exits non-zero."""
    env = dict(trained["env"], RUN_ID="tiny_eval_only", EVAL_ONLY="1", SIZE_LIMIT_BYTES="1000")
    status = run_main(env, monkeypatch, tmp_path)  # in this process, one thread as the training run
    log = read_log(tmp_path, "tiny_eval_only")
    stated = stated_once(log)  # the eval-only run evaluated once
    n = stated["model_bytes"]
    assert stated["compressor"] == "lzma" and n == trained["artifact"].stat().st_size
    q0, q1 = stated_once(trained["log"])["stages"]["quantized"], stated["stages"]["quantized"]
    assert abs(q1["val_loss"] - q0["val_loss"]) <= 1e-6 and abs(q1["val_bpb"] - q0["val_bpb"]) <= 1e-6, \
        f"eval-only {q1} vs training run {q0}"
    assert not list(tmp_path.glob("*.pt")), "EVAL_ONLY must not train or save a model"
    total = stated["total_bytes"]
    assert total == n + (ROOT / "train_gpt.py").stat().st_size
    assert stated["counts"]["over_budget"] == 1 and stated["over_budget_bytes"] == total - 1000
    assert status != 0, "an over-budget run must exit non-zero"
