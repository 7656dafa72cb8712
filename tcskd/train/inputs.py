"""What a training run reads before it starts: the rows, targets and datasets of one run (:class:`RunInputs`).

:func:`load_run_inputs` opens the cache and
the dataset and calls, in order: :func:`open_train_rows` (the training split's
rows the cache holds, checked against the data, and the validation holdout,
chosen before anything is read for training: no target of its rows is loaded),
:func:`load_fit_targets` (the targets of the other rows, scaled, and the eLSH
term's hyperplanes; with ``--targets store`` none is loaded: they are read from the store while training,
tcskd.train.targets.StoreTargets) and :func:`assemble_inputs` (the datasets of training,
validation, test and kNN references). :func:`online_teacher` loads the cache's
teacher for ``--method online``.

Dense and segmentation runs: :func:`resolve_mimic` says which targets the mimic term matches (``--mimic-on``
against the cache's kind); on a patch cache the targets are token grids (tcskd.train.targets.load_dense_targets);
with ``--task segment`` every dataset carries masks, CE sees the masks of ``--labels-per-class`` images
(tcskd.splits.labelled_images) and the validation split is a seeded share of the images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcskd.data import Source, has_split, open_source
from tcskd.device import resolve_device
from tcskd.errors import StoreError, TcskdError
from tcskd.splits import Holdout, labelled_images, labelled_mask, rows_digest
from tcskd.store.backends import Store, open_store
from tcskd.store.bases import Basis
from tcskd.store.handle import open_cache
from tcskd.store.chunks import read_chunk_rows
from tcskd.store.manifest import Manifest
from tcskd.store.registry import resolve_cache
from tcskd.train.data import ViewImages, resolve_augment
from tcskd.train.losses import elsh_bias, elsh_planes, elsh_sample
from tcskd.train.config import TrainConfig, default_dim
from tcskd.train.targets import default_target_cache_mb
from tcskd.train.data import block_window
from tcskd.train.targets import (RAW, StoreTargets, choose_target_mode, load_dense_targets, load_targets, match_rows,
                                 mean_square, resolve_basis, scale_targets, target_scale)
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
    task: str = "classify"
    mimic_on: str | None = None
    """The resolved ``--mimic-on`` (global, dense or both); None without a mimic term (method ce)."""
    grid: tuple[int, int] | None = None
    """The teacher's token grid (Gh, Gw) of a patch cache."""
    store_targets: bool = False
    """Whether the training targets are read from the store while training (``--targets store``)."""
    blocks: tuple[np.ndarray, int] | None = None
    """(the store chunk of every training item, the block sampler's window in chunks); None without targets."""

    @property
    def dense(self) -> bool:
        """Whether the run mimics token grids."""
        return self.mimic_on in ("dense", "both")

    @property
    def global_(self) -> bool:
        """Whether the run mimics one global target per image."""
        return self.mimic_on in ("global", "both")


def mimic_for_cache(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--mimic-on auto`` made ``dense`` when its cache holds patch tokens (read from the manifest
    only), before the options are resolved: the tailoring presets (``--tailor auto``) and the saved config then
    know the run is dense. Global caches, ce, and a cache that cannot be opened (refused later, by the
    loading) leave ``cfg`` as it is."""
    if cfg.mimic_on != "auto" or cfg.cache is None or cfg.method == "ce":
        return cfg
    try:
        with open_store(resolve_cache(cfg.cache, cfg.cache_root)) as store:
            dense = Manifest.read(store).dense
    except (TcskdError, OSError):
        return cfg
    return dataclasses.replace(cfg, mimic_on="dense") if dense else cfg


def resolve_mimic(cfg: TrainConfig, manifest: Manifest, cache_path: Any) -> str | None:
    """``--mimic-on`` for this cache: auto -> global on a global cache, dense on a patch cache; None for ce (and
    a run without a cache). TcskdError (one line) for a dense mimic on a global cache, method online on a
    patch cache, or eLSH with dense targets."""
    if cfg.method == "ce" or cfg.cache is None:
        return None
    mimic = cfg.mimic_on if cfg.mimic_on != "auto" else ("dense" if manifest.dense else "global")
    if mimic in ("dense", "both") and not manifest.dense:
        raise TcskdError(f"cache {cache_path} holds global features; dense mimicking needs a cache built with "
                         f"`tcskd cache --tokens patch`")
    if manifest.dense and cfg.method == "online":
        raise TcskdError(f"cache {cache_path} holds token grids: --method online computes global targets only "
                         f"(use --method tcs or fitnet)")
    if manifest.dense and cfg.elsh_bits:
        raise TcskdError(f"--elsh-bits hashes the global targets of a global cache; cache {cache_path} holds token "
                         f"grids (--mimic-on {mimic}): use --elsh-bits 0")
    if manifest.dense and not manifest.grid:
        raise StoreError(f"cache {cache_path} holds tokens but no grid in its manifest")
    return mimic


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
    if cfg.task == "segment" and not train_source.has_masks:
        raise TcskdError(f"--task segment: {data_spec} has no masks")
    if cfg.task == "classify" and train_source.has_masks and not (train_source.labels >= 0).any():
        raise TcskdError(f"{data_spec} has per-pixel masks and no image labels: train it with --task segment")
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

    targets: np.ndarray | StoreTargets | None = None
    scale: float | None = None
    elsh: tuple[torch.Tensor, torch.Tensor] | None = None
    elsh_rows: torch.Tensor | None = None
    dense: np.ndarray | StoreTargets | None = None
    """Dense targets (rows x V x T x K float16), scaled."""
    store: bool = False
    """Whether ``targets``/``dense`` are :class:`~tcskd.train.targets.StoreTargets` (read while training)."""
    blocks: tuple[np.ndarray, int] | None = None
    """(chunk of every row, block sampler window), see :attr:`RunInputs.blocks`."""


def load_fit_targets(cfg: TrainConfig, store: Store | None, basis: Basis | None,
                     store_rows: np.ndarray | None, manifest: Manifest | None = None,
                     mimic: str | None = None) -> FitTargets:
    """The targets of ``store_rows`` in ``basis`` divided by :func:`target_scale` (none for ``ce``; for
    ``online`` only while the eLSH bias needs them: the teacher computes them live)."""
    if basis is None:
        return FitTargets()
    dense = manifest is not None and manifest.dense
    if cfg.method == "online" and not cfg.elsh_bits:
        mode = "ram"  # nothing is loaded: the teacher computes the targets live
    else:
        mode = _target_mode(cfg, store, basis, store_rows, manifest, mimic)
    if mode == "store":
        fit = _store_fit_targets(cfg, store, basis, store_rows, manifest, mimic)
    elif dense:
        fit = _dense_fit_targets(cfg, store, basis, store_rows, manifest, mimic)
    else:
        fit = _ram_fit_targets(cfg, store, basis, store_rows)
    parts = [t for t in (fit.targets, fit.dense) if t is not None]
    if parts:
        row_bytes = sum(int(np.prod(t.shape[1:])) * t.dtype.itemsize for t in parts)
        chunk_rows = read_chunk_rows(store)
        budget = (cfg.target_cache_mb or default_target_cache_mb()) << 20
        fit.blocks = (np.asarray(store_rows, np.int64) // chunk_rows, block_window(budget, chunk_rows * row_bytes))
        if mode == "store":
            warn_unmixed_windows(store.read("labels")[np.asarray(store_rows, np.int64)], fit.blocks[0],
                                 fit.blocks[1], len(store_rows) * row_bytes)
    return fit


def window_class_share(labels: np.ndarray, chunk_of: np.ndarray, window: int, draws: int = 16,
                       seed: int = 0) -> float:
    """The mean share of the labelled classes that a window of ``window`` random chunks holds (the block
    sampler shuffles rows only within such windows): about 1 when each chunk mixes the classes, about
    window / chunks when the rows are in class order (an image folder's cache)."""
    labels = np.asarray(labels)
    chunks = np.unique(chunk_of)
    classes = np.unique(labels[labels >= 0])
    if len(classes) < 2 or window >= len(chunks):
        return 1.0
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(draws):
        picked = rng.choice(chunks, size=window, replace=False)
        held = labels[np.isin(chunk_of, picked)]
        shares.append(len(np.unique(held[held >= 0])) / len(classes))
    return float(np.mean(shares))


def warn_unmixed_windows(labels: np.ndarray, chunk_of: np.ndarray, window: int, total_bytes: int) -> float:
    """Warn when ``--targets store``'s windows hold under half of the classes (rows in class order and a
    small ``--target-cache-mb``; caches written with ``--order source``): batches then mix few classes, and
    accuracy collapses (measured on the built-in default with a 1 MB LRU: 33 % val instead of 98.7 %). Returns
    the share."""
    share = window_class_share(labels, chunk_of, window)
    if share < 0.5:
        log.warning("--targets store: the cache's rows are ordered by class and a window of %d chunk(s) holds "
                    "%.0f%% of the classes, so batches mix few classes and accuracy suffers; cache with "
                    "--order shuffled (rows in a seeded random order), raise --target-cache-mb towards %d (the "
                    "training targets' size) or use --targets ram",
                    window, 100 * share, -(-2 * total_bytes // (1 << 20)))
    return share


def _target_mode(cfg: TrainConfig, store: Store, basis: Basis, store_rows: np.ndarray, manifest: Manifest | None,
                 mimic: str | None) -> str:
    """``ram`` or ``store`` for ``cfg.targets`` (auto: from the bytes the ram path would hold)."""
    if cfg.targets == "store" and cfg.elsh_bits:
        raise TcskdError("--elsh-bits fits its bias on a sample of all the targets: use --targets ram or auto")
    if cfg.targets == "auto" and cfg.elsh_bits:
        return "ram"
    arr = store["features"]
    per_row = int(arr.shape[1]) * basis.k * 4
    if manifest is not None and manifest.dense:
        dense_b = int(arr.shape[1]) * int(arr.shape[2]) * basis.k * 2
        per_row = (dense_b if mimic in ("dense", "both") else 0) + (per_row if mimic in ("global", "both") else 0)
    return choose_target_mode(cfg.targets, per_row * len(store_rows))


def _store_fit_targets(cfg: TrainConfig, store: Store, basis: Basis, store_rows: np.ndarray,
                       manifest: Manifest | None, mimic: str | None) -> FitTargets:
    """:class:`~tcskd.train.targets.StoreTargets` of ``store_rows`` with the ram path's scales (those that come
    from the data are read in one pass over the chunks); the LRU budget is shared in proportion to row bytes."""
    budget = (cfg.target_cache_mb or default_target_cache_mb()) << 20
    coords_of = manifest.coords_of if manifest is not None else None
    if manifest is not None and manifest.dense:
        kinds = [k for k, on in (("dense", mimic in ("dense", "both")), ("pooled", mimic in ("global", "both")))
                 if on]
    else:
        kinds = ["global"]
    made = {k: StoreTargets(store, store_rows, basis, k, coords_of) for k in kinds}
    total = sum(t.row_bytes for t in made.values())
    for t in made.values():
        t.lru.budget_bytes = max(1, budget * t.row_bytes // total)
    scale = None
    if "global" in made:
        t = made["global"]
        t.scale = scale = target_scale(basis, None, cfg.target_norm,
                                       t.mean_square() if basis.name == RAW and cfg.target_norm == "global" else None)
    if "dense" in made:
        t = made["dense"]
        t.scale = scale = target_scale(basis, None, cfg.target_norm,
                                       t.mean_square() if basis.name == RAW and cfg.target_norm == "global" else None)
    if "pooled" in made:
        t = made["pooled"]
        ms = t.mean_square() if cfg.target_norm == "global" else 0.0
        t.scale = float(np.sqrt(ms)) if cfg.target_norm == "global" and ms > 1e-12 else 1.0
        scale = t.scale if scale is None else scale
    log.info("targets: read from the store while training (%s; %.1f MB per process, %.1f MB in RAM otherwise)",
             ", ".join(made), budget / 2 ** 20, sum(t.ram_bytes for t in made.values()) / 2 ** 20)
    return FitTargets(made.get("global", made.get("pooled")), scale, dense=made.get("dense"), store=True)


def _ram_fit_targets(cfg: TrainConfig, store: Store, basis: Basis, store_rows: np.ndarray) -> FitTargets:
    """The global targets of ``store_rows`` loaded into memory and scaled, and the eLSH sample."""
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


def _dense_fit_targets(cfg: TrainConfig, store: Store, basis: Basis, store_rows: np.ndarray, manifest: Manifest,
                       mimic: str | None) -> FitTargets:
    """The targets of a patch cache: token grids (``dense``) and/or their means over the tokens (``targets``),
    each divided by its own scale (the dense one from the basis, as global targets; the pooled one by the
    root mean square of the pooled coordinates), the scale reported being the dense one when there is one."""
    dense, pooled = load_dense_targets(store, store_rows, basis, manifest.coords_of,
                                       dense=mimic in ("dense", "both"), pooled=mimic in ("global", "both"))
    scale = None
    if dense is not None:
        scale = target_scale(basis, dense, cfg.target_norm)
        scale_targets(dense, scale)
    if pooled is not None:
        ms = mean_square(pooled)
        pooled_scale = float(np.sqrt(ms)) if cfg.target_norm == "global" and ms > 1e-12 else 1.0
        pooled /= np.float32(pooled_scale)
        scale = pooled_scale if scale is None else scale
    return FitTargets(pooled, scale, dense=dense)


def _basis_excludes_val(basis: Basis | None, val: np.ndarray, sample_index: np.ndarray) -> bool | None:
    """Whether the basis left exactly this run's validation rows out (it recorded the same set of rows);
    None for a basis that was not fitted (identity, raw, none)."""
    fitted = basis is not None and basis.name != RAW and basis.kind != "identity"
    excludes = (None if not fitted else
                bool(val.any()) and basis.attrs.get("held_out_rows") == rows_digest(sample_index[val]))
    if fitted and val.any() and not excludes and basis.attrs.get("fitted_on") == "sample":
        log.warning("basis '%s' was fitted by `tcskd cache --dim` on a sample of images that may include the rows "
                    "this run holds out for validation (build the cache without --include-val and with this run's "
                    "--val-* options)", basis.name)
    elif fitted and val.any() and not excludes:
        log.warning("basis '%s' was fitted on rows this run holds out for validation (fit it without "
                    "`tcskd basis --include-val` and with the same --val-* options)", basis.name)
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
    segment = cfg.task == "segment"
    labelled = (labelled_images(sample_index, cfg.labels_per_class, cfg.seed, eligible=fit_rows) if segment
                else labelled_mask(labels, sample_index, cfg.labels_per_class, cfg.seed, eligible=fit_rows))
    basis_excludes_val = _basis_excludes_val(basis, val, sample_index)
    size, augment, teacher_size, defer = _student_views(cfg, src, manifest)
    view0 = src.params[:, :1] if src.params is not None else None

    def part(mask: np.ndarray, **kw: Any) -> ViewImages:
        p = kw.pop("params", view0)
        kw.setdefault("masks", segment)
        return ViewImages(src.source, src.rows[mask], size, channels, p[mask] if p is not None else None, **kw)

    ce_labels = np.where(labelled, labels, -1).astype(np.int64)
    train_set = part(fit_rows, params=src.params, targets=fit.targets, ce_labels=ce_labels[fit_rows],
                     augment=augment, seed=cfg.seed, teacher_size=teacher_size, defer_teacher_resize=defer,
                     dense_targets=fit.dense, mask_rows=labelled[fit_rows] if segment else None)
    knn_set = part(labelled, masks=False)  # the kNN references: only the labels the run was given
    val_set = part(val) if val.any() else None
    test_set = None
    if src.train_split == "train" and has_split(src.data_spec, "test"):
        test_source = open_source(src.data_spec, "test")
        test_set = ViewImages(test_source, np.arange(len(test_source)), size, channels, masks=segment)
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
        basis_excludes_val=basis_excludes_val, setup_seconds=0.0, task=cfg.task,
        mimic_on=resolve_mimic(cfg, manifest, cache_path),
        grid=tuple(int(g) for g in manifest.grid) if manifest.dense and manifest.grid else None,
        store_targets=fit.store, blocks=fit.blocks)


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
    """Open the data and the cache, check they match, and load the targets into memory (or, with
    ``--targets store``, prepare to read them from the store while training)."""
    t0 = time.perf_counter()
    manifest, store, cache_path = Manifest(), None, None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache, cfg.cache_root)  # refused unless complete and sound
        cache_path, store, manifest = cache.path, cache.store, cache.manifest
    try:
        mimic = resolve_mimic(cfg, manifest, cache_path)  # a wrong combination is refused before any reading
        src = open_train_rows(cfg, store, manifest, cache_path)  # the validation rows held out
        basis = (resolve_basis(store, cfg.method, cfg.basis, cfg.dim, default_dim(cfg), manifest.coords_of)
                 if store is not None else None)
        fit = load_fit_targets(cfg, store, basis, src.store_rows[~src.val] if store is not None else None,
                               manifest, mimic)
    finally:
        if store is not None:
            store.close()
    prep = assemble_inputs(cfg, src, basis, fit, manifest, cache_path)
    prep.setup_seconds = time.perf_counter() - t0
    return prep
