"""The package layout's rules, checked statically (ast only, nothing imported), so a break names its file:line.

Layers, bottom to top: common <- data_pipeline <- backbones <- search <- ensemble <- cellsearch. A module may
import its own package and the packages below it, never one above, not even inside a function or under
`if TYPE_CHECKING:`: a lazy import still runs (or types against) the higher layer's code.

What counts as an import cycle: module A imports B and B imports A, directly or through other modules, by any
import statement that runs (module-level or inside a function; not one under `if TYPE_CHECKING:`). A lazy import
back into a module that imports you is a circle of responsibility even when Python survives it, which is why
function-level imports count. An import edge goes to the module named, or to `pkg.name` when `from pkg import
name` names a submodule; the parent packages Python also runs are not edges, so a package's `__init__`
re-exporting its modules is no cycle. Imports by string (`importlib.import_module`) are not seen.

Errors: every exception class lives in common/errors.py, and an error raised on purpose with a message is one of
them (a CellsearchError the CLIs print as one line), not a builtin ValueError, KeyError, TypeError, RuntimeError
or Exception. Re-raises, NotImplementedError and AssertionError (a broken invariant of our own code) are fine.
"""

from __future__ import annotations

import ast
import builtins
import graphlib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("common", "data_pipeline", "backbones", "search", "ensemble", "cellsearch")
ERROR_MODULE = "common.errors"
#: Builtin exceptions whose on-purpose, messaged raises must be the project's own classes instead.
PLAIN_RAISES = {"ValueError", "KeyError", "TypeError", "RuntimeError", "Exception"}


@dataclass(frozen=True)
class Module:
    name: str
    where: str  # the file, relative to the root parsed
    is_package: bool
    tree: ast.Module


def parse(root: Path, packages: tuple[str, ...] = LAYERS) -> dict[str, Module]:
    """Every module of `packages` under `root`, by dotted name (a package by its own name)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            where = str(path.relative_to(root))
            modules[name] = Module(name, where, parts[-1] == "__init__", ast.parse(path.read_text(), where))
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(node: ast.AST):
    """Every node below `node` except those under `if TYPE_CHECKING:` (imports only type checkers run)."""
    for child in ast.iter_child_nodes(node):
        if not _is_type_checking(child):
            yield child
            yield from _runtime_nodes(child)


def _targets(module: Module, node: ast.AST, known: set[str]) -> list[str]:
    """The project modules an import statement imports (external ones dropped)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.name.split(".")
            if not module.is_package:
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def imports(modules: dict[str, Module], *, type_checking: bool) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}, with or without TYPE_CHECKING ones."""
    known = set(modules)
    graph = {}
    for module in modules.values():
        nodes = ast.walk(module.tree) if type_checking else _runtime_nodes(module.tree)
        edges: dict[str, int] = {}
        for node in nodes:
            for target in _targets(module, node, known):
                if target != module.name:
                    edges.setdefault(target, node.lineno)
        graph[module.name] = edges
    return graph


def import_cycle(modules: dict[str, Module]) -> list[str]:
    """One import cycle, as 'file:line imports module' steps; [] when there is none."""
    graph = imports(modules, type_checking=False)
    try:
        graphlib.TopologicalSorter({name: set(edges) for name, edges in graph.items()}).prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]  # [a, b, ..., a], each importing the one before it
        steps = list(zip(cycle[1:], cycle[:-1]))
        return [f"{modules[a].where}:{graph[a][b]} imports {b}" for a, b in steps]
    return []


def upward_imports(modules: dict[str, Module]) -> list[str]:
    """Imports, anywhere in a module, of a package higher in LAYERS than the module's own."""
    rank = {package: i for i, package in enumerate(LAYERS)}
    found = []
    for name, edges in imports(modules, type_checking=True).items():
        own = rank[name.split(".")[0]]
        for target, line in edges.items():
            if rank[target.split(".")[0]] > own:
                found.append(f"{modules[name].where}:{line} imports {target} (a higher layer)")
    return found


def exception_classes_outside(modules: dict[str, Module], error_module: str = ERROR_MODULE) -> list[str]:
    """Classes deriving (by base name, transitively) from an exception, defined outside `error_module`."""
    exceptions = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)}
    classes = [(module, node) for module in modules.values() for node in ast.walk(module.tree)
               if isinstance(node, ast.ClassDef)]

    def base_names(node: ast.ClassDef) -> set[str]:
        return {base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "") for base in node.bases}

    grew = True
    while grew:  # names of project classes that derive from an exception, to a fixed point
        before = len(exceptions)
        exceptions |= {node.name for _, node in classes if base_names(node) & exceptions}
        grew = len(exceptions) > before
    return [f"{module.where}:{node.lineno} defines exception class {node.name}" for module, node in classes
            if module.name != error_module and base_names(node) & exceptions]


def plain_raises(modules: dict[str, Module]) -> list[str]:
    """`raise ValueError("...")` and the like: on-purpose errors that are not the project's own classes."""
    found = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            call = node.exc if isinstance(node, ast.Raise) else None
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in PLAIN_RAISES
                    and (call.args or call.keywords)):
                found.append(f"{module.where}:{node.lineno} raises {call.func.id}")
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return parse(ROOT)


def _report(offenders: list[str]) -> str:
    return "\n".join(offenders)


def test_no_import_cycles(modules):
    cycle = import_cycle(modules)
    assert not cycle, "import cycle:\n" + _report(cycle)


def test_layers_only_import_downward(modules):
    offenders = upward_imports(modules)
    assert not offenders, _report(offenders)


def test_exception_classes_live_in_the_error_module(modules):
    offenders = exception_classes_outside(modules)
    assert not offenders, _report(offenders)


def test_no_plain_builtin_raises(modules):
    offenders = plain_raises(modules)
    assert not offenders, _report(offenders)


def test_the_checks_find_what_they_look_for(tmp_path):
    """Each check on a small tree that breaks its rule once, so a check that finds nothing cannot pass unseen."""
    files = {
        "common/__init__.py": "",
        "common/errors.py": "class CellsearchError(Exception):\n    pass\n",
        "data_pipeline/__init__.py": "",
        "data_pipeline/a.py": "def f():\n    from data_pipeline import b\n",
        "data_pipeline/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import search.x\n"
                               "from . import a\n\n\ndef f():\n    import search.x\n    raise ValueError('bad')\n"),
        "data_pipeline/c.py": ("from common.errors import CellsearchError\n\n\nclass Own(CellsearchError):\n"
                               "    pass\n\n\ndef g(exc):\n    raise exc\n\n\ndef h():\n"
                               "    raise NotImplementedError('later')\n"),
        "search/__init__.py": "",
        "search/x.py": "import data_pipeline.a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    tree = parse(tmp_path, ("common", "data_pipeline", "search"))
    assert sorted(import_cycle(tree)) == ["data_pipeline/a.py:2 imports data_pipeline.b",
                                          "data_pipeline/b.py:4 imports data_pipeline.a"]
    assert upward_imports(tree) == ["data_pipeline/b.py:3 imports search.x (a higher layer)"]
    assert exception_classes_outside(tree) == ["data_pipeline/c.py:4 defines exception class Own"]
    assert plain_raises(tree) == ["data_pipeline/b.py:9 raises ValueError"]
