"""The model, its configuration and its optimizers against SPEC §3–§4.

Every expected value here is computed in this file from the SPEC's formulas (or a brute-force
reference), never read back from train_gpt. Tiny configurations keep the whole module fast on CPU;
the full configuration is only ever built on the meta device.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps
NS_COEFFS = (3.4445, -4.7750, 2.0315)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_h(**overrides) -> tg.Hyperparameters:
    """4 layers x 64 wide, 4 query / 2 KV heads of 16 dims, rotary on 8 of them, looping 1..2 once."""
    kw = dict(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
              rope_dims=8, xsa_last_n=4, parallel_residual_start=2, loop_start=1, loop_end=2, num_loops=1,
              bigram_vocab_size=128, bigram_dim=8, train_seq_len=16, train_batch_tokens=128,
              grad_accum_steps=1, eval_seq_len=16, eval_stride=8, ttt_chunk_tokens=64, compile=False)
    kw.update(overrides)
    return tg.Hyperparameters(**kw)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Give every parameter (zero-init ones included) a random value so no branch is trivially off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ref_rms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS32)


def ref_rotary(x: torch.Tensor, rope_dims: int, base: float, train_seq_len: int) -> torch.Tensor:
    """SPEC §3 rotary on (B, T, H, D): dims i and i+rope_dims/2 (i < rope_dims/2) rotate by angle
    t/base^(2i/rope_dims); base stretched by (T/TRAIN_SEQ_LEN)^(rope_dims/(rope_dims-2)) when T is longer."""
    T = x.size(1)
    if T > train_seq_len:
        base = base * (T / train_seq_len) ** (rope_dims / (rope_dims - 2))
    half = rope_dims // 2
    out = x.clone()
    for i in range(half):
        theta = torch.arange(T, dtype=torch.float64) / base ** (2 * i / rope_dims)
        c = theta.cos().float()[None, :, None]
        s = theta.sin().float()[None, :, None]
        x1, x2 = x[..., i], x[..., i + half]
        out[..., i] = x1 * c + x2 * s
        out[..., i + half] = -x1 * s + x2 * c
    return out


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, one head at a time; query head h reads KV head h // (H/Hkv)."""
    B, T, H, D = q.shape
    group = H // k.size(2)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // group
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, kv]
    return out


def ref_attention(attn: tg.CausalSelfAttention, a: torch.Tensor, h: tg.Hyperparameters,
                  gate_width: int) -> torch.Tensor:
    """SPEC §3 attention written out: per-head RMS-normed q/k, partial rotary, q_gain, GQA causal
    softmax, XSA projection, output gate 2σ(W a[:gate_width]), output projection."""
    B, T, _ = a.shape
    H, Hkv, D = h.num_heads, h.num_kv_heads, h.head_dim
    q = (a @ attn.c_q.weight.T).view(B, T, H, D)
    k = (a @ attn.c_k.weight.T).view(B, T, Hkv, D)
    v = (a @ attn.c_v.weight.T).view(B, T, Hkv, D)
    q = ref_rotary(ref_rms(q), h.rope_dims, h.rope_base, h.train_seq_len)
    k = ref_rotary(ref_rms(k), h.rope_dims, h.rope_base, h.train_seq_len)
    q = q * attn.q_gain[None, None, :, None]
    y = naive_attention(q, k, v)
    if attn.use_xsa:
        group = H // Hkv
        y = y.clone()
        for hh in range(H):
            vh = v[:, :, hh // group]
            v_hat = vh / vh.norm(dim=-1, keepdim=True)
            y[:, :, hh] = y[:, :, hh] - (y[:, :, hh] * v_hat).sum(-1, keepdim=True) * v_hat
    if gate_width:
        y = y * (2 * torch.sigmoid(a[..., :gate_width] @ attn.attn_gate_proj.weight.T))[..., None]
    return y.reshape(B, T, H * D) @ attn.proj.weight.T


def bucket_ref(prev: int, cur: int, m: int) -> int:
    """(36313*cur XOR 27191*prev) mod m with int32 wrap-around of each product (Python floor mod)."""
    def i32(x: int) -> int:
        x &= 0xFFFFFFFF
        return x - (1 << 32) if x >= (1 << 31) else x
    return (i32(36313 * cur) ^ i32(27191 * prev)) % m


# -----------------------------------------------------------------------------
# Full configuration: sizes, names, layer roles
# -----------------------------------------------------------------------------


def expected_full_shapes() -> dict[str, tuple[int, ...]]:
    V, L, d, H, Hkv, mlp = 8192, 11, 512, 8, 4, 4
    hd = d // H
    shapes = {
        "tok_emb.weight": (V, d), "bigram.embed.weight": (16384, 32), "bigram.proj.weight": (d, 32),
        "bigram.scale": (), "smear_gate.weight": (1, 12), "smear_lambda": (),
        "skip_weights": (8, d), "skip_gates": (8, d),
    }
    for l in range(L):
        shapes.update({
            f"blocks.{l}.attn_scale": (d,), f"blocks.{l}.mlp_scale": (d,), f"blocks.{l}.resid_mix": (2, d),
            f"blocks.{l}.attn.c_q.weight": (d, d), f"blocks.{l}.attn.c_k.weight": (Hkv * hd, d),
            f"blocks.{l}.attn.c_v.weight": (Hkv * hd, d), f"blocks.{l}.attn.proj.weight": (d, d),
            f"blocks.{l}.attn.q_gain": (H,), f"blocks.{l}.attn.attn_gate_proj.weight": (H, 12),
            f"blocks.{l}.mlp.fc.weight": (mlp * d, d), f"blocks.{l}.mlp.proj.weight": (d, mlp * d),
        })
    return shapes


@pytest.fixture(scope="module")
def full_model():
    """The record's configuration on CPU with GPT's own (orthogonal) initialisation skipped: the
    structure is what is checked here, and this is several times faster than the meta device."""
    h = tg.Hyperparameters()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg.GPT, "_init_weights", lambda self: None)
        model = tg.GPT(h)
    return h, model


def test_full_config_parameter_count_and_state_dict(full_model):
    _, model = full_model
    shapes = expected_full_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 36_486_278  # SPEC §3 headline
    assert sum(p.numel() for p in model.parameters()) == 36_486_278
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) - {"logit_temp"} == set(shapes)
    for k, s in shapes.items():
        assert got[k] == s, k
    # Spot checks named in the SPEC.
    assert got["blocks.10.attn.attn_gate_proj.weight"] == (8, 12)
    assert got["skip_weights"] == (8, 512)
    assert got["bigram.embed.weight"] == (16384, 32)


def test_full_config_layer_order_and_roles(full_model):
    h, model = full_model
    L = 11
    order = list(range(3)) + [3, 4, 5] * 3 + list(range(6, L))  # SPEC §3 looped virtual order
    assert order == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.encoder_indices == order[: len(order) // 2] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert model.decoder_indices == order[len(order) // 2:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [b.parallel for b in model.blocks] == [l >= 7 for l in range(L)]
    assert all(b.attn.use_xsa for b in model.blocks)
    assert [b.norm_scale for b in model.blocks] == pytest.approx([1 / math.sqrt(l + 1) for l in range(L)])
    # XSA_LAST_N counts from the top.
    m2 = tg.GPT(tiny_h(xsa_last_n=2))
    assert [b.attn.use_xsa for b in m2.blocks] == [False, False, True, True]


# -----------------------------------------------------------------------------
# Configuration errors and the environment
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (dict(num_heads=7), ["NUM_HEADS=7", "MODEL_DIM=512"]),
    (dict(loop_end=11), ["LOOP_END=11", "NUM_LAYERS=11"]),
    (dict(loop_start=6, loop_end=5), ["LOOP_START=6", "LOOP_END=5"]),
    (dict(rope_dims=15), ["ROPE_DIMS=15"]),
    (dict(rope_dims=128), ["ROPE_DIMS=128"]),
    (dict(ttt_chunk_tokens=1000), ["TTT_CHUNK_TOKENS=1000"]),
])
def test_invalid_config_names_the_values(overrides, words):
    with pytest.raises(ValueError) as exc:
        tg.Hyperparameters(**overrides)
    for w in words:
        assert w in str(exc.value)


def test_world_size_must_divide_eight(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        tg.Runtime(tg.Hyperparameters())


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("NUM_LAYERS", "abc")
    with pytest.raises(ValueError) as exc:
        tg.Hyperparameters.from_env()
    assert "NUM_LAYERS" in str(exc.value) and "abc" in str(exc.value)
    monkeypatch.setenv("NUM_LAYERS", "11")
    monkeypatch.setenv("TTT_ENABLED", "maybe")
    with pytest.raises(ValueError, match="TTT_ENABLED"):
        tg.Hyperparameters.from_env()


def test_env_is_read_at_construction_not_import(monkeypatch):
    # A module executed while the environment holds garbage must still import...
    monkeypatch.setenv("NUM_LAYERS", "abc")
    spec = importlib.util.spec_from_file_location("train_gpt_fresh_import", ROOT / "train_gpt.py")
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # as import does: dataclasses look the module up
    spec.loader.exec_module(fresh)
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        fresh.Hyperparameters.from_env()
    # ...and a value set after import is seen by from_env(), with keywords winning; the
    # constructor itself is the defaults whatever the environment holds.
    monkeypatch.setenv("NUM_LAYERS", "9")
    assert fresh.Hyperparameters.from_env().num_layers == 9
    assert tg.Hyperparameters.from_env().num_layers == 9
    assert tg.Hyperparameters.from_env(num_layers=7).num_layers == 7
    assert tg.Hyperparameters().num_layers == 11
    assert tg.Hyperparameters.from_env({"NUM_LAYERS": "8"}).num_layers == 8  # environ: any mapping
    monkeypatch.delenv("NUM_LAYERS")
    assert tg.Hyperparameters.from_env().num_layers == 11


# -----------------------------------------------------------------------------
# SPEC §3 details, one at a time, on tiny models
# -----------------------------------------------------------------------------


def test_bigram_bucket_formula():
    h = tg.Hyperparameters()
    bigram = tg.BigramHash(h)
    M = h.bigram_vocab_size - 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 65536, (3, 50), generator=g)
    ids[0, :4] = torch.tensor([65535, 65535, 0, 59139])  # large ids: both products overflow int32
    got = bigram.bucket_ids(ids)
    want = torch.tensor([[M] + [bucket_ref(int(r[i - 1]), int(r[i]), M) for i in range(1, r.numel())]
                         for r in ids])
    assert any(36313 * int(t) >= 2**31 for t in ids.flatten())  # the wrap-around is exercised
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got[:, 1:].max()) < M


def capture_x0(store: dict):
    """Forward pre-hook recording the x0 (smeared input) handed to a block."""
    def hook(module, args):
        store.setdefault("x0", args[1].clone())
    return hook


def test_input_path_bigram_rmsnorm_smeargate():
    h = tiny_h()
    torch.manual_seed(0)
    model = tg.GPT(h)
    randomize_(model, 1)
    ids = torch.randint(0, h.vocab_size, (2, 12))
    captured = {}
    model.blocks[0].register_forward_pre_hook(capture_x0(captured))
    model.forward_hidden(ids)
    # x = rmsnorm(tok_emb[ids] + proj(embed[bucket]) * scale); x += λ σ(w·x[:12]) x_prev.
    M = h.bigram_vocab_size - 1
    buckets = torch.tensor([[M] + [bucket_ref(int(r[i - 1]), int(r[i]), M) for i in range(1, r.numel())] for r in ids])
    with torch.no_grad():
        e = model.tok_emb.weight[ids] + (model.bigram.embed.weight[buckets] @ model.bigram.proj.weight.T) * model.bigram.scale
        x = ref_rms(e)
        x_prev = torch.zeros_like(x)
        x_prev[:, 1:] = x[:, :-1]
        gate = model.smear_lambda * torch.sigmoid(x[..., :12] @ model.smear_gate.weight.T)
        want = x + gate * x_prev
    assert model.smear_lambda.item() != 0 and gate.abs().min() > 0
    torch.testing.assert_close(captured["x0"], want, rtol=1e-5, atol=1e-5)
    # Position 0 has no predecessor: it is exactly the normalised embedding.
    torch.testing.assert_close(captured["x0"][:, 0], x[:, 0], rtol=1e-5, atol=1e-6)


def test_smear_mask_bos_blocks_the_previous_document():
    ids = torch.tensor([[5, 9, 1, 7, 1, 1, 3]])  # BOS (id 1) at positions 2, 4, 5
    outs = {}
    for mask in (False, True):
        h = tiny_h(smear_mask_bos=mask)
        model = tg.GPT(h)
        randomize_(model, 2)
        captured = {}
        model.blocks[0].register_forward_pre_hook(capture_x0(captured))
        with torch.no_grad():
            model.forward_hidden(ids)
            e = model.tok_emb.weight[ids] + model.bigram(ids)
            x = ref_rms(e)
            gate = model.smear_lambda * torch.sigmoid(x[..., :12] @ model.smear_gate.weight.T)
            x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
            if mask:
                gate = gate * (ids != 1)[..., None]
            want = x + gate * x_prev
        torch.testing.assert_close(captured["x0"], want, rtol=1e-5, atol=1e-5)
        outs[mask] = (captured["x0"], x)
    x0, x = outs[True]
    bos = ids[0] == 1
    torch.testing.assert_close(x0[0, bos], x[0, bos], rtol=0, atol=1e-6)  # BOS takes nothing
    assert (x0[0, 3] - x[0, 3]).abs().max() > 1e-3  # the token after BOS still smears from BOS
    x0_unmasked, _ = outs[False]
    assert (x0_unmasked[0, bos] - x[0, bos]).abs().max() > 1e-3  # the record's default does not mask


@pytest.mark.parametrize("T, train_seq_len", [(12, 16), (16, 16), (40, 16)])
def test_partial_rotary(T, train_seq_len):
    rope_dims, base, D = 16, 10000.0, 32
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 3, D, generator=g)
    cos, sin = tg.rotary_cos_sin(T, rope_dims, base, train_seq_len, x.device, x.dtype)
    got = tg.apply_partial_rotary(x, cos, sin)
    assert torch.equal(got[..., rope_dims:], x[..., rope_dims:])  # content dims untouched, bit for bit
    want = ref_rotary(x, rope_dims, base, train_seq_len)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The stretch is base·(T/L)^(16/14): applying the unstretched base instead must differ at T > L.
    unstretched = ref_rotary(x, rope_dims, base, T)
    if T > train_seq_len:
        assert (got - unstretched).abs().max() > 1e-2
    else:
        torch.testing.assert_close(got, unstretched, rtol=1e-4, atol=1e-4)


def test_causal_attention_gqa_matches_naive():
    g = torch.Generator().manual_seed(3)
    B, T, H, Hkv, D = 2, 9, 6, 2, 8
    q, k, v = (torch.randn(B, T, n, D, generator=g) for n in (H, Hkv, Hkv))
    got = tg.causal_attention(q, k, v)
    torch.testing.assert_close(got, naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
    # Interleaved grouping (h % Hkv) would be a different function: the check above can tell.
    wrong = torch.stack([naive_attention(q[:, :, h:h + 1], k[:, :, h % Hkv:h % Hkv + 1],
                                         v[:, :, h % Hkv:h % Hkv + 1])[:, :, 0] for h in range(H)], dim=2)
    assert (got - wrong).abs().max() > 1e-2


def make_attention(h: tg.Hyperparameters, use_xsa: bool, seed: int) -> tg.CausalSelfAttention:
    attn = tg.CausalSelfAttention(h, use_xsa=use_xsa)
    randomize_(attn, seed)
    with torch.no_grad():
        attn.q_gain.uniform_(0.5, 2.0)
    return attn


@pytest.mark.parametrize("use_xsa", [True, False])
def test_attention_module_matches_reference(use_xsa):
    h = tiny_h()
    attn = make_attention(h, use_xsa, seed=4)
    a = torch.randn(2, 10, h.model_dim, generator=torch.Generator().manual_seed(5))
    cos, sin = tg.rotary_cos_sin(10, h.rope_dims, h.rope_base, h.train_seq_len, a.device, a.dtype)
    with torch.no_grad():
        got = attn(a, cos, sin)
        want = ref_attention(attn, a, h, h.gate_width)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_xsa_output_is_orthogonal_to_own_value():
    h = tiny_h()
    a = torch.randn(2, 10, h.model_dim, generator=torch.Generator().manual_seed(6))
    cos, sin = tg.rotary_cos_sin(10, h.rope_dims, h.rope_base, h.train_seq_len, a.device, a.dtype)
    group = h.num_heads // h.num_kv_heads
    dots = {}
    for use_xsa in (True, False):
        attn = make_attention(h, use_xsa, seed=7)
        with torch.no_grad():
            attn.proj.weight.copy_(torch.eye(h.model_dim))  # read y directly
            attn.attn_gate_proj.weight.zero_()  # gate = 2σ(0) = 1
            y = attn(a, cos, sin).view(2, 10, h.num_heads, h.head_dim)
            v = (a @ attn.c_v.weight.T).view(2, 10, h.num_kv_heads, h.head_dim)
            v_hat = v / v.norm(dim=-1, keepdim=True)
            dots[use_xsa] = torch.stack([(y[:, :, hh] * v_hat[:, :, hh // group]).sum(-1)
                                         for hh in range(h.num_heads)])
            # The XSA output is the plain attention output minus its v̂ component (reference).
            if use_xsa:
                q = (a @ attn.c_q.weight.T).view(2, 10, h.num_heads, h.head_dim)
                k = (a @ attn.c_k.weight.T).view(2, 10, h.num_kv_heads, h.head_dim)
                q = ref_rotary(ref_rms(q), h.rope_dims, h.rope_base, h.train_seq_len) * attn.q_gain[None, None, :, None]
                k = ref_rotary(ref_rms(k), h.rope_dims, h.rope_base, h.train_seq_len)
                plain = naive_attention(q, k, v)
                for hh in range(h.num_heads):
                    vh = v_hat[:, :, hh // group]
                    want = plain[:, :, hh] - (plain[:, :, hh] * vh).sum(-1, keepdim=True) * vh
                    torch.testing.assert_close(y[:, :, hh], want, rtol=1e-4, atol=1e-4)
    assert dots[True].abs().max() < 1e-5
    assert dots[False].abs().max() > 1e-2  # without XSA the component is there


def test_attention_output_gate_is_two_sigmoid():
    h = tiny_h()
    gated = make_attention(h, True, seed=8)
    plain = tg.CausalSelfAttention(tiny_h(gate_attn_out=False), use_xsa=True)
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert missing == [] and unexpected == ["attn_gate_proj.weight"]
    a = torch.randn(1, 7, h.model_dim, generator=torch.Generator().manual_seed(9))
    cos, sin = tg.rotary_cos_sin(7, h.rope_dims, h.rope_base, h.train_seq_len, a.device, a.dtype)
    with torch.no_grad():
        for m in (gated, plain):
            m.proj.weight.copy_(torch.eye(h.model_dim))
        yg = gated(a, cos, sin).view(1, 7, h.num_heads, h.head_dim)
        yp = plain(a, cos, sin).view(1, 7, h.num_heads, h.head_dim)
        gate = 2 * torch.sigmoid(a[..., :12] @ gated.attn_gate_proj.weight.T)  # (1, 7, H)
    torch.testing.assert_close(yg, yp * gate[..., None], rtol=1e-5, atol=1e-6)
    assert (gate - 1).abs().max() > 0.1


@pytest.mark.parametrize("layer", [1, 3])  # parallel_residual_start=2: layer 1 sequential, 3 parallel
def test_block_formulas(layer):
    h = tiny_h()
    block = tg.Block(h, layer)
    randomize_(block, 10 + layer)
    assert block.parallel == (layer >= 2)
    g = torch.Generator().manual_seed(11)
    x, x0 = torch.randn(2, 6, h.model_dim, generator=g), torch.randn(2, 6, h.model_dim, generator=g)
    cos, sin = tg.rotary_cos_sin(6, h.rope_dims, h.rope_base, h.train_seq_len, x.device, x.dtype)
    s = 1 / math.sqrt(layer + 1)
    with torch.no_grad():
        got = block(x, x0, cos, sin)
        x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
        a = ref_rms(x_in) * s
        attn = block.attn(a, cos, sin)
        mlp_ref = lambda u: (F.leaky_relu(u @ block.mlp.fc.weight.T, 0.5) ** 2) @ block.mlp.proj.weight.T
        if layer >= 2:
            want = x_in + block.attn_scale * attn + block.mlp_scale * mlp_ref(a)
        else:
            hh = x_in + block.attn_scale * attn
            want = hh + block.mlp_scale * mlp_ref(ref_rms(hh) * s)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("looping", [True, False])
def test_unet_skips_lerp(looping):
    h = tiny_h()
    model = tg.GPT(h)
    randomize_(model, 12)
    model.looping_active = looping
    calls = []
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda mod, args, i=i: calls.append([i, args[0].clone(), None]))
        b.register_forward_hook(lambda mod, args, out: calls[-1].__setitem__(2, out.clone()))
    ids = torch.randint(0, h.vocab_size, (2, 8), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        model.forward_hidden(ids)
    # Tiny order: looping [0] + 2x[1,2] + [3] -> enc [0,1,2], dec [1,2,3]; plain enc [0,1], dec [2,3].
    enc, dec = ([0, 1, 2], [1, 2, 3]) if looping else ([0, 1], [2, 3])
    assert [c[0] for c in calls] == enc + dec
    n_skips = 3  # min(len enc, len dec) of the looped order
    assert tuple(model.skip_weights.shape) == (n_skips, h.model_dim)
    stack = [c[2] for c in calls[: len(enc)]]
    x = calls[len(enc) - 1][2]
    used = 0
    with torch.no_grad():
        for j in range(len(dec)):
            if j < n_skips and stack:
                k = model.skip_weights[j] * stack.pop()
                x = k + torch.sigmoid(model.skip_gates[j]) * (x - k)
                used += 1
            torch.testing.assert_close(calls[len(enc) + j][1], x, rtol=1e-5, atol=1e-5)
            x = calls[len(enc) + j][2]
    assert used == min(len(enc), len(dec))


def test_softcap_bounds_tied_logits():
    h = tiny_h()
    model = tg.GPT(h)
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000.0)  # std 5: raw logits of |z| in the hundreds
    ids = torch.randint(0, h.vocab_size, (2, 8), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        hidden = model.forward_hidden(ids)
        z = hidden @ model.tok_emb.weight.T  # tied head
        logits = model.forward_logits(ids)
    assert z.abs().max() > 90
    torch.testing.assert_close(logits, 30 * torch.tanh(z / 30), rtol=1e-5, atol=1e-4)
    assert logits.abs().max() <= 30


def test_one_forward_for_mean_and_per_token_loss():
    h = tiny_h()
    model = tg.GPT(h)
    randomize_(model, 15, std=0.1)
    g = torch.Generator().manual_seed(16)
    x, y = torch.randint(0, h.vocab_size, (3, 10), generator=g), torch.randint(0, h.vocab_size, (3, 10), generator=g)
    with torch.no_grad():
        mean = model(x, y)
        per_token = model(x, y, reduction="none")
        logp = model.forward_logits(x).float().log_softmax(-1)
        want = -logp.gather(-1, y[..., None])[..., 0]
    assert per_token.shape == y.shape and per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, per_token.mean(), rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# Initialisation
# -----------------------------------------------------------------------------


def test_initialisation():
    torch.manual_seed(17)
    h = tg.Hyperparameters(vocab_size=256, num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1,
                           mlp_mult=2.0, rope_dims=16, xsa_last_n=2, parallel_residual_start=1, num_loops=0,
                           bigram_vocab_size=64, bigram_dim=32, train_seq_len=16, train_batch_tokens=128,
                           grad_accum_steps=1, eval_seq_len=16, eval_stride=8, ttt_chunk_tokens=64)
    model = tg.GPT(h)
    sd = dict(model.named_parameters())
    zero = [k for k in sd if k.endswith(("attn.proj.weight", "mlp.proj.weight", "attn_gate_proj.weight"))]
    zero += ["smear_gate.weight", "bigram.embed.weight", "skip_gates", "smear_lambda"]
    assert len(zero) == 2 * 3 + 4
    for k in zero:
        assert torch.count_nonzero(sd[k]) == 0, k
    ortho = [k for k in sd if k.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "mlp.fc.weight"))]
    ortho.append("bigram.proj.weight")  # orthogonal although 32 < 64 (SPEC: proj orthogonal, gain 1)
    for k in ortho:
        w = sd[k].detach().double()
        gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.size(0), dtype=torch.float64), rtol=0, atol=1e-5, msg=k)
    emb = sd["tok_emb.weight"].detach()
    assert abs(emb.std().item() - 0.005) < 0.00015 and abs(emb.mean().item()) < 0.0002
    for k in sd:
        if k.endswith(("attn_scale", "mlp_scale")) or k == "skip_weights":
            assert torch.equal(sd[k], torch.ones_like(sd[k])), k
        if k.endswith("resid_mix"):
            assert torch.equal(sd[k][0], torch.ones(128)) and torch.equal(sd[k][1], torch.zeros(128))
        if k.endswith("q_gain"):
            assert torch.equal(sd[k], torch.full((2,), 5.0))
    assert sd["bigram.scale"].item() == pytest.approx(0.05)


# -----------------------------------------------------------------------------
# Optimizer groups
# -----------------------------------------------------------------------------


def test_optimizer_groups_full_config(full_model):
    h, model = full_model
    names = {id(p): n for n, p in model.named_parameters()}
    matrix, scalar, token = tg.split_params(model, h)
    want_matrix = {f"blocks.{l}.{m}.weight" for l in range(11)
                   for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert len(want_matrix) == 66
    want_matrix |= {"bigram.proj.weight", "smear_gate.weight"}
    want_scalar = {f"blocks.{l}.{n}" for l in range(11)
                   for n in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.attn_gate_proj.weight")}
    want_scalar |= {"skip_weights", "skip_gates", "bigram.scale", "smear_lambda"}
    got_matrix, got_scalar, got_token = ([names[id(p)] for p in g] for g in (matrix, scalar, token))
    assert len(got_matrix) == len(set(got_matrix)) == 68 and set(got_matrix) == want_matrix
    assert len(got_scalar) == len(set(got_scalar)) and set(got_scalar) == want_scalar
    assert got_token == ["tok_emb.weight"]  # bigram.embed.weight is in no group (record quirk)
    assert set(got_matrix) | set(got_scalar) | set(got_token) | {"bigram.embed.weight"} == set(names.values())

    opts = tg.build_optimizers(model, h, is_cuda=False)
    token_opt, scalar_opt, muon = opts
    assert isinstance(muon, tg.Muon)
    assert [names[id(p)] for p in token_opt.param_groups[0]["params"]] == ["tok_emb.weight"]
    assert token_opt.param_groups[0]["lr"] == 0.03 and token_opt.param_groups[0]["weight_decay"] == 0.085
    assert scalar_opt.param_groups[0]["lr"] == 0.02 and scalar_opt.param_groups[0]["weight_decay"] == 0.02
    for o in (token_opt, scalar_opt):
        assert o.param_groups[0]["betas"] == (0.9, 0.95) and o.param_groups[0]["eps"] == 1e-8
    mg = muon.param_groups[0]
    assert (mg["lr"], mg["momentum"], mg["weight_decay"], mg["backend_steps"], mg["row_normalize"], mg["nesterov"]) \
        == (0.022, 0.99, 0.095, 5, True, True)
    in_any = {names[id(p)] for o in opts for g in o.param_groups for p in g["params"]}
    assert "bigram.embed.weight" not in in_any


def test_bigram_train_embed_switch_adds_it_to_token_group():
    h = tiny_h(bigram_train_embed=True)
    model = tg.GPT(h)
    names = {id(p): n for n, p in model.named_parameters()}
    token_opt = tg.build_optimizers(model, h, is_cuda=False)[0]
    assert [names[id(p)] for p in token_opt.param_groups[0]["params"]] == ["tok_emb.weight", "bigram.embed.weight"]


# -----------------------------------------------------------------------------
# Muon and the schedule
# -----------------------------------------------------------------------------


def ref_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton–Schulz in bf16 on the wide orientation, Frobenius-normalised input."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.T if tall else X).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_muon_single_step_matches_torch_muon(shape):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    g = torch.Generator().manual_seed(18)
    w0, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lr, m = 0.05, 0.95
    ours = torch.nn.Parameter(w0.clone())
    ours.grad = grad.clone()
    tg.Muon([ours], lr=lr, momentum=m, backend_steps=5, weight_decay=0.0, row_normalize=False).step()
    theirs = torch.nn.Parameter(w0.clone())
    theirs.grad = grad.clone()
    torch.optim.Muon([theirs], lr=lr, weight_decay=0.0, momentum=m, nesterov=True, ns_coefficients=NS_COEFFS,
                     ns_steps=5, adjust_lr_fn="original").step()
    d_ours, d_theirs = (ours.detach() - w0), (theirs.detach() - w0)
    # Torch's momentum is an EMA, ours is buf = m·buf + g; from zero both are multiples of g, and
    # Newton–Schulz normalises the scale away, so only bf16 rounding separates the two: each
    # implementation is 1-4% from an fp64 Newton–Schulz; one NS step fewer is ~35% off, a
    # missing sqrt(rows/cols) 29%.
    assert d_theirs.norm() > 0.1 * lr
    assert rel_err(d_ours, d_theirs) < 6e-2


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_muon_row_normalised_two_steps_with_weight_decay(shape):
    g = torch.Generator().manual_seed(19)
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 5 for _ in range(2)]
    lr, m, wd = 0.04, 0.9, 0.1
    p = torch.nn.Parameter(w0.clone())
    opt = tg.Muon([p], lr=lr, momentum=m, backend_steps=5, weight_decay=wd, row_normalize=True)
    ref, buf = w0.clone(), torch.zeros(shape)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        buf = m * buf + grad
        nesterov = grad + m * buf
        rows = nesterov / nesterov.norm(dim=1, keepdim=True)
        update = ref_newton_schulz(rows) * math.sqrt(max(1.0, shape[0] / shape[1]))
        step_ref = ref * (1 - lr * wd) - lr * update
        assert rel_err(p.detach() - ref, step_ref - ref) < 6e-2  # bf16 Newton–Schulz noise is ~3%
        ref = p.detach().clone()  # continue from the actual iterate so errors do not compound


def test_muon_weight_decay_is_decoupled():
    g = torch.Generator().manual_seed(20)
    w0 = torch.randn(32, 64, generator=g)
    lr, wd = 0.05, 0.2
    for row_normalize in (True, False):
        p = torch.nn.Parameter(w0.clone())
        p.grad = torch.zeros_like(w0)
        tg.Muon([p], lr=lr, momentum=0.9, backend_steps=5, weight_decay=wd, row_normalize=row_normalize).step()
        torch.testing.assert_close(p.detach(), w0 * (1 - lr * wd), rtol=1e-7, atol=0)


@pytest.mark.parametrize("min_lr", [0.0, 0.1])
def test_lr_multiplier(min_lr):
    def spec(frac):
        return max((1 - frac) / 0.72, min_lr) if frac >= 0.28 else 1.0
    for frac in (0.0, 0.1, 0.27, 0.2799, 0.281, 0.3, 0.5, 0.64, 0.9, 0.95, 1.0, 1.1):
        assert tg.lr_multiplier(frac, 0.72, min_lr) == pytest.approx(spec(frac), abs=1e-12), frac
    assert tg.lr_multiplier(0.64, 0.72, min_lr) == pytest.approx(0.5)


def test_training_frac():
    h = tiny_h(max_wallclock_seconds=600.0, gptq_reserve_seconds=12.0, iterations=100)
    assert tg.training_frac(h, 3, 294_000.0) == pytest.approx(294.0 / 588.0)
    assert tg.training_frac(h, 3, 588_000.0) == pytest.approx(1.0)
    h0 = tiny_h(max_wallclock_seconds=0.0, iterations=200)
    assert tg.training_frac(h0, 50, 1e9) == pytest.approx(0.25)


# -----------------------------------------------------------------------------
# The record's grad-clip quirk: bigram.embed has a gradient but no optimizer
# -----------------------------------------------------------------------------


class FixedLoader:
    def __init__(self, vocab: int, seq_len: int, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.seq_len = vocab, seq_len

    def next_batch(self, rows: int):
        t = torch.randint(0, self.vocab, (rows, self.seq_len + 1), generator=self.g)
        return t[:, :-1], t[:, 1:]


def raw_grads(model: tg.GPT, x, y) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_grad_clip_quirk_bigram_embed_stays_zero_and_accumulates():
    torch.manual_seed(21)
    h = tiny_h()
    model = tg.GPT(h)
    rt = tg.Runtime(h, environ={})  # one CPU process
    trainer = tg.Trainer(h, rt, model)
    rows = rt.micro_batch_seqs
    data = FixedLoader(h.vocab_size, h.train_seq_len, seed=22)
    batches = [data.next_batch(rows) for _ in range(2)]
    replay = iter(batches)
    loader = types.SimpleNamespace(next_batch=lambda r: next(replay))
    carried = torch.zeros_like(model.bigram.embed.weight)
    for step, (x, y) in enumerate(batches):
        raw = raw_grads(model, x, y)
        fresh = raw["bigram.embed.weight"]
        raw["bigram.embed.weight"] = fresh + carried  # nobody zeroed it
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in raw.values()))
        coef = min(1.0, h.grad_clip_norm / (total + 1e-6))
        assert coef < 1.0  # clipping is active, so the factor is observable
        trainer.step(loader, step, 1.0)
        emb = model.bigram.embed.weight
        assert torch.count_nonzero(emb) == 0  # never updated, so the branch contributes exactly zero
        assert emb.grad is not None and emb.grad.abs().max() > 0
        torch.testing.assert_close(emb.grad, coef * raw["bigram.embed.weight"], rtol=1e-4, atol=1e-9)
        carried = emb.grad.detach().clone()
        others = [n for n, p in model.named_parameters() if n != "bigram.embed.weight" and p.grad is not None]
        assert others == []  # every optimized parameter's gradient was cleared
    # After two steps the gradient holds both steps' contributions, not only the last one.
    assert rel_err(carried, coef * fresh) > 0.05


def test_warm_up_restores_state_but_keeps_the_stray_bigram_gradient():
    # The record restores weights and optimizer state after warm-up and clears gradients through
    # its optimizers only, so bigram.embed enters the timed run with the warm-up's gradient.
    torch.manual_seed(23)
    h = tiny_h(warmup_steps=3)
    model = tg.GPT(h)
    trainer = tg.Trainer(h, tg.Runtime(h, environ={}), model)
    before = copy.deepcopy(model.state_dict())
    data = FixedLoader(h.vocab_size, h.train_seq_len, seed=24)
    tg.warm_up(h, trainer, data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not o.state for o in trainer.optimizers)  # momentum buffers back to empty
    assert model.looping_active is False
    emb = model.bigram.embed.weight
    assert emb.grad is not None and emb.grad.abs().max() > 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["bigram.embed.weight"]
