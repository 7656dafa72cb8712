"""``tcskd cache verify``: is a cache complete, well-formed and true to its teacher?"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tcskd.cache.store import Store, as_location, iter_chunks, open_store
from tcskd.errors import StoreError, TcskdError

log = logging.getLogger(__name__)

REQUIRED = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
#: The arrays holding a chunk's rows (written before its ``chunk_done`` flag).
ROW_ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok")
#: Manifest fields that repeat a part of the identity (the key hashes the identity only).
_REPEATED = (("teacher_spec", ("teacher", "spec")), ("data_spec", ("data", "spec")), ("split", ("split",)),
             ("views", ("views",)), ("dtype", ("dtype",)))


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    checked_rows: int = 0
    recomputed_rows: int = 0
    max_rel_error: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_shapes(m: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    n, v, d, ch = int(m["n_rows"]), int(m["views"]), int(m["dim"]), int(m["chunk_rows"])
    return {"features": (n, v, d), "labels": (n,), "sample_index": (n,), "view_params": (n, v, 5),
            "row_ok": (n,), "chunk_done": (-(-n // ch),)}


def check_structure(store: Store) -> list[str]:
    """Manifest fields and array shapes; cheap (reads no data chunks)."""
    m = store.manifest
    need = ("key", "identity", "n_rows", "views", "dim", "chunk_rows", "data_spec", "split", "teacher_spec")
    missing = [k for k in need if k not in m]
    if missing:
        return [f"manifest lacks {', '.join(missing)}"]
    problems = []
    try:
        from tcskd.cache.registry import cache_key

        if cache_key(m["identity"]) != m["key"]:
            problems.append("manifest identity does not hash to its key (the manifest was edited)")
        if store.path.name != m["key"] and not store.path.name.startswith(".tmp-"):
            log.debug("cache directory %s is not named by its key %s", store.path.name, m["key"])
        shapes = _expected_shapes(m)
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
    if not store.manifest.get("dense_chunks"):
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


def verify_cache(path: Path, recompute: int = 0, device: str = "auto", seed: int = 0) -> VerifyReport:
    """Completeness, shapes, readable and finite data, label range, and ``recompute``
    rows recomputed with the teacher and compared with the stored features."""
    from tqdm import tqdm

    report = VerifyReport(as_location(path))
    try:
        store = open_store(path)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    with store:
        report.problems += check_structure(store)
        if report.problems:
            return report
        m = store.manifest
        done = store.chunk_done()
        if not done.all():
            report.problems.append(f"incomplete: {int((~done).sum())} of {len(done)} chunks not done")
        if not m.get("complete"):
            report.problems.append("manifest does not mark the cache complete")
        report.problems += missing_data(store, done=done)
        n, ch = int(m["n_rows"]), int(m["chunk_rows"])
        ncls = m.get("num_classes") or 0
        seen: set[int] = set()
        for c, start, stop in tqdm(list(iter_chunks(n, ch)), desc="verify", unit="chunk",
                                   file=sys.stderr, disable=None):
            if not done[c]:
                continue
            try:
                f = np.asarray(store["features"][start:stop])
                lab = np.asarray(store["labels"][start:stop])
                idx = np.asarray(store["sample_index"][start:stop])
                ok = np.asarray(store["row_ok"][start:stop], bool)
                np.asarray(store["view_params"][start:stop])
            except Exception as e:  # a damaged chunk fails its checksum or decompression
                report.problems.append(f"chunk {c} (rows {start}..{stop - 1}) is unreadable: "
                                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            bad = ~np.isfinite(f[ok].astype(np.float32)).all(axis=(1, 2)) if ok.any() else np.zeros(0, bool)
            if bad.any():
                report.problems.append(f"chunk {c}: {int(bad.sum())} row(s) hold NaN/Inf features")
            if ncls and ((lab < -1) | (lab >= ncls)).any():
                report.problems.append(f"chunk {c}: labels outside [-1, {ncls})")
            if (idx[ok] < 0).any():
                report.problems.append(f"chunk {c}: rows without a sample index")
            dup = seen.intersection(idx[ok].tolist())
            if dup:
                report.problems.append(f"chunk {c}: sample index {sorted(dup)[0]} appears twice")
            seen.update(idx[ok].tolist())
            report.checked_rows += stop - start
        for name in store.bases():
            report.problems += _check_basis(store, name, n, ch)
        if recompute > 0 and not report.problems:
            _recompute(store, report, recompute, device, seed)
    return report


def _check_basis(store: Store, name: str, n: int, ch: int) -> list[str]:
    """A basis loads (checksums, shapes) and its stored coords, if any, are readable and present."""
    from tcskd.subspace.basis import load_basis

    try:
        load_basis(store, name)
        coords = f"bases/{name}/coords"
        if coords in store:
            for _, start, stop in iter_chunks(n, ch):
                store.read_rows(coords, start, stop)
            if store.manifest.get("dense_chunks") and store.missing_chunks(coords):
                return [f"basis '{name}': coords chunk {store.missing_chunks(coords)[0]} is missing"]
    except Exception as e:
        return [f"basis '{name}' is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"]
    return []


def _recompute(store: Store, report: VerifyReport, k: int, device: str, seed: int) -> None:
    """Recompute ``k`` random rows with the teacher named in the manifest and compare."""
    import torch

    from tcskd.cache.build import teacher_forward
    from tcskd.cache.views import teacher_views
    from tcskd.data import open_source
    from tcskd.device import resolve_device
    from tcskd.teachers import load_teacher

    m = store.manifest
    ident = m["identity"]
    teacher = load_teacher(m["teacher_spec"], int(m["image_size"]))
    if teacher.identity() != ident["teacher"]:
        report.problems.append("the teacher named in the manifest no longer matches it (weights or preprocessing changed)")
        return
    source = open_source(m["data_spec"], m["split"])
    if source.fingerprint != ident["data"]["fingerprint"]:
        report.problems.append(f"dataset {m['data_spec']} changed since the cache was built (fingerprint differs)")
        return
    pos = {int(i): r for r, i in enumerate(source.indices)}
    ok = np.flatnonzero(store.read("row_ok"))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ok, size=min(k, len(ok)), replace=False))
    dev = resolve_device(device)
    teacher.to(dev)
    worst = 0.0
    for r in rows:
        idx = int(store["sample_index"][int(r)])
        if idx not in pos:
            report.problems.append(f"row {r}: sample index {idx} is not in {m['data_spec']} split {m['split']}")
            continue
        params = np.asarray(store["view_params"][int(r)])
        x = teacher_views(source.image(pos[idx]), params, teacher.image_size)[None]
        got = teacher_forward(teacher, x, dev)[0].cpu().numpy()
        want = np.asarray(store["features"][int(r)], np.float32)
        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
        worst = max(worst, err)
    tol = 2e-2 if m.get("dtype") == "float16" or dev.type == "cuda" else 1e-4
    report.recomputed_rows = len(rows)
    report.max_rel_error = worst
    if worst > tol:
        report.problems.append(f"recomputed features differ from the stored ones (max relative error {worst:.3g} > {tol})")


def require_complete(store: Store, arrays: tuple[str, ...] = ROW_ARRAYS) -> None:
    """Refuse to read a cache that is incomplete or visibly damaged (cheap: no data chunk is read).

    Checks the manifest and the array shapes, that every chunk is done and the
    manifest marks the cache complete, and that no chunk of ``arrays`` is
    missing. Chunk contents are checked as they are read (see Store.read).
    """
    problems = check_structure(store)
    if problems:
        raise StoreError(f"cache {store.path} is damaged: {problems[0]}; see `tcskd cache verify`")
    done = store.chunk_done()
    if not done.all() or not store.manifest.get("complete"):
        raise StoreError(f"cache {store.path} is incomplete ({int(done.sum())}/{len(done)} chunks done); "
                         f"finish it by running the same `tcskd cache` command again")
    problems = missing_data(store, arrays, done)
    if problems:
        raise StoreError(f"cache {store.path} is damaged: {problems[0]}; see `tcskd cache verify`")


def info(path: Path) -> dict[str, Any]:
    with open_store(path) as s:
        out = dict(s.manifest)
        out["path"] = str(path)
        out["format"] = s.format
        done = s.chunk_done() if "chunk_done" in s else np.zeros(0, bool)
        out["chunks_done"] = f"{int(done.sum())}/{len(done)}"
        out["bases"] = {name: s.attrs(f"bases/{name}") for name in s.bases()}
        out["size_bytes"] = s.size_bytes()
    return out


class VerifyFailed(TcskdError):
    exit_code = 1
