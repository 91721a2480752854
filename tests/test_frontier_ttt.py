"""Phased score-first TTT (PHASED_TTT_ENABLED): per-document LoRA, global SGD phases.

The conditions tests/test_eval.py proves for the record's TTT, proven here for the phased form
(tests named `test_condition_*`), from an event trace of every scoring and every update:

  single pass   - every target of the stream is scored exactly once (over all ranks);
  no_grad       - every score is taken under no_grad, from the weights and adapters before the
                  step that trains on it;
  score first   - no update (an adapter step or a global SGD step) uses a token, as a target or
                  as an input, before that token has been scored; the one exception is a
                  document's opening BOS as an input (the documents are cut at BOS: where one
                  starts is what the procedure is given, as every evaluation here is);
  phases        - a global SGD phase trains on whole documents scored before it, nothing else;
  reset         - each batch starts with every adapter's B at zero, a new optimizer with no
                  state, and A as the previous batch of its chain left it (fresh after a phase).

Independent references in this file: the adapters' forward (hooks on the model's modules adding
the adapter math written out here, slots found from the layer order written out here), and the
whole evaluation written from its definition, one document at a time with AdamW and SGD by hand.

Indexing: the stream has N+1 tokens; a "position" here is a token's index in it, so the targets
are positions 1..N. A document (start, length) holds positions start..start+length-1 and its
targets are start+1..start+length-1.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY_VOCAB as V, read_log, run_main, tiny_hparams
from test_eval import RUN, build_model, fake_luts, lut_bytes

TESTS = Path(__file__).resolve().parent
BOS = tg.BOS_ID

# The tiny model (layers 1..2 looped twice: six slots), windows of 64, global SGD chunks of two
# sequences; small batches and a short prefix so that every path runs on a few hundred tokens.
PHASED = dict(RUN, phased_ttt_enabled=True, phased_ttt_lora_rank=4, phased_ttt_batch_docs=2,
              phased_ttt_prefix_docs=5, phased_ttt_num_phases=2, ttt_chunk_tokens=128)
# Document lengths (tokens, both BOS included): several chunks and a sliding window for the
# longest, one-chunk documents, an odd count so that the longest batch is the short one.
LENGTHS = [70, 20, 150, 41, 90, 33, 120, 57, 18]
ORDER = [0, 1, 2, 1, 2, 3]  # the tiny model's virtual layer order (LOOP_START=1, LOOP_END=2, NUM_LOOPS=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_h(**overrides) -> tg.Hyperparameters:
    return tiny_hparams(**{**PHASED, **overrides})


def doc_stream(lengths, seed: int = 0, leading_bos: bool = True) -> torch.Tensor:
    """Documents of the given lengths (a BOS, then length - 2 other tokens, the next document's BOS
    closing it): the last one runs to the end of the stream."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        parts += [torch.tensor([BOS]), torch.randint(4, V, (n - 1,), generator=g)]
    tokens = torch.cat(parts)
    if not leading_bos:
        tokens[0] = 7
    return tokens


@pytest.fixture
def fast(monkeypatch):
    """Chunks of 24 targets (several per document, windows that slide), two warm-start chains, and
    learning rates large enough that adaptation visibly changes the scores (the tests have teeth)."""
    monkeypatch.setattr(tg, "PHASED_CHUNK", 24)
    monkeypatch.setattr(tg, "PHASED_LORA_CHAINS", 2)
    monkeypatch.setattr(tg, "PHASED_LORA_LR", 3e-3)
    monkeypatch.setattr(tg, "PHASED_SGD_LR", 0.05)


def runtime(h) -> tg.Runtime:
    rt = tg.Runtime(h, environ={})
    assert not rt.distributed and rt.device.type == "cpu"
    return rt


def record_events(monkeypatch) -> list[dict]:
    """Every scoring and every update of later phased evaluations, in order, by position:
    ("score", targets), ("lora", targets, inputs, doc starts of the rows), ("sgd", targets, inputs),
    with the grad mode of each score and each score's NLL."""
    events = []
    sums, lora_step, sgd_step = tg.phased_sums, tg._phased_lora_step, tg._phased_sgd_step

    def phased_sums(nll, rows, luts, *sidecar):
        pos = rows.pos[rows.score.cpu()]
        events.append(dict(kind="score", targets=pos.tolist(), nll=nll.detach()[rows.score].tolist(),
                           grad=torch.is_grad_enabled(), requires_grad=nll.requires_grad))
        return sums(nll, rows, luts, *sidecar)

    def phased_lora_step(opt, rows, nll):
        train = rows.train.cpu()
        pos = rows.pos[train]
        used = pos[pos >= 0]
        # An adapter step's loss reads the rows' chunks as targets and the windows as inputs.
        chunk = pos[:, rows.offset: rows.offset + tg.PHASED_CHUNK]
        events.append(dict(kind="lora", targets=chunk[chunk >= 0].tolist(), inputs=(used - 1).tolist(),
                           state=len(opt.state)))
        return lora_step(opt, rows, nll)

    def phased_sgd_step(h, rt, forward, opt, params, rows):
        pos = rows.pos[rows.mask]
        events.append(dict(kind="sgd", targets=pos.tolist(), inputs=(pos - 1).tolist(), count=rows.count))
        return sgd_step(h, rt, forward, opt, params, rows)

    monkeypatch.setattr(tg, "phased_sums", phased_sums)
    monkeypatch.setattr(tg, "_phased_lora_step", phased_lora_step)
    monkeypatch.setattr(tg, "_phased_sgd_step", phased_sgd_step)
    return events


def document_starts(tokens: torch.Tensor) -> set[int]:
    """Positions that open a document, written from the definition (a BOS with a token after it,
    and position 0)."""
    return {0} | {i for i in range(tokens.numel() - 1) if int(tokens[i]) == BOS}


def check_trace(events, tokens: torch.Tensor) -> None:
    """The conditions of the module docstring, on one evaluation's event trace."""
    n = tokens.numel() - 1
    starts = document_starts(tokens)
    scored_at: dict[int, int] = {}
    for t, e in enumerate(events):
        if e["kind"] == "score":
            for p in e["targets"]:
                assert p not in scored_at, f"position {p} scored twice"
                scored_at[p] = t
            assert not e["grad"] and not e["requires_grad"], "a score taken with gradients on"
            continue
        for p in e["targets"]:
            assert scored_at.get(p, len(events)) < t, f"{e['kind']} step trained on target {p} before scoring it"
        for p in e["inputs"]:
            assert p in starts or scored_at.get(p, len(events)) < t, f"{e['kind']} step read token {p} before scoring it"
    assert sorted(scored_at) == list(range(1, n + 1)), "every target scored"


# -----------------------------------------------------------------------------------------
# documents, batches, windows
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("leading_bos", [True, False])
@pytest.mark.parametrize("lengths", [LENGTHS, [2], [5, 2, 2, 9], [300]])
def test_condition_single_pass_documents(lengths, leading_bos):
    """Documents run from a BOS through the next BOS; their targets are the stream's targets, each
    in exactly one document, also for a stream that does not open with a BOS, empty documents
    (BOS BOS) and a final BOS (which starts nothing)."""
    tokens = doc_stream(lengths, leading_bos=leading_bos)
    tokens = torch.cat((tokens, torch.tensor([BOS])))  # a BOS as the last token
    docs = tg.find_documents(tokens)
    count = torch.zeros(tokens.numel(), dtype=torch.int64)
    for start, length in docs:
        assert length >= 2 and (tokens[start] == BOS or start == 0)
        assert int(tokens[start + length - 1]) == BOS, "a document ends with the next one's BOS"
        assert (tokens[start + 1: start + length - 1] != BOS).all()
        count[start + 1: start + length] += 1
    assert count[0] == 0 and (count[1:] == 1).all()
    assert [s for s, _ in docs] == sorted(document_starts(tokens) - {tokens.numel() - 1})


def test_queue_is_batches_by_length_longest_first():
    """Hand-made case: lengths sorted stably and cut in twos (the shortest first: batch indices),
    scored longest batch first, ties in index order; a phase takes documents by batch index."""
    docs = [(0, 5), (0, 3), (0, 9), (0, 3), (0, 7), (0, 9), (0, 4)]
    # Ascending: 1(3) 3(3) 6(4) 0(5) 4(7) 2(9) 5(9) -> batches [1,3] [6,0] [4,2] [5].
    queue = tg.phased_ttt_queue(docs, 2)
    assert queue == [(2, [4, 2]), (3, [5]), (1, [6, 0]), (0, [1, 3])]
    assert tg.phased_phase_documents(queue[:2], docs, 2) == [docs[4], docs[2]]
    assert tg.phased_phase_documents(queue[:3], docs, 3) == [docs[6], docs[0], docs[4]]


@pytest.mark.parametrize("chunk,window", [(16, 64), (48, 64), (7, 20), (1, 4)])
def test_chunk_rows_are_the_windows_of_the_definition(monkeypatch, chunk, window):
    """Chunk c of a document of n targets scores its targets c*chunk .. min((c+1)*chunk, n) - 1,
    reading the last <= window tokens up to the chunk's end; a document trains on the chunk while
    targets are left; padding is zero and unscored."""
    monkeypatch.setattr(tg, "PHASED_CHUNK", chunk)
    h = make_h(eval_seq_len=64, train_seq_len=64)
    h.eval_seq_len = window  # the rows only read the window length
    tokens = doc_stream([70, 2, 23, 150])
    docs = tg.find_documents(tokens)
    for c in range(-(-149 // chunk)):
        rows = tg.phased_chunk_rows(h, tokens, docs, c)
        assert rows.x.shape[1] == min((c + 1) * chunk, window)
        for b, (start, length) in enumerate(docs):
            n = length - 1
            first, last = c * chunk, min((c + 1) * chunk, n)  # the chunk, in targets of the document
            if first >= n:
                assert not rows.x[b].any() and not rows.score[b].any() and not rows.train[b] and (rows.pos[b] < 0).all()
                continue
            context = max(0, last - window)  # first input token, in positions of the document
            width = last - context
            assert torch.equal(rows.x[b, :width], tokens[start + context: start + last])
            assert torch.equal(rows.y[b, :width], tokens[start + context + 1: start + last + 1])
            assert torch.equal(rows.pos[b, :width], torch.arange(start + context + 1, start + last + 1))
            assert not rows.x[b, width:].any() and (rows.pos[b, width:] < 0).all()
            scored = rows.pos[b][rows.score[b]].tolist()
            assert scored == list(range(start + 1 + first, start + 1 + last))
            assert bool(rows.train[b]) == (last < n)
            if rows.train[b]:  # a training row's chunk is full, and where the shared offset says
                assert rows.pos[b, rows.offset: rows.offset + chunk].tolist() == scored


def test_sgd_rows_cut_at_documents_and_every_window():
    """A global SGD step's pieces: cut at each BOS and each document start of the concatenation and
    every EVAL_SEQ_LEN tokens from a piece's start; no piece holds two documents' tokens, the next
    document's first token is never a target, and the loss's count is the step's trained targets."""
    h = make_h()
    rt = runtime(h)
    tokens = doc_stream([40, 150, 9, 80], seed=3, leading_bos=False)  # the first document has no BOS
    docs = tg.find_documents(tokens)
    chosen = [docs[2], docs[0], docs[3], docs[1]]
    stream = torch.cat([tokens[s: s + n] for s, n in chosen])
    origin = torch.cat([torch.cat((torch.tensor([-1]), torch.arange(s + 1, s + n))) for s, n in chosen])
    rows = tg.phased_sgd_rows(h, rt, stream, origin, 0, 256)
    owner = {}  # position -> document
    for d, (s, n) in enumerate(chosen):
        owner.update({p: d for p in range(s + 1, s + n)})
    expected = [p for p in origin[1:257].tolist() if p >= 0]
    assert sorted(rows.pos[rows.mask].tolist()) == sorted(expected) and rows.count == len(expected)
    for r in range(rows.x.size(0)):
        pos = rows.pos[r][rows.mask[r]].tolist()
        assert len({owner[p] for p in pos}) == 1, "a piece holds one document"
        assert pos == list(range(pos[0], pos[0] + len(pos))), "a piece is contiguous"
        assert len(pos) <= h.eval_seq_len
        assert torch.equal(rows.y[r][rows.mask[r]], tokens[pos])
        assert torch.equal(rows.x[r][rows.mask[r]], tokens[[p - 1 for p in pos]])


# -----------------------------------------------------------------------------------------
# the adapters' forward, against hooks written here
# -----------------------------------------------------------------------------------------


def random_lora(h, model, rows: int, seed: int) -> tg.DocumentLoRA:
    lora = tg.DocumentLoRA(h, model, rows)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return lora


def adapter_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * x A^T B^T for each row b, written out: (rows, T, in) -> (rows, T, out)."""
    return scale * torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, A), B)


def hand_adapted_nll(model, h, lora, x, y) -> torch.Tensor:
    """Per-token NLL with the adapters added by forward hooks on the model's own modules: beside
    c_q/c_k/c_v (their input), beside the attention (from its input a) and the MLP (from its
    input), and beside the head (from the final hidden state), each block call using the slot its
    place in ORDER gives it."""
    scale = tg.PHASED_LORA_ALPHA / h.phased_ttt_lora_rank
    calls = {i: 0 for i in range(h.num_layers)}
    slot_of = {}

    def block_pre(i):
        def hook(module, args):
            slot_of[i] = [s for s, layer in enumerate(ORDER) if layer == i][calls[i]]
            calls[i] += 1
        return hook

    def add(i, name):
        def hook(module, args, out):
            ad = getattr(lora.slots[slot_of[i]], name)
            return out + adapter_delta(args[0], ad.A, ad.B, scale).reshape(out.shape)
        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(block_pre(i)))
        for name, module in (("q", block.attn.c_q), ("k", block.attn.c_k), ("v", block.attn.c_v),
                             ("o", block.attn), ("mlp", block.mlp)):
            handles.append(module.register_forward_hook(add(i, name)))
    try:
        hidden = model.forward_hidden(x)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {i: ORDER.count(i) for i in calls}
    logits = hidden @ model.tok_emb.weight.T + adapter_delta(hidden, lora.head.A, lora.head.B, scale)
    logits = h.logit_softcap * torch.tanh(logits / h.logit_softcap)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def test_lora_forward_matches_hand_written_adapters():
    """GPT.forward with `lora` equals the model with every adapter added by hand at its place, for
    three rows with adapters of their own, looping on (a layer run twice has two slots), parallel
    and sequential blocks; each row depends only on its own adapters."""
    h = make_h()
    model = build_model(h)
    assert model.encoder_indices + model.decoder_indices == ORDER
    lora = random_lora(h, model, 3, seed=1)
    assert len(lora.slots) == len(ORDER)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, V, (3, 40), generator=g), torch.randint(0, V, (3, 40), generator=g)
    with torch.no_grad():
        ours = model(x, y, reduction="none", lora=lora)
        ref = hand_adapted_nll(model, h, lora, x, y)
        plain = model(x, y, reduction="none")
        assert (ours - ref).abs().max() < 1e-4
        assert (ours - plain).abs().max() > 0.1, "the adapters change the output: the comparison has teeth"
        other = random_lora(h, model, 3, seed=5)
        with torch.no_grad():
            for a, b in zip(lora.adapters(), other.adapters()):
                b.A[0], b.B[0] = a.A[0], a.B[0]
        mixed = model(x, y, reduction="none", lora=other)
        assert torch.allclose(mixed[0], ours[0], atol=1e-5) and (mixed[1:] - ours[1:]).abs().max() > 0.1


def test_fresh_adapters_change_nothing_and_draw_reproducibly():
    """B at zero: the adapted model is the model, exactly. A is uniform in +-1/sqrt(fan-in) and the
    same seed draws the same A."""
    h = make_h()
    model = build_model(h)
    lora = tg.DocumentLoRA(h, model, 2)
    a_state = tg.fresh_lora_a(lora, seed=11)
    lora.start_batch(a_state)
    x = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x, x, reduction="none", lora=lora), model(x, x, reduction="none"))
    bound = h.model_dim ** -0.5
    assert all(a.abs().max() <= bound and a.abs().max() > 0.9 * bound for a in a_state)
    again = tg.fresh_lora_a(lora, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(a_state, again))
    assert not torch.equal(tg.fresh_lora_a(lora, seed=12)[0], a_state[0])
    assert [m.A.shape for m in lora.adapters()][-1] == (2, h.phased_ttt_lora_rank, h.model_dim)
    assert lora.head.B.shape == (2, V, h.phased_ttt_lora_rank)
    assert lora.slots[0].k.B.shape == (2, h.num_kv_heads * h.head_dim, h.phased_ttt_lora_rank)


# -----------------------------------------------------------------------------------------
# the compliance conditions, from an event trace
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["no_grad_scoring", "shared_forward"])
def test_condition_score_before_update_trace(fast, monkeypatch, shared):
    """An instrumented run (9 documents, batches of 2, two phases): every target scored once and
    under no_grad (with the shared forward: its losses detached, before the step), no adapter or
    SGD step uses a token before it is scored, and the phases train on scored documents only."""
    h = make_h(phased_ttt_shared_forward=shared)
    tokens = doc_stream(LENGTHS, seed=4)
    events = record_events(monkeypatch)
    phases = []
    original = tg._phased_global_sgd

    def global_sgd(h, rt, forward, model, tokens, docs):
        phases.append((len([e for e in events if e["kind"] == "score"]), list(docs)))
        return original(h, rt, forward, model, tokens, docs)

    monkeypatch.setattr(tg, "_phased_global_sgd", global_sgd)
    lines = []
    tg.evaluate_ttt_phased(h, runtime(h), build_model(h), tokens, fake_luts(), log=lines.append)
    if shared:  # the training forward's losses are the scores: taken with gradients on, detached
        assert any(e["requires_grad"] for e in events if e["kind"] == "score")
        for e in events:
            if e["kind"] == "score":
                e["grad"] = e["requires_grad"] = False
    check_trace(events, tokens)
    assert {e["kind"] for e in events} == {"score", "lora", "sgd"}
    # Phase boundaries at 2 and 5 documents (PREFIX_DOCS=5, two phases): the first after batch 2
    # (the short batch of the longest document, then two: 3 scored), the second after batch 3.
    assert [len(d) for _, d in phases] == [2, 5]
    scores = [set(e["targets"]) for e in events if e["kind"] == "score"]
    for n_scores, docs in phases:  # each phase's documents were wholly scored before it began
        scored = set().union(*scores[:n_scores])
        assert all(set(range(s + 1, s + n)) <= scored for s, n in docs)
    assert sum(1 for line in lines if line.startswith("phased_ttt_phase:")) == 2
    assert lines[-1].startswith("phased_ttt_progress batches:5/5 docs:9/9 phases:2/2")


def test_condition_phases_train_on_scored_documents_only(fast, monkeypatch):
    """Each SGD step of a phase trains on targets of the documents the phase was given, and those
    documents were wholly scored before the phase's first step; after a phase nothing of them is
    scored again."""
    h = make_h()
    tokens = doc_stream(LENGTHS, seed=4)
    events = record_events(monkeypatch)
    given = []
    original = tg._phased_global_sgd

    def global_sgd(h, rt, forward, model, tokens, docs):
        given.append((len(events), {p for s, n in docs for p in range(s + 1, s + n)}))
        return original(h, rt, forward, model, tokens, docs)

    monkeypatch.setattr(tg, "_phased_global_sgd", global_sgd)
    tg.evaluate_ttt_phased(h, runtime(h), build_model(h), tokens, fake_luts())
    assert len(given) == 2
    bounds = [t for t, _ in given] + [len(events)]
    for k, (start, targets) in enumerate(given):
        before = {p for e in events[:start] if e["kind"] == "score" for p in e["targets"]}
        assert targets <= before, "a phase's documents are scored before it"
        phase_events = [e for e in events[start:bounds[k + 1]] if e["kind"] == "sgd"]
        assert phase_events and all(e["kind"] == "sgd" for e in events[start: start + len(phase_events)])
        trained = {p for e in phase_events for p in e["targets"]}
        assert trained <= targets and len(trained) > 0.5 * len(targets)  # all but each phase's last chunk


def test_condition_adapters_reset_per_batch_and_warm_start_a(fast, monkeypatch):
    """Each batch: B zero and a new AdamW with no state at its first step; A is the A the previous
    batch of the same chain left (chain q % 2), fresh after each phase and for the short batch; the
    adapters do train (A and B move within a batch)."""
    h = make_h(phased_ttt_prefix_docs=3, phased_ttt_num_phases=1)
    tokens = doc_stream(LENGTHS, seed=6)
    starts, ends = [], []
    original = tg._phased_ttt_batch

    def batch(h, rt, forward, lora, tokens, docs, luts):
        starts.append(dict(first_event=len(events), A=[m.A.detach().clone() for m in lora.adapters()],
                           B_zero=all(not m.B.any() for m in lora.adapters()), rows=len(docs),
                           steps=max(-(-(n - 1) // tg.PHASED_CHUNK) for _, n in docs) - 1))
        out = original(h, rt, forward, lora, tokens, docs, luts)
        ends.append(dict(A=[m.A.detach().clone() for m in lora.adapters()],
                         B_moved=all(m.B.any() for m in lora.adapters())))
        return out

    monkeypatch.setattr(tg, "_phased_ttt_batch", batch)
    events = record_events(monkeypatch)
    tg.evaluate_ttt_phased(h, runtime(h), build_model(h), tokens, fake_luts())
    # Queue: the short batch (the 150-token document), then 4 batches of 2. 3 documents are scored
    # after q=1, so the phase follows q=1. Chains q % 2: q=1 chain 1 (fresh), phase, q=2 chain 0
    # (fresh), q=3 chain 1 (fresh again: after the phase), q=4 chain 0 (warm: from q=2).
    assert [s["rows"] for s in starts] == [1, 2, 2, 2, 2]
    assert all(s["B_zero"] for s in starts)
    assert [s["steps"] > 0 for s in starts] == [True, True, True, True, False]  # the last: one chunk each
    for s, e in zip(starts, ends):  # the adapters train within a batch that has a step
        assert e["B_moved"] == any(not torch.equal(a, b) for a, b in zip(s["A"], e["A"])) == (s["steps"] > 0)
    left = [x for e in ends for x in e["A"]]
    fresh = [not any(torch.equal(s["A"][0], x) for x in left) for s in starts]
    assert fresh == [True, True, True, True, False]
    assert all(torch.equal(a, b) for a, b in zip(starts[4]["A"], ends[2]["A"]))
    bounds = [s["first_event"] for s in starts] + [len(events)]
    for k, s in enumerate(starts):  # each batch's optimizer has no state at its first step, and keeps it after
        states = [e["state"] for e in events[bounds[k]: bounds[k + 1]] if e["kind"] == "lora"]
        assert len(states) == s["steps"] and states[:1] in ([], [0]) and all(n > 0 for n in states[1:])

    # Without a phase in between, a chain's next batch starts from the A its last batch left.
    starts.clear(), ends.clear()
    h = make_h(phased_ttt_prefix_docs=0)
    tg.evaluate_ttt_phased(h, runtime(h), build_model(h), tokens, fake_luts())
    for q in (3, 4):  # chain q % 2 ran batch q - 2 last
        assert all(torch.equal(a, b) for a, b in zip(starts[q]["A"], ends[q - 2]["A"]))
    assert not any(torch.equal(a, b) for a, b in zip(starts[2]["A"], ends[1]["A"]))  # another chain


def test_condition_scoring_forward_is_the_models_under_no_grad(fast, monkeypatch):
    """Scores come from GPT.forward (reduction 'none', the adapters given, evaluation mode, no
    gradients); adapter steps from the same call with gradients; SGD steps from GPT.forward in
    training mode without adapters; the shared forward makes one call less per training chunk."""
    calls = {}
    for shared in (False, True):
        h = make_h(phased_ttt_shared_forward=shared)
        seen = calls[shared] = []
        original = tg.GPT.forward

        def forward(self, ids, targets, reduction="mean", cu_seqlens=None, lora=None, seen=seen):
            seen.append((torch.is_grad_enabled(), lora is not None, self.training, reduction))
            return original(self, ids, targets, reduction, cu_seqlens, lora)

        monkeypatch.setattr(tg.GPT, "forward", forward)
        tg.evaluate_ttt_phased(h, runtime(h), build_model(h), doc_stream(LENGTHS, seed=4), fake_luts())
        monkeypatch.setattr(tg.GPT, "forward", original)
    plain = calls[False]
    assert set(plain) == {(False, True, False, "none"), (True, True, False, "none"), (True, False, True, "none")}
    scoring = plain.count((False, True, False, "none"))
    training = plain.count((True, True, False, "none"))
    assert calls[True].count((True, True, False, "none")) == training
    assert calls[True].count((False, True, False, "none")) == scoring - training


# -----------------------------------------------------------------------------------------
# the whole evaluation against a reference written from the definition
# -----------------------------------------------------------------------------------------


def reference_phased(model, tokens: torch.Tensor, h) -> dict[int, float]:
    """Phased TTT from its definition, one document at a time: per-target NLL by position.

    Documents BOS..BOS; batches of BATCH_DOCS by length (stable), scored longest first. A batch's
    rows start with A from their chain (batch q: chain q % CHAINS; fresh after a phase and for a
    short batch) and B = 0. Chunk c of each document: its targets c*CHUNK.., the window the last
    <= EVAL_SEQ_LEN tokens; scored, then every row takes an AdamW step (written out below) on its
    chunk's mean loss if it has targets left, else on a zero gradient (weight decay only), as one
    optimizer over the batch does. After the batch that brings the documents scored to a phase's
    boundary, SGD with momentum on every weight over the first BOUNDARY documents by batch index,
    concatenated, TTT_CHUNK_TOKENS at a time, each chunk but the last one step on the mean loss of
    its document pieces (cut at BOS and every EVAL_SEQ_LEN tokens), clipped, cosine learning rate."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    n = tokens.numel()
    chunk, L, K = tg.PHASED_CHUNK, h.eval_seq_len, h.phased_ttt_batch_docs
    opens = [0] + [i for i in range(1, n - 1) if int(tokens[i]) == BOS]
    docs = [(s, e - s + 1) for s, e in zip(opens, opens[1:] + [n - 1])]
    ascending = sorted(range(len(docs)), key=lambda d: (docs[d][1], d))
    batches = [ascending[i: i + K] for i in range(0, len(docs), K)]
    order = sorted(range(len(batches)), key=lambda b: (-docs[batches[b][-1]][1], b))
    prefix = min(h.phased_ttt_prefix_docs, len(docs))
    bounds = [prefix * (p + 1) // h.phased_ttt_num_phases for p in range(h.phased_ttt_num_phases)] if prefix else []
    lr, b1, b2, eps, wd = tg.PHASED_LORA_LR, tg.PHASED_ADAM_BETA1, h.phased_ttt_beta2, tg.PHASED_ADAM_EPS, h.phased_ttt_wd
    nll: dict[int, float] = {}
    chain_a: dict[int, list] = {}
    phase = done = 0
    one = tg.DocumentLoRA(h, model, 1)  # a one-row adapter set: row b's tensors are loaded into it
    for q, b in enumerate(order):
        members = batches[b]
        chain, seed = q % tg.PHASED_LORA_CHAINS, (h.seed * 1000 + phase) * 1_000_000 + q % tg.PHASED_LORA_CHAINS
        if len(members) == K:
            a0 = chain_a.get(chain) or tg.fresh_lora_a(tg.DocumentLoRA(h, model, K), seed)
        else:
            a0 = tg.fresh_lora_a(tg.DocumentLoRA(h, model, len(members)), seed + tg.PHASED_LORA_CHAINS + q)
        shapes = [m.B.shape[1:] for m in one.adapters()]
        rows = [dict(A=[a[r].clone() for a in a0], B=[torch.zeros(s) for s in shapes]) for r in range(len(members))]
        for row in rows:
            row["m"] = [torch.zeros_like(t) for t in row["A"] + row["B"]]
            row["v"] = [torch.zeros_like(t) for t in row["A"] + row["B"]]
        n_chunks = [-(-(docs[d][1] - 1) // chunk) for d in members]
        for c in range(max(n_chunks)):
            grads = []
            for r, d in enumerate(members):
                start, length = docs[d]
                with torch.no_grad():
                    for m, a, bb in zip(one.adapters(), rows[r]["A"], rows[r]["B"]):
                        m.A[0], m.B[0] = a, bb
                if c >= n_chunks[r]:
                    grads.append(None)
                    continue
                end = min((c + 1) * chunk, length - 1)
                ctx = max(0, end - L)
                x = tokens[start + ctx: start + end][None]
                y = tokens[start + ctx + 1: start + end + 1][None]
                with torch.no_grad():
                    out = model(x, y, reduction="none", lora=one)[0]
                for j in range(c * chunk, end):
                    nll[start + 1 + j] = out[j - ctx].item()
                if end < length - 1:
                    loss = model(x, y, reduction="none", lora=one)[0, c * chunk - ctx:].mean()
                    params = [m.A for m in one.adapters()] + [m.B for m in one.adapters()]
                    grads.append([g[0] for g in torch.autograd.grad(loss, params)])
                else:
                    grads.append(None)
            if not any(g is not None for g in grads):
                continue
            step = c + 1
            for r, row in enumerate(rows):
                tensors = row["A"] + row["B"]
                g_all = grads[r] or [torch.zeros_like(t) for t in tensors]
                for i, (t, g) in enumerate(zip(tensors, g_all)):
                    row["m"][i] = b1 * row["m"][i] + (1 - b1) * g
                    row["v"][i] = b2 * row["v"][i] + (1 - b2) * g * g
                    m_hat = row["m"][i] / (1 - b1 ** step)
                    v_hat = row["v"][i] / (1 - b2 ** step)
                    t.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + eps))
        if len(members) == K:
            chain_a[chain] = [torch.stack([row["A"][i] for row in rows]) for i in range(len(rows[0]["A"]))]
        done += len(members)
        if phase < len(bounds) and done >= bounds[phase] and q + 1 < len(order):
            scored = sorted(order[: q + 1])
            chosen = [docs[d] for bb in scored for d in batches[bb]][: bounds[phase]]
            reference_sgd(model, tokens, chosen, h)
            chain_a.clear()
            phase += 1
    return nll


def reference_sgd(model, tokens, chosen, h) -> None:
    """A global SGD phase from its definition (see reference_phased)."""
    L, C = h.eval_seq_len, h.ttt_chunk_tokens
    stream = torch.cat([tokens[s: s + n] for s, n in chosen])
    is_start = torch.zeros(stream.numel(), dtype=torch.bool)
    offset = 0
    for _, n in chosen:
        is_start[offset] = True
        offset += n
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    momentum = [None] * len(params)
    n_chunks = -(-(stream.numel() - 1) // C)
    for c in range(n_chunks - 1):
        lr = tg.PHASED_SGD_LR * 0.5 * (1 + math.cos(math.pi * c / (n_chunks - 1)))
        lo = c * C
        cuts = [k for k in range(C) if k == 0 or int(stream[lo + k]) == BOS or is_start[lo + k]]
        pieces = []
        for a, b in zip(cuts, cuts[1:] + [C]):
            pieces += [(p, min(p + L, b)) for p in range(a, b, L)]
        total, count = 0.0, 0
        for a, b in pieces:
            keep = ~is_start[lo + a + 1: lo + b + 1]
            if not keep.any():
                continue
            out = model(stream[lo + a: lo + b][None], stream[lo + a + 1: lo + b + 1][None], reduction="none")[0]
            total = total + out[keep].sum()
            count += int(keep.sum())
        grads = torch.autograd.grad(total / count, params)
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
        coef = min(1.0, h.ttt_grad_clip / (norm + 1e-6))
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                g = g * coef
                momentum[i] = g.clone() if momentum[i] is None else h.ttt_momentum * momentum[i] + g
                p.sub_(lr * momentum[i])
    for p in params:
        p.requires_grad_(False)


def test_condition_score_before_update_matches_reference(fast, monkeypatch):
    """Per-target scores and the result equal the reference written from the definition (two
    phases, warm-start chains, a short batch, documents with sliding windows); and they differ
    clearly from the plain model's scores after the first batch: adaptation is live."""
    h = make_h()
    tokens = doc_stream(LENGTHS, seed=8)
    model = build_model(h)
    sums, summarize = [], tg.summarize
    with pytest.MonkeyPatch.context() as mp:  # the recording only; the reference runs unwrapped
        events = record_events(mp)
        mp.setattr(tg, "summarize", lambda s, rt: sums.append(s.tolist()) or summarize(s, rt))
        loss, bpb, _ = tg.evaluate_ttt_phased(h, runtime(h), copy.deepcopy(model), tokens, fake_luts())
    ours = {p: v for e in events if e["kind"] == "score" for p, v in zip(e["targets"], e["nll"])}
    ref = reference_phased(model, tokens, h)
    assert sorted(ref) == sorted(ours) == list(range(1, tokens.numel()))
    worst = max(abs(ours[p] - ref[p]) for p in ref)
    assert worst < 2e-4, worst
    (loss_sum, n_tokens, n_bytes), = sums
    assert n_tokens == tokens.numel() - 1 and n_bytes == lut_bytes(tokens, fake_luts())
    assert abs(loss - sum(ref.values()) / len(ref)) < 1e-5
    assert abs(bpb - loss / math.log(2) * n_tokens / n_bytes) < 1e-9
    with torch.no_grad():  # the plain model, each target with the same window
        plain = {}
        for start, length in tg.find_documents(tokens):
            for c in range(-(-(length - 1) // tg.PHASED_CHUNK)):
                end = min((c + 1) * tg.PHASED_CHUNK, length - 1)
                ctx = max(0, end - h.eval_seq_len)
                out = model(tokens[start + ctx: start + end][None], tokens[start + ctx + 1: start + end + 1][None],
                            reduction="none")[0]
                plain.update({start + 1 + j: out[j - ctx].item() for j in range(c * tg.PHASED_CHUNK, end)})
    first_doc = tg.find_documents(tokens)[2]  # the longest: the first batch; its first chunk is unadapted
    first_chunk = range(first_doc[0] + 1, first_doc[0] + 1 + tg.PHASED_CHUNK)
    assert max(abs(ours[p] - plain[p]) for p in first_chunk) < 1e-4
    assert max(abs(ours[p] - plain[p]) for p in ref) > 1e-2


def test_without_phases_or_training_it_is_windowed_scoring(monkeypatch):
    """No prefix documents and a zero adapter learning rate: every score is the plain model's on
    its window (the adapters' A moves only by weight decay and B stays zero)."""
    monkeypatch.setattr(tg, "PHASED_CHUNK", 16)
    monkeypatch.setattr(tg, "PHASED_LORA_LR", 0.0)
    h = make_h(phased_ttt_prefix_docs=0)
    tokens = doc_stream(LENGTHS[:5], seed=9)
    model = build_model(h)
    events = record_events(monkeypatch)
    tg.evaluate_ttt_phased(h, runtime(h), model, tokens, fake_luts())
    assert not [e for e in events if e["kind"] == "sgd"]
    ours = {p: v for e in events if e["kind"] == "score" for p, v in zip(e["targets"], e["nll"])}
    with torch.no_grad():
        for start, length in tg.find_documents(tokens):
            n = min(length - 1, h.eval_seq_len)  # the targets whose window starts at the document
            full = model(tokens[start: start + n][None], tokens[start + 1: start + n + 1][None], reduction="none")[0]
            for j in range(n):
                assert abs(ours[start + 1 + j] - full[j].item()) < 1e-5


@pytest.mark.parametrize("shared", [False, True])
def test_sidecar_bytes_are_read_at_each_scored_target(fast, shared):
    """VAL_BYTE_SIDECAR=1 (CaseOps data): the bytes of a phased score are the sidecar's count at
    each target's stream position, every target once: the two results' bpb ratio is the sidecar's
    byte total over the tables' (loss and scores do not depend on the byte counts)."""
    tokens = doc_stream(LENGTHS[:6], seed=5)
    counts = torch.randint(0, 6, (tokens.numel(),), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    counts[tokens == BOS] = 0
    results = {}
    for sidecar in (False, True):
        h = make_h(val_byte_sidecar=sidecar, phased_ttt_shared_forward=shared)
        luts = counts if sidecar else fake_luts()
        results[sidecar] = tg.evaluate_ttt_phased(h, runtime(h), build_model(h), tokens, luts)
    assert results[True].val_loss == pytest.approx(results[False].val_loss, rel=1e-6)
    table_bytes = int(tg.token_bytes(tokens[:-1], tokens[1:], fake_luts()).sum())
    ratio = results[False].val_bpb / results[True].val_bpb
    assert ratio == pytest.approx(int(counts[1:].sum()) / table_bytes, rel=1e-6)


# -----------------------------------------------------------------------------------------
# distributed: two gloo ranks give the single-process result
# -----------------------------------------------------------------------------------------

# 13 documents in batches of 2, chains of 4 (ranks 0 and 1 take chains 0, 2 and 1, 3), phases
# after 2 and 4 documents: every rank scores, warm starts and takes part in SGD steps.
DIST_CASE = dict(lengths=[40, 20, 70, 31, 50, 23, 60, 37, 18, 44, 26, 55, 25], seed=21)
DIST_H = dict(phased_ttt_prefix_docs=4, phased_ttt_num_phases=2)
DIST_CONSTANTS = dict(PHASED_CHUNK=24, PHASED_LORA_CHAINS=4, PHASED_LORA_LR=3e-3, PHASED_SGD_LR=0.05)


def phased_case(h, rt) -> dict:
    """The distributed comparison's case, run by the single-process test and by each worker rank."""
    tokens = doc_stream(**DIST_CASE)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in DIST_CONSTANTS.items():
            mp.setattr(tg, name, value)
        events = record_events(mp)
        loss, bpb, _ = tg.evaluate_ttt_phased(h, rt, build_model(h), tokens, fake_luts())
    scored = [p for e in events if e["kind"] == "score" for p in e["targets"]]
    sgd = [e["count"] for e in events if e["kind"] == "sgd"]
    return dict(result=[loss, bpb], scored=scored, sgd_counts=sgd, n_targets=tokens.numel() - 1)


def test_distributed_matches_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "dist_frontier_ttt_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    h = make_h(**DIST_H)
    single = phased_case(h, runtime(h))
    for r in ranks:
        assert r["world_size"] == 2 and r["result"] == ranks[0]["result"], "ranks agree exactly"
        for a, b in zip(r["result"], single["result"]):
            assert abs(a - b) / abs(b) < 1e-6, (r["result"], single["result"])
        assert r["sgd_counts"] == single["sgd_counts"], "every rank takes every SGD step, on the whole step's mean"
    both = sorted(ranks[0]["scored"] + ranks[1]["scored"])
    assert both == sorted(single["scored"]) == list(range(1, single["n_targets"] + 1))
    assert ranks[0]["scored"] and ranks[1]["scored"]


# -----------------------------------------------------------------------------------------
# settings, stage, log
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (dict(phased_ttt_lora_rank=0), "PHASED_TTT_LORA_RANK=0 must be >= 1"),
    (dict(phased_ttt_batch_docs=0), "PHASED_TTT_BATCH_DOCS=0 must be >= 1"),
    (dict(phased_ttt_num_phases=0), "PHASED_TTT_NUM_PHASES=0 must be >= 1"),
    (dict(phased_ttt_prefix_docs=-1), "PHASED_TTT_PREFIX_DOCS=-1 must be >= 0"),
    (dict(eval_seq_len=32, ttt_chunk_tokens=128), "EVAL_SEQ_LEN=32 >= 48 (PHASED_CHUNK)"),
    (dict(eval_seq_len=128, ttt_chunk_tokens=256), "EVAL_SEQ_LEN=128 <= TRAIN_SEQ_LEN=64"),
    (dict(ttt_chunk_tokens=96, sliding_window_enabled=False, ttt_enabled=False),
     "TTT_CHUNK_TOKENS=96 to be a multiple of EVAL_SEQ_LEN=64"),
])
def test_bad_settings_are_refused(change, message):
    """Refused at construction with the setting and the value named; with the stage off the same
    values pass (they concern the phased stage alone)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make_h(**change)
    make_h(**change, phased_ttt_enabled=False)


def test_settings_default_to_the_record_run():
    h = tg.Hyperparameters()
    assert not h.phased_ttt_enabled and not h.phased_ttt_shared_forward
    assert (h.phased_ttt_lora_rank, h.phased_ttt_beta2, h.phased_ttt_wd, h.phased_ttt_batch_docs,
            h.phased_ttt_prefix_docs, h.phased_ttt_num_phases) == (80, 0.99, 0.5, 64, 2500, 3)
    assert (tg.PHASED_CHUNK, tg.PHASED_LORA_ALPHA / 80, tg.PHASED_LORA_LR, tg.PHASED_ADAM_BETA1, tg.PHASED_ADAM_EPS,
            tg.PHASED_SGD_LR, tg.PHASED_LORA_CHAINS) == (48, 1.8, 1e-4, 0.0, 1e-10, 1e-3, 8)
    assert (h.ttt_chunk_tokens, h.ttt_momentum, h.ttt_grad_clip, h.eval_seq_len) == (32768, 0.9, 1.0, 2048)
    tg.Hyperparameters(phased_ttt_enabled=True)  # the record's values are valid


def test_logformat_and_record_know_the_stage():
    import logformat
    import record

    assert logformat.STAGES["quantized_ttt_phased"] == "quantized_ttt_phased"
    assert logformat.FINAL_ORDER[0] == "quantized_ttt_phased" and "quantized_ttt_phased" in logformat.QUANTIZED_STAGES
    text = "\n".join(["quantized val_loss:2.00000000 val_bpb:1.20000000 eval_time:10ms",
                      "quantized_ttt val_loss:1.95000000 val_bpb:1.17000000 eval_time:30ms",
                      "quantized_ttt_phased val_loss:1.90000000 val_bpb:1.15000000 eval_time:40ms"])
    stages = logformat.scan_log(text)["stages"]
    assert stages["quantized_ttt_phased"] == {"val_loss": 1.9, "val_bpb": 1.15, "eval_time_ms": 40}
    assert stages["quantized_ttt"]["val_loss"] == 1.95
    log = dict(seed=1, run_id="r", path="x.txt", stages=stages, model_bytes=1, compressor="lzma", code_bytes=1,
               total_bytes=2, final_stage="quantized_ttt_phased")
    entry = record.run_entry(log)
    assert entry["val_bpb"] == 1.15 and entry["eval_time_quantized_total_ms"] == 80


def test_run_evaluates_phased_last_and_states_it_as_the_final_result(tiny_data, quick_run, tmp_path, monkeypatch):
    """EVAL_ONLY on a trained tiny artifact with every stage on: the phased stage runs after the
    others, its line has the stages' format, and the tools take it as the run's result; a log that
    has the switch on but lacks the line is an unfinished run."""
    import logformat

    env = dict(quick_run["env"], EVAL_ONLY="1", RUN_ID="phased", SLIDING_WINDOW_ENABLED="1", TTT_ENABLED="1",
               PHASED_TTT_ENABLED="1", PHASED_TTT_BATCH_DOCS="8", PHASED_TTT_PREFIX_DOCS="16",
               PHASED_TTT_NUM_PHASES="2", PHASED_TTT_LORA_RANK="8")
    assert run_main(env, monkeypatch, tmp_path) == 0
    text = read_log(tmp_path, "phased")
    stage_lines = [m.group(1) for m in logformat.lines_of(text, "stage")]
    assert stage_lines == ["quantized", "quantized_sliding_window", "quantized_ttt", "quantized_ttt_phased"]
    assert text.rstrip().splitlines()[-1].startswith("quantized_ttt_phased val_loss:")
    assert sum(1 for line in text.splitlines() if line.startswith("phased_ttt_phase:")) == 2
    log = logformat.parse_log(tmp_path / "logs" / "phased.txt")
    assert log["final_stage"] == "quantized_ttt_phased" and log["hparams"]["PHASED_TTT_ENABLED"] == "True"
    cut = tmp_path / "cut.txt"
    cut.write_text("\n".join(line for line in text.splitlines() if not line.startswith("quantized_ttt_phased")))
    with pytest.raises(logformat.LogError, match="PHASED_TTT_ENABLED is on but there is no 'quantized_ttt_phased"):
        logformat.parse_log(cut)


def test_packed_record_defaults_hold_no_phased_code():
    """pack.py's specialisation for the record's defaults removes every line of the phased stage;
    what stays is the settings (their log lines) and the adapters' parameter, passed on but never
    read, in the six model methods it goes through (pack.py keeps parameter lists as they are)."""
    import pack

    text = pack.specialise_source(Path(tg.__file__).read_bytes(), None).source
    for name in ("DocumentLoRA", "SlotLoRA", "BatchedLoRA", "evaluate_ttt_phased", "find_documents", "PHASED_",
                 "lora.", "lora_qkvo", "lora_mlp", "quantized_ttt_phased", "validate_phased_ttt", "BOS_ID"):
        assert name not in text, name
    assert "lora is not None" not in text and "lora[" not in text
