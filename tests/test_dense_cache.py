"""Dense caches (``tcskd cache --tokens patch [--dim K]``): token grids, their manifest, the sample basis and
the coordinates, ``--basis-from``, bytes per image, bad input. The cache/store/kill/verify/distributed suites
run their dense variants through their own parametrisations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tcskd.cache.build import CacheConfig, build_cache, plan_cache
from tcskd.cache.dense import sample_rows
from tcskd.cache.verify import verify_cache
from tcskd.data import open_source
from tcskd.errors import TcskdError
from tcskd.store.handle import open_cache
from tcskd.store.layout import bytes_per_image
from tcskd.teachers import load_teacher
from tcskd.views import teacher_views
from _stores import map_teacher
from conftest import make_npz


def _cfg(data: str, teacher: str, root: Path, **kw) -> CacheConfig:
    base = dict(data=data, teacher=teacher, image_size=16, cache_root=str(root), device="cpu", chunk_rows=8,
                batch_size=4, tokens="patch")
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory) -> str:
    return map_teacher(tmp_path_factory.mktemp("dense-teacher"))


def _tokens_of(teacher_spec: str, data: str, split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every row's and view's tokens (N x V x T x D) recomputed from the stored view parameters, and row_ok."""
    with open_cache(path) as c:
        params, idx, m = c.view_params(), c.sample_index(), c.manifest
    t = load_teacher(teacher_spec, int(m.image_size))
    src = open_source(data, split)
    pos = {int(i): r for r, i in enumerate(src.indices)}
    out = []
    for r in range(len(idx)):
        x = teacher_views(src.image(pos[int(idx[r])]), params[r], t.image_size)
        with torch.inference_mode():
            out.append(t.token_map(x).flatten(2).transpose(1, 2).numpy())
    return np.stack(out), m


@pytest.mark.parametrize("views", [1, 2])
def test_raw_patch_cache_holds_every_token_of_every_view(tmp_path, dense_teacher, views):
    data = make_npz(tmp_path / "d.npz", n=20)
    res = build_cache(_cfg(data, dense_teacher, tmp_path / "c", views=views, dtype="float32"))
    want, m = _tokens_of(dense_teacher, data, "train", res.path)
    with open_cache(res.path) as c:
        got = c.features(None)
        assert c.dense and c.grid == (4, 4) and c.dim == 8
    assert m.tokens == "patch" and m.grid == [4, 4] and m.patch == 4.0 and m.teacher_dim == 8 and m.dim == 8
    assert m.coords_of is None and m.identity["tokens"] == "patch"
    assert got.shape == (20, views, 16, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert verify_cache(res.path, recompute=3).ok


def test_tokens_are_part_of_the_key_and_global_keys_do_not_change(tmp_path, dense_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    g = _cfg(data, dense_teacher, tmp_path, tokens="global")
    keys = {plan_cache(c)[2] for c in (g, _cfg(data, dense_teacher, tmp_path), _cfg(data, dense_teacher, tmp_path,
                                                                                   dim=4))}
    assert len(keys) == 3
    _, ident, _, _ = plan_cache(g)
    assert not {"tokens", "grid", "coords", "token_map"} & set(ident)  # a global cache's identity as before


def test_global_cache_of_a_map_teacher_is_the_mean_token(tmp_path, dense_teacher):
    data = make_npz(tmp_path / "d.npz", n=12)
    g = build_cache(_cfg(data, dense_teacher, tmp_path / "c", tokens="global", dtype="float32"))
    p = build_cache(_cfg(data, dense_teacher, tmp_path / "c", dtype="float32"))
    with open_cache(g.path) as cg, open_cache(p.path) as cp:
        np.testing.assert_allclose(cg.features(None), cp.features(None).mean(2), rtol=1e-5, atol=1e-6)


def test_bytes_per_image():
    assert bytes_per_image(1280, 7 * 7, "float16") == 7 * 7 * 1280 * 2
    assert bytes_per_image(64, 256, "float16", views=2) == 2 * 256 * 64 * 2
    assert bytes_per_image(768, 1, "float32") == 768 * 4


def _cli(args: list[str]):
    """The command line in this process: (exit code, stderr lines that are not Python warnings)."""
    from click.testing import CliRunner

    from tcskd.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    return r.exit_code, lines


def test_a_teacher_without_tokens_is_one_line(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    code, lines = _cli(["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--tokens", "patch",
                        "--cache-root", str(tmp_path / "c")])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("tcskd: error: "), lines
    assert f"teacher {tiny_teacher} gives no token grid" in lines[0]
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# -- --dim K: the sample basis, then coordinates only ------------------------------------

def _pca(tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy reference: mean, first k principal directions (rows, largest entry positive), eigenvalues."""
    x = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
    comps = evecs[:, ::-1].T[:k]
    comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
    return mean, comps, evals[::-1][:k]


@pytest.mark.parametrize("sample", [100, 7])
def test_dim_k_stores_the_coordinates_of_a_sample_basis(tmp_path, dense_teacher, sample):
    data = make_npz(tmp_path / "d.npz", n=20)
    raw = build_cache(_cfg(data, dense_teacher, tmp_path / "c", views=2, dtype="float32", seed=5))
    written = []
    import tcskd.cache.build as build

    real = build._write_chunk

    def spy(store, c, *a):  # the basis is in the store before any chunk
        written.append((c, "pca" in store.bases()))
        return real(store, c, *a)

    build._write_chunk = spy
    try:
        res = build_cache(_cfg(data, dense_teacher, tmp_path / "c", views=2, dim=3, basis_sample=sample, seed=5))
    finally:
        build._write_chunk = real
    assert written and all(has for _, has in written)
    with open_cache(raw.path) as c:
        tokens = c.features(None)
    rows = sample_rows(20, sample, 5)
    assert len(rows) == min(20, sample) and (sample > 20 or len(set(rows)) == sample)
    mean, comps, evals = _pca(tokens[rows], 3)  # every token of every view of the sampled images
    with open_cache(res.path) as c:
        m, basis, coords = c.manifest, c.basis("pca"), c.features(None, dtype=np.float32)
    assert m.coords_of == "pca" and m.dim == 3 and m.teacher_dim == 8 and m.dtype == "float16"
    assert coords.shape == (20, 2, 16, 3) and c.dim == 3
    assert basis.k == 3 and basis.attrs["fitted_on"] == "sample" and basis.attrs["sample_images"] == len(rows)
    assert basis.attrs["samples"] == len(rows) * 2 * 16 and basis.attrs["cache_key"] == m.key
    np.testing.assert_allclose(basis.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(basis.eigenvalues, evals, rtol=1e-5)
    np.testing.assert_allclose(np.abs((basis.components * comps).sum(1)), 1.0, atol=1e-5)
    want = (tokens.astype(np.float64) - mean) @ comps.T
    np.testing.assert_allclose(coords, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert verify_cache(res.path, recompute=3).ok


def test_dim_k_resumes_with_its_stored_basis(tmp_path, dense_teacher, monkeypatch):
    import tcskd.cache.dense as dense
    from tcskd.store.backends import open_store

    data = make_npz(tmp_path / "d.npz", n=30)
    cfg = _cfg(data, dense_teacher, tmp_path / "c", dim=4, basis_sample=10)
    first = build_cache(cfg)
    with open_store(first.path) as s:
        before = s.read("features")
    with open_store(first.path, "a") as s:  # as if killed after the basis and two chunks
        s["chunk_done"][1:] = False
        s.set_attrs({"complete": False})
    monkeypatch.setattr(dense, "_fit_sample_basis", lambda *a: pytest.fail("the basis was fitted again"))
    again = build_cache(cfg)
    assert again.rows_computed == 30 - 8 and not again.hit
    with open_store(first.path) as s:
        assert s.read("features").tobytes() == before.tobytes()
    assert verify_cache(first.path).ok


def test_basis_from_projects_the_test_split_with_the_train_basis(tmp_path, dense_teacher):
    data = make_npz(tmp_path / "d.npz", n=20, n_test=12)
    root = tmp_path / "c"
    train = build_cache(_cfg(data, dense_teacher, root, dim=4, basis_sample=10, dtype="float32"))
    raw = build_cache(_cfg(data, dense_teacher, root, split="test", dtype="float32"))
    test = build_cache(_cfg(data, dense_teacher, root, split="test", dim=3, basis_from=train.path.name,
                            dtype="float32"))
    with open_cache(train.path) as a, open_cache(raw.path) as r, open_cache(test.path) as t:
        src, mine = a.basis("pca"), t.basis("pca")
        assert mine.k == 3 and mine.attrs["basis_from"] == a.manifest.key and t.manifest.dim == 3
        np.testing.assert_array_equal(mine.components, src.components[:3])
        np.testing.assert_allclose(t.features(None), src.truncate(3).project(r.features(None)), rtol=1e-4,
                                   atol=1e-5)
    assert verify_cache(test.path, recompute=2).ok
    other = build_cache(_cfg(data, dense_teacher, root, split="test", dim=3, basis_from=str(train.path),
                             basis_sample=5, dtype="float32"))  # the same cache by path (sample unused): a hit
    assert other.path == test.path and other.hit


def test_basis_from_refuses_a_global_cache_or_another_teacher(tmp_path, dense_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    root = tmp_path / "c"
    glob = build_cache(_cfg(data, dense_teacher, root, tokens="global"))
    with pytest.raises(TcskdError, match="is a global cache .*a dense basis on a global cache"):
        build_cache(_cfg(data, dense_teacher, root, dim=2, basis_from=str(glob.path)))
    other = map_teacher(tmp_path / "other", dim=6)
    theirs = build_cache(_cfg(data, other, root, dim=2))
    with pytest.raises(TcskdError, match="was built by another teacher"):
        build_cache(_cfg(data, dense_teacher, root, dim=2, basis_from=str(theirs.path)))
    raw = build_cache(_cfg(data, dense_teacher, root))
    with pytest.raises(TcskdError, match="has no token basis 'pca'"):
        build_cache(_cfg(data, dense_teacher, root, dim=2, basis_from=str(raw.path)))


@pytest.mark.parametrize("args, says", [
    (["--dim", "4"], "--dim and --basis-from store coordinates of patch tokens: they need --tokens patch"),
    (["--tokens", "patch", "--dim", "99"], "--dim 99 exceeds the width of teacher"),
    (["--tokens", "patch", "--basis-from", "abc"], "--basis-from gives the basis of --dim K coordinates"),
    (["--tokens", "patch", "--dim", "2", "--val-frac", "1"], "--val-frac must be in [0, 1) (got 1.0)"),
    (["--tokens", "patch", "--dim", "2", "--val-per-class", "-1"], "--val-per-class must be >= 0 (got -1)"),
])
def test_bad_dense_options_are_one_line(tmp_path, dense_teacher, args, says):
    data = make_npz(tmp_path / "d.npz", n=8)
    code, lines = _cli(["cache", "--data", data, "--teacher", dense_teacher, "--image-size", "16", *args,
                        "--cache-root", str(tmp_path / "c")])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tcskd: error: ") and says in lines[0], lines


def test_cache_info_shows_bytes_per_image(tmp_path, dense_teacher):
    import json

    data = make_npz(tmp_path / "d.npz", n=8)
    res = build_cache(_cfg(data, dense_teacher, tmp_path / "c", dim=2, views=2))
    from click.testing import CliRunner

    from tcskd.cli import main

    r = CliRunner().invoke(main, ["cache", "info", str(res.path)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["bytes_per_image"] == 2 * 16 * 2 * 2 and info["bytes_per_image_raw"] == 2 * 16 * 8 * 2


@pytest.mark.parametrize("size, grid", [(96, 3)])
def test_image_size_sets_the_grid_of_a_patch_cache(tmp_path, size, grid):
    """--image-size with a patch cache: EfficientNet-Lite0's last map is S/32 tokens a side (448 px: 14 x 14,
    tests/test_dense_teachers.py), each covering 32 teacher pixels; the manifest records both."""
    data = make_npz(tmp_path / "d.npz", n=3, size=12, channels=3)
    res = build_cache(_cfg(data, "builtin:efficientnet-lite0", tmp_path / "c", image_size=size, dtype="float32"))
    want, m = _tokens_of("builtin:efficientnet-lite0", data, "train", res.path)
    assert m.image_size == size and m.grid == [grid, grid] and m.patch == 32.0 and m.teacher_dim == 1280
    with open_cache(res.path) as c:
        got = c.features(None)
    assert got.shape == (3, 1, grid * grid, 1280)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
