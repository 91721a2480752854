"""specialise.py: the syntax-tree specialisation behind `pack.py --preset`. Each rule is checked on
small sources by running both versions: the specialised one must compute what the readable one
computes for every value a pin leaves possible, and refuse the values it rules out."""

from __future__ import annotations

import ast
import itertools
import random
import sys
import textwrap
import types

import pytest

import specialise
from specialise import specialise as spec

HEADER = textwrap.dedent('''\
    from __future__ import annotations
    import dataclasses


    def switch(default):
        return dataclasses.field(default=default, metadata={"switch": True})


    def choice(default, *others):
        return dataclasses.field(default=default, metadata={"choices": (default, *others)})


    PINNED: dict = {}
    PACKED_FOR = ""


    @dataclasses.dataclass
    class Hyperparameters:
        fast: bool = switch(False)
        extra: int = switch(0)
        gate: bool = switch(True)
        codec: str = choice("a", "b", "c")
        width: int = 4

        def __post_init__(self):
            for name, value in PINNED.items():
                if getattr(self, name) != value:
                    raise ValueError(f"{name.upper()}={getattr(self, name)!r}: packed for {PACKED_FOR}")
    ''')


# What the specialiser keeps is what the program's root statements reach: here, main.
FOOTER = '\n\nif __name__ == "__main__":\n    main(Hyperparameters())\n'


def program(body: str) -> str:
    return HEADER + textwrap.dedent(body) + FOOTER


def run(source: str, fn: str = "main", **settings):
    """`fn(Hyperparameters(**settings))` of the source loaded as a module (not as __main__)."""
    module = types.ModuleType("specialised_under_test")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(source, "<test>", "exec"), module.__dict__)
        return getattr(module, fn)(module.Hyperparameters(**settings))
    finally:
        del sys.modules[module.__name__]


def defined(source: str) -> set[str]:
    tree = ast.parse(source)
    out = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return out | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def test_off_switch_code_and_what_only_it_reached_go():
    source = program('''
        def fast_path(x):
            return helper(x) * 2

        def helper(x):
            return x + 1

        def main(h):
            out = [h.width]
            if h.fast:
                out.append(fast_path(h.width))
            if h.extra > 0:
                out.append(h.extra)
            if h.gate:
                out.append("gated")
            return out
        ''')
    result = spec(source, {"fast": False, "extra": 0}, "test.env")
    assert "fast_path" not in defined(result.source) and "helper" not in defined(result.source)
    assert {"fast_path", "helper", "switch", "choice"} <= set(result.removed)
    assert "h.gate" in result.source  # on: its test stays, so the setting stays free
    assert result.pinned == {"fast": False, "extra": 0}
    for gate in (True, False):
        assert run(result.source, gate=gate) == run(source, gate=gate)
    with pytest.raises(ValueError, match="FAST=True: packed for test.env"):
        run(result.source, fast=True)
    with pytest.raises(ValueError, match="EXTRA=3"):
        run(result.source, extra=3)


def test_a_choice_keeps_its_path_and_its_table_entry_alone():
    source = program('''
        TABLE = {"a": 1, "b": 2, "c": 3}

        def encode_b(x):
            return -x

        def main(h):
            if h.codec not in TABLE:
                raise ValueError(sorted(TABLE))
            scale = TABLE[h.codec]
            return encode_b(scale) if h.codec == "b" else scale
        ''')
    for codec in ("a", "b"):
        result = spec(source, {"codec": codec}, "x.env")
        table = next(n.value for n in ast.parse(result.source).body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TABLE")
        assert [k.value for k in table.keys] == [codec]
        assert ("encode_b" in defined(result.source)) == (codec == "b")
        assert run(result.source, codec=codec) == run(source, codec=codec)
        with pytest.raises(ValueError, match="CODEC='c'"):
            run(result.source, codec="c")


def test_values_that_follow_from_a_pin_propagate_where_they_provably_hold():
    source = program('''
        class Layer:
            def __init__(self, h):
                self.fused = h.fast          # assigned once in the file: a constant once FAST is pinned
                self.size = h.width          # not a constant

            def forward(self, x):
                if self.fused:
                    return fused(x)
                return x * self.size

        def fused(x):
            return x

        def encode(x, codec, level=9):
            if codec == "b":
                return ("b", x, level)
            return ("other", x, level)

        def decode(x, mode):
            if mode == "fast":
                return "fast"
            return "slow"

        def reassigned(x, mode):
            mode = mode or "slow"
            if mode == "fast":
                return "fast"
            return mode

        def main(h):
            found = h.codec              # a local assigned a constant once
            layer = Layer(h)
            return (layer.forward(3), encode(1, h.codec), encode(2, codec=h.codec), decode(1, "fast"),
                    decode(2, mode="slow"), reassigned(1, "fast"), found == "b")
        ''')
    result = spec(source, {"fast": False, "codec": "b"}, "x.env")
    assert "fused" not in defined(result.source)
    assert "other" not in result.source  # every call passes codec "b": the other branch went
    assert "'fast'" in result.source and "'slow'" in result.source  # decode gets two values: untouched
    assert "mode or" in result.source  # reassigned: its parameter is not propagated
    assert run(result.source, codec="b") == run(source, codec="b")


def test_a_function_passed_as_a_value_keeps_its_parameters():
    source = program('''
        def step(x, mode="slow"):
            return "fast" if mode == "fast" else "slow"

        def main(h):
            f = step
            return step(1), f(1, mode="fast")
        ''')
    result = spec(source, {}, "x.env")
    assert run(result.source) == run(source) == ("slow", "fast")


def test_calls_of_a_function_that_folded_away_go_with_it():
    source = program('''
        def check(h, device):
            if h.fast and device == "cpu":
                raise RuntimeError("no fast path on cpu")

        def main(h):
            check(h, "cpu")
            return 1
        ''')
    result = spec(source, {"fast": False}, "x.env")
    assert "check" not in defined(result.source) and "check" in result.removed
    assert run(result.source) == 1


def test_unused_methods_go_but_framework_hooks_stay():
    source = program('''
        class Model:
            def forward(self, x):
                return x + 1

            def fast_forward(self, x):
                return x

            def __call__(self, x):
                return self.fast_forward(x) if PINNED.get("never") else self.forward(x)

        def main(h):
            m = Model()
            if h.fast:
                return m.fast_forward(1)
            return m(1)
        ''')
    result = spec(source, {"fast": False}, "x.env")
    assert "Model.fast_forward" not in result.removed  # still named in __call__
    source2 = source.replace('self.fast_forward(x) if PINNED.get("never") else ', "")
    result2 = spec(source2, {"fast": False}, "x.env")
    assert "Model.fast_forward" in result2.removed and "def forward" in result2.source
    assert run(result2.source) == run(source2) == 2


def test_syntax_that_holds_none_or_stars_survives():
    """A dict display keeps None as the key of each `**mapping`: dropping it would silently turn
    `{**a, **b}` into `{}` (the specialiser once did)."""
    source = program('''
        def main(h, *args):
            a, b = {"x": 1}, {"y": h.width}
            merged = {**a, **b, "z": 3}
            lo, *rest = [1, 2, 3]
            s = slice(None, 2)
            return merged, rest, [0, 1, 2][s], f"{h.codec!r}-{h.width:>3}-{'lit'}"
        ''')
    result = spec(source, {"codec": "a"}, "x.env")
    assert run(result.source) == run(source) == ({"x": 1, "y": 4, "z": 3}, [2, 3], [0, 1], "'a'-  4-lit")


def test_statements_after_a_return_that_a_fold_exposed_go():
    source = program('''
        def main(h):
            if not h.fast:
                return "plain"
            unreachable_helper()
            return "fast"

        def unreachable_helper():
            return None
        ''')
    result = spec(source, {"fast": False}, "x.env")
    assert "unreachable_helper" not in defined(result.source)
    assert run(result.source) == "plain"


def test_pins_are_only_what_was_substituted_and_unknown_names_are_refused():
    source = program("\ndef main(h):\n    return h.width\n")
    assert spec(source, {"fast": False}, "x.env").pinned == {}  # never read: nothing to pin
    with pytest.raises(specialise.SpecialiseError, match="width"):
        spec(source, {"width": 4}, "x.env")
    assert specialise.switch_fields(ast.parse(source)) == {
        "fast": ("switch", False), "extra": ("switch", 0), "gate": ("switch", True), "codec": ("choice", "a")}
    assert specialise.substituted({"fast": "switch", "gate": "switch", "codec": "choice"},
                                  {"fast": False, "gate": True, "codec": "b"}) == {"fast": False, "codec": "b"}


def test_specialising_is_deterministic():
    source = program("\ndef main(h):\n    return h.codec == 'a' and h.fast\n")
    a = spec(source, {"fast": False, "codec": "a"}, "x.env")
    assert a == spec(source, {"fast": False, "codec": "a"}, "x.env")


# -----------------------------------------------------------------------------
# the folding rules, by evaluation: random expressions over pinned and free values
# -----------------------------------------------------------------------------

FREE = ("p", "q")  # free booleans or small ints
PINNED_VALUES = {"fast": False, "extra": 0, "codec": "b"}


def random_expr(rng: random.Random, depth: int) -> str:
    leaves = ["h.fast", "h.extra", "h.codec", "h.gate", "p", "q", "0", "1", "True", "False", "''", "'b'", "None"]
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(leaves)
    kind = rng.randrange(6)
    a, b = random_expr(rng, depth - 1), random_expr(rng, depth - 1)
    if kind == 0:
        return f"({a} and {b})"
    if kind == 1:
        return f"({a} or {b})"
    if kind == 2:
        return f"(not {a})"
    if kind == 3:
        if rng.random() < 0.4:  # identity only against singletons, as the script uses it (`is None`)
            return f"({a} {rng.choice(['is None', 'is not None', 'is True'])})"
        return f"({a} {rng.choice(['==', '!='])} {b})"
    if kind == 4:
        return f"({a} in ('b', 0, None, True))"
    return f"({a} if {random_expr(rng, depth - 1)} else {b})"


@pytest.mark.filterwarnings("ignore::SyntaxWarning")
@pytest.mark.parametrize("seed", range(4))
def test_folding_preserves_the_value_of_every_expression(seed):
    """Values (and truth values, in tests) of random and/or/not/compare/in/if-else expressions over
    pinned settings, an on switch and free variables are the same before and after."""
    rng = random.Random(seed)
    exprs = [random_expr(rng, 4) for _ in range(60)]
    body = "\n".join(f"    out.append({e})\n    out.append('T' if {e} else 'F')\n"
                     f"    out.append([x for x in (0, 1) if {e}])" for e in exprs)
    source = HEADER + f"\ndef main(h):\n    p, q = h.width % 3, h.width > 3\n    out = []\n{body}\n    return out\n" + FOOTER
    result = spec(source, PINNED_VALUES, "x.env")
    assert len(result.source) < len(ast.unparse(ast.parse(source)))  # something did fold
    for gate, width in itertools.product((True, False), (2, 3, 4, 5)):
        assert run(result.source, gate=gate, width=width, **PINNED_VALUES) == \
               run(source, gate=gate, width=width, **PINNED_VALUES)


def test_read_preset_names_the_file_and_line(tmp_path):
    p = tmp_path / "x.env"
    p.write_text("# comment\n\nA=1\nB = two words \nnot a setting\n")
    with pytest.raises(ValueError, match=r"x.env:5: expected KEY=VALUE"):
        specialise.read_preset(p)
    p.write_text("A=1\nB = two words \n")
    assert specialise.read_preset(p) == {"A": "1", "B": "two words"}
