"""The Python API (``import tcskd``): the README's example as it stands, each stage function's typed result,
``open_cache``'s arrays against the store, and an ``import tcskd`` that loads no torch."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

import tcskd
from conftest import make_npz
from tcskd.errors import StoreError
from tcskd.store.backends import open_store

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    text = README.read_text()
    start = text.index("\n## Python API\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], re.S)
    assert blocks, "README: no python block under ## Python API"
    return blocks[0]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, TCSKD_CACHE=str(tmp_path / "caches"), PYTHONPATH=str(ROOT))
    env.pop("TCSKD_DEBUG", None)
    return env


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    """The three stages on the built-in default, the teacher's reference and the arrays, in a fresh process
    (as a user runs it), twice: the second run is a cache hit and finds the finished run."""
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    first = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 2, first.stdout
    m = re.fullmatch(r"student test top-1 ([\d.]+), teacher kNN test top-1 ([\d.]+)", lines[0])
    assert m, lines[0]
    student, teacher = float(m[1]), float(m[2])
    assert student > 0.15  # 10 classes: chance is 0.1
    assert teacher > 0.4
    shapes = re.fullmatch(r"\((\d+), (\d+)\) \((\d+),\) \((\d+), (\d+)\) \((\d+), (\d+)\)", lines[1])
    assert shapes, lines[1]
    assert [int(v) for v in shapes.groups()] == [600, 1280, 600, 64, 1280, 600, 64]
    assert (tmp_path / "runs" / "api" / "final.json").is_file()
    assert len([p for p in (tmp_path / "caches").iterdir() if p.is_dir()]) == 2
    again = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == first.stdout


def test_import_tcskd_loads_no_torch():
    code = ("import sys, tcskd; assert 'torch' not in sys.modules, 'torch'; "
            "tcskd.train; tcskd.BasisResult; assert 'torch' not in sys.modules, 'torch after train'; "
            "print(tcskd.__version__)")
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == tcskd.__version__


def test_the_api_names():
    from tcskd.cache.build import CacheResult, build_cache
    from tcskd.cache.config import CacheConfig
    from tcskd.store.handle import Cache, open_cache
    from tcskd.subspace.config import BasisConfig
    from tcskd.subspace.fit import fit_basis
    from tcskd.train.config import EvalConfig, TrainConfig
    from tcskd.train.evaluate import evaluate_teacher

    assert (tcskd.build_cache, tcskd.CacheConfig, tcskd.CacheResult) == (build_cache, CacheConfig, CacheResult)
    assert (tcskd.fit_basis, tcskd.BasisConfig) == (fit_basis, BasisConfig)
    assert (tcskd.TrainConfig, tcskd.evaluate, tcskd.EvalConfig) == (TrainConfig, evaluate_teacher, EvalConfig)
    assert (tcskd.open_cache, tcskd.Cache) == (open_cache, Cache)
    for name in tcskd.__all__:
        assert getattr(tcskd, name) is not None, name
        assert name == "__version__" or getattr(tcskd, name).__doc__, f"tcskd.{name} is undocumented"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tcskd.nope  # noqa: B018


def test_train_is_the_stage_and_the_package():
    import tcskd.train.loop as loop
    from tcskd import train

    assert train is tcskd.train is sys.modules["tcskd.train"]
    assert isinstance(tcskd.train, types.ModuleType) and callable(tcskd.train) and loop.train.__doc__
    assert tcskd.train.loop is loop


def test_run_recipe_when_there_are_recipes():
    recipe = pytest.importorskip("tcskd.recipe")
    assert tcskd.run_recipe is recipe.run_recipe and "run_recipe" in tcskd.__all__


# -- the stages through the API, on a tiny teacher ---------------------------------------------------------

def _check(result: dict, cls: type) -> None:
    """``result`` has every required key of the TypedDict ``cls`` and no key it does not declare (the optional
    ones: the segmentation scores of TrainResult), each of its declared type."""
    hints = typing.get_type_hints(cls)
    required = set(cls.__required_keys__)
    assert required <= set(result) <= set(hints), (sorted(set(result) - set(hints)), sorted(required - set(result)))
    for key, hint in hints.items():
        if key not in result:
            continue
        allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(hint) if typing.get_origin(hint) in
                                                          (typing.Union, types.UnionType) else (hint,)))
        allowed = tuple(type(None) if a is None else a for a in allowed)
        if float in allowed:
            allowed += (int,)
        assert isinstance(result[key], allowed), (key, result[key], hint)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("api")
    data = make_npz(tmp / "d.npz", n=48, n_test=24, classes=4)
    root = str(tmp / "caches")
    kw = dict(data=data, teacher=tiny_teacher, cache_root=root, image_size=16, chunk_rows=16, batch_size=8,
              device="cpu")
    train_cache = tcskd.build_cache(tcskd.CacheConfig(**kw, views=2))
    test_cache = tcskd.build_cache(tcskd.CacheConfig(**kw, split="test"))
    basis = tcskd.fit_basis(tcskd.BasisConfig(cache=train_cache.key, cache_root=root, dim=8, coords=True,
                                              plot=False, device="cpu"))
    return tmp, root, train_cache, test_cache, basis


def test_build_cache_and_fit_basis_results(stages):
    _, root, train_cache, test_cache, basis = stages
    assert isinstance(train_cache, tcskd.CacheResult) and not train_cache.hit and train_cache.rows_computed == 48
    assert Path(train_cache.path).is_dir() and train_cache.key != test_cache.key
    _check(basis, tcskd.BasisResult)
    assert (basis["name"], basis["kind"], basis["k"], basis["dim"], basis["plot"]) == ("pca", "pca", 8, 16, None)


def test_train_and_evaluate_results(stages):
    tmp, root, train_cache, test_cache, _ = stages
    cfg = tcskd.TrainConfig(cache=train_cache.key, cache_root=root, epochs=2, batch_size=8, device="cpu",
                            out=str(tmp / "run"))
    stopped = tcskd.train(dataclasses.replace(cfg, stop_after=1))
    _check(stopped, tcskd.StoppedRun)
    assert stopped == {"stopped_after": 1, "run_dir": str(tmp / "run")}
    # Resumed through the API as --resume does: the run's config.yaml supplies every option left at its default.
    run = tcskd.train(tcskd.TrainConfig(out=str(tmp / "run"), resume=True))
    _check(run, tcskd.TrainResult)
    full = tcskd.train(dataclasses.replace(cfg, out=str(tmp / "full")))
    assert run["epochs"] == 2 and run["cache_key"] == train_cache.key
    assert (run["val_top1"], run["test_top1"], run["knn_top1"]) == (full["val_top1"], full["test_top1"],
                                                                    full["knn_top1"])
    res = tcskd.evaluate(tcskd.EvalConfig(cache=train_cache.key, test_cache=test_cache.key, cache_root=root,
                                          device="cpu", probe_epochs=10))
    _check(res, tcskd.EvalResult)
    assert res["test_rows"] == 24 and res["linear_top1"] is not None
    assert res["knn_top1"] == _weighted_knn_by_hand(train_cache.path, test_cache.path)


def _weighted_knn_by_hand(train_path: str, test_path: str, k: int = 20, temperature: float = 0.07) -> float:
    """Test top-1 of the teacher's weighted kNN from the stored arrays, brute force in numpy (no faiss): cosine
    similarity of view 0 to the train rows outside the default validation hold-out, the k most similar vote
    exp(sim / T) each."""
    from tcskd.splits import Holdout

    def view0(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with open_store(path) as s:
            ok = s.read("row_ok").astype(bool)
            x = s.read("features")[:, 0].astype(np.float64)[ok]
            return x / np.linalg.norm(x, axis=1, keepdims=True), s.read("labels")[ok], s.read("sample_index")[ok]

    tx, ty, ti = view0(train_path)
    qx, qy, _ = view0(test_path)
    keep = ~Holdout(0.1, None, 0).mask(ty, ti)
    tx, ty = tx[keep], ty[keep]
    sims = qx @ tx.T
    correct = 0
    for row, truth in zip(sims, qy):
        nearest = np.argsort(-row)[:k]
        votes = np.zeros(int(ty.max()) + 1)
        np.add.at(votes, ty[nearest], np.exp(row[nearest] / temperature))
        correct += int(votes.argmax() == truth)
    return correct / len(qy)


def test_open_cache_arrays_are_what_the_store_holds(stages):
    _, root, train_cache, _, _ = stages
    with open_store(train_cache.path) as s:
        stored = {name: s.read(name) for name in ("features", "labels", "row_ok", "sample_index", "view_params")}
        coords = s.read("bases/pca/coords")
        pca = {name: s.read(f"bases/pca/{name}") for name in ("mean", "components", "eigenvalues",
                                                               "explained_ratio")}
    with tcskd.open_cache(train_cache.key, cache_root=root) as cache:
        assert cache.n == 48 and cache.views == 2 and cache.chunk_rows == 16  # three chunks
        feats = cache.features(view=None)
        assert feats.dtype == stored["features"].dtype == np.float16
        np.testing.assert_array_equal(feats, stored["features"])
        for v in (0, 1):
            np.testing.assert_array_equal(cache.features(view=v), stored["features"][:, v])
        assert cache.features(dtype=np.float32).dtype == np.float32
        np.testing.assert_array_equal(cache.features(dtype=np.float32), stored["features"][:, 0].astype(np.float32))
        np.testing.assert_array_equal(cache.labels(), stored["labels"])
        np.testing.assert_array_equal(cache.row_ok(), stored["row_ok"])
        np.testing.assert_array_equal(cache.sample_index(), stored["sample_index"])
        np.testing.assert_array_equal(cache.view_params(), stored["view_params"])
        assert cache.bases() == ["pca"]
        basis = cache.basis("pca")
        for name, value in pca.items():
            np.testing.assert_array_equal(getattr(basis, name), value)
        np.testing.assert_array_equal(cache.coords("pca"), coords[:, 0])
        np.testing.assert_array_equal(cache.coords("pca", view=None), coords)
        np.testing.assert_allclose(basis.project(feats[:, 0].astype(np.float64)), coords[:, 0], rtol=2e-3,
                                   atol=2e-3)
        with pytest.raises(StoreError, match="no view 2"):
            cache.features(view=2)
        with pytest.raises(StoreError, match="no complete basis 'nope'"):
            cache.coords("nope")


def test_coords_of_a_basis_without_them(stages):
    _, root, train_cache, _, _ = stages
    tcskd.fit_basis(tcskd.BasisConfig(cache=train_cache.key, cache_root=root, name="plain", dim=4, plot=False,
                                      device="cpu"))
    with tcskd.open_cache(train_cache.key, cache_root=root) as cache:
        assert cache.basis("plain").components.shape == (4, 16)
        with pytest.raises(StoreError, match="basis 'plain' has no stored coords"):
            cache.coords("plain")
