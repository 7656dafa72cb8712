"""The manifest: a cache's root attributes as one typed record, with one reader and one writer.

The manifest says what a cache is (``key`` and the ``identity`` it hashes), how
its arrays are laid out (``n_rows``, ``views``, ``dim``, ``dtype``,
``chunk_rows``), whether it is finished (``complete``, ``skipped``) and where
it came from (``tool_version``, ``created``, ``libraries``, ``git_sha``).
:meth:`Manifest.to_attrs` writes the keys in the order of :data:`FIELDS`;
keys this version does not know are kept in ``extra`` and written back after
them. :meth:`Manifest.from_attrs` is lenient (a damaged or old manifest still
reads; the integrity check of :mod:`tcskd.store.integrity` judges it), and
``raw`` keeps the attributes exactly as read.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tcskd

log = logging.getLogger(__name__)

#: The manifest's keys, in the order they are written.
FIELDS = ("schema_version", "key", "identity", "data_spec", "split", "teacher_spec", "n_rows", "views", "dim",
          "dtype", "chunk_rows", "num_classes", "channels", "image_size", "tokens", "grid", "patch", "teacher_dim",
          "coords_of", "complete", "skipped", "dense_chunks",
          "tool_version", "created", "libraries", "git_sha")


@dataclass
class Manifest:
    """A cache's manifest (its root attributes)."""

    key: str | None = None
    """The cache key: the hash of ``identity`` (tcskd.store.registry.cache_key)."""
    identity: dict[str, Any] = field(default_factory=dict)
    """Everything the content depends on (teacher, data, split, views, dtype, limit, format, ...)."""
    data_spec: str | None = None
    split: str | None = None
    teacher_spec: str | None = None
    n_rows: int | None = None
    views: int | None = None
    dim: int | None = None
    dtype: str | None = None
    chunk_rows: int | None = None
    num_classes: int | None = None
    channels: int | None = None
    image_size: int | None = None
    tokens: str = "global"
    """``global``: one embedding per view (``features`` N x V x D); ``patch``: a grid of tokens per view
    (``features`` N x V x T x D, T = grid[0] * grid[1] tokens in row-major order, tcskd.store.layout)."""
    grid: list[int] | None = None
    """[Gh, Gw] tokens per view for a ``patch`` cache; token (i, j) covers the part
    [i / Gh, (i + 1) / Gh) x [j / Gw, (j + 1) / Gw) of its view's crop (``view_params``)."""
    patch: float | None = None
    """Teacher input pixels per token side (``image_size / grid``; 14 for DINOv2 ViT-/14)."""
    teacher_dim: int | None = None
    """The teacher's feature width D; ``dim`` differs from it only when ``coords_of`` is set."""
    coords_of: str | None = None
    """None: ``features`` holds the teacher's features. A basis name: ``features`` holds the first ``dim``
    coordinates ``B (x - mean)`` in ``bases/<coords_of>`` of this store (``tcskd cache --dim K``)."""
    complete: bool = False
    """Set last by the cache stage: every chunk is done and ``skipped`` is final."""
    skipped: list[int] = field(default_factory=list)
    """Sample indices of rows that were unreadable (``row_ok`` False)."""
    dense_chunks: bool | None = None
    """Every chunk is stored, even one equal to the fill value: a missing chunk file is damage."""
    schema_version: int = tcskd.SCHEMA_VERSION
    tool_version: str | None = None
    created: str | None = None
    libraries: dict[str, str] | None = None
    git_sha: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version of tcskd does not know (kept and written back)."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The attributes exactly as read (empty for a manifest made here)."""

    # -- reading and writing --------------------------------------------
    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Manifest":
        """The manifest held by a store's root attributes ``attrs`` (values as stored, not checked)."""
        known = {f.name for f in fields(cls)} - {"extra", "raw"}
        values = {k: v for k, v in attrs.items() if k in known}
        if not isinstance(values.get("identity", {}), dict):
            values.pop("identity")
        extra = {k: v for k, v in attrs.items() if k not in known}
        return cls(**values, extra=extra, raw=dict(attrs))

    @classmethod
    def read(cls, store: Any) -> "Manifest":
        """The manifest of an open store (tcskd.store.backends.Store)."""
        return cls.from_attrs(store.attrs(""))

    def to_attrs(self) -> dict[str, Any]:
        """The root attributes: every key of :data:`FIELDS` in that order, then ``extra``."""
        out = {name: getattr(self, name) for name in FIELDS}
        out.update(self.extra)
        return out

    def write(self, store: Any) -> None:
        """Write the whole manifest as the root attributes of ``store``."""
        store.set_attrs(self.to_attrs())

    @classmethod
    def new(cls, **values: Any) -> "Manifest":
        """A manifest for a new cache, with this process's provenance (tool version, time, libraries, git)."""
        values.setdefault("tool_version", tcskd.__version__)
        values.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        values.setdefault("libraries", libraries())
        values.setdefault("git_sha", git_sha())
        return cls(**values)

    # -- typed views of the identity ------------------------------------
    @property
    def teacher_identity(self) -> dict[str, Any] | None:
        """The teacher part of the identity (spec, weights hash, preprocessing), None if absent."""
        return self.identity.get("teacher")

    @property
    def data_fingerprint(self) -> str | None:
        """The fingerprint of the dataset the cache was built from, None if absent."""
        data = self.identity.get("data")
        return data.get("fingerprint") if isinstance(data, dict) else None

    @property
    def limited(self) -> bool:
        """Whether the cache holds a ``--limit`` subset of its split."""
        return self.identity.get("limit") is not None

    @property
    def dense(self) -> bool:
        """Whether the cache holds token grids (``tokens == "patch"``)."""
        return self.tokens == "patch"

    @property
    def n_tokens(self) -> int:
        """Tokens per view: 1 for a global cache, Gh * Gw for a patch cache."""
        return int(self.grid[0]) * int(self.grid[1]) if self.dense and self.grid else 1

    @property
    def feature_dim(self) -> int | None:
        """The width of the teacher's features (the width a basis of this cache has)."""
        return self.teacher_dim if self.teacher_dim is not None else self.dim

    @property
    def n_chunks(self) -> int:
        return -(-int(self.n_rows) // int(self.chunk_rows))


def git_sha() -> str | None:
    """The commit of the tcskd checkout, None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def libraries() -> dict[str, str]:
    """Versions of the libraries that shape a cache's bytes."""
    import h5py
    import numpy as np
    import torch
    import zarr

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "zarr": zarr.__version__, "h5py": h5py.__version__}
