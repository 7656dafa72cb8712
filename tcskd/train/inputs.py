"""What a training run reads before it starts: the rows, targets and datasets of one run (:class:`RunInputs`).

:func:`load_run_inputs` opens the cache and
the dataset and calls, in order: :func:`open_train_rows` (the training split's
rows the cache holds, checked against the data, and the validation holdout,
chosen before anything is read for training: no target of its rows is loaded),
:func:`load_fit_targets` (the targets of the other rows, scaled, and the eLSH
term's hyperplanes) and :func:`assemble_inputs` (the datasets of training,
validation, test and kNN references). :func:`online_teacher` loads the cache's
teacher for ``--method online``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcskd.data import Source, has_split, open_source
from tcskd.device import resolve_device
from tcskd.errors import StoreError
from tcskd.splits import Holdout, labelled_mask, rows_digest
from tcskd.store.backends import Store
from tcskd.store.bases import Basis
from tcskd.store.handle import open_cache
from tcskd.store.manifest import Manifest
from tcskd.train.data import ViewImages, resolve_augment
from tcskd.train.losses import elsh_bias, elsh_planes, elsh_sample
from tcskd.train.config import TrainConfig, default_dim
from tcskd.train.targets import RAW, load_targets, match_rows, resolve_basis, target_scale
from tcskd.views import resize_on_device

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """Everything the loop needs that comes from the dataset and the cache."""

    train_set: ViewImages
    val_set: ViewImages | None
    test_set: ViewImages | None
    knn_set: ViewImages
    views: int
    num_classes: int
    channels: int
    image_size: int
    augment: str
    k: int | None
    basis_name: str | None
    basis_kind: str | None
    basis: Any
    target_scale: float | None
    elsh: tuple[torch.Tensor, torch.Tensor] | None
    data_spec: str
    cache_path: str | None
    cache_key: str | None
    teacher_spec: str | None
    teacher_size: int | None
    n_labelled: int
    setup_seconds: float
    split: dict[str, Any]
    basis_excludes_val: bool | None
    teacher_identity: dict[str, Any] | None = None
    elsh_rows: torch.Tensor | None = None


@dataclass
class TrainRows:
    """The rows of the dataset a run trains on (those the cache holds), before the validation holdout."""

    data_spec: str
    train_split: str
    """The dataset split trained on: ``train``, or ``test`` for a cache of the test split."""
    source: Source
    rows: np.ndarray
    """Rows of ``source``."""
    store_rows: np.ndarray | None
    """Their store rows (None without a cache)."""
    views: int
    params: np.ndarray | None
    """Their stored view parameters, rows x V x 4 (None without a cache)."""
    holdout: Holdout
    val: np.ndarray
    """The validation rows (a mask over ``rows``), chosen before anything is read for training."""

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.rows]

    @property
    def sample_index(self) -> np.ndarray:
        return np.asarray(self.source.indices, np.int64)[self.rows]


def open_train_rows(cfg: TrainConfig, store: Store | None, manifest: Manifest,
                    cache_path: Any) -> TrainRows:
    """The dataset (``--data``, else the cache's) and the rows of its training split that the cache holds,
    checked against it (every row without a cache), with the validation rows held out."""
    data_spec = cfg.data or manifest.data_spec
    if not data_spec:
        raise StoreError(f"cache {cache_path} names no dataset (data_spec); pass --data")
    split = manifest.split or "train"
    train_split = "test" if split == "test" else "train"
    if split == "test":
        log.warning("cache %s holds the test split: the student trains on test images", cache_path)
    train_source = open_source(data_spec, train_split)
    if store is not None:
        split_source = train_source if split == train_split else open_source(data_spec, split)
        limited = manifest.limited
        rows, store_rows = match_rows(store, split_source, train_source, limited)
        views = int(store["features"].shape[1])
        params = np.asarray(store.read("view_params"), np.float32)[store_rows]
        if cfg.data is None and manifest.data_fingerprint not in (None, train_source.fingerprint):
            log.warning("the dataset's files differ from those the cache was built from")
    else:
        rows, store_rows, views, params = np.arange(len(train_source)), None, 1, None
    # The validation rows are chosen before anything is read for training: no target of theirs is loaded.
    holdout = Holdout(cfg.val_frac, cfg.val_per_class, cfg.val_seed)
    val = holdout.mask(train_source.labels[rows], np.asarray(train_source.indices, np.int64)[rows])
    return TrainRows(data_spec, train_split, train_source, rows, store_rows, views, params, holdout, val)


@dataclass
class FitTargets:
    """The targets of the training rows (scaled), and the eLSH term's hyperplanes and bias sample."""

    targets: np.ndarray | None = None
    scale: float | None = None
    elsh: tuple[torch.Tensor, torch.Tensor] | None = None
    elsh_rows: torch.Tensor | None = None


def load_fit_targets(cfg: TrainConfig, store: Store | None, basis: Basis | None,
                     store_rows: np.ndarray | None) -> FitTargets:
    """The targets of ``store_rows`` in ``basis`` divided by :func:`target_scale` (none for ``ce``; for
    ``online`` only while the eLSH bias needs them: the teacher computes them live)."""
    if basis is None:
        return FitTargets()
    targets = elsh = elsh_rows = None
    if cfg.method != "online" or cfg.elsh_bits:
        targets = load_targets(store, store_rows, basis)
    scale = target_scale(basis, targets, cfg.target_norm)
    if targets is not None:
        targets /= np.float32(scale)
        if cfg.elsh_bits:  # the sample is kept: the bias is fitted again when the mask changes
            elsh_rows = elsh_sample(targets, cfg.seed)
            w = elsh_planes(cfg.elsh_bits, targets.shape[-1], cfg.seed)
            elsh = (w, elsh_bias(elsh_rows, w))
        if cfg.method == "online":
            targets = None  # only needed for the eLSH bias; the teacher computes them live
    return FitTargets(targets, scale, elsh, elsh_rows)


def _basis_excludes_val(basis: Basis | None, val: np.ndarray, sample_index: np.ndarray) -> bool | None:
    """Whether the basis left exactly this run's validation rows out (it recorded the same set of rows);
    None for a basis that was not fitted (identity, raw, none)."""
    fitted = basis is not None and basis.name != RAW and basis.kind != "identity"
    excludes = (None if not fitted else
                bool(val.any()) and basis.attrs.get("held_out_rows") == rows_digest(sample_index[val]))
    if fitted and val.any() and not excludes:
        log.warning("basis '%s' was fitted on rows this run holds out for validation (fit it with "
                    "`tcskd basis --exclude-val` and the same --val-* options)", basis.name)
    return excludes


def _student_views(cfg: TrainConfig, src: TrainRows, manifest: Manifest) -> tuple[int, str, int | None, bool]:
    """(student size, augmentation, teacher size, whether the device resizes the teacher's input)."""
    size = cfg.image_size or min(src.source.image(int(src.rows[0])).shape[:2])
    augment = resolve_augment(cfg.augment, src.data_spec, src.source.channels) if src.views == 1 else "none"
    if src.views > 1 and cfg.augment not in ("auto", "none"):
        log.info("a %d-view cache: the student replays the stored views; --augment %s is not used",
                 src.views, cfg.augment)
    teacher_size = int(manifest.image_size) if cfg.method == "online" else None
    # Online on a GPU: the teacher's upsampled input is made on the device, not image by image on the CPU.
    defer = teacher_size is not None and resize_on_device(resolve_device(cfg.device))
    return size, augment, teacher_size, defer


def assemble_inputs(cfg: TrainConfig, src: TrainRows, basis: Basis | None, fit: FitTargets,
                    manifest: Manifest, cache_path: Any) -> RunInputs:
    """The run's datasets (training, validation, test, kNN references) and what the loop records of them;
    ``setup_seconds`` is left to the caller."""
    holdout, val = src.holdout, src.val
    channels, labels, sample_index, fit_rows = src.source.channels, src.labels, src.sample_index, ~val
    if holdout.empty:
        log.warning("no validation rows (--val-frac 0): choose settings on a held-out split, not on test")
    labelled = labelled_mask(labels, sample_index, cfg.labels_per_class, cfg.seed, eligible=fit_rows)
    basis_excludes_val = _basis_excludes_val(basis, val, sample_index)
    size, augment, teacher_size, defer = _student_views(cfg, src, manifest)
    view0 = src.params[:, :1] if src.params is not None else None

    def part(mask: np.ndarray, **kw: Any) -> ViewImages:
        p = kw.pop("params", view0)
        return ViewImages(src.source, src.rows[mask], size, channels, p[mask] if p is not None else None, **kw)

    ce_labels = np.where(labelled, labels, -1).astype(np.int64)
    train_set = part(fit_rows, params=src.params, targets=fit.targets, ce_labels=ce_labels[fit_rows],
                     augment=augment, seed=cfg.seed, teacher_size=teacher_size, defer_teacher_resize=defer)
    knn_set = part(labelled)  # the kNN references: only the labels the run was given
    val_set = part(val) if val.any() else None
    test_set = None
    if src.train_split == "train" and has_split(src.data_spec, "test"):
        test_source = open_source(src.data_spec, "test")
        test_set = ViewImages(test_source, np.arange(len(test_source)), size, channels)
    split = {"train": sample_index[fit_rows].tolist(), "val": sample_index[val].tolist(),
             "labelled": sample_index[labelled].tolist(), "holdout": holdout.as_dict(),
             "labels_per_class": cfg.labels_per_class, "seed": cfg.seed,
             "source_split": src.train_split, "data": src.data_spec, "cache_key": manifest.key}
    return RunInputs(
        train_set=train_set, val_set=val_set, test_set=test_set, knn_set=knn_set, views=src.views,
        num_classes=int(src.source.num_classes), channels=channels, image_size=int(size), augment=augment,
        k=basis.k if basis is not None else None,
        basis_name=basis.name if basis is not None else None,
        basis_kind=basis.kind if basis is not None else None, basis=basis, target_scale=fit.scale, elsh=fit.elsh,
        elsh_rows=fit.elsh_rows, data_spec=src.data_spec,
        cache_path=str(cache_path) if cache_path else None, cache_key=manifest.key,
        teacher_spec=manifest.teacher_spec, teacher_size=teacher_size, n_labelled=int(labelled.sum()),
        teacher_identity=manifest.teacher_identity, split=split,
        basis_excludes_val=basis_excludes_val, setup_seconds=0.0)


def online_teacher(prep: RunInputs) -> Any:
    """The cache's teacher, for method online; refused when it is no longer the one the cache was built with."""
    from tcskd.teachers import load_teacher  # only this method ever imports the teacher code

    if not prep.teacher_spec:
        raise StoreError(f"cache {prep.cache_path} names no teacher (teacher_spec); --method online needs one")
    teacher = load_teacher(prep.teacher_spec, prep.teacher_size)
    want = prep.teacher_identity
    if want and teacher.identity() != want:
        now = teacher.identity()
        diff = sorted(k for k in set(now) | set(want) if now.get(k) != want.get(k))
        raise StoreError(f"teacher {prep.teacher_spec} is not the one cache {prep.cache_key} was built with "
                         f"(differs in: {', '.join(diff)}); online targets would not match the cached basis")
    return teacher


def load_run_inputs(cfg: TrainConfig) -> RunInputs:
    """Open the data and the cache, check they match, and load the targets into memory ."""
    t0 = time.perf_counter()
    manifest, store, cache_path = Manifest(), None, None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache, cfg.cache_root)  # refused unless complete and sound
        cache_path, store, manifest = cache.path, cache.store, cache.manifest
    try:
        src = open_train_rows(cfg, store, manifest, cache_path)  # the validation rows held out
        basis = (resolve_basis(store, cfg.method, cfg.basis, cfg.dim, default_dim(cfg)) if store is not None
                 else None)
        fit = load_fit_targets(cfg, store, basis, src.store_rows[~src.val] if store is not None else None)
    finally:
        if store is not None:
            store.close()
    prep = assemble_inputs(cfg, src, basis, fit, manifest, cache_path)
    prep.setup_seconds = time.perf_counter() - t0
    return prep
