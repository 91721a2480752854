"""Specialise train_gpt.py to one preset's switches, on its syntax tree (used by `pack.py --preset`).

A switch is a setting declared `name: type = switch(default)` in Hyperparameters, off when False,
0, '' or None; a choice is one declared `name: str = choice(default, *others)`, which picks one of
several code paths. The specialised source holds only the code the preset's switches and choices
execute; it computes what the readable file computes for every setting it leaves free, and
refuses the others (the pins, see below) when it is constructed.

Rounds, repeated until the tree stops changing:
1. Substitute. Every choice, and every switch that is off, becomes its value wherever the code
   reads it: `h.NAME`, `<anything>.h.NAME`, or `self.NAME` inside Hyperparameters (the script calls its
   config `h` throughout). A switch that is on stays a variable, so its own test still runs and
   the setting stays free: its off value then runs code that is still there.
2. Propagate what follows from constants, each only where it provably holds for the whole file:
   an attribute a class assigns once in the whole file (`self.fused = h.fused_mlp`); a parameter of
   a module-level function that every call in the file passes the same constant (or leaves at a
   constant default) and the body never rebinds; a local assigned a constant once, at the top
   level of its function, and never rebound.
3. Fold expressions over constants (not, and/or, comparisons, `in` over a literal or a module-level
   literal table, `a if c else b`), the `if`/`while` statements they decide, statements after a
   return or raise, and calls of module functions whose body folded away.
4. Remove what nothing reaches: module-level functions, classes, constants and imports; methods
   whose name appears nowhere in the file (but `forward` and dunders, which the frameworks call);
   the entries of a module-level dict that the file only ever indexes with constants.

The pins: every switch substituted in round 1 is written into the file's PINNED dict, so that
Hyperparameters.validate() refuses any other value at construction, naming the setting, before
any work is done. The readable file's PINNED is empty.
"""

from __future__ import annotations

import ast
import operator
from collections import Counter
from typing import NamedTuple

MARKERS = ("switch", "choice")  # the field constructors that mark a switch or a choice in Hyperparameters
CONFIG_CLASS = "Hyperparameters"
CONFIG_NAME = "h"  # the name the script gives its config everywhere
FRAMEWORK_METHODS = {"forward"}  # called by torch by name, never written `.forward(` in the file


class SpecialiseError(Exception):
    """A source the specialiser cannot handle; the message names the construct."""


class Specialised(NamedTuple):
    source: str  # the specialised module, unparsed (comments gone; the minifier drops them anyway)
    pinned: dict  # {setting name: value} written into PINNED, in field order
    removed: list  # names of the module-level definitions and methods removed, in source order


# -----------------------------------------------------------------------------
# SWITCHES
# -----------------------------------------------------------------------------


def _config_class(tree: ast.Module) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == CONFIG_CLASS:
            return node
    raise SpecialiseError(f"no class {CONFIG_CLASS} at module level")


def _marker(node: ast.stmt) -> str | None:
    """'switch' or 'choice' for a field `name: T = switch(...)` / `choice(...)`, else None."""
    if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id in MARKERS):
        return node.value.func.id
    return None


def switch_fields(tree: ast.Module) -> dict[str, tuple[str, object]]:
    """{field name: ('switch' or 'choice', default)} of Hyperparameters, in field order."""
    out = {}
    for node in _config_class(tree).body:
        kind = _marker(node)
        if kind is None:
            continue
        if not node.value.args or node.value.keywords or (kind == "switch" and len(node.value.args) != 1):
            raise SpecialiseError(f"{node.target.id}: {kind}() takes the default (and a choice its other values)")
        out[node.target.id] = (kind, ast.literal_eval(node.value.args[0]))
    return out


def substituted(kinds: dict[str, str], values: dict[str, object]) -> dict[str, object]:
    """The settings round 1 replaces by their value: every choice, and the switches that are off."""
    return {k: v for k, v in values.items() if kinds[k] == "choice" or not v}


# -----------------------------------------------------------------------------
# HELPERS
# -----------------------------------------------------------------------------

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_TERMINAL = (ast.Return, ast.Raise, ast.Continue, ast.Break)


def _const(value, like: ast.AST) -> ast.Constant:
    return ast.copy_location(ast.Constant(value), like)


def _is_const(node) -> bool:
    return isinstance(node, ast.Constant)


def _pure(node: ast.AST) -> bool:
    """Evaluating it has no effect beyond attribute reads: it may be dropped from a test."""
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _pure(node.value)
    if isinstance(node, ast.UnaryOp):
        return _pure(node.operand)
    if isinstance(node, (ast.BoolOp, ast.Tuple, ast.List)):
        return all(map(_pure, node.values if isinstance(node, ast.BoolOp) else node.elts))
    if isinstance(node, ast.Compare):
        return _pure(node.left) and all(map(_pure, node.comparators))
    if isinstance(node, ast.Subscript):
        return _pure(node.value) and _pure(node.slice)
    return False


def _literal_keys(node: ast.AST):
    """The constant elements or keys of a tuple, list, set or dict display, else None."""
    elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
    if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or not all(map(_is_const, elts)):
        return None
    return [e.value for e in elts]


def _binding_counts(node) -> Counter:
    """How many times each name is bound anywhere inside `node` (a node or a list of statements;
    nested scopes included, which is conservative): assignments, loops, with, del, imports,
    except, definitions, parameters of nested functions, and global/nonlocal (counted twice: the
    name is bound elsewhere too)."""
    counts: Counter = Counter()
    for n in ast.walk(ast.Module(body=node, type_ignores=[]) if isinstance(node, list) else node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            counts[n.id] += 1
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            counts.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            counts.update(n.names * 2)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            counts[n.name] += 1
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            counts[n.name] += 1
        elif isinstance(n, ast.arg):
            counts[n.arg] += 1
    return counts


def _stored_names(node) -> set[str]:
    """Every name bound anywhere inside `node`."""
    return set(_binding_counts(node))


def _binds(scope: ast.AST, name: str) -> bool:
    """A nested scope that has its own `name` (a parameter or a binding inside it)."""
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = scope.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
        return name in params or name in _stored_names(scope)
    return isinstance(scope, ast.ClassDef) and name in _stored_names(scope)


class _ReplaceName(ast.NodeTransformer):
    """Loads of one name -> a constant, except inside nested scopes that bind the name themselves."""

    def __init__(self, name: str, value):
        self.name, self.value, self.count = name, value, 0

    def visit_Name(self, node):
        if node.id == self.name and isinstance(node.ctx, ast.Load):
            self.count += 1
            return _const(self.value, node)
        return node

    def generic_visit(self, node):
        if isinstance(node, _SCOPES) and _binds(node, self.name):
            return node
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)) and any(
                self.name in _stored_names(g.target) for g in node.generators):
            return node
        return super().generic_visit(node)


def _replace_in_body(fn: ast.AST, name: str, value) -> int:
    r = _ReplaceName(name, value)
    fn.body = [r.visit(s) for s in fn.body]
    return r.count


# -----------------------------------------------------------------------------
# ROUND 1: SUBSTITUTE
# -----------------------------------------------------------------------------


class _Substitute(ast.NodeTransformer):
    def __init__(self, known: dict):
        self.known, self.used, self.in_config = known, set(), False

    def visit_ClassDef(self, node):
        outer, self.in_config = self.in_config, node.name == CONFIG_CLASS
        self.generic_visit(node)
        self.in_config = outer
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if not isinstance(node.ctx, ast.Load) or node.attr not in self.known:
            return node
        base = node.value
        if ((isinstance(base, ast.Name) and (base.id == CONFIG_NAME or (self.in_config and base.id == "self")))
                or (isinstance(base, ast.Attribute) and base.attr == CONFIG_NAME)):
            self.used.add(node.attr)
            return _const(self.known[node.attr], node)
        return node


def _unwrap_switch_fields(tree: ast.Module) -> None:
    """`name: T = switch(v)` -> `name: T = v`: the marker is for the packer, the run needs the value
    (and validate()'s check of a choice's values is the pin's, once the value is pinned)."""
    for node in _config_class(tree).body:
        if _marker(node):
            node.value = node.value.args[0]


# -----------------------------------------------------------------------------
# ROUND 2: PROPAGATE
# -----------------------------------------------------------------------------


def _functions(tree: ast.Module):
    """Every function and method of the module, nested ones included."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _propagate_class_attributes(tree: ast.Module) -> int:
    stores: dict[str, int] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
            stores[n.attr] = stores.get(n.attr, 0) + 1
    count = 0
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        consts = {}
        for n in ast.walk(cls):
            if (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Attribute)
                    and isinstance(n.targets[0].value, ast.Name) and n.targets[0].value.id == "self"
                    and stores.get(n.targets[0].attr) == 1 and _is_const(n.value)):
                consts[n.targets[0].attr] = n.value.value
        if not consts:
            continue

        class Replace(ast.NodeTransformer):
            def visit_Attribute(self, node):
                nonlocal count
                self.generic_visit(node)
                if (isinstance(node.ctx, ast.Load) and node.attr in consts and isinstance(node.value, ast.Name)
                        and node.value.id == "self"):
                    count += 1
                    return _const(consts[node.attr], node)
                return node

        for method in cls.body:
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                Replace().visit(method)
    return count


def _call_argument(call: ast.Call, fn: ast.FunctionDef, index: int, name: str):
    """The expression `call` passes for parameter `name` (position `index`): an argument, the
    default, or None when the call passes it some other way."""
    if index is not None and index < len(call.args):
        return call.args[index]
    for k in call.keywords:
        if k.arg == name:
            return k.value
    a = fn.args
    positional = a.posonlyargs + a.args
    if index is not None:
        offset = index - (len(positional) - len(a.defaults))
        return a.defaults[offset] if offset >= 0 else None
    i = [x.arg for x in a.kwonlyargs].index(name)
    return a.kw_defaults[i]


def _propagate_parameters(tree: ast.Module) -> int:
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    calls: dict[str, list] = {name: [] for name in functions}
    # A name bound twice at module level (redefined, or rebound by an assignment) is not one function.
    bound = [name for n in tree.body for name in _definition_names(n)]
    disqualified = {name for name in functions if bound.count(name) > 1}
    call_funcs = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions:
            call_funcs.add(id(n.func))
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                disqualified.add(n.func.id)
            calls[n.func.id].append(n)
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in functions and id(n) not in call_funcs and isinstance(n.ctx, ast.Load):
            disqualified.add(n.id)  # passed as a value: calls elsewhere are not seen
    count = 0
    for name, fn in functions.items():
        if name in disqualified or not calls[name]:
            continue
        a = fn.args
        params = [(i, x.arg) for i, x in enumerate(a.posonlyargs + a.args)] + [(None, x.arg) for x in a.kwonlyargs]
        rebound = _binding_counts(fn.body)
        for index, param in params:
            if param in rebound:
                continue
            passed = [_call_argument(c, fn, index, param) for c in calls[name]]
            if not all(p is not None and _is_const(p) for p in passed):
                continue
            values = {(type(p.value), p.value) for p in passed}
            if len(values) == 1:
                count += _replace_in_body(fn, param, passed[0].value)
    return count


def _loads(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) for n in ast.walk(node))


def _propagate_locals(tree: ast.Module) -> int:
    count = 0
    for fn in _functions(tree):
        a = fn.args
        params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
        counts = _binding_counts(fn.body)
        for stmt in list(fn.body):
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and _is_const(stmt.value)):
                name = stmt.targets[0].id
                if name not in params and counts.get(name) == 1:
                    count += _replace_in_body(fn, name, stmt.value.value)
                    if not _loads(ast.Module(body=fn.body, type_ignores=[]), name):
                        fn.body.remove(stmt)  # a constant nothing reads any more
                        fn.body = fn.body or [ast.Pass()]
    return count


def _remove_dead_attribute_stores(tree: ast.Module) -> None:
    """`self.attr = <constant>` where nothing in the file reads `.attr` (propagation read them all)."""
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    read |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    class Drop(ast.NodeTransformer):
        def visit_Assign(self, node):
            t = node.targets[0]
            if (len(node.targets) == 1 and isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                    and t.value.id == "self" and t.attr not in read and _is_const(node.value)):
                return None
            return node

    Drop().visit(tree)


# -----------------------------------------------------------------------------
# ROUND 3: FOLD
# -----------------------------------------------------------------------------


class _Fold(ast.NodeTransformer):
    def __init__(self, tables: dict[str, list]):
        self.tables = tables  # module-level literal tables, for `const in TABLE`
        self.empty_functions: set[str] = set()

    # expressions -------------------------------------------------------------

    def fold_test(self, node: ast.expr) -> ast.expr:
        """A test: only its truth value matters."""
        node = self.visit(node)
        if isinstance(node, ast.BoolOp):
            keep_if = isinstance(node.op, ast.And)  # `x and True` / `x or False` test as x
            values = [v for v in node.values if not (_is_const(v) and bool(v.value) == keep_if)]
            if any(_is_const(v) for v in values) and all(map(_pure, values)):
                return _const(not keep_if, node)  # `x and False` / `x or True` (x pure)
            if not values:
                return _const(keep_if, node)
            node = values[0] if len(values) == 1 else ast.copy_location(ast.BoolOp(node.op, values), node)
        return node

    def visit_BoolOp(self, node):
        values = [self.visit(v) for v in node.values]
        is_and = isinstance(node.op, ast.And)
        out = []
        for i, v in enumerate(values):
            last = i == len(values) - 1
            if _is_const(v) and not last:
                if bool(v.value) == is_and:
                    continue  # `True and x` / `x or False or y`: v decides nothing
                out.append(v)  # `False and x`: the value is v, the rest never runs
                break
            out.append(v)
        if len(out) == 1:
            return out[0]
        return ast.copy_location(ast.BoolOp(node.op, out), node)

    def visit_UnaryOp(self, node):
        node.operand = self.fold_test(node.operand) if isinstance(node.op, ast.Not) else self.visit(node.operand)
        if isinstance(node.op, ast.Not) and _is_const(node.operand):
            return _const(not node.operand.value, node)
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        operands = [node.left] + node.comparators
        values = []
        for i, x in enumerate(operands):
            if _is_const(x):
                values.append(x.value)
            elif (i > 0 and isinstance(node.ops[i - 1], (ast.In, ast.NotIn))
                  and (_literal_keys(x) is not None or (isinstance(x, ast.Name) and x.id in self.tables))):
                values.append(_literal_keys(x) if _literal_keys(x) is not None else self.tables[x.id])
            else:
                return node
        for i, op in enumerate(node.ops):  # identity is defined only against singletons
            if isinstance(op, (ast.Is, ast.IsNot)) and not any(v is None or isinstance(v, bool)
                                                                for v in values[i: i + 2]):
                return node
        try:
            result = all(_COMPARE[type(op)](values[i], values[i + 1]) for i, op in enumerate(node.ops))
        except TypeError:
            return node
        return _const(result, node)

    def visit_JoinedStr(self, node):
        """f"...{'brotli'}...": a substituted value that is formatted plainly joins the text."""
        self.generic_visit(node)
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue) and _is_const(v.value) and v.format_spec is None:
                convert = {-1: format, 115: str, 114: repr, 97: ascii}[v.conversion]
                v = ast.Constant(convert(v.value.value))
            if parts and _is_const(v) and _is_const(parts[-1]):
                parts[-1] = ast.Constant(parts[-1].value + v.value)
            else:
                parts.append(v)
        if all(map(_is_const, parts)):
            return _const("".join(p.value for p in parts), node)
        node.values = parts
        return node

    def visit_IfExp(self, node):
        node.test = self.fold_test(node.test)
        if _is_const(node.test):
            return self.visit(node.body if node.test.value else node.orelse)
        node.body, node.orelse = self.visit(node.body), self.visit(node.orelse)
        return node

    def visit_comprehension(self, node):
        node.target, node.iter = self.visit(node.target), self.visit(node.iter)
        ifs = [self.fold_test(t) for t in node.ifs]
        node.ifs = [t for t in ifs if not (_is_const(t) and t.value)]
        return node

    # statements --------------------------------------------------------------

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out = []
        for s in stmts:
            r = self.visit(s)
            for x in (r if isinstance(r, list) else [r] if r is not None else []):
                if (isinstance(x, ast.Expr) and isinstance(x.value, ast.Call) and isinstance(x.value.func, ast.Name)
                        and x.value.func.id in self.empty_functions
                        and all(map(_pure, x.value.args + [k.value for k in x.value.keywords]))):
                    continue  # a call of a function that does nothing
                out.append(x)
                if isinstance(x, _TERMINAL):
                    return out  # the rest of the block cannot run
        return out

    def generic_visit(self, node):
        for field, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                value = self.block(value)
                # A body may not be empty (an `else` or `finally` may): the whole block folded away.
                setattr(node, field, value or ([ast.Pass()] if field == "body" else []))
            elif isinstance(value, list):  # expressions, keywords, handlers: one for one (a dict's
                # keys hold None for each `**mapping`, which must stay in place)
                setattr(node, field, [self.visit(x) if isinstance(x, ast.AST) else x for x in value])
            elif isinstance(value, ast.AST):
                setattr(node, field, self.visit(value))
        return node

    def visit_If(self, node):
        node.test = self.fold_test(node.test)
        if _is_const(node.test):
            return self.block(node.body if node.test.value else node.orelse)
        node.body = self.block(node.body) or [ast.Pass()]
        node.orelse = self.block(node.orelse)
        if not node.orelse and all(isinstance(s, ast.Pass) for s in node.body) and _pure(node.test):
            return None
        return node

    def visit_While(self, node):
        node.test = self.fold_test(node.test)
        if _is_const(node.test) and not node.test.value:
            return self.block(node.orelse)
        return self.generic_visit(node)

    def visit_Assert(self, node):
        node.test = self.fold_test(node.test)
        if _is_const(node.test) and node.test.value:
            return None
        return node


def _function_is_empty(fn: ast.FunctionDef) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and _is_const(s.value))]
    return not fn.decorator_list and all(isinstance(s, ast.Pass) for s in body)


def _tables(tree: ast.Module) -> dict[str, list]:
    """Module-level names bound once to a literal with constant elements or keys."""
    bound: dict[str, int] = {}
    for n in tree.body:
        for name in _stored_names(n) if not isinstance(n, (ast.FunctionDef, ast.ClassDef)) else ():
            bound[name] = bound.get(name, 0) + 1
    out = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            keys = _literal_keys(n.value)
            if keys is not None and bound.get(n.targets[0].id) == 1:
                out[n.targets[0].id] = keys
    return out


# -----------------------------------------------------------------------------
# ROUND 4: REMOVE
# -----------------------------------------------------------------------------


def _loaded_names(node: ast.AST) -> set[str]:
    """Names a definition needs: its loads, and the globals its functions declare."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            out.add(n.id)
        elif isinstance(n, ast.Global):
            out.update(n.names)
    return out


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import)):
        return True
    if isinstance(node, ast.ImportFrom):
        return node.module != "__future__"
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return all(isinstance(t, ast.Name) for t in targets)
    return False


def _definition_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    return _stored_names(node)


def _remove_unreachable(tree: ast.Module, removed: list) -> bool:
    """Module-level definitions that no root statement reaches; True if any went."""
    defs = [(n, _definition_names(n)) for n in tree.body if _is_definition(n)]
    needed = set()
    for n in tree.body:
        if not _is_definition(n):
            needed |= _loaded_names(n)
    kept = set()
    changed = True
    while changed:
        changed = False
        for i, (n, names) in enumerate(defs):
            if i not in kept and names & needed:
                kept.add(i)
                needed |= _loaded_names(n)
                changed = True
    gone = {id(n) for i, (n, _) in enumerate(defs) if i not in kept}
    for n in tree.body:
        if id(n) in gone and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            removed.append(n.name)
        elif id(n) in gone and isinstance(n, (ast.Assign, ast.AnnAssign)):
            removed.extend(sorted(_definition_names(n)))
    tree.body = [n for n in tree.body if id(n) not in gone]
    return bool(gone)


def _remove_unused_methods(tree: ast.Module, removed: list) -> bool:
    mentioned = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            mentioned.add(n.attr)
        elif isinstance(n, ast.Name):
            mentioned.add(n.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            mentioned.add(n.value)
    changed = False
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        keep = []
        for m in cls.body:
            if (isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name not in mentioned
                    and not m.name.startswith("__") and m.name not in FRAMEWORK_METHODS):
                removed.append(f"{cls.name}.{m.name}")
                changed = True
            else:
                keep.append(m)
        cls.body = keep or [ast.Pass()]
    return changed


def _prune_tables(tree: ast.Module, removed: list) -> bool:
    """Entries of a module-level dict that the file only ever reads as `NAME[constant]`, with
    other constants."""
    tables, changed = _tables(tree), False
    indexed = {id(n.value): n for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and node.targets[0].id in tables):
            continue
        name, keys = node.targets[0].id, set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load):
                sub = indexed.get(id(n))
                if sub is None or not isinstance(sub.ctx, ast.Load) or not _is_const(sub.slice):
                    break  # used whole, or indexed by a variable: every entry may be read
                keys.add(sub.slice.value)
        else:
            pairs = [(k, v) for k, v in zip(node.value.keys, node.value.values) if k.value in keys]
            if len(pairs) < len(node.value.keys):
                removed.extend(f"{name}[{k.value!r}]" for k in node.value.keys if k.value not in keys)
                node.value.keys, node.value.values = [k for k, _ in pairs], [v for _, v in pairs]
                changed = True
    return changed


# -----------------------------------------------------------------------------
# DRIVER
# -----------------------------------------------------------------------------


def _set_module_constant(tree: ast.Module, name: str, value) -> None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            node.value = ast.parse(repr(value), mode="eval").body
            return
    raise SpecialiseError(f"no module-level {name} = ... to hold the pins")


def specialise(source: str, pins: dict[str, object], preset_name: str, max_rounds: int = 50) -> Specialised:
    """The source with `pins` ({setting: value}, switches and choices of Hyperparameters; see
    substituted()) replaced by their values, and what that makes unreachable removed.
    `preset_name` is what the refusal of another value names (PACKED_FOR)."""
    tree = ast.parse(source)
    fields = switch_fields(tree)
    unknown = sorted(set(pins) - set(fields))
    if unknown:
        raise SpecialiseError(f"{unknown} are not switches or choices of {CONFIG_CLASS}")
    known = dict(pins)
    _unwrap_switch_fields(tree)
    sub = _Substitute(known)
    tree = sub.visit(tree)
    pinned = {k: known[k] for k in fields if k in sub.used}
    _set_module_constant(tree, "PINNED", pinned)
    _set_module_constant(tree, "PACKED_FOR", preset_name)
    removed: list[str] = []
    for _ in range(max_rounds):
        before = ast.dump(tree)
        _propagate_class_attributes(tree)
        _propagate_parameters(tree)
        _propagate_locals(tree)
        fold = _Fold(_tables(tree))
        fold.empty_functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and _function_is_empty(n)}
        tree = fold.visit(tree)
        _remove_dead_attribute_stores(tree)
        _remove_unreachable(tree, removed)
        _remove_unused_methods(tree, removed)
        _prune_tables(tree, removed)
        if ast.dump(tree) == before:
            break
    else:
        raise SpecialiseError(f"the tree still changed after {max_rounds} rounds")
    ast.fix_missing_locations(tree)
    text = ast.unparse(tree) + "\n"
    compile(text, "<specialised>", "exec")
    return Specialised(text, pinned, removed)


def read_preset(path) -> dict[str, str]:
    """KEY=VALUE lines of an environment file; blank lines and '#' comments skipped."""
    from pathlib import Path

    env = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        key, value = line.split("=", 1)
        env[key.strip()] = value.strip()
    return env

