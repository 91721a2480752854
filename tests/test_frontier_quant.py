"""The frontier record's quantization and compression, every part off by default: LQER_FORM=asym
(int8 factor codes on asymmetric grids), SMALL_FP16 (small tensors fp16, the attention gates int8
per row, the sparse gate's role) and COMPRESSOR=pergroup (lrzip ZPAQ streams per matrix kind with
L1-sorted rows). Expected values are computed here from the formulas: the SVD is torch's (it is
the definition), the quantizers, the row chain and the container layout are written out below.
The pergroup tests run Debian's lrzip and skip, saying so, where it is not installed."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zipfile

import brotli
import numpy as np
import pytest
import torch

from conftest import read_log, run_main, run_script, tiny_hparams, tiny_run_env
from test_quant_switches import gptq_names, hessians_for

import logformat
import train_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

LRZIP = shutil.which("lrzip")
need_lrzip = pytest.mark.skipif(LRZIP is None, reason="lrzip is not installed (apt-get install lrzip): "
                                                      "the COMPRESSOR=pergroup tests are skipped")
ATTN = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")
MLP = ("mlp.fc.weight", "mlp.proj.weight")
STREAMS = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
           "mlp.fc.weight", "mlp.proj.weight")  # the container's lrzip streams, in order
SORTED = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")  # the streams whose rows are reordered
GATE = "attn.sparse_gate.weight"


def random_state(h, seed: int = 0, gates: bool = False) -> dict:
    """Every tensor of the tiny model off its init; gates=True adds the sparse attention gate of
    each layer (heads x 12), as the model with that gate will name it."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + 0.01)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if gates:
        for layer in range(h.num_layers):
            state[f"blocks.{layer}.{GATE}"] = torch.randn(h.num_heads, 12) * 0.3
    return state


def fp16(x: torch.Tensor) -> torch.Tensor:
    """A float32 quantity rounded to the stored fp16 scale."""
    return x.float().half()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# LQER_FORM=asym, against the formulas
# -----------------------------------------------------------------------------


def ref_asym_factors(E: torch.Tensor, rank: int, group: int):
    """A = U_r S_r -> clamp(round(A / s_A), -2, 1), s_A = fp16(max|A| / 1.5); B = V_r^T in groups of
    `group` values of a row -> clamp(round(B / s), -8, 7), s = fp16(max|group| / 7.5). Element by
    element, group by group."""
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    A, B = U[:, :rank] * S[:rank], Vh[:rank]
    s_a = fp16(A.abs().max() / 1.5)
    qa = torch.empty(A.shape, dtype=torch.int8)
    for i in range(A.shape[0]):
        for j in range(rank):
            qa[i, j] = int(min(1, max(-2, torch.round(A[i, j] / s_a.float()).item())))
    cols = B.shape[1]
    qb, s_b = torch.zeros(rank, cols, dtype=torch.int8), []
    for r in range(rank):
        scales = []
        for g0 in range(0, cols, group):
            chunk = B[r, g0:g0 + group]
            s = fp16(chunk.abs().max() / 7.5)
            scales.append(s)
            for c in range(chunk.numel()):
                qb[r, g0 + c] = int(min(7, max(-8, torch.round(chunk[c] / s.float()).item())))
        s_b.append(torch.stack(scales))
    return qa, s_a, qb, torch.stack(s_b)


def ref_correction(qa, s_a, qb, s_b, group: int) -> torch.Tensor:
    """(qa * s_a) @ (qb * its group's scale), summed term by term in float64."""
    rows, rank = qa.shape
    cols = qb.shape[1]
    B = torch.empty(rank, cols, dtype=torch.float64)
    for r in range(rank):
        for c in range(cols):
            B[r, c] = qb[r, c].item() * s_b[r, c // group].double()
    return (qa.double() * s_a.double()) @ B


@pytest.mark.parametrize("rows,cols,rank,group", [(24, 128, 4, 64), (40, 24, 3, 16), (6, 10, 8, 4)],
                         ids=["whole_groups", "padded_groups", "rank_beyond_shape"])
def test_lqer_asym_factors_follow_the_formulas(rows, cols, rank, group):
    E = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 0.01
    f = train_gpt.lqer_asym_factors(E, rank, group)
    r = min(rank, rows, cols)
    qa, s_a, qb, s_b = ref_asym_factors(E, r, group)
    groups = -(-cols // group)
    assert f["lqer_a"].dtype == torch.int8 and torch.equal(f["lqer_a"], qa)
    assert f["lqer_a_scale"].dtype == torch.float16 and f["lqer_a_scale"].shape == () and torch.equal(f["lqer_a_scale"], s_a)
    assert f["lqer_b"].dtype == torch.int8 and f["lqer_b"].shape == (r, groups * group)
    assert torch.equal(f["lqer_b"][:, :cols], qb) and not f["lqer_b"][:, cols:].any(), "padding must be zero codes"
    assert f["lqer_b_scale"].dtype == torch.float16 and torch.equal(f["lqer_b_scale"], s_b)
    assert qa.min() >= -2 and qa.max() <= 1 and qb.min() >= -8 and qb.max() <= 7
    got = train_gpt.lqer_asym_dequantize(f["lqer_a"], f["lqer_a_scale"], f["lqer_b"], f["lqer_b_scale"], cols)
    assert got.shape == (rows, cols)
    assert torch.allclose(got.double(), ref_correction(qa, s_a, qb, s_b, group), atol=1e-6)
    assert (E - got).norm() < E.norm()


def test_lqer_asym_corrects_the_top_k_by_frobenius_error():
    h0 = tiny_hparams()
    h = tiny_hparams(lqer_top_k=3, lqer_rank=4, lqer_group=32, lqer_form="asym")
    state = random_state(h)
    hessians = hessians_for(state)
    w0, m0 = train_gpt.quantize_state_dict(state, hessians, h0)
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    errors = {n: state[n] - w0[n + ".q"].float() * w0[n + ".scale"].float()[:, None] for n in gptq_names(state)}
    top = sorted(errors, key=lambda n: -torch.linalg.matrix_norm(errors[n]).item())[:3]
    assert sorted(k[:-len(".lqer_a")] for k in w if k.endswith(".lqer_a")) == sorted(top)
    assert m == m0 and {k for k in w if ".lqer_" not in k} == set(w0)
    out = train_gpt.dequantize_state_dict(w, m)
    for n in gptq_names(state):
        assert torch.equal(w[n + ".q"], w0[n + ".q"]) and torch.equal(w[n + ".scale"], w0[n + ".scale"]), n
        plain = w0[n + ".q"].float() * w0[n + ".scale"].float()[:, None]
        if n in top:
            qa, s_a, qb, s_b = ref_asym_factors(errors[n], 4, 32)
            assert torch.equal(w[n + ".lqer_a"], qa) and torch.equal(w[n + ".lqer_b"], qb), n
            assert torch.allclose(out[n].double(), plain.double() + ref_correction(qa, s_a, qb, s_b, 32), atol=1e-6), n
            assert (state[n] - out[n]).norm() < errors[n].norm(), n
        else:
            assert torch.equal(out[n], plain), n
    # the log's LQER line counts the unpacked codes and their scales
    line, = [x for x in train_gpt.category_table(w, m) if x.startswith("lqer:")]
    raw = sum(w[f"{n}.{k}"].numel() * w[f"{n}.{k}"].element_size() for n in top
              for k in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale"))
    assert line == f"lqer:corrected 3 tensors ({' '.join(sorted(top))}) raw_bytes:{raw}"


def test_lqer_forms_are_refused_by_a_run_of_the_other_form():
    """A packed file holds one form's reader: a blob of the other form is refused by name, never
    misread (both forms use the same keys; the codes' dtype tells them apart)."""
    state = random_state(tiny_hparams())
    blobs = {form: train_gpt.quantize_state_dict(state, hessians_for(state), tiny_hparams(
        lqer_top_k=3, lqer_form=form)) for form in ("packed", "asym")}
    for form, other in (("packed", "asym"), ("asym", "packed")):
        w, m = blobs[form]
        assert any(k.endswith(".lqer_a") for k in w), f"{form}: no correction to read"
        assert train_gpt.dequantize_state_dict(w, m, True, form).keys() == m.keys()
        with pytest.raises(ValueError, match=f"in the {form} form, but this run has LQER_FORM={other}: "
                                             f"set LQER_FORM={form}"):
            train_gpt.dequantize_state_dict(w, m, True, other)
        with pytest.raises(ValueError, match="carries LQER corrections, but this run has LQER_TOP_K=0"):
            train_gpt.dequantize_state_dict(w, m, False, "packed")


def test_lqer_form_settings_are_validated():
    with pytest.raises(ValueError, match="LQER_FORM=asym .* LQER_TOP_K, which is 0"):
        tiny_hparams(lqer_form="asym")
    with pytest.raises(ValueError, match="LQER_FORM='int3' must be one of packed, asym"):
        tiny_hparams(lqer_top_k=1, lqer_form="int3")
    assert train_gpt.Hyperparameters().lqer_form == "packed"


# -----------------------------------------------------------------------------
# SMALL_FP16 and the attention gates
# -----------------------------------------------------------------------------


def test_sparse_gate_role_is_control_int8_per_row():
    assert train_gpt.tensor_role(f"blocks.3.{GATE}") == ("control", "int8_row", "control")
    assert train_gpt.quant_category(f"blocks.3.{GATE}", torch.empty(8, 12, device="meta")) == "int8_row"


@pytest.mark.parametrize("small_fp16", [False, True])
def test_small_tensors_fp16_but_the_attention_gates_int8_per_row(small_fp16):
    h = tiny_hparams(small_fp16=small_fp16)
    state = random_state(h, gates=True)
    hessians = hessians_for(state)
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    w0, _ = train_gpt.quantize_state_dict(state, hessians, tiny_hparams())
    out = train_gpt.dequantize_state_dict(w, m)
    gates = [n for n in state if n.endswith((GATE, "attn.attn_gate_proj.weight"))]
    assert len(gates) == 2 * h.num_layers
    for name, t in state.items():
        if name in gates:  # int8 per row, fp16 absmax/127 scales, with the switch or without
            scale = (t.abs().amax(dim=1) / 127).half()
            q = torch.clamp(torch.round(t / scale.float()[:, None]), -127, 127).to(torch.int8)
            assert torch.equal(w[name + ".scale"], scale) and torch.equal(w[name + ".q"], q), name
            assert m[name] == "simple int8 (small matrix)"
            assert torch.equal(out[name], q.float() * scale.float()[:, None]), name
        elif name in gptq_names(state) or name == "bigram.embed.weight":  # the large tensors: as the record
            assert torch.equal(w[name + ".q"], w0[name + ".q"]) and torch.equal(w[name + ".scale"], w0[name + ".scale"])
        elif small_fp16:  # everything else small: fp16 passthrough
            assert m[name] == "passthrough (float16)", name
            assert w[name].dtype == torch.float16 and torch.equal(w[name], t.half()), name
            assert not any(k in w for k in (name + ".q", name + ".q_pt")), name
        else:
            assert any(k in w for k in (name + ".q", name + ".q_pt")) or w[name].dtype == torch.float16, name
    if small_fp16:
        passthrough = {n for n in state if m[n] == "passthrough (float16)"}
        assert {"skip_weights", "smear_gate.weight", "bigram.proj.weight", "blocks.0.attn_scale"} <= passthrough
    else:
        assert m["skip_weights"] == "pertensor int8 (control)" and m["smear_gate.weight"] == "simple int8 (small matrix)"


def test_projection_follows_the_frontier_switches():
    h = tiny_hparams()
    with torch.device("meta"):
        state = train_gpt.GPT(h).state_dict()
    base = train_gpt.projected_model_bytes(state, h)
    small = train_gpt.projected_model_bytes(state, tiny_hparams(small_fp16=True))
    moved = [n for n, t in state.items() if train_gpt.quant_category(n, t) in ("int8_tensor", "int8_row")
             and ".attn." not in n]
    gates = [n for n in state if n.endswith("attn.attn_gate_proj.weight")]
    assert small["passthrough (float16)"] == base["passthrough (float16)"] + 2 * sum(state[n].numel() for n in moved)
    assert small["simple int8 (small matrix)"] == sum(state[n].numel() for n in gates)
    assert "pertensor int8 (control)" not in small
    # asym LQER: the same codes unpacked, projected at their packed width
    packed = train_gpt.projected_model_bytes(state, tiny_hparams(lqer_top_k=3))
    asym = train_gpt.projected_model_bytes(state, tiny_hparams(lqer_top_k=3, lqer_form="asym"))
    assert asym == packed
    if LRZIP is not None:  # pergroup: the GPTQ codes at the measured overhead of its lrzip streams
        pg = train_gpt.projected_model_bytes(state, tiny_hparams(compressor="pergroup"))
        int6 = sum(t.numel() for n, t in state.items() if n.endswith(ATTN + MLP))
        rows = sum(t.shape[0] for n, t in state.items() if n.endswith(ATTN + MLP))
        expected = int6 * train_gpt.gaussian_code_bits(31, 12.85) / 8 * train_gpt.PROJECTION_PERGROUP_CODE_OVERHEAD \
            + rows * train_gpt.PROJECTION_ROW_SCALE_BYTES
        assert pg["gptq (int6)"] == round(expected)
        # and the row orders of tok_emb, c_q and fc: a uint16 per row, at their raw size
        assert pg.pop("pergroup row orders") == 2 * (h.vocab_size + h.num_layers * (h.model_dim + int(h.mlp_mult * h.model_dim)))
        assert {k: v for k, v in pg.items() if not k.startswith("gptq")} == \
               {k: v for k, v in base.items() if not k.startswith("gptq")}


# -----------------------------------------------------------------------------
# COMPRESSOR=pergroup
# -----------------------------------------------------------------------------


def ref_l1_chain(codes: np.ndarray) -> np.ndarray:
    """From row 0, repeatedly the unused row nearest (L1) to the last one taken; ties go to the
    lowest row index."""
    rows = codes.shape[0]
    used, order = np.zeros(rows, dtype=bool), [0]
    used[0] = True
    for _ in range(rows - 1):
        last = codes[order[-1]].astype(np.int64)
        best, best_d = None, None
        for r in range(rows):
            if not used[r]:
                d = int(np.abs(codes[r].astype(np.int64) - last).sum())
                if best_d is None or d < best_d:
                    best, best_d = r, d
        order.append(best)
        used[best] = True
    return np.array(order)


@pytest.mark.parametrize("shape,levels", [((37, 5), 2), ((64, 16), 7), ((1, 3), 3), ((2, 1), 1)])
def test_l1_row_order_is_the_greedy_chain(shape, levels):
    codes = np.random.default_rng(shape[0]).integers(-levels, levels + 1, size=shape).astype(np.int8)
    order = train_gpt.l1_row_order(codes)
    assert order.dtype == np.uint16 and np.array_equal(order, ref_l1_chain(codes))


def test_l1_row_order_refuses_rows_beyond_uint16():
    with pytest.raises(ValueError, match="65537 rows do not fit"):
        train_gpt.l1_row_order(np.zeros((65537, 1), dtype=np.int8))


def test_missing_lrzip_is_refused_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no lrzip
    with pytest.raises(RuntimeError, match=r"COMPRESSOR=pergroup needs the lrzip program .* "
                                           r"install Debian's package lrzip \(apt-get install lrzip\)"):
        tiny_hparams(compressor="pergroup")
    tiny_hparams(compressor="family")  # the other compressors need nothing


def pergroup_sample(lqer: bool = True):
    h = tiny_hparams(**(dict(lqer_top_k=2, lqer_rank=3, lqer_group=16, lqer_form="asym") if lqer else {}))
    state = random_state(h, seed=4, gates=True)
    w, m = train_gpt.quantize_state_dict(state, hessians_for(state), h)
    return w, m


def container(blob: bytes) -> list[bytes]:
    """The streams of a PGRP blob, read from the layout: b'PGRP', u32 count, count x u32 lengths."""
    assert blob[:4] == b"PGRP"
    count, = struct.unpack("<I", blob[4:8])
    lengths = struct.unpack(f"<{count}I", blob[8:8 + 4 * count])
    pos, streams = 8 + 4 * count, []
    for n in lengths:
        streams.append(blob[pos:pos + n])
        pos += n
    assert pos == len(blob)
    return streams


def lrzip(args: list[str], data: bytes, folder) -> bytes:
    src, dst = os.path.join(folder, "in"), os.path.join(folder, "out")
    with open(src, "wb") as f:
        f.write(data)
    subprocess.run([LRZIP, "-q", "-N", str(os.nice(0)), *args, "-o", dst, src], check=True, capture_output=True,
                   env=dict(os.environ, LRZIP="NOCONFIG"))
    with open(dst, "rb") as f:
        out = f.read()
    os.remove(src)
    os.remove(dst)
    return out


@pytest.fixture(scope="module")
def pergroup_blob():
    """A blob with every kind of tensor: GPTQ codes, asym LQER factors, sparse gates, scales, fp16."""
    if LRZIP is None:
        pytest.skip("lrzip is not installed (apt-get install lrzip): the COMPRESSOR=pergroup tests are skipped")
    w, m = pergroup_sample()
    return w, m, train_gpt.compress_blob(w, m, "pergroup")


def test_pergroup_round_trip_is_exact(pergroup_blob):
    w, m, blob = pergroup_blob
    assert train_gpt.blob_compressor(blob[:16]) == "pergroup"
    w2, m2 = train_gpt.decompress_blob(blob, "pg.ptz", "pergroup")
    assert m2 == m
    assert_same_tensors(w2, w)
    a, b = train_gpt.dequantize_state_dict(w, m), train_gpt.dequantize_state_dict(w2, m2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pergroup_layout_streams_orders_and_codecs(pergroup_blob, tmp_path):
    """Stream by stream, from the layout: each lrzip stream is exactly `lrzip -z -L 9` of its
    matrices' codes (layers in order; rows of tok_emb, c_q and fc reordered by the L1 chain, which
    is no identity here; then transposed); the rest is torch.save + brotli-11 with a 2^24 window,
    the row orders uint16 + brotli-11."""
    w, m, blob = pergroup_blob
    streams = container(blob)
    assert len(streams) == len(STREAMS) + 2
    rest_raw, orders = brotli.decompress(streams[-2]), brotli.decompress(streams[-1])
    assert brotli.compress(rest_raw, quality=11, lgwin=24) == streams[-2]
    assert brotli.compress(orders, quality=11) == streams[-1]
    rest = torch.load(io.BytesIO(rest_raw), map_location="cpu", weights_only=True)
    expected_orders, in_streams = b"", set()
    layers = int(tiny_hparams().num_layers)
    for group, stream in zip(STREAMS, streams):
        keys = ["tok_emb.weight.q"] if group == "tok_emb.weight" else [f"blocks.{i}.{group}.q" for i in range(layers)]
        raw = b""
        for key in keys:
            codes = w[key].numpy()
            if group in SORTED:
                order = ref_l1_chain(codes)
                assert not np.array_equal(order, np.arange(len(order))), f"{key}: the chain left the rows in place"
                expected_orders += order.astype(np.uint16).tobytes()
                codes = codes[order]
            raw += np.ascontiguousarray(codes.T).tobytes()
        in_streams.update(keys)
        assert lrzip(["-d"], stream, tmp_path) == raw, group
        if group == "attn.c_q.weight":  # the codec (one stream: each lrzip start costs a fraction of a second)
            assert lrzip(["-z", "-L", "9"], raw, tmp_path) == stream, f"{group}: not lrzip -z -L 9 of its codes"
    assert orders == expected_orders
    assert set(rest["w"]) == set(w) - in_streams  # LQER factors, gates, scales, fp16 tensors
    assert any(k.endswith(GATE + ".q") for k in rest["w"]) and any(k.endswith(".lqer_a") for k in rest["w"])
    assert rest["m"] == m


@need_lrzip
def test_pergroup_empty_streams_layer_order_and_thin_matrices():
    """Groups the blob lacks get empty streams; layers go in numeric order (blocks.10 after
    blocks.2); one-row and one-column matrices read back exactly, as writable tensors."""
    g = torch.Generator().manual_seed(3)
    codes = lambda *shape: torch.randint(-31, 32, shape, generator=g, dtype=torch.int8)  # noqa: E731
    w = {"tok_emb.weight.q": codes(3, 2), "tok_emb.weight.scale": torch.rand(3, generator=g).half(),
         "blocks.10.attn.c_q.weight.q": codes(4, 4), "blocks.2.attn.c_q.weight.q": codes(4, 4),
         "blocks.0.attn.c_q.weight.q": codes(1, 7), "blocks.1.attn.c_q.weight.q": codes(7, 1),
         "blocks.0.mlp.fc.weight.q_pt": codes(5), "skip_weights": torch.rand(4, generator=g).half()}
    m = {"tok_emb.weight": "gptq (int8)", "skip_weights": "passthrough (float16)"}
    blob = train_gpt.compress_blob(w, m, "pergroup")
    streams = container(blob)
    assert [i for i, s in enumerate(streams[:len(STREAMS)]) if s] == [STREAMS.index("tok_emb.weight"),
                                                                     STREAMS.index("attn.c_q.weight")]
    rest = torch.load(io.BytesIO(brotli.decompress(streams[-2])), map_location="cpu", weights_only=True)
    assert [key for key, _ in rest["groups"][STREAMS.index("attn.c_q.weight")][1]] == \
           [f"blocks.{i}.attn.c_q.weight.q" for i in (0, 1, 2, 10)]
    w2, m2 = train_gpt.decompress_blob(blob, "pg.ptz", "pergroup")
    assert m2 == m
    assert_same_tensors(w2, w)
    assert all(t.numpy().flags.writeable for t in w2.values())


@need_lrzip
def test_pergroup_round_trip_of_a_trained_run(quick_run):
    """The quantized dict of conftest's short trained run (its lzma artifact), through pergroup."""
    w, m = train_gpt.decompress_blob(quick_run["artifact"].read_bytes(), "artifact", "lzma")
    blob = train_gpt.compress_blob(w, m, "pergroup")
    w2, m2 = train_gpt.decompress_blob(blob, "pg.ptz", "pergroup")
    assert m2 == m
    assert_same_tensors(w2, w)


@pytest.mark.parametrize("group,where", [("mlp.fc.weight", "middle"), ("tok_emb.weight", "end"), ("rest", "middle"),
                                         ("rest", "end"), ("row orders", "middle"), ("row orders", "end")])
def test_corrupted_group_is_refused_with_its_name(pergroup_blob, group, where):
    _, _, blob = pergroup_blob
    index = (*STREAMS, "rest", "row orders").index(group)
    lengths = [len(s) for s in container(blob)]
    start = 8 + 4 * len(lengths) + sum(lengths[:index])
    bad = bytearray(blob)
    bad[start + (lengths[index] // 2 if where == "middle" else lengths[index] - 1)] ^= 0x5A
    with pytest.raises(ValueError, match=re.escape(f"bad.ptz: tensor group '{group}' is corrupt")):
        train_gpt.decompress_blob(bytes(bad), "bad.ptz", "pergroup")


def test_truncated_or_padded_pergroup_blob_is_refused(pergroup_blob):
    _, _, blob = pergroup_blob
    for bad in (blob[:-1], blob + b"\x00", blob[:20], blob[:6], b"PGRP"):
        with pytest.raises(ValueError, match="cut.ptz: PGRP (header is truncated|blob has .* \\(truncated or padded\\))"):
            train_gpt.decompress_blob(bad, "cut.ptz", "pergroup")
    wrong_count = bytearray(blob)
    wrong_count[4] += 1
    with pytest.raises(ValueError, match="does not list 9 streams"):
        train_gpt.decompress_blob(bytes(wrong_count), "cut.ptz", "pergroup")


def test_pergroup_blob_needs_its_compressor_and_lrzip(pergroup_blob, monkeypatch, tmp_path):
    _, _, blob = pergroup_blob
    with pytest.raises(ValueError, match="pg.ptz was written with COMPRESSOR=pergroup, but this run has "
                                         "COMPRESSOR=brotli: set COMPRESSOR=pergroup"):
        train_gpt.decompress_blob(blob, "pg.ptz", "brotli")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install lrzip"):  # not reported as a corrupt stream
        train_gpt.decompress_blob(blob, "pg.ptz", "pergroup")


def test_pergroup_leaves_no_files_behind(pergroup_blob, tmp_path, monkeypatch):
    w, m, blob = pergroup_blob
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert train_gpt.compress_blob(w, m, "pergroup") == blob  # deterministic, too
    bad = bytearray(blob)
    bad[8 + 4 * 9 + len(container(blob)[0]) // 2] ^= 0x5A  # lrzip fails on tok_emb and reads the six others
    with pytest.raises(ValueError, match="tensor group 'tok_emb.weight' is corrupt"):
        train_gpt.decompress_blob(bytes(bad), "pg.ptz", "pergroup")
    assert os.listdir(scratch) == []


def test_lqer_asym_round_trips_through_every_compressor():
    w, m = pergroup_sample()
    for compressor in ("brotli", "lzma", "family"):
        w2, m2 = train_gpt.decompress_blob(train_gpt.compress_blob(w, m, compressor), "x.ptz", compressor)
        assert m2 == m
        assert_same_tensors(w2, w)


# -----------------------------------------------------------------------------
# The defaults' blob is what it was before these switches
# -----------------------------------------------------------------------------

# Computed with the code before the frontier's switches were added (torch 2.13.0+cpu): the quantized
# contents of deterministic_state() with identity Hessians, and the brotli blob of it.
DEFAULT_CONTENTS_SHA256 = "4e9b179cabacba07d9341365832ba211e98ca2b62662d0a38d83a03152733544"
DEFAULT_BROTLI_BLOB_SHA256 = "0a4110d7e37c35ba13117aa34b4001f95b04c81cde51c44fa41a48b6fd7f1c0f"  # torch.save's bytes: 2.13


def deterministic_state():
    """The tiny model's tensors from numpy's frozen legacy generator, so that they do not depend on
    torch's RNG or initialisation; identity Hessians make GPTQ plain rounding (no error propagates)."""
    h = tiny_hparams()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in train_gpt.GPT(h).state_dict().items()}
    rs = np.random.RandomState(1716)
    state = {k: torch.from_numpy(np.asarray(rs.standard_normal(s) * 0.05 + 0.01, dtype=np.float32))
             for k, s in shapes.items()}
    hessians = {k: torch.eye(s[1]) for k, s in shapes.items() if k in gptq_names(state)}
    return h, state, hessians


def contents_sha256(w: dict, m: dict) -> str:
    d = hashlib.sha256()
    for k in sorted(w):
        t = w[k].contiguous()
        d.update(f"{k}:{t.dtype}:{tuple(t.shape)}:".encode())
        d.update(t.numpy().tobytes())
    for k in sorted(m):
        d.update(f"{k}={m[k]};".encode())
    return d.hexdigest()


def test_defaults_quantize_and_write_as_before():
    h, state, hessians = deterministic_state()
    assert (h.lqer_form, h.small_fp16, h.compressor) == ("packed", False, "brotli")
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    assert contents_sha256(w, m) == DEFAULT_CONTENTS_SHA256
    blob = train_gpt.compress_blob(w, m, h.compressor)
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    raw = buf.getvalue()
    assert blob == brotli.compress(b"BSHF\x02" + raw[0::2] + raw[1::2], quality=11)  # the record's format
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        assert archive.testzip() is None
    if torch.__version__.split("+")[0] == "2.13.0":  # torch.save's zip layout belongs to its version
        assert hashlib.sha256(blob).hexdigest() == DEFAULT_BROTLI_BLOB_SHA256


# -----------------------------------------------------------------------------
# End to end: a tiny run with the frontier's quantization, re-read by EVAL_ONLY
# -----------------------------------------------------------------------------

FRONTIER_QUANT = dict(EMBED_BITS="7", EMBED_CLIP_SIGMAS="14", MLP_CLIP_SIGMAS="11.5", ATTN_CLIP_SIGMAS="13",
                      LQER_TOP_K="3", LQER_RANK="4", LQER_GROUP="64", LQER_FORM="asym", SMALL_FP16="1",
                      COMPRESSOR="pergroup")


@need_lrzip
def test_a_run_with_the_frontier_quantization_and_eval_only(tiny_data, tmp_path_factory, tmp_path, monkeypatch):
    cwd = tmp_path_factory.mktemp("frontier_quant")
    env = tiny_run_env(tiny_data, cwd, ITERATIONS="4", WARMUP_STEPS="1", VAL_LOSS_EVERY="0",
                       SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", **FRONTIER_QUANT)
    run_script(env, cwd)
    log = read_log(cwd, env["RUN_ID"])
    artifact = cwd / "final_model.int6.ptz"
    assert artifact.read_bytes()[:4] == b"PGRP"
    stated = logformat.scan_log(log)
    assert (stated["compressor"], stated["model_bytes"]) == ("pergroup", artifact.stat().st_size)
    assert re.search(r"^lqer:corrected 3 tensors \(.+\) raw_bytes:\d+$", log, re.M), log[-2000:]
    assert re.search(r"^quant_category:gptq \(int7\) tensors:1 ", log, re.M)
    assert not re.search(r"^quant_category:pertensor int8", log, re.M)  # SMALL_FP16: the control tensors fp16
    assert re.search(r"^projected_artifact_bytes:\d+ \(model \d+ \+ code \d+; limit 16000000\) .*\[lqer\]:\d+", log, re.M)
    quantized = [mm.group(2, 3) for mm in logformat.lines_of(log, "stage") if mm.group(1) == "quantized"]
    assert run_main(dict(env, RUN_ID="again", EVAL_ONLY="1"), monkeypatch, tmp_path) == 0
    again = [mm.group(2, 3) for mm in logformat.lines_of(read_log(tmp_path, "again"), "stage") if mm.group(1) == "quantized"]
    assert again == quantized and len(quantized) == 1
