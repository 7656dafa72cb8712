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
from tcskd.subspace.moments import Moments
from tcskd.teachers import load_teacher
from tcskd.views import teacher_views
from _stores import map_teacher
from conftest import make_npz, run_cli


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


def test_a_teacher_without_tokens_is_one_line(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    r = run_cli(["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--tokens", "patch",
                 "--cache-root", str(tmp_path / "c")])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1 and lines[0].startswith("tcskd: error: ") and "Traceback" not in r.stderr, r.stderr
    assert f"teacher {tiny_teacher} gives no token grid" in lines[0]
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
