"""The shape of the code, read with ``ast`` (nothing is imported): imports point one way, no private name crosses
a module, payload keys are spelled only in ``schema.py``, functions fit on a screen, and an import inside a
function says why it is there.

``edje_qdrant/train/`` (and the ``train`` command) are left out for now: they are being reshaped (issue 21, phase
B), which removes these exclusions.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from edje_qdrant import schema

REPO = Path(__file__).resolve().parent.parent
PHASE_B: tuple[str, ...] = ()  # phase B of issue 21 reshapes training; then these exclusions go
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Module:
    name: str  # dotted, as installed (cli/ is edje_qdrant.cli)
    path: Path
    is_package: bool

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix() if self.path.is_relative_to(REPO) else self.path.name

    def tree(self) -> ast.Module:
        return ast.parse(self.path.read_text(encoding="utf-8"), str(self.path))


def modules(root: Path = REPO, skip: tuple[str, ...] = PHASE_B) -> dict[str, Module]:
    """Every module of ``edje_qdrant/`` and ``cli/`` under ``root`` by dotted name, except those under ``skip``."""
    found: dict[str, Module] = {}
    for folder, prefix in (("edje_qdrant", ("edje_qdrant",)), ("cli", ("edje_qdrant", "cli"))):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(skip):
                continue
            parts = list(prefix) + list(path.relative_to(root / folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if package else parts)
            found[name] = Module(name, path, package)
    return found


def imported_modules(module: Module, known: dict[str, Module]) -> set[str]:
    """The known modules ``module`` imports anywhere (top level, inside functions, under TYPE_CHECKING):
    ``from package import submodule`` names the submodule, ``from module import name`` the module."""
    out: set[str] = set()
    for node in ast.walk(module.tree()):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.module, node.level)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module.name:
                out.add(target)
    return out


def _absolute(module: Module, name: str | None, level: int) -> str:
    if not level:
        return name or ""
    parts = module.name.split(".")
    base = parts if module.is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_cycles(root: Path = REPO) -> list[list[str]]:
    known = modules(root)
    return cycles({name: imported_modules(m, known) for name, m in known.items()})


def test_imports_point_one_way():
    """No circle in the import graph, counting every import: inside functions too (an import deferred for cost
    still points somewhere), and under TYPE_CHECKING."""
    assert import_cycles() == []


def test_the_cycle_finder_finds_circles_hidden_in_functions(tmp_path):
    (tmp_path / "edje_qdrant" / "store").mkdir(parents=True)
    (tmp_path / "cli").mkdir()
    (tmp_path / "edje_qdrant" / "__init__.py").write_text("")
    (tmp_path / "edje_qdrant" / "store" / "__init__.py").write_text("")
    (tmp_path / "edje_qdrant" / "rules.py").write_text("def spec():\n    from edje_qdrant.store.base import X\n")
    (tmp_path / "edje_qdrant" / "store" / "base.py").write_text("from ..rules import spec\n")
    (tmp_path / "cli" / "main.py").write_text("def run():\n    from edje_qdrant import rules\n")
    assert import_cycles(tmp_path) == [["edje_qdrant.rules", "edje_qdrant.store.base"]]


# ------------------------------------------------------------------------------------------------ private names
def private_imports(module: Module, ours: set[str]) -> list[str]:
    """``from our_module import _name``, an import of a module whose name is private, and ``alias._name`` where
    ``alias`` is one of our modules imported in this file."""
    tree = module.tree()
    aliases: dict[str, str] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.module, node.level)
            if not base.startswith(("edje_qdrant", "cli")):
                continue
            if any(_private(part) for part in base.split(".")):
                problems.append(f"{module.rel}:{node.lineno} imports the private module {base}")
            for alias in node.names:
                if _private(alias.name):
                    problems.append(f"{module.rel}:{node.lineno} imports {base}.{alias.name}")
                elif f"{base}.{alias.name}" in ours:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("edje_qdrant") and any(_private(p) for p in alias.name.split(".")):
                    problems.append(f"{module.rel}:{node.lineno} imports the private module {alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            problems.append(f"{module.rel}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return problems


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_from_another_module():
    ours = set(modules())
    checked = list(modules().values()) + [Module(f"tests.{p.stem}", p, False) for p in sorted(REPO.glob("tests/*.py"))]
    problems = [p for m in checked for p in private_imports(m, ours)]
    assert problems == []


# ------------------------------------------------------------------------------------------------ payload keys
KEYS = set(schema.PAYLOAD_KEYS) | set(schema.METADATA_KEYS)
DOTTED = re.compile(rf"^{re.escape(schema.METADATA_KEY)}\.\w+$")


def spelled_keys(module: Module) -> list[str]:
    """Payload keys written as string literals where a key goes: a dict key, a subscript, the key argument of
    ``get`` / ``pop`` / ``setdefault``, a list of keys; and any ``metadata.<key>`` path."""
    tree = module.tree()
    places: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            places += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Subscript):
            places.append(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and node.func.attr in ("get", "pop", "setdefault"):
            places.append(node.args[0])
        elif isinstance(node, ast.List):
            places += node.elts
    found = [f"{module.rel}:{n.lineno} {n.value!r}" for n in places
             if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in KEYS]
    found += [f"{module.rel}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and isinstance(n.value, str) and DOTTED.match(n.value)]
    return found


def test_payload_keys_are_spelled_only_in_the_schema():
    checked = [m for m in modules(skip=()).values() if m.name != "edje_qdrant.schema"]
    assert [k for m in checked for k in spelled_keys(m)] == []


def test_the_key_finder_finds_literal_keys(tmp_path):
    path = tmp_path / "sync.py"
    path.write_text('meta = hit.payload.get("metadata")\nout = {"source": 1}\nstore.scroll(c, ["metadata"])\n'
                    'index = "metadata.folder"\nlabel = "source code"\n')
    found = spelled_keys(Module("sync", path, False))
    assert [f.split(" ", 1)[1] for f in found] == ["'metadata'", "'source'", "'metadata'", "'metadata.folder'"]


# ------------------------------------------------------------------------------------------------ functions
def long_functions(module: Module) -> list[str]:
    return [f"{module.rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(module.tree())
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_a_screen():
    """At most 60 lines from ``def`` to the last line, docstring included."""
    assert [f for m in modules().values() for f in long_functions(m)] == []


def unexplained_inner_imports(module: Module, skip_functions: tuple[str, ...] = ()) -> list[str]:
    """Imports inside functions whose line has no comment naming the cost they defer (``# cost: ...``)."""
    lines = module.path.read_text(encoding="utf-8").splitlines()
    problems = []
    for fn in ast.walk(module.tree()):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in skip_functions:
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not re.search(r"#.*\bcost\b", lines[node.lineno - 1]):
                problems.append(f"{module.rel}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return sorted(set(problems))


def test_imports_inside_functions_say_what_they_cost():
    """An import goes at the top of its module unless deferring it saves time (torch, transformers, Ray, an
    optional extra, the CLI's start-up), and then its comment says so."""
    skip: dict[str, tuple[str, ...]] = {}
    assert [p for m in modules().values() for p in unexplained_inner_imports(m, skip.get(m.name, ()))] == []


@pytest.mark.parametrize("check", [long_functions, unexplained_inner_imports])
def test_the_function_checks_find_what_they_look_for(tmp_path, check):
    path = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    path.write_text(f"def long():\n{body}\n\ndef lazy():\n    import json\n    import torch  # cost: seconds\n")
    found = check(Module("m", path, False))
    assert len(found) == 1 and ("long" in found[0] or "import json" in found[0])
