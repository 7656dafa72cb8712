"""A real S3 HTTP endpoint for the tests: moto's server on 127.0.0.1 and a free port.

The endpoint is configured the standard way only, by environment variables that botocore (and
so s3fs) reads itself: ``AWS_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``. Subprocesses get them through ``S3.env``; in-process tests through the
``s3_env`` fixture (which sets them in ``os.environ``). Only loopback traffic.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    """A running endpoint, its bucket and the environment that points a client at it."""

    url: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def prefix(self, name: str = "t") -> str:
        """A fresh ``s3://bucket/<name>-<random>`` prefix, so tests of one session never share objects."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def fs(self):
        """An s3fs filesystem of this endpoint (a fresh instance: no listing cache shared with the code)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.url, key="testing", secret="testing",
                                 skip_instance_cache=True, use_listings_cache=False)


def s3_env(url: str) -> dict[str, str]:
    """The standard variables that point botocore (s3fs) at ``url`` with dummy credentials."""
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's threaded S3 server on 127.0.0.1, one bucket; yields an :class:`S3`."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3(url=f"http://127.0.0.1:{port}", bucket="tcskd-test", env=s3_env(f"http://127.0.0.1:{port}"))
        s3.fs().mkdir(s3.bucket)
        yield s3
    finally:
        server.stop()


@pytest.fixture
def s3_env_set(s3_endpoint, monkeypatch) -> S3:
    """The endpoint's variables in ``os.environ`` for in-process code (fsspec/s3fs read them)."""
    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


__all__ = ["S3", "free_port", "s3_endpoint", "s3_env", "s3_env_set"]
