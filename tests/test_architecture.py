"""The package's import rule, checked on the source (ast, nothing imported): every arrow points
down the layers below and nothing forms a cycle. README "Architecture" states the same rule.

- Outside a package (`data/`, `heads/`, `finetune/`, `study/`, `cache/`, `cli/`) a module sees
  another module or package as one node; an import must go to a node on a strictly lower
  layer of `LAYERS`.
- Inside a package the submodules import each other without a cycle, and never the package's
  own `__init__` (that is the package's public face, for the modules above it; a package's
  `__main__`, what `python -m` runs, may import it).
- `skincache/__init__.py` is the top: it re-exports lazily, by name, and imports only `_io`.
Imports under `if TYPE_CHECKING:` and inside functions count: they are arrows too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "skincache"

#: bottom (0) to top. A new module gets a layer here; an import to the same or a higher
#: layer is an arrow back up.
LAYERS: list[set[str]] = [
    {"errors", "defaults"},
    {"_io", "_disk", "metadata"},
    {"device", "distributed", "_head_params", "metrics", "data", "run_record", "derm_models",
     "concepts"},
    {"models", "cache", "heads", "prompts", "_sanity"},
    {"views", "plots", "_progress", "_options"},
    {"loaders", "concept_report"},
    {"encoder"},
    {"encode", "runs", "near_duplicates"},
    {"predict", "bench", "finetune", "demo", "pipeline"},
    {"study", "report", "explain"},
    {"render"},
    {"render_study"},
    {"cli"},
]
PACKAGES = {"data", "heads", "finetune", "study", "cache", "cli", "report"}
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    """dotted name -> file, for every module of the package."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The skincache modules `mod` imports (dotted), wherever the import statement is."""
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "skincache"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "skincache":
                continue
            for a in node.names:  # `from skincache.heads import base` imports a module
                sub = f"{name}.{a.name}"
                found.add(sub if sub in modules else name)
    return found - {mod}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _node(mod: str) -> str:
    """The node a module is from outside its package: `skincache.heads.knn` -> `heads`."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "skincache"


def _missing_layers(graph: dict[str, set[str]]) -> list[str]:
    """Nodes of `graph` that LAYERS does not place."""
    nodes = {_node(m) for m in graph} - {"skincache"}
    return sorted(n for n in nodes if n not in LEVEL)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow of `graph` that breaks the rule in this module's docstring, described."""
    up = []
    for mod, deps in graph.items():
        src = _node(mod)
        for dep in deps:
            dst = _node(dep)
            if src == "skincache":
                if dep != "skincache._io":
                    up.append(f"skincache/__init__ -> {dep} (re-export it lazily, by name)")
                continue
            if dst == "skincache":
                up.append(f"{mod} -> skincache (the package's __init__; import the module)")
            elif src == dst:  # inside one package: never its own __init__ (but `python -m`'s
                # __main__ runs the package's face, which is what it is for)
                if (src in PACKAGES and dep == f"skincache.{src}"
                        and not mod.endswith(".__main__")):
                    up.append(f"{mod} -> {dep} (a submodule importing its package's __init__)")
            elif LEVEL[dst] >= LEVEL[src]:
                up.append(f"{mod} (layer {LEVEL[src]}) -> {dep} (layer {LEVEL[dst]})")
    return sorted(up)


def test_every_module_has_a_layer():
    missing = _missing_layers(_graph())
    assert not missing, f"give these a layer in LAYERS (and README's architecture): {missing}"


def test_no_arrow_points_up():
    up = _upward(_graph())
    assert not up, "arrows back up:\n" + "\n".join(up)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_a_cycle_and_an_upward_arrow():
    """Each rule fed a graph that breaks it (and one that keeps it): the checks can fail."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    ok = {"skincache.cli": {"skincache.render", "skincache.heads.knn"},
          "skincache.heads.knn": {"skincache.heads._registry", "skincache.metrics"},
          "skincache.heads._registry": set(), "skincache": {"skincache._io"},
          "skincache.cli.__main__": {"skincache.cli"}}
    assert _upward(ok) == [] and _missing_layers(ok) == []
    bad = {
        "skincache.metrics": {"skincache.cli"},            # down the layers, pointing up
        "skincache.device": {"skincache.metrics"},         # the same layer
        "skincache": {"skincache.cache"},                  # __init__ importing eagerly
        "skincache.heads.knn": {"skincache.heads"},        # a submodule -> its package __init__
        "skincache.runs": {"skincache"},                   # the top package from below
    }
    found = _upward(bad)
    assert len(found) == 5, found
    for needle in ("skincache.metrics (layer", "skincache.device (layer",
                   "skincache/__init__ -> skincache.cache", "its package's __init__",
                   "skincache.runs -> skincache (the package"):
        assert any(needle in f for f in found), (needle, found)
    assert _missing_layers({"skincache.newthing": set()}) == ["newthing"]


def test_imports_are_read_wherever_they_stand(tmp_path):
    """Relative imports, imports inside functions and under TYPE_CHECKING are arrows too."""
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom . import cache\n"
                   "from .heads import knn\nif TYPE_CHECKING:\n    from .runs import x\n"
                   "def f():\n    import skincache.render\n")
    modules = {"skincache.cache": src, "skincache.heads.knn": src}
    assert _imports("skincache.mod", src, modules) == {
        "skincache.cache", "skincache.heads.knn", "skincache.runs", "skincache.render"}


@pytest.mark.parametrize("module", ["cache", "heads", "metrics", "data"])
def test_low_layers_know_neither_torch_models_nor_open_clip(module):
    """`cache/` is HDF5 + numpy; heads work on arrays and never import open_clip."""
    files = [PKG / f"{module}.py"] if (PKG / f"{module}.py").exists() else \
        sorted((PKG / module).rglob("*.py"))
    for f in files:
        tree = ast.parse(f.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and not n.level}
        assert "open_clip" not in names, f
        if module == "cache":
            assert "torch" not in names, f


def test_posix_only_modules_are_imported_where_used():
    """`fcntl` (POSIX) is imported inside the functions that lock, never at a module's top
    level: `import skincache.cache` (and so reading a cache) works on Windows."""
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert "fcntl" not in names, f"{path}: top-level import of fcntl"
