"""The feature store: one schema, two backends (Zarr v3 directory, HDF5 file).

A cache lives in ``<cache-root>/<key>/``. With Zarr that directory *is* the
Zarr group; with HDF5 the directory holds ``store.h5``. Both hold the arrays
of DESIGN.md (``features``, ``labels``, ``sample_index``, ``view_params``,
``chunk_done``, ``bases/<name>/...``) and the manifest as root attributes, so
anyone can read a cache with plain ``zarr`` or ``h5py``.

Crash safety:
- Zarr writes every chunk and metadata file atomically (temporary file +
  rename), so a killed writer leaves at worst a chunk that is not marked done.
- HDF5 arrays are contiguous and allocated when created: streaming writes
  touch raw data only, never the file's metadata, so a killed writer cannot
  damage the file's structure.
- ``chunk_done`` has one storage chunk per data chunk: a flag is its own file
  (Zarr) and is written only after the data it vouches for.

Damage detection: Zarr chunks are zstd-compressed with a checksum, and every
chunk is written even when it equals the fill value (manifest
``dense_chunks``), so a flipped byte fails its checksum and a deleted chunk
file is noticed (:meth:`Store.missing_chunks`) instead of reading as zeros.
Reads that fail become a StoreError naming the array and rows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tcskd import SCHEMA_VERSION
from tcskd.errors import StoreError
from tcskd.store.paths import RemotePath, as_location, is_remote

log = logging.getLogger(__name__)

FORMATS = ("zarr", "hdf5")
H5_NAME = "store.h5"
#: Zarr array config of tcskd's writers: every chunk is stored, even one equal to the fill value.
_DENSE = {"write_empty_chunks": True}


class Store:
    """Backend-neutral access to one cache directory.

    Arrays come back as objects that support numpy slicing for reading and
    writing (``zarr.Array`` or ``h5py.Dataset``).
    """

    format: str = ""

    def __init__(self, path: "Path | RemotePath") -> None:
        self.path = as_location(path)

    # -- arrays ---------------------------------------------------------
    def create(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...],
               fill_value: Any = 0, compress: bool = True) -> Any:
        raise NotImplementedError

    def __getitem__(self, name: str) -> Any:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def children(self, group: str) -> list[str]:
        """Names of the members of ``group`` ('' for the root); [] if absent."""
        raise NotImplementedError

    # -- attributes -----------------------------------------------------
    def attrs(self, name: str = "") -> dict[str, Any]:
        raise NotImplementedError

    def set_attrs(self, values: dict[str, Any], name: str = "") -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers shared by both backends --------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        return self.attrs("")

    def read(self, name: str) -> np.ndarray:
        arr = self[name]
        try:
            return np.asarray(arr[...])
        except Exception as e:  # a damaged chunk fails its checksum or decompression
            n = int(arr.shape[0]) if len(arr.shape) else 0
            step = int((getattr(arr, "chunks", None) or (n,))[0] or n or 1)
            for start in range(0, n, step):
                try:
                    arr[start:min(n, start + step)]
                except Exception as e2:
                    raise self.damaged(name, start, min(n, start + step), e2) from e2
            raise self.damaged(name, 0, n, e) from e

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``name``; a StoreError naming them when they cannot be read."""
        try:
            return np.asarray(self[name][start:stop])
        except StoreError:
            raise
        except Exception as e:
            raise self.damaged(name, start, stop, e) from e

    def damaged(self, name: str, start: int, stop: int, error: BaseException) -> StoreError:
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        return StoreError(f"cache {self.path} is damaged: '{name}' rows {start}..{stop - 1} cannot be read "
                          f"({msg}); run `tcskd cache verify`, then rebuild what it names")

    def missing_chunks(self, name: str) -> list[int]:
        """Chunk indices (along axis 0) of ``name`` whose data are not stored; [] where every
        chunk is always allocated (HDF5's contiguous arrays)."""
        return []

    def chunk_done(self) -> np.ndarray:
        return np.asarray(self["chunk_done"][...], dtype=bool)

    def bases(self) -> list[str]:
        """Names of complete bases (a basis becomes visible only when complete)."""
        out = []
        for name in self.children("bases"):
            if name.startswith("."):
                continue
            try:
                attrs = self.attrs(f"bases/{name}")
            except StoreError:
                if f"bases/{name}" in self:  # unreadable: say so
                    raise
                continue  # replaced by its writer (renamed aside) since the listing
            if attrs.get("complete"):
                out.append(name)
        return sorted(out)

    def remove_partial_files(self, under: str = "") -> int:
        """Delete temporary files of writes cut short by a crash (only those below group ``under``, when
        given); return how many.

        Zarr writes each file as ``<name>.<uuid>.partial`` and renames it into
        place, so a killed writer can leave such a file (never a torn chunk).
        Call only while holding the lock of what is below: the cache's writer lock, or a basis's lock
        for ``under="bases/<name>"``.
        """
        if is_remote(self.path) or self.format != "zarr":
            return 0
        removed = 0
        for root, _, files in os.walk(self.path / under if under else self.path):
            for f in files:
                if f.endswith(".partial"):
                    try:
                        os.unlink(os.path.join(root, f))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def size_bytes(self) -> int:
        if is_remote(self.path):
            return self.path.size_bytes()
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total


class ZarrStore(Store):
    format = "zarr"

    def __init__(self, path: "Path | RemotePath", mode: str = "r") -> None:
        super().__init__(path)
        self._mode = mode
        self._reopen()

    def _reopen(self) -> None:
        import zarr

        try:
            self._g = zarr.open_group(str(self.path), mode=self._mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for a missing/damaged group
            raise StoreError(f"cannot open Zarr store {self.path}: {e}") from e

    def create(self, name, shape, dtype, chunks, fill_value=0, compress=True):
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=3, checksum=True)] if compress else None
        return self._g.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                    fill_value=fill_value, compressors=compressors,
                                    overwrite=True, config=_DENSE)

    def __getitem__(self, name):
        try:
            node = self._g[name]
        except KeyError:
            raise StoreError(f"{self.path}: array or group '{name}' is missing") from None
        except Exception as e:  # damaged metadata, an unknown codec, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"{self.path}: array or group '{name}' is unreadable ({msg})") from e
        if self._mode != "r" and hasattr(node, "with_config"):
            node = node.with_config(_DENSE)  # write every chunk, even one equal to the fill value
        return node

    def missing_chunks(self, name):
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        arr = self[name]
        enc = arr.metadata.chunk_key_encoding
        if not isinstance(enc, DefaultChunkKeyEncoding) or enc.separator != "/" or not len(arr.shape):
            return []
        n_chunks = -(-int(arr.shape[0]) // int(arr.chunks[0]))
        base = self.path / name / "c"
        present: set[int] = set()
        if is_remote(self.path):
            root = base._path.strip("/")
            try:
                files = [f.strip("/")[len(root) + 1:] for f in base.fs.find(base._path)]
            except FileNotFoundError:
                files = []
        else:
            files = [os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs]
        for rel in files:
            head = rel.replace(os.sep, "/").split("/", 1)[0]
            if head.isdigit() and not rel.endswith(".partial"):
                present.add(int(head))
        return [c for c in range(n_chunks) if c not in present]

    def __contains__(self, name):
        try:
            self._g[name]
            return True
        except (KeyError, Exception):
            return False

    def delete(self, name):
        if name in self:
            del self._g[name]
        if not is_remote(self.path):
            # A write cut short (a full disk) can leave a folder whose metadata never landed: not a
            # member for zarr, but still on disk.
            shutil.rmtree(self.path / name, ignore_errors=True)

    def rename(self, src, dst):
        if is_remote(self.path):
            # An object store has no atomic rename: move, then the caller marks completion last.
            (self.path / src).move_tree(self.path / dst)
            self._reopen()
            return
        # A local directory store: a group is a folder, and os.rename is atomic.
        src_p, dst_p = self.path / src, self.path / dst
        old = None
        if dst_p.exists():  # move the old one aside first: the gap without either is one rename
            old = dst_p.with_name(f".old-{dst_p.name}-{os.getpid()}")
            os.rename(dst_p, old)
        os.rename(src_p, dst_p)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def children(self, group):
        g = self._g if not group else (self._g[group] if group in self else None)
        if g is None:
            return []
        with warnings.catch_warnings():
            # A folder without metadata is no member: one being written or removed by a writer beside this
            # process (a basis's hidden group), which zarr would warn about.
            warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
            return sorted(list(g.array_keys()) + list(g.group_keys()))

    def attrs(self, name=""):
        node = self._g if not name else self[name]
        return dict(node.attrs)

    def set_attrs(self, values, name=""):
        node = self._g if not name else self[name]
        node.attrs.update(_jsonable(values))

    def require_group(self, name: str) -> None:
        self._g.require_group(name)


class H5Store(Store):
    format = "hdf5"

    def __init__(self, path: "Path | RemotePath", mode: str = "r") -> None:
        super().__init__(path)
        import h5py

        if is_remote(self.path):
            raise StoreError(f"HDF5 stores are local files; use --format zarr for {self.path}")
        self.file = self.path / H5_NAME
        self._broken = False
        self._ids: list[Any] = []
        h5mode = {"r": "r", "a": "a", "w": "w", "r+": "r+"}[mode]
        if mode in ("a", "w"):
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._f = h5py.File(self.file, h5mode, locking=False)
        except Exception as e:
            raise StoreError(f"cannot open HDF5 store {self.file}: {e}") from e

    def create(self, name, shape, dtype, chunks, fill_value=0, compress=True):
        import h5py

        if name in self._f:
            del self._f[name]
        # Contiguous and allocated now: later writes change raw bytes only.
        dt = np.dtype(dtype)
        space = h5py.h5s.create_simple(tuple(shape))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
        dcpl.set_fill_value(np.array(fill_value, dtype=dt))
        parent, _, leaf = name.rpartition("/")
        with self._writing():
            grp = self._f.require_group(parent) if parent else self._f
            # Keep the new dataset's id open until the flush: were it dropped first, HDF5 would
            # close it (and write it) inside a destructor, where a write error cannot be reported.
            self._ids.append(h5py.h5d.create(grp.id, leaf.encode(), h5py.h5t.py_create(dt), space, dcpl=dcpl))
            self._f.flush()
        return self._f[name]

    @contextlib.contextmanager
    def _writing(self):
        """Turn HDF5's write failures (a full disk, a file size limit) into an OSError naming the store.

        After such a failure HDF5's state is not trusted: the file is not closed
        (closing it would write again, and can crash the process); nothing written
        after the last successful flush is kept, as after a crash.
        """
        if self._broken:
            raise StoreError(f"HDF5 store {self.file} failed a write earlier; not writing to it again")
        try:
            yield
        except (RuntimeError, OSError) as e:
            text = str(e)
            if "write failed" not in text and "errno" not in text and not isinstance(e, OSError):
                raise
            self._broken = True
            m = re.search(r"errno = (\d+), error message = '([^']*)'", text)
            code = int(m.group(1)) if m else getattr(e, "errno", None) or errno.EIO
            msg = m.group(2) if m else (text.splitlines()[0] if text else os.strerror(code))
            raise OSError(code, f"cannot write HDF5 store {self.file}: {msg}") from e

    def __getitem__(self, name):
        try:
            return self._f[name]
        except KeyError:
            raise StoreError(f"{self.file}: array or group '{name}' is missing") from None
        except Exception as e:  # damaged object headers
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"{self.file}: array or group '{name}' is unreadable ({msg})") from e

    def __contains__(self, name):
        return name in self._f

    def delete(self, name):
        if name in self._f:
            with self._writing():
                del self._f[name]
                self._f.flush()

    def rename(self, src, dst):
        with self._writing():
            if dst in self._f:
                del self._f[dst]
            self._f.move(src, dst)
            self._f.flush()

    def children(self, group):
        if group and group not in self._f:
            return []
        node = self._f[group] if group else self._f
        return sorted(node.keys())

    def attrs(self, name=""):
        node = self._f if not name else self[name]
        out = {}
        for k, v in node.attrs.items():
            out[k] = _from_h5_attr(v)
        return out

    def set_attrs(self, values, name=""):
        node = self._f if not name else self[name]
        with self._writing():
            for k, v in _jsonable(values).items():
                node.attrs[k] = json.dumps(v)
            self._f.flush()

    def require_group(self, name: str) -> None:
        with self._writing():
            self._f.require_group(name)
            self._f.flush()

    def flush(self):
        with self._writing():
            self._f.flush()

    def close(self):
        if self._broken:
            return
        self._ids.clear()
        try:
            self._f.close()
        except Exception:
            pass


def _from_h5_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=_default))


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def detect_format(path: "str | Path | RemotePath") -> str | None:
    """'zarr', 'hdf5' or None when ``path`` holds no store."""
    path = as_location(path)
    if (path / H5_NAME).is_file():
        return "hdf5"
    if (path / "zarr.json").is_file():
        return "zarr"
    return None


def open_store(path: "Path | RemotePath | str", mode: str = "r", fmt: str | None = None) -> Store:
    """Open the store in directory ``path`` (or fsspec URL). ``mode``: 'r', 'a' (create if absent)."""
    path = as_location(path)
    found = detect_format(path)
    if fmt is None:
        fmt = found
        if fmt is None:
            raise StoreError(f"no tcskd cache at {path}")
    elif found is not None and found != fmt:
        raise StoreError(f"{path} holds a {found} store, not {fmt}")
    if fmt not in FORMATS:
        raise StoreError(f"unknown store format '{fmt}' (choose zarr or hdf5)")
    if mode == "r" and found is None:
        raise StoreError(f"no tcskd cache at {path}")
    store: Store = ZarrStore(path, mode) if fmt == "zarr" else H5Store(path, mode)
    if mode == "r" or found is not None:
        check_schema(store)
    return store


def check_schema(store: Store) -> None:
    man = store.manifest
    version = man.get("schema_version")
    if version is None:
        raise StoreError(f"{store.path} has no tcskd manifest (not a tcskd cache, or its creation was cut short)")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise StoreError(f"{store.path} has a malformed manifest (schema_version {version!r})") from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{store.path} was written with store schema {version}; this tcskd reads schema "
            f"{SCHEMA_VERSION} or older: upgrade tcskd"
        )


def iter_chunks(n: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(chunk id, start row, stop row) for ``n`` rows in chunks of ``chunk``."""
    for c, start in enumerate(range(0, n, chunk)):
        yield c, start, min(n, start + chunk)
