"""The quantization switches beyond the record (all off by default): EMBED_BITS=7 and per-family
clip widths, LQER low-rank error correction with INT2/INT4 factors, compression by tensor family,
and the Polar-Express Newton-Schulz schedule. Expected values are computed here."""

from __future__ import annotations

import json
import lzma
import re

import pytest
import torch

from conftest import read_log, run_main, run_script, tiny_hparams, tiny_run_env

import logformat
import train_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")
MLP = ("mlp.fc.weight", "mlp.proj.weight")


def random_state(h, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + 0.01)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gptq_names(state):
    return [n for n in state if n.endswith(ATTN + MLP) or n == "tok_emb.weight"]


def hessians_for(state):
    out = {}
    for i, n in enumerate(gptq_names(state)):
        g = torch.Generator().manual_seed(i)
        cols = state[n].shape[1]
        X = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
        out[n] = X.T @ X / X.shape[0]
    return out


def sdclip(t, sigmas, R):
    return (sigmas * t.float().std(dim=1) / R).clamp_min(1e-6).half()


# -----------------------------------------------------------------------------
# EMBED_BITS and per-family clip widths
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("clips", [{}, dict(attn_clip_sigmas=9.0, mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0)])
def test_per_family_clips_select_the_right_tensors(clips):
    h = tiny_hparams(embed_bits=7, **clips)
    state = random_state(h)
    w, m = train_gpt.quantize_state_dict(state, hessians_for(state), h)
    for name in gptq_names(state):
        if name == "tok_emb.weight":
            sigmas, R = clips.get("embed_clip_sigmas", 20.0), 63
        elif name.endswith(ATTN):
            sigmas, R = clips.get("attn_clip_sigmas", 12.85), 31
        else:
            sigmas, R = clips.get("mlp_clip_sigmas", 12.85), 31
        assert torch.equal(w[name + ".scale"], sdclip(state[name], sigmas, R)), name
        assert w[name + ".q"].abs().max().item() <= R, name
    assert m["tok_emb.weight"] == "gptq (int7)"


def test_clip_widths_must_be_positive():
    with pytest.raises(ValueError, match="MLP_CLIP_SIGMAS"):
        tiny_hparams(mlp_clip_sigmas=0.0)


# -----------------------------------------------------------------------------
# LQER
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 3, 5, 8, 63])
def test_int2_int4_packing_round_trips(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2 ** bits, (3, n), generator=g, dtype=torch.uint8)
    packed = train_gpt.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n * bits // 8))
    assert torch.equal(train_gpt.unpack_bits(packed, bits, n).to(torch.uint8), codes)


def lqer_blob_bytes(w, names):
    return sum(w[f"{n}.{k}"].numel() * w[f"{n}.{k}"].element_size() for n in names
               for k in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale"))


def test_lqer_corrects_the_worst_matrices_and_lowers_each_error():
    h0 = tiny_hparams()
    h = tiny_hparams(lqer_top_k=3, lqer_rank=4, lqer_group=16)
    state = random_state(h)
    hessians = hessians_for(state)
    w0, m0 = train_gpt.quantize_state_dict(state, hessians, h0)
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    plain, corrected = train_gpt.dequantize_state_dict(w0, m0), train_gpt.dequantize_state_dict(w, m)
    errors = {n: (state[n] - plain[n]).norm().item() for n in gptq_names(state)}
    names = sorted(k[:-len(".lqer_a")] for k in w if k.endswith(".lqer_a"))
    assert names == sorted(sorted(errors, key=lambda n: -errors[n])[:3]), "not the three largest errors"
    for n in gptq_names(state):
        err = (state[n] - corrected[n]).norm().item()
        if n in names:
            assert err < errors[n], f"{n}: LQER error {err} not below GPTQ's {errors[n]}"
            rows, cols = state[n].shape
            assert w[n + ".lqer_a"].dtype == torch.uint8 and w[n + ".lqer_a"].shape == (rows, 1)  # 4 INT2 per byte
            assert w[n + ".lqer_a_scale"].dtype == torch.float16 and w[n + ".lqer_a_scale"].shape == ()
            assert w[n + ".lqer_b"].shape == (4, -(-cols // 16) * 16 // 2)  # INT4, padded to whole groups
            assert w[n + ".lqer_b_scale"].dtype == torch.float16 and w[n + ".lqer_b_scale"].shape == (4, -(-cols // 16))
        else:
            assert torch.equal(corrected[n], plain[n]), n
        assert torch.equal(w[n + ".q"], w0[n + ".q"]) and torch.equal(w[n + ".scale"], w0[n + ".scale"]), n
    # the codes, scales and labels of everything else are untouched
    assert m == m0 and {k for k in w if ".lqer_" not in k} == set(w0)
    # the size accounting sees it: the logged raw bytes, and a larger blob
    line, = [x for x in train_gpt.category_table(w, m) if x.startswith("lqer:")]
    assert line.endswith(f"raw_bytes:{lqer_blob_bytes(w, names)}")
    assert len(train_gpt.compress_blob(w, m, "lzma")) > len(train_gpt.compress_blob(w0, m0, "lzma"))


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "family"])
def test_lqer_round_trips_through_the_blob_exactly(compressor):
    h = tiny_hparams(lqer_top_k=2, lqer_rank=3, lqer_group=7)
    state = random_state(h, seed=1)
    w, m = train_gpt.quantize_state_dict(state, hessians_for(state), h)
    w2, m2 = train_gpt.decompress_blob(train_gpt.compress_blob(w, m, compressor), "lqer blob")
    assert m2 == m and set(w2) == set(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k]), k
    a, b = train_gpt.dequantize_state_dict(w, m), train_gpt.dequantize_state_dict(w2, m2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lqer_factor_reference():
    """The dequantized correction is (INT2 code - 1.5) * one scale @ (INT4 code - 7) * group scale,
    written out here element by element on a tiny matrix."""
    g = torch.Generator().manual_seed(5)
    E = torch.randn(6, 10, generator=g)
    f = train_gpt.lqer_factors(E, rank=2, group=4)
    a = train_gpt.unpack_bits(f["lqer_a"], 2, 2).float()
    bc = train_gpt.unpack_bits(f["lqer_b"], 4, 10).float()
    A = (a - 1.5) * f["lqer_a_scale"].float()
    B = torch.empty(2, 10)
    for r in range(2):
        for c in range(10):
            B[r, c] = (bc[r, c] - 7) * f["lqer_b_scale"][r, c // 4].float()
    got = train_gpt.lqer_dequantize(f["lqer_a"], f["lqer_a_scale"], f["lqer_b"], f["lqer_b_scale"], 6, 10)
    assert torch.allclose(got, A @ B, atol=1e-6)
    assert (E - got).norm() < E.norm()


def test_lqer_settings_are_validated():
    with pytest.raises(ValueError, match="LQER_RANK=0"):
        tiny_hparams(lqer_top_k=1, lqer_rank=0)


# -----------------------------------------------------------------------------
# Compression by family
# -----------------------------------------------------------------------------


def family_blob():
    h = tiny_hparams(lqer_top_k=1)
    state = random_state(h, seed=2)
    w, m = train_gpt.quantize_state_dict(state, hessians_for(state), h)
    return w, m, train_gpt.compress_blob(w, m, "family")


def test_family_blob_round_trips_grouped_by_role_and_dtype():
    w, m, blob = family_blob()
    assert blob[:5] == b"QFAM\x01"
    w2, m2 = train_gpt.decompress_blob(blob, "fam.ptz")
    assert m2 == m and set(w2) == set(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and w2[k].shape == w[k].shape and torch.equal(w2[k], w[k]), k
    n = int.from_bytes(blob[5:9], "little")
    header = json.loads(lzma.decompress(blob[9:9 + n]))
    fams = {key: fam for key, _, _, fam in header["tensors"]}
    assert fams["blocks.0.mlp.fc.weight.q"] == "mlp.codes.int8"
    assert fams["blocks.0.attn.c_q.weight.q"] == "attn.codes.int8"
    assert fams["tok_emb.weight.q"] == "embed.codes.int8"
    assert fams["blocks.0.mlp.fc.weight.scale"] == "scales.float16"
    assert fams["skip_weights.scale_pt"] == "scales.float32"
    assert fams["skip_weights.q_pt"] == "control.codes.int8"
    assert fams["blocks.0.attn.q_gain"] == "passthrough.float16"
    for key, dtype, _, fam in header["tensors"]:
        assert fam.endswith("." + dtype), key
    assert {g[1] for g in header["groups"]} <= {"brotli", "xz", "brotli+shuffle", "xz+shuffle"}
    assert 9 + n + sum(g[3] for g in header["groups"]) == len(blob)


@pytest.mark.parametrize("family", ["mlp.codes.int8", "scales.float16"])
def test_corrupted_family_is_refused_with_its_name(family):
    w, m, blob = family_blob()
    n = int.from_bytes(blob[5:9], "little")
    pos = 9 + n
    for fam, _, _, comp_len, _ in json.loads(lzma.decompress(blob[9:9 + n]))["groups"]:
        if fam == family:
            break
        pos += comp_len
    bad = bytearray(blob)
    bad[pos + comp_len // 2] ^= 0x5A
    with pytest.raises(ValueError, match=re.escape(f"tensor family '{family}' is corrupt")):
        train_gpt.decompress_blob(bytes(bad), "fam.ptz")
    with pytest.raises(ValueError, match="fam.ptz"):
        train_gpt.decompress_blob(blob[:-3], "fam.ptz")


# -----------------------------------------------------------------------------
# Polar-Express Newton-Schulz
# -----------------------------------------------------------------------------


def reference_record_ns(G, steps):
    X = G.float() / (G.float().norm() + 1e-7)
    t = G.size(0) > G.size(1)
    if t:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X.T if t else X


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (128, 48)])
def test_polar_express_is_closer_to_orthogonal_at_five_steps(shape):
    g = torch.Generator().manual_seed(shape[0])
    G = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(-2, 0, shape[1]))
    default = train_gpt.zeropower_via_newtonschulz5(G, 5)
    assert torch.equal(default, reference_record_ns(G, 5)), "the record's schedule changed"
    polar = train_gpt.zeropower_via_newtonschulz5(G, 5, train_gpt.NS_SCHEDULES["polar"])
    dev_default = (torch.linalg.svdvals(default) - 1).abs().max().item()
    dev_polar = (torch.linalg.svdvals(polar) - 1).abs().max().item()
    assert dev_polar < dev_default, (dev_polar, dev_default)


def test_muon_takes_the_configured_schedule():
    h = tiny_hparams(muon_ns_coeffs="polar")
    muon = train_gpt.build_optimizers(train_gpt.GPT(h), h, False)[-1]
    assert muon.ns_schedule is train_gpt.NS_SCHEDULES["polar"]
    assert train_gpt.build_optimizers(train_gpt.GPT(tiny_hparams()), tiny_hparams(), False)[-1].ns_schedule \
        is train_gpt.NS_SCHEDULES["record"]
    with pytest.raises(ValueError, match="MUON_NS_COEFFS='fast'"):
        tiny_hparams(muon_ns_coeffs="fast")


# -----------------------------------------------------------------------------
# End to end: every new format written by a run and re-read by EVAL_ONLY
# -----------------------------------------------------------------------------

def quantized(log: str) -> list[tuple[str, str]]:
    """The quantized stage's val_loss and val_bpb as printed, one pair per line."""
    return [m.group(2, 3) for m in logformat.lines_of(log, "stage") if m.group(1) == "quantized"]


@pytest.fixture(scope="module")
def new_formats_run(tiny_data, tmp_path_factory) -> dict:
    """One short run with every new format switched on (7-bit embedding, LQER, the family
    compressor, the polar Newton-Schulz schedule); also the run whose projection is checked below."""
    cwd = tmp_path_factory.mktemp("new_formats")
    env = tiny_run_env(tiny_data, cwd, ITERATIONS="4", WARMUP_STEPS="1", VAL_LOSS_EVERY="0",
                       SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0",
                       EMBED_BITS="7", ATTN_CLIP_SIGMAS="10", MLP_CLIP_SIGMAS="11.5", EMBED_CLIP_SIGMAS="14",
                       LQER_TOP_K="2", LQER_RANK="2", LQER_GROUP="16", COMPRESSOR="family", MUON_NS_COEFFS="polar")
    run_script(env, cwd)
    return {"cwd": cwd, "env": env, "log": read_log(cwd, env["RUN_ID"])}


def test_eval_only_reproduces_every_new_format(new_formats_run, tmp_path, monkeypatch, one_thread):
    env, log = new_formats_run["env"], new_formats_run["log"]
    artifact = new_formats_run["cwd"] / "final_model.int6.ptz"
    assert artifact.read_bytes()[:4] == b"QFAM"
    assert re.search(r"^lqer:corrected 2 tensors \(.+\) raw_bytes:\d+$", log, re.M), log[-2000:]
    assert re.search(r"^quant_category:gptq \(int7\) tensors:1 ", log, re.M)
    stated = logformat.scan_log(log)
    assert (stated["compressor"], stated["model_bytes"]) == ("family", artifact.stat().st_size)
    # re-read in this process (one thread, as the run): the same score to the last printed digit
    assert run_main(dict(env, RUN_ID="again", EVAL_ONLY="1"), monkeypatch, tmp_path) == 0
    assert quantized(read_log(tmp_path, "again")) == quantized(log) and len(quantized(log)) == 1


# -----------------------------------------------------------------------------
# The projected artifact size
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("R,c", [(31, 12.85), (63, 20.0), (127, 20.0), (63, 14.0)])
def test_gaussian_code_bits_match_sampled_codes(R, c):
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(R), dtype=torch.float64)
    q = torch.clamp(torch.round(z * R / c), -R, R).long()
    p = torch.bincount(q + R).double() / q.numel()
    p = p[p > 0]
    assert train_gpt.gaussian_code_bits(R, c) == pytest.approx(-(p * p.log2()).sum().item(), abs=0.01)


def test_projection_follows_the_switches():
    with torch.device("meta"):
        h = train_gpt.Hyperparameters()
        state = train_gpt.GPT(h).state_dict()
    base = train_gpt.projected_model_bytes(state, h)
    assert set(base) == {"gptq (int6)", "gptq (int8)", "simple int6 (bigram embed)", "simple int8 (small matrix)",
                         "pertensor int8 (control)", "passthrough (float16)"}
    assert base["simple int6 (bigram embed)"] == 0  # untrained: all zeros
    int7 = train_gpt.projected_model_bytes(state, train_gpt.Hyperparameters(embed_bits=7))
    saved = base["gptq (int8)"] - int7["gptq (int7)"]
    expected = 8192 * 512 * (train_gpt.gaussian_code_bits(127, 20) - train_gpt.gaussian_code_bits(63, 20)) / 8 \
        * train_gpt.PROJECTION_CODE_OVERHEAD
    assert saved == pytest.approx(expected, abs=2)
    bigram = train_gpt.projected_model_bytes(state, train_gpt.Hyperparameters(bigram_train_embed=True))
    assert bigram["simple int6 (bigram embed)"] == round(16384 * 32 * train_gpt.PROJECTION_TRAINED_BIGRAM_BYTES
                                                          + 16384 * train_gpt.PROJECTION_ROW_SCALE_BYTES)
    lqer = train_gpt.projected_model_bytes(state, train_gpt.Hyperparameters(lqer_top_k=3, lqer_rank=4, lqer_group=64))
    # the three largest GPTQ tensors are tok_emb (8192 x 512) and two MLP matrices (2048 x 512, 512 x 2048)
    a = lambda rows: rows + 2  # noqa: E731  (4 INT2 codes per byte, one fp16 scale)
    b = lambda cols: 4 * cols // 2 + 2 * 4 * cols // 64  # noqa: E731
    assert lqer["lqer"] == a(8192) + b(512) + a(2048) + b(512) + a(512) + b(2048)


def test_run_logs_the_projection_before_training(new_formats_run):
    log = new_formats_run["log"]
    m = re.search(r"^projected_artifact_bytes:(\d+) \(model (\d+) \+ code (\d+); limit 16000000\) (.*)$", log, re.M)
    assert m, log[:3000]
    assert log.index("projected_artifact_bytes:") < log.index("1/4 train_loss")
    assert "[gptq (int7)]:" in m.group(4)
    assert int(m.group(1)) == int(m.group(2)) + int(m.group(3))


def test_a_run_without_lqer_refuses_a_blob_that_carries_corrections():
    """The packed file of a preset without LQER has no LQER reader: a blob with corrections must be
    refused by name, never read with the corrections silently dropped."""
    w = {"blocks.0.mlp.fc.weight.q": torch.zeros(4, 4, dtype=torch.int8),
         "blocks.0.mlp.fc.weight.scale": torch.ones(4, dtype=torch.float16),
         "blocks.0.mlp.fc.weight.lqer_a": torch.zeros(4, 1, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="carries LQER corrections, but this run has LQER_TOP_K=0"):
        train_gpt.dequantize_state_dict(w, {"blocks.0.mlp.fc.weight": "gptq (int6)"}, lqer=False)
