"""Layers, one direction (DESIGN.md): read off the source with ``ast``, every import counted (module level,
inside functions and under ``TYPE_CHECKING``).

- stage 1 (``tcskd/cache``) imports nothing of stage 2 (``tcskd.subspace``) or stage 3 (``tcskd.train``);
- the store layer (``tcskd/store``) imports no stage;
- the modules of ``tcskd.train`` import each other without a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tcskd.cache", "tcskd.subspace", "tcskd.train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "tcskd").rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of ``known`` that ``path`` imports (``from a import b`` counts ``a.b`` when that is a
    module; relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest known module the import names (``tcskd.train.data.ViewImages`` -> ``tcskd.train.data``)
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in known:
                    out.add(".".join(parts[:i]))
                    break
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_cache_stage_imports_no_later_stage():
    bad = {m: sorted(i for i in deps if _within(i, "tcskd.subspace") or _within(i, "tcskd.train"))
           for m, deps in _graph().items() if _within(m, "tcskd.cache")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_store_layer_imports_no_stage():
    bad = {m: sorted(i for i in deps if any(_within(i, s) for s in STAGES))
           for m, deps in _graph().items() if _within(m, "tcskd.store")}
    assert {m: v for m, v in bad.items() if v} == {}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_counts_type_checking_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "tcskd" / "train"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tcskd.train.y import Y\n"
                              "def f():\n    from . import z\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    known = {"tcskd.train.x", "tcskd.train.y", "tcskd.train.z", "tcskd.train"}
    assert imports_of(pkg / "x.py", known) == {"tcskd.train.y", "tcskd.train.z", "tcskd.train"}


def test_no_import_cycle_among_the_training_modules():
    graph = {m: {d for d in deps if _within(d, "tcskd.train") and d != "tcskd.train"}
             for m, deps in _graph().items() if _within(m, "tcskd.train") and m != "tcskd.train"}
    assert find_cycle(graph) is None
