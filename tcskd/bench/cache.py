"""The cache stage's figures: the teacher's forward alone, the input pipeline alone, and ``build_cache`` end
to end at several sizes (with the parts of its time that ``CacheResult.timings`` reports)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcskd.bench.measure import free, linear_fit, stats, sync
from tcskd.cache.build import CacheConfig, build_cache, input_loader, open_split, teacher_forward, teacher_inputs
from tcskd.store.backends import iter_chunks
from tcskd.errors import TcskdError


def _one_batch(data: str, size: int, batch: int) -> torch.Tensor:
    """``batch`` rows of the train split as the cache feeds them to the teacher (views resized to ``size`` on
    the CPU), on the CPU; a split smaller than a batch repeats its rows."""
    cfg = CacheConfig(data=data, split="train", limit=batch)
    source = open_split(cfg)
    loader = input_loader(teacher_inputs(source, cfg, size), [(0, 0, len(source))], batch, 0, torch.device("cpu"))
    x = next(iter(loader))[1]
    return x[torch.arange(batch) % len(x)]


def bench_forward(teacher_spec: str, data: str, image_size: int | None, batch: int, device: torch.device,
                  repeats: int, warmup: int, min_seconds: float) -> dict[str, Any]:
    """The teacher's forward alone (the cache's :func:`~tcskd.cache.build.teacher_forward`) on one pre-decoded
    batch already on the device."""
    # Here, not at the top: the command line loads this module, and tcskd.teachers (the teachers' own
    # packages) must load only where a teacher runs (as in tcskd.cache.build.plan_cache; tests/test_train_loop.py).
    from tcskd.teachers import load_teacher

    teacher = load_teacher(teacher_spec, image_size).to(device)
    x = _one_batch(data, teacher.image_size, batch).to(device)

    def one() -> None:
        teacher_forward(teacher, x, device).cpu()

    for _ in range(max(1, warmup) + 1):
        one()
    sync(device)
    t0 = time.perf_counter()
    one()
    sync(device)
    per_batch = time.perf_counter() - t0
    n_batches = int(min(500, max(2, round(min_seconds / max(per_batch, 1e-6)))))
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            one()
        sync(device)
        runs.append(n_batches * batch / (time.perf_counter() - t0))
    out = {"teacher": teacher_spec, "image_size": teacher.image_size, "dim": teacher.dim, "batch": batch,
           "batches_per_repeat": n_batches, "rows_per_s": stats(runs)}
    del teacher, x
    free(device)
    return out


def bench_cache_inputs(data: str, image_size: int, rows: int, batch: int, workers: int, chunk_rows: int,
                       device: torch.device, repeats: int) -> dict[str, Any]:
    """The cache stage's input pipeline alone: its DataLoader (decode, views, collate, pinning), no teacher
    (on a GPU, in-memory images are resized by the device, inside the cache's forward, not here)."""
    cfg = CacheConfig(data=data, split="train", limit=rows)
    source = open_split(cfg)
    ds = teacher_inputs(source, cfg, image_size, device)
    todo = list(iter_chunks(len(source), chunk_rows))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for _, x, *_ in input_loader(ds, todo, batch, workers, device):
            n += len(x)
        runs.append(n / (time.perf_counter() - t0))
    return {"rows": len(source), "batch": batch, "workers": workers, "rows_per_s": stats(runs)}


def timed_build(cfg: CacheConfig, device: torch.device) -> tuple[float, Any]:
    """(wall seconds, CacheResult) of one ``build_cache`` run that must compute all ``cfg.limit`` rows."""
    sync(device)
    t0 = time.perf_counter()
    res = build_cache(cfg)
    sync(device)
    secs = time.perf_counter() - t0
    if res.hit or res.rows_computed != cfg.limit:
        raise TcskdError(f"bench: cache run computed {res.rows_computed} of {cfg.limit} rows (hit={res.hit})")
    free(device)
    return secs, res


def bench_cache(teacher_spec: str, data: str, image_size: int | None, sizes: list[int], batch: int,
                workers: int, chunk_rows: int, device: torch.device, repeats: int, warmup: int,
                workdir: Path, keep: bool) -> dict[str, Any]:
    """End-to-end ``build_cache`` (what ``tcskd cache`` runs) at each size, each run into a fresh cache root;
    per size also the median seconds of each part the stage reports (``timings_s``).

    With ``keep`` the last cache of every size stays (for the basis and train benchmarks)."""
    def config(rows: int, root: Path) -> CacheConfig:
        return CacheConfig(data=data, teacher=teacher_spec, split="train", image_size=image_size,
                           batch_size=batch, cache_root=str(root), limit=rows, device=device.type,
                           workers=workers, chunk_rows=chunk_rows)

    for w in range(warmup):  # CUDA/allocator start, page cache, imports: a few batches suffice
        root = workdir / f"warm-{w}"
        timed_build(config(min(min(sizes), max(4 * batch, chunk_rows)), root), device)
        shutil.rmtree(root, ignore_errors=True)
    per_size = []
    kept: dict[int, str] = {}
    for rows in sizes:
        secs, parts = [], []
        for r in range(repeats):
            root = workdir / f"cache-{rows}-{r}"
            s, res = timed_build(config(rows, root), device)
            secs.append(s)
            parts.append(res.timings)
            if keep and r == repeats - 1:
                kept[rows] = str(res.path)
            else:
                shutil.rmtree(root, ignore_errors=True)
        st = stats(secs)
        per_size.append({"rows": rows, "seconds": st, "rows_per_s": rows / st["median"],
                         "timings_s": {n: float(np.median([p[n] for p in parts])) for n in parts[0]}})
    fit = linear_fit([p["rows"] for p in per_size], [p["seconds"]["median"] for p in per_size])
    return {"batch": batch, "workers": workers, "chunk_rows": chunk_rows, "sizes": per_size, "linear_fit": fit,
            "kept": kept}
