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


# -- dense (patch) caches and segmentation data -------------------------------------------------------------

def make_seg_npz(path: Path, n_train: int = 96, n_test: int = 32, size: int = 16, classes: int = 4,
                 seed: int = 0) -> Path:
    """A segmentation npz: grey images of textured rectangles on a flat dark background, ``y`` N x H x W uint8
    (0 = background, class c >= 1 = the texture of its rectangle: stripes across, stripes down, checks, ... of
    the same mean grey), ``x_test``/``y_test``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    # Every texture has the same mean grey: stripes across, stripes down, a checkerboard, ... (2 px bands)
    patterns = [(yy // 2) % 2, (xx // 2) % 2, (yy // 2 + xx // 2) % 2, ((yy + xx) // 2) % 2, ((yy - xx) // 2) % 2]
    textures = [np.full((size, size), 40.0)] + [np.where(patterns[(c - 1) % 5] == 0, 220.0, 120.0)
                                                for c in range(1, classes)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((n, size, size), np.uint8)
        y = np.zeros((n, size, size), np.uint8)
        for i in range(n):
            img, m = textures[0].copy(), np.zeros((size, size), np.uint8)
            for _ in range(2):
                c = int(rng.integers(1, classes))
                h, w = rng.integers(size // 4, size // 2 + 1, size=2)
                y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                img[y0:y0 + h, x0:x0 + w] = textures[c][y0:y0 + h, x0:x0 + w]
                m[y0:y0 + h, x0:x0 + w] = c
            x[i] = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            y[i] = m
        return x, y

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return Path(path)


def dense_teacher_tokens(img: np.ndarray, params: np.ndarray, size: int, grid: tuple[int, int], dim: int,
                         mask: np.ndarray | None = None, classes: int = 0, seed: int = 1) -> np.ndarray:
    """The fake dense teacher: V x T x dim tokens of an image's views (T = grid cells, row-major). From the
    mask (when given): each token is the share of each class in its cell, embedded by a fixed random map
    (so it encodes the class of its patch), plus a little of the pixels; else tanh of a random projection
    of the cell's pixels."""
    from tcskd.views import apply_mask_view

    gh, gw = grid
    t = to_tensor(img if img.ndim == 3 else img[:, :, None])
    views = torch.stack([apply_view(t, p, size) for p in params])        # V x C x S x S
    cells = views.unfold(2, size // gh, size // gh).unfold(3, size // gw, size // gw)  # V x C x gh x gw x ph x pw
    pix = cells.permute(0, 2, 3, 1, 4, 5).reshape(len(params), gh * gw, -1).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(pix.shape[-1], dim)) / np.sqrt(pix.shape[-1]) * 3
    tokens = np.tanh((pix - 0.5) @ r)
    if mask is None:
        return tokens
    emb = rng.normal(size=(classes, dim)) * 2
    out = []
    for p in params:
        m = apply_mask_view(torch.from_numpy(np.ascontiguousarray(mask)), p, size).long()
        onehot = torch.nn.functional.one_hot(m.clamp(max=classes - 1), classes).permute(2, 0, 1).float()
        share = torch.nn.functional.adaptive_avg_pool2d(onehot[None], (gh, gw))[0]   # classes x gh x gw
        out.append(share.flatten(1).T.numpy() @ emb)
    return np.stack(out) + 0.1 * tokens


def make_dense_cache(root: Path, npz: Path, grid: tuple[int, int] = (4, 4), dim: int = 16, k: int = 8,
                     views: int = 1, coords_of: str | None = None, teacher_size: int = 16, chunk_rows: int = 16,
                     name: str = "dense", from_masks: bool = False, view_seed: int = 0,
                     random_basis: bool = False, fmt: str = "zarr") -> Path:
    """A patch cache (tokens N x V x T x dim, or its first ``k`` PCA coordinates with ``coords_of``) of the
    npz's train split, with a PCA basis of the tokens (``pca``, or the name ``coords_of``) and optionally a
    random orthonormal one (``rand``)."""
    from tcskd.store.layout import create_store
    from tcskd.store.manifest import Manifest
    from tcskd.store.registry import cache_key

    z = np.load(npz)
    x, y = z["x"], z["y"]
    n, h, w = len(x), x.shape[1], x.shape[2]
    seg = y.ndim == 3
    classes = int(y.max()) + 1
    params = np.stack([view_params(i, h, w, views, view_seed) for i in range(n)]).astype(np.float32)
    feats = np.stack([dense_teacher_tokens(x[i], params[i], teacher_size, grid, dim,
                                           y[i] if from_masks and seg else None, classes) for i in range(n)])
    f16 = feats.astype(np.float16).astype(np.float64)
    tok = f16[:, 0].reshape(-1, dim)
    mean = tok.mean(0)
    _, sv, vt = np.linalg.svd(tok - mean, full_matrices=False)
    eig = sv ** 2 / max(1, len(tok) - 1)
    basis_name = coords_of or "pca"
    stored = ((f16 - mean) @ vt[:k].T) if coords_of else f16
    labels = np.full(n, -1, np.int64) if seg else y.astype(np.int64)
    identity = {"test": f"dense-{name}", "data": {"spec": f"npz:{npz}"}, "teacher": {"spec": "fake-dense"},
                "split": "train", "views": views, "grid": list(grid), "coords_of": coords_of, "k": k}
    manifest = Manifest.new(key=cache_key(identity), identity=identity, data_spec=f"npz:{npz}", split="train",
                            teacher_spec="fake-dense", n_rows=n, views=views, dim=int(stored.shape[-1]),
                            dtype="float16", chunk_rows=chunk_rows, num_classes=classes,
                            channels=1 if x.ndim == 3 else x.shape[3], image_size=teacher_size, tokens="patch",
                            grid=list(grid), patch=teacher_size / grid[0], teacher_dim=dim, coords_of=coords_of,
                            complete=False, skipped=[], dense_chunks=True)
    path = Path(root) / name
    store = create_store(path, manifest, fmt)
    try:
        store["features"][...] = stored.astype(np.float16)
        store["labels"][...] = labels
        store["sample_index"][...] = np.arange(n)
        store["view_params"][...] = params
        store["row_ok"][...] = np.ones(n, bool)
        store["chunk_done"][...] = np.ones(manifest.n_chunks, bool)
        _write_basis(store, basis_name, "pca", mean, vt[:k], eig[:k], np.cumsum(eig)[:k] / eig.sum(), None)
        if random_basis:
            q = np.linalg.qr(np.random.default_rng(5).normal(size=(dim, k)))[0].T
            var = np.var((tok - mean) @ q.T, axis=0, ddof=1)
            _write_basis(store, "rand", "random", mean, q, var, np.cumsum(var) / eig.sum(), None)
        store.set_attrs({"complete": True})
        store.flush()
    finally:
        store.close()
    return path
