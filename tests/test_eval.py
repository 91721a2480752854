"""Evaluation: plain, sliding-window and score-first TTT.

The competition accepts an evaluation only under four conditions, each pinned here by tests
whose names start with `test_condition_`:

  (1) causal        - a prediction depends only on earlier tokens;
  (2) normalized    - the scored distribution is a proper softmax over the whole vocabulary;
  (3) score before update - no token is trained on before it has been scored;
  (4) single pass   - every validation target is scored exactly once.

Indexing used throughout: the stream has N+1 tokens and N targets; target j is token j+1,
predicted from tokens 0..j. A window (start, score_from, end) feeds tokens[start:end] and
scores targets score_from..end-1. A trace entry ("score", a, b) / ("train", a, b) covers the
targets a..b-1 (a "train" range also reads token b, the label of target b-1).

Everything runs in-process on tiny random models (one CPU thread), except the distributed test,
which launches tests/dist_eval_worker.py under torchrun with two gloo ranks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

import train_gpt  # noqa: E402

from conftest import TINY_VOCAB as V, tiny_hparams

# conftest's tiny model, which has every component of the record: bigram branch, SmearGate, gated
# XSA attention, depth recurrence (layers 1..2 twice), U-Net skips and parallel blocks.
RUN = dict(
    train_seq_len=64, train_batch_tokens=512, grad_accum_steps=1,
    eval_seq_len=64, eval_stride=16, eval_batch_seqs=32,
    ttt_chunk_tokens=256, ttt_epochs=2, ttt_lr=0.2, ttt_batch_seqs=32,
    compile=False, run_id="test_eval", seed=0,
)


def make_h(**overrides) -> train_gpt.Hyperparameters:
    return tiny_hparams(**{**RUN, **overrides})


def build_model(h, seed: int = 0, zero_bigram_embed: bool = False) -> train_gpt.GPT:
    """A deterministic GPT with every weight random and nonzero (the zero-initialised projections,
    gates and SmearGate perturbed), so that no branch is an identity or a no-op. Looping on."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "tok_emb.weight":
                p.copy_(0.1 * noise)
            elif name == "bigram.embed.weight":
                p.copy_(0.0 if zero_bigram_embed else 0.3 * noise)
            elif p.ndim == 2 and not p.any():  # zero-init linears and skip gates
                p.copy_(0.5 * noise / math.sqrt(p.shape[-1]))
            elif p.ndim == 0:  # bigram.scale, smear_lambda
                p.fill_(0.3 + 0.1 * float(noise))
            else:
                p.add_(0.05 * noise)
    model.looping_active = True
    return model


def make_stream(n_tokens: int, seed: int) -> torch.Tensor:
    """int64 token stream, BOS at position 0 and at random document starts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (n_tokens,), generator=g)
    tokens[torch.rand(n_tokens, generator=g) < 0.02] = 1
    tokens[0] = 1
    return tokens


def fake_luts(vocab: int = V):
    """Byte tables with a bit of everything: ids 0..3 are boundaries (0 bytes), others 1..3
    bytes, every other one with a leading space."""
    ids = torch.arange(vocab)
    is_boundary = ids < 4
    base_bytes = torch.where(is_boundary, 0, 1 + ids % 3).to(torch.int16)
    has_leading_space = (ids % 2 == 0) & ~is_boundary
    return base_bytes, has_leading_space, is_boundary


def lut_bytes(tokens: torch.Tensor, luts) -> int:
    """Byte count of targets 1..N written out token by token from the tables."""
    base, lead, boundary = (t.tolist() for t in luts)
    ids = tokens.tolist()
    return sum(base[t] + (1 if lead[t] and not boundary[p] else 0) for p, t in zip(ids[:-1], ids[1:]))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def context_start(j: int, seq_len: int, stride: int) -> int:
    """The first context token of target j under sliding evaluation, from the definition:
    windows start every `stride` tokens; target j is scored by the first window that reaches it,
    i.e. the smallest multiple of stride s with s + seq_len > j."""
    return 0 if j < seq_len else -(-(j - seq_len + 1) // stride) * stride


@torch.no_grad()
def brute_force_nll(model, tokens: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """-log softmax(logits)[target] for each target j, from a forward pass over exactly its
    context tokens[context_start(j):j+1] (contexts of equal length share a batch: one row each)."""
    n = tokens.numel() - 1
    by_length = defaultdict(list)
    for j in range(n):
        by_length[j + 1 - context_start(j, seq_len, stride)].append(j)
    nll = torch.empty(n, dtype=torch.float64)
    for length, js in by_length.items():
        ctx = torch.stack([tokens[j + 1 - length: j + 1] for j in js])
        logp = F.log_softmax(model.forward_logits(ctx)[:, -1].double(), dim=-1)
        nll[js] = -logp[torch.arange(len(js)), tokens[[j + 1 for j in js]]]
    return nll


def record_forward(monkeypatch) -> list[dict]:
    """Wrap GPT.forward (the one function training, scoring and TTT call) and record each call."""
    calls = []
    original = train_gpt.GPT.forward

    def forward(self, ids, targets, reduction="mean"):
        out = original(self, ids, targets, reduction)
        calls.append(dict(reduction=reduction, grad=torch.is_grad_enabled(), training=self.training,
                          looping=self.looping_active, ids=ids.detach().clone(),
                          targets=targets.detach().clone(), out=out.detach().clone()))
        return out

    monkeypatch.setattr(train_gpt.GPT, "forward", forward)
    return calls


def per_target_nll(calls, trace, tokens: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """Per-target NLL exactly as the scorer computed it: the score-trace entries, in order, are the
    rows of the recorded reduction='none' calls. Checks that each row holds its window's tokens."""
    n = tokens.numel() - 1
    start_of = {(f, e): s for s, f, e in train_gpt.make_windows(n, seq_len, stride)}
    rows = [(c, r) for c in calls if c["reduction"] == "none" for r in range(c["out"].size(0))]
    scored = [(f, e) for kind, f, e in trace if kind == "score"]
    assert len(rows) == len(scored)
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    for (c, r), (f, e) in zip(rows, scored):
        s = start_of[(f, e)]
        assert torch.equal(c["ids"][r, : e - s], tokens[s:e])
        assert torch.equal(c["targets"][r, f - s: e - s], tokens[f + 1: e + 1])
        assert torch.isnan(nll[f:e]).all(), f"targets {f}..{e - 1} scored twice"
        nll[f:e] = c["out"][r, f - s: e - s].double()
    return nll


def capture_sums(monkeypatch) -> list[list[float]]:
    """The (loss sum, token count, byte count) each evaluation reduces into its result."""
    seen = []
    original = train_gpt.summarize

    def summarize(sums, rt):
        seen.append(sums.tolist())
        return original(sums, rt)

    monkeypatch.setattr(train_gpt, "summarize", summarize)
    return seen


def record_trace(monkeypatch) -> list[tuple[str, int, int]]:
    """Trace entries of every later evaluation, in the order they happen: ("score", a, b) for each
    window handed to score_windows, ("train", a, b) for each TTT batch of each epoch."""
    trace = []
    score_windows, ttt_adapt = train_gpt.score_windows, train_gpt._ttt_adapt

    def scored(model, tokens, windows, *args, **kwargs):
        trace.extend(("score", f, e) for _, f, e in windows)
        return score_windows(model, tokens, windows, *args, **kwargs)

    def adapted(h, rt, model, opt, val_tokens, batches):
        trace.extend(("train", b[0], b[-1] + h.eval_seq_len) for _ in range(h.ttt_epochs) for b in batches if b)
        return ttt_adapt(h, rt, model, opt, val_tokens, batches)

    monkeypatch.setattr(train_gpt, "score_windows", scored)
    monkeypatch.setattr(train_gpt, "_ttt_adapt", adapted)
    return trace


def check_score_trace(trace, n_targets: int) -> None:
    """Condition (4): the score entries cover 0..n_targets-1, each target exactly once."""
    count = torch.zeros(n_targets, dtype=torch.int64)
    for kind, a, b in trace:
        if kind == "score":
            assert 0 <= a < b <= n_targets
            count[a:b] += 1
    assert (count == 1).all(), f"targets scored {count.min()}..{count.max()} times"


def sliding_and_ttt(h, rt, n_tokens: int, seed: int) -> dict:
    """The distributed comparison's case: sliding evaluation, then TTT on a fresh copy of the same
    model. Run by the single-process test and by every torchrun rank of the worker."""
    tokens, luts = make_stream(n_tokens, seed), fake_luts()
    with pytest.MonkeyPatch.context() as mp:
        trace = record_trace(mp)
        s_loss, s_bpb, _ = train_gpt.evaluate_sliding(h, rt, build_model(h, seed), tokens, luts)
        sliding_trace = trace[:]
        trace.clear()
        t_loss, t_bpb, _ = train_gpt.evaluate_ttt(h, rt, build_model(h, seed), tokens, luts)
        ttt_trace = trace[:]
    return dict(sliding=[s_loss, s_bpb], ttt=[t_loss, t_bpb], sliding_trace=sliding_trace, ttt_trace=ttt_trace)


# -----------------------------------------------------------------------------------------
# fixtures
# -----------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def h():
    return make_h()


@pytest.fixture
def rt(h):
    rt = train_gpt.Runtime(h)
    assert not rt.distributed and rt.world_size == 1 and rt.device.type == "cpu"
    return rt


# -----------------------------------------------------------------------------------------
# (4) single pass
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_targets,seq_len,stride", [
    (1280, 64, 16),   # the usual case: a multiple of both
    (1000, 64, 16),   # not a multiple of seq_len
    (1001, 64, 16),   # not a multiple of the stride either
    (300, 64, 1),     # stride 1
    (50, 64, 16),     # shorter than one window
    (1, 64, 16),      # a single target
    (64, 64, 64),     # exactly one window
    (65, 64, 64),     # stride == seq_len, one target over
    (999, 128, 32),
    (7, 4, 2),
    (2048 * 3, 2048, 64),  # the record's shape
])
def test_condition_single_pass_make_windows(num_targets, seq_len, stride):
    windows = train_gpt.make_windows(num_targets, seq_len, stride)
    count = torch.zeros(num_targets, dtype=torch.int64)
    expected_next = 0
    for start, score_from, end in windows:
        assert start % stride == 0, "windows start on the stride grid"
        assert start <= score_from < end <= num_targets, (start, score_from, end)
        assert end - start <= seq_len, "a window never exceeds EVAL_SEQ_LEN"
        assert score_from == expected_next, "windows score consecutive, non-overlapping ranges"
        expected_next = end
        count[score_from:end] += 1
        # Context: every scored target sees at least seq_len - stride + 1 tokens, or all from 0,
        # and exactly the context defined by the stride grid.
        for j in (score_from, end - 1):
            assert j - start + 1 >= min(j + 1, seq_len - stride + 1)
            assert start == context_start(j, seq_len, stride)
    assert (count == 1).all(), "every target is scored exactly once"
    assert expected_next == num_targets


def test_condition_single_pass_sliding_trace(h, rt, monkeypatch):
    """An actual evaluate_sliding run (N not a multiple of the stride, several batches and
    progress chunks) scores each target once; its totals count N tokens and the LUT bytes of N."""
    tokens, luts = make_stream(1002, seed=1), fake_luts()
    h.eval_batch_seqs = 8
    sums, trace, lines = capture_sums(monkeypatch), record_trace(monkeypatch), []
    train_gpt.evaluate_sliding(h, rt, build_model(h), tokens, luts, log=lines.append)
    check_score_trace(trace, 1001)
    assert all(kind == "score" for kind, _, _ in trace)
    (_, n_tokens, n_bytes), = sums
    assert n_tokens == 1001
    assert n_bytes == lut_bytes(tokens, luts)
    assert any(line.startswith("sliding_progress windows:") for line in lines)


def test_condition_single_pass_plain(h, rt, monkeypatch):
    """Plain evaluation also counts every target once, including a partial last window."""
    tokens, luts = make_stream(1000 + 1, seed=2), fake_luts()
    sums = capture_sums(monkeypatch)
    train_gpt.evaluate_plain(h, rt, build_model(h), tokens, luts)
    (_, n_tokens, n_bytes), = sums
    assert n_tokens == 1000 and n_bytes == lut_bytes(tokens, luts)


# -----------------------------------------------------------------------------------------
# equivalences and bpb
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [641, 601])
def test_sliding_with_stride_equal_to_seq_len_is_plain(n_tokens, rt):
    h = make_h(eval_stride=64, ttt_chunk_tokens=256, eval_batch_seqs=4)
    tokens, luts, model = make_stream(n_tokens, seed=3), fake_luts(), build_model(h)
    p_loss, p_bpb, _ = train_gpt.evaluate_plain(h, rt, model, tokens, luts)
    s_loss, s_bpb, _ = train_gpt.evaluate_sliding(h, rt, model, tokens, luts)
    assert rel(s_loss, p_loss) < 1e-12 and rel(s_bpb, p_bpb) < 1e-12


def test_long_eval_context_scores_do_not_depend_on_batching(rt):
    """Above TRAIN_SEQ_LEN the rotary base stretches with the sequence width; every window must be
    scored at the same width, whatever else shares its batch (the short tail windows included)."""
    h1 = make_h(train_seq_len=32, eval_seq_len=64, eval_stride=16, eval_batch_seqs=1, ttt_chunk_tokens=320)
    h8 = make_h(train_seq_len=32, eval_seq_len=64, eval_stride=16, eval_batch_seqs=8, ttt_chunk_tokens=320)
    tokens, luts, model = make_stream(301, seed=5), fake_luts(), build_model(h1)
    alone = train_gpt.evaluate_sliding(h1, rt, model, tokens, luts)[:2]
    batched = train_gpt.evaluate_sliding(h8, rt, model, tokens, luts)[:2]
    assert rel(alone[0], batched[0]) < 1e-6 and rel(alone[1], batched[1]) < 1e-6


@pytest.mark.parametrize("stride", [1, 16])
def test_sliding_matches_brute_force_per_token(stride, rt, monkeypatch):
    """Each target's NLL equals a forward pass over exactly its own context (stride 1: the last
    min(j+1, seq_len) tokens up to j; stride 16: from its window's start), for the mean and
    token by token. The brute force never pads and never sees a later token, so the match also
    shows the scorer's predictions are causal (1) and single-pass (4)."""
    h = make_h(eval_stride=stride, ttt_chunk_tokens=256)
    tokens, luts, model = make_stream(301, seed=4), fake_luts(), build_model(h)
    calls, trace = record_forward(monkeypatch), record_trace(monkeypatch)
    loss, bpb, _ = train_gpt.evaluate_sliding(h, rt, model, tokens, luts)
    ref = brute_force_nll(model, tokens, h.eval_seq_len, stride)
    assert rel(loss, ref.mean().item()) < 1e-5
    scored = per_target_nll(calls, trace, tokens, h.eval_seq_len, stride)
    assert (scored - ref).abs().max() < 1e-4
    n_bytes = lut_bytes(tokens, luts)
    assert rel(bpb, loss / math.log(2) * 300 / n_bytes) < 1e-12


def test_padded_batches_score_the_same(h, rt):
    """With compile on, score_windows pads every batch to EVAL_BATCH_SEQS x EVAL_SEQ_LEN; the
    padding sits after each row's tokens, so causal attention keeps it out of every score."""
    tokens, luts, model = make_stream(1001, seed=5), fake_luts(), build_model(h)
    h.eval_batch_seqs = 5
    windows = train_gpt.make_windows(1000, h.eval_seq_len, h.eval_stride)[-7:]  # the last is short
    plain = train_gpt.score_windows(model, tokens, windows, h, rt, luts)
    rt.compile = True  # only the padding path: the model itself is not compiled here
    padded = train_gpt.score_windows(model, tokens, windows, h, rt, luts)
    assert plain[1] == padded[1] and plain[2] == padded[2]
    assert rel(padded[0].item(), plain[0].item()) < 1e-6


def test_bpb_uses_the_tokenizer_byte_tables(tiny_data, monkeypatch):
    """bpb = loss / ln 2 * tokens / bytes, with bytes written out here from the real tokenizer's
    tables (base bytes + the leading space unless the previous token is a boundary), identical
    for plain, sliding and TTT evaluation."""
    import sentencepiece as spm

    h = make_h(data_dir=tiny_data["data_dir"])
    rt = train_gpt.Runtime(h)
    sp = spm.SentencePieceProcessor(model_file=tiny_data["tokenizer_path"])
    luts = train_gpt.build_sentencepiece_luts(sp, V, rt.device)
    tokens = train_gpt.load_validation_tokens(h.val_files, h.eval_seq_len, V)[: 8 * 64 + 1]
    n = tokens.numel() - 1
    n_bytes = lut_bytes(tokens, luts)
    assert n_bytes > n  # multi-byte pieces occur
    sums = capture_sums(monkeypatch)
    model = build_model(h)
    results = [train_gpt.evaluate_plain(h, rt, model, tokens, luts),
               train_gpt.evaluate_sliding(h, rt, model, tokens, luts),
               train_gpt.evaluate_ttt(h, rt, copy.deepcopy(model), tokens, luts)]
    for (loss, bpb, _), (loss_sum, count, nbytes) in zip(results, sums):
        assert count == n and nbytes == n_bytes
        assert rel(loss, loss_sum / n) < 1e-12
        assert rel(bpb, loss / math.log(2) * n / n_bytes) < 1e-12


# -----------------------------------------------------------------------------------------
# (2) normalized
# -----------------------------------------------------------------------------------------


def test_condition_normalized_softmax_over_the_vocabulary(h):
    """The loss at each position is -log of a proper softmax over all VOCAB_SIZE logits, and
    the softcap bounds every logit to (-30, 30)."""
    model = build_model(h)
    tokens = make_stream(4 * 64 + 1, seed=6)
    x, y = tokens[:-1].view(4, 64), tokens[1:].view(4, 64)
    with torch.no_grad():
        logits = model.forward_logits(x).float()
        nll = model(x, y, reduction="none")
        mean = model(x, y)
    assert logits.shape == (4, 64, V), "one logit per vocabulary entry"
    logp = F.log_softmax(logits.double(), dim=-1)
    assert torch.isfinite(logp).all(), "every token has nonzero probability"
    assert torch.allclose(logp.exp().sum(-1), torch.ones(4, 64, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(nll.double(), -logp.gather(-1, y[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(mean.double(), nll.double().mean(), atol=1e-6)
    # Softcap: with large embeddings the raw logits exceed 30; the scored ones never do.
    with torch.no_grad():
        model.tok_emb.weight.mul_(40)
        hidden = model.forward_hidden(x)
        raw = F.linear(hidden, model.tok_emb.weight)
        capped = model.forward_logits(x)
    assert raw.abs().max() > 60
    assert capped.abs().max() <= h.logit_softcap
    assert torch.allclose(capped, h.logit_softcap * torch.tanh(raw / h.logit_softcap), atol=1e-5)


def test_condition_normalized_scorer_values_are_softmax_nll(h, rt, monkeypatch):
    """Every value the sliding scorer adds up is -log p(target) under log_softmax of
    forward_logits over the full vocabulary, and their mean is the reported loss."""
    tokens, luts, model = make_stream(513, seed=7), fake_luts(), build_model(h)
    calls, trace = record_forward(monkeypatch), record_trace(monkeypatch)
    loss, _, _ = train_gpt.evaluate_sliding(h, rt, model, tokens, luts)
    for c in calls:
        with torch.no_grad():
            logp = F.log_softmax(model.forward_logits(c["ids"]).double(), dim=-1)
        assert logp.size(-1) == V
        assert torch.allclose(c["out"].double(), -logp.gather(-1, c["targets"][..., None])[..., 0], atol=1e-5)
    scored = per_target_nll(calls, trace, tokens, h.eval_seq_len, h.eval_stride)
    assert not torch.isnan(scored).any()
    assert rel(scored.mean().item(), loss) < 1e-12


# -----------------------------------------------------------------------------------------
# (1) causal
# -----------------------------------------------------------------------------------------


def test_condition_causal_model(h):
    """Changing token k changes the logits at positions >= k only (attention, bigram hash,
    SmearGate, looping and skips included)."""
    model = build_model(h)
    tokens = make_stream(64, seed=8)[None]
    with torch.no_grad():
        base = model.forward_logits(tokens)
        for k in (1, 2, 17, 40, 63):
            changed = tokens.clone()
            changed[0, k] = 5 if tokens[0, k] != 5 else 6
            out = model.forward_logits(changed)
            assert torch.allclose(out[:, :k], base[:, :k], atol=1e-6, rtol=0), f"position < {k} moved"
            assert (out[:, k] - base[:, k]).abs().max() > 1e-3, f"position {k} ignores its own token"


@pytest.mark.parametrize("stride", [16, 64])
def test_condition_causal_sliding(stride, rt, monkeypatch):
    """Per-target scores of a sliding run: altering token k leaves every target before k-1 (whose
    label and context both precede k) unchanged, while targets k-1 onwards do change. (A leak of
    a target's own label into its prediction is caught by the model and brute-force tests.)"""
    h = make_h(eval_stride=stride, ttt_chunk_tokens=256)
    tokens, luts, model = make_stream(321, seed=9), fake_luts(), build_model(h)
    calls, trace = record_forward(monkeypatch), record_trace(monkeypatch)

    def scores(toks):
        calls.clear()
        trace.clear()
        train_gpt.evaluate_sliding(h, rt, model, toks, luts)
        return per_target_nll(calls, trace, toks, h.eval_seq_len, stride)

    base = scores(tokens)
    for k in (3, 64, 65, 150, 320):
        changed = tokens.clone()
        changed[k] = 5 if tokens[k] != 5 else 6
        after = scores(changed)
        assert torch.allclose(after[: k - 1], base[: k - 1], atol=1e-6, rtol=0), f"a change at {k} reached back"
        assert (after[k - 1:] - base[k - 1:]).abs().max() > 1e-3


def test_condition_causal_ttt(rt, monkeypatch):
    """Score-first TTT over 4 chunks: altering a token in the last chunk changes no earlier
    target; altering token k in the middle of chunk 1 changes nothing before target k-1 (in
    particular not chunk 1's own earlier targets, which were scored before chunk 1 was trained
    on), and does change the later chunks, through the training on chunk 1."""
    h = make_h()
    tokens, luts = make_stream(4 * 256 + 1, seed=10), fake_luts()
    chunk = h.ttt_chunk_tokens
    calls, trace = record_forward(monkeypatch), record_trace(monkeypatch)

    def scores(toks):
        calls.clear()
        trace.clear()
        train_gpt.evaluate_ttt(h, rt, build_model(h), toks, luts)
        return per_target_nll(calls, trace, toks, h.eval_seq_len, h.eval_stride)

    base = scores(tokens)
    for k in (3 * chunk + 100, chunk + 130):
        changed = tokens.clone()
        changed[k] = 5 if tokens[k] != 5 else 6
        after = scores(changed)
        assert torch.allclose(after[: k - 1], base[: k - 1], atol=1e-6, rtol=0), f"a change at {k} reached back"
        assert (after[k - 1:] - base[k - 1:]).abs().max() > 1e-3
        c = (k - 1) // chunk
        if c < 3:  # trained on: every later chunk moves, not just the windows that contain k
            for later in range(c + 1, 4):
                span = slice(later * chunk, (later + 1) * chunk)
                assert (after[span] - base[span]).abs().max() > 1e-4, f"chunk {later} ignored the training on chunk {c}"


# -----------------------------------------------------------------------------------------
# score-first TTT: (3) score before update, and what it computes
# -----------------------------------------------------------------------------------------


def test_ttt_without_epochs_equals_sliding(h, rt):
    tokens, luts, model = make_stream(5 * 256 + 1, seed=11), fake_luts(), build_model(h)
    before = copy.deepcopy(model.state_dict())
    s_loss, s_bpb, _ = train_gpt.evaluate_sliding(h, rt, model, tokens, luts)
    h.ttt_epochs = 0
    t_loss, t_bpb, _ = train_gpt.evaluate_ttt(h, rt, model, tokens, luts)
    assert rel(t_loss, s_loss) < 1e-9 and rel(t_bpb, s_bpb) < 1e-9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_condition_score_before_update_trace(rt, monkeypatch):
    """Instrumented TTT on 4 full chunks and a partial fifth, two epochs, batches of 3 sequences
    (so 2 steps per epoch): every trained target was scored earlier, only fully scored chunks
    are trained on, the last chunk never is, nothing is scored twice and everything is scored.
    The weights differ at each chunk's scoring (TTT does something, bigram.embed included)."""
    h = make_h(ttt_batch_seqs=3)
    n = 4 * 256 + 192
    tokens, luts = make_stream(n + 1, seed=12), fake_luts()
    model = build_model(h, zero_bigram_embed=True)  # as in the record: the branch starts at zero
    chunk, L = h.ttt_chunk_tokens, h.eval_seq_len

    snapshots, original = [], train_gpt.score_windows

    def score_windows(model, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(train_gpt, "score_windows", score_windows)
    lrs = []
    sgd_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    trace = record_trace(monkeypatch)
    train_gpt.evaluate_ttt(h, rt, model, tokens, luts)

    scored = torch.zeros(n, dtype=torch.bool)
    trained_chunks = []
    for kind, a, b in trace:
        if kind == "score":
            assert not scored[a:b].any(), f"targets {a}..{b - 1} scored twice"
            assert a // chunk == (b - 1) // chunk, "a scored window lies within one chunk"
            scored[a:b] = True
        else:
            c = a // chunk
            assert (b - 1) // chunk == c and (b - a) % L == 0, "training uses whole sequences of one chunk"
            assert scored[a:b].all(), f"trained on targets {a}..{b - 1} before scoring them"
            assert scored[c * chunk:(c + 1) * chunk].all(), f"chunk {c} trained on before it was fully scored"
            assert not scored[(c + 1) * chunk:].any(), "the next chunk is scored only after training"
            trained_chunks.append(c)
    assert scored.all(), "every target scored"
    assert 4 not in trained_chunks, "the last chunk is never trained on"
    # Four sequences a chunk in batches of 3: steps of 3 and 1 sequences, two epochs.
    assert trained_chunks == [c for c in range(4) for _ in range(2 * 2)]
    train_ranges = [(a, b) for kind, a, b in trace if kind == "train"]
    assert train_ranges[:4] == [(0, 192), (192, 256)] * 2
    # Cosine learning rate over chunks: lr * (1 + cos(pi * c / (C - 1))) / 2, C = 5.
    expected = [h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / 4)) for c in range(4) for _ in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    # One scoring pass per chunk; the weights move between consecutive chunks and not after the last.
    assert len(snapshots) == 5
    for c in range(4):
        moved = [k for k in snapshots[c] if not torch.equal(snapshots[c][k], snapshots[c + 1][k])]
        assert "bigram.embed.weight" in moved
        assert set(moved) == set(snapshots[c]), f"not updated after chunk {c}: {set(snapshots[c]) - set(moved)}"
    assert not snapshots[0]["bigram.embed.weight"].any() and snapshots[1]["bigram.embed.weight"].any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshots[4].items()), "trained after the last chunk"


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, seq_len: int, stride: int, targets) -> torch.Tensor:
    """Per-target NLL with one forward per sliding window, the windows taken from the definition
    (context_start): the cheaper reference, for tests where causality is not the question."""
    targets = list(targets)
    windows = defaultdict(list)  # start -> its targets
    for j in targets:
        windows[context_start(j, seq_len, stride)].append(j)
    by_length = defaultdict(list)  # windows of equal length share a batch
    for s, js in windows.items():
        by_length[js[-1] + 1 - s].append(s)
    nll = {}
    for length, starts in by_length.items():
        logp = F.log_softmax(model.forward_logits(torch.stack([tokens[s: s + length] for s in starts])).double(), -1)
        for row, s in enumerate(starts):
            for j in windows[s]:
                nll[j] = -logp[row, j - s, tokens[j + 1]].item()
    return torch.tensor([nll[j] for j in targets], dtype=torch.float64)


def reference_ttt(model, tokens: torch.Tensor, h) -> torch.Tensor:
    """Score-first TTT written out from its definition: for each chunk, score its targets through
    their sliding windows; then (except for the last chunk) take SGD steps with momentum on the
    chunk's whole sequences through GPT.forward (mean CE, looping on), clipping the gradient norm,
    at a cosine learning rate over chunks. Returns the per-target NLL."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    n, chunk, L = tokens.numel() - 1, h.ttt_chunk_tokens, h.eval_seq_len
    num_chunks = -(-n // chunk)
    nll = torch.empty(n, dtype=torch.float64)
    momentum = [None] * len(params)
    for c in range(num_chunks):
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        nll[lo:hi] = window_nll(model, tokens, L, h.eval_stride, range(lo, hi))
        if c == num_chunks - 1:
            break
        lr = h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (num_chunks - 1)))
        seqs = torch.stack([tokens[s: s + L + 1] for s in range(lo, hi - L + 1, L)])
        for _ in range(h.ttt_epochs):
            for b in range(0, len(seqs), h.ttt_batch_seqs):
                xy = seqs[b: b + h.ttt_batch_seqs]
                grads = torch.autograd.grad(model(xy[:, :-1], xy[:, 1:]), params)
                norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
                coef = min(1.0, h.ttt_grad_clip / (norm + 1e-6))
                with torch.no_grad():
                    for i, (p, g) in enumerate(zip(params, grads)):
                        g = g * coef
                        momentum[i] = g.clone() if momentum[i] is None else h.ttt_momentum * momentum[i] + g
                        p.sub_(lr * momentum[i])
    return nll


def test_condition_score_before_update_matches_reference_loop(rt, monkeypatch):
    """Per-target TTT scores equal the score-then-train reference above (3 chunks, 2 epochs, one
    step per epoch): each chunk is scored by the weights trained on the earlier chunks only. They
    also differ clearly from no adaptation after the first chunk: the comparison has teeth."""
    h = make_h()
    tokens, luts, model = make_stream(3 * 256 + 1, seed=13), fake_luts(), build_model(h)
    calls, trace = record_forward(monkeypatch), record_trace(monkeypatch)
    loss, _, _ = train_gpt.evaluate_ttt(h, rt, copy.deepcopy(model), tokens, luts)
    monkeypatch.undo()
    scored = per_target_nll(calls, trace, tokens, h.eval_seq_len, h.eval_stride)
    ref = reference_ttt(model, tokens, h)
    assert (scored - ref).abs().max() < 1e-4
    assert rel(loss, ref.mean().item()) < 1e-5
    no_ttt = window_nll(model, tokens, h.eval_seq_len, h.eval_stride, range(768))
    assert (ref[:256] - no_ttt[:256]).abs().max() < 1e-4, "the first chunk is scored by the initial weights"
    assert (ref[256:] - no_ttt[256:]).abs().max() > 1e-2


def test_ttt_trains_through_the_training_forward(rt, monkeypatch):
    """TTT's loss is GPT.forward(x, y) - the function training calls - in training mode, with
    gradients, looping on; every parameter gets a gradient, so every component (bigram branch,
    SmearGate, attention gates, skips, looped layers) is live in that forward."""
    h = make_h(ttt_epochs=2)
    tokens, luts = make_stream(3 * 256 + 1, seed=14), fake_luts()
    model = build_model(h)
    calls = record_forward(monkeypatch)
    grads_seen = set()
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: grads_seen.add(name) if g.abs().max() > 0 else None)
    train_gpt.evaluate_ttt(h, rt, model, tokens, luts)
    train_calls = [c for c in calls if c["grad"]]
    score_calls = [c for c in calls if not c["grad"]]
    assert len(train_calls) == 2 * 2, "one step per epoch for each of the two non-final chunks"
    assert all(c["reduction"] == "mean" and c["training"] and c["looping"] for c in train_calls)
    assert all(c["ids"].shape == (4, 64) for c in train_calls)
    assert all(c["reduction"] == "none" and not c["training"] and c["looping"] for c in score_calls)
    assert grads_seen == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("chunk,stride,seq_len", [
    (1000, 64, 2048),    # divisible by neither
    (2112, 64, 2048),    # by the stride but not by seq_len
    (96, 32, 64),        # by the stride but not by seq_len
    (80, 16, 40),        # by seq_len but not by the stride (stride does not divide seq_len: refused too)
])
def test_ttt_chunk_not_divisible_is_refused(chunk, stride, seq_len):
    with pytest.raises(ValueError) as err:
        make_h(ttt_chunk_tokens=chunk, eval_stride=stride, eval_seq_len=seq_len)
    message = str(err.value)
    if seq_len % stride == 0:
        assert f"TTT_CHUNK_TOKENS={chunk}" in message
        assert f"EVAL_STRIDE={stride}" in message and f"EVAL_SEQ_LEN={seq_len}" in message
    else:
        assert f"EVAL_STRIDE={stride}" in message and f"EVAL_SEQ_LEN={seq_len}" in message
    make_h(ttt_chunk_tokens=4096, eval_stride=64, eval_seq_len=2048)  # divisible: accepted
    make_h(ttt_chunk_tokens=chunk, eval_stride=64, eval_seq_len=2048, ttt_enabled=False)  # no TTT: no chunks


def test_run_evaluations_scores_the_dequantized_model_with_looping(tmp_path):
    """run_evaluations loads the artifact afresh for each stage, looping on, and logs the three
    results in the shapes people grep, equal to each evaluation run on that model directly."""
    import re

    h = make_h(quantized_model_path=str(tmp_path / "model.ptz"), compressor="lzma")
    rt = train_gpt.Runtime(h)
    tokens, luts = make_stream(2 * 256 + 1, seed=15), fake_luts()
    state = build_model(h).state_dict()
    blob = train_gpt.compress_blob({k: v.half() for k, v in state.items()}, {k: "fp16" for k in state}, "lzma")
    Path(h.quantized_model_path).write_bytes(blob)
    lines = []
    train_gpt.run_evaluations(h, rt, tokens, luts, lines.append)
    labels = ("quantized", "quantized_sliding_window", "quantized_ttt")
    logged = {}
    for line in lines:
        m = re.fullmatch(r"(\w+) val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8}) eval_time:\d+ms", line)
        if m:
            logged[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert tuple(logged) == labels
    import logformat  # the tools read these exact lines through logformat: it must read the same figures

    stated = logformat.scan_log("\n".join(lines))["stages"]
    assert {label: (v["val_loss"], v["val_bpb"]) for label, v in stated.items()} == logged
    for label, fn in zip(labels, (train_gpt.evaluate_plain, train_gpt.evaluate_sliding, train_gpt.evaluate_ttt)):
        model = train_gpt.load_quantized_model(h, rt, h.quantized_model_path)
        assert model.looping_active
        loss, bpb, _ = fn(h, rt, model, tokens, luts)
        assert logged[label] == pytest.approx((loss, bpb), abs=1e-8)
    model = train_gpt.load_quantized_model(h, rt, h.quantized_model_path)
    model.looping_active = False  # the check has teeth: without looping the result differs
    assert abs(train_gpt.evaluate_plain(h, rt, model, tokens, luts)[0] - logged["quantized"][0]) > 1e-3


# -----------------------------------------------------------------------------------------
# distributed: two gloo ranks on CPU give the single-process results
# -----------------------------------------------------------------------------------------

# 3 chunks of 256 targets with EVAL_SEQ_LEN 64: each trained chunk has 4 sequences, so each of the
# two ranks takes 2 and one step per epoch. TTT averages the ranks' mean losses' gradients, which
# equals the single process's mean over all 4 only when the ranks hold equally many sequences -
# true here by choice of the chunk, and in the record (16 sequences over 8 ranks). Clipping is
# off so that a wrongly scaled all-reduce (a sum instead of a mean) cannot hide behind the clip.
DIST_CASE = dict(n_tokens=3 * 256 + 1, seed=21)
DIST_H = dict(ttt_lr=0.05, ttt_grad_clip=1e6)


def test_distributed_matches_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # no setting or process variable: conftest's clean_env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "dist_eval_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[:3000]}\n...\n{proc.stderr[-2000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    h = make_h(**DIST_H)
    single = sliding_and_ttt(h, train_gpt.Runtime(h), **DIST_CASE)
    n = DIST_CASE["n_tokens"] - 1
    for r in ranks:
        assert r["world_size"] == 2 and r["distributed"]
        assert r["sliding"] == ranks[0]["sliding"] and r["ttt"] == ranks[0]["ttt"], "ranks agree exactly"
        for a, b in zip(r["sliding"] + r["ttt"], single["sliding"] + single["ttt"]):
            assert rel(a, b) < 1e-6, (r, single)
    # Across the ranks every target is scored exactly once, by sliding and by TTT.
    for key in ("sliding_trace", "ttt_trace"):
        check_score_trace([tuple(e) for r in ranks for e in r[key]], n)
    # Each rank trains on its own contiguous half of each chunk's sequences.
    for rank, r in enumerate(ranks):
        trains = [tuple(e[1:]) for e in r["ttt_trace"] if e[0] == "train"]
        assert trains == [(c * 256 + 128 * rank, c * 256 + 128 * (rank + 1)) for c in range(2) for _ in range(2)]
