"""``hfds:PATH[#image=COL,label=COL,train=NAME,test=NAME]``: a Hugging Face ``datasets`` dataset.

PATH (a folder, or an fsspec URL such as ``s3://bucket/ds`` or ``memory://ds``) holds either

- a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` + one folder of Arrow files per split), read
  by ``datasets.load_from_disk``: the Arrow files are memory-mapped, so a row is a pointer into the mapping
  and forked DataLoader workers share the mapping. Local only: ``datasets`` copies a remote one whole into
  a temporary folder, so a remote save_to_disk folder is refused (publish it as parquet instead); or
- parquet files laid out as the Hub does (``PATH/data/<split>-*.parquet``, a split's shards in name
  order), read by pyarrow (through fsspec for URLs) one row group at a time: each process opens the files
  itself on first use (so forked workers never share a handle) and keeps its last row groups in a small
  LRU (:data:`GROUP_CACHE_BYTES`, :data:`OPEN_FILES`). Rows read in order (the cache stage) read each
  row group once per worker that touches it; rows read at random (training) read a row group per row,
  so for shuffled reads of a large set convert it once:
  ``datasets.load_dataset("parquet", data_dir=PATH).save_to_disk(DIR)`` and use ``hfds:DIR``.

Columns: the image column is the one whose feature (the dataset's features; for parquet the
``huggingface`` schema metadata ``datasets`` writes) is ``Image``, else a ``struct<bytes, path>`` column;
the label column is the ``ClassLabel`` one, else a column named ``label``, else none (labels -1). The
suffix after the last ``#`` (so PATH itself has no ``#``) names them: ``#image=img,label=fine_label``;
``label=`` or ``label=none`` reads the set as unlabelled; ``train=NAME`` / ``test=NAME`` take another
split as tcskd's train / test (``#test=validation`` for a set whose held-out split is ``validation``).
Labels must be integers (null = -1, unlabelled); ``num_classes`` is the ClassLabel's number of names,
else the largest label of both splits + 1.

A sample's index is its row: train rows 0..n_train-1, then test rows n_train + row; split ``all`` is
train then test. The fingerprint (part of a cache's key) reads no image: the splits' file names and
sizes, plus each save_to_disk split's ``_fingerprint`` (state.json) or each parquet file's footer.
``encoded(i)`` is the image's encoded bytes (the cell's ``bytes``, or the local file its ``path`` names
when the bytes were not embedded); ``load(i)`` decodes them to RGB.

Needs ``datasets`` and ``pyarrow`` (``pip install 'tcskd[hfds]'``); ``s3://`` needs ``s3fs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tcskd.data.decode import decode_rgb
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError, MissingSplitError
from tcskd.source import Source

log = logging.getLogger(__name__)

EXTRA = "pip install 'tcskd[hfds]'"
SYNTAX = "hfds:PATH[#image=COL,label=COL,test=SPLIT]"
OPTIONS = ("image", "label", "train", "test")
GROUP_CACHE_BYTES = 128 << 20
"""Each process keeps its most recently read parquet row groups (image column) up to this many bytes, as
Arrow counts them (``nbytes``), and always the last one."""
OPEN_FILES = 8
"""Each process keeps at most this many parquet files open."""
_FOOTER_READ = 64 << 10  # the first read of a parquet file's tail (most footers fit)
_INIT_LOCK = threading.Lock()
_LARGE_GROUP = 32 << 20  # row groups above this (uncompressed) are worth a word about random reads


@dataclass(frozen=True)
class HfdsSpec:
    """``hfds:PATH#...`` parsed: where the dataset is and which columns and splits to read."""

    path: str
    image: str | None = None
    """The image column (None: the Image column)."""
    label: str | None = None
    """The label column (None: the ClassLabel column, else ``label``, else none)."""
    unlabelled: bool = False
    """``label=`` / ``label=none``: every label is -1."""
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    """tcskd's split -> the dataset's split name."""


def parse_hfds(arg: str) -> HfdsSpec:
    """The argument of an ``hfds:`` spec as an :class:`HfdsSpec`, or a one-line DataError."""
    path, sep, opts = arg.rpartition("#") if "#" in arg else (arg, "", "")
    if not path:
        raise DataError(f"bad data spec 'hfds:{arg}': expected {SYNTAX}")
    kw: dict[str, str] = {}
    for item in opts.split(",") if sep else []:
        key, eq, value = item.partition("=")
        if not eq or key not in OPTIONS:
            raise DataError(f"hfds:{arg}: unknown option '{item}' after '#' (expected image=COL, label=COL, "
                            f"train=SPLIT or test=SPLIT, comma-separated)")
        if key in kw:
            raise DataError(f"hfds:{arg}: option '{key}' given twice")
        if not value and key != "label":
            raise DataError(f"hfds:{arg}: option '{key}=' needs a name")
        kw[key] = value
    label = kw.get("label")
    unlabelled = label is not None and label.lower() in ("", "none")
    return HfdsSpec(path, kw.get("image"), None if unlabelled else label, unlabelled,
                    {"train": kw.get("train", "train"), "test": kw.get("test", "test")})


def _libs() -> tuple[Any, Any, Any]:
    """(datasets, pyarrow.parquet, fsspec), or a one-line DataError naming the extra."""
    try:
        import datasets
        import fsspec
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"hfds: data needs the Hugging Face datasets library and pyarrow "
                        f"({e.name or e} is not installed): {EXTRA}") from e
    return datasets, pq, fsspec


# -- where the data is ----------------------------------------------------------------------------


@dataclass
class _Location:
    """PATH resolved: its filesystem, root and layout (``arrow``: save_to_disk; ``parquet``)."""

    spec: HfdsSpec
    fs: Any
    root: str
    local: bool
    layout: str

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def split_names(self) -> list[str]:
        """The dataset's own split names (for messages)."""
        if self.layout == "arrow":
            return _arrow_splits(self)
        return sorted({p.rsplit("/", 1)[-1].split("-", 1)[0] for p in self.fs.glob(self.join("data", "*.parquet"))})

    def parquet_files(self, split: str) -> list[tuple[str, int]]:
        """The split's parquet shards, (path, size) in name order."""
        found = self.fs.glob(self.join("data", f"{split}-*.parquet"), detail=True)
        return sorted((p, int(info["size"])) for p, info in found.items())


def _locate(spec: HfdsSpec) -> _Location:
    _, _, fsspec = _libs()
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, root = fsspec.core.url_to_fs(spec.path)
    except (ImportError, ValueError) as e:  # an unknown protocol, or one whose package is missing
        raise DataError(f"hfds: cannot open {spec.path}: {e}") from e
    local = isinstance(fs, LocalFileSystem)
    if not fs.isdir(root):
        raise DataError(f"hfds: dataset folder not found: {spec.path}")
    loc = _Location(spec, fs, root, local, "")
    if fs.isfile(loc.join("dataset_dict.json")):
        if not local:
            raise DataError(f"hfds: {spec.path} is a save_to_disk folder on a remote filesystem, which datasets "
                            f"would copy whole to a local folder; copy it yourself, or write it as parquet "
                            f"(PATH/data/<split>-*.parquet, e.g. Dataset.to_parquet or push_to_hub)")
        loc.layout = "arrow"
    elif fs.isfile(loc.join("state.json")):
        raise DataError(f"hfds: {spec.path} is one Dataset's save_to_disk folder; save a DatasetDict with "
                        f"'train' (and 'test') splits instead")
    elif fs.glob(loc.join("data", "*.parquet")):
        loc.layout = "parquet"
    else:
        raise DataError(f"hfds: {spec.path} is neither a save_to_disk folder (dataset_dict.json) nor a parquet "
                        f"dataset (data/<split>-*.parquet)")
    return loc


def _arrow_splits(loc: _Location) -> list[str]:
    try:
        splits = json.loads(loc.fs.cat_file(loc.join("dataset_dict.json")))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"hfds: cannot read {loc.join('dataset_dict.json')}: {e}") from e
    return [str(s) for s in splits]


# -- fingerprint ----------------------------------------------------------------------------------


def _parquet_footer(loc: _Location, path: str, size: int) -> bytes:
    """A parquet file's footer (its metadata: schema, row groups, column chunk sizes and statistics)."""
    tail = loc.fs.cat_file(path, start=max(0, size - _FOOTER_READ), end=size)
    if size < 12 or tail[-4:] != b"PAR1":
        raise DataError(f"hfds: {path} is not a parquet file")
    n = int.from_bytes(tail[-8:-4], "little")
    if n + 8 > len(tail):
        tail = loc.fs.cat_file(path, start=max(0, size - 8 - n), end=size)
    return tail[len(tail) - 8 - n:len(tail) - 8]


def _fingerprint_of(loc: _Location) -> str:
    """Both splits' files (names, sizes) and their save_to_disk ``_fingerprint`` or parquet footers: no image
    is read. Both splits, since test's indices follow train's rows and num_classes may come from either."""
    h = hashlib.sha256(f"hfds/{loc.layout}\n".encode())
    for split in ("train", "test"):
        name = loc.spec.splits[split]
        if loc.layout == "arrow":
            if name not in _arrow_splits(loc):
                continue
            try:
                state = json.loads(loc.fs.cat_file(loc.join(name, "state.json")))
                files = [f["filename"] for f in state["_data_files"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"hfds: cannot read {loc.join(name, 'state.json')}: {e}") from e
            h.update(f"{split}={name} fingerprint={state.get('_fingerprint')}\n".encode())
            for fn in files:
                h.update(f"{name}/{fn}:{loc.fs.size(loc.join(name, fn))}\n".encode())
        else:
            files = loc.parquet_files(name)
            h.update(f"{split}={name} files={len(files)}\n".encode())
            with ThreadPoolExecutor(8) as pool:
                footers = list(pool.map(lambda f: _parquet_footer(loc, *f), files))
            for (p, size), footer in zip(files, footers):
                h.update(f"{p.rsplit('/', 1)[-1]}:{size}:{hashlib.sha256(footer).hexdigest()}\n".encode())
    return h.hexdigest()


def _fingerprint(spec: str, arg: str, split: str) -> str:
    hs = parse_hfds(arg)
    with _io_errors(hs.path):
        return _fingerprint_of(_locate(hs))


@contextlib.contextmanager
def _io_errors(path: str) -> Iterator[None]:
    """An OSError of the filesystem (a missing permission, a lost connection) as one DataError line."""
    try:
        yield
    except OSError as e:
        raise DataError(f"hfds: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


# -- columns --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    image: str
    label: str | None
    names: list[str] | None
    """The ClassLabel's class names (None: not a ClassLabel)."""


def _columns(spec: HfdsSpec, features: Any, schema: Any, what: str) -> _Columns:
    """The image and label columns of a split, from its ``datasets`` features and Arrow schema."""
    import datasets
    import pyarrow as pa

    cols = list(schema.names)
    listed = ", ".join(cols) or "none"

    def is_image_struct(t) -> bool:
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    if spec.image is not None:
        if spec.image not in cols:
            raise DataError(f"hfds: {what} has no column '{spec.image}' (columns: {listed})")
        t = schema.field(spec.image).type
        if not (is_image_struct(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise DataError(f"hfds: {what} column '{spec.image}' holds {t}, not images (an Image feature, "
                            f"struct<bytes, path> or binary)")
        image = spec.image
    else:
        found = [c for c in cols if isinstance(features.get(c), datasets.Image)]
        found = found or [c for c in cols if is_image_struct(schema.field(c).type)]
        if not found:
            raise DataError(f"hfds: {what} has no Image column (columns: {listed}); name one with #image=COL")
        if len(found) > 1:
            raise DataError(f"hfds: {what} has several image columns ({', '.join(found)}); choose one with "
                            f"#image=COL")
        image = found[0]
    label: str | None = None
    if spec.label is not None:
        if spec.label not in cols:
            raise DataError(f"hfds: {what} has no column '{spec.label}' (columns: {listed})")
        label = spec.label
    elif not spec.unlabelled:
        found = [c for c in cols if isinstance(features.get(c), datasets.ClassLabel)]
        if len(found) == 1:
            label = found[0]
        elif "label" in cols:
            label = "label"
        elif found:
            raise DataError(f"hfds: {what} has several ClassLabel columns ({', '.join(found)}); choose one with "
                            f"#label=COL (or #label= for none)")
    if label is not None:
        t = schema.field(label).type
        if not pa.types.is_integer(t):
            raise DataError(f"hfds: {what} label column '{label}' holds {t} values; expected integer class ids "
                            f"(name another with #label=COL, or #label= for unlabelled data)")
    feat = features.get(label) if label is not None else None
    names = list(feat.names) if isinstance(feat, datasets.ClassLabel) and feat.names else None
    return _Columns(image, label, names)


def _labels(column: Any, what: str, names: list[str] | None) -> np.ndarray:
    """An integer Arrow column -> int64 labels (null = -1), or a DataError naming the bad value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        y = pc.fill_null(column.cast(pa.int64()), -1).to_numpy().astype(np.int64)  # a numpy copy: writable
    except pa.ArrowInvalid as e:  # a uint64 beyond int64
        raise DataError(f"hfds: {what} holds labels that are not int64 class ids: {e}") from e
    bad = y[(y < -1) | (y >= len(names))] if names is not None else y[y < -1]
    if len(bad):
        bound = f"[0, {len(names)}) (the ClassLabel's names)" if names is not None else ">= 0"
        raise DataError(f"hfds: {what} holds label {int(bad[0])}; expected {bound} or -1 for unlabelled")
    return y


# -- reading cells --------------------------------------------------------------------------------


def _cell_bytes(cell: Any, what: str) -> bytes:
    """An image cell (a struct<bytes, path> or binary scalar) -> its encoded bytes, or a DataError."""
    import pyarrow as pa

    if not cell.is_valid:
        raise DataError(f"{what} has no image (the cell is empty)")
    if isinstance(cell, pa.StructScalar):
        data = cell["bytes"].as_py()
        if data is None:
            path = cell["path"].as_py() if cell.type.get_field_index("path") >= 0 else None
            if path and Path(path).is_file():  # not embedded: datasets keeps the local file's path
                return Path(path).read_bytes()
            raise DataError(f"{what} has no image bytes" + (f" (its path {path} is not a file here)" if path else ""))
        return data
    data = cell.as_py()
    if data is None:
        raise DataError(f"{what} has no image (the cell is empty)")
    return data


class _ArrowCells:
    """Row -> image cell of a memory-mapped Arrow column (a save_to_disk split): an index into its chunks."""

    def __init__(self, column: Any) -> None:
        self.column = column
        self.starts = np.cumsum([0] + [len(c) for c in column.chunks[:-1]]).astype(np.int64)

    def __call__(self, row: int) -> Any:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.column.chunk(k)[row - int(self.starts[k])]


class _ParquetCells:
    """Row -> image cell of a split's parquet shards, read a row group at a time.

    Holds, for the whole split, one (start row, file, row group) triple per row group; each process opens the
    files on first use (so forked DataLoader workers never share a handle) and keeps its last row groups in an
    LRU of at most :data:`GROUP_CACHE_BYTES` and its last :data:`OPEN_FILES` files.
    """

    def __init__(self, url: str, local: bool, files: list[str], column: str, group_start: np.ndarray,
                 group_file: np.ndarray, group_local: np.ndarray) -> None:
        self.url, self.local, self.files, self.column = url, local, files, column
        self.group_start, self.group_file, self.group_local = group_start, group_file, group_local
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a spawned worker): the row-group index only; the process opens its own files."""
        return {k: v for k, v in self.__dict__.items() if k in ("url", "local", "files", "column", "group_start",
                                                               "group_file", "group_local")} | {"_pid": None}

    def _state(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with _INIT_LOCK:  # first use in this process: nothing inherited is used
            if self._pid != pid:
                self._lock = threading.Lock()
                self._fs = None
                self._open: OrderedDict[int, Any] = OrderedDict()
                self._groups: OrderedDict[int, Any] = OrderedDict()
                self._bytes = 0
                self._pid = pid

    def _file(self, f: int) -> Any:
        import pyarrow.parquet as pq

        if f in self._open:
            self._open.move_to_end(f)
            return self._open[f]
        if self.local:
            pf = pq.ParquetFile(self.files[f])
        else:
            if self._fs is None:
                import fsspec

                self._fs = fsspec.core.url_to_fs(self.url)[0]
            # Exact ranged reads: pyarrow asks for a row group's column chunk, a read-ahead cache would fetch more.
            pf = pq.ParquetFile(self._fs.open(self.files[f], "rb", cache_type="none"))
        self._open[f] = pf
        while len(self._open) > OPEN_FILES:
            self._open.popitem(last=False)[1].close(force=True)
        return pf

    def _group(self, g: int) -> Any:
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        table = self._file(int(self.group_file[g])).read_row_group(int(self.group_local[g]), columns=[self.column],
                                                                   use_threads=False)
        col = table.column(0)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        self._groups[g] = arr
        self._bytes += arr.nbytes
        while len(self._groups) > 1 and self._bytes > GROUP_CACHE_BYTES:
            self._bytes -= self._groups.popitem(last=False)[1].nbytes
        return arr

    def __call__(self, row: int) -> Any:
        self._state()
        g = int(np.searchsorted(self.group_start, row, side="right")) - 1
        with self._lock:
            return self._group(g)[row - int(self.group_start[g])]


# -- the splits -----------------------------------------------------------------------------------


@dataclass
class _Part:
    """One of the dataset's splits: its rows, columns, labels (read on demand) and cells."""

    name: str
    n: int
    columns: _Columns
    read_labels: Callable[[], np.ndarray]
    cell: Callable[[int], Any]
    _labels: np.ndarray | None = None

    def labels(self) -> np.ndarray:
        """The split's labels, int64 (-1: unlabelled), read once until :meth:`drop_labels`."""
        if self._labels is None:
            self._labels = self.read_labels() if self.columns.label else np.full(self.n, -1, np.int64)
        return self._labels

    def drop_labels(self) -> None:
        self._labels = None


def _arrow_parts(loc: _Location) -> dict[str, _Part]:
    datasets, _, _ = _libs()
    try:
        dd = datasets.load_from_disk(loc.root, keep_in_memory=False)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; one line names the folder
        raise DataError(f"hfds: cannot load {loc.spec.path} with datasets.load_from_disk: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    parts = {}
    for split, name in loc.spec.splits.items():
        if name not in dd:
            continue
        ds = dd[name]
        if getattr(ds, "_indices", None) is not None:  # save_to_disk writes selected rows; this is not one
            raise DataError(f"hfds: {loc.spec.path} split '{name}' has an indices mapping; flatten_indices() it")
        table = ds.data.table
        what = f"{loc.spec.path} split '{name}'"
        cols = _columns(loc.spec, ds.features, table.schema, what)
        read = (lambda t=table, c=cols, w=what: _labels(t.column(c.label), f"{w} column '{c.label}'", c.names))
        parts[split] = _Part(name, table.num_rows, cols, read, _ArrowCells(table.column(cols.image)))
    return parts


def _with_parquet(loc: _Location, path: str, fn: Callable[[Any], Any]) -> Any:
    """``fn(pyarrow ParquetFile of path)``, the file closed after; a one-line DataError if it cannot be read."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path if loc.local else loc.fs.open(path, "rb", cache_type="none"))
    except Exception as e:  # noqa: BLE001 - pyarrow's errors are many; one line names the file
        raise DataError(f"hfds: cannot read parquet file {path}: {str(e).splitlines()[0] if str(e) else e}") from e
    try:
        return fn(pf)
    finally:
        pf.close(force=True)


def _parquet_parts(loc: _Location) -> dict[str, _Part]:
    datasets, _, _ = _libs()
    parts = {}
    for split, name in loc.spec.splits.items():
        files = [p for p, _ in loc.parquet_files(name)]
        if not files:
            continue
        what = f"{loc.spec.path} split '{name}'"

        with ThreadPoolExecutor(8) as pool:
            heads = list(pool.map(lambda p: _with_parquet(loc, p, lambda pf: (pf.schema_arrow, pf.metadata)), files))
        schema = heads[0][0]
        for p, (other, _) in zip(files, heads):
            if not other.equals(schema, check_metadata=False):
                raise DataError(f"hfds: {p}'s columns differ from {files[0]}'s")
        cols = _columns(loc.spec, datasets.Features.from_arrow_schema(schema), schema, what)
        counts = [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for _, m in heads]
        largest = max((m.row_group(g).total_byte_size for _, m in heads for g in range(m.num_row_groups)), default=0)
        if largest > _LARGE_GROUP:
            log.info("%s: row groups of up to %.0f MB; a row read out of order reads its whole row group (for "
                     "shuffled reads, convert once: datasets.load_dataset('parquet', data_dir=PATH).save_to_disk(DIR)"
                     ", then use hfds:DIR)", what, largest / 1e6)
        sizes = np.asarray([c for fc in counts for c in fc], np.int64)
        start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        file_of = np.repeat(np.arange(len(files), dtype=np.int32), [len(fc) for fc in counts])
        local = np.concatenate([np.arange(len(fc), dtype=np.int32) for fc in counts])
        keep = sizes > 0  # empty row groups hold no row; the lookup wants strictly increasing starts
        cells = _ParquetCells(loc.spec.path, loc.local, files, cols.image, start[keep], file_of[keep], local[keep])

        def read(files=files, cols=cols, what=what) -> np.ndarray:
            """The label column of every shard (pyarrow reads that column's chunks only)."""
            import pyarrow as pa

            def labels_of(pf: Any) -> Any:
                return pf.read(columns=[cols.label], use_threads=False).column(0)

            with ThreadPoolExecutor(8) as pool:
                cols_ = list(pool.map(lambda p: _with_parquet(loc, p, labels_of), files))
            col = pa.chunked_array([c for cc in cols_ for c in cc.chunks], cols_[0].type)
            return _labels(col, f"{what} column '{cols.label}'", cols.names)

        parts[split] = _Part(name, int(sizes.sum()), cols, read, cells)
    return parts


def _open(spec: str, arg: str, split: str) -> Source:
    """The split of ``hfds:PATH[#...]`` as a Source (test rows after train rows; ``all`` = train then test)."""
    hs = parse_hfds(arg)
    with _io_errors(hs.path):
        loc = _locate(hs)
        fp = _fingerprint_of(loc)
        parts = _arrow_parts(loc) if loc.layout == "arrow" else _parquet_parts(loc)
        names = ["train", "test"] if split == "all" else [split]
        chosen = [s for s in names if s in parts]
        if not chosen:
            have = ", ".join(loc.split_names()) or "none"
            # A split named in the spec (test=NAME) that is not there is a mistake; a default one is just absent.
            kind = DataError if hs.splits[names[0]] != names[0] else MissingSplitError
            raise kind(f"hfds: {hs.path} has no '{hs.splits[names[0]]}' split (splits: {have})")
        offsets = {"train": 0, "test": parts["train"].n if "train" in parts else 0}
        indices = np.concatenate([np.arange(offsets[s], offsets[s] + parts[s].n, dtype=np.int64) for s in chosen])
        labels = (np.concatenate([parts[s].labels() for s in chosen]) if len(chosen) > 1
                  else parts[chosen[0]].labels())
        class_names = [parts[s].columns.names for s in parts if parts[s].columns.names is not None]
        if class_names:
            num_classes = max(len(c) for c in class_names)
        else:
            num_classes = max(int(parts[s].labels().max(initial=-1)) for s in parts) + 1
        for p in parts.values():
            p.drop_labels()  # the Source holds its labels; no second copy
    first_n = parts[chosen[0]].n

    def locate(i: int) -> tuple[_Part, int]:
        return (parts[chosen[0]], i) if i < first_n else (parts[chosen[1]], i - first_n)

    def describe(i: int) -> str:
        part, row = locate(i)
        return f"{hs.path} split '{part.name}' row {row}"

    def encoded(i: int) -> bytes:
        part, row = locate(i)
        return _cell_bytes(part.cell(row), describe(i))

    log.debug("%s %s: %d rows (%s), image column '%s', label column %s", spec, split, len(indices), loc.layout,
              parts[chosen[0]].columns.image, parts[chosen[0]].columns.label)
    return Source(spec, split, indices, labels, num_classes, 3, fp,
                  load=lambda i: decode_rgb(encoded(i), describe(i)), describe=describe, encoded=encoded)


register(Reader("hfds", SYNTAX, _open, _fingerprint, sequential=True))
