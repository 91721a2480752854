"""Reference implementation of the parameter-golf record
"SP8192 + BigramHash d=32 + Path A v3 passthrough quantization".

Data -> model -> Muon/AdamW training -> GPTQ int6/int8 + passthrough quantization ->
compressed artifact -> quantized, sliding-window and score-first TTT evaluation.

Record run (8xH100):  SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU tiny run:         see README.md. Every setting is an environment variable of the same
                      name in upper case, read when Hyperparameters() is constructed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import difflib
import glob
import hashlib
import io
import lzma
import math
import os
import platform
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# CONFIG
#   Every knob is an upper-case environment variable of the same name. Defaults are the
#   record's launch, so `SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py`
#   reproduces it. Tests pass keyword overrides instead of touching the environment.
# -----------------------------------------------------------------------------

SIZE_LIMIT_BYTES = 16_000_000


def switch(default):
    """A setting that turns code on: off when False, 0, '' or None. `pack.py --preset FILE` leaves
    the code of the switches FILE has off out of the packed file, and pins them off (PINNED)."""
    return dataclasses.field(default=default, metadata={"switch": True})


def choice(default: str, *others: str):
    """A setting that chooses between code paths: validate() accepts these values alone, and
    `pack.py --preset FILE` keeps only the code of FILE's value, and pins it (PINNED)."""
    return dataclasses.field(default=default, metadata={"choices": (default, *others)})


# `PINNED`: {setting: value} of a packed file specialised by `pack.py --preset` (PACKED_FOR names
# the preset): it holds no code for other values, so validate() refuses them. Empty here.
PINNED: dict = {}
PACKED_FOR = ""


@dataclasses.dataclass
class Hyperparameters:
    """Settings for one run. Hyperparameters() is the record's defaults; from_env() reads the
    environment (tests pass keywords instead). Field order is the order of the log's hparam lines."""

    # data and run
    data_dir: str = "./data/"  # root of the upstream layout (datasets/, tokenizers/)
    data_path: str = ""  # default: DATA_DIR/datasets/fineweb10B_sp{VOCAB_SIZE}
    tokenizer_path: str = ""  # default: DATA_DIR/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model
    val_byte_sidecar: bool = switch(False)  # 1: bpb bytes from the val shards' byte sidecars (CaseOps data), not the tables
    run_id: str = ""  # default: a fresh uuid4
    seed: int = 1337  # torch.manual_seed at the start of the run (initialisation)
    init_state: str = switch("")  # a saved state dict to start from instead of the initialisation
    eval_only: bool = False  # skip training: evaluate the artifact at QUANTIZED_MODEL_PATH
    quantized_model_path: str = "final_model.int6.ptz"  # where the artifact is written (or read, with EVAL_ONLY=1)
    compile: bool | None = None  # default: on for CUDA, off for CPU
    gptq_hessian_all_ranks: bool = switch(False)  # 1: average every rank's Hessians (the record: rank 0's alone)
    fused_ce: bool = switch(False)  # Triton soft-capped cross-entropy (KERNELS)
    fused_mlp: bool = switch(False)  # Triton LeakyReLU(0.5)^2 MLP activation (KERNELS)
    # model
    vocab_size: int = 8192  # SentencePiece vocabulary (SP8192)
    num_layers: int = 11  # physical transformer blocks
    model_dim: int = 512  # residual stream width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (GQA)
    mlp_mult: float = 4.0  # MLP hidden width / MODEL_DIM
    logit_softcap: float = 30.0  # logits -> softcap * tanh(logits / softcap)
    rope_base: float = 10000.0  # rotary frequency base
    rope_dims: int = 16  # leading dimensions of each head that get rotary embedding
    qk_gain_init: float = 5.0  # initial per-head query gain
    ln_scale: bool = switch(True)  # block i's normalised attention and MLP inputs scaled by 1/sqrt(i + 1)
    xsa_last_n: int = 11  # the last N blocks use XSA attention
    parallel_residual_start: int = 7  # blocks from this index run attention and MLP in parallel
    loop_start: int = 3  # first block of the looped range
    loop_end: int = 5  # last block of the looped range (inclusive)
    num_loops: int = switch(2)  # extra passes over LOOP_START..LOOP_END once looping is on (0: none)
    enable_looping_at: float = 0.35  # training fraction at which looping turns on
    bigram_vocab_size: int = switch(16384)  # BigramHash buckets (the last is position 0's)
    bigram_dim: int = 32  # BigramHash embedding width
    bigram_train_embed: bool = switch(False)  # 1: bigram.embed trains with the token embedding (the record: never updated)
    gate_attn_out: bool = switch(True)  # a learned per-head gate on the attention output
    gate_width: int = 12  # input dimensions the attention gate reads
    smear_gate: bool = switch(True)  # SmearGate: mix each position with the previous one
    smear_gate_width: int = 12  # input dimensions the SmearGate reads
    smear_mask_bos: bool = switch(False)  # 1: SmearGate takes nothing across a document start
    smear_pre_norm: bool = switch(False)  # 1: SmearGate blends the raw embeddings before the norm, its gate a control tensor
    sparse_gate_scale: float = switch(0.0)  # 0: off; else each head's output times sigmoid(SCALE * W a[:GATE_WIDTH])
    parallel_lanes_start: int = switch(0)  # 0: off; else the decoder runs as two lanes from this block on
    tied_embed_init_std: float = 0.005  # std of the tied embedding's normal initialisation
    # training
    iterations: int = 20000  # training steps, unless the wall clock stops it first
    train_batch_tokens: int = 786432  # tokens per optimizer step, over all ranks
    train_seq_len: int = 2048  # training sequence length
    varlen: bool = switch(False)  # 1: one document-packed training stream, attention within documents (DATA, MODEL)
    grad_accum_steps: int = 0  # 0: 8 // WORLD_SIZE, as the record
    warmup_steps: int = 20  # compile-and-warm steps, then weights and optimizers are restored
    warmdown_frac: float = 0.72  # final fraction of training over which the learning rate decays
    min_lr: float = 0.0  # floor of the warmdown's learning-rate multiplier
    max_wallclock_seconds: float = 600.0  # training plus GPTQ calibration limit (0: none, ITERATIONS decides)
    gptq_reserve_seconds: float | None = None  # default: calibration time measured in the run, +25%
    val_loss_every: int = 4000  # steps between validation losses (0: only at the end)
    train_log_every: int = 500  # steps between training-loss lines (the first 10 are always logged)
    matrix_lr: float = 0.022  # Muon learning rate
    scalar_lr: float = 0.02  # AdamW learning rate of the control tensors
    tied_embed_lr: float = 0.03  # AdamW learning rate of the tied embedding
    muon_momentum: float = 0.99  # Muon momentum after its warm-up
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 1500  # steps of the linear momentum warm-up
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_row_normalize: bool = switch(True)  # normalise each row of the update before Newton-Schulz (MuonEq-R)
    muon_bf16_momentum: bool = switch(False)  # 1: Muon's gradient, momentum buffer and Nesterov update in bf16
    muon_wd: float = 0.095  # Muon decoupled weight decay
    embed_wd: float = 0.085  # AdamW weight decay of the tied embedding
    adam_wd: float = 0.02  # AdamW weight decay of the control tensors
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip_norm: float = 0.3  # global gradient-norm clip
    grad_clip_per_rank: bool = switch(False)  # 1: each rank clips its own gradients, then they are averaged (no DDP)
    ema_decay: float = 0.9965  # EMA of the weights; the EMA weights are quantized
    # quantization and artifact
    gptq_calibration_batches: int = 64  # training micro-batches that calibrate the GPTQ Hessians
    matrix_bits: int = 6  # bit width of the GPTQ block matrices
    matrix_clip_sigmas: float = 12.85  # SDClip width of the block matrices, in row standard deviations
    embed_bits: int = 8  # bit width of the GPTQ token embedding
    embed_clip_sigmas: float = 20.0  # SDClip width of the token embedding
    attn_clip_sigmas: float | None = switch(None)  # unset: MATRIX_CLIP_SIGMAS for c_q/c_k/c_v/proj
    mlp_clip_sigmas: float | None = switch(None)  # unset: MATRIX_CLIP_SIGMAS for mlp.fc/proj
    lqer_top_k: int = switch(0)  # 0: off; else low-rank error correction of the k worst GPTQ matrices
    lqer_rank: int = 4  # rank of each LQER correction
    lqer_group: int = 64  # values per fp16 scale of the int4 factor B
    # LQER's factors: packed (INT2/INT4 codes packed into bytes, A's scale searched) or asym (int8 codes
    # of A in -2..1 at max|A|/1.5 and of B in -8..7 at max/7.5 per LQER_GROUP values, the frontier's)
    lqer_form: str = choice("packed", "asym")
    small_fp16: bool = switch(False)  # 1: small tensors fp16 but the attention gates int8 per row (the record: int8)
    muon_ns_coeffs: str = choice("record", "polar")  # Newton-Schulz schedule: record (one quintic) or polar
    # brotli or lzma (one stream, as the record), family, or pergroup (lrzip ZPAQ streams by tensor group)
    compressor: str = choice("brotli", "lzma", "family", "pergroup")
    size_limit_bytes: int = SIZE_LIMIT_BYTES  # the budget this run checks its code + artifact against
    # Longest a rank waits for the others (rank 0's GPTQ and compression is the longest
    # legitimate wait); past it a stopped or dead peer fails the run instead of hanging it.
    dist_timeout_seconds: float = 900.0
    # evaluation
    eval_seq_len: int = 2048  # evaluation window length
    eval_stride: int = 64  # sliding-window step; each window scores its last EVAL_STRIDE targets
    eval_batch_seqs: int = 32  # windows per evaluation batch
    sliding_window_enabled: bool = switch(True)  # run the sliding-window evaluation
    ttt_enabled: bool = switch(True)  # run score-first test-time training
    ttt_lr: float = 0.005  # TTT SGD learning rate (cosine over chunks)
    ttt_epochs: int = 3  # passes over each scored chunk
    ttt_momentum: float = 0.9  # TTT SGD momentum
    ttt_chunk_tokens: int = 32768  # validation tokens per TTT chunk
    ttt_batch_seqs: int = 32  # sequences per TTT step on each rank
    ttt_grad_clip: float = 1.0  # TTT gradient-norm clip
    # Phased TTT, a stage after the others (EVALUATION: its fixed constants, PHASED_*, and the
    # settings its global SGD phases share with TTT). Defaults: the frontier record's run.
    phased_ttt_enabled: bool = switch(False)  # run phased score-first TTT (quantized_ttt_phased)
    phased_ttt_lora_rank: int = 80  # rank of each per-document adapter (outputs scaled by 144 / rank)
    phased_ttt_beta2: float = 0.99  # AdamW beta2 of the adapters
    phased_ttt_wd: float = 0.5  # AdamW weight decay of the adapters
    phased_ttt_batch_docs: int = 64  # documents per batch, each with adapters of its own
    phased_ttt_prefix_docs: int = 2500  # documents scored before the last global SGD phase
    phased_ttt_num_phases: int = 3  # global SGD phases, evenly spaced over the prefix documents
    phased_ttt_shared_forward: bool = switch(False)  # 1: score from the training forward's losses (one forward less)

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> Hyperparameters:
        """Each setting from its upper-case variable in `environ`; keyword overrides win."""
        unknown = sorted(set(overrides) - {name for name, _, _ in HPARAMS})
        if unknown:
            raise TypeError(f"unknown Hyperparameters: {unknown}")
        h = cls(**{**env_settings(environ), **overrides})
        h.env_warnings = misspelt_settings(environ)
        return h

    def __post_init__(self) -> None:
        self.env_warnings = []
        if not self.run_id:
            self.run_id = str(uuid.uuid4())
        if not self.data_path:
            self.data_path = os.path.join(self.data_dir, "datasets", f"fineweb10B_sp{self.vocab_size}")
        if not self.tokenizer_path:
            self.tokenizer_path = os.path.join(self.data_dir, "tokenizers", f"fineweb_{self.vocab_size}_bpe.model")
        self.train_files = os.path.join(self.data_path, "fineweb_train_*.bin")
        # With VAL_BYTE_SIDECAR=1 the fineweb_val_bytes_* sidecars lie beside the val shards: not shards.
        # Without it, a data folder that has them is refused (main), so the wider pattern cannot meet one.
        self.val_files = os.path.join(self.data_path, "fineweb_val_[0-9]*.bin" if self.val_byte_sidecar
                                      else "fineweb_val_*.bin")
        self.validate()
        if self.fused_ce or self.fused_mlp:
            load_kernels(self)  # a missing Triton stops here, before any work
        if self.compressor == "pergroup":
            lrzip_program()  # a missing lrzip stops here, before any work

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def validate(self) -> None:
        h = self
        for name, value in PINNED.items():
            if getattr(h, name) != value:
                raise ValueError(
                    f"{name.upper()}={getattr(h, name)!r}: this file was packed (for {PACKED_FOR}) with "
                    f"{name.upper()}={value!r} and holds no code for other values; run the readable train_gpt.py, "
                    f"or pack a preset that sets {name.upper()}: python pack.py --preset FILE")
        if h.grad_accum_steps < 0:
            raise ValueError(f"GRAD_ACCUM_STEPS={h.grad_accum_steps} must be >= 1 (0: 8 // WORLD_SIZE)")
        # Zero or negative, these divide by zero, loop forever or train forever at lr 0.
        for name in ("num_heads", "num_kv_heads", "train_seq_len", "eval_seq_len", "eval_stride", "eval_batch_seqs",
                     "ttt_chunk_tokens", "ttt_batch_seqs", "gptq_calibration_batches", "train_batch_tokens"):
            if getattr(h, name) <= 0:
                raise ValueError(f"{name.upper()}={getattr(h, name)} must be > 0")
        if h.iterations < 0:
            raise ValueError(f"ITERATIONS={h.iterations} must be >= 0")
        if h.gptq_reserve_seconds is not None and h.gptq_reserve_seconds < 0:
            raise ValueError(f"GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds} must be >= 0 (unset: measured in the run)")
        # The measured reserve (GPTQ_RESERVE_SECONDS unset) is checked against the limit once it is
        # measured: calibration_reserve_seconds(), before the training clock starts.
        if h.gptq_reserve_seconds is not None and h.gptq_reserve_seconds >= h.max_wallclock_seconds > 0:
            raise ValueError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no training time after "
                             f"GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds} (set MAX_WALLCLOCK_SECONDS=0 for no limit)")
        if h.dist_timeout_seconds <= 0:
            raise ValueError(f"DIST_TIMEOUT_SECONDS={h.dist_timeout_seconds} must be > 0")
        if h.max_wallclock_seconds < 0:
            raise ValueError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} must be >= 0 (0: no limit)")
        if h.model_dim % h.num_heads != 0:
            raise ValueError(f"NUM_HEADS={h.num_heads} must divide MODEL_DIM={h.model_dim}")
        if h.num_heads % h.num_kv_heads != 0:
            raise ValueError(f"NUM_KV_HEADS={h.num_kv_heads} must divide NUM_HEADS={h.num_heads}")
        if h.rope_dims % 2 or not 2 < h.rope_dims <= h.head_dim:
            raise ValueError(f"ROPE_DIMS={h.rope_dims} must be even, > 2 and <= head_dim={h.head_dim}")
        if h.num_loops > 0 and not 0 <= h.loop_start <= h.loop_end < h.num_layers:
            raise ValueError(
                f"LOOP_START={h.loop_start}..LOOP_END={h.loop_end} must lie within NUM_LAYERS={h.num_layers}")
        if h.gate_attn_out and h.gate_width > h.model_dim:
            raise ValueError(f"GATE_WIDTH={h.gate_width} exceeds MODEL_DIM={h.model_dim}")
        if h.smear_gate and h.smear_gate_width > h.model_dim:
            raise ValueError(f"SMEAR_GATE_WIDTH={h.smear_gate_width} exceeds MODEL_DIM={h.model_dim}")
        if h.smear_pre_norm and not h.smear_gate:
            raise ValueError("SMEAR_PRE_NORM=1 needs SMEAR_GATE=1: it moves the SmearGate before the norm")
        if h.sparse_gate_scale and h.gate_attn_out:
            raise ValueError(f"SPARSE_GATE_SCALE={h.sparse_gate_scale} and GATE_ATTN_OUT=1 would gate each head's "
                             "output twice: set GATE_ATTN_OUT=0")
        if h.sparse_gate_scale and h.gate_width > h.model_dim:
            raise ValueError(f"GATE_WIDTH={h.gate_width} exceeds MODEL_DIM={h.model_dim}")
        if h.parallel_lanes_start and not 0 < h.parallel_lanes_start < h.num_layers:
            raise ValueError(f"PARALLEL_LANES_START={h.parallel_lanes_start} must be a block in 1..{h.num_layers - 1} "
                             f"(NUM_LAYERS={h.num_layers}), or 0 for off")
        if h.vocab_size > SHARD_VOCAB_LIMIT:
            raise ValueError(f"VOCAB_SIZE={h.vocab_size} does not fit the uint16 shards")
        if h.eval_seq_len % h.eval_stride != 0:
            raise ValueError(f"EVAL_STRIDE={h.eval_stride} must divide EVAL_SEQ_LEN={h.eval_seq_len}")
        if h.ttt_enabled and h.sliding_window_enabled and (
                h.ttt_chunk_tokens % h.eval_stride or h.ttt_chunk_tokens % h.eval_seq_len):
            raise ValueError(
                f"TTT_CHUNK_TOKENS={h.ttt_chunk_tokens} must be divisible by EVAL_STRIDE={h.eval_stride} "
                f"and EVAL_SEQ_LEN={h.eval_seq_len}, or a scored window would straddle two chunks")
        if h.ttt_enabled and not h.sliding_window_enabled:
            raise ValueError("TTT_ENABLED=1 needs SLIDING_WINDOW_ENABLED=1 (TTT scores through sliding windows)")
        if h.phased_ttt_enabled:
            validate_phased_ttt(h)
        for name in ("matrix_bits", "embed_bits"):
            if not 2 <= getattr(h, name) <= 8:
                raise ValueError(f"{name.upper()}={getattr(h, name)} must be in 2..8 (stored as int8)")
        for name in ("matrix_clip_sigmas", "embed_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas"):
            if getattr(h, name) is not None and not getattr(h, name) > 0:
                raise ValueError(f"{name.upper()}={getattr(h, name)} must be > 0")
        if h.lqer_top_k < 0 or (h.lqer_top_k and (h.lqer_rank < 1 or h.lqer_group < 1)):
            raise ValueError(f"LQER_TOP_K={h.lqer_top_k} must be >= 0, LQER_RANK={h.lqer_rank} and "
                             f"LQER_GROUP={h.lqer_group} >= 1")
        if h.lqer_form == "asym" and not h.lqer_top_k:
            raise ValueError("LQER_FORM=asym shapes the corrections of LQER_TOP_K, which is 0: set LQER_TOP_K >= 1")
        for f in dataclasses.fields(h):
            if "choices" in f.metadata and getattr(h, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name.upper()}={getattr(h, f.name)!r} must be one of {', '.join(f.metadata['choices'])}")

    def items(self):
        return [(name.upper(), getattr(self, name)) for name, _, _ in HPARAMS]


# (name, type, default) of every setting, in field order: what tools and tests iterate.
HPARAMS = tuple((f.name, {"str": str, "int": int, "float": float, "bool": bool}[f.type.split(" |")[0]], f.default)
                for f in dataclasses.fields(Hyperparameters))


def validate_phased_ttt(h: Hyperparameters) -> None:
    """PHASED_TTT_ENABLED=1's settings; bad values stop at construction, as every other's."""
    for name in ("phased_ttt_lora_rank", "phased_ttt_batch_docs", "phased_ttt_num_phases"):
        if getattr(h, name) < 1:
            raise ValueError(f"{name.upper()}={getattr(h, name)} must be >= 1")
    if h.phased_ttt_prefix_docs < 0:
        raise ValueError(f"PHASED_TTT_PREFIX_DOCS={h.phased_ttt_prefix_docs} must be >= 0 (0: no global SGD phase)")
    if PHASED_CHUNK > h.eval_seq_len:
        raise ValueError(f"PHASED_TTT_ENABLED=1 needs EVAL_SEQ_LEN={h.eval_seq_len} >= {PHASED_CHUNK} (PHASED_CHUNK): "
                         "a chunk is scored inside one window of at most EVAL_SEQ_LEN tokens")
    if h.eval_seq_len > h.train_seq_len:
        raise ValueError(f"PHASED_TTT_ENABLED=1 needs EVAL_SEQ_LEN={h.eval_seq_len} <= TRAIN_SEQ_LEN={h.train_seq_len}: "
                         "above it the rotary base stretches with the row width, and phased TTT's windows vary in width")
    if h.ttt_chunk_tokens % h.eval_seq_len:
        raise ValueError(f"PHASED_TTT_ENABLED=1 needs TTT_CHUNK_TOKENS={h.ttt_chunk_tokens} to be a multiple of "
                         f"EVAL_SEQ_LEN={h.eval_seq_len}: the global SGD phases train on whole sequences of a chunk")


def env_settings(environ) -> dict:
    """{setting: value} of the settings `environ` has a variable for, parsed."""
    return {name: _parse_env(name.upper(), typ, environ[name.upper()]) for name, typ, _ in HPARAMS
            if name.upper() in environ}


def misspelt_settings(environ) -> list[str]:
    """A misspelt setting (NUM_LAYER=3) would be silently ignored: name the setting it resembles."""
    known = [name.upper() for name, _, _ in HPARAMS]
    return [f"environment variable {k}={environ[k]!r} is not a setting; did you mean {close[0]}?"
            for k in sorted(environ) if k not in known
            for close in [difflib.get_close_matches(k, known, n=1, cutoff=0.8)] if close]


def _parse_env(name: str, typ: type, raw: str):
    try:
        if typ is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return typ(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {typ.__name__}") from None


# -----------------------------------------------------------------------------
# DEVICE & DISTRIBUTED
#   The device is chosen once. CUDA gets bf16 autocast, compile and fused optimizers;
#   CPU runs plain fp32 eager so it is exact and debuggable. A process group exists only
#   when torchrun set RANK/WORLD_SIZE: NCCL on GPU, gloo on CPU.
# -----------------------------------------------------------------------------


VARLEN_RECOMPILE_LIMIT = 64  # Dynamo's graphs per model with VARLEN=1, compiled (Runtime)


class Runtime:
    """Where this process runs: device, rank and the process layout torchrun gave it (RANK,
    WORLD_SIZE, LOCAL_RANK are not settings), and the micro-batch split that layout implies."""

    def __init__(self, h: Hyperparameters, environ=os.environ):
        # A stray WORLD_SIZE without RANK is ignored rather than splitting work across ranks that
        # do not exist.
        self.distributed = "RANK" in environ and "WORLD_SIZE" in environ
        self.rank = int(environ["RANK"]) if self.distributed else 0
        self.world_size = int(environ["WORLD_SIZE"]) if self.distributed else 1
        self.is_main = self.rank == 0
        self.split_batch(h)  # bad input stops before any device or process group is touched
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.is_cuda = self.device.type == "cuda"
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.is_cuda else "gloo", device_id=self.device if self.is_cuda else None,
                                    timeout=datetime.timedelta(seconds=h.dist_timeout_seconds))
        self.compile = self.is_cuda if h.compile is None else h.compile
        if self.compile:
            # As the record: without this, Dynamo's DDPOptimizer cuts each training graph at DDP's
            # bucket boundaries (other fusions and recomputation, several compiles per mode).
            torch._dynamo.config.optimize_ddp = False
            if h.varlen:
                # Each padded cu_seqlens length is a training graph per looping mode: more than
                # Dynamo's default of 8 per model, past which fullgraph=True stops the run.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, VARLEN_RECOMPILE_LIMIT)
        check_kernel_device(h, self.is_cuda)
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def split_batch(self, h: Hyperparameters) -> None:
        """TRAIN_BATCH_TOKENS per step = WORLD_SIZE x GRAD_ACCUM_STEPS x micro_batch_seqs x TRAIN_SEQ_LEN."""
        world = self.world_size
        if world < 1 or 8 % world != 0:
            raise ValueError(f"WORLD_SIZE={world} must divide 8 (the record's 8-way batch split)")
        accum = self.grad_accum_steps = h.grad_accum_steps or 8 // world  # 0: the record's 8-way split
        self.micro_batch_seqs = h.train_batch_tokens // (world * accum) // h.train_seq_len
        split = world * accum * h.train_seq_len
        if h.train_batch_tokens % split:
            raise ValueError(
                f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} is not a multiple of WORLD_SIZE={world} x "
                f"GRAD_ACCUM_STEPS={accum} x TRAIN_SEQ_LEN={h.train_seq_len} = {split}: the batch "
                f"would be rounded down to {self.micro_batch_seqs * split} tokens")
        if self.micro_batch_seqs < 1:
            raise ValueError(
                f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} gives no full sequence of TRAIN_SEQ_LEN="
                f"{h.train_seq_len} per micro-batch (WORLD_SIZE={world} x GRAD_ACCUM_STEPS={accum})")

    def autocast(self):
        if self.is_cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, t: Tensor) -> Tensor:
        """A host batch on this device, contiguous, without the host waiting for the device: from
        pageable memory a copy may synchronize the stream (CUDA stages it through pinned memory),
        so the host could not prepare the next batch while this one runs. The pinned block comes
        from torch's caching host allocator, which keeps it until the copy has completed. (A
        pinned non-contiguous view would not do: the copy first makes a pageable contiguous one.)"""
        if not self.is_cuda:
            return t
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)

    def synchronize(self):
        if self.is_cuda:
            torch.cuda.synchronize()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def average_gradients(self, params: list[Tensor]) -> None:
        """Mean of every gradient over the ranks in one flat all-reduce per gradient dtype (fp32, plus
        bf16 for the embeddings on CUDA) rather than one per parameter. gloo has no AVG: sum, divide."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads])).div_(self.world_size)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's t, in rank order."""
        if not self.distributed:
            return [t]
        every = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(every, t)
        return every

    def close(self, status: int) -> int:
        """End a distributed run: every rank finishes every collective (the barrier) before any
        closes its connections, then the process leaves without interpreter finalization.
        DistributedDataParallel keeps the process group referenced after destroy_process_group(),
        so gloo's communication threads outlive it; at interpreter finalization a thread that
        still needs the GIL aborts the process ("terminate called without an active exception")
        after the run's work is done. Nothing is pending here: the log is written line by line."""
        if not (self.distributed and dist.is_initialized()):
            return status
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


class Logger:
    """Rank 0 prints and appends to logs/{RUN_ID}.txt; other ranks stay quiet."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


# -----------------------------------------------------------------------------
# TOKENIZER & BPB
#   bpb = (nats/token / ln 2) * (tokens/bytes). The byte count of each scored token comes
#   from lookup tables over the vocabulary (with VAL_BYTE_SIDECAR=1, CaseOps data, from the
#   validation byte sidecar instead); this is where submissions have been disqualified, so
#   each rule below is pinned by a test.
# -----------------------------------------------------------------------------


def build_sentencepiece_luts(sp, vocab_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(base_bytes int16, has_leading_space bool, is_boundary bool), each of length vocab_size.

    A token's bytes are its piece's UTF-8 bytes without the leading '▁'; the space that '▁'
    stands for is added only when the previous token is not a boundary (control/unknown),
    because a document's first word carries no real space. Byte-fallback pieces such as
    <0xE2> are exactly one byte of the text, whatever their printed form.
    """
    sp_vocab = int(sp.vocab_size())
    if sp_vocab != vocab_size:
        raise ValueError(f"tokenizer has {sp_vocab} pieces but VOCAB_SIZE={vocab_size}")
    space_id = sp.piece_to_id("\u2581")
    if space_id == sp.unk_id() or sp.id_to_piece(space_id) != "\u2581":
        raise ValueError("tokenizer has no standalone '\u2581' piece, so a lone space cannot be byte-counted")
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.zeros(vocab_size, dtype=np.bool_)
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            is_boundary[i] = True
            continue
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return (torch.tensor(base_bytes, device=device), torch.tensor(has_leading_space, device=device),
            torch.tensor(is_boundary, device=device))


def token_bytes(prev_ids: Tensor, target_ids: Tensor, luts) -> Tensor:
    base_bytes, has_leading_space, is_boundary = luts
    nbytes = base_bytes[target_ids].to(torch.int32)
    return nbytes + (has_leading_space[target_ids] & ~is_boundary[prev_ids]).to(torch.int32)


def sidecar_window_bytes(counts: Tensor, windows, shape) -> Tensor:
    """The sidecar's bytes of each window's targets, laid out as score_windows lays out y: the
    targets of window (start, _, end) are tokens start+1..end, so are their byte counts."""
    out = torch.zeros(shape, dtype=torch.int32)
    for r, (start, _, end) in enumerate(windows):
        out[r, : end - start] = counts[start + 1: end + 1]
    return out


def load_tokenizer(h: Hyperparameters):
    import sentencepiece as spm

    if not os.path.isfile(h.tokenizer_path):
        raise FileNotFoundError(f"tokenizer not found: {h.tokenizer_path} (set DATA_DIR or TOKENIZER_PATH)")
    try:
        return spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    except RuntimeError as e:  # an empty or foreign file: SentencePiece's message names no file
        size = os.path.getsize(h.tokenizer_path)
        raise ValueError(f"{h.tokenizer_path} ({size} bytes) is not a SentencePiece model: {e}") from None


# -----------------------------------------------------------------------------
# DATA
#   Shards: 256 int32 header words (magic, version, n_tokens), then n_tokens uint16 ids.
#   The training loader reproduces the record's draw sequence call for call (SPEC §1): each
#   rank owns every world_size-th shard and an RNG seeded with its rank (not SEED), so every
#   seed sees the same data and a run is step-comparable with the record's. CaseOps data has,
#   beside each val shard, a byte sidecar in the same format holding a uint16 byte count per token.
#   VARLEN=1 trains instead on the stream in order, documents packed end to end, each rank taking
#   its slice of every micro-step, with cu_seqlens marking where the documents start.
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
SHARD_VOCAB_LIMIT = 1 << 16  # ids are uint16, so VOCAB_SIZE may be at most 65,536
BOS_ID = 1  # every document starts with it (SPEC §1)
# cu_seqlens are padded to a multiple of this many entries: shapes are static when compiled, so
# each distinct length is a graph of its own, and padding keeps them few.
VARLEN_CU_BUCKET = 64


def read_shard(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    if size < HEADER_WORDS * 4:
        raise ValueError(f"corrupt shard {path}: {size} bytes is shorter than the 1024-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"corrupt shard {path}: magic {header[0]} != {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"corrupt shard {path}: version {header[1]} != {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_WORDS * 4 + 2 * n:
        raise ValueError(f"corrupt shard {path}: header says {n} tokens, so {HEADER_WORDS * 4 + 2 * n} bytes, "
                         f"but the file has {size}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_WORDS * 4, shape=(n,))


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}")
    return files


def check_token_ids(tokens: np.ndarray, path: str, vocab_size: int) -> None:
    """A shard of another vocabulary would crash the embedding lookup at whatever step first
    draws the bad id, hours in: check each shard once, when it is opened."""
    top = int(tokens.max()) if tokens.size else 0
    if top >= vocab_size:
        raise ValueError(f"shard {path} holds token id {top} >= VOCAB_SIZE={vocab_size} "
                         "(written with another tokenizer?)")


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int) -> Tensor:
    shards = []
    for f in shard_files(pattern):
        shards.append(np.asarray(read_shard(f)))
        check_token_ids(shards[-1], f, vocab_size)
    tokens = np.concatenate(shards)
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"validation split {pattern} has {tokens.size} tokens, fewer than EVAL_SEQ_LEN+1={seq_len + 1}")
    tokens = tokens[: usable + 1]
    return torch.from_numpy(tokens.astype(np.int64))


SIDECAR_PREFIX = "fineweb_val_bytes_"  # the byte sidecar of fineweb_val_000000.bin is fineweb_val_bytes_000000.bin


def sidecar_path(shard: str | os.PathLike) -> str:
    """The byte sidecar of a validation shard: fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin,
    in the same folder (the layout of the record's CaseOps data; prepare_data.py --caseops writes it)."""
    folder, name = os.path.split(os.fspath(shard))
    if not name.startswith("fineweb_val_"):
        raise ValueError(f"{shard} is not a validation shard (fineweb_val_NNNNNN.bin), so it has no byte sidecar")
    return os.path.join(folder, SIDECAR_PREFIX + name[len("fineweb_val_"):])


def load_validation_sidecar(h: Hyperparameters, val_tokens: Tensor) -> Tensor:
    """VAL_BYTE_SIDECAR=1: the original UTF-8 bytes of each validation token (int32, on the host),
    read from the sidecar beside each val shard and truncated as the tokens are. CaseOps text holds
    case markers that stand for no byte of the original, and normalization changes what a piece
    spells, so the tables cannot count these bytes; the data writer, which saw the original
    text, recorded them. A sidecar that is missing, corrupt, of another length than its shard, or
    not zero at a BOS (then it belongs to other shards) stops the run here, named."""
    parts = []
    shards = shard_files(h.val_files)
    for f in shards:
        side = sidecar_path(f)
        if not os.path.isfile(side):
            raise FileNotFoundError(f"VAL_BYTE_SIDECAR=1: the byte sidecar {side} of {f} does not exist "
                                    "(prepare_data.py --caseops writes it)")
        counts, n = read_shard(side), len(read_shard(f))
        if len(counts) != n:
            raise ValueError(f"VAL_BYTE_SIDECAR=1: byte sidecar {side} has {len(counts)} entries, "
                             f"but its shard {f} has {n} tokens")
        parts.append(np.asarray(counts))
    stray = sorted(set(glob.glob(sidecar_path(h.val_files))) - {sidecar_path(f) for f in shards})
    if stray:
        raise ValueError(f"VAL_BYTE_SIDECAR=1: byte sidecar {stray[0]} has no validation shard beside it")
    counts = torch.from_numpy(np.concatenate(parts)[: val_tokens.numel()].astype(np.int32))
    at_bos = counts[val_tokens == 1]  # id 1: BOS, which stands for no byte
    if at_bos.any():
        raise ValueError(f"VAL_BYTE_SIDECAR=1: the byte sidecars of {h.val_files} give a BOS token "
                         f"{int(at_bos.max())} bytes: they do not belong to these shards")
    return counts


class ShuffledSequenceLoader:
    """Draws TRAIN_SEQ_LEN+1 token windows from this rank's shards without replacement."""

    def __init__(self, pattern: str, seq_len: int, rank: int, world_size: int, vocab_size: int | None = None):
        files = shard_files(pattern)[rank::world_size]
        if not files:
            every = shard_files(pattern)
            tokens = sum(len(read_shard(f)) for f in every)
            raise ValueError(
                f"rank {rank} of {world_size} has no training shard: {pattern} has {len(every)}, and each rank needs "
                f"at least one; write smaller shards, e.g. prepare_data.py --shard-tokens {max(1, tokens // world_size)}")
        self.files, self.seq_len = files, seq_len
        self.tokens = [read_shard(f) for f in files]
        if vocab_size is not None:
            for f, toks in zip(files, self.tokens):
                check_token_ids(toks, f, vocab_size)
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.starts: list[list[int]] = [[] for _ in files]
        self._reset_all()

    def _reset_all(self) -> None:
        L = self.seq_len
        for i, toks in enumerate(self.tokens):
            n = len(toks)
            max_phase = min(L - 1, max(0, n - L - 1))
            phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
            order = self.rng.permutation(max(0, (n - 1 - phase) // L))
            self.starts[i] = (phase + order * L).tolist()
        if not any(self.starts):
            raise ValueError(f"training shards {self.files} hold no window of TRAIN_SEQ_LEN+1={L + 1} tokens")

    def next_batch(self, rows: int) -> tuple[Tensor, Tensor]:
        L = self.seq_len
        batch = np.empty((rows, L + 1), dtype=np.int64)
        for r in range(rows):
            remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
            if remaining.sum() == 0:
                self._reset_all()
                remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
            si = int(self.rng.choice(len(self.starts), p=remaining / remaining.sum()))
            start = self.starts[si].pop()
            batch[r] = self.tokens[si][start: start + L + 1]
        t = torch.from_numpy(batch)
        return t[:, :-1], t[:, 1:]


def packed_cu_seqlens(doc_starts, total: int, split: int) -> Tensor:
    """int32 cu_seqlens of a packed row of `total` tokens whose documents start at `doc_starts`
    (sorted offsets in [0, total)): a segment starts at 0, at each document start and every `split`
    tokens into a document; then `total`, repeated to a multiple of VARLEN_CU_BUCKET entries. A
    repeated `total` is an empty segment: nothing attends to it or from it."""
    bounds = [0, *(int(s) for s in doc_starts if s > 0), total]
    cu = [p for a, b in zip(bounds, bounds[1:]) for p in range(a, b, split)] + [total]
    return torch.tensor(cu + [total] * (-len(cu) % VARLEN_CU_BUCKET), dtype=torch.int32)


class DocumentPackedLoader:
    """VARLEN=1: the training stream read in order, never shuffled. Every rank reads every shard,
    in sorted order and then round again, each from its first BOS. A micro-step takes WORLD_SIZE
    consecutive spans of rows x TRAIN_SEQ_LEN + 1 tokens at the cursor, rank r the r-th: its inputs
    are the span's first rows x TRAIN_SEQ_LEN tokens and its targets the last as many (the span's
    last token is a target only). Where fewer tokens than a micro-step are left, the shard's tail is
    skipped. Attention segments: the documents starting in the inputs, split every TRAIN_SEQ_LEN
    tokens (packed_cu_seqlens). Shards are opened (ids checked, BOS found) one ahead, in a thread."""

    def __init__(self, pattern: str, seq_len: int, rank: int, world_size: int, vocab_size: int | None = None):
        self.files, self.seq_len, self.rank, self.world_size = shard_files(pattern), seq_len, rank, world_size
        self.vocab_size, self.shard = vocab_size, 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self._use(self._open(0))  # a first shard without a document stops here

    def _open(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.files[i]
        tokens = read_shard(path)
        if self.vocab_size is not None:
            check_token_ids(tokens, path, self.vocab_size)
        bos = np.flatnonzero(tokens == BOS_ID)
        if not bos.size:
            raise ValueError(f"VARLEN=1: training shard {path} holds no BOS (id {BOS_ID}), so no document starts in it")
        return tokens, bos

    def _use(self, opened: tuple[np.ndarray, np.ndarray]) -> None:
        self.tokens, self.bos = opened
        self.cursor = int(self.bos[0])
        self.next_shard = self.pool.submit(self._open, (self.shard + 1) % len(self.files))

    def next_batch(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """x and y of shape (1, rows x TRAIN_SEQ_LEN), this rank's cu_seqlens."""
        n = rows * self.seq_len
        span, skipped = n + 1, 0
        while self.cursor + self.world_size * span > len(self.tokens):
            if skipped == len(self.files):
                raise ValueError(
                    f"VARLEN=1: a micro-step takes WORLD_SIZE={self.world_size} x {span} tokens, but no shard of "
                    f"{len(self.files)} holds that many after its first BOS (the largest has "
                    f"{max(len(read_shard(f)) for f in self.files)} in all): lower TRAIN_BATCH_TOKENS or write larger shards")
            self.shard, skipped = (self.shard + 1) % len(self.files), skipped + 1
            self._use(self.next_shard.result())
        start = self.cursor + self.rank * span
        self.cursor += self.world_size * span
        lo, hi = np.searchsorted(self.bos, [start, start + n])
        row = torch.from_numpy(self.tokens[start: start + span].astype(np.int64))
        return row[None, :-1], row[None, 1:], packed_cu_seqlens(self.bos[lo:hi] - start, n, self.seq_len)


# -----------------------------------------------------------------------------
# KERNELS
#   Two optional Triton kernels, each behind a switch that is off by default (the record's PyTorch
#   math runs unless FUSED_CE=1 / FUSED_MLP=1):
#   - soft-capped cross-entropy: streams the head's raw logits in blocks over the vocabulary,
#     soft-caps them in registers and keeps a running log-sum-exp, so the capped logits and their
#     fp32 copy are never written. Backward recomputes each block from the same logits and the
#     saved per-token log-sum-exp, and writes the logits' gradient in their own dtype.
#   - LeakyReLU(0.5)^2: one read and one write instead of leaky_relu then square (two tensors
#     written, one more saved for backward); backward recomputes from the MLP's pre-activation.
#   Both compute in fp32 whatever their input dtype and round once on store. Each is a torch custom
#   op with a shape-only fake implementation and an autograd formula, so torch.compile(fullgraph=True)
#   traces it as one opaque node. Triton is imported only when a switch is on. On CPU, Triton's
#   interpreter (TRITON_INTERPRET=1, set before the first kernel is built) runs the same kernels on
#   CPU tensors: that is how the tests prove them exact without a GPU.
#   Every target must lie in [0, vocab): the loss has no ignore_index, and it does not check, since
#   a check would make each step wait for the device. Nothing here makes such a target: shard ids
#   are checked against VOCAB_SIZE when a shard is opened, and evaluation pads with target 0 and
#   masks the padded scores out.
# -----------------------------------------------------------------------------

# `CE_TILES`, `ACT_BLOCK`: tiles (rows x vocabulary columns for the loss, elements for the activation). On a GPU one row
# per program streams the vocabulary; the interpreter pays per program, so it takes many rows.
CE_TILES = {"cuda": (1, 1024), "cpu": (128, 128)}
ACT_BLOCK = {"cuda": 1024, "cpu": 16384}
KERNELS_LOADED = False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def load_kernels(h: Hyperparameters) -> None:
    """Build the Triton kernels and register them as torch ops (once per process)."""
    global KERNELS_LOADED, tl, tl_tanh
    if KERNELS_LOADED:
        return
    switches = " and ".join(name for name, on in (("FUSED_CE=1", h.fused_ce), ("FUSED_MLP=1", h.fused_mlp)) if on)
    # Kernels find each other and `tl` through the module's globals: the interpreter runs a
    # kernel's source against its __globals__ alone, without the closure of this function.
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise RuntimeError(f"{switches} needs Triton, which is not installed: pip install triton "
                           f"(or leave {switches.replace('=1', '=0')})") from None

    @triton.jit
    def tl_tanh(x):
        # tl has no tanh; this form cannot overflow: exp's argument is never positive.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def ce_forward_kernel(z_ptr, y_ptr, loss_ptr, lse_ptr, n_rows, vocab, softcap,
                          ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        base = rows.to(tl.int64) * vocab
        # Online log-sum-exp: m is the running max, s the sum of exp(c - m) so far. Only columns past
        # the vocabulary are -inf (padded rows compute on zeros and store nothing), so every block
        # has a finite max and no exp(-inf - -inf) = nan appears.
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        s = tl.zeros((ROWS,), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < vocab)[None, :]
            z = tl.load(z_ptr + base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            c = tl.where((cols < vocab)[None, :], softcap * tl_tanh(z / softcap), float("-inf"))
            m_new = tl.maximum(m, tl.max(c, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)
        zy = tl.load(z_ptr + base + y, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, lse - softcap * tl_tanh(zy / softcap), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def ce_backward_kernel(z_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, n_rows, vocab, softcap,
                           ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        base = rows.to(tl.int64) * vocab
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=0)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < vocab)[None, :]
            z = tl.load(z_ptr + base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            t = tl_tanh(z / softcap)
            # d loss / d c = softmax(c) - onehot(y); d c / d z = 1 - tanh^2.
            p = tl.exp(softcap * t - lse[:, None])
            d = p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
            dz = g[:, None] * d * (1.0 - t * t)
            tl.store(dz_ptr + base[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def act_forward_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        u = tl.load(u_ptr + i, mask=ok, other=0.0).to(tl.float32)
        a = tl.where(u > 0, u, 0.5 * u)
        tl.store(out_ptr + i, (a * a).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def act_backward_kernel(u_ptr, g_ptr, du_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        u = tl.load(u_ptr + i, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
        # d/du leaky(u)^2 = 2 leaky(u) leaky'(u): 2u above zero, 2 (u/2) (1/2) = u/2 below.
        tl.store(du_ptr + i, (g * tl.where(u > 0, 2.0 * u, 0.5 * u)).to(du_ptr.dtype.element_ty), mask=ok)

    def tiles(t: Tensor, table: dict):
        return table["cuda" if t.is_cuda else "cpu"]

    # Custom ops see whatever layout autograd hands them (the mean's gradient is a stride-0
    # expand), so each makes its inputs contiguous before the kernel indexes them flat.
    @torch.library.custom_op("train_gpt::softcap_ce", mutates_args=())
    def softcap_ce(z: Tensor, y: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
        z, y = z.contiguous(), y.contiguous()
        losses = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        lse = torch.empty_like(losses)
        rows, block_v = tiles(z, CE_TILES)
        ce_forward_kernel[(triton.cdiv(z.size(0), rows),)](
            z, y, losses, lse, z.size(0), z.size(1), softcap, ROWS=rows, BLOCK_V=block_v)
        return losses, lse

    @softcap_ce.register_fake
    def _(z, y, softcap):
        return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)

    @torch.library.custom_op("train_gpt::softcap_ce_backward", mutates_args=())
    def softcap_ce_backward(z: Tensor, y: Tensor, lse: Tensor, grad: Tensor, softcap: float) -> Tensor:
        z, y, grad = z.contiguous(), y.contiguous(), grad.contiguous()
        dz = torch.empty_like(z)
        rows, block_v = tiles(z, CE_TILES)
        ce_backward_kernel[(triton.cdiv(z.size(0), rows),)](
            z, y, lse, grad, dz, z.size(0), z.size(1), softcap, ROWS=rows, BLOCK_V=block_v)
        return dz

    @softcap_ce_backward.register_fake
    def _(z, y, lse, grad, softcap):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def ce_setup(ctx, inputs, output):
        z, y, ctx.softcap = inputs
        ctx.save_for_backward(z, y, output[1])

    def ce_backward(ctx, grad_losses, grad_lse):
        z, y, lse = ctx.saved_tensors
        return softcap_ce_backward(z, y, lse, grad_losses.float(), ctx.softcap), None, None

    softcap_ce.register_autograd(ce_backward, setup_context=ce_setup)

    @torch.library.custom_op("train_gpt::leaky_relu_sq", mutates_args=())
    def leaky_relu_sq(u: Tensor) -> Tensor:
        u = u.contiguous()
        out = torch.empty_like(u)
        block = tiles(u, ACT_BLOCK)
        act_forward_kernel[(triton.cdiv(u.numel(), block),)](u, out, u.numel(), BLOCK=block)
        return out

    @leaky_relu_sq.register_fake
    def _(u):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    @torch.library.custom_op("train_gpt::leaky_relu_sq_backward", mutates_args=())
    def leaky_relu_sq_backward(u: Tensor, grad: Tensor) -> Tensor:
        u, grad = u.contiguous(), grad.contiguous()
        du = torch.empty_like(u)
        block = tiles(u, ACT_BLOCK)
        act_backward_kernel[(triton.cdiv(u.numel(), block),)](u, grad, du, u.numel(), BLOCK=block)
        return du

    @leaky_relu_sq_backward.register_fake
    def _(u, grad):
        return torch.empty_like(u, memory_format=torch.contiguous_format)

    def act_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def act_backward(ctx, grad):
        return leaky_relu_sq_backward(ctx.saved_tensors[0], grad)

    leaky_relu_sq.register_autograd(act_backward, setup_context=act_setup)
    KERNELS_LOADED = True


def check_kernel_device(h: Hyperparameters, is_cuda: bool) -> None:
    if (h.fused_ce or h.fused_mlp) and not is_cuda and not triton_interpreting():
        raise RuntimeError(f"FUSED_CE={int(h.fused_ce)} FUSED_MLP={int(h.fused_mlp)} on CPU run Triton's "
                           "interpreter: set TRITON_INTERPRET=1 in the environment (or turn the switches off)")


def fused_softcap_cross_entropy(z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Per-token CE(softcap * tanh(z / softcap), targets) in fp32; z (N, V) are the raw logits."""
    return torch.ops.train_gpt.softcap_ce(z, targets, softcap)[0]


def fused_leaky_relu_sq(u: Tensor) -> Tensor:
    """leaky_relu(u, 0.5) ** 2 in u's dtype, computed in fp32."""
    return torch.ops.train_gpt.leaky_relu_sq(u)



# -----------------------------------------------------------------------------
# MODEL
#   11 layers x 512 wide, GQA 8/4 heads, 4x leaky-ReLU^2 MLP, depth recurrence over layers
#   3-5, U-Net skips, parallel residual blocks from layer 7, XSA, gated attention output,
#   SmearGate, BigramHash input branch, tied and soft-capped head (SPEC §3). Switches give the
#   later record's forms (#1855, FRONTIER.md): a sparse sigmoid output gate per head, a decoder
#   of two lanes with learned mixing, and a SmearGate on the raw embedding.
# -----------------------------------------------------------------------------

# `TENSOR_ROLES`: every tensor's role, by the end of its state-dict name: (optimizer group,
# quantization category, blob family). "control" tensors steer the residual stream: they train
# with AdamW at SCALAR_LR and stay fp32. bigram.embed trains (with the token embedding) only
# with BIGRAM_TRAIN_EMBED=1 (SPEC §3). The frontier switches' tensors are control tensors too:
# the SmearGate on the raw embedding (SMEAR_PRE_NORM) is a separate name because, unlike the
# record's, it trains with AdamW and is stored fp16. Used by split_params, quant_category,
# clip_sigmas_for, collect_hessians and tensor_family.
_GPTQ = ("matrix", "gptq_int6")
_PER_TENSOR, _PASSTHROUGH = ("control", "int8_tensor", "control"), ("control", "fp16", "control")
TENSOR_ROLES = {
    "tok_emb.weight": ("token", "gptq_int8", "embed"), "bigram.embed.weight": ("bigram_embed", "int6_row", "bigram"),
    "attn.c_q.weight": (*_GPTQ, "attn"), "attn.c_k.weight": (*_GPTQ, "attn"), "attn.c_v.weight": (*_GPTQ, "attn"),
    "attn.proj.weight": (*_GPTQ, "attn"), "mlp.fc.weight": (*_GPTQ, "mlp"), "mlp.proj.weight": (*_GPTQ, "mlp"),
    "bigram.proj.weight": ("matrix", "int8_row", "control"), "smear_gate.weight": ("matrix", "int8_row", "control"),
    "attn_gate_proj.weight": ("control", "int8_row", "control"),
    "attn.sparse_gate.weight": ("control", "int8_row", "control"),  # the sparse attention gate (heads x 12)
    "smear_embed_gate.weight": _PASSTHROUGH, "lane_mix": _PASSTHROUGH,
    "attn_scale": _PER_TENSOR, "mlp_scale": _PER_TENSOR, "resid_mix": _PER_TENSOR, "skip_weights": _PER_TENSOR,
    "skip_gates": _PER_TENSOR, "q_gain": _PASSTHROUGH, "bigram.scale": _PASSTHROUGH, "smear_lambda": _PASSTHROUGH,
}


def tensor_role(name: str) -> tuple[str, str, str] | None:
    """(optimizer group, quantization category, blob family) of a state-dict name; None if unknown."""
    return next((role for suffix, role in TENSOR_ROLES.items() if name.endswith(suffix)), None)
FLASH_ATTN_FUNC = None  # set by enable_flash_attention() on CUDA when flash_attn_interface imports
FLASH_ATTN_VARLEN_FUNC = None  # set by enable_flash_attention_varlen() likewise, with VARLEN=1


def enable_flash_attention() -> None:
    global FLASH_ATTN_FUNC
    with contextlib.suppress(ImportError):
        from flash_attn_interface import flash_attn_func
        FLASH_ATTN_FUNC = flash_attn_func


def enable_flash_attention_varlen() -> None:
    global FLASH_ATTN_VARLEN_FUNC
    with contextlib.suppress(ImportError):
        from flash_attn_interface import flash_attn_varlen_func
        FLASH_ATTN_VARLEN_FUNC = flash_attn_varlen_func


def rms_norm(x: Tensor) -> Tensor:
    # Since torch 2.12 CUDA autocast runs rms_norm in fp32 and returns fp32; the record (torch 2.9.1)
    # got its input dtype back, and FA3 needs q, k and v in one dtype: cast back.
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


class CastedLinear(nn.Linear):
    """Bias-free linear with an fp32 master weight, cast to the activation dtype at matmul."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rotary_cos_sin(T: int, rope_dims: int, base: float, train_seq_len: int, device, dtype, bf16_inv_freq: bool = False):
    stretch = T > train_seq_len
    if stretch:
        # Stretch the base for longer contexts so the slowest frequencies still span T.
        base = base * (T / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims)
    if bf16_inv_freq and not stretch:
        # The record's GPU run keeps these frequencies in a buffer that its model.bfloat16() rounds
        # (a stretched base is computed afresh in fp32): rotate as it did.
        inv_freq = inv_freq.bfloat16().float()
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate only the first rope_dims dims of each head; the rest carry position-free content."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest), dim=-1)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Causal attention within each segment of one packed row: q (1,T,H,D), k/v (1,T,Hkv,D) ->
    (1,T,H,D); cu_seqlens int32 as packed_cu_seqlens makes them, no segment longer than max_seqlen.
    On CUDA FA3's varlen kernel on the flattened row (GQA inside, as flash_attn_func); elsewhere SDPA
    with a block-diagonal causal mask, the same function (tests/test_frontier_varlen.py): banded to
    2 x max_seqlen keys per query when max_seqlen divides T (a training row always), so its memory
    grows as T, not T^2. Every position sees itself, so no softmax row is empty: the padding
    entries of cu_seqlens make no NaN."""
    if FLASH_ATTN_VARLEN_FUNC is not None:  # set on CUDA only, when flash_attn_interface imports
        out = FLASH_ATTN_VARLEN_FUNC(q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                     max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True)
        return (out[0] if isinstance(out, tuple) else out)[None]
    T, L = q.size(1), max_seqlen
    pos = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, pos, right=True)  # padding entries (= T) exceed every position
    if T % L:  # the whole row's T x T mask
        mask = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=True)
        return y.transpose(1, 2)
    # No segment is longer than L, so the queries of each block of L positions see keys in that
    # block and the one before it only: n blocks of L x 2L scores instead of T x T.
    n = T // L

    def with_previous(t: Tensor, fill) -> Tensor:  # (T, ...) -> (n, 2L, ...); before the first block: fill
        t = torch.cat((torch.full_like(t[:L], fill), t))
        return torch.cat((t[:-L].view(n, L, *t.shape[1:]), t[L:].view(n, L, *t.shape[1:])), dim=1)

    seg_q, seg_k = segment.view(n, L), with_previous(segment, -1)
    pos_q, pos_k = pos.view(n, L), with_previous(pos, -1)
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (pos_q[:, :, None] >= pos_k[:, None, :])  # (n, L, 2L)
    y = F.scaled_dot_product_attention(q[0].view(n, L, *q.shape[2:]).transpose(1, 2),
                                       with_previous(k[0], 0).transpose(1, 2), with_previous(v[0], 0).transpose(1, 2),
                                       attn_mask=mask[:, None], enable_gqa=True)  # (n, H, L, D)
    return y.transpose(1, 2).reshape(q.shape)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D); query head h reads KV head h // (H/Hkv)."""
    if FLASH_ATTN_FUNC is not None:  # set on CUDA only, when flash_attn_interface imports
        out = FLASH_ATTN_FUNC(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, h: Hyperparameters, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = h.num_heads, h.num_kv_heads, h.head_dim
        self.use_xsa = use_xsa
        # VARLEN: the packed loader splits documents every TRAIN_SEQ_LEN tokens, so no segment is
        # longer (FA3 sizes its work by it); 0: attention over the whole row.
        self.max_seqlen = h.train_seq_len if h.varlen else 0
        kv_dim = h.num_kv_heads * h.head_dim
        self.c_q = CastedLinear(h.model_dim, h.model_dim)
        self.c_k = CastedLinear(h.model_dim, kv_dim)
        self.c_v = CastedLinear(h.model_dim, kv_dim)
        self.proj = CastedLinear(h.model_dim, h.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.gate_width = h.gate_width if h.gate_attn_out else 0
        if self.gate_width:
            self.attn_gate_proj = CastedLinear(h.gate_width, h.num_heads, zero_init=True)
        self.sparse_scale = h.sparse_gate_scale
        if self.sparse_scale:  # zero-init: every head starts at half its output
            self.sparse_gate = CastedLinear(h.gate_width, h.num_heads, zero_init=True)
        self.lora_qkvo = h.phased_ttt_enabled  # forward may be given a slot's adapters (phased TTT)

    def forward(self, a: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None = None,
                lora: nn.Module | None = None) -> Tensor:
        B, T, _ = a.shape
        q = self.c_q(a).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(a).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(a).view(B, T, self.num_kv_heads, self.head_dim)
        if self.lora_qkvo and lora is not None:  # phased TTT: per-document adapters beside c_q, c_k, c_v
            q, k, v = q + lora.q(a).view_as(q), k + lora.k(a).view_as(k), v + lora.v(a).view_as(v)
        q = apply_partial_rotary(rms_norm(q), cos, sin)
        k = apply_partial_rotary(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if self.max_seqlen and cu_seqlens is not None:
            y = varlen_attention(q, k, v, cu_seqlens, self.max_seqlen)  # (1, T, H, D), documents apart
        else:
            y = causal_attention(q, k, v)  # (B, T, H, D)
        if self.use_xsa:
            # Remove what the head merely copies from its own value vector, so attention
            # spends capacity on information from other positions.
            group = self.num_heads // self.num_kv_heads
            y = y.view(B, T, self.num_kv_heads, group, self.head_dim)
            v_hat = F.normalize(v, dim=-1).unsqueeze(3)
            y = (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).view(B, T, self.num_heads, self.head_dim)
        if self.gate_width:
            y = y * (2 * torch.sigmoid(self.attn_gate_proj(a[..., : self.gate_width])))[..., None]
        if self.sparse_scale:
            gate_in = a[..., : self.sparse_gate.in_features]
            y = y * torch.sigmoid(self.sparse_scale * self.sparse_gate(gate_in))[..., None]
        if self.lora_qkvo and lora is not None:  # the output adapter runs beside all of attention, from a
            return self.proj(y.reshape(B, T, -1)) + lora.o(a)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        hidden = int(h.mlp_mult * h.model_dim)
        self.fc = CastedLinear(h.model_dim, hidden)
        self.proj = CastedLinear(hidden, h.model_dim, zero_init=True)
        self.fused = h.fused_mlp
        self.lora_mlp = h.phased_ttt_enabled  # forward may be given a slot's adapters (phased TTT)

    def forward(self, x: Tensor, lora: nn.Module | None = None) -> Tensor:
        if self.lora_mlp and lora is not None:  # phased TTT's adapter beside the MLP, from its input
            return self.forward(x) + lora.mlp(x)
        if self.fused:
            return self.proj(fused_leaky_relu_sq(self.fc(x)))
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(h, use_xsa=layer >= h.num_layers - h.xsa_last_n)
        self.mlp = MLP(h)
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))
        # Damp deeper layers' inputs so the residual stream's growth does not swamp them.
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if h.ln_scale else 1.0
        self.parallel = layer >= h.parallel_residual_start

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None = None,
                lora: nn.Module | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        a = rms_norm(x_in) * self.norm_scale
        attn_out = self.attn_scale.to(x.dtype) * self.attn(a, cos, sin, cu_seqlens, lora)
        if self.parallel:
            return x_in + attn_out + self.mlp_scale.to(x.dtype) * self.mlp(a, lora)
        h = x_in + attn_out
        return h + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(h) * self.norm_scale, lora)


class LaneBlock(Block):
    """A block of the two-lane decoder (PARALLEL_LANES_START): its input and output are the two
    lanes stacked, (2, B, T, D). Attention reads lane 0 mixed with x0 by resid_mix, the MLP reads
    lane 1 alone, and lane k <- m[0, k] lane k + m[1, k] attention + m[2, k] MLP, with m (3, 2)
    this block's row of GPT.lane_mix: the residual is each lane itself, not the mix.
    PARALLEL_RESIDUAL_START's one-lane form does not apply to it."""

    def forward(self, lanes: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, lane_mix: Tensor,
                cu_seqlens: Tensor | None = None, lora: nn.Module | None = None) -> Tensor:
        dtype = lanes.dtype
        mix = self.resid_mix.to(dtype)
        a = rms_norm(mix[0] * lanes[0] + mix[1] * x0) * self.norm_scale
        attn_out = self.attn_scale.to(dtype) * self.attn(a, cos, sin, cu_seqlens, lora)
        mlp_out = self.mlp_scale.to(dtype) * self.mlp(rms_norm(lanes[1]) * self.norm_scale, lora)
        m = lane_mix.to(dtype)[..., None, None, None]  # (3, 2, 1, 1, 1): broadcast over (B, T, D)
        return m[0] * lanes + m[1] * attn_out + m[2] * mlp_out


class BigramHash(nn.Module):
    """Adds a learned embedding of the hashed (previous, current) token pair."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.buckets = h.bigram_vocab_size
        self.embed = nn.Embedding(h.bigram_vocab_size, h.bigram_dim)
        self.proj = CastedLinear(h.bigram_dim, h.model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, ids: Tensor) -> Tensor:
        m = self.buckets - 1
        t = ids.to(torch.int32)
        b = torch.empty_like(t)
        b[..., 0] = m  # position 0 has no previous token: a reserved bucket
        b[..., 1:] = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % m
        return b.long()

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(self.bucket_ids(ids))) * self.scale


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.h = h
        self.softcap = h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        self.bigram = BigramHash(h) if h.bigram_vocab_size > 0 else None
        if h.smear_gate:
            if h.smear_pre_norm:
                self.smear_embed_gate = CastedLinear(h.smear_gate_width, 1, zero_init=True)
            else:
                self.smear_gate = CastedLinear(h.smear_gate_width, 1, zero_init=True)
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        self.lanes = h.parallel_lanes_start  # first block of the two-lane decoder (0: none)
        self.blocks = nn.ModuleList((LaneBlock if self.lanes and i >= self.lanes else Block)(h, i)
                                    for i in range(h.num_layers))
        # Virtual layer order with depth recurrence: layers LOOP_START..LOOP_END run NUM_LOOPS+1 times.
        order = list(range(h.num_layers))
        if h.num_loops > 0:
            loop = list(range(h.loop_start, h.loop_end + 1))
            order = list(range(h.loop_start)) + loop * (h.num_loops + 1) + list(range(h.loop_end + 1, h.num_layers))
        self.encoder_indices, self.decoder_indices = order[: len(order) // 2], order[len(order) // 2:]
        self.plain_encoder_indices = list(range(h.num_layers // 2))
        self.plain_decoder_indices = list(range(h.num_layers // 2, h.num_layers))
        self.looping_active = False  # the training schedule turns it on at ENABLE_LOOPING_AT
        self.rope_bf16_inv_freq = False  # build_model sets it on CUDA, where the record rounds inv_freq
        num_skips = min(len(self.encoder_indices), len(self.decoder_indices))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, h.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, h.model_dim))
        if self.lanes:
            self.check_lane_order()
            # Per block (3, 2): how much each lane keeps of itself (init 1.1) and takes of the
            # attention and the MLP output (init 1). A row for every block, as the record that
            # introduced them keeps (its parameter count); only LaneBlocks read theirs.
            self.lane_mix = nn.Parameter(torch.cat((torch.full((h.num_layers, 1, 2), 1.1),
                                                    torch.ones(h.num_layers, 2, 2)), dim=1))
        self._init_weights()

    def check_lane_order(self) -> None:
        """The decoder runs as two lanes from its first LaneBlock to its end (forward_hidden): in
        both layer orders no encoder block may be one, nor a plain block follow one."""
        for encoder, decoder in ((self.encoder_indices, self.decoder_indices),
                                 (self.plain_encoder_indices, self.plain_decoder_indices)):
            in_lanes = [i >= self.lanes for i in decoder]
            if any(i >= self.lanes for i in encoder) or in_lanes != sorted(in_lanes):
                raise ValueError(f"PARALLEL_LANES_START={self.lanes}: the two lanes must run from their first block "
                                 f"to the end of the decoder, outside the encoder (encoder {encoder}, decoder {decoder})")

    def _init_weights(self) -> None:
        if self.tok_emb.weight.is_meta:
            return
        nn.init.normal_(self.tok_emb.weight, std=self.h.tied_embed_init_std)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
            nn.init.orthogonal_(self.bigram.proj.weight)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear) or name == "bigram.proj":
                continue
            if module.zero_init:
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)

    def forward_hidden(self, ids: Tensor, cu_seqlens: Tensor | None = None, lora: nn.Module | None = None) -> Tensor:
        """Final-norm hidden states (B, T, model_dim): the input of the tied head. With cu_seqlens
        (VARLEN=1) ids is one packed row whose documents attend only within themselves. `lora` (phased
        TTT) holds one adapter set per slot of the virtual layer order: a looped layer has one per pass."""
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids).to(x.dtype)
        if not self.h.smear_pre_norm:
            x = rms_norm(x)
        if self.h.smear_gate:
            # SmearGate: blend in the previous position's embedding, gated by the current one; on
            # the normed input (the record) or, with SMEAR_PRE_NORM=1, on the raw embedding.
            w = self.h.smear_gate_width
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(
                (self.smear_embed_gate if self.h.smear_pre_norm else self.smear_gate)(x[..., :w]))
            if self.h.smear_mask_bos:
                gate = gate * (ids != 1).unsqueeze(-1).to(gate.dtype)  # a document start takes nothing from the last one
            x = x + gate * F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.h.smear_pre_norm:
            x = rms_norm(x)
        x0 = x
        T = ids.size(1)
        # A packed row's positions are offsets in the row (relative phases within a document are
        # as if it stood alone) and never stretch the base: no segment exceeds TRAIN_SEQ_LEN.
        cos, sin = rotary_cos_sin(T, self.h.rope_dims, self.h.rope_base,
                                  T if self.h.varlen and cu_seqlens is not None else self.h.train_seq_len,
                                  x.device, x.dtype, self.rope_bf16_inv_freq)
        if self.looping_active:
            encoder, decoder = self.encoder_indices, self.decoder_indices
        else:
            encoder, decoder = self.plain_encoder_indices, self.plain_decoder_indices
        skips = []
        for i in encoder:  # phased TTT: slot len(skips)'s adapters (the blocks before are in skips)
            x = self.blocks[i](x, x0, cos, sin, cu_seqlens,
                               lora.slots[len(skips)] if self.h.phased_ttt_enabled and lora is not None else None)
            skips.append(x)
        lane1 = None  # the two-lane decoder's second lane once it has started; x is lane 0
        for j, i in enumerate(decoder):
            if self.lanes and i >= self.lanes and lane1 is None:
                lane1 = x  # both lanes start from x
            if j < self.skip_weights.size(0) and skips:  # U-Net skip; with two lanes, into lane 0 only
                k = self.skip_weights[j].to(x.dtype) * skips.pop()
                x = torch.lerp(k, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            slot = lora.slots[len(encoder) + j] if self.h.phased_ttt_enabled and lora is not None else None
            if self.lanes and lane1 is not None:
                x, lane1 = self.blocks[i](torch.stack((x, lane1)), x0, cos, sin, self.lane_mix[i], cu_seqlens,
                                          slot).unbind(0)
            else:
                x = self.blocks[i](x, x0, cos, sin, cu_seqlens, slot)
        if self.lanes and lane1 is not None:
            x = 0.5 * (x + lane1)  # the output is the lanes' mean
        return rms_norm(x)

    def loop_as_trained(self) -> GPT:
        """A trained or loaded model is calibrated and evaluated with looping on (if NUM_LOOPS > 0)."""
        self.looping_active = self.h.num_loops > 0
        return self

    def forward_logits(self, ids: Tensor, capped: bool = True, cu_seqlens: Tensor | None = None,
                       lora: nn.Module | None = None) -> Tensor:
        x = self.forward_hidden(ids, cu_seqlens, lora)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype))
        if self.h.phased_ttt_enabled and lora is not None:  # phased TTT's head adapter, before the soft cap
            logits = logits + lora.head(x)
        return self.softcap * torch.tanh(logits / self.softcap) if capped else logits

    def forward(self, ids: Tensor, targets: Tensor, reduction: str = "mean", cu_seqlens: Tensor | None = None,
                lora: nn.Module | None = None) -> Tensor:
        """Mean NLL in nats, or per-token NLL (fp32, shape of targets) with reduction='none'.
        Training, evaluation and both TTTs all call this one function (VARLEN=1 training with
        cu_seqlens, phased TTT with `lora`)."""
        if self.h.fused_ce:  # soft-cap and CE in one kernel: no capped or fp32 logits are written
            logits = self.forward_logits(ids, capped=False, cu_seqlens=cu_seqlens, lora=lora)
            losses = fused_softcap_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.softcap).view_as(targets)
        else:
            logits = self.forward_logits(ids, cu_seqlens=cu_seqlens, lora=lora).float()
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        return losses.mean() if reduction == "mean" else losses


def build_model(h: Hyperparameters, device, is_cuda: bool) -> GPT:
    model = GPT(h).to(device)
    if is_cuda:
        # The record casts the model to bf16 and restores fp32 for every linear and control
        # tensor, which leaves exactly the two embedding tables stored (and updated) in bf16,
        # and its rotary inv_freq buffer in bf16.
        model.tok_emb.weight.data = model.tok_emb.weight.data.bfloat16()
        if model.bigram is not None:
            model.bigram.embed.weight.data = model.bigram.embed.weight.data.bfloat16()
        model.rope_bf16_inv_freq = True
    return model


def load_into_model(model: nn.Module, state: dict, source: str) -> None:
    """Load a state dict with the record's key names; values take each parameter's dtype."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k != "logit_temp"}  # the record's unused buffer
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for k, target in own.items():
            v = state[k]
            if v.numel() != target.numel():
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(v.reshape(target.shape).to(target.dtype))


# -----------------------------------------------------------------------------
# OPTIMIZERS
#   Muon (MuonEq-R) for the block matrices plus bigram.proj and smear_gate; AdamW for the
#   token embedding and the control tensors. bigram.embed is in no group by default, as in
#   the record (it was meant for the token group and never added); BIGRAM_TRAIN_EMBED=1 adds it.
# -----------------------------------------------------------------------------


# `NS_SCHEDULES`, Newton-Schulz: the per-iteration (a, b, c); the last repeats. record: one
# quintic for every step. polar: the Polar Express coefficients for five steps (Amsel et al.
# 2025, arXiv:2505.16932) as the later records run them (#1855): on X / ||X||_F as the record's
# schedule, without the 2% norm margin modded-nanogpt divides by.
NS_SCHEDULES = {
    "record": ((3.4445, -4.7750, 2.0315),),
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


def zeropower_via_newtonschulz5(G: Tensor, steps: int, coeffs: tuple = NS_SCHEDULES["record"]) -> Tensor:
    """Approximately orthogonalise G with a quintic Newton-Schulz iteration: bf16 on GPU as the
    record; fp32 on CPU, where bf16 matmuls are emulated and several times slower."""
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm() + 1e-7)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> row L2 normalisation -> Newton-Schulz -> decoupled weight decay.

    Parameter i is orthogonalised on rank i % world_size; the flat update is then summed
    across ranks so every rank applies the same update.
    """

    momentum_dtype = torch.float32  # of the gradient in the momentum step: Muon's matrices are fp32 everywhere

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_normalize: bool, nesterov: bool = True, orthogonalize=zeropower_via_newtonschulz5,
                 ns_schedule: tuple = NS_SCHEDULES["record"], runtime: Runtime | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_normalize=row_normalize, nesterov=nesterov))
        # None of these is in the groups, so optimizer state dicts stay plain data. No runtime: one process.
        self.orthogonalize, self.ns_schedule, self.runtime = orthogonalize, ns_schedule, runtime

    @torch.no_grad()
    def step(self):
        world, rank = (self.runtime.world_size, self.runtime.rank) if self.runtime else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            # bf16 on GPU halves the all-reduce; gloo has no bf16 sum, so CPU uses fp32.
            flat_dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=flat_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    g = p.grad.to(self.momentum_dtype)
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if group["row_normalize"]:
                        g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
                    g = self.orthogonalize(g, group["backend_steps"], self.ns_schedule)
                    g = g * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    flat[offset: offset + p.numel()] = g.flatten().to(flat_dtype)
                offset += p.numel()
            if self.runtime:
                self.runtime.all_reduce(flat)
            offset = 0
            for p in params:
                update = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                offset += p.numel()


class Bf16MomentumMuon(Muon):
    """MUON_BF16_MOMENTUM=1: the gradient is cast to bf16 first, so the momentum buffer, the
    Nesterov update and the row normalisation are bf16 (Newton-Schulz is bf16 on GPU anyway; on
    CPU it computes in fp32 from the bf16 input)."""

    momentum_dtype = torch.bfloat16


def split_params(model: GPT, h: Hyperparameters):
    matrix, scalar, token = [], [], [model.tok_emb.weight]
    for name, p in model.named_parameters():
        group = (tensor_role(name) or ("matrix" if p.ndim == 2 else None,))[0]
        if group == "bigram_embed":
            if h.bigram_train_embed:
                token.append(p)
        elif group == "control":
            scalar.append(p)
        elif group == "matrix":
            matrix.append(p)
        elif group != "token":
            raise ValueError(f"parameter {name} {tuple(p.shape)} has no optimizer group")
    return matrix, scalar, token


def build_optimizers(model: GPT, h: Hyperparameters, is_cuda: bool, compile: bool = False,
                     runtime: Runtime | None = None) -> list[torch.optim.Optimizer]:
    matrix, scalar, token = split_params(model, h)
    # Compiled on CUDA as the record: a few fused kernels per matrix instead of ~40, and the fused
    # element-wise steps keep fp32 inside where eager rounds every intermediate to bf16.
    orthogonalize = torch.compile(zeropower_via_newtonschulz5) if is_cuda and compile else zeropower_via_newtonschulz5
    adam = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=is_cuda)
    optimizers = [
        torch.optim.AdamW([dict(params=token, lr=h.tied_embed_lr, base_lr=h.tied_embed_lr)],
                          weight_decay=h.embed_wd, **adam),
        torch.optim.AdamW([dict(params=scalar, lr=h.scalar_lr, base_lr=h.scalar_lr)], weight_decay=h.adam_wd, **adam),
        (Bf16MomentumMuon if h.muon_bf16_momentum else Muon)(
            [dict(params=matrix, lr=h.matrix_lr, base_lr=h.matrix_lr)], lr=h.matrix_lr, momentum=h.muon_momentum,
            backend_steps=h.muon_backend_steps, weight_decay=h.muon_wd, row_normalize=h.muon_row_normalize,
            orthogonalize=orthogonalize, ns_schedule=NS_SCHEDULES[h.muon_ns_coeffs], runtime=runtime),
    ]
    return optimizers


# -----------------------------------------------------------------------------
# TRAINING
#   The schedule runs on wall-clock time: frac = elapsed / (MAX_WALLCLOCK_SECONDS -
#   GPTQ_RESERVE_SECONDS), so warmdown and looping start at the same fraction of the budget
#   whatever the hardware's speed. The rule is training plus GPTQ calibration within the
#   limit: by default the reserve is one calibration batch timed before the clock starts,
#   times GPTQ_CALIBRATION_BATCHES, plus a margin, and training stops before a step that
#   would cross the cap. GPTQ_RESERVE_SECONDS=12 is the record's fixed reserve and stop rule.
# -----------------------------------------------------------------------------

RESERVE_MARGIN = 1.25


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    if frac >= 1.0 - warmdown_frac:
        return max((1.0 - frac) / warmdown_frac, min_lr)
    return 1.0


def training_budget_ms(h: Hyperparameters, reserve_s: float | None = None) -> float | None:
    """Training time the wall-clock rule leaves: MAX_WALLCLOCK_SECONDS less the GPTQ calibration
    reserve (GPTQ_RESERVE_SECONDS unless a measured one is given); None without a limit."""
    if h.max_wallclock_seconds <= 0:
        return None
    reserve_s = h.gptq_reserve_seconds if reserve_s is None else reserve_s
    return 1000.0 * (h.max_wallclock_seconds - reserve_s)


def training_frac(h: Hyperparameters, step: int, elapsed_ms: float, reserve_s: float | None = None) -> float:
    budget_ms = training_budget_ms(h, reserve_s)
    return step / max(h.iterations, 1) if budget_ms is None else elapsed_ms / budget_ms


class Trainer:
    """One optimisation step = GRAD_ACCUM_STEPS micro-batches, clip, schedule, step, EMA."""

    def __init__(self, h: Hyperparameters, rt: Runtime, model: GPT):
        self.h, self.rt, self.model = h, rt, model
        self.optimizers = build_optimizers(model, h, rt.is_cuda, rt.compile, rt)
        self.muon = self.optimizers[-1]
        # The bare model is kept for saving and quantizing; `compiled` for evaluation; `fwd` trains.
        self.compiled = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
        self.fwd = self.compiled
        # GRAD_CLIP_PER_RANK=1 trains without DDP: each rank's gradients stay its own until clipped,
        # then step() averages them. Every rank builds the same initialisation from SEED, which
        # DDP would otherwise broadcast from rank 0.
        if rt.distributed and not h.grad_clip_per_rank:
            self.fwd = nn.parallel.DistributedDataParallel(
                self.compiled, device_ids=[rt.device.index] if rt.is_cuda else None, broadcast_buffers=False)
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def step(self, loader: ShuffledSequenceLoader, step: int, lr_scale: float) -> Tensor:
        h, rt = self.h, self.rt
        total = torch.zeros((), device=rt.device)
        for micro in range(rt.grad_accum_steps):
            x, y, *cu_seqlens = loader.next_batch(rt.micro_batch_seqs)  # VARLEN=1: and cu_seqlens
            x, y = rt.to_device(x), rt.to_device(y)
            if rt.distributed and not h.grad_clip_per_rank:
                self.fwd.require_backward_grad_sync = micro == rt.grad_accum_steps - 1
            with rt.autocast():
                loss = self.fwd(x, y, cu_seqlens=rt.to_device(cu_seqlens[0])) if h.varlen else self.fwd(x, y)
            (loss / rt.grad_accum_steps).backward()
            total += loss.detach()
        warm = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
        for group in self.muon.param_groups:
            group["momentum"] = (1 - warm) * h.muon_momentum_warmup_start + warm * h.muon_momentum
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if h.grad_clip_norm > 0:
            # Over every parameter, bigram.embed's stray gradient included, as the record.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.grad_clip_norm)
        if h.grad_clip_per_rank and rt.distributed:
            rt.average_gradients(list(self.model.parameters()))  # the mean of the ranks' clipped gradients
        for opt in self.optimizers:
            opt.step()
        # Only the optimizers zero their own gradients: bigram.embed's keeps accumulating (record quirk).
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total / rt.grad_accum_steps

    @torch.no_grad()
    def update_ema(self) -> None:
        d = self.h.ema_decay
        for k, v in self.model.state_dict().items():
            self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def snapshot(self):
        return (copy.deepcopy(self.model.state_dict()), [copy.deepcopy(o.state_dict()) for o in self.optimizers])

    def restore(self, snap) -> None:
        model_state, opt_states = snap
        self.model.load_state_dict(model_state)
        for opt, s in zip(self.optimizers, opt_states):
            opt.load_state_dict(s)
        # As the record: only the optimizers clear their gradients, so bigram.embed carries the
        # warm-up's stray gradient into the first clip norms of the timed run.
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.ema = {k: v.detach().float().clone() for k, v in self.model.state_dict().items()}


def warm_up(h: Hyperparameters, trainer: Trainer, loader: ShuffledSequenceLoader) -> None:
    """Run real steps (both graphs, looping off and on) so compilation and allocator warm-up
    happen outside the timed budget, then put weights and optimizer state back."""
    if h.warmup_steps <= 0:
        return
    snap = trainer.snapshot()
    phases = [False, True] if h.num_loops > 0 else [False]
    for looping in phases:
        trainer.model.looping_active = looping
        if h.varlen and trainer.rt.compile:
            compile_varlen_lengths(h, trainer, loader)
        for s in range(h.warmup_steps):
            trainer.step(loader, s, 1.0)
    trainer.model.looping_active = False
    trainer.restore(snap)
    trainer.rt.synchronize()


VARLEN_WARM_LENGTHS = 4  # cu_seqlens lengths compiled before the clock: 64, 128, 192, 256 entries


def compile_varlen_lengths(h: Hyperparameters, trainer: Trainer, loader: DocumentPackedLoader) -> None:
    """VARLEN=1, compiled: a cu_seqlens length first met in the timed run would compile a graph there.
    Run forward and backward once at each of the first VARLEN_WARM_LENGTHS padded lengths (a row of
    the record's 98,304 tokens holds ~100-200 segments), segments every TRAIN_SEQ_LEN tokens, then
    drop the gradients; warm_up() restores the rest."""
    rt = trainer.rt
    x, y, _ = (rt.to_device(t) for t in loader.next_batch(rt.micro_batch_seqs))
    fewest = packed_cu_seqlens([], x.size(1), h.train_seq_len)  # no row has fewer segments
    for length in range(fewest.numel(), VARLEN_WARM_LENGTHS * VARLEN_CU_BUCKET + 1, VARLEN_CU_BUCKET):
        cu = F.pad(fewest, (0, length - fewest.numel()), value=x.size(1))
        with rt.autocast():
            loss = trainer.fwd(x, y, cu_seqlens=rt.to_device(cu))
        loss.backward()
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)


def calibration_reserve_seconds(h: Hyperparameters, rt: Runtime, model: GPT, log: Logger) -> float:
    """Time one GPTQ calibration batch as quantize_and_save() will run it (looping on, this
    rank's training shards), before the clock starts; every rank takes the slowest rank's time."""
    looping = model.looping_active
    model.loop_as_trained()
    loader = ShuffledSequenceLoader(h.train_files, h.train_seq_len, rt.rank, rt.world_size)
    rt.synchronize()
    t0 = time.perf_counter()
    collect_hessians(model, loader, 1, rt.micro_batch_seqs, rt)
    rt.synchronize()
    per_batch = rt.all_reduce(torch.tensor([time.perf_counter() - t0], device=rt.device), dist.ReduceOp.MAX).item()
    model.looping_active = looping
    model.train()
    reserve = RESERVE_MARGIN * per_batch * h.gptq_calibration_batches
    log(f"gptq_reserve:auto calibration_batch:{1000 * per_batch:.0f}ms x {h.gptq_calibration_batches} batches "
        f"x {RESERVE_MARGIN} margin = {1000 * reserve:.0f}ms")
    if reserve >= h.max_wallclock_seconds:
        raise ValueError(f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} leaves no training time: GPTQ calibration "
                         f"({h.gptq_calibration_batches} batches) needs about {reserve:.1f}s here")
    return reserve


def train(h: Hyperparameters, rt: Runtime, model: GPT, val_tokens: Tensor, luts, log: Logger) -> Trainer:
    loader = (DocumentPackedLoader if h.varlen else ShuffledSequenceLoader)(
        h.train_files, h.train_seq_len, rt.rank, rt.world_size, h.vocab_size)
    trainer = Trainer(h, rt, model)
    warm_up(h, trainer, loader)
    # Training starts the stream afresh: it draws the warm-up's batches again. The packed loader
    # opens each shard only when the stream reaches it, so it checks the ids as it goes.
    loader = (DocumentPackedLoader if h.varlen else ShuffledSequenceLoader)(
        h.train_files, h.train_seq_len, rt.rank, rt.world_size, h.vocab_size if h.varlen else None)
    tokens_per_step = rt.micro_batch_seqs * h.train_seq_len * rt.grad_accum_steps * rt.world_size
    reserve_s, cap_ms = h.gptq_reserve_seconds, None
    if h.max_wallclock_seconds > 0:
        if reserve_s is None:
            reserve_s = calibration_reserve_seconds(h, rt, model, log)
        cap_ms = training_budget_ms(h, reserve_s)
    # The record stops after the step that crosses the cap; the measured reserve stops before it.
    predictive = h.gptq_reserve_seconds is None
    training_ms, stop_after, step = 0.0, None, 0
    rt.synchronize()
    t0 = time.perf_counter()
    while True:
        last = step == h.iterations or (stop_after is not None and step >= stop_after)
        if last or (h.val_loss_every > 0 and step % h.val_loss_every == 0):
            rt.synchronize()
            training_ms += 1000.0 * (time.perf_counter() - t0)
            if last:
                save_final_model(model, trainer.ema, rt, log)  # on disk before anything evaluates
            val_loss, val_bpb, _ = evaluate_plain(h, rt, trainer.compiled, val_tokens, luts)
            log(f"{step}/{h.iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}")
            rt.synchronize()
            t0 = time.perf_counter()
        if last:
            break
        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        frac = training_frac(h, step, elapsed_ms, reserve_s)
        if h.num_loops > 0 and not model.looping_active and frac >= h.enable_looping_at:
            model.looping_active = True
            log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{model.encoder_indices} "
                f"decoder:{model.decoder_indices}")
        loss = trainer.step(loader, step, lr_multiplier(frac, h.warmdown_frac, h.min_lr))
        trainer.update_ema()
        step += 1
        approx_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        step_ms = approx_ms - elapsed_ms
        # One small all-reduce per step: every rank stops at the same step, and a NaN anywhere stops all.
        over = cap_ms is not None and approx_ms + (step_ms if predictive else 0.0) >= cap_ms
        flags = torch.stack([torch.tensor(float(over), device=rt.device),
                             (~torch.isfinite(loss)).float()])
        cap_hit, nonfinite = rt.all_reduce(flags, dist.ReduceOp.MAX).tolist()
        if nonfinite:
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}; stopping (try a lower lr)")
        if step <= 10 or (h.train_log_every > 0 and step % h.train_log_every == 0) or step == h.iterations:
            log(f"{step}/{h.iterations} train_loss: {loss.item():.4f} train_time: {approx_ms / 60000:.1f}m "
                f"tok/s: {tokens_per_step * step / (approx_ms / 1000):.0f}")
        if stop_after is None and cap_hit:
            stop_after = step
            log(f"stopping_early: wallclock_cap train_time:{approx_ms:.0f}ms step:{step}/{h.iterations}")
    log(f"train_done steps:{step} train_time:{training_ms:.0f}ms")
    trainer.training_ms = training_ms
    if rt.is_cuda:
        log(f"peak_memory_allocated:{torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved:{torch.cuda.max_memory_reserved() // 2**20} MiB")
    # The model that ships is the EMA of the weights, not the last iterate.
    load_into_model(model, trainer.ema, "EMA")
    log_weights_checksum(model, rt, log)
    return trainer


def save_final_model(model: GPT, ema: dict, rt: Runtime, log: Logger) -> None:
    """final_model.pt: the EMA weights in the model's dtypes, written the moment training ends,
    so a crash in any evaluation after it never loses a finished run."""
    if rt.is_main:
        state = {k: ema[k].reshape(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
        atomic_write("final_model.pt", torch_bytes(state))
        log(f"Serialized model: {os.path.getsize('final_model.pt')} bytes (final_model.pt, EMA weights)")


def log_weights_checksum(model: nn.Module, rt: Runtime, log: Logger) -> None:
    """Every rank hashes its weights; rank 0 logs them all, so a silent divergence between
    ranks (a missed all-reduce) shows in the log."""
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "big")], dtype=torch.int64, device=rt.device)
    values = [f"{int(t.item()):014x}" for t in rt.all_gather(mine)]
    log(f"weights_checksum:{values[0]} ranks:{','.join(values)} ranks_agree:{int(len(set(values)) == 1)}")


# -----------------------------------------------------------------------------
# QUANTIZATION
#   Full-Hessian GPTQ with SDClip for the big matrices (int6) and the tied embedding (int8,
#   Hessian of the final-norm output it multiplies); Path A v3 for the small tensors: int8
#   with a per-tensor or per-row scale, fp16 for the rest (SPEC §5).
# -----------------------------------------------------------------------------

BIGRAM_EMBED_RANGE = 31  # int6 per row whatever MATRIX_BITS: the record's own rule for it (SPEC §5)
# `BLOB_LABELS`: the method labels the record writes into the blob's 'm' (its GPTQ labels carry the bit width).
BLOB_LABELS = {"int6_row": "simple int6 (bigram embed)", "int8_row": "simple int8 (small matrix)",
               "int8_tensor": "pertensor int8 (control)", "fp16": "passthrough (float16)"}


def quant_category(name: str, t: Tensor) -> str:
    """Quantization method of one state-dict tensor. The record decides GPTQ by size (> 65,536
    values); this rule names the matrices instead, which agrees on the full config and also
    quantizes the smaller block matrices of small configs (the record keeps those fp16)."""
    role = tensor_role(name)
    if role:
        return role[1]
    if t.numel() > 65536:
        raise ValueError(f"{name} {tuple(t.shape)} has {t.numel()} values but no quantization rule")
    return "fp16"


def small_fp16_category(name: str, cat: str) -> str:
    """SMALL_FP16=1: the small tensors Path A v3 stores as int8 stay fp16, as the frontier record
    keeps them, except the attention gates (the per-row int8 tensors inside `attn.`: the sparse gate,
    the output gate), which keep int8 per row with fp16 scales."""
    if cat == "int8_tensor" or (cat == "int8_row" and ".attn." not in name):
        return "fp16"
    return cat


def blob_label(cat: str, h: Hyperparameters) -> str:
    if cat == "gptq_int6":
        return f"gptq (int{h.matrix_bits})"
    if cat == "gptq_int8":
        return f"gptq (int{h.embed_bits})"
    return BLOB_LABELS[cat]


def clip_sigmas_for(name: str, h: Hyperparameters) -> float:
    """SDClip width of one GPTQ tensor: the embedding's, or the attention/MLP family's when set,
    else the record's single MATRIX_CLIP_SIGMAS."""
    family = tensor_role(name)[2]
    if family == "embed":
        return h.embed_clip_sigmas
    if family == "attn" and h.attn_clip_sigmas is not None:
        return h.attn_clip_sigmas
    if family == "mlp" and h.mlp_clip_sigmas is not None:
        return h.mlp_clip_sigmas
    return h.matrix_clip_sigmas


@torch.no_grad()
def collect_hessians(model: GPT, loader: ShuffledSequenceLoader, batches: int, rows: int, rt: Runtime,
                     all_ranks: bool = False) -> dict:
    """H = sum(X^T X) / n for the input X of every GPTQ matrix, and of the final-norm output
    for the tied embedding, over TRAINING batches only. A looped layer accumulates every pass.
    all_ranks: sum X^T X and n over the ranks (every rank must call it); else this rank's own."""
    hessians, counts, hooks = {}, {}, []

    def accumulate(key: str, x: Tensor) -> None:
        x = x.detach().float().reshape(-1, x.size(-1))
        if key not in hessians:
            hessians[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
            counts[key] = 0
        hessians[key].addmm_(x.T, x)
        counts[key] += x.size(0)

    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and (tensor_role(f"{name}.weight") or "?")[1] == "gptq_int6":
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, key=f"{name}.weight": accumulate(key, args[0])))
    model.eval()
    try:
        for _ in range(batches):
            x, _ = loader.next_batch(rows)
            with rt.autocast():
                accumulate("tok_emb.weight", model.forward_hidden(rt.to_device(x)))
    finally:
        for hook in hooks:
            hook.remove()
    for key in sorted(hessians):
        H, n = hessians[key], torch.tensor(float(counts[key]), device=hessians[key].device)
        if all_ranks:
            H, n = rt.all_reduce(H), rt.all_reduce(n)
        hessians[key] = (H / n).cpu()
    return hessians


def sdclip_scale(w: Tensor, clip_sigmas: float, clip_range: int) -> Tensor:
    """Per-row scale from the row's standard deviation, so an outlier cannot stretch the grid."""
    return (clip_sigmas * w.float().std(dim=1) / clip_range).clamp_min(1e-6).half()


def gptq_quantize_weight(w: Tensor, H: Tensor, clip_sigmas: float, clip_range: int,
                         block_size: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ: quantize columns in order of decreasing Hessian diagonal, pushing each column's
    rounding error onto the columns not yet quantized. Returns (q int8, scale fp16 per row)."""
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    scale = sdclip_scale(W, clip_sigmas, clip_range)
    s = scale.float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(0.01 * torch.diag(H).mean())
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s), -clip_range, clip_range)
            Q[:, i1 + i] = q.to(torch.int8)
            err = (col - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], scale


def quantize_per_row(w: Tensor, clip_range: int) -> tuple[Tensor, Tensor]:
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / clip_range).clamp_min(1e-6).half()
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -clip_range, clip_range).to(torch.int8)
    return q, scale


def quantize_per_tensor(w: Tensor) -> tuple[Tensor, Tensor]:
    w = w.detach().float()
    scale = (w.abs().max() / 127).clamp_min(1e-12)
    return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8), scale


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes < 2**bits along the last dim -> uint8, 8 // bits codes per byte."""
    per = 8 // bits
    n = codes.size(-1)
    padded = F.pad(codes.to(torch.int32), (0, -n % per)).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def lqer_dequantize(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, rows: int, cols: int) -> Tensor:
    """A (INT2 codes 0..3 = -1.5..1.5 steps of one scale) @ B (INT4 codes 0..14 = -7..7 steps
    of one fp16 scale per group of the row)."""
    rank = b.size(0)
    A = (unpack_bits(a, 2, rank).float() - 1.5) * a_scale.float()
    # B's codes are stored padded to whole groups (plus at most one code to fill a byte), so
    # the group width is the stored width over the number of scales, rounded down.
    group = 2 * b.size(1) // b_scale.size(1)
    B = (unpack_bits(b, 4, 2 * b.size(1)).float() - 7)[:, :cols]
    B = B * b_scale.float().repeat_interleave(group, dim=1)[:, :cols]
    return A.reshape(rows, rank) @ B


def lqer_factors(E: Tensor, rank: int, group: int) -> dict | None:
    """Rank-r correction of the GPTQ error E = W - dequant(Q): A = U_r S_r as INT2 with one
    fp16 scale, B = V_r^T as INT4 with an fp16 scale per `group` values. The scale of A is the
    candidate with the smallest remaining error; None when no candidate beats no correction."""
    rows, cols = E.shape
    rank, group = min(rank, rows, cols), min(group, cols)
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    A, B = U[:, :rank] * S[:rank], Vh[:rank]
    pad = -cols % group
    Bg = F.pad(B, (0, pad)).reshape(rank, -1, group)
    b_scale = (Bg.abs().amax(-1) / 7).clamp_min(1e-8).half()
    b_codes = (torch.clamp(torch.round(Bg / b_scale.float()[..., None]), -7, 7) + 7).reshape(rank, -1)
    b = pack_bits(b_codes.to(torch.uint8), 4)
    best, best_err = None, E.float().norm().item()
    for k in torch.linspace(0.4, 2.0, 17).tolist():
        a_scale = (A.std() * k).clamp_min(1e-8).half()
        a_codes = torch.clamp(torch.floor(A / a_scale.float()) + 2, 0, 3).to(torch.uint8)
        a = pack_bits(a_codes, 2)
        err = (E.float() - lqer_dequantize(a, a_scale, b, b_scale, rows, cols)).norm().item()
        if err < best_err:
            best, best_err = {"lqer_a": a, "lqer_a_scale": a_scale, "lqer_b": b, "lqer_b_scale": b_scale}, err
    return best


def lqer_asym_factors(E: Tensor, rank: int, group: int) -> dict:
    """LQER_FORM=asym: rank-r correction of the GPTQ error E in int8 codes, stored unpacked (the
    compressor sees whole bytes): A = U_r S_r as clamp(round(A / s_A), -2, 1) with one fp16
    s_A = max|A| / 1.5; B = V_r^T as clamp(round(B / s), -8, 7) with an fp16 s = max|B_g| / 7.5 per
    `group` values of a row. Both grids are asymmetric (one more negative level). A row of B whose
    width is not a multiple of `group` is stored padded to whole groups (the full config's never is)."""
    rows, cols = E.shape
    rank, group = min(rank, rows, cols), min(group, cols)
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    A, B = U[:, :rank] * S[:rank], Vh[:rank]
    # The floors only keep an all-zero factor's scale above fp16's underflow; real factors never reach them.
    a_scale = (A.abs().max() / 1.5).clamp_min(1e-6).half()
    a = torch.clamp(torch.round(A / a_scale.float()), -2, 1).to(torch.int8)
    Bg = F.pad(B, (0, -cols % group)).reshape(rank, -1, group)
    b_scale = (Bg.abs().amax(-1) / 7.5).clamp_min(1e-6).half()
    b = torch.clamp(torch.round(Bg / b_scale.float()[..., None]), -8, 7).to(torch.int8).reshape(rank, -1)
    return {"lqer_a": a, "lqer_a_scale": a_scale, "lqer_b": b, "lqer_b_scale": b_scale}


def lqer_asym_dequantize(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, cols: int) -> Tensor:
    """A (int8 codes times one scale) @ B (int8 codes times one scale per group of a row), cropped to
    the matrix's width; the group width is the stored width over the number of scales."""
    group = b.size(1) // b_scale.size(1)
    B = b.float() * b_scale.float().repeat_interleave(group, dim=1)
    return (a.float() * a_scale.float()) @ B[:, :cols]


def lqer_correction(w: dict, name: str, shape: torch.Size, lqer_form: str | None) -> Tensor:
    """The LQER term of one tensor of the blob. Both forms use the same four keys; the codes' dtype
    tells them apart (packed: uint8, asym: int8). lqer_form: the run's LQER_FORM, which must be the
    blob's (a packed file holds only its preset's reader); None reads either."""
    a, a_scale, b, b_scale = (w[f"{name}.{k}"] for k in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale"))
    found = "asym" if a.dtype == torch.int8 else "packed"
    if lqer_form is not None and found != lqer_form:
        raise ValueError(f"{name}: the blob's LQER corrections are in the {found} form, but this run has "
                         f"LQER_FORM={lqer_form}: set LQER_FORM={found} to read it")
    if (lqer_form or found) == "asym":
        return lqer_asym_dequantize(a, a_scale, b, b_scale, shape[1])
    return lqer_dequantize(a, a_scale, b, b_scale, *shape)


def apply_lqer(w: dict, state: dict, gptq_names: list[str], h: Hyperparameters) -> list[str]:
    """Add the LQER factors of the LQER_TOP_K GPTQ tensors with the largest Frobenius error to
    the blob dict; returns the names corrected."""
    errors = {}
    for name in gptq_names:
        q, scale = w[name + ".q"].float(), w[name + ".scale"].float()
        errors[name] = state[name].detach().float().cpu() - q * scale[:, None]
    corrected = []
    for name in sorted(errors, key=lambda n: -errors[n].norm().item())[:h.lqer_top_k]:
        if h.lqer_form == "asym":  # always applied, as the frontier record does
            factors = lqer_asym_factors(errors[name], h.lqer_rank, h.lqer_group)
        else:
            factors = lqer_factors(errors[name], h.lqer_rank, h.lqer_group)
        if factors is not None:
            w.update({f"{name}.{k}": v for k, v in factors.items()})
            corrected.append(name)
    return corrected


def quantize_state_dict(state: dict, hessians: dict, h: Hyperparameters) -> tuple[dict, dict]:
    """Whole state dict -> (tensors, {name: method label}) in the record's blob layout:
    GPTQ and per-row int8 as '<name>.q' int8 + '<name>.scale' fp16 per row, per-tensor int8 as
    '<name>.q_pt' int8 + '<name>.scale_pt' fp32 0-dim, passthrough as '<name>' fp16. LQER adds
    '<name>.lqer_a/_a_scale/_b/_b_scale' to the GPTQ tensors it corrects."""
    w, m, gptq_names = {}, {}, []
    matrix_range, embed_range = 2 ** (h.matrix_bits - 1) - 1, 2 ** (h.embed_bits - 1) - 1
    for name, t in state.items():
        cat = quant_category(name, t)
        if h.small_fp16:
            cat = small_fp16_category(name, cat)
        t = t.detach().cpu()
        m[name] = blob_label(cat, h)
        if cat in ("gptq_int6", "gptq_int8"):
            if name not in hessians:
                raise ValueError(f"no Hessian was collected for {name}")
            rng = matrix_range if cat == "gptq_int6" else embed_range
            w[name + ".q"], w[name + ".scale"] = gptq_quantize_weight(t, hessians[name], clip_sigmas_for(name, h), rng)
            gptq_names.append(name)
        elif cat == "int6_row":
            w[name + ".q"], w[name + ".scale"] = quantize_per_row(t, BIGRAM_EMBED_RANGE)
        elif cat == "int8_row":
            w[name + ".q"], w[name + ".scale"] = quantize_per_row(t.reshape(t.size(0), -1), 127)
        elif cat == "int8_tensor":
            w[name + ".q_pt"], w[name + ".scale_pt"] = quantize_per_tensor(t)
        else:
            w[name] = t.half()
    if h.lqer_top_k:
        apply_lqer(w, state, gptq_names, h)
    return w, m


def dequantize_state_dict(w: dict, m: dict, lqer: bool = True, lqer_form: str | None = None) -> dict:
    """Inverse of quantize_state_dict, driven by the keys present rather than the labels, so the
    record's blobs read too (including its fp16 block matrices of small configs). lqer=False: a run
    without LQER, which refuses a blob carrying corrections rather than dropping them; lqer_form:
    the run's LQER_FORM, the one form it reads (None: either; lqer_correction)."""
    if not lqer and any(k.endswith(".lqer_a") for k in w):
        raise ValueError("the blob carries LQER corrections, but this run has LQER_TOP_K=0: set LQER_TOP_K to read it")
    out = {}
    for name in m:
        if name + ".q_pt" in w:
            out[name] = w[name + ".q_pt"].float() * w[name + ".scale_pt"].float().reshape(())
        elif name + ".q" in w:
            q, scale = w[name + ".q"].float(), w[name + ".scale"].float()
            if scale.numel() == 1:  # a per-tensor scale under '.scale' (earlier blobs of this code)
                out[name] = q * scale.reshape(())
            else:
                out[name] = q * scale.reshape(-1, *([1] * (q.ndim - 1)))
            if lqer and name + ".lqer_a" in w:
                out[name] = out[name] + lqer_correction(w, name, q.shape, lqer_form)
        elif name in w:
            out[name] = w[name].float()
        else:
            raise ValueError(f"the blob labels {name!r} {m[name]!r} but holds neither {name}, {name}.q nor {name}.q_pt")
    return out


def category_table(w: dict, m: dict) -> list[str]:
    counts: dict[str, list[int]] = {}
    for name, label in m.items():
        t = next(w[k] for k in (name, name + ".q", name + ".q_pt") if k in w)
        c = counts.setdefault(label, [0, 0])
        c[0] += 1
        c[1] += t.numel()
    lines = [f"quant_category:{label} tensors:{c[0]} values:{c[1]}" for label, c in sorted(counts.items())]
    lqer = sorted(k[:-len(".lqer_a")] for k in w if k.endswith(".lqer_a"))
    if lqer:
        lqer_bytes = sum(w[f"{n}.{k}"].numel() * w[f"{n}.{k}"].element_size() for n in lqer
                         for k in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale"))
        lines.append(f"lqer:corrected {len(lqer)} tensors ({' '.join(lqer)}) raw_bytes:{lqer_bytes}")
    return lines


# `PROJECTION_*`: bytes per stored value, for the size projection a run logs before training. A GPTQ code of
# clip range R and width c sigmas is nearly a rounded Gaussian of standard deviation R/c, so its
# cost is that distribution's entropy times the compressor's overhead over it. Measured on the
# trained cpu_small seed-1 artifact, one stream per family (README): the block-matrix codes cost
# 1.016x their Gaussian entropy, an fp16 row scale 0.93 bytes; a trained bigram table's int6
# codes 0.67-0.78 bytes a value (the BIGRAM_TRAIN_EMBED=1 runs; the upper end is taken). With
# these the record's own config projects 0.3% above its 15,973,106-byte blob.
PROJECTION_CODE_OVERHEAD = 1.016  # compressed GPTQ codes / their Gaussian entropy
PROJECTION_ROW_SCALE_BYTES = 0.93  # one fp16 per-row scale, compressed
PROJECTION_TRAINED_BIGRAM_BYTES = 0.78  # int6 per-row code of a trained bigram table
PROJECTION_SMALL_INT8_BYTES = 1.0  # per-tensor and per-row int8 codes: taken at their raw size
# COMPRESSOR=pergroup, measured on the trained cpu_small seed-1 weights (logs/cpu_quant_small_seed1_fq.json): the
# lrzip streams of the block matrices cost 1.001-1.002x their codes' Gaussian entropy (the embedding's 0.64x, a
# trait of that small model, is not counted on); the stored row orders 1.51 bytes a row, taken at their raw 2.
PROJECTION_PERGROUP_CODE_OVERHEAD = 1.002  # lrzip streams of GPTQ codes / their Gaussian entropy
PROJECTION_ROW_ORDER_BYTES = 2.0  # one uint16 row index of a PERGROUP_SORTED matrix


def gaussian_code_bits(clip_range: int, clip_sigmas: float) -> float:
    """Entropy in bits of clamp(round(z * R / c), -R, R) for z ~ N(0, 1)."""
    sd = clip_range / clip_sigmas

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / (sd * math.sqrt(2))))

    bits = 0.0
    for k in range(-clip_range, clip_range + 1):
        p = (1.0 if k == clip_range else cdf(k + 0.5)) - (0.0 if k == -clip_range else cdf(k - 0.5))
        if p > 0:
            bits -= p * math.log2(p)
    return bits


def projected_model_bytes(state: dict, h: Hyperparameters) -> dict[str, int]:
    """Projected compressed bytes of the quantized model by category, from the parameter
    counts and the bytes per value above (shapes only: works on a meta-device state dict)."""
    out: dict[str, float] = {}
    gptq = []
    for name, t in state.items():
        cat = quant_category(name, t)
        if h.small_fp16:
            cat = small_fp16_category(name, cat)
        if cat in ("gptq_int6", "gptq_int8"):
            bits = h.matrix_bits if cat == "gptq_int6" else h.embed_bits
            code = gaussian_code_bits(2 ** (bits - 1) - 1, clip_sigmas_for(name, h)) / 8 * (
                PROJECTION_PERGROUP_CODE_OVERHEAD if h.compressor == "pergroup" else PROJECTION_CODE_OVERHEAD)
            n = t.numel() * code + t.shape[0] * PROJECTION_ROW_SCALE_BYTES
            gptq.append((t.numel(), t.shape))
        elif cat == "int6_row":  # untrained (the record's quirk) it is all zeros and costs ~nothing
            n = t.numel() * PROJECTION_TRAINED_BIGRAM_BYTES + t.shape[0] * PROJECTION_ROW_SCALE_BYTES if h.bigram_train_embed else 0
        elif cat in ("int8_row", "int8_tensor"):
            n = t.numel() * PROJECTION_SMALL_INT8_BYTES
        else:
            n = 2 * t.numel()
        label = blob_label(cat, h)
        out[label] = out.get(label, 0) + n
    # Which tensors LQER picks is known only after GPTQ: count the largest. LQER_FORM=asym stores the
    # same number of codes unpacked in int8 (4 and 16 levels): compressed, at most this packed width.
    if h.lqer_top_k:
        out["lqer"] = 0
        for _, (rows, cols) in sorted(gptq, key=lambda x: -x[0])[:h.lqer_top_k]:
            r, g = min(h.lqer_rank, rows, cols), min(h.lqer_group, cols)
            groups = -(-cols // g)
            out["lqer"] += rows * -(-r // 4) + 2 + r * -(-groups * g // 2) + 2 * r * groups  # raw: A, its scale, B, B's scales
    if h.compressor == "pergroup":
        out["pergroup row orders"] = PROJECTION_ROW_ORDER_BYTES * sum(
            t.shape[0] for name, t in state.items() if pergroup_group(name) in PERGROUP_SORTED)
    return {k: int(round(v)) for k, v in out.items()}


# -----------------------------------------------------------------------------
# SERIALIZATION
#   torch.save({'w','m'}) -> stride-2 byte shuffle ('BSHF') -> brotli-11 or xz. The shuffle
#   groups the high and low bytes of the 16-bit scales and int8 pairs so the entropy coder
#   sees two smoother streams. COMPRESSOR=family instead compresses each family of tensors
#   (same role, same dtype) as its own stream with whichever codec makes it smallest ('QFAM').
#   COMPRESSOR=pergroup gives the GPTQ codes of each matrix kind one lrzip ZPAQ stream, rows
#   reordered so that similar ones are adjacent, and brotli the rest ('PGRP').
#   Files are written to a temp name and renamed into place.
# -----------------------------------------------------------------------------

SHUFFLE_MAGIC = b"BSHF"
XZ_MAGIC = b"\xfd7zXZ\x00"


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(blob: bytes) -> bytes:
    if blob[:4] != SHUFFLE_MAGIC or len(blob) < 5 or blob[4] == 0:
        raise ValueError("missing BSHF byte-shuffle header")
    stride, payload = blob[4], np.frombuffer(blob, dtype=np.uint8, offset=5)
    out, pos = np.empty(len(payload), dtype=np.uint8), 0
    for i in range(stride):
        n = len(range(i, len(payload), stride))
        out[i::stride] = payload[pos: pos + n]
        pos += n
    return out.tobytes()


FAMILY_MAGIC = b"QFAM\x01"
FAMILY_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "float32": torch.float32}


def tensor_family(key: str, t: Tensor) -> str:
    """Group of one blob tensor: its role (which weights, codes or scales) and its dtype."""
    dtype = str(t.dtype).removeprefix("torch.")
    name, _, part = key.rpartition(".")
    if part.startswith("lqer"):
        role = "lqer." + ("scales" if part.endswith("scale") else "codes")
    elif part in ("q", "q_pt"):
        role = (tensor_role(name) or (None, None, "control"))[2] + ".codes"
    elif part in ("scale", "scale_pt"):
        role = "scales"
    else:
        role = "passthrough"
    return f"{role}.{dtype}"


def family_codecs(raw: bytes, itemsize: int) -> list[tuple[str, bytes]]:
    import brotli

    out = []
    for shuffle in ((False, True) if itemsize > 1 else (False,)):
        data = b"".join(raw[i::itemsize] for i in range(itemsize)) if shuffle else raw
        tag = "+shuffle" if shuffle else ""
        out.append(("brotli" + tag, brotli.compress(data, quality=11, lgwin=24)))
        out.append(("xz" + tag, lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)))
    return out


def compress_by_family(w: dict, m: dict) -> bytes:
    """'QFAM' v1: magic, a 4-byte header length, the xz-compressed JSON header (method labels;
    each tensor's key, dtype, shape and family; each family's codec, sizes and CRC-32), then
    every family's compressed bytes in header order."""
    import json
    import zlib

    families: dict[str, list[str]] = {}
    for key in sorted(w):
        families.setdefault(tensor_family(key, w[key]), []).append(key)
    tensors, groups, payloads = [], [], []
    for fam, keys in sorted(families.items()):
        raw = b"".join(w[k].detach().cpu().contiguous().numpy().tobytes() for k in keys)
        codec, data = min(family_codecs(raw, w[keys[0]].element_size()), key=lambda c: len(c[1]))
        tensors += [[k, str(w[k].dtype).removeprefix("torch."), list(w[k].shape), fam] for k in keys]
        groups.append([fam, codec, len(raw), len(data), zlib.crc32(raw)])
        payloads.append(data)
    header = lzma.compress(json.dumps({"m": m, "tensors": tensors, "groups": groups}).encode(),
                           preset=9 | lzma.PRESET_EXTREME)
    return FAMILY_MAGIC + len(header).to_bytes(4, "little") + header + b"".join(payloads)


def decompress_by_family(blob: bytes, source: str) -> tuple[dict, dict]:
    import json
    import zlib

    import brotli

    try:
        n = int.from_bytes(blob[5:9], "little")
        header = json.loads(lzma.decompress(blob[9:9 + n]))
        m, tensors, groups = header["m"], header["tensors"], header["groups"]
    except Exception as e:
        raise ValueError(f"{source}: QFAM header is unreadable ({type(e).__name__}: {e})") from None
    raws, pos = {}, 9 + n
    for fam, codec, raw_len, comp_len, crc in groups:
        data = blob[pos: pos + comp_len]
        pos += comp_len
        try:
            raw = brotli.decompress(data) if codec.startswith("brotli") else lzma.decompress(data)
        except Exception as e:
            raise ValueError(f"{source}: tensor family {fam!r} is corrupt ({codec}: {type(e).__name__})") from None
        itemsize = FAMILY_DTYPES[fam.rsplit(".", 1)[1]].itemsize
        if codec.endswith("+shuffle") and len(raw) == raw_len and raw_len % itemsize == 0:
            raw = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise ValueError(f"{source}: tensor family {fam!r} is corrupt (CRC-32 or length mismatch)")
        raws[fam] = [raw, 0]
    if pos != len(blob):
        raise ValueError(f"{source}: QFAM blob has {len(blob) - pos} bytes beyond its families (truncated or padded)")
    w = {}
    for key, dtype, shape, fam in tensors:
        buf = raws[fam]
        t = torch.empty(shape, dtype=FAMILY_DTYPES[dtype])
        nbytes = t.numel() * t.element_size()
        if nbytes:
            t = torch.frombuffer(bytearray(buf[0][buf[1]: buf[1] + nbytes]), dtype=t.dtype).reshape(shape)
        buf[1] += nbytes
        w[key] = t
    return w, m


PERGROUP_MAGIC = b"PGRP"
# `PERGROUP_STREAMS`: the matrices (by state-dict suffix) whose int8 GPTQ codes get one lrzip stream
# each, every layer's in layer order, in container order; `PERGROUP_SORTED`: those whose rows are
# reordered first. Then two brotli streams: the rest of the blob, and the row orders.
PERGROUP_STREAMS = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
                    "mlp.fc.weight", "mlp.proj.weight")
PERGROUP_SORTED = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")
PERGROUP_NAMES = (*PERGROUP_STREAMS, "rest", "row orders")  # every stream's name, as errors give it


def lrzip_program() -> str:
    """The lrzip program COMPRESSOR=pergroup runs; refused by name of its package when absent."""
    import shutil

    path = shutil.which("lrzip")
    if path is None:
        raise RuntimeError("COMPRESSOR=pergroup needs the lrzip program (its ZPAQ back-end), which is not on PATH: "
                           "install Debian's package lrzip (apt-get install lrzip), or choose another COMPRESSOR")
    return path


def run_lrzip(options: list[str], data: bytes, what: str) -> bytes:
    """lrzip OPTIONS on `data`, through files in a temporary folder that this function owns and always
    removes. LRZIP=NOCONFIG: no lrzip.conf can change the bytes; TMP: its own temporary files stay in
    the folder; -N: the caller's priority (lrzip renices itself to 19, and then starves on a busy
    machine). A non-zero exit status raises RuntimeError with lrzip's message."""
    import subprocess
    import tempfile

    program = lrzip_program()
    with tempfile.TemporaryDirectory(prefix="pergroup_") as folder:
        src, dst = os.path.join(folder, "stream.in"), os.path.join(folder, "stream.out")
        with open(src, "wb") as f:
            f.write(data)
        env = dict(os.environ, LRZIP="NOCONFIG", TMP=folder, TMPDIR=folder)
        proc = subprocess.run([program, "-q", "-N", str(os.nice(0)), *options, "-o", dst, src], capture_output=True,
                              env=env)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"lrzip {' '.join(options)} on {what} exited with status {proc.returncode}"
                               + (f": {message[-1]}" if message else ""))
        with open(dst, "rb") as f:
            return f.read()


def l1_row_order(codes: np.ndarray) -> np.ndarray:
    """A greedy nearest-neighbour chain over the rows of an int8 matrix from row 0: each next row is
    the unused one at the smallest L1 distance from the last (ties: the lowest index), so similar
    rows sit next to each other for the compressor. Returns the order as uint16 (what is stored)."""
    rows = codes.shape[0]
    if rows > 65536:
        raise ValueError(f"{rows} rows do not fit COMPRESSOR=pergroup's uint16 row order")
    order = np.zeros(rows, dtype=np.uint16)
    rest, index = codes[1:].astype(np.int16), np.arange(1, rows)  # unused rows, compacted as rows are taken
    last = codes[0].astype(np.int16)
    for i in range(1, rows):
        dist = np.abs(rest - last).sum(axis=1, dtype=np.int32)
        ties = np.flatnonzero(dist == dist.min())
        j = ties[np.argmin(index[ties])]
        order[i], last = index[j], rest[j].copy()
        rest[j], index[j] = rest[-1], index[-1]
        rest, index = rest[:-1], index[:-1]
    return order


def pergroup_group(name: str) -> str | None:
    """The PERGROUP_STREAMS entry of a state-dict name, if it has one."""
    return next((g for g in PERGROUP_STREAMS if name == g or name.endswith("." + g)), None)


def pergroup_stream(key: str, t: Tensor) -> str | None:
    """The PERGROUP_STREAMS entry holding one blob tensor: 2-D int8 codes '<matrix>.q' alone."""
    name, _, part = key.rpartition(".")
    if part != "q" or t.dtype != torch.int8 or t.ndim != 2:
        return None
    return pergroup_group(name)


def layer_order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return (int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1), key


def compress_by_group(w: dict, m: dict) -> bytes:
    """'PGRP', the stream count and every stream's length (u32 little-endian), then the streams: one
    `lrzip -z -L 9` (ZPAQ) stream per PERGROUP_STREAMS entry holding its matrices' codes, each matrix
    rows reordered (PERGROUP_SORTED) and then transposed, so that a column's codes are adjacent (an
    empty stream where the blob has none); everything else torch.save'd with the labels and the
    streams' keys, shapes, lengths and CRC-32s, brotli-11 (window 2^24); the row orders, brotli-11."""
    import struct
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    import brotli

    keys = {g: [] for g in PERGROUP_STREAMS}
    rest = {}
    for key in sorted(w, key=layer_order):
        group = pergroup_stream(key, w[key])
        if group is None:
            rest[key] = w[key]
        else:
            keys[group].append(key)
    raws, orders, manifest = [], [], []
    for group in PERGROUP_STREAMS:
        parts = []
        for key in keys[group]:
            codes = w[key].detach().cpu().contiguous().numpy()
            if group in PERGROUP_SORTED:
                order = l1_row_order(codes)
                orders.append(order.tobytes())
                codes = codes[order]
            parts.append(np.ascontiguousarray(codes.T).tobytes())
        raws.append(b"".join(parts))
        manifest.append([group, [[key, list(w[key].shape)] for key in keys[group]], len(raws[-1]), zlib.crc32(raws[-1])])
    order_bytes = b"".join(orders)
    with ThreadPoolExecutor(max_workers=len(raws)) as pool:  # one lrzip process per stream at once
        streams = list(pool.map(lambda g, raw: run_lrzip(["-z", "-L", "9"], raw, f"tensor group {g!r}") if raw else b"",
                                PERGROUP_STREAMS, raws))
    rest_bytes = torch_bytes({"w": rest, "m": m, "groups": manifest, "orders": [len(order_bytes), zlib.crc32(order_bytes)]})
    streams.append(brotli.compress(rest_bytes, quality=11, lgwin=24))
    streams.append(brotli.compress(order_bytes, quality=11) if order_bytes else b"")
    return PERGROUP_MAGIC + struct.pack(f"<{1 + len(streams)}I", len(streams), *map(len, streams)) + b"".join(streams)


def split_pergroup_streams(blob: bytes, source: str) -> list[bytes]:
    """The container's streams, checked against its header: a truncated or padded blob is refused."""
    import struct

    count, head = len(PERGROUP_NAMES), 8 + 4 * len(PERGROUP_NAMES)
    if len(blob) < head or struct.unpack_from("<I", blob, 4)[0] != count:
        raise ValueError(f"{source}: PGRP header is truncated or does not list {count} streams")
    lengths = struct.unpack_from(f"<{count}I", blob, 8)
    if head + sum(lengths) != len(blob):
        raise ValueError(f"{source}: PGRP blob has {len(blob)} bytes, its header {head + sum(lengths)} "
                         f"(truncated or padded)")
    bounds = np.cumsum([head, *lengths]).tolist()
    return [blob[a:b] for a, b in zip(bounds, bounds[1:])]


def decompress_by_group(blob: bytes, source: str) -> tuple[dict, dict]:
    """Inverse of compress_by_group: every stream is checked (lrzip's own MD5, then the CRC-32s and
    lengths the rest records), and a bad one is refused by the name of its tensor group."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    import brotli

    streams = split_pergroup_streams(blob, source)

    def corrupt(group: str, why: str) -> ValueError:
        return ValueError(f"{source}: tensor group {group!r} is corrupt ({why})")

    try:
        obj = torch_load_checked(brotli.decompress(streams[-2]))
        w, m, manifest, (order_len, order_crc) = obj["w"], obj["m"], obj["groups"], obj["orders"]
    except Exception as e:
        raise corrupt("rest", f"{type(e).__name__}: {e}") from None
    if [g[0] for g in manifest] != list(PERGROUP_STREAMS):
        raise corrupt("rest", f"it lists the streams {[g[0] for g in manifest]}")
    try:
        orders = brotli.decompress(streams[-1]) if streams[-1] else b""
    except Exception as e:
        raise corrupt("row orders", f"brotli: {type(e).__name__}") from None
    if len(orders) != order_len or zlib.crc32(orders) != order_crc:
        raise corrupt("row orders", "CRC-32 or length mismatch")
    lrzip_program()  # a missing program is not a corrupt stream

    def unpack(group: str, data: bytes) -> bytes:
        try:
            return run_lrzip(["-d", "-f"], data, f"tensor group {group!r}") if data else b""
        except RuntimeError as e:
            raise corrupt(group, str(e)) from None

    with ThreadPoolExecutor(max_workers=len(PERGROUP_STREAMS)) as pool:
        raws = list(pool.map(unpack, PERGROUP_STREAMS, streams[:len(PERGROUP_STREAMS)]))
    order_pos = 0
    for (group, tensors, raw_len, crc), raw in zip(manifest, raws):
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise corrupt(group, "CRC-32 or length mismatch")
        if sum(rows * cols for _, (rows, cols) in tensors) != raw_len:
            raise corrupt("rest", f"the shapes it lists for {group!r} do not fill that stream")
        pos = 0
        for key, (rows, cols) in tensors:
            codes = np.frombuffer(raw, dtype=np.int8, count=rows * cols, offset=pos).reshape(cols, rows).T
            pos += rows * cols
            if group in PERGROUP_SORTED:
                order = np.frombuffer(orders, dtype=np.uint16, count=rows, offset=order_pos).astype(np.int64)
                order_pos += 2 * rows
                if not np.array_equal(np.sort(order), np.arange(rows)):
                    raise corrupt("row orders", f"the order of {key} is not a permutation")
                restored = np.empty_like(codes)
                restored[order] = codes  # row i of the stored matrix is row order[i] of the original
                codes = restored
            w[key] = torch.from_numpy(codes.copy())  # C order, and not a view of the blob's bytes
    if order_pos != len(orders):
        raise corrupt("row orders", f"{len(orders)} bytes for {order_pos} bytes of row orders")
    return w, m


def compress_blob(w: dict, m: dict, compressor: str) -> bytes:
    if compressor == "family":
        return compress_by_family(w, m)
    if compressor == "pergroup":
        return compress_by_group(w, m)
    buf = io.BytesIO()
    torch.save({"w": w, "m": m}, buf)
    shuffled = byte_shuffle(buf.getvalue())
    if compressor == "brotli":
        import brotli

        return brotli.compress(shuffled, quality=11)
    return lzma.compress(shuffled, preset=9 | lzma.PRESET_EXTREME)


def blob_compressor(head: bytes) -> str:
    """The COMPRESSOR that wrote a blob, from its first bytes (brotli streams have no magic)."""
    if head.startswith(FAMILY_MAGIC):
        return "family"
    if head.startswith(PERGROUP_MAGIC):
        return "pergroup"
    return "lzma" if head.startswith(XZ_MAGIC) else "brotli"


def check_blob_format(head: bytes, source: str, compressor: str) -> None:
    found = blob_compressor(head)
    if found != compressor:
        raise ValueError(f"{source} was written with COMPRESSOR={found}, but this run has COMPRESSOR={compressor}: "
                         f"set COMPRESSOR={found} to read it")


def decompress_blob(blob: bytes, source: str, compressor: str | None = None) -> tuple[dict, dict]:
    """(tensors, labels) of a blob. `compressor`: the run's COMPRESSOR, which must be the blob's (a run
    reads with the settings that wrote its artifact, and a packed file holds only its preset's
    reader); None reads any format."""
    if compressor is not None:
        check_blob_format(blob, source, compressor)
    found = compressor or blob_compressor(blob)
    if found == "family":
        return decompress_by_family(blob, source)
    if found == "pergroup":
        return decompress_by_group(blob, source)
    try:
        if found == "lzma":
            raw = lzma.decompress(blob)
        else:
            import brotli

            raw = brotli.decompress(blob)
    except Exception as e:
        raise ValueError(f"{source}: not a brotli or xz stream ({type(e).__name__}: {e})") from None
    try:
        obj = torch_load_checked(byte_unshuffle(raw))
        w, m = obj["w"], obj["m"]
    except Exception as e:
        raise ValueError(f"{source}: decompressed, but the contents are not a quantized model ({e})") from None
    return w, m


def atomic_write(path: str, *chunks: bytes) -> None:
    """Write beside `path`, fsync, rename over it, fsync the folder: readers see the old file or the
    new one, never a half-written one, and a write that fails removes its temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno and e.filename is None:  # e.g. a full disk: say where
            raise OSError(e.errno, f"writing {path}: {e.strerror}") from None
        raise
    try:  # the rename itself is durable only once the folder is synced (POSIX; not on Windows)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load_checked(raw: bytes):
    """torch.load of torch.save's bytes once the zip's CRC-32s match (brotli has no checksum)."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"CRC-32 mismatch in {bad}")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def load_init_state(path: str) -> dict:
    """INIT_STATE: a state dict as torch.save wrote it (final_model.pt), never an artifact."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INIT_STATE={path} does not exist")
    with open(path, "rb") as f:
        head = f.read(len(XZ_MAGIC))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        hint = (" It is a compressed artifact (.ptz): evaluate it with EVAL_ONLY=1 QUANTIZED_MODEL_PATH=...;"
                " INIT_STATE takes final_model.pt." if head == XZ_MAGIC or path.endswith(".ptz") else "")
        raise ValueError(f"INIT_STATE={path} is not a state dict saved with torch.save (as final_model.pt is).{hint}") \
            from None
    if not isinstance(state, dict):
        raise ValueError(f"INIT_STATE={path} holds a {type(state).__name__}, not a state dict")
    return state


def load_quantized_model(h: Hyperparameters, rt: Runtime, path: str) -> GPT:
    """A fresh model holding the artifact's dequantized weights, looping on, as evaluated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantized model not found: {path} (QUANTIZED_MODEL_PATH)")
    with open(path, "rb") as f:
        w, m = decompress_blob(f.read(), path, h.compressor)
    model = build_model(h, rt.device, rt.is_cuda)
    load_into_model(model, dequantize_state_dict(w, m, h.lqer_top_k > 0, h.lqer_form), path)
    return model.loop_as_trained()


# -----------------------------------------------------------------------------
# EVALUATION
#   All scoring goes through score_windows(): a window is (start, first scored target, end),
#   each target is scored once with the context the window gives it. Plain evaluation is
#   windows of EVAL_SEQ_LEN every EVAL_SEQ_LEN tokens; sliding evaluation advances by
#   EVAL_STRIDE; score-first TTT scores a chunk's windows, then trains on that chunk. Phased TTT
#   (PHASED_TTT_ENABLED, below) scores documents chunk by chunk, each with adapters of its own
#   that then train on the chunk: its rows are documents' windows, summed as score_windows sums.
# -----------------------------------------------------------------------------


def make_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, score_from, end) in target indices: the window feeds tokens[start:end] and scores
    targets score_from..end-1. The first scores everything; each later one only what is new."""
    windows, scored_to, start = [], 0, 0
    while scored_to < num_targets:
        end = min(start + seq_len, num_targets)
        if end > scored_to:
            windows.append((start, scored_to, end))
            scored_to = end
        start += stride
    return windows


def rank_share(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def score_windows(model, tokens: Tensor, windows, h: Hyperparameters, rt: Runtime, luts) -> Tensor:
    """Sum of NLL, scored token count and byte count over the windows (this rank's share only).
    `model` is the GPT or its compiled wrapper; compiled, every batch is padded to one shape.
    `luts`: the byte tables, or with VAL_BYTE_SIDECAR=1 the sidecar's counts of `tokens`."""
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    model.eval()
    for b in range(0, len(windows), h.eval_batch_seqs):
        batch = windows[b: b + h.eval_batch_seqs]
        # Always EVAL_SEQ_LEN wide: above TRAIN_SEQ_LEN the rotary base stretches with the width, so
        # a narrower batch would score its windows differently. Compiled, the rows are fixed too.
        width = h.eval_seq_len
        rows = h.eval_batch_seqs if rt.compile else len(batch)
        x = torch.zeros(rows, width, dtype=torch.int64)
        y = torch.zeros_like(x)
        mask = torch.zeros_like(x, dtype=torch.bool)
        for r, (start, score_from, end) in enumerate(batch):
            x[r, : end - start] = tokens[start:end]
            y[r, : end - start] = tokens[start + 1: end + 1]
            mask[r, score_from - start: end - start] = True  # later padding cannot reach earlier positions: causal
        if h.val_byte_sidecar:  # `luts` is the sidecar's counts of the validation tokens
            nbytes = rt.to_device(sidecar_window_bytes(luts, batch, x.shape))
        x, y, mask = rt.to_device(x), rt.to_device(y), rt.to_device(mask)
        with rt.autocast():
            nll = model(x, y, reduction="none")
        if not h.val_byte_sidecar:
            nbytes = token_bytes(x, y, luts)
        # Masked sums, not nll[mask]: boolean indexing has a data-dependent size, so it would
        # stop the host for the device twice per batch.
        sums[0] += torch.where(mask, nll.double(), 0.0).sum()
        sums[1] += mask.sum()
        sums[2] += torch.where(mask, nbytes, 0).sum()
    return sums


def summarize(sums: Tensor, rt: Runtime) -> tuple[float, float]:
    loss_sum, n_tokens, n_bytes = rt.all_reduce(sums).tolist()
    val_loss = loss_sum / n_tokens
    return val_loss, val_loss / math.log(2) * n_tokens / n_bytes


class EvalResult(NamedTuple):
    val_loss: float
    val_bpb: float
    eval_ms: float


# `evaluate_*`: each is (h, rt, model, val_tokens, luts, log) -> EvalResult; `log` gets progress lines.
def evaluate_plain(h, rt, model, val_tokens, luts, log=None) -> EvalResult:
    """One pass of EVAL_SEQ_LEN windows, each scoring all its targets (no progress to report)."""
    t0 = time.perf_counter()
    windows = make_windows(val_tokens.numel() - 1, h.eval_seq_len, h.eval_seq_len)
    mine = [windows[i] for i in rank_share(len(windows), rt.rank, rt.world_size)]
    was_training = model.training
    loss, bpb = summarize(score_windows(model, val_tokens, mine, h, rt, luts), rt)
    model.train(was_training)
    return EvalResult(loss, bpb, 1000 * (time.perf_counter() - t0))


def evaluate_sliding(h, rt, model, val_tokens, luts, log=None) -> EvalResult:
    """Windows of EVAL_SEQ_LEN every EVAL_STRIDE tokens, each scoring only its new targets."""
    t0 = time.perf_counter()
    windows = make_windows(val_tokens.numel() - 1, h.eval_seq_len, h.eval_stride)
    mine = [windows[i] for i in rank_share(len(windows), rt.rank, rt.world_size)]
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    # About ten progress lines, each a whole number of batches.
    step = max(1, math.ceil(len(mine) / 10 / h.eval_batch_seqs)) * h.eval_batch_seqs
    for b in range(0, len(mine), step):
        sums += score_windows(model, val_tokens, mine[b: b + step], h, rt, luts)
        if log is not None and b + step < len(mine):
            elapsed = time.perf_counter() - t0
            done = (b + step) / len(mine)
            log(f"sliding_progress windows:{b + step}/{len(mine)} elapsed:{elapsed:.0f}s eta:{elapsed / done - elapsed:.0f}s")
    loss, bpb = summarize(sums, rt)
    return EvalResult(loss, bpb, 1000 * (time.perf_counter() - t0))


def ttt_batches(h: Hyperparameters, rt: Runtime, chunk_start: int, chunk_end: int) -> list[list[int]]:
    """This rank's TTT batches of one chunk: start offsets of whole EVAL_SEQ_LEN sequences. Every
    rank gets the same number of batches (some may be empty) so the gradient all-reduce stays matched."""
    L, B = h.eval_seq_len, h.ttt_batch_seqs
    n_seqs = (chunk_end - chunk_start) // L
    mine = [chunk_start + i * L for i in rank_share(n_seqs, rt.rank, rt.world_size)]
    return [mine[s * B: (s + 1) * B] for s in range(math.ceil(math.ceil(n_seqs / rt.world_size) / B))]


def _ttt_adapt(h: Hyperparameters, rt: Runtime, model, opt, val_tokens: Tensor, batches: list[list[int]]) -> None:
    """TTT_EPOCHS passes of SGD over one scored chunk's batches; gradients are averaged over ranks."""
    params = opt.param_groups[0]["params"]
    model.train()
    for _ in range(h.ttt_epochs):
        for starts in batches:
            opt.zero_grad(set_to_none=False)
            if starts:
                xy = torch.stack([val_tokens[st: st + h.eval_seq_len + 1] for st in starts])
                # Inputs and targets reach the device as the training batches do, so a TTT batch
                # of the training micro-batch's shape also has its strides (one compiled graph).
                x, y = rt.to_device(xy[:, :-1]), rt.to_device(xy[:, 1:])
                with rt.autocast():
                    loss = model(x, y)
                loss.backward()
            if rt.distributed:
                rt.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
            opt.step()


def evaluate_ttt(h, rt, model, val_tokens, luts, log=None) -> EvalResult:
    """Score-first TTT. Each chunk's windows are scored under no_grad before the model trains on
    that chunk's tokens, so no target is ever predicted by weights that have seen it; the last
    chunk is never trained on (nothing is left to score)."""
    t0 = last_log = time.perf_counter()
    num_targets = val_tokens.numel() - 1
    num_chunks = (num_targets + h.ttt_chunk_tokens - 1) // h.ttt_chunk_tokens
    by_chunk = [[] for _ in range(num_chunks)]
    for w in make_windows(num_targets, h.eval_seq_len, h.eval_stride):
        by_chunk[w[1] // h.ttt_chunk_tokens].append(w)
    params = list(model.parameters())  # every parameter adapts, bigram.embed included
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for c in range(num_chunks):
        mine = [by_chunk[c][i] for i in rank_share(len(by_chunk[c]), rt.rank, rt.world_size)]
        sums += score_windows(model, val_tokens, mine, h, rt, luts)
        if c < num_chunks - 1 and h.ttt_epochs > 0:
            for group in opt.param_groups:  # cosine over chunks
                group["lr"] = h.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(num_chunks - 1, 1)))
            chunk_start = c * h.ttt_chunk_tokens
            chunk_end = min(chunk_start + h.ttt_chunk_tokens, num_targets)
            _ttt_adapt(h, rt, model, opt, val_tokens, ttt_batches(h, rt, chunk_start, chunk_end))
        now = time.perf_counter()
        if log is not None and (now - last_log > 30 or c == num_chunks - 1):
            last_log = now
            log(f"ttt_progress chunk:{c + 1}/{num_chunks} elapsed:{now - t0:.0f}s "
                f"eta:{(now - t0) / (c + 1) * (num_chunks - c - 1):.0f}s")
    model.eval()
    loss, bpb = summarize(sums, rt)
    return EvalResult(loss, bpb, 1000 * (time.perf_counter() - t0))


# Phased score-first TTT (PHASED_TTT_ENABLED). A document is a BOS through the next BOS (which it
# shares with the next document), so every target lies in exactly one. Documents are scored in
# batches of PHASED_TTT_BATCH_DOCS of similar length, longest batch first, each document in chunks
# of PHASED_CHUNK targets with the last <= EVAL_SEQ_LEN tokens of the document as the context,
# by the model plus adapters of its own; once a chunk is scored, the adapters take one AdamW step
# on its mean loss. A batch starts with the adapters' B at zero and a fresh optimizer, and A as the
# previous batch of its chain left it. At NUM_PHASES points within the first PREFIX_DOCS documents
# the whole model takes SGD steps on documents already scored; then fresh adapters follow.
# Each row of a batch is one document's window and padding follows it, so with causal attention
# no position ever sees another document.

# The record's fixed values: settings of their own would cost the packed file about 10 bytes each.
PHASED_CHUNK = 48  # targets of a document scored, then trained on, per step
PHASED_LORA_ALPHA = 144.0  # adapter outputs are scaled by ALPHA / PHASED_TTT_LORA_RANK
PHASED_LORA_LR = 1e-4  # AdamW learning rate of the adapters
PHASED_ADAM_BETA1 = 0.0  # AdamW beta1 of the adapters: no momentum
PHASED_ADAM_EPS = 1e-10
PHASED_SGD_LR = 1e-3  # global SGD learning rate, cosine over a phase's TTT_CHUNK_TOKENS chunks
# Batch q of the queue continues chain q % CHAINS: it starts from the A that chain's previous
# batch left (the record ran one chain on each of its 8 GPUs). A fixed count, not the number of
# ranks, so the result does not depend on how many processes share the work.
PHASED_LORA_CHAINS = 8
BOS_ID = 1  # the id prepare_data.py writes before every document


class BatchedLoRA(nn.Module):
    """One low-rank adapter per row of a batch: row b maps x to scale * (x A_b^T) B_b^T. B starts at
    zero, so a fresh adapter changes nothing; A is drawn by the caller (fresh_lora_a)."""

    def __init__(self, rows: int, n_in: int, n_out: int, rank: int, scale: float):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rows, rank, n_in))
        self.B = nn.Parameter(torch.zeros(rows, n_out, rank))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:  # (rows, T, n_in) -> (rows, T, n_out)
        return (x @ self.A.transpose(1, 2)) @ self.B.transpose(1, 2) * self.scale


class SlotLoRA(nn.Module):
    """The adapters of one slot of the virtual layer order: beside c_q, c_k and c_v, beside all of
    attention (o) - each from the attention's normed input - and beside the MLP, from its input."""

    def __init__(self, h: Hyperparameters, rows: int, rank: int, scale: float):
        super().__init__()
        d, kv = h.model_dim, h.num_kv_heads * h.head_dim
        self.q, self.o, self.mlp = (BatchedLoRA(rows, d, d, rank, scale) for _ in range(3))
        self.k, self.v = (BatchedLoRA(rows, d, kv, rank, scale) for _ in range(2))


class DocumentLoRA(nn.Module):
    """Phased TTT's adapters for a batch of `rows` documents: a SlotLoRA for every block call of the
    model's current layer order (a layer that runs three times has three) and one beside the head."""

    def __init__(self, h: Hyperparameters, model: GPT, rows: int):
        super().__init__()
        looped = model.looping_active
        n_slots = len(model.encoder_indices) + len(model.decoder_indices) if looped else h.num_layers
        rank, scale = h.phased_ttt_lora_rank, PHASED_LORA_ALPHA / h.phased_ttt_lora_rank
        self.slots = nn.ModuleList(SlotLoRA(h, rows, rank, scale) for _ in range(n_slots))
        self.head = BatchedLoRA(rows, h.model_dim, h.vocab_size, rank, scale)

    def adapters(self) -> list[BatchedLoRA]:
        return [m for m in self.modules() if isinstance(m, BatchedLoRA)]

    def start_batch(self, a_state: list[Tensor]) -> None:
        """A from `a_state`, B zero: the adapters change nothing until the batch's first step."""
        with torch.no_grad():
            for m, a in zip(self.adapters(), a_state, strict=True):
                m.A.copy_(a)
                m.B.zero_()


def fresh_lora_a(lora: DocumentLoRA, seed: int) -> list[Tensor]:
    """A for every adapter, uniform in +-1/sqrt(fan-in) (nn.Linear's bound), from its own seeded
    generator on the adapters' device: any process draws the same values for the same seed."""
    g = torch.Generator(device=lora.head.A.device).manual_seed(seed)
    return [torch.empty_like(m.A).uniform_(-m.A.size(-1) ** -0.5, m.A.size(-1) ** -0.5, generator=g)
            for m in lora.adapters()]


def find_documents(tokens: Tensor) -> list[tuple[int, int]]:
    """(start, length) of each document: from a BOS through the next BOS inclusive, the last one to
    the end. A stream that does not open with a BOS opens with a document anyway, so the documents'
    targets are the stream's targets, each exactly once."""
    n = tokens.numel()
    starts = (tokens[:-1] == BOS_ID).nonzero().flatten().tolist()  # a final BOS starts nothing
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [n - 1]
    return [(s, e - s + 1) for s, e in zip(starts, ends)]


def phased_ttt_queue(docs: list[tuple[int, int]], batch_docs: int) -> list[tuple[int, list[int]]]:
    """The batches in scoring order, each (index, document indices): the documents sorted by length
    (stably) and cut into batches of `batch_docs`, the shortest first (their index: the order a
    phase takes documents in); then scored longest batch first, ties in index order."""
    by_length = sorted(range(len(docs)), key=lambda d: docs[d][1])
    cut = [by_length[i: i + batch_docs] for i in range(0, len(by_length), batch_docs)]
    return [(b, cut[b]) for b in sorted(range(len(cut)), key=lambda b: -docs[cut[b][-1]][1])]


class ChunkRows(NamedTuple):
    """One step of a batch: row b holds document b's window for chunk c (zeros for a document with
    no chunk c). `pos` is each target's index in the stream (-1: padding)."""
    x: Tensor
    y: Tensor
    score: Tensor  # bool (rows, width): the chunk's targets, scored at this step
    train: Tensor  # bool (rows,): the document has targets left, so its adapters train on this chunk
    offset: int  # where a training row's chunk starts in its window (the same for every such row)
    pos: Tensor


def phased_chunk_rows(h: Hyperparameters, tokens: Tensor, docs: list[tuple[int, int]], c: int) -> ChunkRows:
    """Chunk c of every document of a batch: targets c*CHUNK .. of the document (its last chunk may
    be shorter), the window the last <= EVAL_SEQ_LEN tokens up to the chunk's end."""
    chunk, window = PHASED_CHUNK, h.eval_seq_len
    width = min((c + 1) * chunk, window)
    x = torch.zeros(len(docs), width, dtype=torch.int64)
    y, pos = torch.zeros_like(x), torch.full_like(x, -1)
    score, train = torch.zeros_like(x, dtype=torch.bool), torch.zeros(len(docs), dtype=torch.bool)
    for b, (start, length) in enumerate(docs):
        n_targets = length - 1
        if c * chunk >= n_targets:
            continue
        end = min((c + 1) * chunk, n_targets)  # in targets of the document: target t predicts token t + 1
        lo = max(0, end - window)
        x[b, : end - lo] = tokens[start + lo: start + end]
        y[b, : end - lo] = tokens[start + lo + 1: start + end + 1]
        pos[b, : end - lo] = torch.arange(start + lo + 1, start + end + 1)
        score[b, c * chunk - lo: end - lo] = True
        train[b] = end < n_targets
    return ChunkRows(x, y, score, train, c * chunk - max(0, (c + 1) * chunk - window), pos)


def phased_sums(nll: Tensor, rows: ChunkRows, luts, sidecar: bool = False) -> Tensor:
    """(loss, tokens, bytes) over the rows' scored targets, as score_windows sums them. With
    `sidecar` (VAL_BYTE_SIDECAR=1) `luts` is the sidecar's counts, read at each target's position."""
    nll, mask = nll.detach(), rows.score
    if sidecar:
        nbytes = torch.where(rows.pos >= 0, luts[rows.pos.clamp_min(0)], 0).to(torch.int32).to(nll.device)
    else:
        nbytes = token_bytes(rows.x, rows.y, luts)
    return torch.stack((torch.where(mask, nll.double(), 0.0).sum(), mask.sum().double(),
                        torch.where(mask, nbytes, 0).sum().double()))


@torch.no_grad()
def _phased_score(nll_of, rows: ChunkRows, luts, sidecar: bool) -> Tensor:
    """Score a step's chunks under no_grad, before the adapters train on them."""
    return phased_sums(nll_of(rows), rows, luts, sidecar)


def _phased_lora_step(opt, rows: ChunkRows, nll: Tensor) -> None:
    """One AdamW step of the adapters on each training row's mean loss over its (scored) chunk; the
    rows are independent, each with its own adapters, so each gets its own document's gradient."""
    per_doc = nll[:, rows.offset: rows.offset + PHASED_CHUNK].mean(-1)
    opt.zero_grad(set_to_none=True)
    (per_doc * rows.train).sum().backward()
    opt.step()


def _phased_ttt_batch(h, rt, forward, lora: DocumentLoRA, tokens: Tensor, docs, luts) -> Tensor:
    """Score one batch of documents, chunk after chunk, each chunk before the step that trains on
    it; the adapters' optimizer is new for the batch. Returns the batch's (loss, tokens, bytes)."""
    opt = torch.optim.AdamW(lora.parameters(), lr=PHASED_LORA_LR, betas=(PHASED_ADAM_BETA1, h.phased_ttt_beta2),
                            eps=PHASED_ADAM_EPS, weight_decay=h.phased_ttt_wd, fused=rt.is_cuda)

    def nll_of(rows: ChunkRows) -> Tensor:
        with rt.autocast():
            return forward(rows.x, rows.y, reduction="none", lora=lora)

    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    for c in range(max(-(-(length - 1) // PHASED_CHUNK) for _, length in docs)):
        host = phased_chunk_rows(h, tokens, docs, c)
        trains = bool(host.train.any())  # decided on the host: no wait for the device
        rows = host._replace(**{k: rt.to_device(getattr(host, k)) for k in ("x", "y", "score", "train")})
        if trains and h.phased_ttt_shared_forward:
            # The record's way: the training forward's losses are the scores (the same weights, so
            # the same numbers), taken before its step; one forward less per chunk.
            nll = nll_of(rows)
            sums += phased_sums(nll, rows, luts, h.val_byte_sidecar)
            _phased_lora_step(opt, rows, nll)
            continue
        sums += _phased_score(nll_of, rows, luts, h.val_byte_sidecar)
        if trains:
            _phased_lora_step(opt, rows, nll_of(rows))
    return sums


def phased_phase_documents(scored: list[tuple[int, list[int]]], docs, n: int) -> list[tuple[int, int]]:
    """The n documents a global SGD phase trains on: of the batches scored so far, ordered by batch
    index (shortest documents first) and position in the batch, the first n."""
    return [docs[d] for _, members in sorted(scored) for d in members][:n]


class SgdRows(NamedTuple):
    """One global SGD step's rows on this rank: document pieces, each padded to the longest."""
    x: Tensor
    y: Tensor
    mask: Tensor  # bool: a target of the piece's own document (not the next document's first token)
    count: int  # such targets of the whole step, over every rank: the loss is their mean
    pos: Tensor  # each target's index in the validation stream (-1: padding or not trained)


def phased_sgd_rows(h: Hyperparameters, rt: Runtime, stream: Tensor, origin: Tensor, lo: int, hi: int) -> SgdRows:
    """The step over the concatenated documents' stream[lo:hi+1], cut at every BOS (and document
    start) and every EVAL_SEQ_LEN tokens from a piece's start: the record's varlen segments, cut
    over the whole step rather than each rank's part, so that the cut does not depend on the ranks.
    A piece is one row; this rank takes its share. origin[k] is stream[k]'s index in the validation
    stream, -1 where a document starts: that token is no target of the document before it."""
    x_all, L = stream[lo:hi], h.eval_seq_len
    trained = origin[lo + 1: hi + 1] >= 0
    starts = ((x_all == BOS_ID) | (origin[lo:hi] < 0)).nonzero().flatten().tolist()
    starts = starts if starts[:1] == [0] else [0] + starts
    pieces = []
    for a, b in zip(starts, starts[1:] + [hi - lo]):
        pieces += [(p, min(p + L, b)) for p in range(a, b, L)]
    pieces = [(a, b) for a, b in pieces if trained[a:b].any()]  # a document's last BOS predicting the next's start
    count = int(sum(int(trained[a:b].sum()) for a, b in pieces))
    mine = [pieces[i] for i in rank_share(len(pieces), rt.rank, rt.world_size)]
    width = max([b - a for a, b in mine], default=1)
    x = torch.zeros(len(mine), width, dtype=torch.int64)
    y, pos, mask = torch.zeros_like(x), torch.full_like(x, -1), torch.zeros_like(x, dtype=torch.bool)
    for r, (a, b) in enumerate(mine):
        x[r, : b - a], y[r, : b - a] = x_all[a:b], stream[lo + a + 1: lo + b + 1]
        mask[r, : b - a] = trained[a:b]
        pos[r, : b - a] = torch.where(trained[a:b], origin[lo + a + 1: lo + b + 1], -1)
    return SgdRows(x, y, mask, count, pos)


def _phased_sgd_step(h, rt, forward, opt, params: list[Tensor], rows: SgdRows) -> None:
    """One SGD step of every weight on the mean loss of the step's targets over all ranks: each
    rank's share of the sum, scaled so that the gradient average over ranks is that mean's."""
    opt.zero_grad(set_to_none=False)
    if rows.x.numel():
        x, y, mask = rt.to_device(rows.x), rt.to_device(rows.y), rt.to_device(rows.mask)
        with rt.autocast():
            nll = forward(x, y, reduction="none")
        (torch.where(mask, nll, 0.0).sum() * (rt.world_size / rows.count)).backward()
    if rt.distributed:
        rt.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
    opt.step()


def _phased_global_sgd(h, rt, forward, model: GPT, tokens: Tensor, docs) -> int:
    """A global SGD phase: the documents concatenated, cut into TTT_CHUNK_TOKENS chunks, one SGD step
    on each chunk but the last (the record's TTT loop, one epoch) at a cosine learning rate over the
    chunks, momentum TTT_MOMENTUM, every weight; attention never crosses a document. Returns the
    number of steps."""
    stream = torch.cat([tokens[s: s + n] for s, n in docs])
    origin = torch.cat([torch.cat((torch.tensor([-1]), torch.arange(s + 1, s + n))) for s, n in docs])
    n_chunks = -(-(stream.numel() - 1) // h.ttt_chunk_tokens)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=PHASED_SGD_LR, momentum=h.ttt_momentum)
    model.train()
    for c in range(n_chunks - 1):
        for group in opt.param_groups:
            group["lr"] = PHASED_SGD_LR * 0.5 * (1 + math.cos(math.pi * c / max(n_chunks - 1, 1)))
        lo = c * h.ttt_chunk_tokens
        _phased_sgd_step(h, rt, forward, opt, params, phased_sgd_rows(h, rt, stream, origin, lo, lo + h.ttt_chunk_tokens))
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return max(n_chunks - 1, 0)


def evaluate_ttt_phased(h, rt, model, val_tokens, luts, log=None) -> EvalResult:
    """Phased score-first TTT (see above). Rank r scores the batches of the chains c with
    c % WORLD_SIZE == r; every rank walks the whole queue, so all reach each phase at the same
    batch, and a phase trains on documents every rank knows to be scored: those of the batches
    before it, which the gradient all-reduce of its first step waits for."""
    t0 = last_log = time.perf_counter()
    model = getattr(model, "_orig_mod", model)  # the bare GPT: shapes vary here, so the stage compiles
    forward = torch.compile(model, dynamic=True, fullgraph=True) if rt.compile else model  # its own, dynamic
    docs = find_documents(val_tokens)
    queue = phased_ttt_queue(docs, h.phased_ttt_batch_docs)
    prefix = min(h.phased_ttt_prefix_docs, len(docs))
    boundaries = [prefix * (p + 1) // h.phased_ttt_num_phases for p in range(h.phased_ttt_num_phases)] if prefix else []
    for p in model.parameters():
        p.requires_grad_(False)  # only the adapters train between the phases
    model.eval()
    full = DocumentLoRA(h, model, h.phased_ttt_batch_docs).to(rt.device)
    chains: dict[int, list[Tensor]] = {}
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    phase = done = 0
    for q, (_, members) in enumerate(queue):
        chain = q % PHASED_LORA_CHAINS
        if chain % rt.world_size == rt.rank:
            seed = (h.seed * 1_000 + phase) * 1_000_000 + chain
            if len(members) == h.phased_ttt_batch_docs:
                lora = full
                lora.start_batch(chains.get(chain) or fresh_lora_a(lora, seed))
            else:  # the one short batch: adapters of its own size, fresh, outside every chain
                lora = DocumentLoRA(h, model, len(members)).to(rt.device)
                lora.start_batch(fresh_lora_a(lora, seed + PHASED_LORA_CHAINS + q))
            sums += _phased_ttt_batch(h, rt, forward, lora, val_tokens, [docs[d] for d in members], luts)
            if lora is full:
                chains[chain] = [m.A.detach().clone() for m in lora.adapters()]
        done += len(members)
        if phase < len(boundaries) and done >= boundaries[phase] and q + 1 < len(queue):
            steps = _phased_global_sgd(h, rt, forward, model, val_tokens,
                                       phased_phase_documents(queue[: q + 1], docs, boundaries[phase]))
            if log is not None:
                log(f"phased_ttt_phase:{phase + 1}/{len(boundaries)} after_batch:{q + 1} docs:{boundaries[phase]} "
                    f"sgd_steps:{steps} elapsed:{time.perf_counter() - t0:.0f}s")
            chains.clear()  # fresh adapters after a phase
            phase += 1
        now = time.perf_counter()
        if log is not None and (now - last_log > 30 or q == len(queue) - 1):
            last_log = now
            log(f"phased_ttt_progress batches:{q + 1}/{len(queue)} docs:{done}/{len(docs)} phases:{phase}/"
                f"{len(boundaries)} elapsed:{now - t0:.0f}s")
    for p in model.parameters():
        p.requires_grad_(True)
    loss, bpb = summarize(sums, rt)
    return EvalResult(loss, bpb, 1000 * (time.perf_counter() - t0))


def maybe_compile(model: GPT, rt: Runtime):
    return torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model


def run_evaluations(h, rt, val_tokens, luts, log) -> None:
    """Quantized -> sliding -> TTT -> phased TTT, each on a model freshly loaded from the artifact."""
    stages = [("quantized", evaluate_plain)]
    if h.sliding_window_enabled:
        stages.append(("quantized_sliding_window", evaluate_sliding))
    if h.ttt_enabled:
        stages.append(("quantized_ttt", evaluate_ttt))
    if h.phased_ttt_enabled:
        stages.append(("quantized_ttt_phased", evaluate_ttt_phased))
    for label, fn in stages:
        model = load_quantized_model(h, rt, h.quantized_model_path)
        loss, bpb, ms = fn(h, rt, maybe_compile(model, rt), val_tokens, luts, log)
        log(f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms")
        check_finite(label, loss, bpb)
        del model


def check_finite(label: str, loss: float, bpb: float) -> None:
    """A NaN result (TTT diverging, say) must fail the run, not pass as a score."""
    if not (math.isfinite(loss) and math.isfinite(bpb)):
        raise FloatingPointError(f"{label} evaluation gave val_loss {loss}, val_bpb {bpb}: not a result")


# -----------------------------------------------------------------------------
# MAIN
# -----------------------------------------------------------------------------


def log_header(h: Hyperparameters, rt: Runtime, log: Logger, code: bytes) -> None:
    log(f"code_bytes:{len(code)}")
    log(f"code_sha256:{hashlib.sha256(code).hexdigest()}")
    if rt.is_cuda:
        hw = f"device:cuda gpu:{torch.cuda.get_device_name(rt.device)} world_size:{rt.world_size}"
    else:
        hw = f"device:cpu cpu:{platform.processor() or platform.machine()} world_size:{rt.world_size} threads:{torch.get_num_threads()}"
    log(f"hardware: {hw} cpus:{os.cpu_count()}")
    log(f"versions: python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}"
        + (f" cuda:{torch.version.cuda}" if rt.is_cuda else ""))
    # GRAD_ACCUM_STEPS is logged as resolved for this layout (0 means 8 // WORLD_SIZE).
    for name, value in dataclasses.replace(h, grad_accum_steps=rt.grad_accum_steps).items():
        log(f"hparam:{name}={value}", console=False)
    for warning in h.env_warnings:
        log(f"WARNING: {warning}")
    log(f"attention:{'flash_attn_3' if FLASH_ATTN_FUNC is not None else 'sdpa'} compile:{int(rt.compile)} "
        f"grad_accum_steps:{rt.grad_accum_steps} micro_batch_seqs:{rt.micro_batch_seqs}")
    if h.varlen:
        log(f"varlen_attention:{'flash_attn_3' if FLASH_ATTN_VARLEN_FUNC is not None else 'sdpa_mask'} "
            f"tokens_per_row:{rt.micro_batch_seqs * h.train_seq_len} split:{h.train_seq_len}")


def log_artifact_size(log: Logger, compressor: str, blob_bytes: int, code_bytes: int) -> int:
    """The artifact's size lines, which pack.py and the benchmarks parse; returns code + model bytes."""
    log(f"Serialized model quantized+{compressor}: {blob_bytes} bytes")
    log(f"Total submission size quantized+{compressor}: {blob_bytes + code_bytes} bytes")
    return blob_bytes + code_bytes


def quantize_and_save(h, rt, model, log, code_bytes: int, train_ms: float | None = None) -> int:
    """GPTQ-calibrate on training batches, write the artifact atomically; returns total bytes."""
    t0 = time.perf_counter()
    model.loop_as_trained()
    # The record quantizes from rank 0's own batches (its loader, no all-reduce): the other ranks
    # have nothing to calibrate unless GPTQ_HESSIAN_ALL_RANKS=1 averages everyone's.
    hessians = {}
    if rt.is_main or h.gptq_hessian_all_ranks:
        loader = ShuffledSequenceLoader(h.train_files, h.train_seq_len, rt.rank, rt.world_size)
        hessians = collect_hessians(model, loader, h.gptq_calibration_batches, rt.micro_batch_seqs, rt,
                                    all_ranks=h.gptq_hessian_all_ranks)
    calibration_ms = 1000 * (time.perf_counter() - t0)
    log(f"gptq:collected {len(hessians)} hessians from {h.gptq_calibration_batches} training batches "
        f"in {calibration_ms:.0f}ms")
    if train_ms is not None:  # the quantity the 600 s rule limits
        limit = f" limit:{1000 * h.max_wallclock_seconds:.0f}ms" if h.max_wallclock_seconds > 0 else ""
        log(f"train_plus_calibration_time:{train_ms + calibration_ms:.0f}ms{limit}")
    blob_bytes = 0
    if rt.is_main:
        t1 = time.perf_counter()
        w, m = quantize_state_dict(model.state_dict(), hessians, h)
        for line in category_table(w, m):
            log(line)
        blob = compress_blob(w, m, h.compressor)
        atomic_write(h.quantized_model_path, blob)
        blob_bytes = len(blob)
        log(f"gptq:quantized and compressed in {1000 * (time.perf_counter() - t1):.0f}ms")
    sizes = rt.all_reduce(torch.tensor([blob_bytes], device=rt.device))
    total = log_artifact_size(log, h.compressor, int(sizes.item()), code_bytes)
    rt.barrier()
    return total


def main() -> int:
    h = Hyperparameters.from_env()
    rt = Runtime(h)
    log = Logger(f"logs/{h.run_id}.txt" if rt.is_main else None)
    if rt.is_cuda:
        enable_flash_attention()
        if h.varlen:
            enable_flash_attention_varlen()
    code = Path(__file__).read_bytes()  # the file that is running: the packed one when packed
    log_header(h, rt, log, code)
    torch.manual_seed(h.seed)
    sp = load_tokenizer(h)
    luts = build_sentencepiece_luts(sp, h.vocab_size, rt.device)
    val_tokens = load_validation_tokens(h.val_files, h.eval_seq_len, h.vocab_size)
    if h.val_byte_sidecar:
        luts = load_validation_sidecar(h, val_tokens)  # every evaluation counts the target bytes from it
        log(f"val_byte_sidecar: {int(luts[1:].sum())} bytes")
    elif glob.glob(os.path.join(h.data_path, SIDECAR_PREFIX + "*")):  # CaseOps data: a table counts a marker as 3 bytes
        raise ValueError(f"{h.data_path} has byte sidecars: set VAL_BYTE_SIDECAR=1")
    log(f"val_tokens:{val_tokens.numel() - 1} train_shards:{len(shard_files(h.train_files))}")

    if h.eval_only:
        if os.path.isdir(h.quantized_model_path):
            raise IsADirectoryError(f"EVAL_ONLY=1 but QUANTIZED_MODEL_PATH={h.quantized_model_path} is a folder, "
                                    "not an artifact file")
        if not os.path.isfile(h.quantized_model_path):
            raise FileNotFoundError(f"EVAL_ONLY=1 but the artifact {h.quantized_model_path} does not exist")
        blob_bytes = os.path.getsize(h.quantized_model_path)
        with open(h.quantized_model_path, "rb") as f:
            check_blob_format(f.read(16), f"EVAL_ONLY=1: {h.quantized_model_path}", h.compressor)
        log(f"eval_only: {h.quantized_model_path}")
        total = log_artifact_size(log, h.compressor, blob_bytes, len(code))
    else:
        model = build_model(h, rt.device, rt.is_cuda)
        if h.init_state:
            load_into_model(model, load_init_state(h.init_state), h.init_state)
            log(f"init_state: {h.init_state}")
        log(f"model_params:{sum(p.numel() for p in model.parameters())}")
        projected = projected_model_bytes(model.state_dict(), h)
        log(f"projected_artifact_bytes:{sum(projected.values()) + len(code)} (model {sum(projected.values())} + code "
            f"{len(code)}; limit {h.size_limit_bytes}) " + " ".join(f"[{k}]:{v}" for k, v in sorted(projected.items())))
        trainer = train(h, rt, model, val_tokens, luts, log)  # writes final_model.pt when training ends
        model.loop_as_trained()
        loss, bpb, ms = evaluate_plain(h, rt, trainer.compiled, val_tokens, luts)
        log(f"pre-quantization post-ema val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms")
        check_finite("pre-quantization post-ema", loss, bpb)
        total = quantize_and_save(h, rt, model, log, len(code), trainer.training_ms)
        del model, trainer
    run_evaluations(h, rt, val_tokens, luts, log)
    status = 0
    if total > h.size_limit_bytes:
        log(f"OVER BUDGET by {total - h.size_limit_bytes} bytes: total {total} > limit {h.size_limit_bytes}")
        status = 3
    return rt.close(status)


def run_and_exit(fn) -> None:
    """Exit with fn()'s status. A rank of a distributed run that fails prints its traceback and
    leaves as Runtime.close() does, without interpreter finalization: there gloo's threads could
    abort it (status -6) and hide the failure's own status. torchrun then stops the other ranks."""
    try:
        status = fn()
    except BaseException as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        traceback.print_exc()
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            print(f"rank {dist.get_rank()}: a peer rank did not answer within DIST_TIMEOUT_SECONDS (this run's "
                  "setting, logged in its header): it stopped or crashed, or a legitimate wait took longer "
                  "(then raise DIST_TIMEOUT_SECONDS)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(status)


if __name__ == "__main__":
    run_and_exit(main)
