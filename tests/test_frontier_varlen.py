"""VARLEN=1 (the frontier preset's training data path): the document-packed sequential loader, its
cu_seqlens and document-isolated attention, against references written here from the rules:

- cu_seqlens: a segment starts at the row's first token, at every BOS and every TRAIN_SEQ_LEN tokens
  into a document; the list ends with the row length, repeated to a multiple of 64 entries;
- attention within segments equals each segment run alone (a hand-written softmax loop, SDPA per
  segment, the model on each document alone);
- the loader: every rank reads every shard in order from its first BOS, a micro-step is WORLD_SIZE
  consecutive spans of rows x TRAIN_SEQ_LEN + 1 tokens (rank r the r-th), a shard tail too short
  for one is skipped, the stream wraps to the first shard;
- a run trains with it, restarts the stream after warm-up, calibrates GPTQ from the shuffled loader;
  a run with it off is the record's run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import read_log, run_main, tiny_hparams, write_shard
from test_cuda_path import HEAD_DIM, FA3StandIn
from test_train import train_losses, val_lines

import train_gpt as tg

BOS = 1
BUCKET = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_cu_seqlens(doc_starts, total: int, split: int) -> list[int]:
    """Walk the row token by token: a segment starts at 0, at a document start, or `split` tokens
    after the last segment start of the same document."""
    starts, doc = [], 0
    for p in range(total):
        if p in doc_starts:
            doc = p
        if p == 0 or p == doc or (p - doc) % split == 0:
            starts.append(p)
    bounds = starts + [total]
    return bounds + [total] * (-len(bounds) % BUCKET)


def naive_segment_attention(q, k, v, bounds):
    """Softmax attention one segment and one head at a time, causal inside the segment; query head
    h reads KV head h // (H/Hkv). q (T, H, D), k/v (T, Hkv, D)."""
    T, H, D = q.shape
    group = H // k.size(1)
    out = torch.full_like(q, float("nan"))
    for a, b in zip(bounds, bounds[1:]):
        for i in range(a, b):
            for h in range(H):
                scores = torch.stack([q[i, h] @ k[j, h // group] for j in range(a, i + 1)]) / math.sqrt(D)
                out[i, h] = torch.softmax(scores, 0) @ v[a: i + 1, h // group]
    return out


# -----------------------------------------------------------------------------
# cu_seqlens
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("doc_starts,total,split", [
    ([], 10, 4),  # a row inside one document: split from its first token
    ([0, 3, 9], 20, 4),  # a document of 6 split once, one of 11 split twice
    ([5, 6, 7], 30, 8),  # a row beginning mid-document; documents of one token
    (list(range(63)), 63, 8),  # 63 segments: exactly 64 entries, no padding
    (list(range(64)), 64, 8),  # 64 segments: 65 entries, padded to 128
    ([0, 17], 160, 16),  # a document of 143: nine segments of 16 and one of 15
])
def test_cu_seqlens_mark_documents_and_splits(doc_starts, total, split):
    cu = tg.packed_cu_seqlens(doc_starts, total, split)
    assert cu.dtype == torch.int32 and cu.dim() == 1
    assert cu.tolist() == ref_cu_seqlens(doc_starts, total, split)
    assert cu.numel() % BUCKET == 0
    lengths = cu.diff()
    assert lengths.min() >= 0 and lengths.max() <= split


# -----------------------------------------------------------------------------
# attention within documents
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [45, 48])  # the whole row's mask; blocks of 8 and the one before (8 divides T)
def test_varlen_attention_is_each_segment_alone(T):
    """Documents split at TRAIN_SEQ_LEN (8 here), GQA, padding entries: the SDPA mask path equals a
    softmax loop over each segment; no NaN, finite gradients; changing one document's queries,
    keys and values changes no other document's output."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, split = 4, 2, 16, 8
    q, k, v = (torch.randn(1, T, n, D, generator=g) for n in (H, Hkv, Hkv))
    cu = tg.packed_cu_seqlens([6, 9, 30], T, split)
    bounds = cu.tolist()
    assert bounds[:7] == [0, 6, 9, 17, 25, 30, 38] and bounds == ref_cu_seqlens([6, 9, 30], T, split)
    q.requires_grad_(True)
    y = tg.varlen_attention(q, k, v, cu, split)
    assert y.shape == (1, T, H, D) and not y.isnan().any()
    torch.testing.assert_close(y[0], naive_segment_attention(q[0].detach(), k[0], v[0], bounds), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert q.grad.isfinite().all()
    changed = [t.clone() for t in (q.detach(), k, v)]
    for t in changed:
        t[:, 9:30] = torch.randn(t[:, 9:30].shape, generator=g)  # the document that is split
    y2 = tg.varlen_attention(*changed, cu, split)
    assert torch.equal(y2[:, :9], y[:, :9].detach()) and torch.equal(y2[:, 30:], y[:, 30:].detach())
    assert not torch.equal(y2[:, 9:30], y[:, 9:30].detach())


@pytest.mark.parametrize("T,returns_tuple", [(70, True), (64, False)])
def test_sdpa_mask_path_equals_the_fa3_contract(monkeypatch, T, returns_tuple):
    """The CPU path (SDPA, block-diagonal causal mask) and the CUDA path (FA3's flash_attn_varlen_func,
    here its contract's stand-in, which runs each segment alone) agree on bf16 inputs of the record's
    head dimension; FA3 gets the flattened row, the padded int32 cu_seqlens and TRAIN_SEQ_LEN."""
    h = tiny_hparams(model_dim=4 * HEAD_DIM, num_heads=4, num_kv_heads=2, rope_dims=16)
    fa3 = FA3StandIn(h)
    g = torch.Generator().manual_seed(1)
    split = 32
    q, k, v = (torch.randn(1, T, n, HEAD_DIM, generator=g).bfloat16() for n in (4, 2, 2))
    cu = tg.packed_cu_seqlens([0, 11, 12], T, split)
    sdpa = tg.varlen_attention(q, k, v, cu, split)
    monkeypatch.setattr(tg, "FLASH_ATTN_VARLEN_FUNC", fa3.varlen if returns_tuple else lambda *a, **kw: fa3.varlen(*a, **kw)[0])
    flash = tg.varlen_attention(q, k, v, cu, split)
    assert fa3.varlen_calls == [(torch.bfloat16,) * 3 + (BUCKET,)]
    assert flash.shape == sdpa.shape == (1, T, 4, HEAD_DIM) and flash.dtype == torch.bfloat16
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


def packed_documents(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([BOS]), torch.randint(2, vocab, (n - 1,), generator=g)]) for n in lengths]
    return torch.cat(docs)[None], [sum(lengths[:i]) for i in range(len(lengths))]


def randomize_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("looping,lengths", [(False, [10, 37, 9]), (True, [10, 37, 9]), (True, [10, 37, 16, 1])])
def test_model_on_a_packed_row_is_each_segment_alone(looping, lengths):
    """The whole model (XSA, output gate, looped layers) on a packed row of 56 (or 64) tokens with
    TRAIN_SEQ_LEN=16 gives, at every position, the logits of its segment run alone: documents apart,
    the long one split every 16, rotary positions offsets in the row (relative phases unchanged, the
    base not stretched although the row is longer than TRAIN_SEQ_LEN). BigramHash and SmearGate are
    off: they read the previous token, across any boundary, in the packed row and in the record."""
    h = tiny_hparams(varlen=True, train_seq_len=16, bigram_vocab_size=0, smear_gate=False)
    torch.manual_seed(0)
    model = tg.GPT(h).eval()
    randomize_(model, 3)
    model.looping_active = looping
    ids, starts = packed_documents(lengths, h.vocab_size, 4)
    cu = tg.packed_cu_seqlens(starts, ids.size(1), h.train_seq_len)
    bounds = sorted(set(cu.tolist()))
    assert bounds == ([0, 10, 26, 42, 47, 56] if len(lengths) == 3 else [0, 10, 26, 42, 47, 63, 64])
    with torch.no_grad():
        packed = model.forward_logits(ids, cu_seqlens=cu)
        alone = torch.cat([model.forward_logits(ids[:, a:b]) for a, b in zip(bounds, bounds[1:])], dim=1)
        whole_row = model.forward_logits(ids)
        targets = torch.roll(ids, -1, 1)
        loss = model(ids, targets, cu_seqlens=cu)
        per_token = torch.cat([model(ids[:, a:b], targets[:, a:b], reduction="none") for a, b in zip(bounds, bounds[1:])], 1)
    torch.testing.assert_close(packed, alone, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(whole_row[:, 10:], alone[:, 10:], atol=1e-2)  # attention across documents differs
    torch.testing.assert_close(loss, per_token.mean(), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the loader
# -----------------------------------------------------------------------------


def first_bos(tokens: np.ndarray) -> int:
    return int(np.flatnonzero(tokens == BOS)[0])


def reference_micro_steps(shards: list[np.ndarray], world: int, n: int, steps: int):
    """(shard, start of rank 0's span) of each micro-step, from the rules."""
    out, i, cursor = [], 0, first_bos(shards[0])
    while len(out) < steps:
        if cursor + world * (n + 1) > len(shards[i]):
            i = (i + 1) % len(shards)
            cursor = first_bos(shards[i])
            continue
        out.append((i, cursor))
        cursor += world * (n + 1)
    return out


def train_shards(tiny_data) -> tuple[str, list[np.ndarray]]:
    pattern = str(Path(tiny_data["data_dir"]) / "datasets" / f"fineweb10B_sp{tiny_data['vocab_size']}" /
                  "fineweb_train_*.bin")
    return pattern, [np.asarray(tg.read_shard(f)) for f in tg.shard_files(pattern)]


def test_loader_stream_rank_slices_tails_and_cu_seqlens(tiny_data):
    """Two ranks on conftest's three train shards (the later ones begin mid-document), rows of
    4 x 64 tokens: every micro-step, wrapping round all shards once."""
    pattern, shards = train_shards(tiny_data)
    assert all(s[0] != BOS for s in shards[1:])  # a shard cut mid-document: its start is skipped
    world, rows, L = 2, 4, 64
    n = rows * L
    steps = sum((len(s) - first_bos(s)) // (world * (n + 1)) for s in shards) + 3
    loaders = [tg.DocumentPackedLoader(pattern, L, r, world, tiny_data["vocab_size"]) for r in range(world)]
    ref = reference_micro_steps(shards, world, n, steps)
    assert ref[-3][0] == 0 and ref[-3][1] == first_bos(shards[0])  # the comparison wrapped round
    last_end = {}
    for step, (i, start) in enumerate(ref):
        batches = [loader.next_batch(rows) for loader in loaders]
        for r, (x, y, cu) in enumerate(batches):
            span = shards[i][start + r * (n + 1): start + (r + 1) * (n + 1)].astype(np.int64)
            assert x.shape == y.shape == (1, n) and x.dtype == y.dtype == torch.int64
            assert np.array_equal(x[0].numpy(), span[:-1]) and np.array_equal(y[0].numpy(), span[1:]), (step, r)
            doc_starts = [p for p in range(n) if x[0, p] == BOS]  # from the row itself
            assert cu.tolist() == ref_cu_seqlens(doc_starts, n, L), (step, r)
        # Independently of the reference: the ranks' spans are consecutive, and tails are skipped.
        joined = np.concatenate([torch.cat([x[0], y[0, -1:]]).numpy() for x, y, _ in batches])
        assert np.array_equal(joined, shards[i][start: start + world * (n + 1)])
        if i in last_end and start < last_end[i]:  # back at this shard: it was left with a tail too short
            assert len(shards[i]) - last_end[i] < world * (n + 1)
        last_end[i] = start + world * (n + 1)
    assert {i for i, _ in ref} == {0, 1, 2}


def write_shards(tmp_path, shards) -> str:
    for i, s in enumerate(shards):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.asarray(s, dtype=np.uint16))
    return str(tmp_path / "fineweb_train_*.bin")


def doc_stream(n_tokens, seed, every=7, lead=()):
    rng = np.random.default_rng(seed)
    t = rng.integers(2, 50, n_tokens)
    t[len(lead)::every] = BOS
    t[: len(lead)] = lead
    return t


def test_loader_skips_short_shards_and_takes_an_exact_fit(tmp_path):
    """Micro-steps of 2 x 9 tokens (rows x L = 8): shard 0 starts with three tokens before its first
    BOS and fits exactly two micro-steps after it; shard 1 holds fewer than one after its first BOS
    and is skipped whole; shard 2 fits one, its tail is skipped; then shard 0 again."""
    shard0 = doc_stream(3 + 36, 0, lead=(5, 6, 7))
    shard1 = doc_stream(18, 1, lead=(9,))
    shard2 = doc_stream(30, 2)
    pattern = write_shards(tmp_path, [shard0, shard1, shard2])
    loaders = [tg.DocumentPackedLoader(pattern, 4, r, 2) for r in range(2)]
    starts = []
    for _ in range(4):
        x, y, cu = loaders[0].next_batch(2)
        loaders[1].next_batch(2)
        starts.append((loaders[0].shard, loaders[0].cursor - 18))
    assert starts == [(0, 3), (0, 21), (2, 0), (0, 3)]
    assert torch.equal(x[0], torch.from_numpy(shard0[3:11].astype(np.int64)))
    assert cu.tolist()[:5] == [0, 4, 7, 8, 8]  # a document of 7 split at 4, then one of 1


def test_loader_refusals(tmp_path):
    empty = tmp_path / "no_bos"
    empty.mkdir()
    pattern = write_shards(empty, [np.full(100, 5)])
    with pytest.raises(ValueError, match=r"VARLEN=1: training shard .*fineweb_train_000000.bin holds no BOS"):
        tg.DocumentPackedLoader(pattern, 4, 0, 1)

    later = tmp_path / "later_no_bos"
    later.mkdir()
    pattern = write_shards(later, [doc_stream(20, 0), np.full(100, 5)])
    loader = tg.DocumentPackedLoader(pattern, 4, 0, 1)
    loader.next_batch(2)
    loader.next_batch(2)
    with pytest.raises(ValueError, match="fineweb_train_000001.bin holds no BOS"):  # when the stream reaches it
        loader.next_batch(2)

    short = tmp_path / "short"
    short.mkdir()
    pattern = write_shards(short, [doc_stream(40, 0), doc_stream(30, 1)])
    loader = tg.DocumentPackedLoader(pattern, 8, 1, 2)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 x 33 tokens, but no shard of 2 .*the largest has 40"):
        loader.next_batch(4)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    tokens = doc_stream(40, 0)
    tokens[30] = 400
    pattern = write_shards(foreign, [tokens])
    with pytest.raises(ValueError, match="token id 400 >= VOCAB_SIZE=384"):
        tg.DocumentPackedLoader(pattern, 8, 0, 1, 384)


def test_settings_that_do_not_divide_are_refused_with_varlen():
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS=1000 is not a multiple"):
        tg.Runtime(tiny_hparams(varlen=True, train_batch_tokens=1000, train_seq_len=64, grad_accum_steps=2),
                   environ={})


def test_banded_mask_grows_linearly_with_the_row(monkeypatch):
    """Where TRAIN_SEQ_LEN divides the row (every training row), the SDPA path scores each block of
    TRAIN_SEQ_LEN queries against that block and the one before: at the record's 98,304-token rows
    2 x 98,304 x 2,048 mask entries (0.4 GB of booleans) rather than 98,304^2 (9.7 GB). Seen here as
    the mask SDPA is given; other rows get the whole row's mask."""
    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    q = torch.randn(1, 96, 2, 8)
    cu = tg.packed_cu_seqlens([0, 50], 96, 16)
    monkeypatch.setattr(tg.F, "scaled_dot_product_attention", spy)
    tg.varlen_attention(q, q, q, cu, 16)
    tg.varlen_attention(q[:, :90], q[:, :90], q[:, :90], tg.packed_cu_seqlens([0, 50], 90, 16), 16)
    assert shapes == [(6, 1, 16, 32), (90, 90)]


# -----------------------------------------------------------------------------
# runs
# -----------------------------------------------------------------------------


def test_varlen_off_is_the_record_run(quick_run, tmp_path, monkeypatch):
    env = dict(quick_run["env"], RUN_ID="varlen_off", VARLEN="0", QUANTIZED_MODEL_PATH=str(tmp_path / "off.ptz"))
    assert run_main(env, monkeypatch, tmp_path) == 0
    log = read_log(tmp_path, "varlen_off")
    assert "hparam:VARLEN=False" in log and "varlen_attention:" not in log
    assert train_losses(log) == train_losses(quick_run["log"]) and val_lines(log) == val_lines(quick_run["log"])


def test_varlen_run_restarts_the_stream_and_calibrates_from_shuffled_batches(quick_run, tiny_data, tmp_path,
                                                                            monkeypatch):
    """A tiny run with VARLEN=1: warm-up reads the stream from its start, training restarts it with
    a fresh loader (as the record does after warm-up), and GPTQ calibration draws the record's
    shuffled windows, GPTQ_CALIBRATION_BATCHES of them; the losses are finite and not the record's."""
    packed, shuffled = [], []

    class Packed(tg.DocumentPackedLoader):
        def __init__(self, *args):
            super().__init__(*args)
            self.served = []
            packed.append(self)

        def next_batch(self, rows):
            self.served.append((self.shard, self.cursor))
            x, y, cu = super().next_batch(rows)
            self.served[-1] += (x.shape, int(x[0, 0]))
            return x, y, cu

    class Shuffled(tg.ShuffledSequenceLoader):
        def next_batch(self, rows):
            shuffled.append(rows)
            return super().next_batch(rows)

    monkeypatch.setattr(tg, "DocumentPackedLoader", Packed)
    monkeypatch.setattr(tg, "ShuffledSequenceLoader", Shuffled)
    env = dict(quick_run["env"], RUN_ID="varlen_on", VARLEN="1", QUANTIZED_MODEL_PATH=str(tmp_path / "on.ptz"))
    assert run_main(env, monkeypatch, tmp_path) == 0
    log = read_log(tmp_path, "varlen_on")
    assert "varlen_attention:sdpa_mask tokens_per_row:1024 split:128" in log
    losses = train_losses(log)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses != train_losses(quick_run["log"])
    _, shards = train_shards(tiny_data)
    start = (0, first_bos(shards[0]), (1, 1024), BOS)
    warm, timed = packed
    assert len(warm.served) == 1 * 2 * 2 and len(timed.served) == 4 * 2  # steps x accumulation (x 2 looping phases)
    assert warm.served[0] == timed.served[0] == start
    assert [s[1] for s in timed.served] == [start[1] + 1025 * i for i in range(8)]  # one rank: spans of 1024 + 1
    assert shuffled == [8] * 4  # GPTQ_CALIBRATION_BATCHES micro-batches of micro_batch_seqs rows
