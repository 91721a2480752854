"""Shared fixtures: a corpus generated here, a SentencePiece model trained on it, shards in the
challenge's layout and the environment of a tiny CPU run. Nothing reads ../shared."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pytest.ini's `pythonpath = .`
# Triton kernels (FUSED_CE/FUSED_MLP) run on CPU only through Triton's interpreter, chosen when a
# kernel is built: set before any test can build one. Runs with the switches off ignore it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import prepare_data  # noqa: E402  (the producer users run: its shard writer and tokenizer settings)
from prepare_data import write_shard  # noqa: E402

TINY_VOCAB = 384
# Validation documents of tiny_data (about 6,700 tokens): every evaluation of every run scores them all.
TINY_VAL_DOCS = 30
WORDS = ("the a an of to in and is was for on with as by at from that this it be are not or have "
         "model token byte window chunk layer weight matrix scale loss train value shard gradient "
         "river mountain city house garden winter summer morning evening music story letter friend "
         "quickly slowly always never often green blue small large ancient modern bright quiet "
         "café naïve résumé 東京 데이터 ünïcödé").split()


def need_triton(module: bool = False) -> None:
    """Skip, with the reason, where Triton is not installed; fail instead under CI (CI=true), which
    installs requirements.txt, so a broken install can never pass CI as skipped kernel tests."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Triton is not installed (pip install -r requirements.txt): kernel tests skipped",
                    allow_module_level=module)


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
    """A tokenizer trained with prepare_data's challenge settings on `docs`, without prepare_data's
    checks of the result, so that tests can also make the tokenizers those checks refuse."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=(buffer := io.BytesIO()), vocab_size=vocab_size,
        **prepare_data.CHALLENGE_TOKENIZER_SETTINGS, **prepare_data.DETERMINISTIC_TRAINER_SETTINGS, minloglevel=2)
    model_path.write_bytes(buffer.getvalue())
    return model_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROCESS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session", autouse=True)
def clean_env():
    """No setting leaks in from the shell into any test, fixture or run: every knob and the torchrun
    layout variables are unset for the whole session (session scope: module-scoped fixtures that
    construct a config run after it). Tests change the environment with monkeypatch on top."""
    import train_gpt

    with pytest.MonkeyPatch.context() as mp:
        for name, _, _ in train_gpt.HPARAMS:
            mp.delenv(name.upper(), raising=False)
        for name in PROCESS_VARS:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """DATA_DIR with a trained tokenizer, one val shard ([BOS]+doc for the first TINY_VAL_DOCS
    documents) and three train shards."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tiny_data")
    tok_dir, ds_dir = root / "tokenizers", root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    tok_dir.mkdir(parents=True)
    ds_dir.mkdir(parents=True)
    docs = make_documents(TINY_VAL_DOCS + 640)
    model_path = train_sentencepiece(docs[TINY_VAL_DOCS:], TINY_VOCAB, tok_dir / f"fineweb_{TINY_VOCAB}_bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    streams = [[1] + sp.encode(d) for d in docs]
    val = [t for s in streams[:TINY_VAL_DOCS] for t in s]
    write_shard(ds_dir / "fineweb_val_000000.bin", val)
    train = [t for s in streams[TINY_VAL_DOCS:] for t in s]
    for i, part in enumerate(np.array_split(np.array(train), 3)):
        write_shard(ds_dir / f"fineweb_train_{i:06d}.bin", part)
    return {"data_dir": str(root), "tokenizer_path": str(model_path), "vocab_size": TINY_VOCAB,
            "docs": docs, "val_tokens": len(val)}


TINY_MODEL = dict(
    VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    MLP_MULT="2", ROPE_DIMS="8", XSA_LAST_N="4", PARALLEL_RESIDUAL_START="3", LOOP_START="1", LOOP_END="2",
    NUM_LOOPS="1", BIGRAM_VOCAB_SIZE="512", BIGRAM_DIM="16", GATE_WIDTH="12", SMEAR_GATE_WIDTH="12",
)


def tiny_hparams(**overrides):
    """The tiny model of TINY_MODEL as the config a run with those variables builds, with keyword
    overrides; the one place tests turn the tiny settings into a Hyperparameters."""
    import train_gpt

    return train_gpt.Hyperparameters.from_env(TINY_MODEL, **overrides)


def preset_code_settings(path: Path) -> dict[str, str]:
    """The settings of a preset file that pick code (switches and choices, as `pack.py --preset`
    specialises them), as environment strings: what tests run a preset's code paths with at
    their own sizes."""
    import dataclasses

    import train_gpt
    from specialise import read_preset

    meta = {f.name.upper(): f.metadata for f in dataclasses.fields(train_gpt.Hyperparameters)}
    return {k: v for k, v in read_preset(path).items() if "switch" in meta[k] or "choices" in meta[k]}


def tiny_run_env(tiny_data: dict, out: Path, **changes: str) -> dict:
    """Environment of a CPU run of a few seconds: train, quantize, all three evaluations; the
    artifact goes to `out`. `changes` are further variables."""
    env = dict(
        TINY_MODEL, DATA_DIR=tiny_data["data_dir"], RUN_ID="tiny", SEED="7",
        ITERATIONS="12", TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="2", TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="64",
        EVAL_BATCH_SEQS="16", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="6", TRAIN_LOG_EVERY="1",
        MUON_MOMENTUM_WARMUP_STEPS="5", GPTQ_CALIBRATION_BATCHES="4", TTT_CHUNK_TOKENS="1024", TTT_EPOCHS="1",
        COMPRESSOR="lzma", QUANTIZED_MODEL_PATH=str(Path(out) / "final_model.int6.ptz"),
        OMP_NUM_THREADS="1",  # tiny tensors: one thread is fastest, and does not spin on a busy machine
    )
    return {**env, **changes}


@pytest.fixture
def tiny_env(tiny_data, tmp_path) -> dict:
    return tiny_run_env(tiny_data, tmp_path)


# A short run: training with two validations, GPTQ, the artifact and its plain evaluation. The
# sliding-window and TTT evaluations are off (the full run of test_train.py covers them). One
# thread, as every tiny run, so an in-process run under the `one_thread` fixture computes the same numbers.
QUICK = dict(ITERATIONS="4", WARMUP_STEPS="1", VAL_LOSS_EVERY="2", SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0")


@pytest.fixture(scope="session")
def quick_run(tiny_data, tmp_path_factory) -> dict:
    """One short run as a user starts it (a subprocess), shared by every test that reads a
    trained run's log, final_model.pt or artifact without changing the run."""
    cwd = tmp_path_factory.mktemp("quick_run")
    env = tiny_run_env(tiny_data, cwd, **QUICK)
    run_script(env, cwd)
    return {"cwd": cwd, "env": env, "log": read_log(cwd, env["RUN_ID"]), "artifact": Path(env["QUANTIZED_MODEL_PATH"])}


def use_run_env(env: dict, monkeypatch, cwd: Path) -> None:
    """Set `env` on top of the clean environment and work in `cwd`, as a run started there would."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)


def run_main(env: dict, monkeypatch, cwd: Path) -> int:
    """train_gpt.main() in this process with `env` in `cwd`: for runs whose numbers or errors are
    under test, not the interpreter start-up (which costs seconds per run). Use with the
    `one_thread` fixture to match a subprocess run's OMP_NUM_THREADS=1."""
    import train_gpt

    use_run_env(env, monkeypatch, cwd)
    return train_gpt.main()


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
