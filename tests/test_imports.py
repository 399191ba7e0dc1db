"""The package's imports run one way: no import cycles, and data and model never import each other.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a
module, at module level or inside a function (a function-level import does not make a cycle go
away), relative ones included; ``from pkg import name`` points at ``pkg.name`` when that is a
module. Importing ``a.b.c`` from outside the package ``a.b`` also runs ``a/b/__init__.py``, so that
edge counts too; a package's own modules reach their siblings without it.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import moe_emergence

Graph = dict[str, set[str]]


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package in folder ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that importing module ``name`` (its file ``path``) may import."""
    targets = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 packages
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        parts = target.split(".")
        for n in range(1, len(parts) + 1):  # the module and the packages it runs on the way
            module = ".".join(parts[:n])
            if module in modules and (n == len(parts) or not inside(name, module)):
                found.add(module)
    found.discard(name)
    return found


def import_graph(root: Path) -> Graph:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]`` (depth first, in sorted order), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def find_chain(graph: Graph, start: str, package: str) -> list[str] | None:
    """The shortest chain of imports from ``start`` to a module of ``package``, or None."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if inside(node, package):
            chain = [node]
            while (node := previous[node]) is not None:
                chain.append(node)
            return chain[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


GRAPH = import_graph(Path(moe_emergence.__file__).parent)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_and_model_never_import_each_other():
    chains = [
        " -> ".join(chain)
        for start, other in (("data", "model"), ("model", "data"))
        for name in sorted(GRAPH)
        if inside(name, f"moe_emergence.{start}")
        and (chain := find_chain(GRAPH, name, f"moe_emergence.{other}"))
    ]
    assert not chains, "data and model import each other:\n" + "\n".join(chains)


def test_graph_is_read_as_python_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "import json\nimport pkg.sub.c\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\nfrom . import d as renamed\n",
        "pkg/sub/d.py": "from pkg.sub import VALUE\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},  # inside a function
        "pkg.b": {"pkg.sub", "pkg.sub.c"},  # sub's __init__ runs first
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.sub.d"},  # relative, a name that is a module
        "pkg.sub.d": {"pkg.sub"},  # a name that is not a module: the package itself
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert find_chain(graph, "pkg", "pkg.sub") == ["pkg", "pkg.a", "pkg.b", "pkg.sub"]


def test_find_cycle_known_answers():
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b", "d"}}) == ["b", "c", "b"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


# Modules that may reach the analysis package: its entry points and the wiring: train.py builds
# the routing callback, config.py composes its settings' node, runs/start.py continues a resumed
# run's metrics (blanking the analysis's saturation cells).
ANALYSIS_USERS = (
    "moe_emergence.analyze",
    "moe_emergence.inspect",
    "moe_emergence.train",
    "moe_emergence.config",
    "moe_emergence.config_store",  # registers config's base nodes when Hydra composes
    "moe_emergence.runs.start",
)
CONFIG_MACHINERY = ("hydra", "omegaconf")


def test_data_imports_no_config_machinery():
    chains = [
        " -> ".join(chain)
        for name in sorted(GRAPH)
        if inside(name, "moe_emergence.data")
        and (chain := find_chain(GRAPH, name, "moe_emergence.config"))
    ]
    assert not chains, "data reaches the config composition:\n" + "\n".join(chains)
    third_party = [
        f"{name} imports {target}"
        for name, path in module_files(Path(moe_emergence.__file__).parent).items()
        if inside(name, "moe_emergence.data")
        for target in external_imports(path)
        if target.split(".")[0] in CONFIG_MACHINERY
    ]
    assert not third_party, "\n".join(third_party)


def test_only_the_wiring_and_entry_points_import_analysis():
    chains = [
        " -> ".join(chain)
        for name in sorted(GRAPH)
        if not inside(name, "moe_emergence.analysis")
        and name not in ANALYSIS_USERS
        and (chain := find_chain(GRAPH, name, "moe_emergence.analysis"))
    ]
    assert not chains, "imports of the analysis package:\n" + "\n".join(chains)


def external_imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file at ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def calls_of(path: Path) -> dict[str, set[str]]:
    """Function name -> the names it calls (``f(...)`` and ``x.f(...)``), per top-level function
    or method of the file at ``path``."""
    found: dict[str, set[str]] = {}
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names = found.setdefault(node.name, set())
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    func = call.func
                    names.add(
                        func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    )
    return found


def test_the_model_is_built_by_one_function():
    """``build_model`` is the only caller of ``build_gpt2`` and ``install_moe_layers`` in the
    package; training (the module), init_from (the same module), analyze and inspect (the
    checkpoint loader) call it."""
    root = Path(moe_emergence.__file__).parent
    builders = {
        f"{name}.{function}"
        for name, path in module_files(root).items()
        for function, called in calls_of(path).items()
        if {"build_gpt2", "install_moe_layers"} & called
    }
    assert builders == {"moe_emergence.model.gpt2_moe.build_model"}
    assert "build_model" in calls_of(root / "model" / "module.py")["__init__"]
    assert "build_model" in calls_of(root / "analysis" / "loading.py")["load_checkpoint"]
