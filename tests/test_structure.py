"""No module reaches into another's private names (issue 15, point 6).

Every module under kvminspect/, tests/ and benchmarks/ is parsed; a private
name is one with a leading underscore that is not a dunder (``_page``, not
``__init__``). A violation is:

1. importing a private name of another kvminspect module or of drgn
   (``from kvminspect.check import _page``, ``from drgn.commands import
   _parse_py_command``), or a private module of either (``import _drgn``,
   ``from _drgn_util.x import y``);
2. ``NAME._name`` where NAME (or a dotted NAME.x.y) starts with a name bound
   by an import from another kvminspect module or from drgn: a module
   (``check._page``, ``drgn.commands._parse_py_command``) or something in
   one (``NAMESPACE._commands``, ``VmReader._guest_name``);
3. in kvminspect/ and benchmarks/ (not tests/, which may look inside what
   they test): ``OBJ._name`` on any other expression but ``self`` / ``cls``
   when this module does not define ``_name`` but a class of another
   kvminspect module does (a class attribute or method, or ``self._name =``
   in a method), or drgn's Python sources do: ``session.target._kernel``,
   ``k._vms``, ``cmd._parser``.

2 and 3 include ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr`` and
pytest's ``monkeypatch.setattr`` / ``delattr`` with a constant name. A name a
module defines is its own to use (a function reading another instance's field
of a class of the same module). A private name that neither kvminspect nor
drgn defines (``sys._getframe``) is none of this test's business, and nor is
a namedtuple's ``_replace`` / ``_asdict`` / ``_fields`` (public API).
kvminspect.drgn_compat is the one module that may use drgn's privates: it
wraps them, and tests/test_drgn_compat.py fails when drgn changes them.
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import drgn
import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ("kvminspect", "tests", "benchmarks")
DRGN_PACKAGES = ("drgn", "_drgn", "_drgn_util")
# the one place that may use drgn's privates (it wraps them; its test pins them)
DRGN_WRAPPER = "kvminspect.drgn_compat"
ATTR_FUNCS = ("getattr", "setattr", "hasattr", "delattr")
# a namedtuple's public API, underscored so as not to clash with field names
NAMEDTUPLE_API = ("_replace", "_asdict", "_fields", "_field_defaults", "_make")
# violations in files this change leaves to their owners: each is to be fixed (and
# removed from here); the test fails on any other violation, and on one listed here
# that is gone ("path: text" -> how many times)
KNOWN: dict[str, int] = {}  # allowed exceptions, with a reason each (none today)


def private(name: str) -> bool:
    """A leading underscore and not a dunder; '_' alone is no name."""
    return name.startswith("_") and len(name) > 1 and not (
        name.startswith("__") and name.endswith("__"))


def is_drgn(module: str) -> bool:
    return module.split(".")[0] in DRGN_PACKAGES


def is_ours(module: str) -> bool:
    return module.split(".")[0] == "kvminspect"


def private_module(module: str) -> bool:
    """A module path with a private part, of kvminspect or drgn."""
    return (is_ours(module) or is_drgn(module)) and any(private(p) for p in module.split("."))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(root: Path, trees: tuple[str, ...]) -> Iterator[Path]:
    for tree in trees:
        for dirpath, dirnames, files in os.walk(root / tree):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            yield from (Path(dirpath) / f for f in sorted(files) if f.endswith(".py"))


def defined_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """The private names a module defines: (module-level names, attribute names).
    Module level: functions, classes, assignments, import aliases; attributes:
    a class body's names (methods too) and those assigned on self / cls."""
    module: set[str] = set()
    attrs: set[str] = set()

    def targets(node: ast.AST) -> Iterator[ast.expr]:
        if isinstance(node, ast.Assign):
            yield from node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            yield node.target

    def scope(body: list[ast.stmt], out: set[str]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in node.names)
            for t in targets(node):
                out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            if isinstance(node, ast.ClassDef):
                scope(node.body, attrs)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    scope(getattr(node, block, []), out)
                for h in getattr(node, "handlers", []):
                    scope(h.body, out)

    scope(tree.body, module)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):  # nested classes too
            scope(node.body, attrs)
        for t in targets(node):
            for n in ast.walk(t):
                if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                        and n.value.id in ("self", "cls")):
                    attrs.add(n.attr)
    return {n for n in module if private(n)}, {n for n in attrs if private(n)}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


class Checker(ast.NodeVisitor):
    """The violations of one module (see the module docstring)."""

    def __init__(self, path: str, module: str, tree: ast.Module, own: set[str],
                 theirs: dict[str, str]) -> None:
        self.path, self.module, self.tree = path, module, tree
        self.own = own  # private names this module defines
        self.theirs = theirs  # private attribute -> a kvminspect module or "drgn" defining it
        self.objects = module.split(".")[0] != "tests"  # rule 3
        self.modules: dict[str, str] = {}  # local name -> module it is bound to
        self.found: list[Violation] = []
        self.may_use_drgn = module == DRGN_WRAPPER
        self.package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

    def run(self) -> list[Violation]:
        self.visit(self.tree)
        return self.found

    def add(self, node: ast.AST, text: str) -> None:
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), text))

    def allowed(self, module: str) -> bool:
        """Whether *module*'s privates are this module's to use."""
        if is_drgn(module):
            return self.may_use_drgn
        return module == self.module

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if private_module(a.name) and not self.allowed(a.name):
                self.add(node, f"import of private module {a.name}")
            if a.asname:
                self.modules[a.asname] = a.name
            else:
                top = a.name.split(".")[0]
                self.modules[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this package
            pkg = self.package.split(".")
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        if private_module(base) and not self.allowed(base):
            self.add(node, f"import from private module {base}")
        for a in node.names:
            full = f"{base}.{a.name}"
            if ((is_ours(base) or is_drgn(base)) and private(a.name)
                    and not self.allowed(base)):
                self.add(node, f"import of private name {full}")
            if is_ours(base) or is_drgn(base):
                self.modules[a.asname or a.name] = full  # maybe a module; checked on use

    def dotted(self, node: ast.expr) -> str | None:
        """The module a (dotted) name refers to, if it starts with an imported one."""
        if isinstance(node, ast.Name):
            return self.modules.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def check_attr(self, node: ast.AST, obj: ast.expr, name: str) -> None:
        if not private(name) or name in NAMEDTUPLE_API:
            return
        module = self.dotted(obj)
        if module is not None and (is_ours(module) or is_drgn(module)):
            if not self.allowed(module):
                self.add(node, f"{module}.{name}: another module's private name")
            return
        if not self.objects or isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
            return
        if name in self.own:
            return
        owner = self.theirs.get(name)
        if owner is not None and not self.allowed(owner):
            self.add(node, f"{ast.unparse(obj)}.{name}: private name of {owner}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.check_attr(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        by_name = isinstance(f, ast.Name) and f.id in ATTR_FUNCS
        patch = (isinstance(f, ast.Attribute) and f.attr in ("setattr", "delattr")
                 and isinstance(f.value, ast.Name) and f.value.id == "monkeypatch")
        if ((by_name or patch) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            self.check_attr(node, node.args[0], node.args[1].value)
        self.generic_visit(node)


def drgn_privates() -> set[str]:
    """The private attribute names drgn defines: its Python sources' (drgn,
    _drgn_util) and those of the classes it exports (its extension's)."""
    out: set[str] = set()
    site = Path(drgn.__file__).resolve().parent.parent
    for pkg in ("drgn", "_drgn_util"):
        for path in sources(site, (pkg,)):
            out |= defined_names(ast.parse(path.read_text(), str(path)))[1]
    for obj in vars(drgn).values():
        if isinstance(obj, type):
            out.update(n for n in vars(obj) if private(n))
    return out


def parsed(root: Path, trees: tuple[str, ...]) -> list[tuple[Path, str, ast.Module]]:
    return [(p, module_name(p, root), ast.parse(p.read_text(), str(p)))
            for p in sources(root, trees)]


def violations(root: Path = ROOT, trees: tuple[str, ...] = TREES,
               drgn_names: set[str] | None = None) -> list[Violation]:
    """Every violation in the modules under *trees* of *root*."""
    files = parsed(root, trees)
    defined = {module: defined_names(tree) for _, module, tree in files}
    theirs: dict[str, str] = dict.fromkeys(drgn_privates() if drgn_names is None
                                           else drgn_names, "drgn")
    for module, (_, attrs) in defined.items():
        if is_ours(module):
            theirs.update(dict.fromkeys(attrs, module))
    out: list[Violation] = []
    for path, module, tree in files:
        rel = str(path.relative_to(root))
        out += Checker(rel, module, tree, set.union(*defined[module]), theirs).run()
    return out


def test_no_private_names_across_modules() -> None:
    found = Counter(f"{v.path}: {v.text}" for v in violations())
    new = [str(v) for v in violations() if f"{v.path}: {v.text}" not in KNOWN]
    gone = [k for k, n in KNOWN.items() if found[k] < n]
    more = [k for k, n in KNOWN.items() if found[k] > n]
    assert not new, "private names reached across modules:\n" + "\n".join(new)
    assert not more, "more of a known violation:\n" + "\n".join(more)
    assert not gone, ("fixed, so remove from KNOWN in tests/test_structure.py:\n"
                      + "\n".join(gone))


# -- the checker itself: what it catches and what it lets be ---------------------------


CASES = {
    # kvminspect/a.py defines privates; the others use them
    "kvminspect/__init__.py": "",
    "kvminspect/a.py": """
        import drgn
        _LIMIT = 3
        def _helper(): ...
        class Thing:
            _slot = 1
            def __init__(self):
                self._state = 0
            def same(self, other):
                return self._state == other._state  # own module: fine
    """,
    "kvminspect/b.py": """
        import sys
        import drgn
        import drgn.commands
        from kvminspect import a
        from kvminspect.a import _helper                         # 1 import of a private
        from drgn.commands import _parse_py_command              # 2 drgn private
        import _drgn_util.argparseformatter                      # 3 private module
        def f(thing, cmd):
            a._LIMIT                                              # 4 module._name
            thing._state                                          # 5 another module's field
            cmd._parser                                           # 6 drgn's field
            getattr(cmd, "_parser", None)                         # 7 by getattr
            drgn.commands._parse_py_command                       # 8 dotted module
            sys._getframe(0)                                      # stdlib: not ours
            thing.__class__                                       # dunder: fine
            thing._replace()                                      # nobody's: fine
    """,
    "kvminspect/drgn_compat.py": """
        from drgn.commands import _parse_py_command              # the wrapper: fine
        def parser(cmd):
            return cmd._parser
    """,
    "tests/__init__.py": "",
    "tests/t.py": """
        from kvminspect.a import Thing
        def test(monkeypatch, thing):
            monkeypatch.setattr(Thing, "_slot", 2)                # 9 by monkeypatch
            thing._state                                          # a test may look inside
            class Local:
                def __init__(self):
                    self._mine = 1
            Local()._mine                                         # own module: fine
    """,
}


def test_checker_catches_each_kind(tmp_path: Path) -> None:
    import textwrap

    for rel, text in CASES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    found = violations(tmp_path, ("kvminspect", "tests"), drgn_names={"_parser"})
    lines = {(v.path, v.line) for v in found}
    expected = set()
    for rel, text in CASES.items():
        for i, line in enumerate(textwrap.dedent(text).splitlines(), 1):
            if "# " in line and line.split("# ")[-1][:1].isdigit():
                expected.add((rel, i))
    assert lines == expected, "\n".join(map(str, found))
    assert len(found) == 9


@pytest.mark.parametrize("name, is_private", [
    ("_page", True), ("__init__", False), ("_", False), ("__x", True), ("page", False)])
def test_private(name: str, is_private: bool) -> None:
    assert private(name) is is_private
