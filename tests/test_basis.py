"""Stage 2 (basis): streaming moments, PCA / random / identity bases, atomic writes, the command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _stores import low_rank_features, make_feature_cache, write_cache
from tcskd.errors import StoreError, TcskdError
from tcskd.store import bases as store_bases
from tcskd.store.backends import open_store
from tcskd.store.bases import Basis, load_basis
from tcskd.subspace import fit as fit_mod
from tcskd.subspace.commands import basis as basis_cmd
from tcskd.subspace.fit import BasisConfig, fit_basis, random_rotation
from tcskd.store.moments import Moments, stream_moments

FORMATS = ("zarr", "hdf5")
#: A global cache, and a patch cache holding the same samples as T tokens per row (tcskd cache --tokens patch):
#: every token is a sample, so both give the same basis.
LAYOUTS = ("global", "patch")
T = 4


def _as_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """[n, V, D] samples -> themselves (global) or [n / T, V, T, D] rows of T tokens (row r: samples rT..rT+T-1)."""
    if layout == "global":
        return x
    n, v, d = x.shape
    return np.ascontiguousarray(x.reshape(n // T, T, v, d).transpose(0, 2, 1, 3))


def _load(path: Path, name: str) -> Basis:
    with open_store(path) as s:
        return load_basis(s, name)


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy: mean, eigenvalues (n-1), components (rows) of x [n, D] in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, s ** 2 / (len(x) - 1), vt


def _fit(path: Path, **kw) -> dict:
    """A fit on every row (``--include-val``) unless ``kw`` says otherwise: these tests compare the fit with
    references over every row; the holdout's own tests (below) fit with the default."""
    return fit_basis(BasisConfig(cache=str(path), device="cpu", **{"exclude_val": False, **kw}))


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    return low_rank_features(n=600, d=48, rank=6, noise=0.01, views=1, seed=0)


@pytest.mark.parametrize("fmt, layout", [("zarr", "global"), ("hdf5", "global"), ("zarr", "patch")])
def test_pca_matches_numpy_svd(tmp_path, feats, fmt, layout):
    path = make_feature_cache(tmp_path / "c", _as_layout(feats, layout), fmt=fmt, chunk_rows=64)
    summary = _fit(path)
    b = _load(path, "pca")
    mean, eig, vt = _reference(feats[:, 0])

    assert summary["k"] == b.k == 48 and b.kind == "pca" and not b.whiten
    np.testing.assert_allclose(b.mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.eigenvalues, eig, rtol=1e-6)
    cos = np.abs(np.sum(b.components[:6] * vt[:6], axis=1))
    assert (cos > 0.9999).all(), cos
    np.testing.assert_allclose(b.components @ b.components.T, np.eye(48), atol=1e-10)
    # Sign convention: the largest-magnitude entry of every component is positive.
    rows = np.arange(48)
    assert (b.components[rows, np.abs(b.components).argmax(1)] > 0).all()
    r = b.explained_ratio
    assert (np.diff(r) >= -1e-15).all() and r[-1] <= 1.0 + 1e-12 and r[-1] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(r, np.cumsum(eig) / eig.sum(), rtol=1e-6)
    with open_store(path) as st:
        key = st.manifest["key"]
    rows = 600 if layout == "global" else 600 // T
    assert b.attrs["rows_used"] == rows and b.attrs["samples"] == 600
    assert b.attrs["complete"] is True and b.attrs["fit_on"] == key
    x = feats[:, 0].astype(np.float64)
    errs = []
    for k in range(1, 12):
        bk = b.truncate(k)
        errs.append(float(np.mean(np.sum((bk.reconstruct(bk.project(x)) - x) ** 2, axis=1))))
    assert all(a > c for a, c in zip(errs, errs[1:])), errs
    assert errs[5] < 0.05 * errs[0]  # rank 6: the rest is noise
    assert Path(summary["plot"]).is_file() and Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert summary["explained"] == pytest.approx(r[-1])
    assert summary["top_eigenvalues"][0] == pytest.approx(eig[0], rel=1e-6)


@pytest.mark.slow
def test_chunk_size_and_format_invariance(tmp_path, feats):
    ref_path = make_feature_cache(tmp_path / "z64", feats, fmt="zarr", chunk_rows=64)
    _fit(ref_path, dim=12)
    ref = _load(ref_path, "pca")
    variants = [(make_feature_cache(tmp_path / "h50", feats, fmt="hdf5", chunk_rows=50), None),
                (ref_path, 17), (ref_path, 600), (ref_path, 7)]
    for path, rows in variants:
        _fit(path, dim=12, chunk_rows=rows, name=f"pca{rows}")
        b = _load(path, f"pca{rows}")
        np.testing.assert_allclose(b.mean, ref.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.eigenvalues, ref.eigenvalues, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(b.components, ref.components, atol=1e-8)
        np.testing.assert_allclose(b.explained_ratio, ref.explained_ratio, rtol=1e-10)


def test_float16_store_accumulates_in_float64(tmp_path, feats):
    x16 = feats.astype(np.float16)
    path = make_feature_cache(tmp_path / "c", x16, fmt="zarr", chunk_rows=100)
    with open_store(path) as s:
        assert s["features"].dtype == np.float16
    _fit(path, dim=6)
    b = _load(path, "pca")
    mean, eig, vt = _reference(x16[:, 0].astype(np.float64))
    np.testing.assert_allclose(b.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(b.eigenvalues, eig[:6], rtol=1e-6)
    assert (np.abs(np.sum(b.components * vt[:6], axis=1)) > 0.9999).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_svd_method_equals_eigh(tmp_path, feats, layout):
    path = make_feature_cache(tmp_path / "c", _as_layout(feats, layout), fmt="zarr")
    _fit(path, dim=10, name="e")
    _fit(path, dim=10, name="s", method="svd")
    e, s = _load(path, "e"), _load(path, "s")
    np.testing.assert_allclose(s.eigenvalues, e.eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(s.components[:6], e.components[:6], atol=1e-8)
    np.testing.assert_allclose(s.explained_ratio, e.explained_ratio, rtol=1e-8)
    assert s.attrs["method"] == "svd"


def test_row_ok_and_all_views(tmp_path):
    x = low_rank_features(n=300, d=16, rank=4, views=3, seed=1)
    ok = np.ones(300, bool)
    ok[[0, 5, 77, 299]] = False
    x[5] = np.nan  # an unreadable row may hold anything: it must be skipped, not checked
    path = make_feature_cache(tmp_path / "c", x, fmt="hdf5", chunk_rows=32, row_ok=ok)
    _fit(path, view="all", name="all")
    _fit(path, view="0", name="v0")
    b_all, b_0 = _load(path, "all"), _load(path, "v0")
    _, eig_all, _ = _reference(x[ok].reshape(-1, 16))
    _, eig_0, _ = _reference(x[ok, 0])
    np.testing.assert_allclose(b_all.eigenvalues, eig_all, rtol=1e-6)
    np.testing.assert_allclose(b_0.eigenvalues, eig_0, rtol=1e-6)
    assert b_all.attrs["rows_used"] == 296 and b_all.attrs["samples"] == 296 * 3
    assert b_all.attrs["view"] == "all" and b_0.attrs["samples"] == 296


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_basis_is_seeded_and_orthonormal(tmp_path, feats, layout):
    path = make_feature_cache(tmp_path / "c", _as_layout(feats, layout), fmt="zarr")
    _fit(path, kind="random", dim=10, seed=3, name="r3")
    _fit(path, kind="random", dim=10, seed=3, name="r3b", chunk_rows=33)
    _fit(path, kind="random", dim=10, seed=4, name="r4")
    r3, r3b, r4 = (_load(path, n) for n in ("r3", "r3b", "r4"))
    assert r3.kind == "random" and r3.k == 10
    np.testing.assert_allclose(r3.components @ r3.components.T, np.eye(10), atol=1e-12)
    np.testing.assert_array_equal(r3.components, r3b.components)
    assert np.abs(r3.components - r4.components).max() > 0.1
    x = feats[:, 0].astype(np.float64)
    var = np.var((x - x.mean(0)) @ r3.components.T, axis=0, ddof=1)
    np.testing.assert_allclose(r3.eigenvalues, var, rtol=1e-6)
    total = np.var(x, axis=0, ddof=1).sum()
    np.testing.assert_allclose(r3.explained_ratio, np.cumsum(var) / total, rtol=1e-6)
    assert r3.attrs["seed"] == 3
    # Nested: a smaller K is the prefix of the larger one.
    np.testing.assert_array_equal(random_rotation(48, 3)[:10].numpy(), r3.components)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_round_trips_features(tmp_path, feats, layout):
    path = make_feature_cache(tmp_path / "c", _as_layout(feats, layout), fmt="hdf5")
    s = _fit(path, kind="identity")
    b = _load(path, "identity")
    assert s["k"] == b.k == 48 and b.kind == "identity"
    np.testing.assert_array_equal(b.components, np.eye(48))
    np.testing.assert_array_equal(b.mean, np.zeros(48))
    x = feats[:, 0].astype(np.float64)
    np.testing.assert_allclose(b.reconstruct(b.project(x)), x, atol=1e-12)
    np.testing.assert_allclose(b.eigenvalues, np.mean(x ** 2, axis=0), rtol=1e-10)
    assert b.explained_ratio[-1] == pytest.approx(1.0)
    with pytest.raises(TcskdError, match="identity"):
        _fit(path, kind="identity", dim=10)


@pytest.mark.slow
def test_energy_chooses_fewest_components(tmp_path, feats):
    path = make_feature_cache(tmp_path / "c", feats, fmt="zarr")
    _, eig, _ = _reference(feats[:, 0])
    ratio = np.cumsum(eig) / eig.sum()
    for energy in (0.5, 0.9, 0.999, 1.0):
        s = _fit(path, energy=energy, name="e")
        expected = int(np.argmax(ratio >= energy - 1e-12)) + 1
        assert s["k"] == expected, (energy, s["k"], expected)
        assert s["explained"] >= energy - 1e-9
        if expected > 1:
            assert ratio[expected - 2] < energy


@pytest.mark.parametrize("whiten, layout", [(False, "global"), (True, "global"), (False, "patch")])
def test_coords_equal_projection(tmp_path, whiten, layout):
    x = _as_layout(low_rank_features(n=400, d=24, rank=5, views=2, seed=2, offset=0.5), layout)
    n = len(x)
    ok = np.ones(n, bool)
    ok[[3, n * 3 // 4]] = False
    path = make_feature_cache(tmp_path / "c", x, fmt="zarr", chunk_rows=48, row_ok=ok)
    _fit(path, dim=8, coords=True, whiten=whiten, chunk_rows=30)
    b = _load(path, "pca-whiten" if whiten else "pca")
    assert b.whiten is whiten
    with open_store(path) as s:
        coords = s.read(f"bases/{b.name}/coords")
        assert s[f"bases/{b.name}/coords"].chunks == (48, *x.shape[1:-1], 8)
    assert coords.shape == (n, *x.shape[1:-1], 8) and coords.dtype == np.float16
    expected = b.project(x.astype(np.float64))
    expected[~ok] = 0
    np.testing.assert_allclose(coords.astype(np.float64), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_array_equal(coords[~ok], 0)


def test_fit_on_other_cache(tmp_path, feats):
    a = make_feature_cache(tmp_path / "a", feats, fmt="zarr")
    other = low_rank_features(n=100, d=48, rank=3, seed=9)
    b = make_feature_cache(tmp_path / "b", other, fmt="hdf5")
    with open_store(a) as st:
        key_a = st.manifest["key"]
    s = fit_basis(BasisConfig(cache="b", fit_on="a", dim=6, cache_root=str(tmp_path), device="cpu", coords=True,
                              exclude_val=False))
    name = f"pca-fit-{key_a[:8]}"
    assert s["name"] == name
    on_b = _load(b, name)
    assert on_b.attrs["fit_on"] == key_a
    _fit(a, dim=6)
    own = _load(a, "pca")
    np.testing.assert_allclose(on_b.components, own.components, atol=1e-10)
    np.testing.assert_allclose(on_b.eigenvalues, own.eigenvalues, rtol=1e-10)
    with open_store(b) as st:
        assert st.read(f"bases/{name}/coords").shape == (100, 1, 6)
    assert (tmp_path / "b" / f"basis-{name}.png").is_file()

    small = make_feature_cache(tmp_path / "small", low_rank_features(n=50, d=16, rank=2), fmt="zarr")
    with pytest.raises(StoreError, match="16-dimensional"):
        _fit(b, fit_on=str(small), name="bad")
    with open_store(b) as st:
        assert "bad" not in st.bases()


def test_half_written_basis_is_invisible_and_cleaned(tmp_path, feats, monkeypatch):
    path = make_feature_cache(tmp_path / "c", feats, fmt="zarr")
    _fit(path, dim=4)
    old = _load(path, "pca")

    def crash(*args, **kw):
        raise RuntimeError("killed")

    # A hard kill: nothing after the arrays runs, not even the in-process cleanup.
    monkeypatch.setattr(store_bases, "publish_group", crash)
    monkeypatch.setattr(store_bases, "discard_group", lambda store, tmp: None)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(path, dim=8)
    with open_store(path) as s:
        assert s.bases() == ["pca"]
        leftovers = [c for c in s.children("bases") if c.startswith(".tmp-")]
        assert len(leftovers) == 1
        assert f"bases/{leftovers[0]}/components" in s
    assert _load(path, "pca").k == 4  # the old basis is untouched
    np.testing.assert_array_equal(_load(path, "pca").components, old.components)

    monkeypatch.undo()
    _fit(path, dim=8)
    with open_store(path) as s:
        assert s.children("bases") == ["pca"] and s.bases() == ["pca"]
    assert _load(path, "pca").k == 8


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_inside_writer_leaves_nothing(tmp_path, feats, monkeypatch, fmt):
    path = make_feature_cache(tmp_path / "c", feats, fmt=fmt)

    def crash(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fit_mod, "write_coords", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _fit(path, dim=4, coords=True)
    with open_store(path) as s:
        assert s.bases() == [] and s.children("bases") == []


def test_edited_manifest_refused(tmp_path, feats):
    path = make_feature_cache(tmp_path / "c", feats, fmt="zarr")
    with open_store(path, "a") as st:
        st.set_attrs({"teacher_spec": "someone-else"})
    with pytest.raises(StoreError, match="contradicts its identity"):
        _fit(path)
    with open_store(path) as st:
        assert st.bases() == []


def test_incomplete_cache_refused(tmp_path, feats):
    done = np.ones(10, bool)
    done[3] = False
    path = make_feature_cache(tmp_path / "c", feats, fmt="zarr", chunk_rows=60, chunk_done=done)
    with pytest.raises(StoreError, match=r"incomplete \(9/10 chunks done\)"):
        _fit(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_features_refused_naming_the_chunk(tmp_path, feats, fmt):
    x = feats.copy()
    x[130, 0, 7] = np.inf
    path = make_feature_cache(tmp_path / "c", x, fmt=fmt, chunk_rows=64)
    with pytest.raises(StoreError, match=r"chunk 2 \(rows 128-191\).*NaN/Inf.*row 130"):
        _fit(path)
    with open_store(path) as s:
        assert s.bases() == [] and s.children("bases") == []


@pytest.mark.parametrize("row, view, chunk", [(0, 0, r"chunk 0 \(rows 0-63\)"), (599, 1, r"chunk 9 \(rows 576-599\)")])
def test_nan_in_the_first_or_last_sample_is_named(tmp_path, row, view, chunk):
    # The sums are checked once at the end; the first sample is also the shift of the sums.
    x = low_rank_features(n=600, d=16, rank=4, views=2, seed=2)
    x[row, view, 3] = np.nan
    path = make_feature_cache(tmp_path / "c", x, chunk_rows=64)
    with pytest.raises(StoreError, match=chunk + rf".*NaN/Inf.*row {row}, view {view}"):
        _fit(path, view="all")


def test_shift_of_the_first_sample_matches_an_explicit_shift(feats):
    x = feats[:, 0]
    lazy, fixed = Moments(48, shift="first"), Moments(48, shift=x[0].astype(np.float64))
    for part in (x[:7], x[7:300], x[300:]):
        lazy.update(part)
        fixed.update(part)
    assert torch.equal(lazy.shift, fixed.shift) and torch.equal(lazy.aug, fixed.aug)
    fixed.merge(lazy)  # same shift: mergeable
    assert fixed.n == 1200
    with pytest.raises(ValueError, match="unknown shift"):
        Moments(48, shift="last")


def test_config_validation(tmp_path, feats):
    path = make_feature_cache(tmp_path / "c", feats, fmt="zarr")
    with pytest.raises(TcskdError, match="not both"):
        _fit(path, dim=3, energy=0.5)
    with pytest.raises(TcskdError, match=r"\(0, 1\]"):
        _fit(path, energy=1.5)
    with pytest.raises(TcskdError, match="exceeds the feature dimension 48"):
        _fit(path, dim=49)
    with pytest.raises(TcskdError, match="invalid basis name"):
        _fit(path, name=".hidden")
    with pytest.raises(StoreError, match="no cache"):
        _fit(tmp_path / "missing")


def test_moments_merge_and_state(feats):
    x = feats[:, 0]
    shift = x[0].astype(np.float64)
    whole = Moments(48, shift=shift)
    whole.update(x)
    a, b = Moments(48, shift=shift), Moments(48, shift=shift)
    a.update(x[:250])
    b.update(x[250:])
    a.merge(b)
    assert a.n == 600
    np.testing.assert_allclose(a.covariance().numpy(), whole.covariance().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.mean().numpy(), x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.covariance().numpy(), np.cov(x.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(a.second_moment().numpy(), np.mean(x.astype(np.float64) ** 2, 0), rtol=1e-12)
    c = Moments(48, shift=shift)
    c.load_state({k: v.clone() for k, v in a.state().items()})
    assert torch.equal(c.outer, a.outer) and c.n == 600
    with pytest.raises(ValueError, match="shift"):
        a.merge(Moments(48))


def test_stream_moments_directly(tmp_path, feats):
    path = make_feature_cache(tmp_path / "c", feats, fmt="hdf5", chunk_rows=64)
    with open_store(path) as s:
        m = stream_moments(s, view="0", device="cpu", chunk_rows=100)
    np.testing.assert_allclose(m.covariance().numpy(), np.cov(feats[:, 0].astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-13)


def test_cli_command(tmp_path):
    x = low_rank_features(n=80, d=12, rank=3, seed=5)
    make_feature_cache(tmp_path / "k0123456789abcde", x, fmt="zarr", chunk_rows=16)
    runner = CliRunner()
    res = runner.invoke(basis_cmd, ["--cache", "k0123", "--cache-root", str(tmp_path), "--dim", "3",
                                    "--device", "cpu", "--coords"])
    assert res.exit_code == 0, res.output
    assert "K = 3 of D = 12" in res.output and "variance explained at K" in res.output
    assert "top eigenvalues" in res.output and "basis-pca.png" in res.output
    assert (tmp_path / "k0123456789abcde" / "basis-pca.png").is_file()
    b = _load(tmp_path / "k0123456789abcde", "pca")
    assert b.k == 3
    bad = runner.invoke(basis_cmd, ["--cache", str(tmp_path / "k0123456789abcde"), "--dim", "2",
                                    "--energy", "0.5", "--device", "cpu"])
    assert bad.exit_code != 0 and isinstance(bad.exception, TcskdError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, feats):
    path = make_feature_cache(tmp_path / "c", feats.astype(np.float16), fmt="hdf5", chunk_rows=64)
    for kind in ("pca", "random", "identity"):
        for device in ("cpu", "cuda"):
            fit_basis(BasisConfig(cache=str(path), kind=kind, device=device, coords=True,
                                  dim=None if kind == "identity" else 10, name=f"{kind}-{device}"))
        cpu, gpu = _load(path, f"{kind}-cpu"), _load(path, f"{kind}-cuda")
        np.testing.assert_allclose(gpu.mean, cpu.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-8)
        np.testing.assert_allclose(gpu.components[:6], cpu.components[:6], atol=1e-7)
        with open_store(path) as s:
            c_cpu = s.read(f"bases/{kind}-cpu/coords").astype(np.float32)
            c_gpu = s.read(f"bases/{kind}-cuda/coords").astype(np.float32)
        np.testing.assert_allclose(c_gpu[..., :6], c_cpu[..., :6], rtol=2e-3, atol=2e-3 * np.abs(c_cpu).max())
    _fit_svd = fit_basis(BasisConfig(cache=str(path), device="cuda", method="svd", dim=10, name="svd-cuda"))
    assert _fit_svd["k"] == 10
    np.testing.assert_allclose(_load(path, "svd-cuda").eigenvalues, _load(path, "pca-cpu").eigenvalues, rtol=1e-8)


def test_a_coordinates_cache_is_refused(tmp_path, feats):
    """A ``tcskd cache --dim K`` cache holds coordinates of its basis, not features: no basis is fitted on them."""
    x = _as_layout(feats, "patch")[..., :6]
    eye = np.eye(6, 48)

    def basis(store):
        arrays = {"mean": np.zeros(48), "components": eye, "eigenvalues": np.ones(6), "explained_ratio": np.ones(6)}
        store_bases.write_basis(store, "pca", arrays, {"kind": "pca"})

    path = write_cache(tmp_path / "c", x, coords_of="pca", teacher_dim=48, bases=basis)
    with pytest.raises(TcskdError, match=r"already holds coordinates of basis 'pca' \(built with tcskd cache --dim 6\)"):
        _fit(path, dim=2)
    raw = make_feature_cache(tmp_path / "raw", _as_layout(feats, "patch"))
    glob = make_feature_cache(tmp_path / "glob", feats)
    with pytest.raises(TcskdError, match="holds global features but cache .* holds patch tokens"):
        fit_basis(BasisConfig(cache=str(raw), fit_on=str(glob), device="cpu"))
