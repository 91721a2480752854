"""CaseOps: the lossless case transform (prepare_data.caseops_encode / caseops_decode), the validation
byte sidecar prepare_data.py --caseops writes beside the val shards, and the bpb train_gpt.py counts
from it with VAL_BYTE_SIDECAR=1.

The references here are written from the rules, not by calling the code under test: the transform
from its word rules over `itertools.groupby` runs, the sidecar from the record's rule over each
piece's surface (markers 0 bytes, an escaped symbol 3, anything else its UTF-8 length), the bpb as
sum(NLL) / ln 2 / sum(sidecar at the targets). The corpus and the tokenizer are made here.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import prepare_data as prep
import train_gpt
from conftest import read_log, run_main, tiny_hparams, tiny_run_env

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
SYMBOLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
VOCAB = 384  # conftest's tiny model reads this vocabulary
VAL_DOCS = 24
SHARD_TOKENS = 900  # the val split spans several shards, so sidecars are cut with their shards


# --- the transform: an independent reference -------------------------------------------------


def reference_encode(text: str) -> str:
    """The rules, run by run: a maximal run of ASCII letters is lower -> itself, Title -> TITLE +
    lower, ALL CAPS of two or more -> ALLCAPS + lower, else [TITLE if it starts with a capital] +
    first letter + CAPNEXT before each later capital; a literal symbol -> ESC + symbol."""
    out = []
    for is_letters, group in itertools.groupby(text, key=lambda c: c.isascii() and c.isalpha()):
        run = "".join(group)
        if not is_letters:
            out.append("".join(ESC + c if c in SYMBOLS else c for c in run))
            continue
        caps = [c.isupper() for c in run]
        if not any(caps):
            out.append(run)
        elif all(caps) and len(run) >= 2:
            out.append(ALLCAPS + run.lower())
        elif caps[0] and not any(caps[1:]):
            out.append(TITLE + run.lower())
        else:
            out.append((TITLE if caps[0] else "") + run[0].lower()
                       + "".join(CAPNEXT + c.lower() if up else c for c, up in zip(run[1:], caps[1:])))
    return "".join(out)


@pytest.mark.parametrize("text, expected", [
    ("", ""),
    ("the", "the"),
    ("The", TITLE + "the"),
    ("THE", ALLCAPS + "the"),
    ("A", TITLE + "a"),  # a lone capital is Title case, not ALL CAPS
    ("I am OK", TITLE + "i am " + ALLCAPS + "ok"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("HTTPServer2", TITLE + "h" + CAPNEXT + "t" + CAPNEXT + "t" + CAPNEXT + "p" + CAPNEXT + "s" + "erver2"),
    ("Élan ÉCOLE", "Élan É" + ALLCAPS + "cole"),  # only ASCII letters change: É stays, and splits the run
    ("x" + TITLE + "Y", "x" + ESC + TITLE + TITLE + "y"),
    (ESC + ESC, ESC + ESC + ESC + ESC),
    ("\ue000\ue005", "\ue000\ue005"),  # the neighbours of the four symbols are ordinary text
])
def test_transform_examples(text, expected):
    assert prep.caseops_encode(text) == expected == reference_encode(text)
    assert prep.caseops_decode(expected) == text


def test_transform_matches_the_reference_on_every_short_string():
    """Every string of up to 3 characters over letters of both cases, digits, space, a non-ASCII
    letter and the four symbols (and up to 5 over a smaller set): the same transform, and back."""
    for alphabet, longest in (("aBcD 1é" + "".join(SYMBOLS), 3), ("aA " + TITLE + ESC, 5)):
        for n in range(longest + 1):
            for chars in itertools.product(alphabet, repeat=n):
                text = "".join(chars)
                encoded = prep.caseops_encode(text)
                assert encoded == reference_encode(text), text
                assert prep.caseops_decode(encoded) == text, text


def _random_text(rng: random.Random) -> str:
    """Text of every kind the transform meets: case runs of each shape, digits, punctuation and
    whitespace, accented and combining characters, CJK, astral-plane characters, the reserved
    symbols and their neighbours, long runs."""
    def word() -> str:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
        shape = rng.random()
        if shape < 0.25:
            return w.capitalize()
        if shape < 0.4:
            return w.upper()
        if shape < 0.55:
            return "".join(c.upper() if rng.random() < 0.4 else c for c in w)
        return w
    pieces = [
        word, word, word,
        lambda: str(rng.randint(0, 10**6)),
        lambda: rng.choice([" ", "  ", "\n", "\n\n", "\t", ".", ",", "'", "-", "_", "\u00a0", "\u200b"]),
        lambda: rng.choice(SYMBOLS + ("\ue000", "\ue005")) * rng.randint(1, 3),
        lambda: rng.choice(["é", "Ö", "ß", "ﬁ", "Ａ", "ｂ", "ı", "İ", "e\u0301", "A\u0301", "\u0301", "中文", "東京"]),
        lambda: chr(rng.randint(0x10000, 0x10FFFF)),  # astral planes, assigned or not
        lambda: chr(rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0xFFFF)])),
        lambda: rng.choice(["A", "a", "Ab", "aB", "\ue004"]) * rng.randint(50, 400),  # long runs
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randint(0, 40)))


def test_round_trip_fuzz():
    rng = random.Random(1855)
    # Long runs: a lower-case run of 30,000 letters must not cost the search 30,000 rescans of it.
    long_runs = ["a" * 30_000, "a" * 30_000 + "B", "B" + "a" * 30_000, "aB" * 15_000, ESC * 15_000]
    texts = [_random_text(rng) for _ in range(1500)] + [""] + long_runs
    for text in texts:
        encoded = prep.caseops_encode(text)
        assert prep.caseops_decode(encoded) == text
        assert encoded == reference_encode(text)
        assert not re.search("[A-Z]", encoded)  # no ASCII capital survives the transform
        # Only the symbols are added: removing them (and the escapes) leaves the lower-cased text.
        assert re.sub(f"{ESC}(.)|[{TITLE}{ALLCAPS}{CAPNEXT}]", r"\1", encoded, flags=re.S) == re.sub(
            "[A-Z]+", lambda m: m.group().lower(), text)
    assert any(s in t for t in texts for s in SYMBOLS) and any(len(t) > 2000 for t in texts[:-len(long_runs)])


@pytest.mark.parametrize("text, message", [
    (ESC, "dangling ESC"),
    (TITLE, "dangling case marker"),
    ("a" + CAPNEXT, "dangling case marker"),
    (ESC + "a", "escapes only"),
    (TITLE + "1", "followed by an ASCII letter"),
    (ALLCAPS + " x", "followed by an ASCII letter"),
    ("a" + TITLE + "b", "inside a word"),
    (CAPNEXT + "a", "start of a word"),
    (TITLE + ALLCAPS + "a", "follows a marker"),
    (TITLE + ESC + TITLE, "follows a marker"),
])
def test_decode_refuses_what_no_transform_writes(text, message):
    with pytest.raises(ValueError, match=message):
        prep.caseops_decode(text)


def test_decode_passes_capitals_through():
    # NFKC turns the full-width "ＡＢ" into "AB" after the transform: decoding keeps them.
    assert prep.caseops_decode("AB " + TITLE + "xY") == "AB XY"
    # NFKC composes a marked letter with the combining mark after it: the marker then stands
    # before "á", which no transform writes (the documented exception; the sidecar is unaffected).
    normalized = unicodedata.normalize("NFKC", prep.caseops_encode("A\u0301b"))
    assert normalized == TITLE + "\u00e1b"
    with pytest.raises(ValueError, match="followed by an ASCII letter"):
        prep.caseops_decode(normalized)


# --- prepare_data.py --caseops -----------------------------------------------------------------

WORDS = ("the of and to in is was for that with as on by at from this are be had have not data model "
         "river city house music story letter garden window winter morning evening station").split()
ODD = ["McDonald", "iPhone", "NASA", "HTTPServer", "A", "OK", "Zürich", "façade", "ÉCOLE", "ﬁnance", "ＡＢＣ",
       "東京", "😀", "\U0001f680x", "A\u0301b", "e\u0301", TITLE, ALLCAPS + "x", CAPNEXT, ESC, ESC + TITLE, "\ue000",
       "zero\u200bwidth", "½", "x\u00a0y"]


def _doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 9)):
        words = [rng.choice(ODD) if rng.random() < 0.08 else rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words = [w.upper() if rng.random() < 0.05 else w for w in words]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?;:"))
    text = "".join(s + rng.choice([" ", " ", "  ", "\n", "\n\n", "\t", " \n "]) for s in sentences).rstrip()
    if rng.random() < 0.3:
        text = rng.choice(["  ", "\n", "\u200b", "\t "]) + text + rng.choice([" ", "\n", "  \n", "\u200b"])
    return text


def make_corpus(n: int = 260, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    docs = [_doc(rng) for _ in range(n)]
    docs[0] = "The first document is plain ASCII text, single spaces, NASA and McDonald's iPhone."
    docs[1] = ""  # skipped, as without --caseops
    docs[2] = "  Leading and trailing whitespace, " + ESC + " and a literal " + TITLE + ".  \n"
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def nonempty(corpus) -> list[str]:
    return [d for d in corpus if d.strip()]


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory, corpus):
    """prepare_data.py --caseops end to end: a tiny CaseOps tokenizer trained on the generated
    documents, shards and sidecars, into a fresh folder."""
    jsonl = prep.write_jsonl(tmp_path_factory.mktemp("input") / "docs.jsonl", corpus)
    out = tmp_path_factory.mktemp("caseops") / "data"
    manifest = prep.prepare([jsonl], out, vocab_size=VOCAB, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS,
                            quiet=True, caseops=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / manifest["tokenizer"]["path"]))
    return {"out": out, "manifest": manifest, "sp": sp, "jsonl": jsonl,
            "dataset": out / "datasets" / f"fineweb10B_sp{VOCAB}"}


def read_u16_shard(path: Path) -> np.ndarray:
    """A shard read from its bytes (header checked here), not through the readers under test."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
    assert len(raw) == 1024 + 2 * int(header[2])
    return np.frombuffer(raw[1024:], dtype="<u2").astype(np.int64)


def split_stream(out: Path, manifest: dict, split: str, key: str | None = None) -> np.ndarray:
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([read_u16_shard(out / (s[key]["file"] if key else s["file"])) for s in shards])


def per_document(tokens: np.ndarray, values: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """(ids, values at those ids) of each document of a stream that starts with BOS, BOS left out."""
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert starts[0] == 0
    return [(tokens[a + 1: b].tolist(), values[a + 1: b]) for a, b in zip(starts[:-1], starts[1:])]


def test_caseops_tokenizer_has_the_symbols_at_4_to_7_and_bytes_after(caseops_data, nonempty, tmp_path):
    sp, manifest = caseops_data["sp"], caseops_data["manifest"]
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *SYMBOLS]
    assert [sp.id_to_piece(i) for i in (8, 263)] == ["<0x00>", "<0xFF>"] and sp.is_byte(8) and not sp.is_byte(7)
    assert sp.normalize(" ".join(SYMBOLS)) == "\u2581".join(SYMBOLS)  # the normalizer leaves them alone
    assert sp.encode("a" + TITLE + "bc" + CAPNEXT + "d")[1] == 4  # never merged with a neighbour
    training = manifest["tokenizer"]["training"]
    assert training["user_defined_symbols"] == list(SYMBOLS) and training["normalization_rule_name"] == "nmt_nfkc"
    assert manifest["settings"]["caseops"] is True
    assert manifest["format"]["text_transform"] == "lossless_caps_caseops_v1"
    assert "fineweb_val_bytes_NNNNNN.bin" in manifest["format"]["byte_sidecar"]
    assert json.loads((caseops_data["out"] / "manifest.json").read_text()) == manifest
    # Trained on the transform of the training documents only: train_tokenizer's CaseOps model of them.
    expected = prep.train_tokenizer(nonempty[VAL_DOCS:], VOCAB, tmp_path / "t.model", caseops=True)
    assert (caseops_data["out"] / manifest["tokenizer"]["path"]).read_bytes() == expected.read_bytes()


def test_tokens_are_the_encoding_of_the_transform(caseops_data, nonempty):
    out, manifest, sp = caseops_data["out"], caseops_data["manifest"], caseops_data["sp"]
    val, train = split_stream(out, manifest, "val"), split_stream(out, manifest, "train")
    docs = [ids for ids, _ in per_document(val, val) + per_document(train, train)]
    assert len(docs) == len(nonempty) and manifest["splits"]["val"]["documents"] == VAL_DOCS
    assert docs == [sp.encode(prep.caseops_encode(d)) for d in nonempty]
    # The first document changes under no normalization: its tokens decode back to it exactly.
    assert prep.caseops_decode(sp.decode(docs[0])) == nonempty[0]
    assert ((val >= 4) & (val < 8)).any() and ((train >= 8) & (train < 264)).any()  # markers, byte fallback


def test_sidecar_files_beside_each_val_shard(caseops_data):
    out, manifest, dataset = caseops_data["out"], caseops_data["manifest"], caseops_data["dataset"]
    val_shards = manifest["splits"]["val"]["shards"]
    assert len(val_shards) >= 3
    names = sorted(p.name for p in dataset.glob("fineweb_val_bytes_*.bin"))
    assert names == [f"fineweb_val_bytes_{i:06d}.bin" for i in range(len(val_shards))]
    for shard in val_shards:
        side = shard["byte_sidecar"]
        assert side["file"] == shard["file"].replace("fineweb_val_", "fineweb_val_bytes_")
        counts = read_u16_shard(out / side["file"])
        assert len(counts) == shard["tokens"] == len(read_u16_shard(out / shard["file"]))
        assert side["bytes"] == int(counts.sum()) and side["sha256"] == prep._sha256_file(out / side["file"])
    assert not list(dataset.glob("fineweb_train_bytes_*")) and "byte_sidecar" not in manifest["splits"]["train"]["shards"][0]


def test_sidecar_sums_to_each_documents_utf8_bytes(caseops_data, nonempty):
    out, manifest = caseops_data["out"], caseops_data["manifest"]
    val = split_stream(out, manifest, "val")
    counts = split_stream(out, manifest, "val", key="byte_sidecar")
    assert (counts[val == 1] == 0).all()  # BOS stands for no byte
    sums = [int(c.sum()) for _, c in per_document(val, counts)]
    assert sums == [len(d.encode("utf-8")) for d in nonempty[:VAL_DOCS]]
    assert manifest["splits"]["val"]["original_bytes"] == sum(sums) == int(counts.sum())


def reference_counts(sp: spm.SentencePieceProcessor, transformed: str) -> list[int]:
    """The record's rule over each piece's surface (its span of the transformed text, as
    SentencePiece aligns it): a case marker or escaping ESC 0, the symbol an ESC escapes 3, anything
    else its UTF-8 length; what no surface covers at the start or end goes to the first or last piece."""
    offsets = sp.encode(transformed, out_type="offset_mapping")["offsets"]
    state = {"escaped": False}

    def weight(text: str) -> int:
        total = 0
        for ch in text:
            if state["escaped"]:
                total, state["escaped"] = total + len(ch.encode("utf-8")), False
            elif ch == ESC:
                state["escaped"] = True
            elif ch not in SYMBOLS:
                total += len(ch.encode("utf-8"))
        return total

    lead = weight(transformed[: offsets[0][0]]) if offsets else 0
    counts = [weight(transformed[b:e]) for b, e in offsets]
    if offsets:
        counts[0] += lead
        counts[-1] += weight(transformed[offsets[-1][1]:])
    return counts


def test_sidecar_entries_are_the_original_bytes_of_each_token(caseops_data, nonempty):
    """Token by token, against the record's surface rule; the corpus holds every case the
    normalizer changes (NFKC, collapsed and trimmed whitespace, deleted zero-width characters)
    and byte fallback."""
    sp = caseops_data["sp"]
    try:
        sp.encode("x", out_type="offset_mapping")
    except ValueError:
        pytest.skip("this SentencePiece has no offset_mapping output for the reference")
    out, manifest = caseops_data["out"], caseops_data["manifest"]
    val = split_stream(out, manifest, "val")
    counts = split_stream(out, manifest, "val", key="byte_sidecar")
    changed = 0
    for doc, (ids, c) in zip(nonempty, per_document(val, counts)):
        transformed = prep.caseops_encode(doc)
        changed += sp.normalize(transformed) != transformed.replace(" ", "\u2581")
        assert c.tolist() == reference_counts(sp, transformed), doc
    assert changed >= 3
    # Explicit cases: "ﬁ" counts its 3 original bytes; a collapsed "\n\n" both; a marker nothing; a
    # literal symbol its 3 (its escape nothing); trimmed and deleted characters are counted.
    cases = {"ﬁ": 3, "a\n\nb": 4, "A": 1, "NASA": 4, TITLE + "a": 4, "  x  ": 5, "x\u200by": 5}
    for doc, total in cases.items():
        t = prep.caseops_encode(doc)
        raw = sp.encode(t, out_type="serialized_proto")
        ids, begins, ends = prep._pieces_and_spans(raw)
        got = prep.caseops_byte_counts(t, begins, ends, "case")
        assert ids == sp.encode(t) and got.tolist() == reference_counts(sp, t) and got.sum() == total, doc
    assert prep.caseops_byte_counts(TITLE + "a", *prep._pieces_and_spans(
        sp.encode(TITLE + "a", out_type="serialized_proto"))[1:], "A").tolist() == [0, 1]


def _prepare_fails(tmp_path: Path, docs: list[str], match: str, **kwargs) -> None:
    jsonl = prep.write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    kwargs.setdefault("vocab_size", VOCAB)
    with pytest.raises(ValueError, match=match):
        prep.prepare([jsonl], out, val_docs=2, quiet=True, caseops=True, **kwargs)
    assert not out.exists()  # the staging folder went with the failure


def test_unrepresentable_validation_documents_are_refused(tmp_path, nonempty):
    # Only characters the normalizer deletes: bytes, but no token to give them to.
    _prepare_fails(tmp_path, [nonempty[0], "\u200b\u200b", *nonempty[2:]],
                   r"validation document 2 .*has 6 bytes but no token")
    # One piece for 70,000 spaces: more than a uint16 entry holds.
    _prepare_fails(tmp_path, ["a" + " " * 70_000 + "b", *nonempty[1:]],
                   r"validation document 1 .*70,00\d original bytes.*65,535")


def test_tokenizer_and_transform_must_agree(tmp_path, caseops_data, corpus):
    plain = prep.train_tokenizer(corpus[20:], VOCAB, tmp_path / "plain.model")
    _prepare_fails(tmp_path, corpus, "not a CaseOps tokenizer", tokenizer=plain, vocab_size=None)
    caseops_model = caseops_data["out"] / caseops_data["manifest"]["tokenizer"]["path"]
    with pytest.raises(ValueError, match="is a CaseOps tokenizer.*pass --caseops"):
        prep.prepare([caseops_data["jsonl"]], tmp_path / "plain_out", tokenizer=caseops_model, val_docs=2, quiet=True)
    # Reusing the CaseOps tokenizer with --caseops gives the same data (this is how the record's is used).
    again = prep.prepare([caseops_data["jsonl"]], tmp_path / "reuse", tokenizer=caseops_model, val_docs=VAL_DOCS,
                         shard_tokens=SHARD_TOKENS, quiet=True, caseops=True)
    for split in ("val", "train"):
        assert [s["sha256"] for s in again["splits"][split]["shards"]] == [
            s["sha256"] for s in caseops_data["manifest"]["splits"][split]["shards"]]
    assert [s["byte_sidecar"]["sha256"] for s in again["splits"]["val"]["shards"]] == [
        s["byte_sidecar"]["sha256"] for s in caseops_data["manifest"]["splits"]["val"]["shards"]]
    assert prep.train_tokenizer(corpus[20:], VOCAB, tmp_path / "c.model", caseops=True).read_bytes() != plain.read_bytes()


def test_cli_caseops(tmp_path, caseops_data, capsys):
    out = tmp_path / "cli"
    assert prep.main([str(caseops_data["jsonl"]), "--out", str(out), "--vocab-size", str(VOCAB), "--val-docs", "3",
                      "--caseops", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"VOCAB_SIZE={VOCAB} VAL_BYTE_SIDECAR=1 python train_gpt.py" in printed
    assert "validation byte sidecar beside the val shards" in printed
    assert (out / "datasets" / f"fineweb10B_sp{VOCAB}" / "fineweb_val_bytes_000000.bin").is_file()


# --- train_gpt.py VAL_BYTE_SIDECAR=1 ---------------------------------------------------------------


class FixedNLL(torch.nn.Module):
    """A stand-in model whose NLL of target y after input x is a known function of both."""

    def forward(self, x, y, reduction="none"):
        return (y.double() * 0.01 + x.double() * 0.001).float()


def test_score_windows_counts_the_sidecar_at_the_scored_targets(one_thread):
    """Window (start, score_from, end) scores targets score_from..end-1, which are tokens
    score_from+1..end: their sidecar entries are the bytes, whatever the windows and batches."""
    h = tiny_hparams(val_byte_sidecar=True, eval_seq_len=16, eval_stride=4, eval_batch_seqs=3, compile=False)
    rt = train_gpt.Runtime(h)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16 * 5 + 1,), generator=g)
    counts = torch.randint(0, 9, tokens.shape, generator=g, dtype=torch.int32)
    for windows in (train_gpt.make_windows(80, 16, 4), train_gpt.make_windows(80, 16, 16),
                    [(3, 7, 15), (20, 30, 36), (64, 64, 80)]):
        sums = train_gpt.score_windows(FixedNLL(), tokens, windows, h, rt, counts)
        targets = [t for _, score_from, end in windows for t in range(score_from, end)]
        nll = sum(float(torch.tensor(tokens[t + 1].item() * 0.01 + tokens[t].item() * 0.001).float())
                  for t in targets)
        assert sums[1].item() == len(targets)
        assert sums[2].item() == sum(int(counts[t + 1]) for t in targets)
        assert sums[0].item() == pytest.approx(nll, rel=1e-12)


def test_sidecar_bpb_of_a_tiny_run(caseops_data, tmp_path, monkeypatch, one_thread):
    """Training, GPTQ and all three evaluations on CaseOps data: each bpb is the run's mean NLL
    times the targets over ln 2 and the sidecar's bytes at the targets, read here from the files."""
    env = tiny_run_env({"data_dir": str(caseops_data["out"])}, tmp_path, VAL_BYTE_SIDECAR="1",
                       ITERATIONS="4", WARMUP_STEPS="1", VAL_LOSS_EVERY="2")
    assert run_main(env, monkeypatch, tmp_path) == 0
    log = read_log(tmp_path, env["RUN_ID"])
    n = int(re.search(r"^val_tokens:(\d+) ", log, re.M).group(1))
    counts = split_stream(caseops_data["out"], caseops_data["manifest"], "val", key="byte_sidecar")
    assert n == (len(counts) - 1) // 128 * 128  # truncated to whole EVAL_SEQ_LEN windows, the sidecar with it
    target_bytes = int(counts[1: n + 1].sum())
    assert f"val_byte_sidecar: {target_bytes} bytes" in log
    results = re.findall(r"^(\S.*?) val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    assert [label for label, _, _ in results] == [
        "pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"]
    for label, loss, bpb in results:
        expected = float(loss) * n / math.log(2) / target_bytes
        assert float(bpb) == pytest.approx(expected, rel=2e-8, abs=2e-8), label


def _copy_dataset(caseops_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(caseops_data["out"], root)
    return root / "datasets" / f"fineweb10B_sp{VOCAB}"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "fineweb_val_bytes_000001.bin").unlink(), r"byte sidecar .*fineweb_val_bytes_000001\.bin of "
     r".*fineweb_val_000001\.bin does not exist"),
    (lambda d: prep.write_shard(d / "fineweb_val_bytes_000000.bin", np.zeros(5, dtype=np.int64)),
     r"fineweb_val_bytes_000000\.bin has 5 entries, but its shard .*fineweb_val_000000\.bin has \d+ tokens"),
    (lambda d: (d / "fineweb_val_bytes_000000.bin").write_bytes(b"\x00" * 1030),
     r"corrupt shard .*fineweb_val_bytes_000000\.bin"),
    (lambda d: shutil.copy(d / "fineweb_val_bytes_000000.bin", d / "fineweb_val_bytes_000009.bin"),
     r"fineweb_val_bytes_000009\.bin has no validation shard"),
    (lambda d: prep.write_shard(d / "fineweb_val_bytes_000000.bin",  # shifted by one token
                                np.roll(read_u16_shard(d / "fineweb_val_bytes_000000.bin"), 1)),
     r"give a BOS token \d+ bytes: they do not belong to these shards"),
])
def test_bad_sidecars_are_refused_by_name(caseops_data, tmp_path, damage, message):
    dataset = _copy_dataset(caseops_data, tmp_path)
    damage(dataset)
    h = tiny_hparams(data_dir=str(dataset.parents[1]), val_byte_sidecar=True, eval_seq_len=128)
    val_tokens = train_gpt.load_validation_tokens(h.val_files, h.eval_seq_len, h.vocab_size)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_gpt.load_validation_sidecar(h, val_tokens)


def test_sidecars_are_never_read_as_shards(caseops_data, tmp_path, monkeypatch, one_thread):
    """Without VAL_BYTE_SIDECAR=1 a folder with sidecars stops the run before any work: the tables
    would count each case marker as 3 bytes. With it, the sidecars are not validation shards."""
    env = tiny_run_env({"data_dir": str(caseops_data["out"])}, tmp_path)
    with pytest.raises(ValueError, match=r"fineweb10B_sp384 has byte sidecars: set VAL_BYTE_SIDECAR=1"):
        run_main(env, monkeypatch, tmp_path)
    assert not (tmp_path / "final_model.pt").exists()
    h = tiny_hparams(data_dir=str(caseops_data["out"]), val_byte_sidecar=True)
    assert [Path(f).name for f in train_gpt.shard_files(h.val_files)] == [
        Path(s["file"]).name for s in caseops_data["manifest"]["splits"]["val"]["shards"]]
    assert train_gpt.sidecar_path("/d/fineweb_val_000003.bin") == "/d/fineweb_val_bytes_000003.bin"
    with pytest.raises(ValueError, match="not a validation shard"):
        train_gpt.sidecar_path("/d/fineweb_train_000003.bin")
