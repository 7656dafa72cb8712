"""Targets in RAM against targets read from the store (``tcskd train --targets ram|store``) as the rows grow.

Synthetic caches (no teacher) are written through the store layer (:func:`tcskd.store.layout.create_store`):
global features (N x 1 x K float16, a PCA basis of K components projecting them) and a ``--dim K`` patch cache
(N x 1 x T x K float16 coordinates, ``coords_of``), with an npz of N tiny images as their data. For each
(kind, N, mode) a child process builds the training run's inputs (:func:`tcskd.train.inputs.load_run_inputs`,
as ``tcskd train`` does: the ram mode reads every target up front, the store mode opens the chunk LRU), then
reads every target of one epoch in the order the run draws them (the block sampler's for the store, a shuffled
permutation for ram) in batches. Reported: the set-up seconds, the target-read img/s (set-up included and not),
and the child's peak RSS above its RSS after imports (``ru_maxrss``, the imports' own peak reset first through
/proc/self/clear_refs where Linux allows it) and what it still holds after the epoch. From them: the cost growth (seconds per
row at 4N / at N) and the RAM per rank projected to ImageNet-1k's 1,281,167 rows (a line through the two
sizes' peaks: its fixed part and its bytes per row).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: ImageNet-1k's training rows: the projection's N.
IMAGENET_ROWS = 1_281_167


def write_scale_data(root: Path, rows: int, kind: str, k: int = 64, tokens: int = 256,
                     chunk_rows: int | None = None, seed: int = 0) -> Path:
    """A complete synthetic cache of ``rows`` rows at ``root``/``kind`` (and its npz of 8x8 images beside it).

    ``kind`` "global": features rows x 1 x ``k`` float16 and a PCA basis ``pca`` of ``k`` orthonormal components;
    "dense": a ``--dim k`` patch cache, coordinates rows x 1 x ``tokens`` x ``k`` float16 (``coords_of`` ``pca``).
    Written chunk by chunk (at most one chunk of features in memory)."""
    from tcskd.store.bases import write_basis
    from tcskd.store.layout import create_store
    from tcskd.store.manifest import Manifest
    from tcskd.store.registry import cache_key

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    classes = 10
    y = (np.arange(rows) % classes).astype(np.int64)
    npz = root / f"{kind}-{rows}.npz"
    np.savez(npz, x=rng.integers(0, 256, size=(rows, 8, 8), dtype=np.uint8), y=y,
             x_test=rng.integers(0, 256, size=(classes, 8, 8), dtype=np.uint8), y_test=np.arange(classes))
    dense = kind == "dense"
    grid = int(round(tokens ** 0.5))
    if dense and grid * grid != tokens:
        raise ValueError(f"tokens must be a square, not {tokens}")
    chunk_rows = chunk_rows or (32 if dense else 1024)
    identity = {"bench": "scale", "kind": kind, "rows": rows, "k": k, "n_tokens": tokens if dense else 1,
                "data": {"spec": f"npz:{npz}"}, "teacher": {"spec": "synthetic"}, "split": "train"}
    extra: dict[str, Any] = (dict(tokens="patch", grid=[grid, grid], patch=8 / grid, teacher_dim=k, coords_of="pca",
                                  dense_chunks=True) if dense else {})
    manifest = Manifest.new(key=cache_key(identity), identity=identity, data_spec=f"npz:{npz}", split="train",
                            teacher_spec="synthetic", n_rows=rows, views=1, dim=k, dtype="float16",
                            chunk_rows=chunk_rows, num_classes=classes, channels=1, image_size=8, complete=False,
                            skipped=[], **extra)
    path = root / kind
    shutil.rmtree(path, ignore_errors=True)
    store = create_store(path, manifest, "zarr")
    try:
        feats = store["features"]
        shape = (1, tokens, k) if dense else (1, k)
        step = max(chunk_rows, (16 << 20) // (int(np.prod(shape)) * 2) // chunk_rows * chunk_rows)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            feats[a:b] = rng.standard_normal((b - a, *shape), dtype=np.float32).astype(np.float16)
        store["labels"][...] = y
        store["sample_index"][...] = np.arange(rows)
        store["view_params"][...] = np.tile(np.array([0, 0, 8, 8, 0], np.float32), (rows, 1, 1))
        store["row_ok"][...] = np.ones(rows, bool)
        store["chunk_done"][...] = np.ones(manifest.n_chunks, bool)
        comps = np.linalg.qr(rng.normal(size=(k, k)))[0]
        eig = np.linspace(2.0, 0.1, k)
        write_basis(store, "pca", {"mean": np.zeros(k), "components": comps, "eigenvalues": eig,
                                   "explained_ratio": np.cumsum(eig) / eig.sum()}, {"kind": "pca", "whiten": False})
        store.set_attrs({"complete": True})
        store.flush()
    finally:
        store.close()
    return path


def _rss_now() -> int:
    """This process's resident set, bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: ``5`` to /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_targets(cache: str, kind: str, mode: str, budget_mb: int, batch: int = 256,
                    seed: int = 0) -> dict[str, Any]:
    """In this process: the run's inputs (``--targets mode``), then one epoch of target reads; the figures.

    Meant for a child process of its own (:func:`measure_in_child`): its peak RSS is the point."""
    import resource

    import torch

    from tcskd.train.config import TrainConfig, resolve_config
    from tcskd.train.data import BlockSampler
    from tcskd.train.inputs import load_run_inputs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()  # else the imports' own peak could hide the targets' one
    base_rss = _rss_now()
    opts: dict[str, Any] = dict(cache=cache, device="cpu", workers=0, targets=mode, target_cache_mb=budget_mb,
                                method="tcs", basis="pca", dim=None, batch_size=batch, seed=seed)
    if kind == "dense":
        opts.update(mimic_on="dense", tailor="off")
    t0 = time.perf_counter()
    inputs = load_run_inputs(resolve_config(TrainConfig(**opts)))
    setup = time.perf_counter() - t0
    ds = inputs.train_set
    t = ds.dense_targets if kind == "dense" else ds.targets
    n = len(t)
    if inputs.blocks is not None:
        order, views = BlockSampler(inputs.blocks[0], 1, seed, 0, inputs.blocks[1]).order()
    else:
        order = np.random.default_rng(seed).permutation(n)
        views = np.zeros(n, np.int64)
    t0 = time.perf_counter()
    total = 0.0
    for a in range(0, n, batch):
        got = t[order[a:a + batch], views[a:a + batch]]
        total += float(np.sum(got, dtype=np.float64))  # every value read, summed (ram and store: equal)
    read = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = _rss_now() - base_rss
    lru = getattr(t, "lru", None)
    ram_bytes = int(t.ram_bytes) if hasattr(t, "ram_bytes") else int(t.nbytes)
    torch.set_num_threads(threads)
    return {"kind": kind, "mode": mode, "rows": n, "setup_s": setup, "read_s": read,
            "read_img_per_s": n / read, "img_per_s_with_setup": n / (setup + read),
            "peak_rss_bytes": max(0, peak - base_rss), "held_rss_bytes": held, "rss_after_imports": base_rss,
            "import_peak_rss": import_peak, "peak_reset": reset, "targets_ram_bytes": ram_bytes,
            "lru_budget_bytes": None if lru is None else int(budget_mb) << 20,
            "lru_peak_held_bytes": None if lru is None else int(getattr(lru, "peak_bytes", lru.held_bytes)),
            "chunk_reads": None if lru is None else int(lru.reads), "checksum": total}


def measure_in_child(cache: str, kind: str, mode: str, budget_mb: int, timeout: float = 600.0) -> dict[str, Any]:
    """:func:`measure_targets` in a fresh Python process (its own peak RSS), one torch thread."""
    code = ("import json, sys; from tcskd.bench.scale import measure_targets; "
            "print('@@' + json.dumps(measure_targets(*sys.argv[1:4], int(sys.argv[4]))))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code, cache, kind, mode, str(budget_mb)], capture_output=True,
                         text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"scale child ({kind}, {mode}) failed: {res.stderr[-1500:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("@@"))
    return json.loads(line[2:])


def _projection(points: list[dict[str, Any]], rows: int = IMAGENET_ROWS) -> dict[str, Any]:
    """A line through the measured peaks (fixed bytes + bytes per row) evaluated at ``rows``."""
    n = np.array([p["rows"] for p in points], float)
    b = np.array([p["peak_rss_bytes"] for p in points], float)
    per_row = float((b[-1] - b[0]) / (n[-1] - n[0])) if len(n) > 1 and n[-1] > n[0] else float(b[0] / n[0])
    per_row = max(per_row, 0.0)
    fixed = float(b[0] - per_row * n[0])
    return {"bytes_per_row": per_row, "fixed_bytes": fixed, "rows": rows, "bytes": fixed + per_row * rows}


def bench_scale(workdir: Path, sizes: dict[str, list[int]], k: int = 64, tokens: int = 256,
                budget_mb: int = 16, echo: Any = None, isolate: bool = True) -> dict[str, Any]:
    """Every (kind, N, mode) of ``sizes`` ({"global": [N, 4N], "dense": [n, 4n]}): the figures, the cost growth
    and the projection to ImageNet-1k rows per kind and mode. ``isolate`` False measures in this process (the
    figures but an honest peak RSS: for tests)."""
    out: dict[str, Any] = {"k": k, "tokens": tokens, "budget_mb": budget_mb, "imagenet_rows": IMAGENET_ROWS,
                           "kinds": {}}
    for kind, ns in sizes.items():
        runs: list[dict[str, Any]] = []
        for n in ns:
            t0 = time.perf_counter()
            path = write_scale_data(workdir / f"{kind}-{n}", n, kind, k=k, tokens=tokens)
            write_s = time.perf_counter() - t0
            if echo:
                echo(f"scale: {kind} {n} rows written in {write_s:.1f} s")
            for mode in ("ram", "store"):
                r = (measure_in_child(str(path), kind, mode, budget_mb) if isolate else
                     measure_targets(str(path), kind, mode, budget_mb))
                r["write_s"] = write_s
                runs.append(r)
            shutil.rmtree(workdir / f"{kind}-{n}", ignore_errors=True)
        summary: dict[str, Any] = {}
        for mode in ("ram", "store"):
            pts = [r for r in runs if r["mode"] == mode]
            first, last = pts[0], pts[-1]
            per = [(p["setup_s"] + p["read_s"]) / p["rows"] for p in (first, last)]
            formula = (last["targets_ram_bytes"] / last["rows"] * IMAGENET_ROWS if mode == "ram" else
                       float(budget_mb << 20))
            summary[mode] = {"cost_growth": per[1] / per[0] if per[0] > 0 else None,
                             "rows_ratio": last["rows"] / first["rows"],
                             "projected": _projection(pts), "projected_targets_bytes": formula}
        summary["store_vs_ram_read"] = runs[-1]["read_img_per_s"] / runs[-2]["read_img_per_s"]
        out["kinds"][kind] = {"runs": runs, "summary": summary}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tcskd.bench.scale``: this section alone at a profile's sizes; JSON and Markdown written."""
    import argparse
    import tempfile

    import torch

    from tcskd.bench.env import environment
    from tcskd.bench.profiles import profile_config
    from tcskd.bench.report import _scale_table, write_atomic

    ap = argparse.ArgumentParser(prog="python -m tcskd.bench.scale", description=main.__doc__)
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/out/scale.json")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = profile_config(a.profile, "cpu", quick=a.quick)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tcskd-scale-"))
    t0 = time.perf_counter()
    try:
        res = bench_scale(work, {"global": list(cfg.scale_global_rows), "dense": list(cfg.scale_dense_rows)},
                          k=cfg.scale_k, tokens=cfg.scale_tokens, budget_mb=cfg.scale_budget_mb, echo=print)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    env = environment(torch.device("cpu"))
    whole = {"environment": env, "profile": cfg.profile, "quick": cfg.quick, "scale": res,
             "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(a.out)
    write_atomic(out, json.dumps(whole, indent=2) + "\n")
    text = (f"## tcskd bench scale section: {cfg.profile} profile{' (quick)' if cfg.quick else ''}\n\nMeasured on "
            f"{env['device_name']} ({env['cpu_count']} CPU cores), {env['date']}, {whole['seconds']} s in all; "
            f"load average {env.get('loadavg_start')}.\n" + "\n".join(_scale_table(whole)) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
