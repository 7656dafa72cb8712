"""``tcskd cache verify``: is a cache complete, well-formed and true to its teacher?"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tcskd.cache import dense
from tcskd.cache.build import decode_views, teacher_forward
from tcskd.cache.create import decode_of
from tcskd.data import open_source
from tcskd.device import resolve_device
from tcskd.errors import StoreError, TcskdError
from tcskd.store.backends import Store, iter_chunks, open_store
from tcskd.store.bases import load_basis
from tcskd.store.layout import bytes_per_image
from tcskd.store.integrity import check_structure, missing_data
from tcskd.store.manifest import Manifest
from tcskd.store.paths import as_location

log = logging.getLogger(__name__)


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
        m = Manifest.read(store)
        done = store.chunk_done()
        if not done.all():
            report.problems.append(f"incomplete: {int((~done).sum())} of {len(done)} chunks not done")
        if not m.complete:
            report.problems.append("manifest does not mark the cache complete")
        report.problems += missing_data(store, done=done)
        n, ch = int(m.n_rows), int(m.chunk_rows)
        ncls = m.num_classes or 0
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
            bad = (~np.isfinite(f[ok].astype(np.float32)).all(axis=tuple(range(1, f.ndim))) if ok.any()
                   else np.zeros(0, bool))
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
    try:
        load_basis(store, name)
        coords = f"bases/{name}/coords"
        if coords in store:
            for _, start, stop in iter_chunks(n, ch):
                store.read_rows(coords, start, stop)
            if Manifest.read(store).dense_chunks and store.missing_chunks(coords):
                return [f"basis '{name}': coords chunk {store.missing_chunks(coords)[0]} is missing"]
    except Exception as e:
        return [f"basis '{name}' is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"]
    return []


def _recompute(store: Store, report: VerifyReport, k: int, device: str, seed: int) -> None:
    """Recompute ``k`` random rows with the teacher named in the manifest and compare (a patch cache: every token,
    projected onto its basis when it holds coordinates)."""
    # Imported where a teacher runs: the command line loads this module, and training never loads a teacher.
    from tcskd.teachers import load_teacher

    m = Manifest.read(store)
    teacher = load_teacher(m.teacher_spec, int(m.image_size))
    if teacher.identity() != m.teacher_identity:
        report.problems.append("the teacher named in the manifest no longer matches it (weights or preprocessing changed)")
        return
    source = open_source(m.data_spec, m.split)
    if source.fingerprint != m.data_fingerprint:
        report.problems.append(f"dataset {m.data_spec} changed since the cache was built (fingerprint differs)")
        return
    pos = {int(i): r for r, i in enumerate(source.indices)}
    ok = np.flatnonzero(store.read("row_ok"))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(ok, size=min(k, len(ok)), replace=False))
    dev = resolve_device(device)
    teacher.to(dev)
    project = dense.Projector(load_basis(store, m.coords_of), int(m.dim), dev) if m.coords_of else None
    decode = decode_of(m.identity)  # the images decoded as the cache decoded them
    worst = 0.0
    for r in rows:
        idx = int(store["sample_index"][int(r)])
        if idx not in pos:
            report.problems.append(f"row {r}: sample index {idx} is not in {m.data_spec} split {m.split}")
            continue
        params = np.asarray(store["view_params"][int(r)])
        x = decode_views(source, pos[idx], None, teacher.image_size, decode, lambda h, w: params)[0][None]
        got = (dense.tokens_forward(teacher, x, dev, project) if m.dense
               else teacher_forward(teacher, x, dev))[0].cpu().numpy()
        want = np.asarray(store["features"][int(r)], np.float32)
        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6))
        worst = max(worst, err)
    tol = 2e-2 if m.dtype == "float16" or dev.type == "cuda" else 1e-4
    report.recomputed_rows = len(rows)
    report.max_rel_error = worst
    if worst > tol:
        report.problems.append(f"recomputed features differ from the stored ones (max relative error {worst:.3g} > {tol})")


def info(path: Path) -> dict[str, Any]:
    """The manifest, bases, chunk count, size on disk and features' bytes per image of the cache at ``path``."""
    with open_store(path) as s:
        out = dict(s.manifest)
        out["path"] = str(path)
        out["format"] = s.format
        done = s.chunk_done() if "chunk_done" in s else np.zeros(0, bool)
        out["chunks_done"] = f"{int(done.sum())}/{len(done)}"
        out["bases"] = {name: s.attrs(f"bases/{name}") for name in s.bases()}
        out["size_bytes"] = s.size_bytes()
        m = Manifest.read(s)
        if m.dim and m.views and m.dtype:  # uncompressed features per image: as stored, and as raw teacher features
            out["bytes_per_image"] = bytes_per_image(int(m.dim), m.n_tokens, str(m.dtype), int(m.views))
            out["bytes_per_image_raw"] = bytes_per_image(int(m.feature_dim), m.n_tokens, str(m.dtype), int(m.views))
    return out


class VerifyFailed(TcskdError):
    exit_code = 1
