"""Stage 1: stream a dataset once through a teacher into a resumable feature store.

The store is created whole (every array, the manifest) in a hidden folder and
renamed into place (tcskd.cache.create), so a cache directory either does not
exist or has its full layout. Rows are then computed chunk by chunk (a patch
cache: token grids, or their ``--dim K`` coordinates, tcskd.cache.dense); a chunk's ``chunk_done``
flag is written only after its data, so a killed run resumes with exactly
the chunks that are missing. Batches never cross chunk boundaries: a resumed
run feeds the teacher the very same batches as an uninterrupted one, and the
finished stores are equal byte for byte on the CPU.

Shards (``--shard I/N``): N independent processes with no process group (a
job array) fill one store; shard I computes the chunks ``c`` with
``c % N == I`` (round robin: balanced within one chunk, whatever the number of
chunks). Each shard takes the cache-wide writer lock (``<cache>.lock``) only
briefly: to create the store (the first comes creates it; the others wait for
the lock, then open it), to fit or copy a ``--dim`` basis before any chunk, to
record N in ``<cache>.shards`` (another N is refused while the cache is
incomplete) and to take its own lock ``<cache>.shard-I-of-N.lock`` (a second
writer of the same shard is refused; other shards are not). It then fills its
chunks holding only its own lock, and finally takes the cache-wide lock again:
if every chunk is done it completes the manifest (whoever comes last does it),
else it exits 0 saying how many chunks remain (``--wait``: polls until they are
done, then completes). A killed shard's rerun computes only its missing chunks.
A run without ``--shard`` holds the cache-wide lock throughout; it refuses (or
with ``--wait`` waits for) shards that are writing, then computes whatever is
missing and completes the cache. The result equals a one-process store.
``--shard`` is not part of the key. Local caches only (a shared filesystem)
and Zarr only; under torchrun the ranks split the chunks already (refused).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tcskd import dist
from tcskd.cache import dense
from tcskd.cache.config import CacheConfig, parse_shard
from tcskd.cache.create import check_identity, clean_stale_tmp, create_cache_store, has_manifest, identity_of
from tcskd.cache.subset import class_runs, limit_source, order_source, resolve_order
from tcskd.data import DataError, Source, fingerprint, open_source, reindex
from tcskd.data.decode import decode_rgb_reduced
from tcskd.device import autocast, resolve_device, resolve_workers
from tcskd.errors import LockedError, StoreError, TcskdError
from tcskd.store.backends import Store, detect_format, iter_chunks, open_store
from tcskd.store.handle import open_cache
from tcskd.store.manifest import Manifest
from tcskd.store.paths import is_remote
from tcskd.store.registry import WriterLock, cache_key, cache_root_of
from tcskd.source import match_channels
from tcskd.views import apply_view, center_view, draft_reduction, resize_on_device, teacher_views, view_params

log = logging.getLogger(__name__)


@dataclass
class CacheResult:
    """What ``build_cache`` did: the cache's ``path`` and ``key``, ``hit`` (complete already, nothing computed),
    the ``rows_computed`` by the teacher in this call, its wall time ``seconds`` and their ``timings``."""

    path: Path
    key: str
    hit: bool
    rows_computed: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of this process in ``setup`` (teacher load, dataset, lock, store creation, loader start),
    ``inputs`` (waiting for decoded, cropped batches), ``forward`` (the teacher, to finite features on the
    CPU), ``write`` (filling chunk buffers, waiting for the background writes, finishing), and with
    ``--dim K`` ``basis`` (pass 1: the sample's tokens, their moments, the basis written; tcskd.cache.dense).
    Disjoint spans of one thread: they sum to at most ``seconds``. A hit has ``setup`` only."""


# -- the dataset the teacher reads -----------------------------------------

class _TeacherInputs(Dataset):
    """Row -> (row, V x C x S x S uint8 views, label, V x 5 params, error).

    With ``defer_resize`` and one view, a batch of in-memory images keeps the images' own size
    (V x C x H x W): :func:`teacher_forward` applies view 0, the centre crop, on the teacher's device.
    With ``decode='draft'`` a JPEG of a source of encoded files is decoded at a reduced scale
    (:func:`decode_views`).
    """

    def __init__(self, source: Source, views: int, size: int, seed: int, scale: tuple[float, float],
                 defer_resize: bool = False, decode: str = "full") -> None:
        self.source, self.views, self.size, self.seed, self.scale = source, views, size, seed, scale
        self.defer_resize, self.decode = defer_resize, decode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int):
        idx = int(self.source.indices[row])
        c = self.source.channels
        try:
            x, params = decode_views(self.source, row, c, self.size, self.decode,
                                     lambda h, w: view_params(idx, h, w, self.views, self.seed, self.scale))
            return row, x, int(self.source.labels[row]), torch.from_numpy(params), ""
        except DataError as e:
            blank = torch.zeros(self.views, c, self.size, self.size, dtype=torch.uint8)
            return row, blank, -1, torch.zeros(self.views, 5), str(e)

    def __getitems__(self, rows: list[int]):
        """A batch at once when the source holds its images in memory with one shape (each image exactly as
        :meth:`__getitem__` makes it: the uint8 resize of a batch equals that of its images); else item by item."""
        r = np.asarray(rows, np.int64)
        if self.decode == "draft" and self.source.encoded is not None:
            return [self[int(i)] for i in r]
        imgs = self.source.images(r, self.source.channels)
        if imgs is None:
            return [self[int(i)] for i in r]
        b, h, w, _ = imgs.shape
        params = np.stack([view_params(int(i), h, w, self.views, self.seed, self.scale)
                           for i in self.source.indices[r]])
        u8 = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        labels = torch.from_numpy(self.source.labels[r].astype(np.int64))
        if self.defer_resize and self.views == 1:
            return _Batch((torch.from_numpy(r), u8[:, None], labels, torch.from_numpy(params), [""] * b))
        per_view = [apply_view(u8, params[0, 0], self.size)]  # view 0, the centre crop: one box for all
        per_view += [torch.stack([apply_view(u8[j], params[j, v], self.size) for j in range(b)])
                     for v in range(1, self.views)]
        x = torch.stack(per_view, dim=1) if self.views > 1 else per_view[0][:, None]
        return _Batch((torch.from_numpy(r), x, labels, torch.from_numpy(params), [""] * b))


class _Batch(tuple):
    """A batch _TeacherInputs built whole: :func:`collate_inputs` passes it through."""


def collate_inputs(items):
    if isinstance(items, _Batch):
        return tuple(items)
    rows, xs, labels, params, errors = zip(*items)
    return (torch.tensor(rows), torch.stack(xs), torch.tensor(labels, dtype=torch.int64),
            torch.stack(params), list(errors))


# -- the stage --------------------------------------------------------------

#: A source-order cache warns when at least this share of neighbouring rows share a label.
CLASS_ORDER_WARN = 0.5

def plan_cache(cfg: CacheConfig) -> tuple[Any, dict[str, Any], str, Path]:
    """Resolve teacher, identity, key and path without computing anything.

    The dataset is only fingerprinted here (a file hash where that is enough),
    so a cache hit does not parse it; :func:`open_split` opens it on a miss.
    """
    from tcskd.teachers import load_teacher

    cfg.validate()
    if cfg.reindex:
        reindex(cfg.data)
    data_fingerprint = fingerprint(cfg.data, cfg.split)
    teacher = load_teacher(cfg.teacher, cfg.image_size)
    dense.check_teacher(cfg, teacher)
    extras = dense.identity_extras(cfg, teacher, dense.basis_source_key(cfg, teacher))
    ident = identity_of(cfg, data_fingerprint, teacher.identity(), extras)
    key = cache_key(ident)
    return teacher, ident, key, cache_root_of(cfg.cache_root) / key


def open_split(cfg: CacheConfig, ident: dict[str, Any] | None = None) -> Source:
    """The rows a cache holds, in the order it holds them: the split, cut to ``--limit``, in ``--order``
    (tcskd.cache.subset); refuses an empty one, and with ``ident`` (the cache's identity) a dataset whose
    fingerprint changed since."""
    source = limit_source(open_source(cfg.data, cfg.split), cfg.limit, cfg.seed)
    if len(source) == 0:
        raise DataError(f"{cfg.data} split '{cfg.split}' has no samples")
    if ident is not None and source.fingerprint != ident["data"]["fingerprint"]:
        raise DataError(f"{cfg.data} changed while the cache was being prepared; run the command again")
    order = resolve_order(cfg.order, cfg.data)
    if order == "source" and class_runs(source.labels) >= CLASS_ORDER_WARN:
        log.warning("the rows of %s are in class order (%.1f %% of neighbouring rows share a label) and this cache "
                    "keeps that order (--order %s): training with --targets store mixes few classes per batch "
                    "unless --target-cache-mb holds most of the cache; --order shuffled writes them in a "
                    "seeded random order", cfg.data, 100 * class_runs(source.labels), cfg.order)
    return order_source(source, order)


def build_cache(cfg: CacheConfig) -> CacheResult:
    """Build (or resume, or find) the cache of ``cfg``; return where it is.

    Under torchrun every rank calls this: rank 0 creates the store and holds
    the writer lock, the ranks split the missing chunks between them, and
    rank 0 marks the cache complete once every rank is done.
    """
    t0 = time.perf_counter()
    teacher, ident, key, path = plan_cache(cfg)
    device = dist.device_for_rank(resolve_device(cfg.device))
    dist.init(device)
    dist.check_shared_root(path.parent)  # under torchrun every rank must see the cache root as one folder
    if cfg.shard is not None:
        return _build_shard(cfg, teacher, ident, key, path, device, t0)
    if dist.world() > 1:
        return _build_distributed(cfg, open_split(cfg, ident), teacher, ident, key, path, device, t0)
    if _is_hit(path, ident):
        return _hit(path, key, t0)
    source = open_split(cfg, ident)
    path.parent.mkdir(parents=True, exist_ok=True)
    timings = {"setup": 0.0, "inputs": 0.0, "forward": 0.0, "write": 0.0}
    with WriterLock(path, wait=cfg.wait) as lock:
        _check_no_shard_writing(path, cfg.wait)
        store = _open_for_writing(path, cfg, source, teacher, key, ident)
        try:
            t = time.perf_counter()
            project = dense.prepare_projection(store, path, cfg, teacher, device,
                                               _row_batches(source, cfg, teacher, device, lock), source)
            if cfg.dim is not None:
                timings["basis"] = time.perf_counter() - t
            timings["setup"] = t - t0  # _fill adds the teacher's move and the loader's start
            rows = _fill(store, cfg, source, teacher, device, timings=timings, project=project, lock=lock)
            t = time.perf_counter()
            _finish(store, source)
            _shards_file(path).unlink(missing_ok=True)
            timings["write"] += time.perf_counter() - t
        finally:
            store.close()
    return CacheResult(path, key, False, rows, time.perf_counter() - t0, timings)


# -- shards: independent jobs filling one cache --------------------------------

#: Seconds between two looks at the other shards' chunks (``--shard I/N --wait``).
SHARD_POLL_SECONDS = 2.0


def shard_chunks(n_chunks: int, index: int, count: int) -> list[int]:
    """The chunks shard ``index`` of ``count`` computes: ``c % count == index`` (round robin)."""
    return list(range(index, n_chunks, count))


def _shard_lock(path: Path, index: int, count: int, wait: bool = False) -> WriterLock:
    """The writer lock of one shard: ``<cache>.shard-I-of-N.lock`` beside the cache (not the cache-wide one)."""
    return WriterLock(Path(f"{path}.shard-{index}-of-{count}"), wait=wait)


def _shards_file(path: Path) -> Path:
    """``<cache>.shards``: the N of the shards filling an incomplete cache (removed when it is complete)."""
    return Path(f"{path}.shards")


def _recorded_shards(path: Path) -> int | None:
    try:
        return int(_shards_file(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _record_shards(path: Path, count: int) -> None:
    f = _shards_file(path)
    tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{count}\n")
    os.replace(tmp, f)


def _check_no_shard_writing(path: Path, wait: bool) -> None:
    """For a writer of the whole cache (holding the cache-wide lock): LockedError while a shard of it is writing
    (``wait``: wait until none is). Shards take their lock under the cache-wide lock, so none starts meanwhile."""
    count = _recorded_shards(path)
    if count is None or detect_format(path) is None:
        return
    for i in range(count):
        if WriterLock.is_held(Path(f"{path}.shard-{i}-of-{count}")):
            if not wait:
                raise LockedError(f"shard {i}/{count} of cache {path} is being written by another process; run "
                                  f"this again when the shards have finished, or pass --wait")
            log.info("waiting for shard %d/%d of %s", i, count, path)
            with _shard_lock(path, i, count, wait=True):
                pass


@contextlib.contextmanager
def _cache_wide_lock(path: Path):
    """The cache-wide writer lock, waited for (other shards hold it only briefly; a writer of the whole cache
    for its run, after which the cache is complete)."""
    try:
        lock = WriterLock(path).__enter__()
    except LockedError:
        log.info("waiting for the cache-wide lock of %s (another process creates, completes or writes it)", path)
        lock = WriterLock(path, wait=True).__enter__()
    try:
        yield lock
    finally:
        lock.__exit__(None, None, None)


def _build_shard(cfg: CacheConfig, teacher, ident: dict[str, Any], key: str, path: Path,
                 device: torch.device, t0: float) -> CacheResult:
    """Shard ``cfg.shard`` (I/N) of the cache: its missing chunks, then the manifest completed if every chunk is
    done (see the module's docstring)."""
    index, count = parse_shard(str(cfg.shard))
    if dist.world() > 1:
        raise TcskdError("--shard splits a cache between independent jobs; under torchrun the ranks split it "
                         "already: drop --shard (or run one process per shard)")
    if cfg.format == "hdf5":
        raise TcskdError("an HDF5 store has a single writer: use --format zarr with --shard")
    if is_remote(path):
        raise TcskdError("--shard needs a cache root on a (shared) filesystem, not an object store")
    if _is_hit(path, ident):
        return _hit(path, key, t0)
    source = open_split(cfg, ident)
    path.parent.mkdir(parents=True, exist_ok=True)
    timings = {"setup": 0.0, "inputs": 0.0, "forward": 0.0, "write": 0.0}
    while True:
        with _cache_wide_lock(path) as wide:
            clean_stale_tmp(path.parent, key)
            created = detect_format(path) is None
            if created:
                create_cache_store(path, cfg, source, teacher, key, ident)
                log.info("created cache %s (%d rows x %d views x %d dims)", path, len(source), cfg.views,
                         teacher.dim)
            with open_store(path, "a") as store:
                check_identity(store, ident)
                if Manifest.read(store).complete and store.chunk_done().all():
                    secs = time.perf_counter() - t0
                    return CacheResult(path, key, True, 0, secs, {"setup": secs})
                recorded = None if created else _recorded_shards(path)
                if recorded is not None and recorded != count:
                    raise TcskdError(f"cache {path} is being built in {recorded} shards (--shard I/{recorded}), "
                                     f"not {count}: give --shard {index}/{recorded}, or run without --shard to "
                                     f"finish it")
                if recorded is None:
                    _record_shards(path, count)
                t = time.perf_counter()
                project = dense.prepare_projection(store, path, cfg, teacher, device,
                                                   _row_batches(source, cfg, teacher, device, wide), source,
                                                   shared=True)
                if cfg.dim is not None:
                    timings["basis"] = timings.get("basis", 0.0) + time.perf_counter() - t
            try:
                own = _shard_lock(path, index, count).__enter__()
                break
            except LockedError:
                if not cfg.wait:
                    raise LockedError(f"shard {index}/{count} of cache {path} is already being written by another "
                                      f"process; run this again when it has finished, or pass --wait") from None
        log.info("waiting for the other writer of shard %d/%d of %s", index, count, path)
        with _shard_lock(path, index, count, wait=True):
            pass
    try:
        timings["setup"] = time.perf_counter() - t0 - timings.get("basis", 0.0)
        with open_store(path, "a") as store:
            mine = shard_chunks(int(Manifest.read(store).n_chunks), index, count)
            rows = _fill(store, cfg, source, teacher, device, chunk_ids=mine, timings=timings, project=project,
                         lock=own)
    finally:
        own.__exit__(None, None, None)
    log.info("shard %d/%d: its %d chunk(s) are done (%d rows computed now)", index, count, len(mine), rows)
    t = time.perf_counter()
    _complete_shards(path, source, index, count, cfg.wait)
    timings["write"] += time.perf_counter() - t
    return CacheResult(path, key, False, rows, time.perf_counter() - t0, timings)


def _complete_shards(path: Path, source: Source, index: int, count: int, wait: bool) -> bool:
    """Complete the manifest if every chunk is done (True); else say how many remain and return False, or with
    ``wait`` look again every :data:`SHARD_POLL_SECONDS` until they are done."""
    said = False
    while True:
        with _cache_wide_lock(path):
            with open_store(path, "a") as store:
                done = store.chunk_done()
                if Manifest.read(store).complete and done.all():
                    return True
                if done.all():
                    if store.remove_partial_files():  # a killed shard's; every chunk is written now
                        log.info("removed temporary files of an interrupted write in %s", path)
                    _finish(store, source)
                    _shards_file(path).unlink(missing_ok=True)
                    log.info("every chunk of %s is done: the cache is complete", path)
                    return True
        missing = int((~done).sum())
        if not wait:
            log.warning("shard %d/%d is done; %d chunk(s) of other shards remain in %s: the last shard to finish "
                        "completes the cache (or run the same command with --wait, or without --shard)",
                        index, count, missing, path)
            return False
        if not said:
            log.info("waiting for %d chunk(s) of other shards of %s", missing, path)
            said = True
        time.sleep(SHARD_POLL_SECONDS)


def _hit(path, key: str, t0: float) -> CacheResult:
    """The result of a cache hit: nothing computed, the time spent finding it counted as setup."""
    secs = time.perf_counter() - t0
    return CacheResult(path, key, True, 0, secs, {"setup": secs})


def _is_hit(path, ident: dict[str, Any]) -> bool:
    if detect_format(path) is None or (is_remote(path) and not has_manifest(path)):
        return False
    with open_cache(path, require="open") as cache:
        check_identity(cache.store, ident)
        if cache.problem("done") is None:
            log.info("cache hit: %s", path)
            return True
    return False


def _open_for_writing(path: Path, cfg: CacheConfig, source: Source, teacher, key: str,
                      ident: dict[str, Any]) -> Store:
    """Create the store if absent (under the writer lock), then open it for writing."""
    clean_stale_tmp(path.parent, key)
    if detect_format(path) is None or (is_remote(path) and not has_manifest(path)):
        create_cache_store(path, cfg, source, teacher, key, ident)
        log.info("created cache %s (%d rows x %d views x %d dims)", path, len(source), cfg.views, teacher.dim)
    store = open_store(path, "a")
    log.info("features: %s", dense.describe_bytes(Manifest.read(store)))
    try:
        check_identity(store, ident)
    except StoreError:
        store.close()
        raise
    if store.remove_partial_files():
        log.info("removed temporary files of an interrupted write in %s", path)
    return store


def _build_distributed(cfg: CacheConfig, source: Source, teacher, ident: dict[str, Any], key: str,
                       path: Path, device: torch.device, t0: float) -> CacheResult:
    if cfg.format == "hdf5":
        raise TcskdError("an HDF5 store has a single writer: use --format zarr under torchrun")
    lock: WriterLock | None = None
    status: tuple[str | None, bool, list[int]] = (None, False, [])
    if dist.is_main():
        try:
            if _is_hit(path, ident):
                status = (None, True, [])
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = WriterLock(path, wait=cfg.wait).__enter__()
                with _open_for_writing(path, cfg, source, teacher, key, ident) as store:
                    status = (None, False, [int(c) for c in np.flatnonzero(~store.chunk_done())])
        except TcskdError as e:
            status = (str(e), False, [])
    # Also the barrier: the store exists, and every rank splits the same list of missing chunks.
    error, hit, todo = dist.broadcast_object(status)
    if error:
        raise TcskdError(error)
    if hit:
        return CacheResult(path, key, True, 0, time.perf_counter() - t0)
    try:
        store = open_store(path, "a")
        try:
            project = dense.prepare_projection(store if dist.is_main() else None, path, cfg, teacher, device,
                                               _row_batches(source, cfg, teacher, device, lock), source)
            rows = _fill(store, cfg, source, teacher, device, chunk_ids=todo[dist.rank()::dist.world()],
                         project=project, lock=lock)
        finally:
            store.close()
        dist.barrier()
        if dist.is_main():
            with open_store(path, "a") as store:
                _finish(store, source)
        dist.barrier()
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    return CacheResult(path, key, False, rows, time.perf_counter() - t0)


def _batches(todo: list[tuple[int, int, int]], batch: int) -> list[list[int]]:
    out = []
    for _, start, stop in todo:
        for b in range(start, stop, batch):
            out.append(list(range(b, min(stop, b + batch))))
    return out


def _row_batches(source: Source, cfg: CacheConfig, teacher, device: torch.device,
                 lock: WriterLock | None = None) -> dense.Batches:
    """Row lists -> the cache stage's input batches of those rows (the ``--dim`` basis sample's loader)."""
    ds = teacher_inputs(source, cfg, teacher.image_size, device)
    workers = resolve_workers(cfg.workers)
    return lambda lists: DataLoader(ds, batch_sampler=lists, num_workers=workers, collate_fn=collate_inputs,
                                    pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                    worker_init_fn=_worker_init(lock))


def _fill(store: Store, cfg: CacheConfig, source: Source, teacher, device: torch.device,
          chunk_ids: list[int] | None = None, timings: dict[str, float] | None = None,
          project: dense.Projector | None = None, lock: WriterLock | None = None) -> int:
    """Compute every chunk not yet done (or only ``chunk_ids``); return rows computed. A patch cache stores
    token grids (``project``: their coordinates, tcskd.cache.dense). The loader's workers close their copy of
    ``lock`` (the writer lock this process holds).

    ``timings`` (see :class:`CacheResult`) receives the seconds of each part, added to what it holds.
    """
    from tqdm import tqdm

    timings = {"setup": 0.0, "inputs": 0.0, "forward": 0.0, "write": 0.0} if timings is None else timings
    t = time.perf_counter()

    manifest = Manifest.read(store)
    ch = int(manifest.chunk_rows)
    row_shape = (cfg.views, manifest.n_tokens, int(manifest.dim)) if manifest.dense else (cfg.views, teacher.dim)
    done = store.chunk_done()
    todo = [c for c in iter_chunks(len(source), ch) if not done[c[0]]]
    if chunk_ids is not None:
        wanted = set(chunk_ids)
        todo = [c for c in todo if c[0] in wanted]
    if not todo:
        return 0
    teacher.to(device)
    ds = teacher_inputs(source, cfg, teacher.image_size, device)
    batch = cfg.batch_size or (256 if device.type == "cuda" else 32)
    workers = resolve_workers(cfg.workers)
    log.info("cache: %d DataLoader worker(s)%s, %s decode, batch %d", workers,
             " (--workers auto)" if cfg.workers in (None, "auto") else "", cfg.decode, batch)
    loader = input_loader(ds, todo, batch, workers, device, lock)
    bounds = {c: (start, stop) for c, start, stop in todo}
    np_dtype = np.dtype(cfg.dtype)
    pending: list[Future] = []
    buf: dict[str, np.ndarray] = {}
    current: int | None = None
    total = sum(stop - start for start, stop in bounds.values())
    bar = tqdm(total=total, unit="img", desc="cache", file=sys.stderr, dynamic_ncols=True,
               disable=None if dist.is_main() else True, mininterval=1.0)
    computed = 0
    timings["setup"] += time.perf_counter() - t
    with ThreadPoolExecutor(max_workers=1) as writer:
        for rows, x, labels, params, errors in _timed(loader, timings, "inputs"):
            first = int(rows[0])
            c = first // ch
            start, stop = bounds[c]
            if current != c:
                current = c
                n = stop - start
                buf = _chunk_buffer(n, row_shape, np_dtype)
            bad = [e for e in errors if e]
            if bad and not cfg.skip_bad:
                raise DataError(bad[0] + " (pass --skip-bad to record and skip such images)")
            t = time.perf_counter()
            feats = _checked_forward(teacher, x, device, first, int(rows[-1]), manifest.dense, project)
            t_fwd = time.perf_counter()
            timings["forward"] += t_fwd - t
            r = rows.numpy() - start
            ok = np.array([not e for e in errors])
            buf["features"][r] = feats.numpy().astype(np_dtype)
            buf["labels"][r] = np.where(ok, labels.numpy(), -1)
            buf["sample_index"][r] = source.indices[rows.numpy()]
            buf["view_params"][r] = params.numpy()
            buf["row_ok"][r] = ok
            buf["filled"][r] = True
            if bad:
                log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0])
            bar.update(len(rows))
            computed += len(rows)
            if buf["filled"].all():
                while len(pending) >= 2:  # bound the memory held by queued writes
                    pending.pop(0).result()
                pending.append(writer.submit(_write_chunk, store, c, start, stop, buf))
                current = None
            timings["write"] += time.perf_counter() - t_fwd
        t = time.perf_counter()
        for f in pending:
            f.result()
        timings["write"] += time.perf_counter() - t
    bar.close()
    return computed


def _chunk_buffer(n: int, row_shape: tuple[int, ...], dtype: np.dtype) -> dict[str, np.ndarray]:
    """One chunk's rows in memory until every row is filled (then written at once)."""
    views = row_shape[0]
    return {"features": np.zeros((n, *row_shape), dtype), "labels": np.full(n, -1, np.int64),
            "sample_index": np.full(n, -1, np.int64), "view_params": np.zeros((n, views, 5), np.float32),
            "row_ok": np.zeros(n, bool), "filled": np.zeros(n, bool)}


def _checked_forward(teacher, x: torch.Tensor, device: torch.device, first: int, last: int, tokens: bool = False,
                     project: dense.Projector | None = None) -> torch.Tensor:
    """The teacher's features of rows ``first..last`` on the CPU (``tokens``: its token grids, or their
    coordinates with ``project``); a TcskdError naming them when the teacher fails or gives NaN/Inf (nothing
    of their chunk is stored then)."""
    try:
        feats = (dense.tokens_forward(teacher, x, device, project) if tokens
                 else teacher_forward(teacher, x, device))
    except Exception as e:  # the teacher's own error (a shape it cannot take, out of memory, ...)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TcskdError(f"teacher {teacher.spec} failed on rows {first}..{last}: {msg}; "
                         f"nothing of this chunk was stored") from e
    if not torch.isfinite(feats).all():
        raise TcskdError(f"teacher produced NaN/Inf features for rows {first}..{last}; "
                         f"nothing of this chunk was stored")
    return feats.cpu()  # the finite check above has waited for the device already


def _timed(it, timings: dict[str, float], name: str):
    """The items of ``it``; the seconds spent waiting for each are added to ``timings[name]``."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            timings[name] += time.perf_counter() - t
        yield item


def decode_views(source: Source, row: int, channels: int | None, size: int, decode: str,
                 params_of: Callable[[int, int], np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """The teacher's inputs of one row: (V x C x ``size`` x ``size`` uint8, the V x 5 view params).

    ``params_of(H, W)`` gives the views of an H x W image (the cache: drawn by :func:`tcskd.views.view_params`;
    ``tcskd cache verify``: the stored ones). ``decode='full'`` decodes the image whole (``Source.image``).
    ``decode='draft'``, for a source that gives its encoded bytes: the views are drawn from the full size read
    from the header, and a JPEG is decoded at the largest reduction (1/2, 1/4, 1/8) at which every view's crop
    box is still at least ``size`` px both ways (:func:`tcskd.views.draft_reduction`); the normalised boxes are
    applied to the reduced image. Other images decode whole, exactly as ``full`` decodes them. ``channels``
    (when given) as :meth:`tcskd.source.Source.image` makes them. A DataError naming the image when it does
    not decode.
    """
    if decode != "draft" or source.encoded is None:
        img = source.image(row, channels)
        params = params_of(img.shape[0], img.shape[1])
        return teacher_views(img, params, size), params
    try:
        data = source.encoded(row)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"unreadable image {source.describe(row)}: {e}") from e
    drawn: list[np.ndarray] = []

    def reduction(h: int, w: int) -> int:
        drawn.append(params_of(h, w))
        return draft_reduction(drawn[0], h, w, size)

    img = decode_rgb_reduced(data, source.describe(row), reduction).image
    params = drawn[0] if drawn else params_of(img.shape[0], img.shape[1])
    img = img if channels is None else match_channels(img, channels)
    return teacher_views(img, params, size), params


def teacher_inputs(source: Source, cfg: CacheConfig, size: int, device: torch.device | None = None) -> Dataset:
    """The dataset the cache stage feeds its teacher: row -> (row, views as uint8, label, view params, error)
    for ``cfg``'s views, seed, crop scale and decoder (``cfg.decode``) at ``size`` px. With a ``device`` that
    resizes in-memory images itself (:func:`tcskd.views.resize_on_device`), one view keeps the images' own
    size and :func:`teacher_forward` crops and resizes them there."""
    defer = device is not None and resize_on_device(device)
    return _TeacherInputs(source, cfg.views, size, cfg.seed, tuple(cfg.crop_scale), defer, cfg.decode)


def input_loader(ds: Dataset, todo: list[tuple[int, int, int]], batch: int, workers: int | str,
                 device: torch.device, lock: WriterLock | None = None) -> DataLoader:
    """The cache stage's input pipeline: batches of ``batch`` rows of ``ds`` that never cross a chunk of
    ``todo`` ((chunk, start, stop), as :func:`tcskd.store.backends.iter_chunks` gives), decoded by ``workers``
    processes (``auto``: :func:`tcskd.device.resolve_workers`), four batches prefetched per worker, pinned for
    a CUDA ``device``. The batches do not depend on the number of workers. The workers close their copy of
    ``lock`` (the writer lock of the process that forks them), so a killed writer's lock goes with it."""
    workers = resolve_workers(workers)
    return DataLoader(ds, batch_sampler=_batches(todo, batch), num_workers=workers, collate_fn=collate_inputs,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers else None, worker_init_fn=_worker_init(lock))


def _worker_init(lock: WriterLock | None) -> Callable[[int], None] | None:
    """A DataLoader ``worker_init_fn`` closing the forked worker's copy of ``lock``'s descriptor (None: none)."""
    return None if lock is None else functools.partial(_close_lock, lock)


def _close_lock(lock: WriterLock, worker_id: int) -> None:
    lock.close_in_child()


def teacher_forward(teacher, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (or [0, 1] float) B x V x C x S x S -> float32 features B x V x D.

    Images of another size are a deferred batch (one view, see _TeacherInputs): their centre crop is
    taken and resized here, on the device (:func:`tcskd.views.center_view`).
    """
    b, v = x.shape[:2]
    flat = x.reshape(b * v, *x.shape[2:]).to(device, non_blocking=True)
    flat = center_view(flat, teacher.image_size)
    with torch.inference_mode(), autocast(device):
        f = teacher.features(flat)
    return f.float().reshape(b, v, -1)


def _write_chunk(store: Store, c: int, start: int, stop: int, buf: dict[str, np.ndarray]) -> None:
    for name in ("features", "labels", "sample_index", "view_params", "row_ok"):
        store[name][start:stop] = buf[name]
    store.flush()
    store["chunk_done"][c] = True  # only after the data is written
    store.flush()


def _finish(store: Store, source: Source) -> None:
    done = store.chunk_done()
    if not done.all():
        raise StoreError(f"cache {store.path}: {int((~done).sum())} chunk(s) still missing after the run")
    ok = store.read("row_ok")
    skipped = [int(i) for i in store.read("sample_index")[~ok]]
    if skipped:
        log.warning("%d sample(s) were unreadable and are marked in row_ok: %s", len(skipped), skipped[:10])
    store.set_attrs({"skipped": skipped})
    store.set_attrs({"complete": True})  # last, on its own: a cache is complete only with all of the above
    store.flush()

