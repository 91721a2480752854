"""Turn raw text into the challenge's tokenized shard layout.

`train_gpt.py` reads pre-tokenized data, laid out exactly like the upstream
challenge data:

    DATA_DIR/datasets/fineweb10B_sp{V}/fineweb_val_000000.bin
    DATA_DIR/datasets/fineweb10B_sp{V}/fineweb_train_000000.bin, ..._000001.bin, ...
    DATA_DIR/tokenizers/fineweb_{V}_bpe.model   (+ the matching .vocab listing)

This script builds that layout from your own text, so the training script can
be run on something other than FineWeb (or on a tiny corpus, for a smoke test):

* Inputs are JSONL files (one JSON object a line, with a string field "text")
  or plain-text files (a whole file is one document).
* The first ``--val-docs`` non-empty documents form the validation split, the
  rest the training split. Documents keep their input order.
* Each document becomes ``[BOS=1] + sp.encode(text)`` (no EOS), and the token
  stream of a split is cut into shards of at most ``--shard-tokens`` tokens; a
  document may straddle two consecutive shards, as in the upstream data.
* The tokenizer is either reused (``--tokenizer PATH``) or trained here with
  the challenge's SentencePiece settings on the first training documents
  (never on validation documents).
* ``DATA_DIR/manifest.json`` records inputs, tokenizer and shards with sha256s.

Everything is written into a temporary directory inside DATA_DIR and moved
into place only when the whole run succeeded, so a failed run leaves no
partial shard or tokenizer behind.

Round trip: decoding a document's ids gives back the text as the tokenizer's
own normalizer sees it, i.e. ``sp.normalize(text)`` with U+2581 turned back
into spaces (nmt_nfkc applies NFKC, maps newlines and tabs to spaces, trims
the ends and collapses runs of whitespace).

``--caseops`` (the frontier record's CaseOps data): each document is first
rewritten by ``caseops_encode``, a lossless transform that spells capitals as
four private-use symbols (U+E001..U+E004), and the tokenizer must be a CaseOps
one (trained here with those symbols as user-defined pieces 4..7, or reused
with ``--tokenizer``). Beside each validation shard goes its byte sidecar
``fineweb_val_bytes_NNNNNN.bin`` (same header, one uint16 per token: the
original UTF-8 bytes the token stands for, BOS 0), from which train_gpt.py
counts the bpb denominator with VAL_BYTE_SIDECAR=1. ``caseops_decode`` inverts
the transform: ``caseops_decode(caseops_encode(text)) == text`` for any text.

``--demo`` builds a small real-English corpus from the docstrings of the
Python standard library, so there is something to train on without any
download; it writes them as DATA_DIR/demo_corpus.jsonl and reads that file
like any other input.

Usage:
    python prepare_data.py docs.jsonl more.jsonl --out DATA_DIR --vocab-size 8192
    python prepare_data.py *.txt --out DATA_DIR --tokenizer fineweb_8192_bpe.model
    python prepare_data.py --demo [--out ./data_demo] [--vocab-size 1024]
    python prepare_data.py docs.jsonl --out DATA_DIR --vocab-size 8192 --caseops

The module has no side effects on import; `write_shard`, `read_shard` (the
reader of train_gpt.py), `train_tokenizer`, `caseops_encode`, `caseops_decode`,
`caseops_byte_counts`, `demo_documents`, `write_jsonl`,
`Settings`, `prepare` and `main` are meant to be used from other code and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from train_gpt import (  # noqa: F401
    HEADER_WORDS, SHARD_MAGIC, SHARD_VERSION, SHARD_VOCAB_LIMIT, atomic_write, read_shard, sidecar_path)

# --- Shard format --------------------------------------------------------------
# A shard is 256 little-endian int32 header words ([0] magic, [1] version,
# [2] n_tokens, the rest zero) followed by n_tokens little-endian uint16 ids;
# its size is exactly 1024 + 2 * n_tokens bytes. train_gpt.py reads shards, so
# the format (its constants and the reader) lives there and is imported here:
# the writer cannot disagree with the reader. Importing train_gpt has no side
# effects, but it imports torch, which costs a few seconds at start.

HEADER_BYTES = HEADER_WORDS * 4
BOS_ID = 1
MAX_SHARD_TOKENS = 2**31 - 1  # the token count lives in an int32 header word

DEFAULT_VAL_DOCS = 50
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 10_000
DEMO_OUT_DIR = "./data_demo"
DEMO_VOCAB_SIZE = 1024
DEMO_TRAIN_SHARDS = 8  # one per rank of an 8-GPU torchrun: every rank needs a training shard

# The challenge tokenizer's settings. Changing any of them
# produces a tokenizer whose byte accounting differs from the record's.
CHALLENGE_TOKENIZER_SETTINGS = {
    "model_type": "bpe",
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "character_coverage": 0.999,
}

# Settings that make training reproducible. Every training sentence is used
# (no sampling, so no shuffling). The learned pieces do not depend on the
# thread count, but SentencePiece stores num_threads inside the .model file,
# so it is pinned too: otherwise the file's sha256 would depend on the machine.
DETERMINISTIC_TRAINER_SETTINGS = {
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 4,
}

# SentencePiece silently drops training sentences longer than this many bytes
# (its default). We feed whole documents as sentences, so the limit is raised
# to the longest training document instead.
SENTENCEPIECE_DEFAULT_MAX_SENTENCE_LENGTH = 4192

SPACE_PIECE = "\u2581"  # SentencePiece's visible space, "▁"

JSONL_SUFFIXES = {".jsonl", ".ndjson"}

# Encoding is done in batches: SentencePiece then spreads one batch over threads.
ENCODE_BATCH_DOCS = 512
ENCODE_BATCH_CHARS = 8_000_000
ENCODE_THREADS = max(1, min(8, os.cpu_count() or 1))

PROGRESS_INTERVAL_S = 2.0


# --- Shard I/O ---------------------------------------------------------------


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> Path:
    """Write `tokens` as one shard file at `path` and return the path.

    The file is written to a temporary name in the same directory and then
    renamed over `path`, so a reader never sees a half-written shard.
    Ids must be integers in [0, 65535]; anything else is refused (a silent
    uint16 wrap-around would corrupt the data).
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        arr = np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64
    elif arr.dtype == object:
        try:
            arr = arr.astype(np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{path}: tokens must be integers ({exc})") from None
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= SHARD_VOCAB_LIMIT:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{path}: token id {bad} does not fit a uint16 shard (ids must be in [0, {SHARD_VOCAB_LIMIT - 1}])"
            )
    if arr.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {arr.size} tokens exceed the int32 header limit {MAX_SHARD_TOKENS}")

    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    payload = arr.astype("<u2", copy=False)

    # Header and payload are written as two chunks: no 200 MB concatenated copy.
    atomic_write(str(path), header.tobytes(), payload.tobytes())
    return path


# --- Small helpers -----------------------------------------------------------


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_empty(text: str) -> bool:
    # Whitespace-only documents would encode to a lone BOS; they carry nothing.
    return not text.strip()


def _skip_empty(texts: Iterator[str], stats: dict | None, describe) -> Iterator[str]:
    """Yield the non-empty texts; when exhausted, fill `stats` with describe() and the counts.

    describe is called only at the end because a source's sha256 is known only then."""
    read = skipped = 0
    for text in texts:
        read += 1
        if _is_empty(text):
            skipped += 1
        else:
            yield text
    if stats is not None:
        stats.update(describe(), documents_read=read, empty_documents_skipped=skipped)


class _Progress:
    """Prints a progress line to stderr at most every PROGRESS_INTERVAL_S seconds."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.monotonic()
        self.last = self.start

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"prepare_data: {message}", file=sys.stderr, flush=True)

    def update(self, documents: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        self.note(
            f"{documents:,} documents, {tokens:,} tokens, "
            f"{tokens / elapsed:,.0f} tokens/s, {elapsed:.1f}s"
        )


# --- Inputs ------------------------------------------------------------------


class _InputFile:
    """One input file: JSONL (a document per line) or plain text (one document)."""

    def __init__(self, path: str | os.PathLike, input_format: str = "auto"):
        self.path = Path(path)
        if input_format == "auto":
            input_format = "jsonl" if self.path.suffix.lower() in JSONL_SUFFIXES else "text"
        if input_format not in ("jsonl", "text"):
            raise ValueError(f"unknown input format {input_format!r} (use 'auto', 'jsonl' or 'text')")
        self.format = input_format
        self.name = str(path)

    def check(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"input file not found: {self.path}")
        if not self.path.is_file():
            raise ValueError(f"input is not a regular file: {self.path}")

    def documents(self, stats: dict | None = None) -> Iterator[str]:
        """Yield the file's non-empty documents; fill `stats` when the file is exhausted."""
        digest = hashlib.sha256()
        yield from _skip_empty(
            self._texts(digest), stats,
            lambda: dict(path=self.name, format=self.format, sha256=digest.hexdigest()),
        )

    def _texts(self, digest) -> Iterator[str]:
        if self.format == "text":
            data = self.path.read_bytes()
            digest.update(data)
            try:
                # utf-8-sig: editors sometimes prepend a byte-order mark, which is not text.
                yield data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{self.path}: not valid UTF-8 at byte {exc.start}") from None
            return
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                digest.update(raw)
                text = self._parse_line(raw, lineno)
                if text is not None:
                    yield text

    def _parse_line(self, raw: bytes, lineno: int) -> str | None:
        where = f"{self.path}: line {lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not valid UTF-8 at column {exc.start + 1}") from None
        if not line.strip():
            return None  # blank lines (e.g. a trailing newline) are not documents
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"text\" field, got {type(obj).__name__}")
        if "text" not in obj:
            raise ValueError(f"{where}: JSON object has no \"text\" field (keys: {sorted(obj)[:5]})")
        if not isinstance(obj["text"], str):
            raise ValueError(f"{where}: \"text\" must be a string, got {type(obj['text']).__name__}")
        try:
            obj["text"].encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to text no encoder accepts
            raise ValueError(f"{where}: \"text\" holds a lone surrogate {obj['text'][exc.start]!r} at character "
                             f"{exc.start + 1}, which is not Unicode text") from None
        return obj["text"]


def _iter_documents(sources: list, stats: list[dict] | None = None) -> Iterator[str]:
    for i, source in enumerate(sources):
        yield from source.documents(None if stats is None else stats[i])


def _too_few_documents(found: int, val_docs: int, sources: list) -> ValueError:
    names = ", ".join(s.name for s in sources)
    if found == 0:
        return ValueError(f"empty corpus: no non-empty documents in {names}")
    return ValueError(
        f"only {found} non-empty documents in {names}; need at least val_docs + 1 = {val_docs + 1} "
        f"so that the training split is not empty (lower --val-docs or add text)"
    )


# --- CaseOps ---------------------------------------------------------------
# `--caseops` rewrites every document with a lossless case transform before it is tokenized, so
# that "The", "THE" and "the" share the pieces of "the". Within each maximal run of ASCII letters:
#   all lower case      -> unchanged                      "the"    -> "the"
#   Title case          -> TITLE + lower case             "The"    -> TITLE "the"
#   ALL CAPS (>= 2)     -> ALLCAPS + lower case           "THE"    -> ALLCAPS "the"
#   anything else       -> TITLE if the first letter is a capital, then the letters in lower case
#                          with CAPNEXT before each later capital: "McDonald" -> TITLE "mc" CAPNEXT "donald"
# (a lone capital "A" is Title case: TITLE "a"). The four symbols are private-use characters;
# one that occurs in the input is written ESC + itself, so every text has exactly one transform and
# caseops_decode() gives it back. Nothing outside ASCII letters changes case: "Élan" keeps its É.
# Such data is scored on the original text: the validation byte sidecar (below) gives each token
# the number of ORIGINAL UTF-8 bytes it stands for, and train_gpt.py (VAL_BYTE_SIDECAR=1) divides by
# those instead of the bytes of the pieces, which would count each symbol as 3 bytes.

CASEOPS_TRANSFORM = "lossless_caps_caseops_v1"  # the transform's name in the manifest (and in the record's data)
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
# A CaseOps tokenizer has these as user-defined pieces (never merged with their neighbours), ids 4..7
# in this order, right after pad/bos/eos/unk; byte fallback follows at 8..263.
CASEOPS_SYMBOLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
# A reserved symbol, or a whole ASCII-letter run with a capital in it (runs without one are left
# alone). The lookbehind makes every match start where a run starts, and keeps the search linear:
# without it, each position of a long lower-case run would rescan the rest of the run.
_CASEOPS_TOKEN = re.compile("[\ue001-\ue004]|(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
# In transformed UTF-8: an escape (with the literal it escapes) or a case marker. U+E001..U+E004
# encode as EE 80 81..84.
_CASEOPS_CONTROL_BYTES = re.compile(rb"\xee\x80\x84(?:\xee\x80[\x81-\x84])?|\xee\x80[\x81-\x83]")
SIDECAR_LIMIT = (1 << 16) - 1  # a sidecar entry is a uint16


def _caseops_run(match: re.Match) -> str:
    run = match.group()
    if run in CASEOPS_SYMBOLS:
        return ESC + run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + lower
    head = TITLE if run[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def caseops_encode(text: str) -> str:
    """The CaseOps transform of `text` (rules above); caseops_decode() inverts it exactly."""
    return _CASEOPS_TOKEN.sub(_caseops_run, text)


def _is_ascii_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def caseops_decode(text: str) -> str:
    """The text whose CaseOps transform is `text`. ValueError names the position of a symbol that no
    transform puts there: a marker not followed by a letter, TITLE/ALLCAPS inside a word, CAPNEXT at
    a word's start, ESC before anything but a symbol, or a dangling one at the end. Capital ASCII
    letters pass through (the normalizer can make them, e.g. NFKC of "Ａ" is "A"). A tokenized
    document decodes, sp.decode(ids), to the transform as the normalizer leaves it, and that decodes
    here to the normalized text, except where NFKC composed a marked letter with a combining mark
    after it ("A" + U+0301 is TITLE "a" U+0301, normalized TITLE "á"): refused, as a marker before a
    non-ASCII letter. The sidecar is not affected: it counts the original text."""
    out = []
    in_word = word_caps = escaped = False
    pending = ""  # a marker waiting for its letter
    for i, ch in enumerate(text):
        where = f"CaseOps text: character {i + 1} ({ch!r})"
        if escaped:
            if ch not in CASEOPS_SYMBOLS:
                raise ValueError(f"{where}: ESC (U+E004) escapes only U+E001..U+E004")
            out.append(ch)
            escaped = in_word = False
        elif ch in CASEOPS_SYMBOLS:
            if pending:
                raise ValueError(f"{where} follows a marker that needs a letter")
            if ch in (TITLE, ALLCAPS) and in_word:
                raise ValueError(f"{where}: TITLE/ALLCAPS inside a word")
            if ch == CAPNEXT and not in_word:
                raise ValueError(f"{where}: CAPNEXT at the start of a word")
            escaped = ch == ESC
            pending = "" if escaped else ch
        elif _is_ascii_letter(ch):
            if not in_word:
                word_caps, in_word = pending == ALLCAPS, True
            out.append(ch.upper() if pending or word_caps else ch)
            pending = ""
        elif pending:
            raise ValueError(f"{where}: a case marker must be followed by an ASCII letter")
        else:
            out.append(ch)
            in_word = False
    if escaped or pending:
        raise ValueError(f"CaseOps text ends with a dangling {'ESC' if escaped else 'case marker'}")
    return "".join(out)


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as int, strings as bytes."""
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = data[i: i + length], i + length
        elif wire in (1, 5):  # fixed 64/32-bit (the message's float score): not needed
            value, i = b"", i + (8 if wire == 1 else 4)
        else:
            raise RuntimeError(f"unexpected protobuf wire type {wire} in SentencePiece's output")
        yield key >> 3, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _pieces_and_spans(serialized: bytes) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Ids and input byte ranges [begin, end) of the pieces of one SentencePieceText message
    (pieces = field 2; in a piece, id = 2, begin = 4, end = 5). Parsed here: SentencePiece's own
    'proto' output needs the protobuf package, and its 'immutable_proto' is gone from 0.2.x."""
    ids, begins, ends = [], [], []
    for number, piece in _proto_fields(serialized):
        if number == 2:
            fields = dict(_proto_fields(piece))
            ids.append(fields.get(2, 0))
            begins.append(fields.get(4, 0))
            ends.append(fields.get(5, 0))
    return ids, np.asarray(begins, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def caseops_byte_counts(transformed: str, begins: np.ndarray, ends: np.ndarray, where: str) -> np.ndarray:
    """Original UTF-8 bytes each token of a document stands for: its validation sidecar entries.

    `transformed` is caseops_encode(document); token i covers its UTF-8 bytes [begins[i], ends[i]),
    as SentencePiece aligns pieces with the input it was given. Every byte of that input counts 1,
    except the 3 bytes of each case marker and of each escaping ESC, which count 0 (an escaped
    literal keeps its 3): so a token counts exactly the original bytes it covers, and the tokens of a
    document sum to len(document.encode("utf-8")). Where the normalizer (nmt_nfkc) changes the text,
    what is counted is the ORIGINAL text a piece covers, never the piece's own bytes:
      - NFKC rewrites ("ﬁ" -> "fi", "Ａ" -> "A", "e" + U+0301 -> "é"): the pieces covering the
        character count its original bytes ("ﬁ" 3, though the piece "fi" is 2);
      - whitespace runs collapsed to one "▁" (tabs, newlines, "\n\n", runs of spaces): the piece
        holding that "▁" counts the whole run;
      - characters the normalizer deletes inside the text (zero-width space, other format and
        control characters): counted by the piece that follows them, which SentencePiece aligns
        with them;
      - characters it deletes at the document's start or end (leading and trailing whitespace),
        which no piece covers: counted by the first and by the last token;
      - byte fallback: the last byte piece of a character counts the character, the others 0.
    Markers and ESC count 0; BOS (not a token of this list) counts 0. A token of more than 65,535
    bytes (a very long whitespace run) does not fit the uint16 sidecar: ValueError naming `where`,
    as for a document with bytes but no token (one of characters the normalizer deletes)."""
    raw = transformed.encode("utf-8")
    weight = np.ones(len(raw), dtype=np.int64)
    for m in _CASEOPS_CONTROL_BYTES.finditer(raw):
        weight[m.start(): m.start() + 3] = 0  # the marker, or the escape in front of a literal
    covered = np.concatenate(([0], np.cumsum(weight)))
    total = int(covered[-1])
    if begins.size == 0:
        if total:
            raise ValueError(f"{where} has {total} bytes but no token (the normalizer deletes all its characters), "
                             "so the byte sidecar cannot count them; remove it from the validation documents")
        return np.zeros(0, dtype=np.int64)
    if (begins[1:] != ends[:-1]).any() or (ends < begins).any():
        raise RuntimeError(f"{where}: SentencePiece's pieces do not cover the text contiguously, "
                           "so the byte sidecar cannot be computed")
    counts = covered[ends] - covered[begins]
    counts[0] += covered[begins[0]]  # deleted at the start
    counts[-1] += total - covered[ends[-1]]  # deleted at the end
    if counts.max() > SIDECAR_LIMIT:
        raise ValueError(f"{where}: a token stands for {int(counts.max()):,} original bytes (a long run of "
                         f"whitespace?), more than the uint16 byte sidecar holds ({SIDECAR_LIMIT:,})")
    return counts


# --- Tokenizer ---------------------------------------------------------------


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab size must be an integer, got {vocab_size!r}")
    if vocab_size > SHARD_VOCAB_LIMIT:
        raise ValueError(
            f"vocab size {vocab_size} is too large: shards store ids as uint16, so it must be <= {SHARD_VOCAB_LIMIT}"
        )
    if vocab_size <= 0:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")


def _check_tokenizer(sp: spm.SentencePieceProcessor, source: str, caseops: bool = False) -> None:
    """Refuse tokenizers the shards or the training script cannot use, and a CaseOps tokenizer
    used without the transform or a plain one with it."""
    vocab = sp.vocab_size()
    if vocab > SHARD_VOCAB_LIMIT:
        raise ValueError(
            f"{source}: vocab size {vocab} is too large: shards store ids as uint16, so it must be <= {SHARD_VOCAB_LIMIT}"
        )
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"{source}: BOS id is {sp.bos_id()}, but documents must start with id {BOS_ID}")
    # The bits-per-byte accounting needs "▁" as a piece of its own;
    # train_gpt.py refuses a tokenizer without it, so refuse it here already.
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise ValueError(
            f"{source}: the tokenizer has no '{SPACE_PIECE}' (U+2581) piece of its own; "
            "train_gpt.py cannot count bytes with it (the training text probably has almost no spaces)"
        )
    has_symbols = all(len(sp.encode(c)) == 1 and sp.id_to_piece(sp.encode(c)[0]) == c for c in CASEOPS_SYMBOLS)
    if caseops and not has_symbols:
        raise ValueError(f"{source} is not a CaseOps tokenizer: --caseops needs U+E001..U+E004 as pieces of their "
                         "own (train one with --caseops --vocab-size V, or pass the record's CaseOps model)")
    if has_symbols and not caseops:
        raise ValueError(f"{source} is a CaseOps tokenizer (U+E001..U+E004 are pieces of its own): pass --caseops, "
                         "so that the text is transformed and the validation byte sidecar written")


def _load_tokenizer(model_bytes: bytes, source: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, TypeError) as exc:
        raise ValueError(f"{source}: not a SentencePiece model ({exc})") from None
    return sp


def _vocab_listing(sp: spm.SentencePieceProcessor) -> bytes:
    # The same "piece<TAB>score" lines SentencePiece writes next to a model it
    # trains with model_prefix (which we avoid: that embeds a path in the model).
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())]
    return "".join(lines).encode("utf-8")


def _train_settings(vocab_size: int, documents: list[str], caseops: bool = False) -> dict:
    longest = max((len(d.encode("utf-8")) for d in documents), default=0)
    return {
        **CHALLENGE_TOKENIZER_SETTINGS,
        # The case symbols as user-defined pieces: ids 4..7, each always a token of its own.
        **({"user_defined_symbols": list(CASEOPS_SYMBOLS)} if caseops else {}),
        "vocab_size": int(vocab_size),
        **DETERMINISTIC_TRAINER_SETTINGS,
        "max_sentence_length": max(SENTENCEPIECE_DEFAULT_MAX_SENTENCE_LENGTH, longest),
    }


def _train_model_bytes(documents: list[str], vocab_size: int, caseops: bool = False) -> tuple[bytes, dict]:
    """Train a BPE tokenizer in memory; return the serialized model and the settings used. With
    `caseops`, `documents` must already be transformed (caseops_encode)."""
    _check_vocab_size(vocab_size)
    if not documents:
        raise ValueError("cannot train a tokenizer on no documents")
    settings = _train_settings(vocab_size, documents, caseops)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=buffer,
            minloglevel=2,  # SentencePiece's own log is long; errors still surface as exceptions
            **settings,
        )
    except RuntimeError as exc:
        raise _explain_training_error(exc, vocab_size, len(documents)) from None
    return buffer.getvalue(), settings


def _explain_training_error(exc: RuntimeError, vocab_size: int, n_docs: int) -> ValueError:
    message = str(exc)
    if "Vocabulary size is smaller than required_chars" in message:
        # "... required_chars. 200 vs 300." - 300 = 4 special + 256 byte + character pieces.
        needed = message.rsplit(" vs ", 1)[-1].split(".")[0].strip()
        return ValueError(
            f"vocab size {vocab_size} is too small for this text: the tokenizer needs at least {needed} pieces "
            "(4 special, 256 byte-fallback and one per character covering 99.9% of the text)"
        )
    if "Vocabulary size too high" in message:
        # "... Please set it to a value <= 436." - BPE ran out of pairs to merge.
        limit = message.rsplit("<=", 1)[-1].strip().rstrip(".")
        return ValueError(
            f"not enough text to learn {vocab_size} pieces: {n_docs} training documents allow at most "
            f"{limit}; use more text (--tokenizer-train-docs) or a vocab size <= {limit}"
        )
    return ValueError(f"SentencePiece training failed: {message}")


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_path: str | os.PathLike,
                    *, caseops: bool = False) -> Path:
    """Train a SentencePiece BPE tokenizer with the challenge's settings.

    Writes `model_path` and the matching `.vocab` listing next to it, and
    returns `model_path`. Training is deterministic: the same documents and
    vocab size give a byte-identical model. Every document is one training
    sentence; empty ones are ignored. With `caseops`, a CaseOps tokenizer:
    trained on caseops_encode() of the documents, the four symbols at ids 4..7.
    """
    docs = [caseops_encode(d) if caseops else d for d in documents if not _is_empty(d)]
    model_bytes, _ = _train_model_bytes(docs, vocab_size, caseops)
    model_path = Path(model_path)
    sp = _load_tokenizer(model_bytes, str(model_path))
    _check_tokenizer(sp, f"trained tokenizer {model_path}", caseops)
    atomic_write(model_path, model_bytes)
    atomic_write(model_path.with_suffix(".vocab"), _vocab_listing(sp))
    return model_path


# --- Demo corpus -------------------------------------------------------------

_DEMO_TIMEOUT_S = 120


def demo_documents() -> list[str]:
    """Docstrings of the Python standard library, as a list of documents.

    One document per module docstring, per public class (its docstring plus
    those of its methods) and per public function, in sorted module order.
    demo_corpus.py imports the modules in a separate, fresh Python process, so
    that whatever they do on import (printing, registering handlers, ...) cannot
    affect the caller, and nothing the caller imported changes what is
    collected (torch, which this module imports, replaces inspect.getfile). The result is
    deterministic for a given Python installation.
    """
    with tempfile.TemporaryDirectory(prefix="prepare_data-demo-") as tmp:
        out = Path(tmp) / "docs.json"
        cmd = [sys.executable, "-W", "ignore", str(Path(__file__).resolve().parent / "demo_corpus.py"), str(out)]
        try:
            proc = subprocess.run(
                cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, timeout=_DEMO_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"collecting standard-library docstrings took over {_DEMO_TIMEOUT_S}s") from None
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"collecting standard-library docstrings failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))


# --- Preparing a data directory ----------------------------------------------


class _ShardWriter:
    """Accumulates one split's token stream and writes full shards as it goes; with `sidecar`, also
    the per-token byte counts, cut at the same places into fineweb_val_bytes_NNNNNN.bin beside them."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, rel_dir: str, sidecar: bool = False):
        self.directory = directory
        self.split = split
        self.shard_tokens = shard_tokens
        self.rel_dir = rel_dir
        self.sidecar = sidecar
        self.pending: list[np.ndarray] = []
        self.pending_counts: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.documents_without_tokens = 0
        self.tokens = 0
        self.original_bytes = 0

    def add_documents(self, encoded: list[list[int]], counts: list[np.ndarray] | None = None) -> None:
        """Append documents ([BOS] + ids each); `counts`: the sidecar entries of each one's ids."""
        flat: list[int] = []
        for ids in encoded:
            flat.append(BOS_ID)
            flat.extend(ids)
            if not ids:
                # e.g. only zero-width characters: the normalizer removes them all
                self.documents_without_tokens += 1
        self.documents += len(encoded)
        self.tokens += len(flat)
        self.pending.append(np.asarray(flat, dtype=np.uint16))
        if counts is not None:
            bos = np.zeros(1, dtype=np.uint16)  # BOS stands for no byte of the text
            self.pending_counts.extend(part for c in counts for part in (bos, c.astype(np.uint16)))
            self.original_bytes += int(sum(int(c.sum()) for c in counts))
        self.pending_tokens += len(flat)
        if self.pending_tokens >= self.shard_tokens:
            # Cut as many full shards as the stream holds; a document may end
            # up split across two shards, as in the upstream data.
            stream = np.concatenate(self.pending)
            side = np.concatenate(self.pending_counts) if self.sidecar else None
            start = 0
            while len(stream) - start >= self.shard_tokens:
                end = start + self.shard_tokens
                self._write(stream[start:end], None if side is None else side[start:end])
                start = end
            rest = stream[start:].copy()  # a copy, so the big stream can be freed
            self.pending = [rest]
            self.pending_counts = [] if side is None else [side[start:].copy()]
            self.pending_tokens = len(rest)

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending), np.concatenate(self.pending_counts) if self.sidecar else None)
        self.pending, self.pending_counts, self.pending_tokens = [], [], 0

    def _write(self, tokens: np.ndarray, counts: np.ndarray | None) -> None:
        name = f"fineweb_{self.split}_{len(self.shards):06d}.bin"
        path = write_shard(self.directory / name, tokens)
        shard = {"file": f"{self.rel_dir}/{name}", "tokens": int(len(tokens)), "sha256": _sha256_file(path)}
        if counts is not None:
            if len(counts) != len(tokens):
                raise RuntimeError(f"{name}: {len(counts)} byte counts for {len(tokens)} tokens")
            side = write_shard(sidecar_path(path), counts)  # train_gpt.py's name for it: one home
            shard["byte_sidecar"] = {"file": f"{self.rel_dir}/{side.name}", "bytes": int(counts.sum(dtype=np.int64)),
                                     "sha256": _sha256_file(side)}
        self.shards.append(shard)

    def summary(self) -> dict:
        out = {
            "documents": self.documents,
            "tokens": self.tokens,
            "documents_without_tokens": self.documents_without_tokens,
            "shards": self.shards,
        }
        if self.sidecar:
            out["original_bytes"] = self.original_bytes  # the sidecar's sum: the documents' UTF-8 bytes
        return out


def _check_positive(name: str, value: int, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")


@dataclass
class Settings:
    """One run's settings, checked once, when constructed: bad input stops here, before any work.

    `inputs`: JSONL files (".jsonl"/".ndjson", a "text" field a line) or plain-text files (one
    document each); `input_format` ("auto", "jsonl", "text") overrides the choice by extension.
    Give `vocab_size` to train a tokenizer on the first `tokenizer_train_docs` training
    documents, or `tokenizer` to reuse a SentencePiece model (then `vocab_size`, if given, must
    match it). An existing dataset directory is replaced only with `overwrite`. `caseops`: every
    document is CaseOps-transformed before it is tokenized (the tokenizer must be a CaseOps one,
    or is trained as one), and the validation split gets its byte sidecar."""

    inputs: Sequence[str | os.PathLike]
    out_dir: str | os.PathLike
    vocab_size: int | None = None
    tokenizer: str | os.PathLike | None = None
    val_docs: int = DEFAULT_VAL_DOCS
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    tokenizer_train_docs: int = DEFAULT_TOKENIZER_TRAIN_DOCS
    quiet: bool = False
    input_format: str = "auto"
    overwrite: bool = False
    caseops: bool = False
    sources: list[_InputFile] = field(init=False)
    tokenizer_bytes: bytes | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [self.inputs]
        self.sources = [_InputFile(p, self.input_format) for p in self.inputs]
        self.out_dir = Path(self.out_dir)
        if not self.sources:
            raise ValueError("no input files given")
        if self.vocab_size is None and self.tokenizer is None:
            raise ValueError("give a vocab size to train a tokenizer, or an existing tokenizer to reuse")
        if self.vocab_size is not None:
            _check_vocab_size(self.vocab_size)
        _check_positive("val_docs", self.val_docs)
        _check_positive("shard_tokens", self.shard_tokens, MAX_SHARD_TOKENS)
        _check_positive("tokenizer_train_docs", self.tokenizer_train_docs)
        for source in self.sources:
            source.check()
        if self.tokenizer is not None:
            self.tokenizer = Path(self.tokenizer)
            if not self.tokenizer.is_file():
                raise FileNotFoundError(f"tokenizer model not found: {self.tokenizer}")
            self.tokenizer_bytes = self.tokenizer.read_bytes()


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    val_docs: int = DEFAULT_VAL_DOCS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_train_docs: int = DEFAULT_TOKENIZER_TRAIN_DOCS,
    quiet: bool = False,
    *,
    input_format: str = "auto",
    overwrite: bool = False,
    caseops: bool = False,
) -> dict:
    """Tokenize `inputs` into the challenge layout under `out_dir`; return the manifest.
    The arguments are those of `Settings`."""
    return prepare_settings(Settings(
        inputs, out_dir, vocab_size=vocab_size, tokenizer=tokenizer, val_docs=val_docs, shard_tokens=shard_tokens,
        tokenizer_train_docs=tokenizer_train_docs, quiet=quiet, input_format=input_format, overwrite=overwrite,
        caseops=caseops))


def prepare_settings(s: Settings) -> dict:
    out_dir = s.out_dir
    created_out_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The staging directory lives inside out_dir so the final moves are renames
    # on one filesystem; it is removed whatever happens.
    _remove_stale_staging(out_dir, s.quiet)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        manifest = _build(s, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out_dir:
            try:
                out_dir.rmdir()  # only if it is still empty
            except OSError:
                pass
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


STAGING_PREFIX = ".prepare_data-"


def _remove_stale_staging(out_dir: Path, quiet: bool) -> None:
    """A run killed by SIGKILL (or before this cleanup existed) leaves its hidden staging folder
    behind: remove those whose process is gone; name, and keep, any whose owner is unknown."""
    for folder in sorted(out_dir.glob(f"{STAGING_PREFIX}*")):
        pid = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            print(f"prepare_data: {folder} is a staging folder left by an earlier run; delete it if none is running",
                  file=sys.stderr)
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a live process of another user
        shutil.rmtree(folder, ignore_errors=True)
        if not quiet:
            print(f"prepare_data: removed {folder}, left by a run that was killed", file=sys.stderr)


def _destinations(out_dir: Path, vocab: int) -> dict[str, Path]:
    return {
        "dataset": out_dir / "datasets" / f"fineweb10B_sp{vocab}",
        "model": out_dir / "tokenizers" / f"fineweb_{vocab}_bpe.model",
        "vocab": out_dir / "tokenizers" / f"fineweb_{vocab}_bpe.vocab",
        "manifest": out_dir / "manifest.json",
    }


def _check_no_conflict(dest: dict[str, Path], model_bytes: bytes | None, overwrite: bool) -> None:
    """Refuse to replace existing data unless asked to (model_bytes None: dataset only)."""
    if overwrite:
        return
    if dest["manifest"].exists():
        try:
            other = json.loads(dest["manifest"].read_text(encoding="utf-8"))["tokenizer"]["vocab_size"]
        except (ValueError, KeyError, TypeError, OSError):
            other = None
        if other != int(dest["dataset"].name.rsplit("sp", 1)[1]):
            raise ValueError(
                f"{dest['manifest']} already describes " + (f"the vocab-{other} dataset" if other else "another dataset")
                + " (one manifest per data folder); use another --out, or pass --overwrite to replace the manifest")
    if dest["dataset"].exists() and any(dest["dataset"].iterdir()):
        raise ValueError(f"{dest['dataset']} already exists; pass --overwrite (overwrite=True) to replace it")
    if model_bytes is not None and dest["model"].exists() and dest["model"].read_bytes() != model_bytes:
        raise ValueError(
            f"{dest['model']} already exists with a different tokenizer; pass --overwrite (overwrite=True) to replace it"
        )


class _Tokenizer:
    """The tokenizer a run uses: the processor, its files' bytes and the manifest's account of it."""

    def __init__(self, sp: spm.SentencePieceProcessor, model_bytes: bytes, vocab_bytes: bytes, info: dict):
        self.sp, self.model_bytes, self.vocab_bytes, self.info = sp, model_bytes, vocab_bytes, info


def _build(s: Settings, staging: Path) -> dict:
    """Tokenizer, shards and manifest into `staging`, then moved into place under s.out_dir."""
    progress = _Progress(s.quiet)
    if s.vocab_size is not None:
        # Fail before the long work if the output is already taken.
        _check_no_conflict(_destinations(s.out_dir, s.vocab_size), None, s.overwrite)
    tok = _resolve_tokenizer(s, progress)
    vocab = tok.sp.vocab_size()
    dest = _destinations(s.out_dir, vocab)
    _check_no_conflict(dest, tok.model_bytes, s.overwrite)

    rel_dataset = f"datasets/fineweb10B_sp{vocab}"
    stage_dataset = staging / rel_dataset
    stage_dataset.mkdir(parents=True)
    (staging / "tokenizers").mkdir()
    stage_model = staging / "tokenizers" / dest["model"].name
    atomic_write(stage_model, tok.model_bytes)
    atomic_write(stage_model.with_suffix(".vocab"), tok.vocab_bytes)
    writers, input_stats = _encode(s, tok.sp, stage_dataset, rel_dataset, progress)
    manifest = _manifest(s, tok, dest, writers, input_stats)
    stage_manifest = staging / "manifest.json"
    atomic_write(stage_manifest, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    _check_no_conflict(dest, tok.model_bytes, s.overwrite)  # again: something may have appeared meanwhile
    _install(staging, stage_dataset, stage_model, stage_manifest, dest)
    return manifest


def _resolve_tokenizer(s: Settings, progress: _Progress) -> _Tokenizer:
    """Reuse s.tokenizer, or train one on the first training documents (never on validation ones)."""
    if s.tokenizer_bytes is not None:
        sp = _load_tokenizer(s.tokenizer_bytes, str(s.tokenizer))
        _check_tokenizer(sp, str(s.tokenizer), s.caseops)
        if s.vocab_size is not None and s.vocab_size != sp.vocab_size():
            raise ValueError(
                f"{s.tokenizer} has vocab size {sp.vocab_size()}, but vocab size {s.vocab_size} was asked for"
            )
        sibling_vocab = s.tokenizer.with_suffix(".vocab")
        vocab_bytes = sibling_vocab.read_bytes() if sibling_vocab.is_file() else _vocab_listing(sp)
        return _Tokenizer(sp, s.tokenizer_bytes, vocab_bytes, {"source": "reused", "reused_from": str(s.tokenizer)})
    train_docs: list[str] = []
    seen = 0
    # Only the first documents are needed: stop reading early, and close
    # the generator so the input file is closed right away.
    with contextlib.closing(_iter_documents(s.sources)) as documents:
        for text in documents:
            seen += 1
            if seen <= s.val_docs:
                continue  # validation documents never influence the tokenizer
            train_docs.append(text)
            if len(train_docs) >= s.tokenizer_train_docs:
                break
    if not train_docs:
        raise _too_few_documents(seen, s.val_docs, s.sources)
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)
    progress.note(
        f"training a {s.vocab_size}-piece {'CaseOps ' if s.caseops else ''}BPE tokenizer on {len(train_docs):,} "
        f"documents ({n_bytes:,} bytes)"
    )
    t0 = time.monotonic()
    if s.caseops:
        train_docs = [caseops_encode(d) for d in train_docs]
    model_bytes, settings = _train_model_bytes(train_docs, s.vocab_size, s.caseops)
    sp = _load_tokenizer(model_bytes, "trained tokenizer")
    _check_tokenizer(sp, "trained tokenizer", s.caseops)
    progress.note(f"tokenizer trained in {time.monotonic() - t0:.1f}s")
    info = {
        "source": "trained",
        "training": {
            **settings,
            "documents": len(train_docs),
            "bytes": n_bytes,
            "sentencepiece_version": spm.__version__,
        },
    }
    return _Tokenizer(sp, model_bytes, _vocab_listing(sp), info)


def _encode(s: Settings, sp: spm.SentencePieceProcessor, stage_dataset: Path, rel_dataset: str,
            progress: _Progress) -> tuple[dict[str, _ShardWriter], list[dict]]:
    """Encode every document, in order, into shards: the first s.val_docs go to val."""
    writers = {
        split: _ShardWriter(stage_dataset, split, s.shard_tokens, rel_dataset, sidecar=s.caseops and split == "val")
        for split in ("val", "train")
    }
    input_stats = [{} for _ in s.sources]
    batch: list[str] = []
    batch_chars = 0
    batch_split = "val"
    seen = 0

    def flush() -> None:
        nonlocal batch, batch_chars
        if batch:
            texts = [caseops_encode(t) for t in batch] if s.caseops else batch
            options = dict(add_bos=False, add_eos=False, enable_sampling=False, num_threads=ENCODE_THREADS)
            if writers[batch_split].sidecar:
                first = seen - len(batch) + 1
                encoded, counts = _encode_with_sidecar(sp, batch, texts, first, options)
                writers[batch_split].add_documents(encoded, counts)
            else:
                writers[batch_split].add_documents(sp.encode(texts, out_type=int, **options))
            batch, batch_chars = [], 0
            progress.update(seen, writers["val"].tokens + writers["train"].tokens)

    for text in _iter_documents(s.sources, input_stats):
        split = "val" if seen < s.val_docs else "train"
        if split != batch_split:
            flush()  # a batch never mixes splits
            batch_split = split
        seen += 1
        batch.append(text)
        batch_chars += len(text)
        if len(batch) >= ENCODE_BATCH_DOCS or batch_chars >= ENCODE_BATCH_CHARS:
            flush()
    flush()
    if seen <= s.val_docs:
        raise _too_few_documents(seen, s.val_docs, s.sources)
    for writer in writers.values():
        writer.close()
    progress.update(seen, writers["val"].tokens + writers["train"].tokens, force=True)
    skipped = sum(st["empty_documents_skipped"] for st in input_stats)
    if skipped:
        progress.note(f"skipped {skipped:,} empty or whitespace-only documents")
    return writers, input_stats


def _encode_with_sidecar(sp: spm.SentencePieceProcessor, originals: list[str], texts: list[str], first: int,
                         options: dict) -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids of the transformed `texts` and each one's sidecar entries (caseops_byte_counts), from
    one encoding that gives both, so that they cannot disagree; `first`: the 1-based number of the
    batch's first document, for messages. Each document's entries are checked to sum to its
    original UTF-8 length."""
    encoded, counts = [], []
    for k, raw in enumerate(sp.encode(texts, out_type="serialized_proto", **options)):
        ids, begins, ends = _pieces_and_spans(raw)
        where = f"validation document {first + k:,} (non-empty documents counted from 1)"
        c = caseops_byte_counts(texts[k], begins, ends, where)
        if int(c.sum()) != len(originals[k].encode("utf-8")):
            raise RuntimeError(f"{where}: the byte sidecar sums to {int(c.sum())}, "
                               f"not to its {len(originals[k].encode('utf-8'))} UTF-8 bytes")
        encoded.append(ids)
        counts.append(c)
    return encoded, counts


def _manifest(s: Settings, tok: _Tokenizer, dest: dict[str, Path], writers: dict[str, _ShardWriter],
              input_stats: list[dict]) -> dict:
    return {
        "format": {
            "shard_header": f"{HEADER_WORDS} little-endian int32: magic {SHARD_MAGIC}, version {SHARD_VERSION}, n_tokens",
            "token_dtype": "little-endian uint16",
            "document": f"[BOS={BOS_ID}] + sentencepiece ids" + (" of caseops_encode(text)" if s.caseops else "")
            + ", no EOS",
            **({"text_transform": CASEOPS_TRANSFORM,
                "byte_sidecar": "fineweb_val_bytes_NNNNNN.bin beside each val shard: the same header and length, "
                                "a little-endian uint16 per token: the original UTF-8 bytes it stands for (BOS 0)"}
               if s.caseops else {}),
        },
        "inputs": input_stats,
        "tokenizer": {
            "path": f"tokenizers/{dest['model'].name}",
            "vocab_listing": f"tokenizers/{dest['vocab'].name}",
            "sha256": _sha256_bytes(tok.model_bytes),
            "vocab_size": tok.sp.vocab_size(),
            **tok.info,
        },
        "settings": {
            "val_docs": s.val_docs,
            "shard_tokens": s.shard_tokens,
            "tokenizer_train_docs": s.tokenizer_train_docs,
            "caseops": s.caseops,
        },
        "splits": {split: writer.summary() for split, writer in writers.items()},
    }


def _install(staging: Path, stage_dataset: Path, stage_model: Path, stage_manifest: Path,
             dest: dict[str, Path]) -> None:
    """Move the staged files into place: each a rename on one filesystem."""
    dest["dataset"].parent.mkdir(parents=True, exist_ok=True)
    dest["model"].parent.mkdir(parents=True, exist_ok=True)
    if dest["dataset"].exists():
        # Renaming a directory cannot replace a non-empty one: move the old one
        # into the staging area, which is deleted afterwards.
        os.rename(dest["dataset"], staging / "replaced-dataset")
    os.rename(stage_dataset, dest["dataset"])
    os.replace(stage_model, dest["model"])
    os.replace(stage_model.with_suffix(".vocab"), dest["vocab"])
    os.replace(stage_manifest, dest["manifest"])


# --- Command line ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Tokenize text into the challenge's shard layout (DATA_DIR/datasets, DATA_DIR/tokenizers).",
        epilog="Example: python prepare_data.py docs.jsonl --out data --vocab-size 8192; "
        "then: DATA_DIR=data VOCAB_SIZE=8192 python train_gpt.py",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="JSONL files (a \"text\" field a line) or plain-text files (one document each)")
    parser.add_argument("--demo", action="store_true",
                        help="use the Python standard library's docstrings as the corpus")
    parser.add_argument("--out", metavar="DATA_DIR",
                        help=f"output data directory (required, except with --demo: default {DEMO_OUT_DIR})")
    parser.add_argument("--vocab-size", type=int, metavar="V",
                        help=f"train a tokenizer with V pieces (--demo default {DEMO_VOCAB_SIZE}); "
                        "with --tokenizer it must match the model")
    parser.add_argument("--tokenizer", metavar="PATH", help="reuse this SentencePiece .model instead of training")
    parser.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, metavar="N",
                        help="the first N documents form the validation split (default %(default)s)")
    parser.add_argument("--shard-tokens", type=int, metavar="N",
                        help=f"at most N tokens per shard (default {DEFAULT_SHARD_TOKENS}; --demo: small enough "
                        f"for at least {DEMO_TRAIN_SHARDS} training shards)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS, metavar="K",
                        help="train the tokenizer on the first K training documents (default %(default)s)")
    parser.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                        help="input format; auto: .jsonl/.ndjson are JSONL, anything else plain text")
    parser.add_argument("--caseops", action="store_true",
                        help="CaseOps: transform each document losslessly (capitals become case markers) before "
                        "tokenizing, with a CaseOps tokenizer, and write the validation byte sidecar "
                        "(train with VAL_BYTE_SIDECAR=1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return parser


def _summary(manifest: dict, out_dir: Path, elapsed: float) -> str:
    tok = manifest["tokenizer"]
    vocab = tok["vocab_size"]
    lines = []
    for split, info in manifest["splits"].items():
        size = sum((out_dir / s["file"]).stat().st_size for s in info["shards"])
        lines.append(
            f"  {split:5s}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
            f"{len(info['shards'])} shard(s), {size:,} bytes"
        )
    first = manifest["splits"]["train"]["shards"][0]["file"]
    lines.insert(0, f"wrote {out_dir / first.rsplit('/', 1)[0]}")
    lines.append(f"tokenizer ({tok['source']}, vocab {vocab}): {out_dir / tok['path']}")
    lines.append(f"manifest: {out_dir / 'manifest.json'}")
    skipped = sum(i["empty_documents_skipped"] for i in manifest["inputs"])
    if skipped:
        lines.append(f"skipped {skipped:,} empty documents")
    caseops = manifest["settings"]["caseops"]
    if caseops:
        val = manifest["splits"]["val"]
        lines.append(f"CaseOps: validation byte sidecar beside the val shards, {val['original_bytes']:,} bytes "
                     f"(the validation documents' UTF-8 bytes) over {val['tokens']:,} tokens")
    lines.append(f"done in {elapsed:.1f}s; train on it with:")
    lines.append(f"  DATA_DIR={shlex.quote(str(out_dir))} VOCAB_SIZE={vocab}{' VAL_BYTE_SIDECAR=1' if caseops else ''} "
                 "python train_gpt.py")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    if args.demo and args.inputs:
        parser.error("--demo builds its own corpus; do not also give INPUT files")
    if not args.demo and not args.inputs:
        parser.error("give INPUT files (or --demo)")
    if not args.demo and not args.out:
        parser.error("--out DATA_DIR is required")
    if not args.demo and args.vocab_size is None and args.tokenizer is None:
        parser.error("give --vocab-size V to train a tokenizer, or --tokenizer PATH to reuse one")

    out_dir = Path(args.out or DEMO_OUT_DIR)
    vocab_size = args.vocab_size
    t0 = time.monotonic()

    def stop(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the staging folder is removed
        raise SystemExit(f"prepare_data.py: stopped by signal {signum} while preparing {out_dir}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return _run(args, out_dir, vocab_size, t0)
    finally:
        signal.signal(signal.SIGTERM, previous)


DEMO_CORPUS = "demo_corpus.jsonl"  # written into the demo's DATA_DIR, so its manifest's sha256 can be checked


def write_jsonl(path: Path, documents: list[str]) -> Path:
    """`documents` as a JSONL file that `prepare` reads back unchanged (one {"text": ...} a line)."""
    lines = (json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
    atomic_write(path, "".join(lines).encode("utf-8"))
    return path


def _run(args, out_dir: Path, vocab_size: int | None, t0: float) -> int:
    try:
        inputs, shard_tokens = args.inputs, args.shard_tokens
        if args.demo:
            if vocab_size is None and args.tokenizer is None:
                vocab_size = DEMO_VOCAB_SIZE
            if not args.quiet:
                print("prepare_data: collecting standard-library docstrings for the demo corpus", file=sys.stderr)
            docs = demo_documents()
            inputs = [write_jsonl(out_dir / DEMO_CORPUS, docs)]
            if shard_tokens is None:
                # A BPE token covers at most ~8 bytes on average, so bytes/8 is a lower bound on the
                # training tokens: shards of an eighth of that give at least 8 of them.
                train_bytes = sum(len(d.encode("utf-8")) for d in docs[args.val_docs:])
                shard_tokens = max(1, train_bytes // 8 // DEMO_TRAIN_SHARDS)
            if not args.quiet:
                n_bytes = sum(len(d.encode("utf-8")) for d in docs)
                print(f"prepare_data: demo corpus: {len(docs):,} documents, {n_bytes:,} bytes, "
                      f"written to {inputs[0]}", file=sys.stderr)
        settings = Settings(
            inputs, out_dir, vocab_size=vocab_size, tokenizer=args.tokenizer, val_docs=args.val_docs,
            shard_tokens=DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens,
            tokenizer_train_docs=args.tokenizer_train_docs, quiet=args.quiet, input_format=args.format,
            overwrite=args.overwrite, caseops=args.caseops)
        manifest = prepare_settings(settings)
    except (ValueError, OSError, RuntimeError) as exc:
        raise SystemExit(f"prepare_data.py: error: {exc}") from None
    print(_summary(manifest, out_dir, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
