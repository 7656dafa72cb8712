"""Where a cache lives: a local directory, or an fsspec URL (``memory://``, ``s3://``, ...).

Remote locations go through fsspec (s3fs for ``s3://``). The endpoint, credentials, retries and
timeouts are configured the standard way, never by a tcskd option: for S3 the AWS variables that
botocore reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``, profiles) and fsspec's own
configuration (``FSSPEC_S3_...`` variables, ``~/.config/fsspec``).

An unreachable endpoint is one line (:class:`~tcskd.errors.StoreError`, exit 2), found quickly:
the first contact with a bucket in a process is a probe without retries and with a short connect
timeout (:func:`check_reachable`), so a refused connection does not sit through botocore's retry
loop; later requests keep the configured retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

from tcskd.errors import StoreError, TcskdError

log = logging.getLogger(__name__)

#: Schemes served in this process (no network): nothing to probe.
LOCAL_SCHEMES = frozenset({"memory", "file", "local"})
#: Schemes whose filesystem is s3fs: conditional writes (If-None-Match / If-Match) and a fast probe.
S3_SCHEMES = frozenset({"s3", "s3a"})
#: The probe's connect timeout in seconds (its only attempt).
PROBE_CONNECT_TIMEOUT = 3

_reached: set[tuple[str, ...]] = set()
_reached_lock = threading.Lock()


class PreconditionFailed(OSError):
    """A conditional write or delete found the object changed (HTTP 412): another writer was first."""


def _client_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors that mean "the endpoint cannot be reached", all client-side errors worth one line)."""
    unreachable: list[type[BaseException]] = [ConnectionError, TimeoutError]
    client: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        unreachable += [be.ConnectionError]  # EndpointConnectionError, ConnectTimeoutError, ...
        client += [be.BotoCoreError]  # NoCredentialsError, a bad region or config, ...
    with contextlib.suppress(ImportError):
        import aiohttp

        unreachable += [aiohttp.ClientConnectionError]
        client += [aiohttp.ClientError]
    return tuple(unreachable), tuple(unreachable + client)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def remote_errors(url: str, error: type[TcskdError] = StoreError) -> Iterator[None]:
    """Turn a network or client failure (no credentials, ...) while working on ``url`` into one line
    (``error``); other errors pass (a missing object stays FileNotFoundError)."""
    unreachable, client = _client_errors()
    try:
        yield
    except client as e:
        if isinstance(e, unreachable):
            raise error(f"cannot reach {url}: {_first_line(e)} (check the endpoint, e.g. AWS_ENDPOINT_URL, "
                        f"and the network)") from e
        raise error(f"cannot access {url}: {_first_line(e)}") from e


def _fs_of(url: str):
    """The fsspec filesystem and path of ``url``. Listings are not cached: other processes (and
    Zarr's own filesystem instance) write the same prefixes, so a cached listing would go stale."""
    scheme = url.split("://", 1)[0]
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError as e:
        extra = "s3" if scheme in S3_SCHEMES else None
        hint = f"pip install 'tcskd[{extra}]'" if extra else f"install fsspec and the package for {scheme}://"
        raise StoreError(f"{scheme}:// locations need a package that is not installed ({e}): {hint}") from None


def check_reachable(url: str, error: type[TcskdError] = StoreError) -> None:
    """Raise ``error`` (one line) quickly if the endpoint of ``url`` cannot be reached.

    Once per process and bucket (host). For ``s3://`` the probe is one request with no retries and a
    connect timeout of :data:`PROBE_CONNECT_TIMEOUT` s, on top of the user's fsspec ``s3`` config;
    other remote schemes are probed with their own configured client. A missing object is fine
    (the endpoint answered); only a network failure counts. Data readers call this before streaming.
    """
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme in LOCAL_SCHEMES:
        return
    host = url.split("://", 1)[1].split("/", 1)[0]
    key = (scheme, host, os.environ.get("AWS_ENDPOINT_URL", ""), os.environ.get("FSSPEC_S3_ENDPOINT_URL", ""))
    with _reached_lock:
        if key in _reached:
            return
    with remote_errors(url, error):
        if scheme in S3_SCHEMES:
            import fsspec

            conf = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs") or {})
            conf.update(connect_timeout=PROBE_CONNECT_TIMEOUT, retries={"max_attempts": 1, "mode": "standard"})
            fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, config_kwargs=conf)
            fs.retries = 1  # s3fs's own retry loop, on top of botocore's
            path = fs._strip_protocol(url)
        else:
            fs, path = _fs_of(url)
        try:
            fs.info(path)
        except (FileNotFoundError, PermissionError):
            pass  # the endpoint answered
    with _reached_lock:
        _reached.add(key)


class RemotePath:
    """A cache location given as an fsspec URL (``memory://``, ``s3://``, ...).

    Only the few path operations the stages use; Zarr reads and writes it
    through fsspec. ``file://`` URLs are plain local paths (see as_location).
    Every operation first checks (once) that the endpoint answers, and turns
    a network failure into one line (:func:`remote_errors`).
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self._path = _fs_of(self.url)
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

    def __lt__(self, other: "RemotePath") -> bool:  # sorted() of a listing, as with Paths
        return self.url < other.url

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        check_reachable(self.url)
        with remote_errors(self.url):
            yield

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.url.rsplit("/", 1)[0])

    @property
    def conditional_writes(self) -> bool:
        """Whether this store takes If-None-Match / If-Match writes (S3 through s3fs)."""
        return self.scheme in S3_SCHEMES

    def resolve(self) -> "RemotePath":
        return self

    def exists(self) -> bool:
        with self._io():
            return self.fs.exists(self._path)

    def is_file(self) -> bool:
        with self._io():
            return self.fs.isfile(self._path)

    def is_dir(self) -> bool:
        with self._io():
            return self.fs.isdir(self._path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Create the folder (object stores: nothing to create) in an existing bucket; a bucket that does not
        exist is a StoreError (s3fs would create it: on a typo, a new bucket)."""
        with self._io():
            bucket = self._path.split("/", 1)[0]
            if self.scheme in ("s3", "s3a", "gs", "gcs") and not self.fs.exists(bucket):
                raise StoreError(f"bucket '{bucket}' of {self.url} does not exist (create it first, or check the "
                                 f"name)")
            self.fs.makedirs(self._path, exist_ok=True)

    def iterdir(self):
        with self._io():
            infos = self.fs.ls(self._path, detail=True)
        for info in infos:
            yield RemotePath(f"{self.scheme}://{info['name'].lstrip('/')}" if self.scheme != "memory"
                             else f"memory://{info['name']}")

    def write_bytes(self, data: bytes) -> None:
        with self._io(), self.fs.open(self._path, "wb") as f:
            f.write(data)

    def read_bytes(self) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        with self._io():
            return self.fs.cat_file(self._path)

    def size_bytes(self) -> int:
        try:
            with self._io():
                return int(self.fs.du(self._path))
        except (FileNotFoundError, OSError):
            return 0

    def remove(self) -> None:
        with self._io():
            if self.fs.exists(self._path):
                self.fs.rm(self._path, recursive=True)

    def move_tree(self, dst: "RemotePath") -> None:
        """Move every object under this prefix to ``dst`` (replacing what was there): copy each
        object, then delete the source. Not atomic: callers mark completion after the move."""
        with self._io():
            files = [f for f in self.fs.find(self._path) if f != self._path]
            if not files:
                raise FileNotFoundError(self.url)
            if self.fs.exists(dst._path):
                self.fs.rm(dst._path, recursive=True)
            src = self._path.rstrip("/")
            self.fs.copy(files, [dst._path.rstrip("/") + f[len(src):] for f in files])
            self.fs.rm(self._path, recursive=True)

    # -- single objects, written conditionally (the writer lease) --------------------------------

    def read_versioned(self) -> tuple[bytes, str | None]:
        """(bytes, version tag): the tag (S3's ETag) names this content for :meth:`replace_if`.

        The tag is read before the bytes, so a tag never claims newer content than the bytes
        returned: a replace based on it fails rather than overwrite something unseen.
        FileNotFoundError if there is no object.
        """
        with self._io():
            tag = self.fs.info(self._path).get("ETag") if self.conditional_writes else None
            return self.fs.cat_file(self._path), tag

    def create_exclusive(self, data: bytes) -> str | None:
        """Write the object only if none exists (S3: ``If-None-Match: *``); FileExistsError otherwise.
        Returns the new version tag. Without conditional writes: check, then write (a race)."""
        with self._io():
            if self.conditional_writes:
                out = self.fs.pipe_file(self._path, data, mode="create")
                return _etag(out) or self.fs.info(self._path).get("ETag")
            if self.fs.exists(self._path):
                raise FileExistsError(self.url)
            self.fs.pipe_file(self._path, data)
            return None

    def replace_if(self, data: bytes, tag: str | None) -> str | None:
        """Overwrite the object only if it still has version ``tag`` (S3: ``If-Match``);
        PreconditionFailed otherwise. Without conditional writes (or no tag): a plain write."""
        with self._io():
            if self.conditional_writes and tag is not None:
                try:
                    out = self.fs.pipe_file(self._path, data, IfMatch=tag)
                except OSError as e:
                    if _is_412(e):
                        raise PreconditionFailed(f"{self.url} changed") from None
                    raise
                return _etag(out) or self.fs.info(self._path).get("ETag")
            self.fs.pipe_file(self._path, data)
            return None

    def delete_object(self) -> None:
        """Delete this one object (no error if it is gone)."""
        with self._io(), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path)


def _etag(put_response: object) -> str | None:
    return put_response.get("ETag") if isinstance(put_response, dict) else None


def _is_412(e: BaseException) -> bool:
    cause = e.__cause__
    resp = getattr(cause, "response", None)
    if isinstance(resp, dict):
        err, meta = resp.get("Error", {}), resp.get("ResponseMetadata", {})
        return err.get("Code") in ("PreconditionFailed", "412") or meta.get("HTTPStatusCode") == 412
    return "pre-condition" in str(e) or "precondition" in str(e).lower()


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
