"""A cache's identity (what its key hashes) and the creation of its store, whole or not at all.

:func:`identity_of` lists everything a cache's content depends on; :func:`create_cache_store` creates every
array and the manifest (tcskd.store.layout) in a hidden folder and renames it into place, so a cache directory
either does not exist or has its full layout. Used by the cache stage (tcskd.cache.build).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tcskd.cache import dense
from tcskd.cache.config import CacheConfig
from tcskd.cache.subset import LIMIT_RULE, ORDER_RULE, resolve_order
from tcskd.data import Source
from tcskd.errors import StoreError
from tcskd.store.backends import Store, detect_format, open_store
from tcskd.store.layout import create_store
from tcskd.store.manifest import Manifest
from tcskd.store.paths import is_remote

log = logging.getLogger(__name__)

#: How views become teacher inputs (crop, then antialiased bilinear resize in uint8), part of the identity.
VIEW_PIPELINE = "crop+resize-uint8-bilinear-aa/1"


#: How ``--decode`` other than ``full`` decodes images, part of the identity (tcskd.cache.build.decode_views).
DECODE_RULES = {"draft": "jpeg-dct-scaled-1/2,1/4,1/8:largest-keeping-every-crop>=size/1"}


def identity_of(cfg: CacheConfig, data_fingerprint: str, teacher_identity: dict[str, Any],
                dense_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a cache's content depends on; its hash is the cache key. ``dense_identity``: the keys of a
    patch cache (tcskd.cache.dense.identity_extras; none for a global cache, whose key stays as it was)."""
    ident = {
        "teacher": teacher_identity,
        "data": {"spec": cfg.data, "fingerprint": data_fingerprint},
        "split": cfg.split, "views": cfg.views, "dtype": cfg.dtype,
        # None for the whole split (the key of an unlimited cache does not depend on the limit rule or seed).
        "limit": None if cfg.limit is None else {"n": cfg.limit, "rule": LIMIT_RULE, "seed": cfg.seed},
        "format": cfg.format,
        # How views become teacher inputs (crop, then antialiased bilinear resize in uint8).
        "view_pipeline": VIEW_PIPELINE,
    }
    if cfg.views > 1:
        ident["view_seed"] = cfg.seed
        ident["crop_scale"] = list(cfg.crop_scale)
    if cfg.decode != "full":  # only then: the keys of every full-decode cache stay as they were
        ident["decode"] = DECODE_RULES[cfg.decode]
    if resolve_order(cfg.order, cfg.data) == "shuffled":  # a source-order cache keeps the key it always had
        ident["order"] = ORDER_RULE
    ident.update(dense_identity or {})
    return ident




def decode_of(identity: dict[str, Any]) -> str:
    """The ``--decode`` a cache of this identity was built with (``full`` when it records none)."""
    rule = identity.get("decode")
    if rule is None:
        return "full"
    for name, r in DECODE_RULES.items():
        if r == rule:
            return name
    raise StoreError(f"the cache was built with a decoder this version does not know ({rule})")


def create_cache_store(path: Path, cfg: CacheConfig, source: Source, teacher, key: str,
                  ident: dict[str, Any]) -> None:
    """Create every array and the manifest in a hidden folder, then rename it into place.

    Two processes creating the same key at once are safe: the rename that comes second fails (the target is a
    directory that is not empty), and that process removes its own folder and uses the store already there.
    An object store has no atomic rename: there the store is created in place
    and the manifest written last, so a store cut short has no manifest and
    is created again by the next run.
    """
    remote = is_remote(path)
    tmp = path if remote else path.parent / f".tmp-{key}-{os.getpid()}"
    if remote:
        path.remove()
    elif tmp.exists():
        shutil.rmtree(tmp)
    fields = dict(
        key=key, identity=ident, data_spec=source.spec, split=cfg.split, teacher_spec=teacher.spec,
        n_rows=len(source), views=cfg.views, dim=teacher.dim, dtype=cfg.dtype, chunk_rows=cfg.chunk_rows,
        num_classes=source.num_classes, channels=source.channels, image_size=teacher.image_size,
        complete=False, skipped=[], dense_chunks=True)
    manifest = Manifest.new(**{**fields, **dense.manifest_fields(cfg, teacher)})
    try:
        create_store(tmp, manifest, cfg.format).close()
    except BaseException:
        if not remote:  # a full disk or a read-only root: leave nothing half-made behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not remote:
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process published the same key first (a directory that is not empty cannot be renamed
            # over): keep its store, which has the same layout (check_identity compares the identities).
            shutil.rmtree(tmp, ignore_errors=True)
            if detect_format(path) is None:
                raise
            log.info("cache %s was created by another process first; using its store", path)


def has_manifest(path) -> bool:
    """Whether the store at ``path`` opens with a tcskd manifest (an object store cut short has none)."""
    try:
        with open_store(path):
            return True
    except StoreError:
        return False


def clean_stale_tmp(root, key: str) -> None:
    """Remove the hidden creation folders of ``key`` left under ``root``. Every caller holds the cache's writer
    lock, so no other creator runs, on this host or another (a pid test would judge another host's process by
    a local one)."""
    if is_remote(root):
        return
    for d in root.glob(f".tmp-{key}-*"):
        shutil.rmtree(d, ignore_errors=True)



def check_identity(store: Store, ident: dict[str, Any]) -> None:
    """StoreError unless the store at hand was built from exactly ``ident`` (never mix two caches' rows)."""
    found = Manifest.read(store).identity
    if found != ident:
        diff = sorted(k for k in set(ident) | set(found) if found.get(k) != ident.get(k))
        raise StoreError(f"cache {store.path} was built from other inputs (differs in: {', '.join(diff)}); "
                         f"refusing to mix them")
