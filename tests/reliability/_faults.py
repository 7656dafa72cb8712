"""Deterministic fault injection for tcskd processes.

A fault fires at the N-th occurrence of an *event* in one of three domains:

- ``store``: a write through the tcskd Store API (``create``, array ``__setitem__``,
  ``set_attrs``, ``flush``, ``rename``, ``delete``, ``require_group``) or an
  ``os.rename`` (the store's creation is published by renaming a hidden folder);
  the fault fires *before* the event.
- ``put``: a file written by Zarr's local store (a chunk or a ``zarr.json``);
  ``torn`` leaves the half-written temporary file of that write and then kills,
  i.e. a crash in the middle of a file write.
- ``call``: a call of ``module:attr`` (e.g. ``tcskd.train.loop:tcs_loss``), before
  or after it runs.

Actions: ``kill`` (SIGKILL to the own process), ``pause`` (write ``<out>/paused`` and
wait for ``<out>/release`` or a kill), ``enospc`` / ``erofs`` (raise that OSError),
``record`` (only log every event of the domain to ``<out>/events.jsonl``).
``rlimit`` caps the size of any file the process writes (RLIMIT_FSIZE): every
writer, Python or C (HDF5, torch's zip writer), then fails as on a full disk.

Faults are installed in a child process (see _forkserver) before the CLI runs,
or in-process through the context managers at the end of this module.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

STORE_METHODS = ("create", "set_attrs", "flush", "rename", "delete", "require_group")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


class Trigger:
    """Counts the events of one domain and fires the fault at event ``n`` (1-based)."""

    def __init__(self, spec: dict[str, Any], out: str | None) -> None:
        self.spec, self.out = spec, out
        self.n = 0
        self.action = spec.get("action", "kill")
        self.at = int(spec.get("n", 0))
        self._log = None
        if self.action == "record" and out:
            self._log = open(os.path.join(out, f"events-{spec['domain']}.jsonl"), "a", buffering=1)

    def hit(self, label: str, torn: Callable[[], None] | None = None) -> None:
        self.n += 1
        if self._log is not None:
            self._log.write(json.dumps([self.n, label]) + "\n")
            return
        if self.n != self.at:
            return
        if self.out:
            Path(self.out, "fired").write_text(json.dumps([self.n, label]))
        if self.action == "kill":
            if torn is not None and self.spec.get("torn"):
                torn()
            _die()
        elif self.action == "pause":
            marker = Path(self.out, "paused")
            marker.with_suffix(".tmp").write_text(json.dumps([self.n, label, os.getpid()]))
            os.replace(marker.with_suffix(".tmp"), marker)
            deadline = time.monotonic() + 120
            while not Path(self.out, "release").exists():
                if time.monotonic() > deadline:
                    os._exit(99)
                time.sleep(0.02)
        elif self.action in ("enospc", "erofs"):
            code = errno.ENOSPC if self.action == "enospc" else errno.EROFS
            raise OSError(code, os.strerror(code), label)
        else:
            raise ValueError(f"unknown fault action {self.action!r}")


class _ArrayProxy:
    """An array whose writes are events; everything else goes to the real array."""

    def __init__(self, arr: Any, name: str, trig: Trigger) -> None:
        object.__setattr__(self, "_arr", arr)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_trig", trig)

    def __getattr__(self, k: str) -> Any:
        return getattr(self._arr, k)

    def __getitem__(self, k: Any) -> Any:
        return self._arr[k]

    def __setitem__(self, k: Any, v: Any) -> None:
        self._trig.hit(f"setitem:{self._name}:{_fmt(k)}")
        self._arr[k] = v

    def __len__(self) -> int:
        return len(self._arr)


def _fmt(k: Any) -> str:
    if isinstance(k, slice):
        return f"{k.start}:{k.stop}"
    if k is Ellipsis:
        return "..."
    return str(k)


def install_store(trig: Trigger) -> None:
    from tcskd.store import backends as S

    for cls in (S.ZarrStore, S.H5Store):
        for meth in STORE_METHODS:
            orig = getattr(cls, meth)

            def wrapped(self, *a, _orig=orig, _meth=meth, **kw):
                what = a[0] if a and isinstance(a[0], str) else ""
                if _meth == "set_attrs":
                    what = f"{a[1] if len(a) > 1 else kw.get('name', '')}:{','.join(sorted(a[0]))}"
                trig.hit(f"{_meth}:{what}")
                out = _orig(self, *a, **kw)
                if _meth == "create":
                    return _ArrayProxy(out, what, trig)
                return out

            setattr(cls, meth, wrapped)
        orig_get = cls.__getitem__
        setattr(cls, "__getitem__", lambda self, name, _g=orig_get: _ArrayProxy(_g(self, name), name, trig))
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
        trig.hit(f"os.rename:{Path(str(dst)).name}")
        return real_rename(src, dst, *a, **kw)

    os.rename = rename


def install_put(trig: Trigger) -> None:
    import uuid

    import zarr.storage._local as L

    orig = L._put

    def _put(path: Path, value: Any, exclusive: bool = False) -> int:
        def torn() -> None:
            data = bytes(value.as_buffer_like())
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: max(1, len(data) // 2)])

        trig.hit(f"put:{path}", torn=torn)
        return orig(path, value, exclusive=exclusive)

    L._put = _put


def install_call(trig: Trigger, target: str, when: str = "before") -> None:
    mod_name, attr = target.split(":")
    mod = importlib.import_module(mod_name)
    owner = mod
    *path, leaf = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    orig = getattr(owner, leaf)

    def wrapped(*a, **kw):
        if when == "before":
            trig.hit(target)
        out = orig(*a, **kw)
        if when == "after":
            trig.hit(target)
        return out

    setattr(owner, leaf, wrapped)


def install(faults: list[dict[str, Any]], out: str | None) -> None:
    """Install every fault of ``faults`` in this process."""
    for spec in faults:
        domain = spec["domain"]
        if domain == "rlimit":
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(spec["bytes"]), int(spec["bytes"])))
            continue
        trig = Trigger(spec, out)
        if domain == "store":
            install_store(trig)
        elif domain == "put":
            install_put(trig)
        elif domain == "call":
            install_call(trig, spec["target"], spec.get("when", "before"))
        else:
            raise ValueError(f"unknown fault domain {domain!r}")


# -- in-process faults ---------------------------------------------------------

@contextlib.contextmanager
def zarr_disk_full(after_puts: int):
    """Zarr file writes fail with ENOSPC after ``after_puts`` successful ones (the disk stays full)."""
    import zarr.storage._local as L

    orig = L._put
    used = [0]

    def _put(path: Path, value: Any, exclusive: bool = False) -> int:
        if used[0] >= after_puts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        used[0] += 1
        return orig(path, value, exclusive=exclusive)

    L._put = _put
    try:
        yield used
    finally:
        L._put = orig


@contextlib.contextmanager
def h5_disk_full(after_writes: int):
    """h5py dataset writes fail with ENOSPC after ``after_writes`` successful ones."""
    import h5py

    orig = h5py.Dataset.__setitem__
    count = [0]

    def setitem(self, key, value):
        count[0] += 1
        if count[0] > after_writes:
            raise OSError(errno.ENOSPC, f"Can't write data ({os.strerror(errno.ENOSPC)})", self.file.filename)
        return orig(self, key, value)

    h5py.Dataset.__setitem__ = setitem
    try:
        yield count
    finally:
        h5py.Dataset.__setitem__ = orig


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@contextlib.contextmanager
def read_only(root: Path):
    """Everything under ``root`` behaves as on a read-only file system (EROFS), for Python,
    Zarr and h5py writers alike. Reading still works."""
    import builtins

    import h5py

    root = str(Path(root).resolve())

    def under(p: Any, dir_fd: Any = None) -> bool:
        if dir_fd is not None:
            return True
        try:
            full = os.path.abspath(os.fsdecode(p))
        except TypeError:
            return False
        return full == root or full.startswith(root + os.sep)

    def refuse(p: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p) if not isinstance(p, int) else p)

    saved = {name: getattr(os, name) for name in ("open", "mkdir", "rename", "replace", "unlink", "rmdir",
                                                  "truncate")}
    saved_open, saved_io_open, saved_h5 = builtins.open, io.open, h5py.File

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & _WRITE_FLAGS and under(path, dir_fd):
            refuse(path)
        return saved["open"](path, flags, mode, dir_fd=dir_fd)

    def one_path(name):
        def f(path, *a, **kw):
            if under(path, kw.get("dir_fd")):
                if name != "mkdir" or not os.path.isdir(path):
                    refuse(path)
            return saved[name](path, *a, **kw)
        return f

    def two_paths(name):
        def f(src, dst, *a, **kw):
            if under(src) or under(dst):
                refuse(dst)
            return saved[name](src, dst, *a, **kw)
        return f

    def py_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return saved_open(file, mode, *a, **kw)

    def h5_file(name, mode="r", *a, **kw):
        if mode != "r" and under(name):
            refuse(name)
        return saved_h5(name, mode, *a, **kw)

    os.open = os_open
    os.mkdir = one_path("mkdir")
    os.unlink = one_path("unlink")
    os.rmdir = one_path("rmdir")
    os.truncate = one_path("truncate")
    os.rename = two_paths("rename")
    os.replace = two_paths("replace")
    builtins.open = io.open = py_open
    h5py.File = h5_file
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(os, name, f)
        builtins.open, io.open, h5py.File = saved_open, saved_io_open, saved_h5
