"""No validation row reaches a basis under default options.

The validation rows are the ones training holds out with its default options (``TrainConfig``'s
``val_frac`` / ``val_per_class`` / ``val_seed``, the rule of tcskd.train.inputs.open_train_rows); a basis
fitted with defaults (``tcskd basis``, the ``--dim K`` token basis of ``tcskd cache``) must equal the fit on
the other rows only, record those rows as training checks them (``_basis_excludes_val``), and every shipped
recipe must hold a nonzero validation share out of its runs and of its bases.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from _stores import low_rank_features, map_teacher, write_cache
from conftest import make_npz
from tcskd.cache.build import CacheConfig, build_cache, plan_cache
from tcskd.recipe import load_recipe
from tcskd.splits import Holdout, rows_digest
from tcskd.store.backends import open_store
from tcskd.store.bases import load_basis
from tcskd.store.handle import open_cache
from tcskd.subspace.commands import basis as basis_cmd
from tcskd.subspace.fit import BasisConfig, fit_basis
from tcskd.train.config import TrainConfig
from tcskd.train.inputs import _basis_excludes_val

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
_PATHS = {"cache.data": "builtin:mnist5k", "cache.teacher": "builtin:efficientnet-lite0"}


def _training_val(labels: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """The rows a training run with default options holds out (as tcskd.train.inputs.open_train_rows)."""
    t = TrainConfig()
    return Holdout(t.val_frac, t.val_per_class, t.val_seed).mask(labels, sample_index)


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy: mean, eigenvalues (n - 1), principal directions (rows) of samples x [n, D]."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, s ** 2 / (len(x) - 1), vt


def _same_basis(basis, mean, evals, comps, k: int, rtol: float = 1e-7) -> None:
    np.testing.assert_allclose(basis.mean, mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(basis.eigenvalues, evals[:k], rtol=rtol * 10)
    np.testing.assert_allclose(np.abs((basis.components * comps[:k]).sum(1)), 1.0, atol=rtol * 10)


# -- tcskd basis ---------------------------------------------------------------------

N, D, K = 240, 16, 4


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """A train-split cache of 240 rows in 4 classes whose sample_index is not the row order."""
    x = low_rank_features(n=N, d=D, rank=5, noise=0.05, seed=3)[:, 0]
    labels = np.random.default_rng(1).integers(0, 4, N)
    sample_index = np.random.default_rng(2).permutation(N) * 3 + 7
    path = write_cache(tmp_path_factory.mktemp("b") / "cache", x, labels=labels, sample_index=sample_index,
                       chunk_rows=50)
    return path, x, labels, sample_index


def test_the_default_basis_is_the_fit_on_the_rows_training_does_not_hold_out(labelled):
    path, x, labels, sample_index = labelled
    val = _training_val(labels, sample_index)
    assert 0 < val.sum() < N
    s = fit_basis(BasisConfig(cache=str(path), dim=K, device="cpu", plot=False))
    b = load_basis(open_store(path), "pca")
    mean, evals, comps = _pca(x[~val])
    _same_basis(b, mean, evals, comps, K)
    assert not np.allclose(b.mean, x.mean(0), rtol=1e-7, atol=1e-7)  # not the fit on every row
    assert s["rows_used"] == N - val.sum() and b.attrs["held_out_count"] == val.sum()
    assert b.attrs["exclude_val"] is True and b.attrs["config"]["exclude_val"] is True
    assert b.attrs["holdout"] == {"val_frac": 0.1, "val_per_class": None, "val_seed": 0}
    assert b.attrs["held_out_rows"] == rows_digest(sample_index[val])
    assert _basis_excludes_val(b, val, sample_index) is True  # what a training run records


def test_include_val_fits_every_row_and_exclude_val_is_the_default(labelled, tmp_path):
    path, x, labels, sample_index = labelled
    runner = CliRunner()
    for flag, name in (("--include-val", "inc"), ("--exclude-val", "exc")):
        res = runner.invoke(basis_cmd, ["--cache", str(path), "--dim", str(K), "--device", "cpu", "--no-plot",
                                        "--name", name, flag])
        assert res.exit_code == 0, res.output
    with open_store(path) as s:
        inc, exc = load_basis(s, "inc"), load_basis(s, "exc")
    mean, evals, comps = _pca(x)
    _same_basis(inc, mean, evals, comps, K)
    assert inc.attrs["exclude_val"] is False and inc.attrs["holdout"] is None and inc.attrs["held_out_rows"] is None
    assert inc.attrs["held_out_count"] == 0 and inc.attrs["rows_used"] == N
    val = _training_val(labels, sample_index)
    assert _basis_excludes_val(inc, val, sample_index) is False
    mean, evals, comps = _pca(x[~val])  # --exclude-val, the explicit form of the default
    _same_basis(exc, mean, evals, comps, K)
    assert exc.attrs["held_out_rows"] == rows_digest(sample_index[val])


def test_a_test_split_cache_holds_nothing_out_and_says_so(tmp_path, caplog):
    x = low_rank_features(n=60, d=8, rank=3, seed=4)[:, 0]
    labels = np.arange(60) % 3
    path = write_cache(tmp_path / "test-cache", x, labels=labels, split="test")
    with caplog.at_level(logging.INFO, logger="tcskd.subspace.fit"):
        s = fit_basis(BasisConfig(cache=str(path), dim=3, device="cpu", plot=False))
    assert any("holds split 'test', not train" in r.getMessage() for r in caplog.records)
    b = load_basis(open_store(path), "pca")
    mean, evals, comps = _pca(x)
    _same_basis(b, mean, evals, comps, 3)
    assert s["rows_used"] == 60 and b.attrs["held_out_count"] == 0
    assert b.attrs["exclude_val"] is True and b.attrs["holdout"] is None and b.attrs["held_out_rows"] is None


# -- tcskd cache --tokens patch --dim K ------------------------------------------------

def _cfg(data: str, teacher: str, root: Path, **kw) -> CacheConfig:
    base = dict(data=data, teacher=teacher, image_size=16, cache_root=str(root), device="cpu", chunk_rows=16,
                batch_size=30, tokens="patch", dtype="float32", workers=0)
    return CacheConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dense")
    data = make_npz(root / "d.npz", n=60, classes=3)  # 20 rows per class: 2 of each held out
    teacher = map_teacher(root / "teacher")
    raw = build_cache(_cfg(data, teacher, root / "c"))
    coords = build_cache(_cfg(data, teacher, root / "c", dim=3, basis_sample=1000))
    return {"data": data, "teacher": teacher, "root": root, "raw": raw.path, "coords": coords.path}


def test_the_dim_k_sample_basis_leaves_the_training_validation_rows_out(dense):
    with open_cache(dense["raw"]) as c:
        tokens, labels, sample_index = c.features(None), c.labels(), c.sample_index()
    val = _training_val(labels, sample_index)
    assert val.sum() == 6
    with open_cache(dense["coords"]) as c:
        b = c.basis("pca")
    mean, evals, comps = _pca(tokens[~val].reshape(-1, tokens.shape[-1]))
    _same_basis(b, mean, evals, comps, 3, rtol=1e-5)
    assert not np.allclose(b.mean, tokens.reshape(-1, tokens.shape[-1]).mean(0), rtol=1e-5, atol=1e-5)
    assert b.attrs["sample_images"] == 60 - 6 and b.attrs["held_out_count"] == 6 and b.attrs["exclude_val"]
    assert b.attrs["held_out_rows"] == rows_digest(sample_index[val])
    assert _basis_excludes_val(b, val, sample_index) is True
    # stage 2 on the raw tokens, with its defaults, leaves the same rows out and finds the same basis
    fit_basis(BasisConfig(cache=str(dense["raw"]), dim=3, device="cpu", plot=False))
    with open_cache(dense["raw"]) as c:
        fitted = c.basis("pca")
    assert fitted.attrs["held_out_rows"] == b.attrs["held_out_rows"]
    _same_basis(fitted, b.mean, b.eigenvalues, b.components, 3, rtol=1e-5)


def test_the_holdout_is_in_the_key_only_where_it_leaves_rows_out(dense):
    data, teacher, root = dense["data"], dense["teacher"], dense["root"] / "c"
    _, default, key, _ = plan_cache(_cfg(data, teacher, root, dim=3, basis_sample=1000))
    assert key == dense["coords"].name
    assert default["coords"]["holdout"] == {"val_frac": 0.1, "val_per_class": None, "val_seed": 0,
                                            "rule": "exclude-val-1"}
    before = {"basis": "pca", "dim": 3, "sample": 1000, "seed": 0}  # a --dim cache's identity before the default
    _, inc, inc_key, _ = plan_cache(_cfg(data, teacher, root, dim=3, basis_sample=1000, exclude_val=False))
    _, test, _, _ = plan_cache(_cfg(data, teacher, root, dim=3, basis_sample=1000, split="test"))
    _, empty, _, _ = plan_cache(_cfg(data, teacher, root, dim=3, basis_sample=1000, val_frac=0.0))
    assert inc["coords"] == before and test["coords"] == before and empty["coords"] == before
    assert inc_key != key
    _, other, other_key, _ = plan_cache(_cfg(data, teacher, root, dim=3, basis_sample=1000, val_per_class=5))
    assert other["coords"]["holdout"]["val_per_class"] == 5 and other_key != key
    # the options change nothing of a cache without --dim
    raw_keys = {plan_cache(_cfg(data, teacher, root, **kw))[2] for kw in ({}, {"exclude_val": False},
                                                                          {"val_per_class": 5})}
    assert raw_keys == {dense["raw"].name}


def test_include_val_draws_the_dim_k_sample_from_every_row(dense, tmp_path):
    with open_cache(dense["raw"]) as c:
        tokens = c.features(None)
    res = build_cache(_cfg(dense["data"], dense["teacher"], tmp_path, dim=3, basis_sample=1000,
                           exclude_val=False))
    with open_cache(res.path) as c:
        b = c.basis("pca")
    mean, evals, comps = _pca(tokens.reshape(-1, tokens.shape[-1]))
    _same_basis(b, mean, evals, comps, 3, rtol=1e-5)
    assert b.attrs["exclude_val"] is False and b.attrs["held_out_rows"] is None and b.attrs["sample_images"] == 60


# -- the shipped recipes ------------------------------------------------------------------

def _holdout(cfg) -> Holdout:
    return Holdout(cfg.val_frac, cfg.val_per_class, cfg.val_seed)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_holds_validation_out_of_its_runs_and_bases(name):
    plan = load_recipe(RECIPES / name, _PATHS)
    rules = {_holdout(run) for run in plan.runs.values()}
    assert len(rules) == 1 and not next(iter(rules)).empty, rules
    rule = next(iter(rules))
    assert plan.bases
    for basis in plan.bases.values():  # each basis leaves out exactly the rows the runs hold out
        assert basis.exclude_val and basis.holdout() == rule
    cache = plan.caches["train"]
    if cache.dim is not None:
        assert cache.exclude_val and _holdout(cache) == rule
    text = (RECIPES / name).read_text()
    assert "chosen on" in text, "say which settings were chosen on which data"


def test_a_recipe_basis_and_dim_cache_take_over_the_runs_holdout(tmp_path):
    import yaml

    recipe = {"out": str(tmp_path / "out"),
              "cache": {"data": "builtin:mnist5k", "teacher": "builtin:efficientnet-lite0", "tokens": "patch",
                        "dim": 8},
              "basis": {"pca": {"dim": 4}, "all": {"dim": 4, "exclude_val": False}},
              "train": {"val_per_class": 7, "val_seed": 3}, "grid": {"seed": [0]}, "eval": False}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = load_recipe(path)
    want = Holdout(0.1, 7, 3)
    assert plan.bases["pca"].holdout() == want and plan.bases["all"].holdout() is None
    assert _holdout(plan.caches["train"]) == want and plan.caches["train"].exclude_val
