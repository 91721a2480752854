"""The settings tables of README.md and docs/settings.md, generated from train_gpt.py's
`Hyperparameters` so that they cannot drift: each row is a field (its environment variable, its
default, whether it is a switch or a choice and the values a choice takes) with the comment
written beside it in train_gpt.py (or, for a field without one, the comment block above it).

  python settings_table.py           print both tables
  python settings_table.py --write   replace them in README.md and docs/settings.md
  python settings_table.py --check   exit 1, naming the file, if either file's table is stale

A table sits between `<!-- settings-table:KIND -->` and `<!-- /settings-table -->` (KIND is
`switches`, the README's table of the switches that are off by default and the choices, or `all`,
every setting by section).
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "train_gpt.py"
TARGETS = {"switches": ROOT / "README.md", "all": ROOT / "docs" / "settings.md"}
END = "<!-- /settings-table -->"


def begin(kind: str) -> str:
    return f"<!-- settings-table:{kind} -->"


class Field:
    def __init__(self, name: str, annotation: str, kind: str, choices: tuple, section: str, comment: str):
        self.name, self.annotation, self.kind, self.choices = name, annotation, kind, choices
        self.section, self.comment = section, comment


def comments_by_line(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string[1:].strip() for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def read_fields(source: str) -> list[Field]:
    """The fields of Hyperparameters in order, with their markers, sections and comments."""
    tree = ast.parse(source)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters"), None)
    if cls is None:
        raise SystemExit(f"{SOURCE}: no class Hyperparameters")
    comments, lines = comments_by_line(source), source.splitlines()
    fields, section, previous_end = [], "", cls.body[0].end_lineno if cls.body else cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = node.end_lineno
            continue
        above = []  # comment lines between the previous statement and this one
        for n in range(previous_end + 1, node.lineno):
            if lines[n - 1].strip().startswith("#"):
                above.append(comments[n])
        # Comment lines above a field that has its own comment open a section ("# model"); above
        # a field without one, they are its description.
        if above and node.lineno in comments:
            section, above = " ".join(above), []
        kind, choices = "", ()
        if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            if node.value.func.id == "switch":
                kind = "switch"
            elif node.value.func.id == "choice":
                kind, choices = "choice", tuple(ast.literal_eval(a) for a in node.value.args)
        comment = comments.get(node.lineno) or " ".join(above)
        if not comment:
            raise SystemExit(f"{SOURCE}:{node.lineno}: setting {node.target.id} has no comment to describe it")
        fields.append(Field(node.target.id, ast.unparse(node.annotation), kind, choices, section, comment))
        previous_end = node.end_lineno
    return fields


def default_text(value) -> str:
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def defaults() -> dict:
    sys.path.insert(0, str(ROOT))
    import train_gpt

    return {name: default for name, _, default in train_gpt.HPARAMS}


def switches_table(fields: list[Field], values: dict) -> str:
    """The switches that are off by default and the choices: what goes beyond the record."""
    rows = ["| variable | default | kind | what it does |", "| --- | --- | --- | --- |"]
    for f in fields:
        if f.kind == "choice" or (f.kind == "switch" and not values[f.name]):
            kind = "switch" if f.kind == "switch" else "choice: " + ", ".join(f"`{c}`" for c in f.choices)
            rows.append(f"| `{f.name.upper()}` | `{default_text(values[f.name])}` | {kind} | {escape(f.comment)} |")
    return "\n".join(rows)


def all_table(fields: list[Field], values: dict) -> str:
    out, section = [], None
    for f in fields:
        if f.section != section:
            section = f.section
            out += ["", f"**{section or 'settings'}**", "", "| variable | type | default | kind | what it does |",
                    "| --- | --- | --- | --- | --- |"]
        kind = {"switch": "switch", "choice": "choice: " + ", ".join(f"`{c}`" for c in f.choices)}.get(f.kind, "")
        out.append(f"| `{f.name.upper()}` | {escape(f.annotation)} | `{default_text(values[f.name])}` | {kind} | "
                   f"{escape(f.comment)} |")
    return "\n".join(out).strip("\n")


def tables() -> dict[str, str]:
    fields, values = read_fields(SOURCE.read_text(encoding="utf-8")), defaults()
    return {"switches": switches_table(fields, values), "all": all_table(fields, values)}


def replaced(text: str, kind: str, table: str, path: Path) -> str:
    start, end = text.find(begin(kind)), text.find(END, text.find(begin(kind)))
    if start < 0 or end < 0:
        raise SystemExit(f"{path}: no {begin(kind)} ... {END} block to hold the table")
    return text[:start] + begin(kind) + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the tables in README.md and docs/settings.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file's table is not the generated one")
    args = ap.parse_args(argv)
    stale = []
    for kind, table in tables().items():
        path = TARGETS[kind]
        if not (args.write or args.check):
            print(f"{begin(kind)}\n{table}\n{END}\n")
            continue
        text = path.read_text(encoding="utf-8")
        new = replaced(text, kind, table, path)
        if args.write and new != text:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
        elif args.check and new != text:
            stale.append(str(path.relative_to(ROOT)))
    if stale:
        print(f"settings tables are stale in {', '.join(stale)}: run python settings_table.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
