"""Where a cache lives: a local directory, or an fsspec URL (``memory://``, ``s3://``, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class RemotePath:
    """A cache location given as an fsspec URL (``memory://``, ``s3://``, ...).

    Only the few path operations the stages use; Zarr reads and writes it
    through fsspec. ``file://`` URLs are plain local paths (see as_location).
    """

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self._path = fsspec.core.url_to_fs(self.url)
        self.scheme = self.url.split("://", 1)[0]

    def __truediv__(self, other: str) -> "RemotePath":
        return RemotePath(f"{self.url}/{other}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.url.rsplit("/", 1)[0])

    def resolve(self) -> "RemotePath":
        return self

    def exists(self) -> bool:
        return self.fs.exists(self._path)

    def is_file(self) -> bool:
        return self.fs.isfile(self._path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self._path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._path, exist_ok=True)

    def iterdir(self):
        for info in self.fs.ls(self._path, detail=True):
            yield RemotePath(f"{self.scheme}://{info['name'].lstrip('/')}" if self.scheme != "memory"
                             else f"memory://{info['name']}")

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open(self._path, "wb") as f:
            f.write(data)

    def size_bytes(self) -> int:
        try:
            return int(self.fs.du(self._path))
        except (FileNotFoundError, OSError):
            return 0

    def remove(self) -> None:
        if self.fs.exists(self._path):
            self.fs.rm(self._path, recursive=True)


def as_location(where: "str | Path | RemotePath") -> "Path | RemotePath":
    """A local Path, or a RemotePath for an fsspec URL; ``file://`` URLs become local paths."""
    if isinstance(where, (Path, RemotePath)):
        return where
    text = str(where)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme == "file":
            return Path("/" + rest.lstrip("/"))
        return RemotePath(text)
    return Path(text)


def is_remote(where: object) -> bool:
    return isinstance(where, RemotePath)
