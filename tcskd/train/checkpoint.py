"""A training run's checkpoint: what it holds, how it is written and read, and when a run may resume from it.

``checkpoint.pt`` (``torch.save`` of primitives and tensors only, so that
``torch.load(weights_only=True)`` reads it): ``format`` (:data:`CHECKPOINT_FORMAT`),
``epoch`` (epochs completed), ``step`` (optimizer steps taken; the learning rate is
a pure function of it), ``student`` / ``head`` / ``optimizer`` state dicts (the
head's holds ``mask``, ``gate`` and the accumulated ``importance``), ``rng``
(torch, CUDA, numpy and python generator states as tensors, :func:`rng_state`),
``config`` (the resolved TrainConfig as a dict), ``meta`` (student name,
feature_dim, in_channels, num_classes, image_size, k, cache_key, basis, ...),
``train_seconds`` and ``images``. It is written after every epoch, atomically.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
#: Options added after checkpoints of this format were first written -> the value a checkpoint without them ran
#: with (so that such a run still resumes).
ADDED_OPTIONS: dict[str, Any] = {"milestones": (), "gamma": 0.1}


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python generator states, as tensors and numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]), "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore the generator states saved by :func:`rng_state`."""
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # the previous checkpoint, if any, is untouched
        if isinstance(e, (RuntimeError, OSError)):  # torch's writer reports a full disk as a RuntimeError
            text = str(e).strip()
            msg = text.splitlines()[-1] if text else type(e).__name__
            raise TcskdError(f"cannot write checkpoint {path} (is the disk full?): {msg}") from e
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` on the CPU (weights_only); TcskdError when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TcskdError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e}") from e


def check_resume(saved: dict[str, Any], now: dict[str, Any], free: Sequence[str], cache_key: str | None,
                 meta_key: str | None) -> None:
    """Refuse to resume a run whose options (``saved``, the checkpoint's config) differ from ``now`` in a
    field not in ``free``, or whose cache (``meta_key``) is not this one (``cache_key``)."""
    diff = [k for k in now if k not in free and saved.get(k, ADDED_OPTIONS.get(k)) != now[k]]
    if diff:
        k = diff[0]
        raise TcskdError(f"cannot resume: the run was started with {k}={saved.get(k)!r}, now {now[k]!r} "
                         f"({len(diff)} option(s) differ: {', '.join(diff)})")
    if meta_key != cache_key:
        raise TcskdError(f"cannot resume: the run used cache {meta_key}, now {cache_key}")
