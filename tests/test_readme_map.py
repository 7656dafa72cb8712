"""README's "Where things are" names every module of the package, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _listed() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `(tcskd/[^`]+)`", section, re.M))


def _modules() -> set[str]:
    out = set()
    for p in (ROOT / "tcskd").rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        if p.name in ("__init__.py", "__main__.py"):
            continue
        out.add(rel)
    return out


def test_every_module_is_listed_once():
    listed = _listed()
    folders = {entry for entry in listed if entry.endswith("/")}
    covered = {m for m in _modules() if any(m.startswith(f) for f in folders)}
    missing = _modules() - listed - covered
    stale = {entry for entry in listed - folders if not (ROOT / entry).is_file()}
    stale |= {f for f in folders if not (ROOT / f).is_dir()}
    assert not missing, f"modules missing from README's 'Where things are': {sorted(missing)}"
    assert not stale, f"README's 'Where things are' names what does not exist: {sorted(stale)}"
