"""The training data as the loop sees it: datasets, the epoch sampler, augmentation and DataLoaders.

Views. With a V-view cache each epoch picks one stored view per image (from
a generator seeded by (seed, epoch)) and the student's input is exactly that
view (views.apply_view of the stored crop + flip at the student's size). With
one view the student sees view 0 (the centre crop) plus its own augmentation
(``none``, ``flip``, ``crop`` = pad-and-random-crop with the pad 1/8 of the
size, i.e. 4 px at 32 px, or ``crop-flip``), drawn from a generator seeded by
(seed, epoch, row): independent of the target, of the batch order and of the
number of DataLoader workers (a counter-based generator, :func:`row_uniforms`).

Dense targets and masks. Dense targets (N x V x T x K) travel like the global ones, the view's token grid
of the item. A segmentation item carries its view's mask at the student's size
(:func:`tcskd.views.apply_mask_view`, nearest neighbour) with the same augmentation as the image (padding
255 = ignore); rows outside the labelled subset carry an all-ignore mask. Each item also carries its
augmentation ``(dy, dx, flip)`` (:class:`Batch` ``aug``), which the dense mimic undoes on the predicted map
(tcskd.train.losses.align_to_grid).

- :class:`ViewImages`: item ``(i, view, epoch)`` -> a :class:`Batch` (image, target, label, ...), whole batches at once;
- :class:`EpochSampler`: an epoch's order and views, a function of (seed, epoch);
- :class:`BlockSampler`: the same, visiting the store's chunks block by block (targets read from the store);
- :func:`train_loader`: the training DataLoader of a prepared run and an epoch (the loop's, and a
  benchmark's seam); :func:`eval_loader`: view 0 of a dataset in order, for evaluation.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tcskd import dist
from tcskd.data import Source
from tcskd.device import resolve_workers as _resolve_workers
from tcskd.errors import TcskdError
from tcskd.train.config import AUGMENTS, TrainConfig
from tcskd.views import apply_mask_view, apply_view, center_params

log = logging.getLogger(__name__)



# -- augmentation -----------------------------------------------------------

def resolve_augment(augment: str, data_spec: str, channels: int) -> str:
    """``auto``: ``crop`` (no mirroring) for MNIST-like greyscale digits, else ``crop-flip``."""
    if augment not in AUGMENTS:
        raise TcskdError(f"unknown augmentation '{augment}' (choose {', '.join(AUGMENTS)})")
    if augment != "auto":
        return augment
    return "crop" if ("mnist" in data_spec.lower() or channels == 1) else "crop-flip"


AUGMENT_RNG = "splitmix64-v1"
"""The augmentation generator (:func:`row_uniforms`), recorded in checkpoints: a run resumed under
another one continues correctly but no longer equals an uninterrupted run."""
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, epochs: np.ndarray, rows: np.ndarray, draws: int) -> np.ndarray:
    """[len(rows), draws] uniforms in [0, 1), a pure function of (seed, epoch, row, draw).

    A counter-based generator: the augmentation of an image does not depend on
    the batch it is in, the batch order or the number of DataLoader workers,
    and a whole batch is drawn in a few array operations.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.full(len(rows), int(seed) % 2 ** 64, np.uint64) + np.uint64(_GOLDEN))
        key = _mix64(key ^ (np.asarray(epochs, np.int64).astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)))
        key = _mix64(key ^ (np.asarray(rows, np.int64).astype(np.uint64) * np.uint64(0xABC98388FB8FAC03)))
        counters = (np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(_GOLDEN))[None, :]
        bits = _mix64(key[:, None] + counters)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def augment_draws(kind: str, seed: int, epochs: np.ndarray, rows: np.ndarray, size: int) -> torch.Tensor:
    """B x 3 float: each row's augmentation ``(dy, dx, flip)``: the augmented image's pixel (i, j) is pixel
    (i + dy, j + dx) of the unaugmented one (zero padding outside), then mirrored when flip is 1."""
    out = torch.zeros(len(rows), 3)
    if kind == "none" or len(rows) == 0:
        return out
    u = torch.from_numpy(row_uniforms(seed, epochs, rows, 3))
    if kind in ("crop", "crop-flip"):
        pad = max(1, round(size / 8))
        out[:, :2] = (u[:, :2] * (2 * pad + 1)).long().clamp_(max=2 * pad).float() - pad
    if kind in ("flip", "crop-flip"):
        out[:, 2] = (u[:, 2] < 0.5).float()
    return out


def apply_augment(x: torch.Tensor, aug: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Images B x C x S x S (or masks B x S x S, ``fill`` 255) augmented by :func:`augment_draws`' rows: pixel
    (i, j) of image b is pixel (i + dy, j + dx) of the input (``fill`` outside it), then mirrored where flip
    is 1. Pixels are only moved (any dtype; uint8 before the float conversion costs a quarter of the bytes):
    one slice copy per image, not a gather over a padded batch.

    The result's memory layout is the one this function has always given, because a 1-channel batch's strides
    choose the student's conv kernels and so the last bits of its results: after a shift, a 1-channel batch
    has channels-last strides (B x 1 x S x S with strides S*S, 1, S, 1); without one it keeps the input's;
    more channels are plainly contiguous."""
    if len(x) == 0 or not bool(aug.any()):
        return x
    squeeze = x.ndim == 3
    x = x[:, None] if squeeze else x
    b, c, h, w = x.shape
    shifts = aug[:, :2].long().tolist()
    if any(dy or dx for dy, dx in shifts):
        out = (torch.full((b, h, w, 1), fill, dtype=x.dtype).permute(0, 3, 1, 2) if c == 1
               else torch.full((b, c, h, w), fill, dtype=x.dtype))
        for i, (dy, dx) in enumerate(shifts):
            y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
            if y0 < y1 and x0 < x1:
                out[i, :, y0:y1, x0:x1] = x[i, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
    else:
        out = x.clone().contiguous()
    flip = torch.nonzero(aug[:, 2] >= 0.5).flatten()
    if len(flip):
        out[flip] = out[flip].flip(-1)
    return out[:, 0] if squeeze else out


def augment_batch(x: torch.Tensor, kind: str, seed: int, epochs: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Pad-and-random-crop (pad = size / 8) and/or a horizontal coin flip of each image of B x C x S x S.

    Row ``rows[b]`` of epoch ``epochs[b]`` always gets the same offsets and flip (:func:`row_uniforms`).
    """
    if kind == "none" or len(x) == 0:
        return x
    return apply_augment(x, augment_draws(kind, seed, epochs, rows, min(x.shape[-2:])))


# -- the dataset and the sampler ---------------------------------------------

def _image_u8(source: Source, row: int, channels: int) -> torch.Tensor:
    """Row ``row`` of ``source`` as uint8 C x H x W (a view of the decoded H x W x C array)."""
    return torch.from_numpy(np.require(source.image(row, channels), requirements=["C", "W"])).permute(2, 0, 1)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], exactly as :func:`tcskd.views.to_tensor` converts a whole image."""
    return x.float().div_(255.0)


def _batch_collate(batch: tuple) -> tuple:
    """ViewImages.__getitems__ returns whole batches already: nothing left to collate."""
    return batch


class Batch(NamedTuple):
    """A batch of :class:`ViewImages` (a tuple: the first six fields are those of global runs)."""

    x: torch.Tensor
    """Student inputs B x C x S x S float in [0, 1]."""
    target: torch.Tensor
    """Global targets B x K float32 (B x 0 without)."""
    label: torch.Tensor
    """Image labels B (-1: not for CE)."""
    item: torch.Tensor
    view: torch.Tensor
    teacher_x: torch.Tensor
    """The teacher's inputs of method online (B x 0 otherwise)."""
    dense: torch.Tensor
    """Dense targets B x T x K float16 (B x 0 without)."""
    mask: torch.Tensor
    """Segmentation masks B x S x S uint8, 255 = ignore (B x 0 without)."""
    aug: torch.Tensor
    """The student's augmentation B x 3 (dy, dx, flip) (:func:`augment_draws`)."""


class ViewImages(Dataset):
    """Item ``(i, view, epoch)`` -> (x, target, ce_label, i, view, teacher_x, dense, mask, aug) (:class:`Batch`).

    ``x`` is row ``rows[i]`` of ``source`` in view ``view`` (stored ``params``,
    or the centre crop without them) at ``size`` px, plus the augmentation
    when ``augment`` is not ``none``. ``target`` is ``targets[i, view]``
    (empty without targets); ``teacher_x`` the same view at ``teacher_size``
    (empty unless given, for method online). With ``defer_teacher_resize`` a
    batch of in-memory images in their centre view leaves ``teacher_x`` at the
    images' own size, for :func:`tcskd.views.center_view` on the device.
    ``dense`` is ``dense_targets[i, view]``; with ``masks`` the item carries its
    view's mask (all 255 where ``mask_rows`` is False).

    The DataLoader takes whole batches (:meth:`__getitems__`, with
    ``collate_fn=batch_collate``): images held in memory are cropped, resized
    and augmented as one tensor, targets and labels gathered in one indexing
    each; every image comes out exactly as :meth:`__getitem__` gives it alone.
    """

    batch_collate = staticmethod(_batch_collate)

    def __init__(self, source: Source, rows: np.ndarray, size: int, channels: int,
                 params: np.ndarray | None = None, targets: np.ndarray | None = None,
                 ce_labels: np.ndarray | None = None, augment: str = "none", seed: int = 0,
                 teacher_size: int | None = None, defer_teacher_resize: bool = False,
                 dense_targets: np.ndarray | None = None, masks: bool = False,
                 mask_rows: np.ndarray | None = None) -> None:
        self.source, self.rows, self.size, self.channels = source, rows, size, channels
        self.defer_teacher_resize = defer_teacher_resize
        self.params, self.targets, self.augment, self.seed = params, targets, augment, seed
        self.ce_labels = np.asarray(ce_labels if ce_labels is not None else source.labels[rows], np.int64)
        self.teacher_size = teacher_size
        self.dense_targets, self.masks = dense_targets, masks
        self.mask_rows = np.ones(len(rows), bool) if mask_rows is None else np.asarray(mask_rows, bool)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int, int]):
        """One item's (x, target, label, i, view, teacher_x); :meth:`__getitems__` gives every field."""
        b = self.__getitems__([key])
        return b.x[0], b.target[0], int(b.label[0]), int(b.item[0]), int(b.view[0]), b.teacher_x[0]

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> Batch:
        """A batch (:class:`Batch`)."""
        b = len(keys)
        idx = np.fromiter((int(k[0]) for k in keys), np.int64, b)
        views = np.fromiter((int(k[1]) for k in keys), np.int64, b)
        epochs = np.fromiter((int(k[2]) for k in keys), np.int64, b)
        u8, tx = self._views(idx, views)
        aug = augment_draws(self.augment, self.seed, epochs, idx, min(u8.shape[-2:])) if b else torch.zeros(0, 3)
        # Shifts (zero padding) and flips move pixels only: done in uint8, they equal the float ones exactly.
        x = to_float(apply_augment(u8, aug) if self.augment != "none" else u8)
        target = (torch.from_numpy(np.ascontiguousarray(self.targets[idx, views])) if self.targets is not None
                  else torch.zeros(b, 0))
        dense = (torch.from_numpy(np.ascontiguousarray(self.dense_targets[idx, views]))
                 if self.dense_targets is not None else torch.zeros(b, 0))
        mask = apply_augment(self._masks(idx, views), aug, fill=255) if self.masks else torch.zeros(b, 0)
        labels = torch.from_numpy(self.ce_labels[idx])
        return Batch(x, target, labels, torch.from_numpy(idx), torch.from_numpy(views), tx, dense, mask, aug)

    def _shared_box(self, idx: np.ndarray, views: np.ndarray, h: int, w: int) -> np.ndarray | None:
        """The one crop box of every image of the batch, or None when they differ."""
        if self.params is None:
            return center_params(h, w)
        p = self.params[idx, views]
        return p[0] if (p == p[:1]).all() else None

    def _views(self, idx: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(student inputs B x C x S x S uint8, teacher inputs B x C x T x T uint8 or B x 0).

        Cropped and resized in uint8, as the cache stage does (tcskd.views.apply_view), so that only the crop
        at the student's size is converted to float (by the caller): where the crop is the student's size
        already (no resize) the result equals converting the whole image first bit for bit; a resize
        rounds to whole grey levels (within 1/255 of resizing in float)."""
        arr = self.source.images(self.rows[idx], self.channels)
        box = self._shared_box(idx, views, arr.shape[1], arr.shape[2]) if arr is not None else None
        if arr is not None and box is not None:  # one shape, one box: the whole batch at once
            u8 = torch.from_numpy(arr).permute(0, 3, 1, 2)
            x = apply_view(u8, box, self.size).contiguous()
            if not self.teacher_size:
                tx = torch.zeros(len(idx), 0)
            elif self.defer_teacher_resize and np.array_equal(box, center_params(arr.shape[1], arr.shape[2])):
                tx = u8.contiguous()  # the centre crop at the teacher's size is taken on its device (center_view)
            else:
                tx = apply_view(u8, box, self.teacher_size).contiguous()
            return x, tx
        xs, txs = [], []
        for i, view in zip(idx, views):
            img = _image_u8(self.source, int(self.rows[i]), self.channels)
            p = center_params(img.shape[1], img.shape[2]) if self.params is None else self.params[i, view]
            xs.append(apply_view(img, p, self.size).contiguous())
            # The teacher's input exactly as the cache stage builds it (uint8 crop and resize).
            if self.teacher_size:
                txs.append(apply_view(img, p, self.teacher_size))
        return torch.stack(xs), (torch.stack(txs) if txs else torch.zeros(len(idx), 0))

    def _masks(self, idx: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """The view's masks at the student's size, B x S x S uint8 (all 255 for rows not in ``mask_rows``)."""
        out = torch.full((len(idx), self.size, self.size), 255, dtype=torch.uint8)
        keep = np.flatnonzero(self.mask_rows[idx])
        if not len(keep):
            return out
        many = self.source.masks(self.rows[idx[keep]]) if self.source.masks is not None else None
        box = self._shared_box(idx[keep], views[keep], *many.shape[1:3]) if many is not None else None
        if box is not None and many.ndim == 3:  # one shape, one box: the whole batch at once
            out[torch.from_numpy(keep)] = apply_mask_view(torch.from_numpy(np.ascontiguousarray(many, np.uint8)),
                                                          box, self.size)
            return out
        for j in keep:
            i, view = int(idx[j]), int(views[j])
            m = np.asarray(self.source.mask(int(self.rows[i])), np.uint8)
            p = center_params(*m.shape[:2]) if self.params is None else self.params[i, view]
            out[j] = apply_mask_view(torch.from_numpy(np.ascontiguousarray(m)), p, self.size)
        return out


class EpochSampler(Sampler):
    """Yields ``(i, view, epoch)``: a permutation (or the identity order) and one view per image.

    Both come from a torch.Generator seeded by (seed, epoch), so an epoch's
    order does not depend on what ran before it (exact resume).
    """

    def __init__(self, n: int, views: int, seed: int, epoch: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.views, self.seed, self.epoch, self.shuffle = n, views, seed, epoch, shuffle
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.epoch) * 7_919) % (2 ** 63))
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        view = (torch.randint(self.views, (self.n,), generator=g) if self.views > 1
                else torch.zeros(self.n, dtype=torch.int64))
        return order, view

    def __iter__(self):
        order, view = self.draw()
        if self.world > 1:
            # Every rank draws the same permutation and takes every world-th image; the
            # order wraps around so that every rank gets the same number (DistributedSampler's way).
            size = len(self)
            order = torch.cat([order, order[: size * self.world - self.n]])[self.rank::self.world]
        for i in order.tolist():
            yield (i, int(view[i]), self.epoch)


class BlockSampler(Sampler):
    """Yields ``(i, view, epoch)`` visiting the store chunk block by chunk block, for targets read from the
    store (``--targets store``): reads stay sequential-ish and each process's chunk LRU holds what a batch needs.

    The epoch's order, a pure function of (seed, epoch) like :class:`EpochSampler`'s (exact resume):
    the chunks (``chunk_of[i]``: the store chunk of item i) in a random permutation, their items laid out
    chunk after chunk; under DDP rank r takes the r-th of ``world`` consecutive equal slices of that sequence
    (the last one wrapping around to the start, as DistributedSampler pads), so a rank reads its own chunks
    (a neighbour's at most at each end of its slice); then the rank's chunks, in their order, are grouped in
    windows of ``window`` chunks and the items of each window shuffled. Views are drawn as EpochSampler's.

    How it changes the shuffle: the order is random at the granularity of windows of ``window`` chunks, not
    of images; a batch holds images of at most two consecutive windows (when a window holds at least a
    batch), i.e. of at most ``2 * window`` chunks (the LRU is sized to hold that many), so batches are less
    mixed than a plain permutation's when ``window * chunk_rows`` is not much larger than the batch.
    """

    def __init__(self, chunk_of: np.ndarray, views: int, seed: int, epoch: int, window: int,
                 rank: int = 0, world: int = 1) -> None:
        self.chunk_of = np.asarray(chunk_of, np.int64)
        self.n, self.views, self.seed, self.epoch = len(self.chunk_of), views, seed, epoch
        self.window, self.rank, self.world = max(1, int(window)), rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's items in order, the view of every item)."""
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.epoch) * 7_919 + 104_729)
                                          % (2 ** 63))
        chunks, inverse = np.unique(self.chunk_of, return_inverse=True)
        perm = torch.randperm(len(chunks), generator=g).numpy()
        rank_of_chunk = np.empty(len(chunks), np.int64)
        rank_of_chunk[perm] = np.arange(len(chunks))
        view = (torch.randint(self.views, (self.n,), generator=g).numpy() if self.views > 1
                else np.zeros(self.n, np.int64))
        seq = np.argsort(rank_of_chunk[inverse], kind="stable")  # items chunk after chunk, in the chunks' order
        size = len(self)
        keys = torch.rand(size * self.world, generator=g).numpy()  # the same on every rank
        if self.world > 1:
            seq = np.concatenate([seq, seq[: size * self.world - self.n]])
        lo = self.rank * size
        mine, key = seq[lo:lo + size], keys[lo:lo + size]
        c = self.chunk_of[mine]
        new = np.r_[True, c[1:] != c[:-1]] if len(c) else np.zeros(0, bool)
        win = (np.cumsum(new) - 1) // self.window
        return mine[np.lexsort((key, win))], view

    def __iter__(self):
        order, view = self.order()
        for i in order.tolist():
            yield (i, int(view[i]), self.epoch)


def block_window(budget_bytes: int, chunk_bytes: int) -> int:
    """The block sampler's window (chunks shuffled together) for a per-process budget: half the chunks the
    budget holds (a batch spans at most two windows), at least 1."""
    return max(1, int(budget_bytes // max(1, chunk_bytes)) // 2)


# -- loaders ----------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    """How an epoch of ``n`` images splits into optimizer steps on each of ``world`` processes."""

    local_batch: int
    """Images per step on one process (the global batch over ``world``)."""
    drop_last: bool
    """False when one process's share is smaller than a batch: then the epoch is one short step."""
    steps_per_epoch: int


def batch_plan(n: int, batch_size: int, world: int) -> BatchPlan:
    """The :class:`BatchPlan` of ``n`` images, a global batch of ``batch_size`` and ``world`` processes."""
    local_batch = batch_size // world
    local_n = -(-n // world)
    drop_last = local_n >= local_batch
    return BatchPlan(local_batch, drop_last, local_n // local_batch if drop_last else 1)


def resolve_workers(workers: int | str | None, device: torch.device | None = None) -> int:
    """DataLoader worker processes of ``--workers`` (tcskd.device.resolve_workers): the number given, or for
    ``auto`` (None too) one less than the usable cores, at most 16. The same on every device: the batches,
    and so the run, do not depend on it."""
    return _resolve_workers(workers)


def _loader(ds: ViewImages, sampler: Sampler, batch_size: int, workers: int, device: torch.device,
            drop_last: bool, seed: int, persistent: bool = False) -> DataLoader:
    """Batches of ``ds`` in ``sampler``'s order (the dataset builds whole batches, see ViewImages).

    ``persistent`` keeps the worker processes between epochs: set ``sampler.epoch`` before each pass.
    """
    g = torch.Generator().manual_seed((int(seed) * 31 + sampler.epoch) % (2 ** 63))
    # Sources hold closures (not picklable): workers are forked, whatever the platform's default.
    ctx = "fork" if workers > 0 and sys.platform.startswith("linux") else None
    cuda = device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=ViewImages.batch_collate, pin_memory=cuda,
                      drop_last=drop_last, generator=g, multiprocessing_context=ctx,
                      persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers and cuda else None)


class LoaderInputs(Protocol):
    """What :func:`train_loader` reads of a prepared run (a :class:`tcskd.train.inputs.RunInputs`, or a
    benchmark's stand-in): declared here so that this module does not import the one that imports it."""

    train_set: ViewImages
    views: int
    store_targets: bool


def train_loader(prep: LoaderInputs, cfg: TrainConfig, epoch: int, device: torch.device,
                 workers: int | str | None = None,
                 persistent: bool = False) -> DataLoader:
    """The training DataLoader of a prepared run at ``epoch``: this process's share of the epoch's order and
    views (:class:`EpochSampler`; :class:`BlockSampler` with targets read from the store, or ``cfg.sampler``
    block), ``cfg.batch_size / world`` images per batch, ``workers`` processes (None or auto:
    :func:`resolve_workers`). With ``persistent`` the workers live on: set ``loader.sampler.epoch`` before
    each later epoch (order, views and augmentation are functions of (seed, epoch), not of the workers)."""
    ds = prep.train_set
    plan = batch_plan(len(ds), cfg.batch_size, dist.world())
    sampler: Sampler
    blocks = getattr(prep, "blocks", None)  # a stand-in prep (a benchmark's) may carry no targets at all
    if blocks is not None and (cfg.sampler == "block" or (cfg.sampler == "auto" and prep.store_targets)):
        chunk_of, window = blocks
        sampler = BlockSampler(chunk_of, prep.views, cfg.seed, epoch, window, rank=dist.rank(), world=dist.world())
    else:
        sampler = EpochSampler(len(ds), prep.views, cfg.seed, epoch, rank=dist.rank(), world=dist.world())
    return _loader(ds, sampler, plan.local_batch, resolve_workers(workers, device), device, plan.drop_last,
                   cfg.seed, persistent=persistent)


def eval_loader(ds: ViewImages, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Every image of ``ds`` once, in order and in view 0 (for evaluation: such datasets carry no augmentation)."""
    return _loader(ds, EpochSampler(len(ds), 1, 0, 0, shuffle=False), batch_size, workers, device, False, 0)
