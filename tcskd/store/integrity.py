"""Is a cache complete and sound? The one check every reader of a cache makes.

:func:`require` refuses (StoreError) a cache below a level:

- ``"open"``: it opens and has a manifest of a schema this tcskd reads
  (checked by :func:`tcskd.store.backends.open_store` already);
- ``"done"``: every chunk is done and the manifest marks the cache complete
  (the cache stage's hit test, :func:`first_problem` without raising);
- ``"complete"``: the manifest is whole and true to its identity, the arrays
  have the shapes it implies, the cache is done, and no chunk of the given
  arrays is missing. Cheap: no data chunk is read; chunk contents are checked
  as they are read (Store.read_rows, tcskd.store.chunks).

``tcskd cache verify`` reports every problem of :func:`check_structure` and
:func:`missing_data` instead of the first.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tcskd.errors import StoreError
from tcskd.store.backends import Store
from tcskd.store.layout import ROW_ARRAYS, expected_shapes
from tcskd.store.manifest import Manifest
from tcskd.store.registry import cache_key

log = logging.getLogger(__name__)

LEVELS = ("open", "done", "complete")
#: Manifest fields that repeat a part of the identity (the key hashes the identity only).
_REPEATED = (("teacher_spec", ("teacher", "spec")), ("data_spec", ("data", "spec")), ("split", ("split",)),
             ("views", ("views",)), ("dtype", ("dtype",)), ("tokens", ("tokens",)), ("grid", ("grid",)),
             ("dim", ("coords", "dim")))
_NEED = ("key", "identity", "n_rows", "views", "dim", "chunk_rows", "data_spec", "split", "teacher_spec")


def check_structure(store: Store) -> list[str]:
    """Manifest fields and array shapes; cheap (reads no data chunks)."""
    m = store.manifest
    missing = [k for k in _NEED if k not in m]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    problems = []
    try:
        if cache_key(m["identity"]) != m["key"]:
            problems.append("manifest identity does not hash to its key (the manifest was edited)")
        if store.path.name != m["key"] and not store.path.name.startswith(".tmp-"):
            log.debug("cache directory %s is not named by its key %s", store.path.name, m["key"])
        shapes = expected_shapes(Manifest.from_attrs(m))
        if "complete" in m and not isinstance(m["complete"], bool):
            problems.append(f"manifest field complete={str(m['complete'])[:40]!r} is not true or false "
                            f"(the manifest was edited)")
        ident = m["identity"] if isinstance(m["identity"], dict) else {}
        for field_name, where in _REPEATED:
            node: Any = ident
            for k in where:
                node = node.get(k) if isinstance(node, dict) else None
            if node is not None and m.get(field_name) != node:
                problems.append(f"manifest field {field_name}={m.get(field_name)!r} contradicts its identity "
                                f"({node!r}): the manifest was edited")
    except (TypeError, ValueError, AttributeError) as e:
        return [f"manifest is malformed: {e}"]
    coords_of = m.get("coords_of")
    if coords_of and coords_of not in store.bases():
        problems.append(f"the basis '{coords_of}' whose coordinates the features hold is missing or incomplete")
    for name, shape in shapes.items():
        if name not in store:
            problems.append(f"array '{name}' is missing")
        elif tuple(store[name].shape) != shape:
            problems.append(f"array '{name}' has shape {tuple(store[name].shape)}, manifest implies {shape}")
    return problems


def missing_data(store: Store, names: tuple[str, ...] = ROW_ARRAYS, done: np.ndarray | None = None) -> list[str]:
    """Chunks marked done whose data are not stored (a deleted chunk file reads as zeros otherwise).

    Only for stores whose manifest says ``dense_chunks`` (every chunk is written);
    cheap: one directory listing per array.
    """
    if not Manifest.read(store).dense_chunks:
        return []
    done = store.chunk_done() if done is None else done
    problems = []
    for name in names:
        if name not in store:
            continue
        lost = [c for c in store.missing_chunks(name) if c < len(done) and done[c]]
        if lost:
            problems.append(f"chunk {lost[0]}: the data of '{name}' are missing ({len(lost)} chunk(s) marked done "
                            f"have no stored '{name}' data; deleted files?)")
    return problems


def first_problem(store: Store, level: str = "complete", arrays: tuple[str, ...] = ROW_ARRAYS,
                  what: str = "") -> str | None:
    """The message of the first reason ``store`` is below ``level``, None when it is not.

    ``arrays``: the arrays whose chunks must all be stored; ``what`` names the cache in
    the messages (e.g. "train" gives "train cache ... is incomplete").
    """
    if level not in LEVELS:
        raise ValueError(f"unknown integrity level '{level}' (choose {', '.join(LEVELS)})")
    if level == "open":
        return None
    name = f"{what} cache" if what else "cache"
    if "chunk_done" not in store:
        return f"{name} {store.path} has no chunk_done array: its creation was cut short; rebuild it"
    if level == "complete":
        problems = check_structure(store)
        if problems:
            return f"{name} {store.path} is damaged: {problems[0]}; see `tcskd cache verify`"
    done = store.chunk_done()
    if not done.all() or not Manifest.read(store).complete:
        return (f"{name} {store.path} is incomplete ({int(done.sum())}/{len(done)} chunks done); "
                f"finish it by running the same `tcskd cache` command again")
    if level == "complete":
        problems = missing_data(store, arrays, done)
        if problems:
            return f"{name} {store.path} is damaged: {problems[0]}; see `tcskd cache verify`"
    return None


def require(store: Store, level: str = "complete", arrays: tuple[str, ...] = ROW_ARRAYS, what: str = "") -> None:
    """StoreError unless ``store`` reaches ``level`` (see :func:`first_problem`)."""
    problem = first_problem(store, level, arrays, what)
    if problem:
        raise StoreError(problem)
