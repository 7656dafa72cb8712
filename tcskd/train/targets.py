"""Training data and targets: images from the dataset, targets only from the cache.

Rows. The cache's ``sample_index`` maps each training image (a row of the
dataset's ``train`` split; of the cache's own split when that is ``test``) to
its store row. Training refuses (StoreError) a cache that is incomplete, has
unwritten or duplicate rows, holds samples the dataset does not have, has
labels that disagree with the dataset's, or lacks samples of the split (unless
the cache was built with ``--limit``: then the student trains on the samples it
holds). Rows with ``row_ok`` False (unreadable images) are left out.

Targets (N x V x K float32, loaded once into memory, chunk by chunk):
- ``tcs``: ``bases/<name>/coords`` when stored (its first K columns), else
  ``features`` projected with the basis;
- ``fitnet``: the basis named by ``--basis`` if its kind is ``identity``, else
  the first stored basis of kind ``identity``, else the raw features: mean 0,
  identity components, no whitening (targets = the raw features). K is always
  D: ``--dim`` does not apply (like ``tcskd basis --kind identity``);
- ``ce``: none (no feature is read);
- ``online``: computed live by the teacher in the loop (tcskd.train.loop).

With ``--target-norm global`` (the default) all targets are divided by one
number, sqrt of the mean variance of the K coordinates (:func:`target_scale`),
so that lambda means the same for any teacher; ``none`` keeps them as stored.

Views. With a V-view cache each epoch picks one stored view per image (from
a generator seeded by (seed, epoch)) and the student's input is exactly that
view (views.apply_view of the stored crop + flip at the student's size). With
one view the student sees view 0 (the centre crop) plus its own augmentation
(``none``, ``flip``, ``crop`` = pad-and-random-crop with the pad 1/8 of the
size, i.e. 4 px at 32 px, or ``crop-flip``), drawn from a generator seeded by
(seed, epoch, row): independent of the target, of the batch order and of the
number of DataLoader workers (a counter-based generator, :func:`row_uniforms`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from tcskd.data import Source
from tcskd.errors import StoreError, TcskdError
from tcskd.store.backends import Store
from tcskd.store.bases import Basis, load_basis
from tcskd.store.chunks import iter_feature_chunks, read_chunk_rows
from tcskd.store.integrity import missing_data
from tcskd.views import apply_view, center_params, to_tensor

log = logging.getLogger(__name__)

AUGMENTS = ("auto", "none", "flip", "crop", "crop-flip")
RAW = "raw"
#: K of ``--method tcs`` without ``--dim``: the leading coordinates kept (chosen on validation, see README).
DEFAULT_DIM = 64


# -- which basis ------------------------------------------------------------

def raw_basis(dim: int) -> Basis:
    """The identity 'basis' of FitNet on raw features: mean 0, components I, no whitening."""
    return Basis(RAW, "identity", np.zeros(dim), np.eye(dim), np.ones(dim),
                 np.arange(1, dim + 1, dtype=np.float64) / dim, False, {})


def resolve_basis(store: Store, method: str, name: str, dim: int | None,
                  default: int | None = None) -> Basis | None:
    """The coordinate system of ``method`` (None for ``ce``), truncated to ``dim`` (not for fitnet)."""
    if method == "ce":
        return None
    if method == "fitnet":
        names = store.bases()
        if name in names and store.attrs(f"bases/{name}").get("kind") == "identity":
            chosen = name
        else:
            chosen = next((n for n in names if store.attrs(f"bases/{n}").get("kind") == "identity"), None)
        basis = load_basis(store, chosen) if chosen else raw_basis(int(store["features"].shape[2]))
        if chosen is None:
            log.info("fitnet: no identity basis stored; targets are the raw features")
        if dim is not None and dim != basis.k:
            log.warning("fitnet mimics every feature dimension (K = D = %d); --dim %d is not used", basis.k, dim)
        return basis
    basis = load_basis(store, name)
    if dim is not None and dim > basis.k:
        raise StoreError(f"--dim {dim} exceeds the {basis.k} components of basis '{basis.name}'")
    default = DEFAULT_DIM if default is None else default
    if dim is None and basis.k > default:
        log.info("K = %d, the default (of the %d components of basis '%s')", default, basis.k, basis.name)
    return basis.truncate(dim if dim is not None else min(default, basis.k))


# -- rows -------------------------------------------------------------------

def match_rows(store: Store, split_source: Source, train_source: Source,
               limited: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``train_source``, store rows) of the training samples the cache holds, in source order."""
    si = np.asarray(store.read("sample_index"), np.int64)
    ok = np.asarray(store.read("row_ok"), bool) if "row_ok" in store else np.ones(len(si), bool)
    labels = np.asarray(store.read("labels"), np.int64)
    where = f"cache {store.path}"
    if (si[ok] < 0).any():
        raise StoreError(f"{where} has {int((si[ok] < 0).sum())} unwritten rows (sample_index -1)")
    good = np.flatnonzero(ok)
    if len(np.unique(si[good])) != len(good):
        raise StoreError(f"{where} holds some samples twice (duplicate sample_index values)")
    # Every cached sample must exist in the dataset, with the same label.
    pos = {int(v): i for i, v in enumerate(split_source.indices)}
    unknown = [int(v) for v in si[good] if int(v) not in pos]
    if unknown:
        raise StoreError(f"{where} does not match data {split_source.spec} (split {split_source.split}): "
                         f"{len(unknown)} cached sample(s) are not in it, e.g. sample {unknown[0]}")
    src_lab = split_source.labels[[pos[int(v)] for v in si[good]]]
    bad = np.flatnonzero((labels[good] != src_lab) & (labels[good] >= 0))
    if len(bad):
        raise StoreError(f"{where} does not match data {split_source.spec}: the label of sample "
                         f"{int(si[good][bad[0]])} differs ({int(labels[good][bad[0]])} cached, "
                         f"{int(src_lab[bad[0]])} in the data); {len(bad)} differ in all")
    # Map the training split's rows to store rows.
    store_of = {int(v): i for i, v in enumerate(si) if v >= 0}
    src_rows, store_rows, missing = [], [], 0
    for r, v in enumerate(train_source.indices):
        s = store_of.get(int(v))
        if s is None:
            missing += 1
        elif ok[s]:
            src_rows.append(r)
            store_rows.append(s)
    if missing and not limited:
        raise StoreError(f"{where} lacks {missing} of the {len(train_source)} samples of "
                         f"{train_source.spec} split {train_source.split}: it does not match the data")
    if missing:
        log.info("the cache was built with --limit: training on the %d samples it holds", len(src_rows))
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d cached row(s) are marked unreadable (row_ok False) and are left out", n_bad)
    if not src_rows:
        raise StoreError(f"{where} holds none of the samples of {train_source.spec} split {train_source.split}")
    return np.asarray(src_rows, np.int64), np.asarray(store_rows, np.int64)


# -- targets ----------------------------------------------------------------

def load_targets(store: Store, store_rows: np.ndarray, basis: Basis, progress: bool = True) -> np.ndarray:
    """The K-dim targets of ``store_rows`` for every view: len(rows) x V x K float32.

    Read chunk by chunk; from ``bases/<name>/coords`` when stored (first K
    columns), else projected from ``features``.
    """
    coords_name = f"bases/{basis.name}/coords"
    use_coords = basis.name != RAW and coords_name in store
    arr = store[coords_name] if use_coords else store["features"]
    n_rows, views = int(arr.shape[0]), int(arr.shape[1])
    k = basis.k
    if use_coords and arr.shape[2] < k:
        raise StoreError(f"{coords_name} has {arr.shape[2]} columns; need {k}")
    if use_coords:
        lost = missing_data(store, (coords_name,))
        if lost:
            raise StoreError(f"cache {store.path} is damaged: {lost[0]}; fit the basis again")
    source = coords_name if use_coords else "features"
    chunk = read_chunk_rows(store)
    out = np.empty((len(store_rows), views, k), np.float32)
    order = np.argsort(store_rows, kind="stable")
    srt = store_rows[order]
    raw = basis.name == RAW
    what = "coords" if use_coords else ("raw features" if raw else "features")
    show = None if progress and -(-n_rows // chunk) >= 8 else False
    for c in iter_feature_chunks(store, desc=f"targets ({what})", chunk_ids=np.unique(store_rows // chunk),
                                 ok=np.ones(n_rows, bool), array=source, progress=show):
        start, stop = c.start, c.stop
        lo, hi = np.searchsorted(srt, start), np.searchsorted(srt, stop)
        items = order[lo:hi]
        block = c.x[store_rows[items] - start]
        if use_coords or raw:
            out[items] = block[..., :k]
        else:
            out[items] = basis.project(torch.from_numpy(block.astype(np.float32))).numpy()
    if not np.isfinite(out).all():
        raise StoreError(f"cache {store.path}: the targets contain NaN or Inf ({what})")
    log.info("targets: %d rows x %d views x %d coords from %s", len(store_rows), views, k, what)
    return out


TARGET_NORMS = ("global", "none")


def target_scale(basis: Basis, targets: np.ndarray | None, norm: str = "global") -> float:
    """One divisor for all targets: sqrt of the mean variance of the K coordinates (``global``), or 1.

    The variance comes from the basis (its eigenvalues, / eigenvalue when
    whitened, i.e. 1), so cached and live (online) targets get the same scale;
    only the raw features of fitnet without a stored identity basis use the
    targets' mean square. It makes lambda independent of the teacher's feature
    scale: predicting 0 costs an MSE of 1. It is a rescaling of lambda and of
    the projector, not whitening: the coordinates keep their relative variances.
    """
    if norm == "none":
        return 1.0
    if norm != "global":
        raise TcskdError(f"unknown target normalisation '{norm}' (choose {', '.join(TARGET_NORMS)})")
    if basis.name == RAW:
        if targets is None:
            return 1.0
        var = float(np.mean(np.square(targets, dtype=np.float64)))
    else:
        var = float(np.mean(basis.eigenvalues / basis.scale() ** 2))
    return float(np.sqrt(var)) if var > 1e-12 else 1.0


class TorchProjection:
    """``basis.project`` (divided by ``scale``) on a device, for targets computed live (method online)."""

    def __init__(self, basis: Basis, device: torch.device, scale: float = 1.0) -> None:
        self.mean = torch.as_tensor(basis.mean, dtype=torch.float32, device=device)
        self.components = torch.as_tensor(basis.components, dtype=torch.float32, device=device)
        self.scale = torch.as_tensor(basis.scale() * scale, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) @ self.components.T) / self.scale


# -- images -----------------------------------------------------------------

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


def augment_batch(x: torch.Tensor, kind: str, seed: int, epochs: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Pad-and-random-crop (pad = size / 8) and/or a horizontal coin flip of each image of B x C x S x S.

    Row ``rows[b]`` of epoch ``epochs[b]`` always gets the same offsets and flip (:func:`row_uniforms`).
    """
    if kind == "none" or len(x) == 0:
        return x
    u = torch.from_numpy(row_uniforms(seed, epochs, rows, 3))
    if kind in ("crop", "crop-flip"):
        b, _, s_h, s_w = x.shape
        pad = max(1, round(min(s_h, s_w) / 8))
        offsets = (u[:, :2] * (2 * pad + 1)).long().clamp_(max=2 * pad)
        ys = offsets[:, :1] + torch.arange(s_h)                     # B x S_h rows of the padded image
        xs = offsets[:, 1:] + torch.arange(s_w)                     # B x S_w columns
        padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # B x H' x W' x C
        x = padded[torch.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
    if kind in ("flip", "crop-flip"):
        flip = (u[:, 2] < 0.5)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
    return x.contiguous()


def _image(source: Source, row: int, channels: int) -> torch.Tensor:
    return to_tensor(source.image(row, channels))


def _batch_collate(batch: tuple) -> tuple:
    """ViewImages.__getitems__ returns whole batches already: nothing left to collate."""
    return batch


class ViewImages(Dataset):
    """Item ``(i, view, epoch)`` -> (x, target, ce_label, i, view, teacher_x).

    ``x`` is row ``rows[i]`` of ``source`` in view ``view`` (stored ``params``,
    or the centre crop without them) at ``size`` px, plus the augmentation
    when ``augment`` is not ``none``. ``target`` is ``targets[i, view]``
    (empty without targets); ``teacher_x`` the same view at ``teacher_size``
    (empty unless given, for method online). With ``defer_teacher_resize`` a
    batch of in-memory images in their centre view leaves ``teacher_x`` at the
    images' own size, for :func:`tcskd.views.center_view` on the device.

    The DataLoader takes whole batches (:meth:`__getitems__`, with
    ``collate_fn=batch_collate``): images held in memory are cropped, resized
    and augmented as one tensor, targets and labels gathered in one indexing
    each; every image comes out exactly as :meth:`__getitem__` gives it alone.
    """

    batch_collate = staticmethod(_batch_collate)

    def __init__(self, source: Source, rows: np.ndarray, size: int, channels: int,
                 params: np.ndarray | None = None, targets: np.ndarray | None = None,
                 ce_labels: np.ndarray | None = None, augment: str = "none", seed: int = 0,
                 teacher_size: int | None = None, defer_teacher_resize: bool = False) -> None:
        self.source, self.rows, self.size, self.channels = source, rows, size, channels
        self.defer_teacher_resize = defer_teacher_resize
        self.params, self.targets, self.augment, self.seed = params, targets, augment, seed
        self.ce_labels = np.asarray(ce_labels if ce_labels is not None else source.labels[rows], np.int64)
        self.teacher_size = teacher_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int, int]):
        x, target, label, i, view, tx = self.__getitems__([key])
        return x[0], target[0], int(label[0]), int(i[0]), int(view[0]), tx[0]

    def __getitems__(self, keys: list[tuple[int, int, int]]):
        """A batch: (x B x C x S x S, targets B x K, labels B, items B, views B, teacher inputs B x C x T x T)."""
        b = len(keys)
        idx = np.fromiter((int(k[0]) for k in keys), np.int64, b)
        views = np.fromiter((int(k[1]) for k in keys), np.int64, b)
        epochs = np.fromiter((int(k[2]) for k in keys), np.int64, b)
        x, tx = self._views(idx, views)
        x = augment_batch(x, self.augment, self.seed, epochs, idx)
        target = (torch.from_numpy(np.ascontiguousarray(self.targets[idx, views])) if self.targets is not None
                  else torch.zeros(b, 0))
        labels = torch.from_numpy(self.ce_labels[idx])
        return x, target, labels, torch.from_numpy(idx), torch.from_numpy(views), tx

    def _shared_box(self, idx: np.ndarray, views: np.ndarray, h: int, w: int) -> np.ndarray | None:
        """The one crop box of every image of the batch, or None when they differ."""
        if self.params is None:
            return center_params(h, w)
        p = self.params[idx, views]
        return p[0] if (p == p[:1]).all() else None

    def _views(self, idx: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(student inputs B x C x S x S float, teacher inputs B x C x T x T uint8 or B x 0)."""
        arr = self.source.images(self.rows[idx], self.channels)
        box = self._shared_box(idx, views, arr.shape[1], arr.shape[2]) if arr is not None else None
        if arr is not None and box is not None:  # one shape, one box: the whole batch at once
            u8 = torch.from_numpy(arr).permute(0, 3, 1, 2)
            x = apply_view(u8.float().div_(255.0), box, self.size).contiguous()
            if not self.teacher_size:
                tx = torch.zeros(len(idx), 0)
            elif self.defer_teacher_resize and np.array_equal(box, center_params(arr.shape[1], arr.shape[2])):
                tx = u8.contiguous()  # the centre crop at the teacher's size is taken on its device (center_view)
            else:
                tx = apply_view(u8, box, self.teacher_size).contiguous()
            return x, tx
        xs, txs = [], []
        for i, view in zip(idx, views):
            img = _image(self.source, int(self.rows[i]), self.channels)
            p = center_params(img.shape[1], img.shape[2]) if self.params is None else self.params[i, view]
            xs.append(apply_view(img, p, self.size).contiguous())
            # The teacher's input exactly as the cache stage builds it (uint8 crop and resize).
            if self.teacher_size:
                txs.append(apply_view((img * 255).round_().to(torch.uint8), p, self.teacher_size))
        return torch.stack(xs), (torch.stack(txs) if txs else torch.zeros(len(idx), 0))


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
