"""Shared fixtures: a corpus generated here, a SentencePiece model trained on it, shards in the
challenge's layout and the environment of a tiny CPU run. Nothing reads ../shared."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Triton kernels (FUSED_CE/FUSED_MLP) run on CPU only through Triton's interpreter, chosen when a
# kernel is built: set before any test can build one. Runs with the switches off ignore it.
os.environ.setdefault("TRITON_INTERPRET", "1")

from prepare_data import write_shard  # noqa: E402  (the shard writer users run)

TINY_VOCAB = 384
WORDS = ("the a an of to in and is was for on with as by at from that this it be are not or have "
         "model token byte window chunk layer weight matrix scale loss train value shard gradient "
         "river mountain city house garden winter summer morning evening music story letter friend "
         "quickly slowly always never often green blue small large ancient modern bright quiet "
         "café naïve résumé 東京 데이터 ünïcödé").split()


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """English-like documents with digits, punctuation and some non-ASCII words, so byte-fallback
    and multi-byte pieces both occur."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?;"))
        docs.append(" ".join(sentences))
    return docs


def train_sentencepiece(docs: list[str], vocab_size: int, model_path: Path) -> Path:
    import sentencepiece as spm

    text_path = model_path.with_suffix(".txt")
    text_path.write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_path), model_prefix=str(model_path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
        num_threads=1, minloglevel=2)
    return model_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def clean_env(monkeypatch):
    """No setting leaks in from the shell: every knob and the torchrun layout variables are unset."""
    import train_gpt

    for name, _, _ in train_gpt.HPARAMS:
        monkeypatch.delenv(name.upper(), raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """DATA_DIR with a trained tokenizer, one val shard and three train shards."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tiny_data")
    tok_dir, ds_dir = root / "tokenizers", root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    tok_dir.mkdir(parents=True)
    ds_dir.mkdir(parents=True)
    docs = make_documents(700)
    model_path = train_sentencepiece(docs[60:], TINY_VOCAB, tok_dir / f"fineweb_{TINY_VOCAB}_bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    streams = [[1] + sp.encode(d) for d in docs]
    val = [t for s in streams[:60] for t in s]
    write_shard(ds_dir / "fineweb_val_000000.bin", val)
    train = [t for s in streams[60:] for t in s]
    for i, part in enumerate(np.array_split(np.array(train), 3)):
        write_shard(ds_dir / f"fineweb_train_{i:06d}.bin", part)
    return {"data_dir": str(root), "tokenizer_path": str(model_path), "vocab_size": TINY_VOCAB,
            "docs": docs, "val_tokens": len(val)}


TINY_MODEL = dict(
    VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    MLP_MULT="2", ROPE_DIMS="8", XSA_LAST_N="4", PARALLEL_RESIDUAL_START="3", LOOP_START="1", LOOP_END="2",
    NUM_LOOPS="1", BIGRAM_VOCAB_SIZE="512", BIGRAM_DIM="16", GATE_WIDTH="12", SMEAR_GATE_WIDTH="12",
)


@pytest.fixture
def tiny_env(tiny_data, tmp_path) -> dict:
    """Environment of a CPU run of a few seconds: train, quantize, all three evaluations."""
    return dict(
        TINY_MODEL, DATA_DIR=tiny_data["data_dir"], RUN_ID="tiny", SEED="7",
        ITERATIONS="12", TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="2", TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="32",
        EVAL_BATCH_SEQS="16", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="6", TRAIN_LOG_EVERY="1",
        MUON_MOMENTUM_WARMUP_STEPS="5", GPTQ_CALIBRATION_BATCHES="4", TTT_CHUNK_TOKENS="1024", TTT_EPOCHS="1",
        COMPRESSOR="lzma", QUANTIZED_MODEL_PATH=str(tmp_path / "final_model.int6.ptz"),
        OMP_NUM_THREADS="2",
    )


def run_script(env: dict, cwd: Path, script: Path | None = None, nproc: int = 1, timeout: int = 240,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run train_gpt.py (or a packed copy) as a subprocess with `env` added to the environment."""
    script = script or ROOT / "train_gpt.py"
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(env)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def read_log(cwd: Path, run_id: str) -> str:
    return (Path(cwd) / "logs" / f"{run_id}.txt").read_text(encoding="utf-8")
