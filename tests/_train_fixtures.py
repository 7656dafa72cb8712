"""Tiny synthetic datasets and feature stores for the stage-3 tests (no teacher involved).

``make_npz`` writes a labelled npz dataset of small uint8 images whose class
is visible (a class-specific pattern plus noise). ``make_train_cache`` writes a
complete (or deliberately broken) cache for it (with tests/_stores.write_cache): the "teacher" is a
fixed random projection of the view's pixels followed by tanh, so the
targets are learnable; a PCA basis (and optionally stored coords and an
identity basis) is fitted with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from _stores import write_cache
from tcskd.store.backends import Store
from tcskd.store.bases import write_basis
from tcskd.views import apply_view, to_tensor, view_params


def make_npz(path: Path, n_train: int = 64, n_test: int = 32, size: int = 12, channels: int = 1,
             classes: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(classes, size, size, channels))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % classes
        rng.shuffle(y)
        x = 0.7 * patterns[y] + rng.uniform(0, 0.3 * 255, size=(n, size, size, channels))
        x = np.clip(x, 0, 255).astype(np.uint8)
        return (x[..., 0] if channels == 1 else x), y.astype(np.int64)

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    path = Path(path)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return path


def teacher_features(img: np.ndarray, params: np.ndarray, size: int, dim: int, seed: int = 1) -> np.ndarray:
    """The fake teacher: tanh of a fixed random projection of the view's pixels (V x dim)."""
    t = to_tensor(img if img.ndim == 3 else img[:, :, None])
    x = torch.stack([apply_view(t, p, size) for p in params]).flatten(1).numpy().astype(np.float64)
    r = np.random.default_rng(seed).normal(size=(x.shape[1], dim)) / np.sqrt(x.shape[1]) * 3
    return np.tanh((x - 0.5) @ r)


def make_train_cache(root: Path, npz: Path, views: int = 1, dim: int = 16, k: int = 8, coords: bool = False,
               identity: bool = False, complete: bool = True, drop_rows: int = 0, bad_rows: tuple[int, ...] = (),
               teacher_size: int = 16, chunk_rows: int = 16, fmt: str = "zarr", view_seed: int = 0,
               name: str = "cache", teacher_spec: str = "builtin:efficientnet-lite0") -> Path:
    """A cache of the npz's train split; ``drop_rows`` leaves the last rows out (a mismatching cache)."""
    z = np.load(npz)
    x, y = z["x"], z["y"]
    n = len(x) - drop_rows
    h, w = x.shape[1], x.shape[2]
    channels = 1 if x.ndim == 3 else x.shape[3]
    params = np.stack([view_params(i, h, w, views, view_seed) for i in range(n)]).astype(np.float32)
    feats = np.stack([teacher_features(x[i], params[i], teacher_size, dim) for i in range(n)])
    ok = np.ones(n, bool)
    ok[list(bad_rows)] = False
    done = np.ones(-(-n // chunk_rows), bool)
    if not complete:
        done[-1] = False
    f16 = feats.astype(np.float16).astype(np.float64)
    x0 = f16[ok, 0]
    mean = x0.mean(0)
    _, sv, vt = np.linalg.svd(x0 - mean, full_matrices=False)
    eig = sv ** 2 / max(1, len(x0) - 1)

    def write_bases(s: Store) -> None:
        _write_basis(s, "pca", "pca", mean, vt[:k], eig[:k], np.cumsum(eig)[:k] / eig.sum(),
                     ((f16 - mean) @ vt[:k].T) if coords else None)
        if identity:
            _write_basis(s, "identity", "identity", np.zeros(dim), np.eye(dim), np.ones(dim),
                         np.arange(1, dim + 1) / dim, None)

    return write_cache(Path(root) / name, feats.astype(np.float16), fmt=fmt, chunk_rows=chunk_rows,
                       dtype="float16", labels=y[:n], view_params=params, row_ok=ok, chunk_done=done,
                       complete=complete, identity={"limit": None, "fixture": f"test{views}{dim}{n}"},
                       data_spec=f"npz:{npz}", teacher_spec=teacher_spec, num_classes=int(y.max()) + 1,
                       channels=channels, image_size=teacher_size, bases=write_bases)


def _write_basis(s: Store, name: str, kind: str, mean: np.ndarray, comps: np.ndarray, eig: np.ndarray,
                 ratio: np.ndarray, coords: np.ndarray | None) -> None:
    def fill(store: Store, group: str) -> None:
        store.create(f"{group}/coords", coords.shape, "float16", (16, *coords.shape[1:]))[...] = (
            coords.astype(np.float16))

    write_basis(s, name, {"mean": mean, "components": comps, "eigenvalues": eig, "explained_ratio": ratio},
                {"kind": kind, "whiten": False}, fill if coords is not None else None)


def make_script_teacher(path: Path, size: int = 16, dim: int = 16, channels: int = 1, seed: int = 1) -> str:
    """A TorchScript teacher computing ``teacher_features`` live (for method online); returns its spec.

    tcskd's teacher adapter normalises with the ImageNet mean/std and repeats
    greyscale to 3 channels; the module undoes both first.
    """

    class FakeTeacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.channels = channels
            n_in = channels * size * size
            r = np.random.default_rng(seed).normal(size=(n_in, dim)) / np.sqrt(n_in) * 3
            self.register_buffer("r", torch.from_numpy(r).float())
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x * self.std + self.mean)[:, :self.channels]
            return torch.tanh((x.flatten(1) - 0.5) @ self.r)

    torch.jit.script(FakeTeacher()).save(str(path))
    return f"torchscript:{path}"
