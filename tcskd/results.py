"""What the stage functions return: typed dicts whose keys are documented here.

``fit_basis`` returns a :class:`BasisResult`, ``train`` a :class:`TrainResult` (the content of the run's
``final.json``; a run stopped by ``stop_after`` returns a :class:`StoppedRun`), ``evaluate`` (``tcskd eval``) an
:class:`EvalResult`. They are plain dicts at run time, indexed as before (``res["test_top1"]``) and written
as JSON as they are; the types tell an editor and a type checker which keys there are. The cache stage
returns the dataclass ``tcskd.cache.build.CacheResult``.

Accuracies are fractions in [0, 1]; None where there was nothing to score (no labelled rows). This module
imports nothing of tcskd (and no torch), so ``from tcskd.results import TrainResult`` is cheap.
"""

from __future__ import annotations

import statistics
from typing import Any, TypedDict


class BasisResult(TypedDict):
    """``fit_basis(BasisConfig)``: the basis that was fitted and stored."""

    name: str
    """The basis's name in the cache (``bases/<name>``)."""
    kind: str
    """pca, random or identity."""
    k: int
    """Coordinates kept (K)."""
    dim: int
    """Feature dimension D."""
    explained: float
    """Cumulative share of the total variance in the K coordinates."""
    top_eigenvalues: list[float]
    """The first (up to 10) eigenvalues, largest first."""
    total_variance: float
    """Trace of the covariance (identity: the summed second moments)."""
    rows_used: int
    """Rows the fit read (``row_ok``, less the held-out validation rows with ``exclude_val``)."""
    samples: int
    """Samples in the moments (rows x views with ``view='all'``)."""
    cache: str
    """The cache directory that holds the basis."""
    basis: str
    """Where the basis is stored (a directory, or ``store.h5:/bases/<name>``)."""
    plot: str | None
    """The scree plot written beside the cache (None with ``plot=False``)."""
    fit_on: str
    """Key of the cache whose features were fitted (this cache unless ``fit_on``)."""
    seconds: float
    """Wall time of the fit."""
    timings: dict[str, float]
    """Seconds of ``read``, ``compute``, ``write`` and ``plot`` (they sum to at most ``seconds``)."""


#: ``train(TrainConfig)``: the content of the run's ``final.json``. A dict type declared by call, since one key
#: is ``lambda``. Keys: the scores (``val_top1`` and ``test_top1`` of the classifier, ``knn_top1`` and
#: ``knn_val_top1`` of a weighted kNN on the student's features with the ``knn_reference_rows`` labelled rows as
#: references, ``best_val_top1`` over the epochs), what the run was (``method``, ``student``, ``student_params``,
#: ``dim`` = K, ``active_coords`` after tailoring, ``tailoring``, ``classify_from``, ``select_by``, ``lambda``,
#: ``mimic``, ``target_norm``, ``target_scale``, ``elsh_bits``, ``labels_per_class``, ``seed``, ``epochs``,
#: ``image_size``, ``device``), its data (``basis``, ``basis_kind``, ``basis_excludes_val``, ``cache_key``,
#: ``cache``, ``data``, ``train_images``, ``labelled_images``, ``val_rows``, ``holdout``), its cost
#: (``train_seconds``, ``img_per_s``, ``peak_mem_bytes``, on the CPU ``rss_after_imports_bytes`` and
#: ``peak_mem_over_imports_bytes`` (the peak less the RSS when training started), ``seconds_per_epoch`` (the
#: median training seconds of the epochs after the first, validation excluded; None after a resume that lost
#: them), ``setup_seconds``,
#: ``eval_seconds``, ``total_seconds``) and where it is (``run_dir``), ``task`` (classify | segment) and ``mimic_on`` (global, dense,
#: both; None without a mimic term), ``kept_ranks`` (the active coordinates as ranks in the basis, 0 = leading:
#: ``{"epoch": [e0, e1, ...], "ranks": [[...], [...], ...]}``, one entry at the start, e0 = 0, and one per selection
#: step that changed the mask, e = the epochs done when it took effect; None without coordinates) and
#: ``final_kept_ranks`` (the last entry's ranks). Segmentation runs add ``val_miou``, ``test_miou``, ``val_pixel_acc``,
#: ``test_pixel_acc`` (the pixel classifier's mean IoU and pixel accuracy; their top-1 and kNN keys are None) and
#: ``best_val_miou``. The README's stage-3 section describes final.json.
_TrainResultKeys = TypedDict("_TrainResultKeys", {
    "val_top1": float | None, "test_top1": float | None, "knn_top1": float | None,
    "knn_val_top1": float | None, "knn_reference_rows": int, "best_val_top1": float | None,
    "train_seconds": float, "img_per_s": float | None, "peak_mem_bytes": int | None,
    "rss_after_imports_bytes": int | None, "peak_mem_over_imports_bytes": int | None,
    "seconds_per_epoch": float | None,
    "setup_seconds": float, "eval_seconds": float, "total_seconds": float,
    "method": str, "student": str, "student_params": int, "dim": int | None, "active_coords": int | None,
    "tailoring": str, "classify_from": str, "select_by": str | None, "lambda": float, "mimic": str,
    "target_norm": str, "target_scale": float | None, "elsh_bits": int, "labels_per_class": int | None,
    "seed": int, "epochs": int, "augment": str, "image_size": int, "device": str,
    "basis": str | None, "basis_kind": str | None, "basis_excludes_val": bool | None,
    "cache_key": str | None, "cache": str | None, "data": str, "train_images": int, "labelled_images": int,
    "val_rows": int, "holdout": dict[str, Any], "run_dir": str, "task": str, "mimic_on": str | None,
    "kept_ranks": dict[str, Any] | None, "final_kept_ranks": list[int] | None,
})


class TrainResult(_TrainResultKeys, total=False):
    """``train(TrainConfig)``: the content of the run's final.json (tcskd.results lists the keys)."""

    val_miou: float | None
    test_miou: float | None
    val_pixel_acc: float | None
    test_pixel_acc: float | None
    best_val_miou: float | None


class StoppedRun(TypedDict):
    """``train`` with ``stop_after`` below ``epochs``: the run stopped, resumable with ``resume=True``."""

    stopped_after: int
    """Epochs completed."""
    run_dir: str
    """The run directory to resume (``out``)."""


class EvalResult(TypedDict):
    """``evaluate(EvalConfig)`` (``tcskd eval``): the teacher's accuracy from its cached features."""

    knn_top1: float
    """Weighted kNN top-1 on the test cache (references: the labelled training rows)."""
    linear_top1: float | None
    """Linear-probe top-1 on the test cache (None with ``linear=False``)."""
    val_knn_top1: float | None
    """kNN top-1 on the held-out validation rows of the train cache (None without any)."""
    val_linear_top1: float | None
    """Linear-probe top-1 on the validation rows (None without any, or with ``linear=False``); with ``probe_wd``
    auto the rows also chose the decay, so it is the best of the candidates (optimistic)."""
    probe_wd: float | None
    """The probe's L2 penalty (None with ``linear=False``)."""
    probe_wd_source: str | None
    """How it was set: val (chosen on the validation rows), given (``probe_wd`` a number) or default (auto
    without labelled validation rows)."""
    probe_wd_grid: list[float]
    """The decays fitted (with val: ``tcskd.train.evaluate.PROBE_WD_GRID``)."""
    probe_wd_val_top1: list[float | None]
    """Each decay's validation top-1, in the order of ``probe_wd_grid`` (None without validation rows)."""
    k: int
    """Neighbours used (``k``, at most the reference rows)."""
    temperature: float
    """The kNN temperature."""
    train_rows: int
    """Labelled reference rows (and probe training rows)."""
    val_rows: int
    """Validation rows held out of the train cache."""
    test_rows: int
    """Labelled rows of the test cache."""
    labels_per_class: int | None
    """The label budget (None: every label)."""
    seed: int
    """Seed of the labelled subset and of the probe."""
    holdout: dict[str, Any]
    """The validation rule (``val_frac``, ``val_per_class``, ``val_seed``)."""
    teacher: str
    """The teacher spec of both caches."""
    data: str
    """The dataset spec of the train cache."""
    test_data: str
    """The dataset spec of the test cache."""
    dim: int
    """Feature dimension."""
    train_cache: str
    """The train cache directory."""
    test_cache: str
    """The test cache directory."""
    seconds: float
    """Wall time."""
    config: dict[str, Any]
    """The EvalConfig as a dict."""


__all__ = ["BasisResult", "TrainResult", "StoppedRun", "EvalResult"]


def seconds_per_epoch(epoch_seconds: list[float]) -> float | None:
    """The median of the epochs' training seconds after the first (the warm-up), or the only epoch's; None
    without any."""
    if not epoch_seconds:
        return None
    return float(statistics.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds))


#: The keys of ``metrics.jsonl`` rows and ``final.json`` that measure time or memory: they differ between two runs
#: that trained the same (a resumed run and an uninterrupted one, two processes, a busy machine).
TIMING_KEYS = frozenset({
    "seconds", "train_seconds", "data_wait_s", "first_batch_s", "train_img_per_s", "img_per_s", "setup_seconds",
    "eval_seconds", "total_seconds", "seconds_per_epoch", "peak_mem_bytes", "rss_after_imports_bytes",
    "peak_mem_over_imports_bytes"})


def without_timings(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` (a metrics row or final.json) without :data:`TIMING_KEYS`: what two equal trainings share."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}
