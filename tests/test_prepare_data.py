"""Tests for prepare_data.py: shard format, round trip, tokenizer reuse, errors, determinism, demo.

The corpus is generated here (English-like sentences from word lists, with
digits, punctuation, a few non-ASCII words and some awkward whitespace), so
the tests need nothing outside the repository.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]

import prepare_data as prep  # noqa: E402
import train_gpt  # noqa: E402  (the consumer: every shard written here is read back by its reader)

VOCAB = 400
VAL_DOCS = 7
SHARD_TOKENS = 3000

WORDS = (
    "the of and to in is was for that with as on by at from his her which this are were be "
    "had have not but they you one all an their there been has more when who will would can "
    "time people year water river city house market music story history language model data "
    "small large early later north south between during under against without through "
    "train token shard number letter garden window winter summer morning evening station"
).split()
RARE_WORDS = ["café", "naïve", "Zürich", "façade", "Ångström", "東京", "ﬁnance", "ＡＢＣ", "½", "<s>", "x▁y"]
PUNCT = [".", ",", ";", ":", "!", "?"]


def _sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(4, 16)):
        r = rng.random()
        if r < 0.03:
            words.append(rng.choice(RARE_WORDS))
        elif r < 0.08:
            words.append(str(rng.randint(0, 10**rng.randint(1, 6))))
        else:
            words.append(rng.choice(WORDS))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(PUNCT)


def _document(rng: random.Random) -> str:
    sentences = [_sentence(rng) for _ in range(rng.randint(2, 12))]
    text = ""
    for s in sentences:
        sep = rng.choice([" ", " ", " ", "\n", "\n\n", "  ", "\t"])
        text = s if not text else text + sep + s
    if rng.random() < 0.1:
        text = "  " + text + " \n"  # leading/trailing whitespace is normalized away
    return text


def make_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [_document(rng) for _ in range(n_docs)]
    # A few that are exactly reproduced by decoding (ASCII, single spaces),
    # and a few empty / whitespace-only ones that must be skipped.
    docs[0] = "The first document is plain text with single spaces and 42 apples."
    docs[3] = ""
    docs[10] = "  \n\t  "
    docs[n_docs // 2] = "   "
    return docs


def write_jsonl(path: Path, docs: list[str], blank_lines: bool = True) -> Path:
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=(i % 2 == 0)) for i, d in enumerate(docs)]
    if blank_lines:
        lines.insert(20, "")  # blank lines are not documents
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def split_docs(stream: np.ndarray) -> list[list[int]]:
    """Split a token stream on BOS; the stream must start with BOS."""
    assert stream[0] == prep.BOS_ID
    starts = np.flatnonzero(stream == prep.BOS_ID).tolist() + [len(stream)]
    return [stream[a + 1 : b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def split_stream(out: Path, manifest: dict, split: str) -> np.ndarray:
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([train_gpt.read_shard(str(out / s["file"])) for s in shards])


def bin_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.bin"))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def nonempty(corpus) -> list[str]:
    return [d for d in corpus if d.strip()]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, corpus) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("input") / "corpus.jsonl", corpus)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, jsonl):
    out = tmp_path_factory.mktemp("prepared") / "data"
    manifest = prep.prepare(
        [jsonl], out, vocab_size=VOCAB, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS, quiet=True
    )
    return out, manifest


@pytest.fixture(scope="module")
def sp(prepared) -> spm.SentencePieceProcessor:
    out, _ = prepared
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"))


# --- shard files ---------------------------------------------------------------


def test_layout_headers_sizes_and_manifest(prepared):
    out, manifest = prepared
    dataset = out / "datasets" / f"fineweb10B_sp{VOCAB}"
    assert (out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model").is_file()
    assert (out / "tokenizers" / f"fineweb_{VOCAB}_bpe.vocab").is_file()
    assert json.loads((out / "manifest.json").read_text()) == manifest

    for split in ("val", "train"):
        files = sorted(dataset.glob(f"fineweb_{split}_*.bin"))
        assert [f.name for f in files] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(files))]
        shards = manifest["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"datasets/fineweb10B_sp{VOCAB}/{f.name}" for f in files]
        for i, (f, s) in enumerate(zip(files, shards)):
            header = np.fromfile(f, dtype="<i4", count=256)
            n = int(header[2])
            assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
            assert f.stat().st_size == 1024 + 2 * n
            assert s["tokens"] == n and 0 < n <= SHARD_TOKENS
            if i < len(files) - 1:
                assert n == SHARD_TOKENS  # only the last shard of a split is short
            assert s["sha256"] == prep._sha256_file(f)
            tokens = train_gpt.read_shard(str(f))
            assert tokens.dtype == np.uint16 and len(tokens) == n and int(tokens.max()) < VOCAB
        assert manifest["splits"][split]["tokens"] == sum(s["tokens"] for s in shards)

    assert len(manifest["splits"]["train"]["shards"]) >= 3  # the train split spans several shards
    tok = manifest["tokenizer"]
    assert tok["source"] == "trained" and tok["vocab_size"] == VOCAB
    assert tok["sha256"] == prep._sha256_file(out / tok["path"])
    assert tok["training"]["documents"] > 0 and tok["training"]["byte_fallback"] is True
    # No staging directory or temporary file is left behind.
    assert sorted(p.name for p in out.iterdir()) == ["datasets", "manifest.json", "tokenizers"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_round_trip_and_split(prepared, sp, corpus, nonempty):
    out, manifest = prepared
    val = split_stream(out, manifest, "val")
    train = split_stream(out, manifest, "train")
    assert int((val == prep.BOS_ID).sum()) == VAL_DOCS
    val_docs, train_docs = split_docs(val), split_docs(train)
    assert len(val_docs) + len(train_docs) == len(nonempty)
    assert manifest["splits"]["val"]["documents"] == VAL_DOCS
    assert manifest["splits"]["train"]["documents"] == len(nonempty) - VAL_DOCS

    for text, ids in zip(nonempty, val_docs + train_docs):
        assert ids == sp.encode(text)
        # The guarantee: decoding gives the tokenizer-normalized text back.
        assert sp.decode(ids) == sp.normalize(text).replace("\u2581", " ")
    # Plain ASCII text with single spaces comes back exactly.
    assert nonempty[0].isascii() and sp.decode(val_docs[0]) == nonempty[0]
    # Literal "<s>" in text is spelled out, never turned into BOS.
    assert any("<s>" in d for d in nonempty)
    # Rare characters went through byte fallback (ids 4..259), and still round-tripped.
    assert ((train >= 4) & (train < 260)).any()

    stats = manifest["inputs"][0]
    assert stats["documents_read"] == len(corpus)
    assert stats["empty_documents_skipped"] == len(corpus) - len(nonempty) == 3
    assert stats["sha256"] == prep._sha256_file(Path(stats["path"]))


def test_shard_boundaries_do_not_change_the_stream(prepared, tmp_path, jsonl, sp, nonempty):
    out, manifest = prepared
    model = out / manifest["tokenizer"]["path"]
    one = prep.prepare([jsonl], tmp_path / "one", tokenizer=model, val_docs=VAL_DOCS, quiet=True)
    assert len(one["splits"]["train"]["shards"]) == 1
    expected = [prep.BOS_ID]
    for text in nonempty[VAL_DOCS:]:
        expected += sp.encode(text) + [prep.BOS_ID]
    expected = np.array(expected[:-1], dtype=np.uint16)
    many = split_stream(out, manifest, "train")
    assert np.array_equal(many, split_stream(tmp_path / "one", one, "train"))
    assert np.array_equal(many, expected)


def test_reused_tokenizer_gives_sp_encode_ids(prepared, tmp_path, jsonl, sp, nonempty):
    out, manifest = prepared
    model = out / manifest["tokenizer"]["path"]
    copy = tmp_path / "elsewhere.model"
    copy.write_bytes(model.read_bytes())  # no .vocab beside it: one is generated
    new = prep.prepare([jsonl], tmp_path / "reuse", tokenizer=copy, vocab_size=VOCAB, val_docs=3, quiet=True)
    assert new["tokenizer"]["source"] == "reused"
    assert new["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    new_model = tmp_path / "reuse" / new["tokenizer"]["path"]
    assert new_model.read_bytes() == model.read_bytes()
    assert (new_model.with_suffix(".vocab")).read_bytes() == model.with_suffix(".vocab").read_bytes()
    docs = split_docs(split_stream(tmp_path / "reuse", new, "val")) + split_docs(
        split_stream(tmp_path / "reuse", new, "train")
    )
    assert docs == [sp.encode(t) for t in nonempty]

    with pytest.raises(ValueError, match=rf"vocab size {VOCAB}.*512|512.*{VOCAB}"):
        prep.prepare([jsonl], tmp_path / "bad", tokenizer=copy, vocab_size=512, quiet=True)
    assert not (tmp_path / "bad").exists()


def test_plain_text_inputs(prepared, tmp_path, sp):
    out, manifest = prepared
    model = out / manifest["tokenizer"]["path"]
    texts = ["First file.\nIt has two lines.", "Second  file,  café 12345.", "   ", "Third file with a BOM."]
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"doc{i}.txt"
        p.write_bytes((b"\xef\xbb\xbf" if i == 3 else b"") + t.encode("utf-8"))
        paths.append(p)
    m = prep.prepare(paths, tmp_path / "out", tokenizer=model, val_docs=1, quiet=True)
    docs = split_docs(split_stream(tmp_path / "out", m, "val")) + split_docs(
        split_stream(tmp_path / "out", m, "train")
    )
    assert docs == [sp.encode(t) for t in (texts[0], texts[1], texts[3])]
    assert sp.decode(docs[2]) == "Third file with a BOM."  # the byte-order mark is not text
    assert [i["empty_documents_skipped"] for i in m["inputs"]] == [0, 0, 1, 0]
    assert all(i["format"] == "text" for i in m["inputs"])

    # --format jsonl overrides the extension.
    lines = tmp_path / "lines.txt"
    lines.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    m = prep.prepare([lines], tmp_path / "as_jsonl", tokenizer=model, val_docs=1, quiet=True, input_format="jsonl")
    assert m["splits"]["train"]["documents"] == 1 and m["inputs"][0]["format"] == "jsonl"


def test_tokenizer_is_trained_on_training_documents_only(prepared, tmp_path, jsonl, nonempty):
    out, manifest = prepared
    expected = prep.train_tokenizer(nonempty[VAL_DOCS:], VOCAB, tmp_path / "expected.model")
    assert (out / manifest["tokenizer"]["path"]).read_bytes() == expected.read_bytes()
    assert manifest["tokenizer"]["training"]["documents"] == len(nonempty) - VAL_DOCS

    m = prep.prepare([jsonl], tmp_path / "k", vocab_size=VOCAB, val_docs=VAL_DOCS, tokenizer_train_docs=150,
                     quiet=True)
    expected = prep.train_tokenizer(nonempty[VAL_DOCS : VAL_DOCS + 150], VOCAB, tmp_path / "first150.model")
    assert (tmp_path / "k" / m["tokenizer"]["path"]).read_bytes() == expected.read_bytes()
    assert m["tokenizer"]["training"]["documents"] == 150


def test_progress_lines(tmp_path, jsonl, monkeypatch, capsys):
    monkeypatch.setattr(prep, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(prep, "ENCODE_BATCH_DOCS", 50)
    prep.prepare([jsonl], tmp_path / "p", vocab_size=VOCAB, val_docs=VAL_DOCS)
    err = capsys.readouterr().err
    assert err.count("tokens/s") >= 5 and "skipped 3 empty or whitespace-only documents" in err
    prep.prepare([jsonl], tmp_path / "q", vocab_size=VOCAB, val_docs=VAL_DOCS, quiet=True)
    assert capsys.readouterr().err == ""


def test_deterministic(tmp_path, jsonl):
    runs = []
    for name in ("a", "b"):
        prep.prepare([jsonl], tmp_path / name, vocab_size=VOCAB, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS, quiet=True)
        runs.append({p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()})
    assert runs[0].keys() == runs[1].keys()
    assert any(str(k).endswith(".bin") for k in runs[0])
    for key in runs[0]:
        assert runs[0][key] == runs[1][key], key


# --- bad input ------------------------------------------------------------------


def _expect_failure(tmp_path: Path, exc_type, match: str, inputs, **kwargs):
    out = tmp_path / "out"
    kwargs.setdefault("vocab_size", VOCAB)
    kwargs.setdefault("val_docs", 2)
    kwargs.setdefault("shard_tokens", 500)
    with pytest.raises(exc_type, match=match):
        prep.prepare(inputs, out, quiet=True, **kwargs)
    assert not bin_files(tmp_path)
    assert not out.exists()  # it did not exist before, so it is removed again


def test_invalid_json_line(tmp_path, corpus):
    path = write_jsonl(tmp_path / "bad.jsonl", corpus[:5], blank_lines=False)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _expect_failure(tmp_path, ValueError, r"bad\.jsonl: line 3: invalid JSON", [path])


def test_invalid_json_late_in_a_large_file(tmp_path, corpus):
    # The error comes after shards of both splits were already written to the
    # staging area: none of them may survive.
    path = write_jsonl(tmp_path / "late.jsonl", corpus, blank_lines=False)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("not json at all\n")
    _expect_failure(tmp_path, ValueError, rf"late\.jsonl: line {len(corpus) + 1}: invalid JSON", [path])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"txt": "hello"}', r"line 2: JSON object has no \"text\" field"),
        ('{"text": 17}', r"line 2: \"text\" must be a string"),
        ('["text"]', r"line 2: expected a JSON object"),
    ],
)
def test_json_without_string_text(tmp_path, line, message):
    path = tmp_path / "fields.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    _expect_failure(tmp_path, ValueError, message, [path])


def test_empty_corpus(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n\t"], blank_lines=False)
    _expect_failure(tmp_path, ValueError, r"empty corpus", [path])
    blank = tmp_path / "nothing.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    _expect_failure(tmp_path, ValueError, r"empty corpus", [blank])


def test_too_few_documents(tmp_path, corpus, prepared):
    path = write_jsonl(tmp_path / "few.jsonl", [corpus[0], corpus[3], corpus[1]], blank_lines=False)
    _expect_failure(tmp_path, ValueError, r"only 2 non-empty documents.*val_docs \+ 1 = 3", [path], val_docs=2)
    # Also when the tokenizer is reused (no training pass to notice it first).
    _expect_failure(tmp_path, ValueError, r"only 2 non-empty", [path], val_docs=2, vocab_size=None,
                    tokenizer=prepared[0] / prepared[1]["tokenizer"]["path"])


def test_missing_input_file(tmp_path, jsonl):
    missing = tmp_path / "does_not_exist.jsonl"
    _expect_failure(tmp_path, FileNotFoundError, r"does_not_exist\.jsonl", [jsonl, missing])
    _expect_failure(tmp_path, FileNotFoundError, r"no_such\.model", [jsonl], vocab_size=None,
                    tokenizer=tmp_path / "no_such.model")


def test_vocab_too_large_for_uint16(tmp_path, jsonl):
    _expect_failure(tmp_path, ValueError, r"65537.*uint16", [jsonl], vocab_size=65537)
    with pytest.raises(ValueError, match=r"70000.*uint16"):
        prep.train_tokenizer(["some text"], 70000, tmp_path / "m.model")
    assert not (tmp_path / "m.model").exists()


def test_largest_vocab_is_the_one_train_gpt_reads(tmp_path):
    # uint16 holds ids 0..65535, so a 65,536-piece vocabulary fits; prepare_data used to refuse it
    # while train_gpt.py accepted it.
    import train_gpt

    prep._check_vocab_size(65536)
    path = prep.write_shard(tmp_path / "s.bin", [0, 65535])
    assert train_gpt.read_shard(str(path)).tolist() == [0, 65535]


def test_vocab_size_does_not_fit_the_corpus(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"too small.*at least \d+ pieces"):
        prep.train_tokenizer(corpus, 200, tmp_path / "small.model")
    with pytest.raises(ValueError, match=r"not enough text to learn 60000 pieces.*at most \d+"):
        prep.train_tokenizer(corpus[:20], 60000, tmp_path / "big.model")
    assert not list(tmp_path.iterdir())


def test_tokenizer_without_space_piece_is_refused(tmp_path):
    rng = random.Random(1)
    docs = ["".join(rng.choice("abcdefghij") for _ in range(300)) for _ in range(50)]
    with pytest.raises(ValueError, match="U\\+2581"):
        prep.train_tokenizer(docs, 300, tmp_path / "nospace.model")
    assert not list(tmp_path.iterdir())


def test_existing_dataset_needs_overwrite(tmp_path, prepared, jsonl):
    out, manifest = prepared
    model = out / manifest["tokenizer"]["path"]
    first = prep.prepare([jsonl], tmp_path / "d", tokenizer=model, val_docs=3, shard_tokens=2000, quiet=True)
    n_first = len(first["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        prep.prepare([jsonl], tmp_path / "d", tokenizer=model, val_docs=3, quiet=True)
    assert len(bin_files(tmp_path / "d")) == n_first + len(first["splits"]["val"]["shards"])
    second = prep.prepare([jsonl], tmp_path / "d", tokenizer=model, val_docs=3, quiet=True, overwrite=True)
    assert len(second["splits"]["train"]["shards"]) == 1 < n_first
    assert len(bin_files(tmp_path / "d")) == 2  # the old shards are gone
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]


# --- shard I/O --------------------------------------------------------------------


def test_write_and_read_shard(tmp_path):
    for tokens in ([], [0, 1, 65535, 7], np.arange(1000, dtype=np.int64), np.array([5, 6], dtype=np.uint16)):
        path = prep.write_shard(tmp_path / "s.bin", tokens)
        assert path.stat().st_size == 1024 + 2 * len(tokens)
        back = prep.read_shard(path)
        assert back.dtype == np.uint16 and back.tolist() == list(np.asarray(tokens, dtype=np.int64))
        assert train_gpt.read_shard(str(path)).tolist() == back.tolist()  # and the consumer reads the same
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:12] == np.array([20240520, 1, 2], dtype="<i4").tobytes() and raw[1024:] == b"\x05\x00\x06\x00"

    for bad, match in (([65536], "65536"), ([3, -1], "-1"), ([1.5], "integers"), ([[1, 2]], "1-D")):
        with pytest.raises(ValueError, match=match):
            prep.write_shard(tmp_path / "bad.bin", bad)
        assert not (tmp_path / "bad.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # no temporary files


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: b[:1000], "shorter than"),
        (lambda b: b + b"\x00", "file has"),
        (lambda b: b[:-2], "file has"),
        (lambda b: np.array([12345], "<i4").tobytes() + b[4:], "magic 12345"),
        (lambda b: b[:4] + np.array([2], "<i4").tobytes() + b[8:], "version 2"),
    ],
)
def test_read_shard_refuses_corrupt_files(tmp_path, corrupt, match):
    path = prep.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"fineweb_train_000000\.bin.*{match}"):
        prep.read_shard(path)


# --- command line and demo --------------------------------------------------------


def test_cli(tmp_path, jsonl, capsys):
    out = tmp_path / "cli"
    assert prep.main([str(jsonl), "--out", str(out), "--vocab-size", str(VOCAB), "--val-docs", "4",
                      "--shard-tokens", "5000"]) == 0
    captured = capsys.readouterr()
    assert f"DATA_DIR={out} VOCAB_SIZE={VOCAB} python train_gpt.py" in captured.out
    assert "training a 400-piece BPE tokenizer" in captured.err  # progress notes on stderr
    assert "skipped 3 empty" in captured.out
    assert json.loads((out / "manifest.json").read_text())["settings"]["shard_tokens"] == 5000

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl: line 2: invalid JSON"):
        prep.main([str(bad), "--out", str(tmp_path / "x"), "--vocab-size", "300", "--quiet"])
    with pytest.raises(SystemExit) as info:
        prep.main([str(jsonl), "--out", str(tmp_path / "y")])  # neither --vocab-size nor --tokenizer
    assert info.value.code == 2
    assert capsys.readouterr().out == ""


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert prep.main(["--demo", "--out", str(out), "--vocab-size", "512", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert f"DATA_DIR={out} VOCAB_SIZE=512 python train_gpt.py" in printed.out
    assert printed.err == ""  # --quiet
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 512
    dataset = out / "datasets" / "fineweb10B_sp512"
    val = np.concatenate([train_gpt.read_shard(str(p)) for p in sorted(dataset.glob("fineweb_val_*.bin"))])
    train = np.concatenate([train_gpt.read_shard(str(p)) for p in sorted(dataset.glob("fineweb_train_*.bin"))])
    assert int((val == 1).sum()) == 50 and val[0] == 1 and train[0] == 1
    assert len(val) > 2049 and len(train) > 100_000  # enough to evaluate and train a small model
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "fineweb_512_bpe.model"))
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert "Abstract Base Classes" in sp.decode(split_docs(val)[0])


def test_demo_documents_are_deterministic_english():
    docs = prep.demo_documents()
    assert docs == prep.demo_documents()
    assert len(docs) > 500 and all(d.strip() for d in docs)
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 500_000 < total < 5_000_000
    assert any("Return" in d for d in docs)


def test_import_has_no_side_effects(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import prepare_data"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert not list(tmp_path.iterdir())
