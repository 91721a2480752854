"""Pack train_gpt.py into a small self-extracting file, check the byte budget, and build
record folders and submission.json files from training logs.

  python pack.py [--src train_gpt.py] [--out build/train_gpt.py] [--encoding latin1|base85]
                 [--artifact PATH | --logs DIR_OR_LOG ...]
      minify -> raw LZMA2 -> self-extracting wrapper; verify; write atomically; print the sizes
      and the budget `packed file + model blob <= 16,000,000` (exit 3 when over it).
  python pack.py --measure [--src train_gpt.py]
      print what each minifier option and LZMA setting costs on the source.
  python pack.py --record NAME --logs LOG1 LOG2 ... [--baseline-bpb 1.07882] [--date YYYY-MM-DD]
      write records/<date>_<NAME>/: the file that ran, the readable source, README.md,
      submission.json, the logs and requirements.txt.
  python pack.py --summary LOG1 LOG2 ... [--out-json submission.json]
      only the submission.json summary of a set of logs.

The packed file runs the minified source with exec() in its own module namespace, so
`python build/train_gpt.py` and `torchrun ... build/train_gpt.py` see `__name__ == "__main__"` and
`__file__` == the packed file: the code size and hash that the training script logs are those of
the file that ships. The packing itself needs only the standard library and python-minifier;
the significance test of --record/--summary uses scipy.stats when it is installed.
"""

from __future__ import annotations

import argparse
import ast
import base64
import datetime
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

SIZE_LIMIT_BYTES = 16_000_000
ROOT = Path(__file__).resolve().parent


class PackError(Exception):
    """A refusal: the message names the file and the offending value."""


# -----------------------------------------------------------------------------
# MINIFY
# python-minifier rewrites the AST. Only transformations that cannot change what the script
# does are on. Sizes below are of the LZMA stream of train_gpt.py (69 kB readable, ~13.3 kB
# packed), each option flipped alone from this set; `python pack.py --measure` re-measures.
# -----------------------------------------------------------------------------

MINIFY_FLAGS = dict(
    # Docstrings and other bare literal statements (~-2,100 B). python-minifier keeps them in
    # any module that reads __doc__.
    remove_literal_statements=True,
    # Function locals get one-letter names (~-470 B). Arguments a caller can pass by keyword keep
    # their names (the minifier aliases long ones inside the body); only names no caller sees
    # change: `self`, *args, **kwargs, nested functions. The minifier renames nothing in a module
    # that calls locals(), globals(), vars(), exec() or eval(); check_interface() verifies the rest.
    rename_locals=True,
    # OFF: module-level names are the script's interface: tests and tools import them
    # (`train_gpt.Hyperparameters`), pickles and torch.compile refer to them by name (~+385 B).
    rename_globals=False,
    # OFF: adds module-level names for repeated strings, and LZMA already shares them (~+80 B).
    hoist_literals=False,
    # OFF: asserts and `if __debug__` blocks are checks the readable run performs (0 B today).
    remove_asserts=False,
    remove_debug=False,
    # Safe rewrites that are exact by construction: `pass`, `return None`, `raise E()`,
    # `class A(object)`, positional-only markers, constant expressions, `if False:` blocks.
    remove_pass=True,
    remove_explicit_return_none=True,
    remove_builtin_exception_brackets=True,
    remove_object_base=True,
    convert_posargs_to_args=True,
    constant_folding=True,
    remove_dead_branches=True,
    # Layout only: joining imports and preferring `;` over newlines move the LZMA stream by a few
    # bytes either way as the source changes (measured -3..+4 B); the plainer layout is kept.
    combine_imports=False,
    prefer_single_line=False,
    # The packed file has its own first line; a shebang inside the payload would be dead weight.
    preserve_shebang=False,
)


def minify_options() -> dict:
    import python_minifier

    # Variable annotations go; argument and return annotations go too, but before the minifier
    # sees the source (strip_annotations), because some must stay. Class-body annotations stay
    # because they *are* the fields of dataclasses and NamedTuples.
    annotations = python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=False,
        remove_argument_annotations=False, remove_class_attribute_annotations=False)
    return dict(MINIFY_FLAGS, remove_annotations=annotations)


def minifier_version() -> str:
    try:
        from importlib.metadata import version

        return version("python-minifier")
    except Exception:
        return "unknown"


# Decorators that read their function's annotations when the program runs: Triton's `jit`
# (`tl.constexpr` marks a kernel's compile-time arguments) and torch.library's `custom_op` (the
# op's schema is built from them).
ANNOTATION_READERS = ("jit", "custom_op")


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def strip_annotations(source: str) -> str:
    """The source without argument and return annotations (~-450 B packed), except on functions
    an ANNOTATION_READERS decorator reads: python-minifier can only remove all of them or none."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if any(_decorator_name(d) in ANNOTATION_READERS for d in node.decorator_list):
            continue
        node.returns = None
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
    return ast.unparse(tree)


def constexpr_arguments(source: str) -> list[str]:
    """Triton kernel arguments annotated `tl.constexpr`. They keep their names: renamed, the
    minifier would alias them to a shorter local (`E=ROWS`), and Triton's interpreter does not
    carry compile-time constancy through such an assignment."""
    return sorted({a.arg for a in ast.walk(ast.parse(source)) if isinstance(a, ast.arg)
                   and a.annotation is not None and "constexpr" in ast.unparse(a.annotation)})


def minify_source(source: str, filename: str = "train_gpt.py", **overrides) -> str:
    import python_minifier

    options = {**minify_options(), "preserve_locals": constexpr_arguments(source), **overrides}
    return python_minifier.minify(strip_annotations(source), filename=filename, **options)


def _scope_bindings(body: list[ast.stmt]) -> set[str]:
    """Names bound directly in a module or class body (not inside nested functions/classes)."""
    names: set[str] = set()
    pending = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            pending.extend(node.decorator_list)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue  # comprehension variables are local to the comprehension
        pending.extend(ast.iter_child_nodes(node))
    return names


def interface_names(source: str) -> dict[str, set]:
    """What minification must leave untouched: module-level names, class attributes, attribute
    accesses (state-dict keys come from `self.tok_emb`, ...), keyword arguments, parameter names
    and string constants (environment variable names, log keys)."""
    tree = ast.parse(source)
    annotations = [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    annotations += [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign))]
    skip = {id(x) for a in annotations if a is not None for x in ast.walk(a)}  # annotations may go
    literal_statements = {id(n.value) for n in ast.walk(tree)
                          if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    fstring_parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
    out: dict[str, set] = {"module names": _scope_bindings(tree.body), "class attributes": set(),
                           "attributes": set(), "keywords": set(), "parameters": set(), "strings": set()}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ClassDef):
            out["class attributes"].update(f"{node.name}.{n}" for n in _scope_bindings(node.body))
        elif isinstance(node, ast.Attribute):
            out["attributes"].add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            out["keywords"].add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Names a caller can pass by keyword. Renaming a method's receiver (`self`), *args,
            # **kwargs or a positional-only argument is invisible to callers.
            args = node.args.args[1:] if id(node) in methods else node.args.args
            name = node.name if id(node) in methods or node in tree.body else "<local>"  # locals may be renamed
            out["parameters"].add(f"{name}({','.join(x.arg for x in args + node.args.kwonlyargs)})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in literal_statements and id(node) not in fstring_parts):
            out["strings"].add(node.value)
    return out


def check_interface(readable: str, minified: str) -> None:
    before, after = interface_names(readable), interface_names(minified)
    for kind in before:
        lost, gained = before[kind] - after[kind], after[kind] - before[kind]
        if lost or gained:
            raise PackError(f"minification changed {kind}: lost {sorted(lost)[:8]} gained {sorted(gained)[:8]}; "
                            f"an unsafe minifier option is on or python-minifier {minifier_version()} misbehaves")


# -----------------------------------------------------------------------------
# COMPRESS
# A raw LZMA2 stream: no .xz container (~-85 B) and no header, the filter spec travels in the
# decompressor line instead. Text has no 4-byte structure, so pb=0 beats the default pb=2
# (~-20 B); lc and the match finder's nice_len/mf move a few bytes either way and depend on the
# text, so each pack searches them: lc x pb first, then nice_len x mf around the best. Measured
# and left out: lp=1 (+170 B), a delta filter (+3.6 kB), BCJ x86/ARM (no change: they rewrite
# machine-code branches, which text does not have).
# -----------------------------------------------------------------------------

LC_PB_GRID = [(lc, pb) for lc in range(5) for pb in range(3)]
NICE_LEN_GRID = (273, 192, 128, 96, 64)
MF_GRID = (lzma.MF_BT4, lzma.MF_BT3, lzma.MF_BT2, lzma.MF_HC4)
MF_NAMES = {lzma.MF_BT4: "bt4", lzma.MF_BT3: "bt3", lzma.MF_BT2: "bt2", lzma.MF_HC4: "hc4", lzma.MF_HC3: "hc3"}


def dict_size_for(n: int) -> int:
    """Smallest power of two >= n (liblzma's minimum is 4 KiB): a larger dictionary cannot find
    more matches in n bytes, and the decoder then allocates only that much."""
    return max(4096, 1 << max(0, n - 1).bit_length())


def encoder_filter(data_len: int, lc: int, pb: int, nice_len: int = 273, mf: int = lzma.MF_BT4) -> dict:
    return {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size_for(data_len),
            "lc": lc, "lp": 0, "pb": pb, "nice_len": nice_len, "mf": mf}


def decoder_filter(enc: dict) -> dict:
    """The LZMA2 decoder reads only the stream's properties (dictionary size, lc, lp, pb); preset,
    nice_len, mf and depth steer the encoder's search and leave no trace in the stream."""
    return {k: enc[k] for k in ("id", "dict_size", "lc", "lp", "pb")}


def describe_filter(enc: dict) -> str:
    return (f"raw LZMA2 preset 9e dict_size={enc['dict_size']} lc={enc['lc']} lp={enc['lp']} pb={enc['pb']} "
            f"nice_len={enc['nice_len']} mf={MF_NAMES.get(enc['mf'], enc['mf'])}")


def lzma_raw(data: bytes, enc: dict) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[enc])


def compress(data: bytes, search: bool = True) -> tuple[bytes, dict]:
    """Smallest raw LZMA2 stream over the grid; (stream, encoder filter)."""
    if not search:
        enc = encoder_filter(len(data), lc=3, pb=0)
        return lzma_raw(data, enc), enc
    results = {}
    for lc, pb in LC_PB_GRID:
        enc = encoder_filter(len(data), lc, pb)
        results[(lc, pb, 273, lzma.MF_BT4)] = (lzma_raw(data, enc), enc)
    lc, pb = min(results.items(), key=lambda kv: len(kv[1][0]))[0][:2]
    for nice_len in NICE_LEN_GRID:
        for mf in MF_GRID:
            if (lc, pb, nice_len, mf) not in results:
                enc = encoder_filter(len(data), lc, pb, nice_len, mf)
                results[(lc, pb, nice_len, mf)] = (lzma_raw(data, enc), enc)
    # ties go to the earliest (simplest) setting, so the choice is deterministic
    return min(results.values(), key=lambda r: len(r[0]))


# -----------------------------------------------------------------------------
# WRAP
# The stream travels in a str literal of a file declared latin-1: Python decodes each byte to the
# code point of the same value and `.encode("latin-1")` gives the bytes back, so only what a
# triple-quoted literal cannot hold is escaped: NUL (source may not contain it), CR (newline
# translation would turn it into LF), backslash, and a quote that would close the literal. About
# 3 bytes in 256 need an escape (~1.2%). base85 is pure ASCII and 25% larger.
# -----------------------------------------------------------------------------

LATIN1_HEADER = b"# -*- coding: latin-1 -*-\n"
QUOTE = 0x22  # the literal is """..."""
OCTAL_DIGITS = b"01234567"


def escape_latin1(payload: bytes) -> bytes:
    """Body of a \"\"\"...\"\"\" literal in a latin-1 file whose value is payload.decode('latin-1')."""
    out = bytearray()
    n = len(payload)
    tail = n  # a run of quotes at the very end would merge with the closing delimiter
    while tail > 0 and payload[tail - 1] == QUOTE:
        tail -= 1
    run = 0  # unescaped quotes just written
    for i, b in enumerate(payload):
        if b == QUOTE:
            if run == 2 or i >= tail:
                out += b'\\"'
                run = 0
            else:
                out.append(b)
                run += 1
            continue
        run = 0
        if b == 0:
            # "\0" followed by an octal digit would be read as a longer octal escape
            out += b"\\x00" if i + 1 < n and payload[i + 1] in OCTAL_DIGITS else b"\\0"
        elif b == 0x0D:
            out += b"\\r"
        elif b == 0x5C:
            out += b"\\\\"
        else:
            out.append(b)
    return bytes(out)


def _filter_literal(dec: dict) -> str:
    items = ",".join(f'"{k}":{"lzma.FILTER_LZMA2" if k == "id" else int(v)}' for k, v in dec.items())
    return "[{" + items + "}]"


# The decompressed source is registered in linecache under the packed file's name, so tracebacks
# show the running line and inspect.getsource works (torch.jit/triton read source through it).
_RUN_LINES = ('linecache.cache[__file__]=len(s),None,s.splitlines(True),__file__\n'
              'exec(compile(s,__file__,"exec"))\n')


def wrap(stream: bytes, dec: dict, encoding: str = "latin1") -> bytes:
    """Self-extracting Python source that runs the payload in its own module namespace."""
    call = f"lzma.FORMAT_RAW,filters={_filter_literal(dec)}).decode()\n"
    if encoding == "latin1":
        return (LATIN1_HEADER + b"import lzma,linecache\n"
                + b's=lzma.decompress("""' + escape_latin1(stream) + b'""".encode("latin-1"),'
                + call.encode() + _RUN_LINES.encode())
    if encoding == "base85":
        return (b"import base64,lzma,linecache\n"
                + b's=lzma.decompress(base64.b85decode("' + base64.b85encode(stream) + b'"),'
                + call.encode() + _RUN_LINES.encode())
    raise ValueError(f"unknown encoding {encoding!r} (latin1 or base85)")


def _eval_filters(node: ast.expr) -> list:
    class Names(ast.NodeTransformer):
        def visit_Attribute(self, n):
            if isinstance(n.value, ast.Name) and n.value.id == "lzma" and n.attr.isupper():
                return ast.copy_location(ast.Constant(getattr(lzma, n.attr)), n)
            raise PackError(f"unexpected name in the filter spec: {ast.unparse(n)}")

    return ast.literal_eval(Names().visit(node))


def unwrap(packed: bytes) -> tuple[bytes, list]:
    """(stream, filters) read back from a packed file's text, the way Python reads it."""
    tree = ast.parse(packed)  # honours the coding declaration, like the interpreter
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "decompress":
            break
    else:
        raise PackError("no lzma.decompress(...) call in the packed file")
    data = node.args[0]
    if (isinstance(data, ast.Call) and isinstance(data.func, ast.Attribute) and data.func.attr == "encode"
            and isinstance(data.func.value, ast.Constant) and isinstance(data.func.value.value, str)):
        stream = data.func.value.value.encode(ast.literal_eval(data.args[0]))
    elif (isinstance(data, ast.Call) and isinstance(data.func, ast.Attribute) and data.func.attr == "b85decode"
          and isinstance(data.args[0], ast.Constant)):
        stream = base64.b85decode(data.args[0].value)
    else:
        raise PackError(f"unrecognised payload expression: {ast.unparse(data)[:80]}")
    if ast.unparse(node.args[1]) != "lzma.FORMAT_RAW":
        raise PackError(f"payload format is {ast.unparse(node.args[1])}, expected lzma.FORMAT_RAW")
    filters = _eval_filters(next(k.value for k in node.keywords if k.arg == "filters"))
    return stream, filters


def unpack(packed: bytes) -> bytes:
    """The source a packed file runs."""
    stream, filters = unwrap(packed)
    return lzma.decompress(stream, format=lzma.FORMAT_RAW, filters=filters)


# -----------------------------------------------------------------------------
# PACK
# -----------------------------------------------------------------------------


class Packed:
    def __init__(self, raw: bytes, minified: bytes, stream: bytes, enc: dict, wrapped: bytes, encoding: str):
        self.raw, self.minified, self.stream, self.enc, self.wrapped = raw, minified, stream, enc, wrapped
        self.encoding = encoding

    @property
    def overhead(self) -> float:
        """Bytes of the packed file over the raw LZMA stream, as a fraction of the stream."""
        return (len(self.wrapped) - len(self.stream)) / len(self.stream)

    def report(self, out: str) -> str:
        r, m, s, w = len(self.raw), len(self.minified), len(self.stream), len(self.wrapped)
        return "\n".join([
            f"raw        {r:>9,} B",
            f"minified   {m:>9,} B  ({100 * m / r:.1f}% of raw; python-minifier {minifier_version()})",
            f"lzma       {s:>9,} B  ({describe_filter(self.enc)})",
            f"wrapped    {w:>9,} B  {out}  ({self.encoding}; +{100 * self.overhead:.2f}% over the raw stream)",
        ])


def pack_source(source: bytes, encoding: str = "latin1", filename: str = "train_gpt.py",
                search: bool = True) -> Packed:
    """Minify, compress and wrap `source`, then prove the wrapper gives the minified text back."""
    text = source.decode("utf-8")
    compile(text, filename, "exec")
    minified_text = minify_source(text, filename)
    compile(minified_text, filename, "exec")
    check_interface(text, minified_text)
    minified = minified_text.encode("utf-8")
    stream, enc = compress(minified, search)
    wrapped = wrap(stream, decoder_filter(enc), encoding)
    compile(wrapped, filename, "exec")
    if unpack(wrapped) != minified:
        raise PackError("the payload read back from the packed text differs from the minified source")
    return Packed(source, minified, stream, enc, wrapped, encoding)


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# LOGS
# Parsed by regex, line by line; unknown lines are ignored. The shapes are the ones
# train_gpt.py writes (SPEC §7).
# -----------------------------------------------------------------------------

STAGES = {  # log label -> JSON key, in evaluation order
    "pre-quantization post-ema": "pre_quant_post_ema",
    "quantized": "quantized",
    "quantized_sliding_window": "quantized_sliding_window",
    "quantized_ttt": "quantized_ttt",
}
FINAL_ORDER = ("quantized_ttt", "quantized_sliding_window", "quantized")  # first present is final
QUANTIZED_STAGES = ("quantized", "quantized_sliding_window", "quantized_ttt")
PATH_HPARAMS = {"DATA_DIR", "DATA_PATH", "TOKENIZER_PATH", "QUANTIZED_MODEL_PATH", "INIT_STATE"}
RUN_HPARAMS = {"SEED", "RUN_ID"}

NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
LINE_RES = {
    "code_bytes": re.compile(r"code_bytes:(\d+)\s*$"),
    "code_sha256": re.compile(r"code_sha256:([0-9a-f]{64})\s*$"),
    "hardware": re.compile(r"hardware:\s*(.*?)\s*$"),
    "versions": re.compile(r"versions:\s*(.*?)\s*$"),
    "hparam": re.compile(r"hparam:([A-Za-z_][A-Za-z0-9_]*)=(.*?)\s*$"),
    "model_params": re.compile(r"model_params:(\d+)\s*$"),
    "train_done": re.compile(r"train_done steps:(\d+) train_time:(" + NUM + r")ms"),
    "stopping_early": re.compile(r"stopping_early: (\S+) train_time:(" + NUM + r")ms step:(\d+)/(\d+)"),
    "serialized": re.compile(r"Serialized model quantized\+(\w+): (\d+) bytes"),
    "total": re.compile(r"Total submission size quantized\+(\w+): (\d+) bytes"),
    "over_budget": re.compile(r"OVER BUDGET by (-?\d+) bytes"),
    "stage": re.compile(r"(" + "|".join(re.escape(s) for s in STAGES) + r") val_loss:(" + NUM + r") val_bpb:("
                        + NUM + r")(?: eval_time:(" + NUM + r")ms)?\s*$"),
    "calibration": re.compile(r"gptq:collected \d+ hessians from \d+ training batches in (" + NUM + r")ms"),
    "train_plus_calibration": re.compile(r"train_plus_calibration_time:(" + NUM + r")ms"),
    "train_loss": re.compile(r"(\d+)/(\d+) train_loss: (" + NUM + r") train_time: "),
}


def _num(s: str) -> float | int:
    v = float(s)
    return int(v) if v.is_integer() and re.fullmatch(r"-?\d+", s) else v


def parse_log(path: str | Path) -> dict:
    """One training log -> dict of what it states. Raises PackError when the final result lines
    are missing or the file holds more than one run."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    log: dict = {"path": str(path), "hparams": {}, "stages": {}}
    counts: dict[str, int] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        for key, rx in LINE_RES.items():
            m = rx.match(line)
            if not m:
                continue
            counts[key] = counts.get(key, 0) + 1
            g = m.groups()
            if key in ("code_bytes", "model_params"):
                log[key] = int(g[0])
            elif key in ("code_sha256", "hardware", "versions"):
                log[key] = g[0]
            elif key == "hparam":
                log["hparams"][g[0]] = g[1]
            elif key == "train_done":
                log["steps"], log["train_time_ms"] = int(g[0]), _num(g[1])
            elif key == "stopping_early":
                log["stopped_early"] = {"reason": g[0], "train_time_ms": _num(g[1]), "step": int(g[2])}
            elif key == "serialized":
                log["compressor"], log["model_bytes"] = g[0], int(g[1])
            elif key == "total":
                log["total_bytes"] = int(g[1])
            elif key == "over_budget":
                log["over_budget_bytes"] = int(g[0])
            elif key == "stage":
                stage = {"val_loss": float(g[1]), "val_bpb": float(g[2])}
                if g[3] is not None:
                    stage["eval_time_ms"] = _num(g[3])
                log["stages"][STAGES[g[0]]] = stage
            elif key == "calibration":
                log["calibration_time_ms"] = _num(g[0])
            elif key == "train_plus_calibration":
                log["train_plus_calibration_time_ms"] = _num(g[0])
            elif key == "train_loss":
                log["iterations"] = int(g[1])
            break
    if counts.get("code_sha256", 0) > 1:
        raise PackError(f"{path}: holds {counts['code_sha256']} runs (code_sha256 appears more than once; "
                        "a RUN_ID reused appends to the same log)")
    missing = [what for what, ok in (
        ("code_bytes:", "code_bytes" in log), ("code_sha256:", "code_sha256" in log),
        ("hparam:SEED=", "SEED" in log["hparams"]),
        ("Serialized model quantized+...: N bytes", "model_bytes" in log),
        ("Total submission size quantized+...: N bytes", "total_bytes" in log),
        ("quantized val_loss:... val_bpb:...", "quantized" in log["stages"])) if not ok]
    if missing:
        raise PackError(f"{path}: missing the final result lines {missing}; did the run finish?")
    log["seed"] = _num(log["hparams"]["SEED"])
    log["run_id"] = log["hparams"].get("RUN_ID")
    log["final_stage"] = next(s for s in FINAL_ORDER if s in log["stages"])
    # A run killed mid-evaluation still has its earlier stages: the settings say which must be there.
    for stage, switch in (("quantized_sliding_window", "SLIDING_WINDOW_ENABLED"), ("quantized_ttt", "TTT_ENABLED")):
        if log["hparams"].get(switch, "").lower() in ("true", "1") and stage not in log["stages"]:
            raise PackError(f"{path}: {switch} is on but there is no '{stage} val_loss:...' line; "
                            "the run did not finish its evaluation")
    for stage, values in log["stages"].items():
        if not all(math.isfinite(v) for v in values.values()):
            raise PackError(f"{path}: stage {stage} has a non-finite result {values}")
    return log


def check_budget(log: dict) -> None:
    path, total = log["path"], log["total_bytes"]
    if "over_budget_bytes" in log:
        raise PackError(f"{path}: the run reports OVER BUDGET by {log['over_budget_bytes']} bytes")
    if total > SIZE_LIMIT_BYTES:
        raise PackError(f"{path}: total submission size {total} > {SIZE_LIMIT_BYTES} bytes")
    if total != log["model_bytes"] + log["code_bytes"]:
        raise PackError(f"{path}: total {total} != model {log['model_bytes']} + code {log['code_bytes']} bytes")


RECORD_SECONDS = 600  # the record track: training plus GPTQ calibration within 10 minutes on 8 GPUs


def check_record_time(log: dict) -> None:
    """Refuse a record-track log (8 CUDA ranks) whose training plus calibration exceeds 600 s.
    Logs from before the train_plus_calibration_time line are summed from their own lines."""
    hardware = log.get("hardware") or ""
    if "device:cuda" not in hardware or "world_size:8" not in hardware:
        return
    total = log.get("train_plus_calibration_time_ms")
    if total is None and "train_time_ms" in log and "calibration_time_ms" in log:
        total = log["train_time_ms"] + log["calibration_time_ms"]
    if total is not None and total > 1000 * RECORD_SECONDS:
        raise PackError(f"{log['path']}: training plus GPTQ calibration took {total / 1000:.1f}s, over the "
                        f"{RECORD_SECONDS}s limit by {total / 1000 - RECORD_SECONDS:.1f}s")


def check_consistent(logs: list[dict]) -> None:
    """Refuse logs that are not seeds of one and the same run."""
    first = logs[0]
    for log in logs[1:]:
        if log["code_sha256"] != first["code_sha256"]:
            raise PackError(f"code_sha256 differs: {first['path']} has {first['code_sha256']}, "
                            f"{log['path']} has {log['code_sha256']}")
        names = set(first["hparams"]) | set(log["hparams"])
        for name in sorted(names - RUN_HPARAMS):
            a, b = first["hparams"].get(name), log["hparams"].get(name)
            if name in PATH_HPARAMS or name.endswith(("_PATH", "_DIR")):
                a, b = None if a is None else bool(a), None if b is None else bool(b)  # set vs unset
            if a != b:
                raise PackError(f"hyperparameter {name} differs: {first['path']} has {first['hparams'].get(name)!r}, "
                                f"{log['path']} has {log['hparams'].get(name)!r}")
        if log["final_stage"] != first["final_stage"]:
            raise PackError(f"final evaluation differs: {first['path']} ends with {first['final_stage']}, "
                            f"{log['path']} with {log['final_stage']}")
    seen: dict = {}
    for log in logs:
        if log["seed"] in seen:
            raise PackError(f"SEED={log['seed']} appears twice: {seen[log['seed']]} and {log['path']}")
        seen[log["seed"]] = log["path"]


# -----------------------------------------------------------------------------
# SUBMISSION
# -----------------------------------------------------------------------------

IMPROVEMENT_NATS = 0.005
ALPHA = 0.01


def run_entry(log: dict) -> dict:
    final = log["stages"][log["final_stage"]]
    entry = {"seed": log["seed"], "run_id": log["run_id"], "log": Path(log["path"]).name,
             "final_stage": log["final_stage"], "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
             "stages": log["stages"], "model_bytes": log["model_bytes"], "compressor": log["compressor"],
             "code_bytes": log["code_bytes"], "total_bytes": log["total_bytes"]}
    for key in ("steps", "iterations", "train_time_ms", "stopped_early", "model_params", "hardware"):
        if key in log:
            entry[key] = log[key]
    times = {s: log["stages"][s]["eval_time_ms"] for s in STAGES.values()
             if "eval_time_ms" in log["stages"].get(s, {})}
    if times:
        entry["eval_time_ms"] = times
        quantized = [times[s] for s in QUANTIZED_STAGES if s in times]
        if quantized:
            entry["eval_time_quantized_total_ms"] = sum(quantized)
    return entry


def significance(losses: list[float], bpbs: list[float], baseline_bpb: float | None,
                 baseline_loss: float | None) -> dict:
    """One-sided test of `mean val_loss <= baseline_loss - 0.005 nats`.

    The test runs in nats. Without --baseline-loss the baseline's loss is baseline_bpb divided by
    the logs' own bpb-per-nat ratio (val_bpb / val_loss = tokens per byte / ln 2), which holds
    when the logs evaluate the same validation set as the baseline."""
    n = len(losses)
    ratio = statistics.fmean(b / l for b, l in zip(bpbs, losses))
    out: dict = {"claim": f"mean val_loss <= baseline val_loss - {IMPROVEMENT_NATS} nats", "unit": "nats per token",
                 "alpha": ALPHA, "n": n, "df": n - 1, "bpb_per_nat": ratio,
                 "tokens_per_byte": ratio * math.log(2), "threshold_nats": IMPROVEMENT_NATS,
                 "threshold_bpb": IMPROVEMENT_NATS * ratio}
    if baseline_loss is not None:
        out.update(baseline_loss=baseline_loss, baseline_loss_source="given (--baseline-loss)")
        if baseline_bpb is not None:
            out["baseline_bpb"] = baseline_bpb
    elif baseline_bpb is not None:
        baseline_loss = baseline_bpb / ratio
        out.update(baseline_bpb=baseline_bpb, baseline_loss=baseline_loss,
                   baseline_loss_source="baseline_bpb / bpb_per_nat, the ratio val_bpb/val_loss of these logs "
                                        "(valid when they evaluate the baseline's validation set)")
    else:
        out["note"] = "no baseline given"
        return out
    target = baseline_loss - IMPROVEMENT_NATS
    mean = statistics.fmean(losses)
    out.update(target_loss=target, mean_val_loss=mean, improvement_nats=baseline_loss - mean)
    t_name = "one-sided one-sample Student t-test of mean val_loss < target_loss (scipy.stats.t, df = n-1)"
    z_name = "one-sided one-sample z-test of mean val_loss < target_loss (normal cdf, sample std as sigma)"
    if n < 2:
        out.update(t_test={"name": t_name, "statistic": None, "p_value": None},
                   z_test={"name": z_name, "statistic": None, "p_value": None}, significant=None,
                   note="one run: no sample std, so no test; run more seeds")
        return out
    sd = statistics.stdev(losses)
    if sd == 0:
        p = 0.0 if mean < target else 1.0
        out.update(t_test={"name": t_name, "statistic": None, "p_value": p},
                   z_test={"name": z_name, "statistic": None, "p_value": p}, significant=p < ALPHA,
                   note="all runs have the same val_loss (std 0); the test degenerates to a comparison")
        return out
    stat = (mean - target) / (sd / math.sqrt(n))
    z_p = statistics.NormalDist().cdf(stat)
    try:
        from scipy import stats as scipy_stats

        t_p = float(scipy_stats.t.cdf(stat, n - 1))
    except ImportError:
        t_p = None
        out["note"] = "scipy is not installed: no t-test p-value"
    out.update(t_test={"name": t_name, "statistic": stat, "p_value": t_p},
               z_test={"name": z_name, "statistic": stat, "p_value": z_p},
               significant=None if t_p is None else t_p < ALPHA)
    return out


def summarize(logs: list[dict], baseline_bpb: float | None = None, baseline_loss: float | None = None) -> dict:
    """The submission.json content of a set of consistent, within-budget logs."""
    if not logs:
        raise PackError("no logs given")
    for log in logs:
        check_budget(log)
    check_consistent(logs)
    logs = sorted(logs, key=lambda g: g["seed"])
    runs = [run_entry(g) for g in logs]
    losses, bpbs = [r["val_loss"] for r in runs], [r["val_bpb"] for r in runs]
    n = len(runs)
    hardware = sorted({g.get("hardware") for g in logs if g.get("hardware")})
    versions = sorted({g.get("versions") for g in logs if g.get("versions")})
    out = {
        "val_bpb": statistics.fmean(bpbs), "val_loss": statistics.fmean(losses),
        "val_bpb_std": statistics.stdev(bpbs) if n > 1 else None,
        "val_loss_std": statistics.stdev(losses) if n > 1 else None,
        "std_note": "sample std (n-1)" if n > 1 else "one run: no std",
        "final_stage": logs[0]["final_stage"], "n_seeds": n, "seeds": [r["seed"] for r in runs],
        "bytes_total": max(r["total_bytes"] for r in runs), "bytes_code": logs[0]["code_bytes"],
        "bytes_model_max": max(r["model_bytes"] for r in runs), "size_limit_bytes": SIZE_LIMIT_BYTES,
        "code_sha256": logs[0]["code_sha256"],
        "hardware": hardware[0] if len(hardware) == 1 else (hardware or None),
        "versions": versions[0] if len(versions) == 1 else (versions or None),
        "significance": significance(losses, bpbs, baseline_bpb, baseline_loss),
        "hparams": {k: v for k, v in logs[0]["hparams"].items() if k not in RUN_HPARAMS | PATH_HPARAMS},
        "runs": runs,
    }
    return out


def _fmt(x, digits=5) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _ms(x) -> str:
    return "—" if x is None else f"{x / 1000:.1f} s"


def readme(name: str, date: str, summary: dict, packed: bool) -> str:
    runs, sig = summary["runs"], summary["significance"]
    stages = [s for s in STAGES.values() if any(s in r["stages"] for r in runs)]
    head = ["seed", "steps", "train time"] + [f"{s} loss / bpb" for s in stages] + [
        "model bytes", "code bytes", "total bytes", "eval time (quantized stages)"]
    rows = []
    for r in runs:
        cells = [str(r["seed"]), _fmt(r.get("steps")), _ms(r.get("train_time_ms"))]
        for s in stages:
            st = r["stages"].get(s)
            cells.append(f"{st['val_loss']:.5f} / {st['val_bpb']:.5f}" if st else "—")
        cells += [_fmt(r["model_bytes"]), _fmt(r["code_bytes"]), _fmt(r["total_bytes"]),
                  _ms(r.get("eval_time_quantized_total_ms"))]
        rows.append(cells)
    lines = [f"# {name}", "",
             f"{date} · {summary['n_seeds']} seed(s) · final stage `{summary['final_stage']}` · "
             f"hardware: {summary['hardware']}", "",
             f"**val_bpb {summary['val_bpb']:.5f}** (std {_fmt(summary['val_bpb_std'])}), "
             f"val_loss {summary['val_loss']:.5f} nats (std {_fmt(summary['val_loss_std'])}); "
             f"largest total {summary['bytes_total']:,} bytes of {SIZE_LIMIT_BYTES:,}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    lines += ["", "## Significance", ""]
    if "target_loss" in sig:
        lines.append(f"Claim: {sig['claim']}. Baseline val_bpb {_fmt(sig.get('baseline_bpb'))}, val_loss "
                     f"{sig['baseline_loss']:.5f} ({sig['baseline_loss_source']}); target {sig['target_loss']:.5f}; "
                     f"mean improvement {sig['improvement_nats']:.5f} nats.")
        for key in ("t_test", "z_test"):
            t = sig[key]
            p = "—" if t["p_value"] is None else f"{t['p_value']:.3g}"
            lines.append(f"- {t['name']}: statistic {_fmt(t['statistic'], 3)}, p = {p}")
        lines.append(f"- significant at alpha {ALPHA}: {sig['significant']}")
    if sig.get("note"):
        lines.append(f"- note: {sig['note']}")
    lines += ["", "## Files", "",
              f"- `train_gpt.py`: the file that ran ({'packed: LZMA-compressed, self-extracting' if packed else 'readable'}, "
              f"{summary['bytes_code']:,} bytes, sha256 `{summary['code_sha256']}`)"]
    if packed:
        lines.append("- `train_gpt_readable.py`: the readable source it was packed from (`python pack.py` rebuilds it)")
    lines += ["- `submission.json`: every number above, per seed", "- `train_seed*.log`: the training logs",
              "", "## Settings", "", "Shared by every run (SEED and paths aside):", "", "```"]
    lines += [f"{k}={v}" for k, v in summary["hparams"].items()]
    lines += ["```", "", f"Versions: {summary['versions']}", ""]
    world = re.search(r"world_size:(\d+)", summary["hardware"] or "") if isinstance(summary["hardware"], str) else None
    launcher = f"torchrun --standalone --nproc_per_node={world.group(1)}" if world else "python"
    lines += ["Run: `SEED=<seed> " + launcher + " train_gpt.py` (with the data layout of the upstream repository).", ""]
    return "\n".join(lines)


def find_shipped_code(sha: str, src: Path, packed_path: Path) -> tuple[bytes, bool]:
    """(bytes of the file whose sha256 the logs carry, whether it is a packed file)."""
    tried = []
    if packed_path.is_file():
        data = packed_path.read_bytes()
        tried.append(f"{packed_path} {sha256(data)}")
        if sha256(data) == sha:
            return data, True
    if src.is_file():
        data = src.read_bytes()
        tried.append(f"{src} {sha256(data)}")
        if sha256(data) == sha:
            return data, False
        fresh = pack_source(data, filename=src.name).wrapped
        tried.append(f"{src} packed now {sha256(fresh)}")
        if sha256(fresh) == sha:
            return fresh, True
    raise PackError(f"no file matches the logs' code_sha256 {sha}: tried " + "; ".join(tried or ["nothing"]))


def build_record(name: str, log_paths: list[Path], src: Path, packed_path: Path, out_dir: Path, date: str,
                 baseline_bpb: float | None, baseline_loss: float | None, force: bool = False) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise PackError(f"record name {name!r}: use letters, digits, '.', '_', '+', '-'")
    logs = [parse_log(p) for p in log_paths]
    for log in logs:
        check_record_time(log)
    summary = summarize(logs, baseline_bpb, baseline_loss)
    code, packed = find_shipped_code(summary["code_sha256"], src, packed_path)
    readable = src.read_bytes() if packed else code
    if packed and unpack(code) != minify_source(readable.decode("utf-8"), src.name).encode("utf-8"):
        raise PackError(f"{packed_path} was not packed from the current {src} (edited since?): "
                        "the readable copy would not match the file that ran")
    folder = out_dir / f"{date}_{name}"
    if folder.exists() and not force:
        raise PackError(f"{folder} exists; pass --force to replace it")
    record = {"name": name, "date": date, **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / "train_gpt.py").write_bytes(code)
        if packed:
            (tmp / "train_gpt_readable.py").write_bytes(readable)
        for log in logs:
            shutil.copyfile(log["path"], tmp / f"train_seed{log['seed']}.log")
        for run in record["runs"]:
            run["log"] = f"train_seed{run['seed']}.log"
        (tmp / "submission.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(name, date, summary, packed), encoding="utf-8")
        requirements = ROOT / "requirements.txt"
        if requirements.is_file():
            shutil.copyfile(requirements, tmp / "requirements.txt")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# -----------------------------------------------------------------------------
# BUDGET
# -----------------------------------------------------------------------------


def log_files(paths: list[str], must_exist: bool = True) -> list[Path]:
    """Files as given; a folder stands for its *.txt and *.log files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.txt")) + sorted(p.glob("*.log")))
        elif p.is_file() or not must_exist:
            out.append(p)
        else:
            raise PackError(f"no such log file or folder: {p}")
    return out


def found_logs(paths: list[str]) -> list[Path]:
    files = log_files(paths)
    if not files:
        raise PackError(f"no *.txt or *.log file in {' '.join(paths)}")
    return files


def largest_blob_in_logs(paths: list[str]) -> tuple[int, str] | None:
    best = None
    for path in log_files(paths, must_exist=False):
        if not path.is_file():
            continue
        for m in LINE_RES["serialized"].finditer(path.read_text(encoding="utf-8", errors="replace")):
            if best is None or int(m.group(2)) > best[0]:
                best = (int(m.group(2)), str(path))
    return best


def budget_report(code_bytes: int, blob: tuple[int, str] | None) -> tuple[str, bool]:
    if blob is None:
        return (f"budget: no model blob (no --artifact, no 'Serialized model quantized+' line in the logs): "
                f"code alone is {code_bytes:,} B of {SIZE_LIMIT_BYTES:,}"), True
    total = code_bytes + blob[0]
    ok = total <= SIZE_LIMIT_BYTES
    return (f"budget: code {code_bytes:,} + model {blob[0]:,} ({blob[1]}) = {total:,} B "
            f"{'<=' if ok else '>'} {SIZE_LIMIT_BYTES:,}: {'margin' if ok else 'OVER BUDGET by'} "
            f"{abs(SIZE_LIMIT_BYTES - total):,} B"), ok


def measure(source: bytes) -> str:
    """Table of what each minifier option and LZMA setting costs on `source`."""
    text = source.decode("utf-8")

    def packed_size(**overrides) -> tuple[int, int]:
        m = minify_source(text, **overrides).encode("utf-8")
        return len(m), len(compress(m, search=False)[0])

    lines = [f"raw {len(source):,} B; readable source through LZMA: {len(compress(source, search=False)[0]):,} B"]
    base = packed_size()
    lines.append(f"chosen options: minified {base[0]:,} B, lzma (lc=3 pb=0) {base[1]:,} B")
    flips = dict((k, not v) for k, v in MINIFY_FLAGS.items())
    flips["remove_annotations"] = True  # class-body annotations too
    for key, value in flips.items():
        m, c = packed_size(**{key: value})
        lines.append(f"  {key}={value}: minified {m - base[0]:+,} B, lzma {c - base[1]:+,} B")
    m, c = packed_size(remove_annotations=False)
    lines.append(f"  remove_annotations=False: minified {m - base[0]:+,} B, lzma {c - base[1]:+,} B")
    minified = minify_source(text).encode("utf-8")
    lines.append("lzma on the minified source:")
    for lc, pb in LC_PB_GRID:
        lines.append(f"  lc={lc} pb={pb}: {len(lzma_raw(minified, encoder_filter(len(minified), lc, pb))):,} B")
    stream, enc = compress(minified)
    lines.append(f"  searched best: {len(stream):,} B ({describe_filter(enc)})")
    lines.append(f"  .xz container preset 9e: {len(lzma.compress(minified, preset=9 | lzma.PRESET_EXTREME)):,} B")
    for encoding in ("latin1", "base85"):
        w = wrap(stream, decoder_filter(enc), encoding)
        lines.append(f"wrapped {encoding}: {len(w):,} B (+{100 * (len(w) - len(stream)) / len(stream):.2f}% over the stream)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="train_gpt.py", help="readable source (default train_gpt.py)")
    ap.add_argument("--out", default="build/train_gpt.py", help="packed file (default build/train_gpt.py)")
    ap.add_argument("--encoding", choices=("latin1", "base85"), default="latin1")
    ap.add_argument("--artifact", help="model blob whose size counts against the budget")
    ap.add_argument("--logs", nargs="+", metavar="PATH",
                    help="training logs or folders of them (pack: default logs/, for the largest model blob)")
    ap.add_argument("--measure", action="store_true", help="print what each option costs; write nothing")
    ap.add_argument("--record", metavar="NAME", help="build records/<date>_<NAME>/ from --logs")
    ap.add_argument("--summary", nargs="+", metavar="LOG", help="write only a submission.json from these logs")
    ap.add_argument("--out-json", default="submission.json", help="--summary's output (default submission.json)")
    ap.add_argument("--baseline-bpb", type=lambda v: None if v.lower() == "none" else float(v), default=1.07882,
                    help="val_bpb to beat (default 1.07882, the record); 'none' for logs of another data set")
    ap.add_argument("--baseline-loss", type=float, help="val_loss to beat, in nats (else converted from bpb)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out-dir", default="records")
    ap.add_argument("--force", action="store_true", help="replace an existing record folder")
    args = ap.parse_args(argv)
    try:
        if args.record:
            if not args.logs:
                ap.error("--record needs --logs LOG1 LOG2 ...")
            folder = build_record(args.record, found_logs(args.logs), Path(args.src), Path(args.out),
                                  Path(args.out_dir), args.date, args.baseline_bpb, args.baseline_loss, args.force)
            s = json.loads((folder / "submission.json").read_text())
            print(f"wrote {folder}: val_bpb {s['val_bpb']:.5f} over {s['n_seeds']} seed(s), "
                  f"t-test p = {s['significance'].get('t_test', {}).get('p_value')}")
            return 0
        if args.summary:
            summary = summarize([parse_log(p) for p in found_logs(args.summary)], args.baseline_bpb, args.baseline_loss)
            atomic_write(args.out_json, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
            print(f"wrote {args.out_json}: val_bpb {summary['val_bpb']:.5f} over {summary['n_seeds']} seed(s) "
                  f"on {summary['hardware']}")
            return 0
        source = Path(args.src).read_bytes()
        if args.measure:
            print(measure(source))
            return 0
        result = pack_source(source, args.encoding, Path(args.src).name)
        atomic_write(args.out, result.wrapped)
        print(result.report(args.out))
        if args.artifact:
            if not os.path.isfile(args.artifact):
                raise PackError(f"--artifact {args.artifact}: " + (
                    "is a folder, not a model blob" if os.path.isdir(args.artifact) else "no such file"))
            blob = (os.path.getsize(args.artifact), args.artifact)
        else:
            blob = largest_blob_in_logs(args.logs or ["logs"])
        line, ok = budget_report(len(result.wrapped), blob)
        print(line)
        return 0 if ok else 3
    except PackError as e:
        print(f"pack.py: refused: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
