"""The train stage's figures: each method trained on the same cache (in a child process of its own, so that a
CPU peak RSS belongs to one method), its img/s and peak memory, how long the loop waits for its batches, and
its DataLoader alone.

The waits come from the run's ``metrics.jsonl`` (per epoch: ``data_wait_s``, ``first_batch_s``, ``steps``, which
the loop writes); the DataLoader alone is the loop's own (:func:`tcskd.train.data.train_loader`).
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
from typing import Any, Callable

import numpy as np
import torch

from tcskd.bench.env import REPO_ROOT, process_peak_rss, process_rss
from tcskd.bench.measure import free, stats, sync
from tcskd.device import peak_memory_bytes, resolve_device
from tcskd.errors import TcskdError
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.data import train_loader
from tcskd.train.inputs import load_run_inputs
from tcskd.train.loop import train

log = logging.getLogger(__name__)

CHILD_MARK = "TCSKD_BENCH_CHILD "
#: Per-epoch fields of ``metrics.jsonl`` the data-wait figures are made of.
WAIT_FIELDS = ("data_wait_s", "first_batch_s", "steps")


def run_loader(cfg: TrainConfig, workers: int, device: torch.device) -> Callable[[int], Any]:
    """``r -> `` the run's training DataLoader (:func:`tcskd.train.data.train_loader`: same dataset, batch and
    workers) at the ``r``-th epoch after the run's last; the run's inputs are read again, outside any timing."""
    cfg = resolve_config(cfg)
    prep = load_run_inputs(cfg)
    last = cfg.stop_after or cfg.epochs
    return lambda r: train_loader(prep, cfg, last + r, device, workers)


def epochs_from_metrics(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loop's own per-epoch waits (:data:`WAIT_FIELDS` and the epoch's ``seconds``); a TcskdError when
    ``metrics.jsonl`` does not hold them."""
    if not metrics or not all(all(f in m for f in WAIT_FIELDS) for m in metrics):
        raise TcskdError(f"bench: metrics.jsonl has no {', '.join(WAIT_FIELDS)}: the training loop no longer "
                         f"reports its input waits; update tcskd.bench.train")
    return [{f: m[f] for f in (*WAIT_FIELDS, "seconds")} for m in metrics]


def loader_only(loader_for: Callable[[int], Any], repeats: int = 1) -> dict[str, Any]:
    """The training DataLoader alone (same dataset, batch, workers), one epoch per repeat."""
    runs, steady = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        n, n_first, t_first = 0, 0, None
        for batch in loader_for(r):
            if t_first is None:
                t_first = time.perf_counter()
                n_first = len(batch[0])
            n += len(batch[0])
        t1 = time.perf_counter()
        runs.append(n / (t1 - t0))
        if t_first is not None and n > n_first and t1 > t_first:
            steady.append((n - n_first) / (t1 - t_first))
    return {"img_per_s": stats(runs), "steady_img_per_s": stats(steady) if steady else None}


def data_wait(epochs: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Median wait per step, step time, the share of the epoch spent waiting, and which side is the limit."""
    first = [e["first_batch_s"] for e in epochs if e["steps"]]
    rest = [(e["data_wait_s"] - e["first_batch_s"]) / (e["steps"] - 1) for e in epochs if e["steps"] > 1]
    share = [e["data_wait_s"] / e["seconds"] for e in epochs if e["seconds"] > 0]
    step_s = [e["seconds"] / e["steps"] for e in epochs if e["steps"]]
    wait_share = float(np.median(share)) if share else None
    # With workers the pipeline runs beside the step: any sizable wait means the step starves.
    # Without workers loading is part of every step; it is the limit when it takes most of the step.
    threshold = 0.1 if workers > 0 else 0.5
    limit = None if wait_share is None else ("input pipeline" if wait_share > threshold else "training step")
    return {"first_batch_s": float(np.median(first)) if first else None,
            "per_step_ms": 1e3 * float(np.median(rest)) if rest else None,
            "step_ms": 1e3 * float(np.median(step_s)) if step_s else None,
            "wait_share": wait_share, "limit": limit, "threshold": threshold}


def summarise_train(metrics: list[dict[str, Any]], epochs: list[dict[str, Any]], batch: int, workers: int,
                    peak: int, isolated: bool, only: dict[str, Any] | None) -> dict[str, Any]:
    """One method's figures; the first epoch (of ``metrics`` and of ``epochs``) is the warm-up."""
    measured = metrics[1:] if len(metrics) > 1 else metrics
    epochs_m = epochs[1:] if len(epochs) > 1 else epochs
    steps = [e["steps"] for e in epochs_m]
    return {
        "img_per_s": stats([m["train_img_per_s"] for m in measured]),
        "epoch_seconds": stats([m["seconds"] for m in measured]),
        "steps_per_epoch": int(np.median(steps)) if steps else None, "batch": batch, "workers": workers,
        "epochs_measured": len(measured), "peak_mem_bytes": int(peak), "peak_mem_isolated": isolated,
        "data_wait": data_wait(epochs_m, workers), "loader_only": only, "test_top1": None,
    }


def run_train_inprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method (``spec["config"]``: TrainConfig's fields); the summary of :func:`summarise_train`."""
    cfg = TrainConfig(**spec["config"])
    baseline = process_rss()
    train(cfg)
    device = resolve_device(cfg.device)
    sync(device)
    peak = peak_memory_bytes(device) if device.type == "cuda" else process_peak_rss()
    out = Path(cfg.out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    import yaml

    resolved = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("resolved", {})
    workers = int(resolved.get("workers", 0))
    epochs = epochs_from_metrics(metrics)
    only = loader_only(run_loader(cfg, workers, device)) if spec.get("loader_only", True) else None
    res = summarise_train(metrics, epochs, cfg.batch_size, workers, peak, spec.get("isolated", False), only)
    if device.type == "cpu":
        res["rss_before_train_bytes"] = baseline
    return res


def train_child() -> None:
    """Entry point of a child process: ``python -c '...; train_child()' SPEC_JSON``; prints one result line."""
    spec = json.loads(sys.argv[-1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    spec["isolated"] = True
    try:
        res = run_train_inprocess(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(CHILD_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()


def _run_train_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    code = "from tcskd.bench.train import train_child; train_child()"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO_ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            res = json.loads(line[len(CHILD_MARK):])
            if "error" in res:
                raise TcskdError(f"bench: training {spec['config']['method']} failed: {res['error']}")
            return res
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise TcskdError(f"bench: training child exited {proc.returncode} without a result: {tail}")


def bench_train(cache: str, methods: tuple[str, ...], student: str, batch: int, epochs: int, dim: int,
                device: torch.device, workdir: Path, workers: int | None = None, isolate: bool = True,
                threads: int | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Train each method for ``1 + epochs`` epochs (the first is the warm-up) on the same cache and rows."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for method in methods:
        run_dir = workdir / f"run-{method}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = dict(cache=cache, basis="pca", student=student, method=method, dim=dim, batch_size=batch,
                      epochs=epochs + 2, stop_after=epochs + 1, eval_every=10**6, val_frac=0.0, device=device.type,
                      workers=workers, out=str(run_dir), seed=0)
        spec = {"config": config, "threads": threads}
        free(device)
        t0 = time.perf_counter()
        try:
            if isolate:
                res = _run_train_child(spec, timeout)
            else:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = run_train_inprocess(spec)
        except (TcskdError, subprocess.TimeoutExpired) as e:  # the other methods still run
            log.error("bench: training %s failed: %s", method, e)
            errors[method] = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        res["wall_s"] = time.perf_counter() - t0
        out[method] = res
        shutil.rmtree(run_dir, ignore_errors=True)
    if errors:
        out["_errors"] = errors
    return out
