"""The layer contract of ``fl_plugins``, checked on the source (AST, no import): :func:`violations`.

Layers, lowest first (a module may import its own layer and the layers below it, never one above):

====  =========================================================================================================
rank  layer
====  =========================================================================================================
0     base modules directly under the package (``wire``, ``cpu_threads``, ``settings``, ``atomic_io``, ...):
      standard library only, no ``fl_plugins`` import
1     ``core``
2     ``data``
3     ``models``
4     ``engine``
5     ``methods``
6     ``flare``
7     ``cli``
====  =========================================================================================================

Further rules: only ``flare`` and ``cli`` import ``nvflare``; no module below ``flare`` imports
``torch.distributed``. Every import statement counts, including those inside functions and ``TYPE_CHECKING``
blocks, relative imports, ``from fl_plugins import <layer>`` and ``importlib.import_module("<literal>")``.
A module or sub-package that is not in the order is reported too, so that a new one has to be placed.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LAYERS", "BASE_RANK", "layer_of", "violations", "import_cycles"]

PACKAGE = "fl_plugins"
#: Rank of every layer above the base modules (lowest first).
LAYERS: dict[str, int] = {"core": 1, "data": 2, "models": 3, "engine": 4, "methods": 5, "flare": 6, "cli": 7}
#: Rank of the modules directly under the package other than ``cli`` (``wire``, ``cpu_threads``, ...).
BASE_RANK = 0
FLARE_RANK = LAYERS["flare"]
_RANK_NAMES = {BASE_RANK: "base", **{rank: name for name, rank in LAYERS.items()}}


def layer_of(parts: tuple[str, ...], package_root: Path) -> tuple[str, int] | None:
    """``(layer, rank)`` of the module ``fl_plugins.<parts...>``; ``None`` for a sub-package outside the order.

    ``parts`` is the dotted name below the package, e.g. ``("engine", "knn")``, ``("wire", "TASK_TRAIN")`` or
    ``()`` (the package itself, base). A first part that is neither a layer nor a sub-package folder of
    ``package_root`` is a base module (``wire``, ``cpu_threads``, ...) or a name defined in ``__init__.py``.
    """
    if not parts:
        return "base", BASE_RANK
    if parts[0] in LAYERS:
        return parts[0], LAYERS[parts[0]]
    if (package_root / parts[0]).is_dir():
        return None
    return parts[0], BASE_RANK


def _module_parts(path: Path, package_root: Path) -> tuple[str, ...]:
    rel = path.relative_to(package_root).with_suffix("")
    parts = rel.parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(tree: ast.AST, module_parts: tuple[str, ...], is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every module ``tree`` imports (``from a.b import c`` yields ``a.b``;
    ``from a import b``, where ``b`` may be a sub-module, yields ``a.b``)."""
    here = [PACKAGE, *module_parts] if is_package else [PACKAGE, *module_parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if "." in module:  # ``from a.b import c, d``: one import of a.b
                yield node.lineno, module
            else:  # ``from fl_plugins import flare`` / ``from torch import distributed``: the sub-modules
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}" if alias.name != "*" else module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name.startswith("__future__")


def violations(package_root: Path) -> list[str]:
    """Every breach of the layer contract in the package at ``package_root`` (the ``fl_plugins`` folder).

    Each entry is ``"<path relative to the package's parent>:<line>: <module> imports <name>: <rule broken>"``;
    the list is empty when the contract holds.
    """
    package_root = Path(package_root)
    out: list[str] = []
    for path in sorted(package_root.rglob("*.py")):
        parts = _module_parts(path, package_root)
        where = path.relative_to(package_root.parent).as_posix()
        own = layer_of(parts, package_root)
        if own is None:
            out.append(f"{where}:1: sub-package {'.'.join([PACKAGE, *parts[:1]])} is not in the layer order "
                       f"({', '.join(LAYERS)}); add it to tests/layer_contract.py")
            continue
        layer, rank = own
        me = ".".join([PACKAGE, *parts])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imports(tree, parts, path.name == "__init__.py"):
            top = name.split(".")
            if top[0] == "nvflare" and rank < FLARE_RANK:
                out.append(f"{where}:{line}: {me} imports {name}: only fl_plugins.flare and fl_plugins.cli may "
                           f"import nvflare ({layer} is below flare)")
            elif name == "torch.distributed" or name.startswith("torch.distributed."):
                if rank < FLARE_RANK:
                    out.append(f"{where}:{line}: {me} imports {name}: no module below fl_plugins.flare may import "
                               f"torch.distributed ({layer} is below flare)")
            elif top[0] == PACKAGE:
                target = layer_of(tuple(top[1:]), package_root)
                if rank == BASE_RANK and tuple(top[1:]) != ():
                    out.append(f"{where}:{line}: {me} imports {name}: a base module ({layer}) imports nothing "
                               f"from {PACKAGE}")
                elif target is None:
                    # ``from fl_plugins.x import y`` where x is not a layer: name the unknown sub-package
                    out.append(f"{where}:{line}: {me} imports {name}: {'.'.join(top[:2])} is not in the layer "
                               f"order")
                elif target[1] > rank:
                    out.append(f"{where}:{line}: {me} imports {name}: upward import, layer {layer} (rank {rank}) "
                               f"must not import layer {target[0]} (rank {target[1]}); order: "
                               f"{' < '.join(_RANK_NAMES[r] for r in sorted(_RANK_NAMES))}")
            elif rank == BASE_RANK and not _is_stdlib(name):
                out.append(f"{where}:{line}: {me} imports {name}: a base module ({layer}) imports the standard "
                           f"library only")
    return out


def _module_of(name: str, modules: set[str]) -> str | None:
    """The package module an imported dotted ``name`` lands in: the longest prefix that is a module of ``modules``
    (``fl_plugins.flare.jobs.base.FLSettings`` -> ``fl_plugins.flare.jobs.base``); None outside the package."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def _from_import_submodules(tree: ast.AST, module_parts: tuple[str, ...], is_package: bool) -> list[str]:
    """``a.b.c`` for every ``from a.b import c`` (also relative): ``c`` may be a sub-module (kept if it is one)."""
    here = [PACKAGE, *module_parts] if is_package else [PACKAGE, *module_parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out += [f"{module}.{a.name}" for a in node.names if a.name != "*"]
    return out


def import_cycles(package_root: Path) -> list[list[str]]:
    """Every import circle among the package's modules, counting every import statement (module level, inside
    functions, ``TYPE_CHECKING`` blocks, relative, literal ``importlib.import_module``), as sorted module lists.

    An edge goes from a module to the module an import names (the longest dotted prefix that is a module); a
    package's ``__init__`` is the package's module. A sub-module that imports its own package's ``__init__``
    (``from fl_plugins.data import x`` inside ``fl_plugins.data.y``) while that ``__init__`` imports it back is a
    circle too: move the name or import it from its own module.
    """
    package_root = Path(package_root)
    files = {".".join([PACKAGE, *_module_parts(p, package_root)]): p for p in package_root.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for me, path in files.items():
        parts = tuple(me.split(".")[1:])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = [name for _, name in _imports(tree, parts, path.name == "__init__.py")]
        names += _from_import_submodules(tree, parts, path.name == "__init__.py")
        for name in names:
            target = _module_of(name, modules)
            if target is not None and target != me:
                graph[me].add(target)
    # Tarjan's strongly connected components: every component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules) + 100))
    for v in sorted(modules):
        if v not in index:
            visit(v)
    return sorted(out)
