"""Pack train_gpt.py into a small self-extracting file and check the byte budget.

  python pack.py [--src train_gpt.py] [--out build/train_gpt.py] [--encoding latin1|base85]
                 [--artifact PATH | --logs DIR_OR_LOG ...]
      minify -> raw LZMA2 -> self-extracting wrapper; verify; write atomically; print the sizes
      and the budget `packed file + model blob <= 16,000,000` (exit 3 when over it).
  python pack.py --measure [--src train_gpt.py]
      print what each minifier option and LZMA setting costs on the source.

Record folders and submission.json files are built by record.py; logs are read by logformat.py.

The packed file runs the minified source with exec() in its own module namespace, so
`python build/train_gpt.py` and `torchrun ... build/train_gpt.py` see `__name__ == "__main__"` and
`__file__` == the packed file: the code size and hash that the training script logs are those of
the file that ships. The packing needs python-minifier; the budget and the atomic writer come
from train_gpt.py (through logformat.py), which imports torch.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import lzma
import os
import sys
from pathlib import Path

from logformat import LINE_RES, SIZE_LIMIT_BYTES, LogError, log_files
from train_gpt import atomic_write


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
    # Module-level names get short names too (~-540 B on the record's pack), but KEPT_GLOBALS.
    # The packed file is a program, not a library: tests and tools import the readable file, and
    # nothing in it looks a global up by its name (no globals(), no pickled classes or functions;
    # the Triton kernels and custom ops resolve theirs through the renamed module). What a caller
    # sees is checked unchanged by check_interface(); `--keep-names` keeps every name.
    rename_globals=True,
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


# Module-level names renaming keeps, because something reads them as text: the builtins of the
# dataclass annotations (HPARAMS maps their names to types), Triton's `tl` (it recognises a
# kernel's compile-time arguments by annotations that start with "tl."), and the pins that
# pack.py and record.py read back.
KEPT_GLOBALS = ("str", "int", "float", "bool", "tl", "PINNED", "PACKED_FOR")


def minify_options() -> dict:
    import python_minifier

    # Variable annotations go; argument and return annotations go too, but before the minifier
    # sees the source (strip_annotations), because some must stay. Class-body annotations stay
    # because they *are* the fields of dataclasses and NamedTuples.
    annotations = python_minifier.RemoveAnnotationsOptions(
        remove_variable_annotations=True, remove_return_annotations=False,
        remove_argument_annotations=False, remove_class_attribute_annotations=False)
    return dict(MINIFY_FLAGS, remove_annotations=annotations, preserve_globals=list(KEPT_GLOBALS))


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


def minify_source(source: str, filename: str = "train_gpt.py", keep_names: bool = False, **overrides) -> str:
    import python_minifier

    options = {**minify_options(), "preserve_locals": constexpr_arguments(source), **overrides}
    if keep_names:
        options["rename_globals"] = False
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


def interface_names(source: str, globals_renamed: bool = False) -> dict[str, set]:
    """What minification must leave untouched: module-level names, class attributes, attribute
    accesses (state-dict keys come from `self.tok_emb`, ...), keyword arguments, parameter names
    and string constants (environment variable names, log keys). globals_renamed: module-level
    names may change (KEPT_GLOBALS aside), so classes and functions are known by their contents."""
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
            cls = "<class>" if globals_renamed and node in tree.body else node.name
            out["class attributes"].update(f"{cls}.{n}" for n in _scope_bindings(node.body))
        elif isinstance(node, ast.Attribute):
            out["attributes"].add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            out["keywords"].add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Names a caller can pass by keyword. Renaming a method's receiver (`self`), *args,
            # **kwargs or a positional-only argument is invisible to callers.
            args = node.args.args[1:] if id(node) in methods else node.args.args
            name = node.name if id(node) in methods or (node in tree.body and not globals_renamed) else "<local>"
            out["parameters"].add(f"{name}({','.join(x.arg for x in args + node.args.kwonlyargs)})")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in literal_statements and id(node) not in fstring_parts):
            out["strings"].add(node.value)
    return out


def check_interface(readable: str, minified: str, globals_renamed: bool = False) -> None:
    before, after = interface_names(readable, globals_renamed), interface_names(minified, globals_renamed)
    if globals_renamed:  # the names themselves may change; the kept ones may not
        before["module names"] &= set(KEPT_GLOBALS)
        after["module names"] &= set(KEPT_GLOBALS)
    for kind in before:
        lost, gained = before[kind] - after[kind], after[kind] - before[kind]
        if lost or gained:
            raise PackError(f"minification changed {kind}: lost {sorted(lost)[:8]} gained {sorted(gained)[:8]}; "
                            f"an unsafe minifier option is on or python-minifier {minifier_version()} misbehaves")


# -----------------------------------------------------------------------------
# COMPRESS
# Two codecs for the minified text. brotli (the default) at quality 11, window just large enough
# for the text: its built-in dictionary of common words and code fragments makes it about 4%
# smaller than LZMA on this source (`--measure` prints both), and the run needs the brotli module
# anyway (its artifact is brotli). lzma: a raw LZMA2 stream, no .xz container (~-85 B) and no
# header, the filter spec travels in the decompressor line instead. Text has no 4-byte structure,
# so pb=0 beats the default pb=2 (~-20 B); lc=3 is the best literal context (`--measure` prints
# the lc x pb grid). Measured and left out: lp=1 (+170 B), a delta filter (+3.6 kB), BCJ x86/ARM
# (no change: they rewrite machine-code branches, which text does not have).
# -----------------------------------------------------------------------------

CODECS = ("brotli", "lzma")
LC_PB_GRID = [(lc, pb) for lc in range(5) for pb in range(3)]  # --measure only
MF_NAMES = {lzma.MF_BT4: "bt4", lzma.MF_BT3: "bt3", lzma.MF_BT2: "bt2", lzma.MF_HC4: "hc4", lzma.MF_HC3: "hc3"}


def dict_size_for(n: int) -> int:
    """Smallest power of two >= n (liblzma's minimum is 4 KiB): a larger dictionary cannot find
    more matches in n bytes, and the decoder then allocates only that much."""
    return max(4096, 1 << max(0, n - 1).bit_length())


def brotli_window_for(n: int) -> int:
    """lgwin of the smallest brotli window (2**lgwin - 16 bytes) that holds n bytes (10..24)."""
    return max(10, min(24, (n + 15).bit_length()))


def encoder_filter(data_len: int, lc: int = 3, pb: int = 0) -> dict:
    return {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size_for(data_len),
            "lc": lc, "lp": 0, "pb": pb, "nice_len": 273, "mf": lzma.MF_BT4}


def decoder_filter(enc: dict) -> dict:
    """The LZMA2 decoder reads only the stream's properties (dictionary size, lc, lp, pb); preset,
    nice_len, mf and depth steer the encoder's search and leave no trace in the stream."""
    return {k: enc[k] for k in ("id", "dict_size", "lc", "lp", "pb")}


def describe_filter(enc: dict) -> str:
    if enc.get("codec") == "brotli":
        return f"brotli quality 11 lgwin={enc['lgwin']}"
    return (f"raw LZMA2 preset 9e dict_size={enc['dict_size']} lc={enc['lc']} lp={enc['lp']} pb={enc['pb']} "
            f"nice_len={enc['nice_len']} mf={MF_NAMES.get(enc['mf'], enc['mf'])}")


def lzma_raw(data: bytes, enc: dict) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[enc])


def compress(data: bytes, codec: str = "brotli") -> tuple[bytes, dict]:
    """(stream, encoder settings): {"codec": "brotli", "lgwin": ...} or an LZMA2 encoder filter."""
    if codec == "brotli":
        import brotli

        lgwin = brotli_window_for(len(data))
        return brotli.compress(data, quality=11, lgwin=lgwin), {"codec": "brotli", "lgwin": lgwin}
    if codec == "lzma":
        enc = encoder_filter(len(data))
        return lzma_raw(data, enc), enc
    raise PackError(f"unknown codec {codec!r} (one of {', '.join(CODECS)})")


def decompress_stream(stream: bytes, filters: list | None) -> bytes:
    """The inverse of compress(): filters None for brotli, else the LZMA2 decoder filters."""
    if filters is None:
        import brotli

        return brotli.decompress(stream)
    return lzma.decompress(stream, format=lzma.FORMAT_RAW, filters=filters)


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


def wrap(stream: bytes, dec: dict | None, encoding: str = "latin1") -> bytes:
    """Self-extracting Python source that runs the payload in its own module namespace. dec: the
    LZMA2 decoder filter, or None for a brotli stream."""
    module = "brotli" if dec is None else "lzma"
    tail = ").decode()\n" if dec is None else f",lzma.FORMAT_RAW,filters={_filter_literal(dec)}).decode()\n"
    if encoding == "latin1":
        return (LATIN1_HEADER + f"import {module},linecache\n".encode()
                + f's={module}.decompress("""'.encode() + escape_latin1(stream) + b'""".encode("latin-1")'
                + tail.encode() + _RUN_LINES.encode())
    if encoding == "base85":
        return (f"import base64,{module},linecache\n".encode()
                + f's={module}.decompress(base64.b85decode("'.encode() + base64.b85encode(stream) + b'")'
                + tail.encode() + _RUN_LINES.encode())
    raise ValueError(f"unknown encoding {encoding!r} (latin1 or base85)")


def _eval_filters(node: ast.expr) -> list:
    class Names(ast.NodeTransformer):
        def visit_Attribute(self, n):
            if isinstance(n.value, ast.Name) and n.value.id == "lzma" and n.attr.isupper():
                return ast.copy_location(ast.Constant(getattr(lzma, n.attr)), n)
            raise PackError(f"unexpected name in the filter spec: {ast.unparse(n)}")

    return ast.literal_eval(Names().visit(node))


def unwrap(packed: bytes) -> tuple[bytes, list | None]:
    """(stream, filters) read back from a packed file's text, the way Python reads it; filters is
    None for a brotli stream."""
    tree = ast.parse(packed)  # honours the coding declaration, like the interpreter
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "decompress"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in CODECS):
            break
    else:
        raise PackError("no lzma.decompress(...) or brotli.decompress(...) call in the packed file")
    data = node.args[0]
    if (isinstance(data, ast.Call) and isinstance(data.func, ast.Attribute) and data.func.attr == "encode"
            and isinstance(data.func.value, ast.Constant) and isinstance(data.func.value.value, str)):
        stream = data.func.value.value.encode(ast.literal_eval(data.args[0]))
    elif (isinstance(data, ast.Call) and isinstance(data.func, ast.Attribute) and data.func.attr == "b85decode"
          and isinstance(data.args[0], ast.Constant)):
        stream = base64.b85decode(data.args[0].value)
    else:
        raise PackError(f"unrecognised payload expression: {ast.unparse(data)[:80]}")
    if node.func.value.id == "brotli":
        return stream, None
    if ast.unparse(node.args[1]) != "lzma.FORMAT_RAW":
        raise PackError(f"payload format is {ast.unparse(node.args[1])}, expected lzma.FORMAT_RAW")
    filters = _eval_filters(next(k.value for k in node.keywords if k.arg == "filters"))
    return stream, filters


def unpack(packed: bytes) -> bytes:
    """The source a packed file runs."""
    return decompress_stream(*unwrap(packed))


def packed_for(source: bytes) -> tuple[str, dict]:
    """(PACKED_FOR, PINNED) of a source (a packed file's payload): ('', {}) when not specialised."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in ("PACKED_FOR", "PINNED"):
                    found[t.id] = ast.literal_eval(node.value)
    return found.get("PACKED_FOR", ""), found.get("PINNED", {})


# -----------------------------------------------------------------------------
# SPECIALISE
# The packed file holds only the code of one preset's switches (specialise.py does it on the
# syntax tree); the preset is read as the readable file reads its environment.
# -----------------------------------------------------------------------------

RECORD_DEFAULTS = "the record's defaults"  # PACKED_FOR of a pack without --preset


def load_source_module(source: str, filename: str):
    """The readable source as a fresh module (importing it has no side effects: tested), so that its
    own settings table and parsing read the preset."""
    import types

    name = f"_packing_{Path(filename).stem}"
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def preset_pins(source: str, preset: str | None, filename: str = "train_gpt.py") -> dict:
    """What specialise() substitutes for this preset (None: the record's defaults): every choice,
    and the switches the preset leaves off. A preset key that is no setting but resembles one is
    refused, as a value its setting cannot parse."""
    from specialise import SpecialiseError, read_preset, substituted, switch_fields

    try:
        fields = switch_fields(ast.parse(source))
    except SpecialiseError as e:
        raise PackError(f"{filename} cannot be specialised ({e}); pack it whole with --every-switch") from None
    env = {}
    if preset is not None:
        try:
            env = read_preset(preset)
        except (OSError, ValueError) as e:
            raise PackError(f"--preset {preset}: {e}") from None
    module = load_source_module(source, filename)
    misspelt = module.misspelt_settings(env)
    if misspelt:
        raise PackError(f"--preset {preset}: " + "; ".join(misspelt))
    try:
        values = {name: default for name, _, default in module.HPARAMS}
        values.update(module.env_settings(env))
    except ValueError as e:
        raise PackError(f"--preset {preset}: {e}") from None
    return substituted({k: kind for k, (kind, _) in fields.items()}, {k: values[k] for k in fields})


def specialise_source(source: bytes, preset: str | None, filename: str = "train_gpt.py"):
    """The Specialised result (source, pins, removed definitions) of the readable source."""
    from specialise import SpecialiseError, specialise

    text = source.decode("utf-8")
    try:
        return specialise(text, preset_pins(text, preset, filename), preset or RECORD_DEFAULTS)
    except SpecialiseError as e:
        raise PackError(f"{filename}: {e}") from None


# -----------------------------------------------------------------------------
# PACK
# -----------------------------------------------------------------------------


class Packed:
    def __init__(self, raw: bytes, minified: bytes, stream: bytes, enc: dict, wrapped: bytes, encoding: str):
        self.raw, self.minified, self.stream, self.enc, self.wrapped = raw, minified, stream, enc, wrapped
        self.encoding = encoding

    @property
    def overhead(self) -> float:
        """Bytes of the packed file over the compressed stream, as a fraction of the stream."""
        return (len(self.wrapped) - len(self.stream)) / len(self.stream)

    def report(self, out: str) -> str:
        r, m, s, w = len(self.raw), len(self.minified), len(self.stream), len(self.wrapped)
        codec = "brotli" if self.enc.get("codec") == "brotli" else "lzma"
        return "\n".join([
            f"source     {r:>9,} B",
            f"minified   {m:>9,} B  ({100 * m / r:.1f}% of the source; python-minifier {minifier_version()})",
            f"{codec:<10} {s:>9,} B  ({describe_filter(self.enc)})",
            f"wrapped    {w:>9,} B  {out}  ({self.encoding}; +{100 * self.overhead:.2f}% over the stream)",
        ])


def pack_source(source: bytes, encoding: str = "latin1", filename: str = "train_gpt.py",
                codec: str = "brotli", keep_names: bool = False) -> Packed:
    """Minify, compress and wrap `source`, then prove the wrapper gives the minified text back."""
    text = source.decode("utf-8")
    compile(text, filename, "exec")
    minified_text = minify_source(text, filename, keep_names)
    compile(minified_text, filename, "exec")
    check_interface(text, minified_text, globals_renamed=not keep_names)
    minified = minified_text.encode("utf-8")
    stream, enc = compress(minified, codec)
    wrapped = wrap(stream, None if codec == "brotli" else decoder_filter(enc), encoding)
    compile(wrapped, filename, "exec")
    if unpack(wrapped) != minified:
        raise PackError("the payload read back from the packed text differs from the minified source")
    return Packed(source, minified, stream, enc, wrapped, encoding)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -----------------------------------------------------------------------------
# BUDGET
# -----------------------------------------------------------------------------


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


def measure_pins(source: bytes, preset: str | None, filename: str = "train_gpt.py") -> list[str]:
    """What each pin of the preset saves: the compressed size with that setting left free (its
    code back in) less the size with every pin, and the definitions it alone removes."""
    from specialise import specialise

    text = source.decode("utf-8")
    pins = preset_pins(text, preset, filename)
    label = preset or RECORD_DEFAULTS

    def size(spec) -> int:
        return len(compress(minify_source(spec.source, filename).encode("utf-8"))[0])

    full = specialise(text, pins, label)
    base = size(full)
    unspecialised = len(compress(minify_source(text, filename).encode("utf-8"))[0])
    lines = [f"specialised to {label}: {base:,} B of brotli stream (every switch: {unspecialised:,} B, so "
             f"{unspecialised - base:,} B saved); {len(full.pinned)} settings pinned, {len(full.removed)} definitions "
             "removed; what each pin saves:"]
    rows = []
    for name in full.pinned:
        alone = specialise(text, {k: v for k, v in pins.items() if k != name}, label)
        gone = [r for r in full.removed if r not in alone.removed]
        rows.append((size(alone) - base, name, gone))
    for saved, name, gone in sorted(rows, key=lambda r: (-r[0], r[1])):
        lines.append(f"  {name.upper()}={pins[name]!r}: {saved:,} B" + (f"  (removes {', '.join(gone)})" if gone else ""))
    return lines


def measure(source: bytes, preset: str | None = None, every_switch: bool = False,
            filename: str = "train_gpt.py") -> str:
    """What the specialisation, each minifier option and each codec setting cost on `source`."""
    lines = []
    if not every_switch:
        lines += measure_pins(source, preset, filename)
        source = specialise_source(source, preset, filename).source.encode("utf-8")
    text = source.decode("utf-8")

    def packed_size(**overrides) -> tuple[int, int]:
        m = minify_source(text, **overrides).encode("utf-8")
        return len(m), len(compress(m)[0])

    lines.append(f"source {len(source):,} B; straight through brotli: {len(compress(source)[0]):,} B")
    base = packed_size()
    lines.append(f"chosen options: minified {base[0]:,} B, brotli {base[1]:,} B")
    flips = dict((k, not v) for k, v in MINIFY_FLAGS.items())
    flips["remove_annotations"] = True  # class-body annotations too
    for key, value in flips.items():
        m, c = packed_size(**{key: value})
        lines.append(f"  {key}={value}: minified {m - base[0]:+,} B, brotli {c - base[1]:+,} B")
    m, c = packed_size(remove_annotations=False)
    lines.append(f"  remove_annotations=False: minified {m - base[0]:+,} B, brotli {c - base[1]:+,} B")
    minified = minify_source(text).encode("utf-8")
    stream, enc = compress(minified, "lzma")
    lines.append(f"codecs on the minified source: brotli {len(compress(minified)[0]):,} B "
                 f"({describe_filter(compress(minified)[1])}); lzma {len(stream):,} B ({describe_filter(enc)})")
    lines.append("lzma literal/position settings:")
    for lc, pb in LC_PB_GRID:
        lines.append(f"  lc={lc} pb={pb}: {len(lzma_raw(minified, encoder_filter(len(minified), lc, pb))):,} B")
    lines.append(f"  .xz container preset 9e: {len(lzma.compress(minified, preset=9 | lzma.PRESET_EXTREME)):,} B")
    for codec in CODECS:
        stream, enc = compress(minified, codec)
        for encoding in ("latin1", "base85"):
            w = wrap(stream, None if codec == "brotli" else decoder_filter(enc), encoding)
            lines.append(f"wrapped {codec} {encoding}: {len(w):,} B "
                         f"(+{100 * (len(w) - len(stream)) / len(stream):.2f}% over the stream)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="train_gpt.py", help="readable source (default train_gpt.py)")
    ap.add_argument("--out", default="build/train_gpt.py", help="packed file (default build/train_gpt.py)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--preset", metavar="FILE",
                       help="KEY=VALUE settings to specialise to (default: the record's defaults)")
    which.add_argument("--every-switch", action="store_true",
                       help="pack every switch's code, specialised to nothing (larger; no settings pinned)")
    ap.add_argument("--encoding", choices=("latin1", "base85"), default="latin1")
    ap.add_argument("--codec", choices=CODECS, default="brotli")
    ap.add_argument("--keep-names", action="store_true",
                    help="keep module-level names (larger), so that the packed file imports as the readable one")
    ap.add_argument("--artifact", help="model blob whose size counts against the budget")
    ap.add_argument("--logs", nargs="+", metavar="PATH",
                    help="training logs or folders of them (default logs/), for the largest model blob")
    ap.add_argument("--measure", action="store_true", help="print what each pin and option costs; write nothing")
    args = ap.parse_args(argv)
    try:
        source = Path(args.src).read_bytes()
        filename = Path(args.src).name
        if args.measure:
            print(measure(source, args.preset, args.every_switch, filename))
            return 0
        spec = None
        if not args.every_switch:
            spec = specialise_source(source, args.preset, filename)
            source = spec.source.encode("utf-8")
        result = pack_source(source, args.encoding, filename, args.codec, args.keep_names)
        atomic_write(args.out, result.wrapped)
        if spec is not None:
            pins = " ".join(f"{k.upper()}={v!r}" for k, v in spec.pinned.items())
            print(f"specialised to {args.preset or RECORD_DEFAULTS}: pinned {pins or 'nothing'}; "
                  f"removed {len(spec.removed)} definitions")
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
    except (PackError, LogError) as e:
        print(f"pack.py: refused: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
