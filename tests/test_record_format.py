"""The record's own artifact layout (SPEC §5), both ways. A writer and a reader written here from
SPEC's description alone (not train_gpt's) stand in for the record's code: the record's blob,
with its size-based category choice, evaluates under EVAL_ONLY exactly as the same weights do
in-process; and our blob carries the record's key names, dtypes and labels, so the record's
reading of it gives our dequantized weights."""

from __future__ import annotations

import io
import re

import brotli
import pytest
import torch

from conftest import TINY_MODEL, read_log, run_main, tiny_hparams

import logformat
import train_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny config where every record category occurs under the record's size rule: tok_emb
# (384 x 192) and mlp.fc/proj (384 x 192) have > 65,536 values, so they are GPTQ; the attention
# matrices (<= 36,864 values) are fp16 passthrough, as the record stores them in small configs;
# bigram.embed (4096 x 32) is the record's int6 per-row table.
WIDE = dict(model_dim=192, bigram_vocab_size=4096, bigram_dim=32)
CONFIG = dict(TINY_MODEL, **{k.upper(): str(v) for k, v in WIDE.items()})  # the same, as a run's variables
CONTROL = ("attn_scale", "mlp_scale", "resid_mix", "skip_gates", "skip_weights")
SMALL_MATRIX = ("bigram.proj.weight", "attn_gate_proj.weight", "smear_gate.weight")


def hparams(**extra) -> train_gpt.Hyperparameters:
    return tiny_hparams(**{**WIDE, **extra})


def record_write(state: dict, g: torch.Generator) -> tuple[dict, dict, dict]:
    """The record's blob dict from a state dict: by size first (> 65,536 values: GPTQ, or int6
    per row for bigram.embed), then Path A v3 for the rest. The codes are plain rounding with
    the record's scale shapes and dtypes (the layout, not GPTQ, is under test). Returns
    (w, m, the weights the blob stands for)."""
    w, m, weights = {}, {}, {}
    for name, t in state.items():
        t = t.float()
        if t.numel() > 65536:
            if name == "bigram.embed.weight":
                label, R = "simple int6 (bigram embed)", 31
            else:
                label, R = ("gptq (int8)", 127) if name == "tok_emb.weight" else ("gptq (int6)", 31)
            scale = (t.abs().amax(dim=1) / R).half()
            q = torch.clamp(torch.round(t / scale.float()[:, None]), -R, R).to(torch.int8)
            w[name + ".q"], w[name + ".scale"] = q, scale
            weights[name] = q.float() * scale.float()[:, None]
        elif any(name.endswith(c) for c in CONTROL):
            label = "pertensor int8 (control)"
            scale = (t.abs().max() / 127).reshape(())
            q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
            w[name + ".q_pt"], w[name + ".scale_pt"] = q, scale.float()
            weights[name] = q.float() * scale
        elif name.endswith(SMALL_MATRIX):
            label = "simple int8 (small matrix)"
            scale = (t.abs().amax(dim=1) / 127).half()
            q = torch.clamp(torch.round(t / scale.float()[:, None]), -127, 127).to(torch.int8)
            w[name + ".q"], w[name + ".scale"] = q, scale
            weights[name] = q.float() * scale.float()[:, None]
        else:
            label = "passthrough (float16)"
            w[name] = t.half()
            weights[name] = t.half().float()
        m[name] = label
    w["logit_temp"] = torch.ones(1).half()  # the record's unused buffer
    m["logit_temp"] = "passthrough (float16)"
    return w, m, weights


def record_blob(w: dict, m: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    raw = buf.getvalue()
    return brotli.compress(b"BSHF" + bytes([2]) + raw[0::2] + raw[1::2], quality=11)


def record_read(w: dict, m: dict) -> dict:
    """How the record's code dequantizes: by method label."""
    out = {}
    for name, label in m.items():
        if label == "passthrough (float16)":
            assert w[name].dtype == torch.float16, name
            out[name] = w[name].float()
        elif label == "pertensor int8 (control)":
            q, s = w[name + ".q_pt"], w[name + ".scale_pt"]
            assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (), name
            out[name] = q.float() * s
        else:
            assert re.fullmatch(r"gptq \(int\d\)|simple int6 \(bigram embed\)|simple int8 \(small matrix\)", label), label
            q, s = w[name + ".q"], w[name + ".scale"]
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (q.shape[0],), name
            out[name] = q.float() * s.float()[:, None]
    return out


def trained_like_state(h, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for p in model.parameters():  # move every tensor off its (often constant) init
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_record_blob_covers_every_label_and_the_size_rule():
    h = hparams()
    w, m, _ = record_write(trained_like_state(h), torch.Generator().manual_seed(0))
    assert set(m.values()) == {"gptq (int6)", "gptq (int8)", "simple int6 (bigram embed)", "simple int8 (small matrix)",
                               "pertensor int8 (control)", "passthrough (float16)"}
    assert m["blocks.0.attn.c_q.weight"] == "passthrough (float16)"  # a block matrix of <= 65,536 values
    assert m["blocks.0.mlp.fc.weight"] == "gptq (int6)"


def test_eval_only_reads_the_records_blob(tiny_data, tmp_path, monkeypatch):
    """EVAL_ONLY=1 on a blob in the record's layout gives exactly the score of the weights it
    stands for, evaluated here in-process."""
    h = hparams(data_dir=tiny_data["data_dir"], eval_seq_len=128)
    w, m, weights = record_write(trained_like_state(h), torch.Generator().manual_seed(0))
    path = tmp_path / "record.int6.ptz"
    path.write_bytes(record_blob(w, m))

    rt = train_gpt.Runtime(h)
    model = train_gpt.GPT(h)
    train_gpt.load_into_model(model, weights, "reference")
    model.looping_active = True
    luts = train_gpt.build_sentencepiece_luts(train_gpt.load_tokenizer(h), h.vocab_size, rt.device)
    val = train_gpt.load_validation_tokens(h.val_files, h.eval_seq_len, h.vocab_size)
    loss, bpb, _ = train_gpt.evaluate_plain(h, rt, model, val, luts)

    env = dict(CONFIG, DATA_DIR=tiny_data["data_dir"], RUN_ID="record_blob", EVAL_ONLY="1", EVAL_SEQ_LEN="128",
               QUANTIZED_MODEL_PATH=str(path), SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0")
    assert run_main(env, monkeypatch, tmp_path) == 0  # in this process and thread count, as the reference
    stages = logformat.lines_of(read_log(tmp_path, "record_blob"), "stage")
    (loss1, bpb1), = (m.group(2, 3) for m in stages if m.group(1) == "quantized")
    assert abs(float(loss1) - loss) <= 1e-6 and abs(float(bpb1) - bpb) <= 1e-6, (loss1, bpb1, loss, bpb)


def test_our_blob_is_in_the_records_layout():
    """Our writer's keys, dtypes and labels are the record's, so its reader (record_read) gives
    exactly our dequantized weights; only the categories differ where SPEC says they do (we GPTQ
    the block matrices the record would keep fp16 in a small config)."""
    h = hparams()
    state = trained_like_state(h)
    hessians = {n: torch.eye(t.shape[1]) for n, t in state.items()
                if train_gpt.quant_category(n, t).startswith("gptq")}
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    ours = train_gpt.dequantize_state_dict(w, m)
    theirs = record_read(w, m)
    assert set(ours) == set(theirs) == set(state)
    for name in state:
        assert torch.equal(ours[name], theirs[name]), name
    assert m["tok_emb.weight"] == "gptq (int8)" and m["blocks.0.mlp.fc.weight"] == "gptq (int6)"
    assert m["skip_weights"] == "pertensor int8 (control)" and "skip_weights.q" not in w
    assert m["bigram.embed.weight"] == "simple int6 (bigram embed)"
    assert m["smear_gate.weight"] == "simple int8 (small matrix)"
    assert m["blocks.0.attn.q_gain"] == "passthrough (float16)"
    # and through the compressed blob, read back by the record's own path (unshuffle + torch.load)
    raw = brotli.decompress(train_gpt.compress_blob(w, m, "brotli"))
    assert raw[:5] == b"BSHF\x02"
    n = len(raw) - 5
    body = bytearray(n)
    body[0::2], body[1::2] = raw[5:5 + (n + 1) // 2], raw[5 + (n + 1) // 2:]
    obj = torch.load(io.BytesIO(bytes(body)), map_location="cpu", weights_only=True)
    assert obj["m"] == m and set(obj["w"]) == set(w)


def test_embed_bits_label_follows_the_bit_width():
    h = hparams(embed_bits=7)
    state = trained_like_state(h)
    hessians = {n: torch.eye(t.shape[1]) for n, t in state.items()
                if train_gpt.quant_category(n, t).startswith("gptq")}
    w, m = train_gpt.quantize_state_dict(state, hessians, h)
    assert m["tok_emb.weight"] == "gptq (int7)"
    assert w["tok_emb.weight.q"].abs().max().item() <= 63
