"""The options of stage 1: ``CacheConfig`` (``tcskd cache``), its one ``validate()`` and its dict form.

Each field is declared once (type, default, choices, CLI help; tcskd.options); the ``tcskd cache`` command
(tcskd.cli) is generated from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tcskd.cache.subset import ORDERS
from tcskd.store.backends import FORMATS
from tcskd.views import DEFAULT_SCALE
from tcskd.data import SPLITS
from tcskd.device import DEVICES, resolve_workers
from tcskd.errors import TcskdError
from tcskd.options import opt
from tcskd.splits import Holdout

#: Storage dtypes of ``features``.
DTYPES = ("float16", "float32")
#: How images are decoded (``--decode``): whole, or JPEGs at a reduced scale where the crops allow it.
DECODES = ("full", "draft")
#: What a cache holds per view: one global embedding, or the teacher's grid of patch tokens.
TOKENS = ("global", "patch")


@dataclass
class CacheConfig:
    """Options of ``tcskd cache``."""

    data: str = opt("builtin:mnist5k", help="Dataset spec.")
    """Dataset spec (see tcskd.data)."""
    teacher: str = opt("builtin:efficientnet-lite0", help="Teacher spec.")
    """Teacher spec (see tcskd.teachers)."""
    split: str = opt("train", choices=SPLITS)
    """train, test or all."""
    views: int = opt(1, help="Views per image (0: centre crop; others random crop+flip).")
    """View 0 is the centre crop; views 1..K-1 are seeded random-resized-crop + flip."""
    image_size: int | None = opt(None, help="Teacher input size (default: the teacher's).")
    """Teacher input size; None = the teacher's own."""
    batch_size: int | None = opt(None, help="Default: 32 on the CPU, 256 on a GPU.")
    """Teacher batch; None = 32 on the CPU (cache-friendly), 256 on a GPU."""
    format: str = opt("zarr", choices=FORMATS)
    """zarr (a directory store) or hdf5 (store.h5 inside the cache directory)."""
    dtype: str = opt("float16", choices=DTYPES)
    """Storage dtype of ``features``."""
    cache_root: str | None = opt(None, help="Default: $TCSKD_CACHE, else ./caches.")
    """Where caches live; None = $TCSKD_CACHE, else ./caches."""
    limit: int | None = opt(None, help="A seeded (--seed), class-stratified subset of N samples of the split, in "
                                       "source order.")
    """Take a seeded (``seed``), class-stratified subset of N samples of the split, in source order
    (:func:`tcskd.cache.subset.limit_rows`), so a quick experiment sees every class."""
    device: str = opt("auto", choices=DEVICES)
    workers: int | str = opt("auto", metavar="auto|N",
                             help="DataLoader worker processes decoding and cropping; auto: one less than the "
                                  "usable cores, at most 16.")
    """DataLoader worker processes that decode and crop (tcskd.device.resolve_workers): a number, or ``auto`` =
    one less than the cores this process may use (under torchrun: its share of the node's), at most 16 (1 on
    2 cores). Batches are pinned and prefetched on CUDA. The features do not depend on it (each row is
    computed alone, batches never cross chunks)."""
    decode: str = opt("full", choices=DECODES,
                      help="full: decode every image whole; draft: decode JPEGs at the smallest 1/2, 1/4 or 1/8 "
                           "scale at which every view's crop still has the teacher's input size (part of the "
                           "cache key).")
    """``full``: every image decoded at its size. ``draft``: a JPEG of a source that gives its encoded bytes
    (image folders, tar shards, HF datasets) is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL's draft
    mode), the smallest at which every view's crop box, drawn from the full size read from the header, is
    still at least the teacher's input size in both dimensions (tcskd.views.draft_reduction); other images
    are decoded whole. Faster for large photos and small teacher inputs; the features differ slightly
    (recorded in the cache's identity: a draft cache is never a hit for a full one)."""
    reindex: bool = opt(False, help="Rebuild the data's saved index (image folders, tar shards) before "
                                    "fingerprinting it, e.g. after files were rewritten in place.")
    """Rebuild the source's saved index (tcskd.data.index) before fingerprinting: an image folder's index is
    reused while its folders' mtimes hold, which a file rewritten in place under the same name does not change."""
    order: str = opt("auto", choices=ORDERS,
                     help="The order of the cache's rows: shuffled (one fixed seeded permutation, so that every "
                          "chunk mixes the classes), source, or auto: source for tar shards and parquet (read fastest in "
                          "their own order), else shuffled (part of the cache key when shuffled).")
    """``shuffled``: row r holds the split's row ``order_rows(n)[r]`` (tcskd.cache.subset), so every
    chunk is a random sample of the split and training that reads targets from the store
    (``--targets store``), which shuffles within windows of chunks, mixes every class in a batch;
    ``source``: the split's own order (image folders and the built-in digits: one class after another);
    ``auto``: ``source`` for the kinds that read fastest in their own order (``wds``, ``hfds``), else
    ``shuffled``. A sample's features do not depend on it."""
    seed: int = opt(0, help="Seed of the random views, of --limit and of the --dim basis sample.")
    """Seed of the random views (ignored with one view), of the ``limit`` subset and of the images the
    ``dim`` basis is fitted on."""
    chunk_rows: int = opt(1024, help="Rows per chunk (unit of resume).")
    """Rows per store chunk (the unit of resume and of parallel writers)."""
    skip_bad: bool = opt(False, help="Record unreadable images in the manifest instead of stopping.")
    """Record unreadable images in the manifest instead of stopping."""
    wait: bool = opt(False, help="Wait for another writer of the same cache instead of exiting (with --shard: "
                                 "also for the other shards' chunks, then complete the cache).")
    """Wait for another writer of the same cache instead of exiting; with ``shard``, once this shard's chunks are
    done, also wait for the other shards' chunks and complete the cache."""
    shard: str | None = opt(None, metavar="I/N", help="Compute only chunks c with c % N == I (I in 0..N-1), as one "
                                                      "of N independent jobs filling the same cache (e.g. "
                                                      "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); not part "
                                                      "of the cache key.")
    """One of N independent processes (no process group: a job array) filling the same cache: this one computes
    the chunks ``c`` with ``c % N == I`` (tcskd.cache.build, "Shards"). Not part of the cache key."""
    crop_scale: tuple[float, float] = opt(DEFAULT_SCALE, cli=False)
    """Area range of the random views' crops."""
    tokens: str = opt("global", choices=TOKENS, help="global: one embedding per view; patch: the teacher's "
                                                     "token grid per view (N x V x T x D).")
    """``global``: the teacher's global embedding per view; ``patch``: its grid of patch tokens per view
    (``features`` N x V x T x D, tcskd.store.layout; the grid and patch size go into the manifest)."""
    dim: int | None = opt(None, metavar="K", help="With --tokens patch: store only the first K PCA coordinates "
                                                  "of each token (the basis is fitted first on a sample).")
    """With ``tokens='patch'``: never store raw tokens. A PCA basis of the tokens is fitted first on a seeded
    sample of ``basis_sample`` images (or taken from ``basis_from``) and stored as ``bases/pca``; ``features``
    then holds each token's first K coordinates ``B (x - mean)`` (``Manifest.coords_of``)."""
    basis_sample: int = opt(1000, metavar="N", help="With --dim: images (seeded by --seed) the token basis is "
                                                    "fitted on (all when fewer).")
    """With ``dim``: the number of images, drawn with ``seed``, whose tokens (every view) fit the basis."""
    basis_from: str | None = opt(None, metavar="KEY|PATH", help="With --dim: project with this patch cache's "
                                                                "token basis (e.g. the train split's).")
    """With ``dim``: take the token basis of another patch cache of the same teacher (its ``bases/pca``, or
    the basis its coordinates are in) instead of fitting one, e.g. the train split's basis for the test split."""
    exclude_val: bool = opt(True, cli="--exclude-val/--include-val",
                            help="With --dim: draw the token basis's sample from the rows training runs do not "
                                 "hold out for validation (--val-*; default), or from every row (--include-val).")
    """With ``dim`` (a fitted basis, not ``basis_from``) on a cache of the train split: the rows every training
    run with the same ``val_frac`` / ``val_per_class`` / ``val_seed`` holds out for validation
    (:class:`tcskd.splits.Holdout`) are left out of the basis's sample, as ``tcskd basis`` leaves them out by
    default. Part of the cache key only where it changes the basis (``tcskd.cache.dense.identity_extras``)."""
    val_frac: float = opt(0.1, help="With --dim: share of each class held out of the basis sample, as in tcskd "
                                    "train (unless --include-val).")
    """With ``dim`` and ``exclude_val``: the share of each class held out (as ``tcskd train --val-frac``)."""
    val_per_class: int | None = opt(None, help="With --dim: rows per class held out instead of a share (unless "
                                               "--include-val).")
    """With ``dim`` and ``exclude_val``: rows per class held out (as ``tcskd train --val-per-class``)."""
    val_seed: int = opt(0, help="With --dim: holdout seed, as in tcskd train (unless --include-val).")
    """With ``dim`` and ``exclude_val``: the holdout's seed (as ``tcskd train --val-seed``)."""

    def validate(self) -> None:
        """TcskdError (one line) for an unknown choice or a value out of range."""
        if self.format not in FORMATS:
            raise TcskdError(f"unknown format '{self.format}' (choose {' or '.join(FORMATS)})")
        if self.dtype not in DTYPES:
            raise TcskdError(f"unknown dtype '{self.dtype}' (choose {' or '.join(DTYPES)})")
        if self.views < 1:
            raise TcskdError(f"--views must be >= 1 (got {self.views})")
        if (self.batch_size is not None and self.batch_size < 1) or self.chunk_rows < 1:
            raise TcskdError("--batch-size and chunk rows must be >= 1")
        if self.image_size is not None and self.image_size < 8:
            raise TcskdError(f"--image-size must be >= 8 (got {self.image_size})")
        resolve_workers(self.workers)
        if self.decode not in DECODES:
            raise TcskdError(f"unknown --decode '{self.decode}' (choose {' or '.join(DECODES)})")
        if self.order not in ORDERS:
            raise TcskdError(f"unknown --order '{self.order}' (choose {', '.join(ORDERS)})")
        if self.tokens not in TOKENS:
            raise TcskdError(f"unknown --tokens '{self.tokens}' (choose {' or '.join(TOKENS)})")
        if self.tokens != "patch" and (self.dim is not None or self.basis_from is not None):
            raise TcskdError("--dim and --basis-from store coordinates of patch tokens: they need --tokens patch")
        if self.dim is not None and self.dim < 1:
            raise TcskdError(f"--dim must be >= 1 (got {self.dim})")
        if self.basis_from is not None and self.dim is None:
            raise TcskdError("--basis-from gives the basis of --dim K coordinates: give --dim too")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.basis_sample < 2:
            raise TcskdError(f"--basis-sample must be >= 2 (got {self.basis_sample})")
        Holdout(self.val_frac, self.val_per_class, self.val_seed)  # checks the validation options


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; TcskdError (one line) otherwise."""
    parts = str(text).strip().split("/")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        i, n = int(parts[0]), int(parts[1])
        if 0 <= i < n:
            return i, n
    raise TcskdError(f"--shard must be I/N with N >= 1 and 0 <= I < N (e.g. "
                     f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT for an array 0-(N-1)), not '{text}'")


def config_dict(cfg: CacheConfig) -> dict[str, Any]:
    """The config as plain data (``crop_scale`` as a list)."""
    d = asdict(cfg)
    d["crop_scale"] = list(cfg.crop_scale)
    return d


__all__ = ["DTYPES", "DECODES", "TOKENS", "CacheConfig", "config_dict", "parse_shard"]
