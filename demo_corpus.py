"""The --demo corpus of prepare_data.py: docstrings of the Python standard library.

  python demo_corpus.py OUT_JSON
      writes the documents as one JSON list. prepare_data.demo_documents() runs this file in a
      fresh Python process: importing the standard library's modules may print or register
      handlers, and modules the caller already imported would change what is collected (importing
      torch replaces inspect.getfile, whose docstring would go missing). Standard library only.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Iterator

# Standard-library modules that must not be imported for their docstrings:
# they print (this), open a browser (antigravity), start GUIs or need a
# display (tkinter, turtle, idlelib), grab the terminal (readline), write
# cache files (lib2to3), are shadowed by third-party code (distutils under
# setuptools) or are test suites.
_DEMO_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline",
    "rlcompleter", "lib2to3", "distutils", "ensurepip", "pydoc_data", "test", "venv",
}
_DEMO_SKIP_SUBPACKAGES = {"test", "tests", "encodings"}  # tests run code; codecs have no prose


def _stdlib_module_names() -> Iterator[str]:
    """Importable public standard-library modules, sorted, subpackages included."""
    import importlib
    import pkgutil

    def walk(name: str) -> Iterator[str]:
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit):  # platform-specific or missing optional parts
            return
        yield name
        if hasattr(module, "__path__") and name not in _DEMO_SKIP_SUBPACKAGES:
            children = sorted(info.name for info in pkgutil.iter_modules(module.__path__, name + "."))
            for child in children:
                last = child.rsplit(".", 1)[-1]
                if last.startswith("_") or last in _DEMO_SKIP_SUBPACKAGES:
                    continue  # private modules, __main__ (runs code), test suites
                yield from walk(child)

    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in _DEMO_SKIP_MODULES:
            yield from walk(name)


def _collect_stdlib_docstrings() -> list[str]:
    """Runs in the fresh process that prepare_data.demo_documents starts."""
    import inspect
    import warnings

    warnings.simplefilter("ignore")
    # Make sure "import x" finds the standard library, not a file next to this script.
    script_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", script_dir)]

    seen_objects: set[int] = set()
    seen_texts: set[str] = set()
    documents: list[str] = []

    def clean(obj) -> str | None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            return None
        text = inspect.cleandoc(doc).strip()
        # Identical docstrings (shared by many classes) would only teach repetition.
        if not text or text in seen_texts:
            return None
        seen_texts.add(text)
        return text

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for module_name in _stdlib_module_names():
            module = sys.modules[module_name]
            text = clean(module)
            if text:
                documents.append(text)
            namespace = vars(module)
            for attr in sorted(namespace):
                obj = namespace[attr]
                if attr.startswith("_") or id(obj) in seen_objects:
                    continue
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                owner = getattr(obj, "__module__", None) or ""
                # Only objects defined in this module (or its private C helper):
                # re-exports are picked up where they are defined.
                if owner not in (module_name, "_" + module_name) and not owner.startswith(module_name + "."):
                    continue
                seen_objects.add(id(obj))
                parts = [clean(obj)]
                if inspect.isclass(obj):
                    for member_name in sorted(vars(obj)):
                        if member_name.startswith("_"):
                            continue
                        member = vars(obj)[member_name]
                        if isinstance(member, (staticmethod, classmethod)):
                            member = member.__func__
                        if inspect.isroutine(member) or isinstance(member, property):
                            parts.append(clean(member))
                parts = [p for p in parts if p]
                if parts:
                    documents.append("\n\n".join(parts))
    return documents


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python demo_corpus.py OUT_JSON")
    Path(sys.argv[1]).write_text(json.dumps(_collect_stdlib_docstrings(), ensure_ascii=False), encoding="utf-8")
