"""kNN / linear probe on synthetic features, and the teacher's reference from two tiny stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tcskd.store.registry import cache_key
from tcskd.store.backends import open_store
from tcskd.errors import StoreError, TcskdError
from tcskd.train.evaluate import EvalConfig, evaluate_teacher, knn_predict, knn_top1, linear_probe_top1
from tcskd.train.commands import eval_cmd


def _clusters(n: int, d: int, c: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(c, d)) * 5.0
    y = rng.integers(0, c, n)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int64)


def _brute_force_knn(tx, ty, vx, k, t, c):
    tx = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    vx = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    sims = vx.astype(np.float64) @ tx.astype(np.float64).T
    preds = []
    for row in sims:
        nn = np.argsort(-row)[:k]
        votes = np.zeros(c)
        for j in nn:
            votes[ty[j]] += np.exp(row[j] / t)
        preds.append(int(np.argmax(votes)))
    return np.asarray(preds)


# -- kNN ----------------------------------------------------------------------

def test_knn_perfect_on_separated_clusters():
    tx, ty = _clusters(400, 32, 5, 0.1, seed=0)
    vx, vy = _clusters(100, 32, 5, 0.1, seed=1)
    assert knn_top1(tx, ty, vx, vy, k=20) == 1.0


def test_knn_near_chance_on_random_labels():
    rng = np.random.default_rng(0)
    tx, vx = rng.normal(size=(2000, 16)), rng.normal(size=(1000, 16))
    ty, vy = rng.integers(0, 10, 2000), rng.integers(0, 10, 1000)
    acc = knn_top1(tx, ty, vx, vy, k=20)
    assert 0.05 < acc < 0.16


def test_knn_matches_brute_force():
    rng = np.random.default_rng(3)
    tx, vx = rng.normal(size=(300, 24)).astype(np.float32), rng.normal(size=(80, 24)).astype(np.float32)
    ty, vy = rng.integers(0, 6, 300), rng.integers(0, 6, 80)
    for k, t in ((1, 0.07), (7, 0.07), (20, 0.5)):
        ref = _brute_force_knn(tx, ty, vx, k, t, 6)
        np.testing.assert_array_equal(knn_predict(tx, ty, vx, k=k, temperature=t, num_classes=6), ref)
        assert knn_top1(tx, ty, vx, vy, k=k, temperature=t) == pytest.approx(float((ref == vy).mean()), abs=0)


def test_knn_ignores_unlabelled_rows():
    tx, ty = _clusters(300, 16, 4, 0.1, seed=0)
    vx, vy = _clusters(60, 16, 4, 0.1, seed=1)
    # Poison: unlabelled train rows sit right on the test points but carry label -1.
    tx2 = np.concatenate([tx, vx + 1e-3])
    ty2 = np.concatenate([ty, np.full(len(vx), -1)])
    # Unlabelled test rows would be wrong whatever the prediction: they must not count.
    vx2 = np.concatenate([vx, vx[:10]])
    vy2 = np.concatenate([vy, np.full(10, -1)])
    assert knn_top1(tx2, ty2, vx2, vy2, k=5) == 1.0
    assert knn_top1(tx2, ty2, vx2, vy2, k=5) == knn_top1(tx, ty, vx, vy, k=5)


def test_knn_k_larger_than_train_and_errors():
    tx, ty = _clusters(10, 8, 2, 0.1, seed=0)
    # k above the 10 training rows: every row votes, and the nearest (itself, weight exp(1/T)) dominates
    assert knn_top1(tx, ty, tx, ty, k=50) == 1.0
    with pytest.raises(TcskdError):
        knn_top1(tx, np.full(10, -1), tx, ty)
    with pytest.raises(TcskdError):
        knn_top1(tx, ty, tx, ty, k=0)


# -- linear probe ---------------------------------------------------------------

def test_linear_probe_separable():
    tx, ty = _clusters(600, 64, 8, 1.0, seed=0)
    vx, vy = _clusters(200, 64, 8, 1.0, seed=1)
    assert linear_probe_top1(tx, ty, vx, vy, epochs=50) >= 0.98


def test_linear_probe_deterministic_and_ignores_unlabelled():
    tx, ty = _clusters(500, 32, 5, 6.0, seed=0)
    vx, vy = _clusters(200, 32, 5, 6.0, seed=1)
    before = tx.copy()
    a = linear_probe_top1(tx, ty, vx, vy, epochs=30, seed=7)
    np.testing.assert_array_equal(tx, before)  # the caller's features are left alone
    b = linear_probe_top1(tx, ty, vx, vy, epochs=30, seed=7)
    assert a == b
    ty2 = ty.copy()
    ty2[:50] = -1
    c = linear_probe_top1(tx, ty2, vx, vy, epochs=30, seed=7)
    d = linear_probe_top1(tx[50:], ty[50:], vx, vy, epochs=30, seed=7)
    assert c == d


# -- evaluate_teacher on tiny stores ---------------------------------------------

def _write_store(path: Path, x: np.ndarray, y: np.ndarray, teacher: str = "t:a", split: str = "train",
                 ok: np.ndarray | None = None, done: bool = True, views: int = 1, fmt: str = "zarr") -> Path:
    n, d = x.shape
    feats = np.zeros((n, views, d), np.float16)
    feats[:, 0] = x
    if views > 1:
        feats[:, 1:] = 100.0  # junk in the other views: must not be read
    s = open_store(path, "a", fmt)
    try:
        s.create("features", (n, views, d), "float16", (64, views, d))
        s["features"][...] = feats
        s.create("labels", (n,), "int64", (64,), fill_value=-1)
        s["labels"][...] = y
        s.create("row_ok", (n,), "bool", (64,), fill_value=False)
        s["row_ok"][...] = np.ones(n, bool) if ok is None else ok
        nc = -(-n // 64)
        s.create("chunk_done", (nc,), "bool", (1,), fill_value=False, compress=False)
        flags = np.ones(nc, bool)
        if not done:
            flags[-1] = False
        s["chunk_done"][...] = flags
        s.create("sample_index", (n,), "int64", (64,), fill_value=-1)[...] = np.arange(n)
        s.create("view_params", (n, views, 5), "float32", (64, views, 5), fill_value=0)
        identity = {"teacher": {"spec": teacher}, "data": {"spec": "synthetic"}, "split": split, "views": views,
                    "test": str(path)}
        s.set_attrs({"schema_version": 1, "key": cache_key(identity), "identity": identity,
                     "data_spec": "synthetic", "split": split, "teacher_spec": teacher, "n_rows": n,
                     "views": views, "dim": d, "num_classes": 4, "chunk_rows": 64, "complete": bool(done)})
    finally:
        s.close()
    return path


@pytest.fixture
def pair(tmp_path):
    tx, ty = _clusters(200, 16, 4, 0.3, seed=0)
    vx, vy = _clusters(80, 16, 4, 0.3, seed=1)
    return tmp_path, (tx, ty), (vx, vy)


def test_evaluate_teacher(pair):
    tmp, (tx, ty), (vx, vy) = pair
    # Bad rows (row_ok False) carry wrong labels: if they were read, accuracy would drop.
    ok = np.ones(len(vy), bool)
    ok[:10] = False
    vy_bad = vy.copy()
    vy_bad[:10] = (vy[:10] + 1) % 4
    _write_store(tmp / "train", tx, ty, views=2)
    _write_store(tmp / "test", vx, vy_bad, split="test", ok=ok, fmt="hdf5")
    out = tmp / "sub" / "teacher.json"
    res = evaluate_teacher(EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "test"), device="cpu",
                                      out=str(out), probe_epochs=30))
    assert res["knn_top1"] == 1.0 and res["linear_top1"] == 1.0
    assert (res["train_rows"], res["val_rows"], res["test_rows"], res["k"]) == (180, 20, 70, 20)
    assert res["val_knn_top1"] == 1.0 and res["val_linear_top1"] == 1.0
    assert res["teacher"] == "t:a" and res["data"] == "synthetic"
    assert json.loads(out.read_text())["knn_top1"] == 1.0


def test_evaluate_teacher_with_a_label_budget_uses_the_runs_rows(pair):
    from tcskd.splits import Holdout, labelled_mask

    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "train", tx, ty)
    _write_store(tmp / "test", vx, vy, split="test")
    res = evaluate_teacher(EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "test"), device="cpu",
                                      labels_per_class=3, seed=4, probe_epochs=30))
    classes = len(np.unique(ty))
    assert res["train_rows"] == 3 * classes and res["k"] == 3 * classes and res["labels_per_class"] == 3
    # the same rows a training run with seed 4 is given: the helper that picks them agrees
    si = np.arange(len(ty))
    val = Holdout().mask(ty, si)
    assert int(labelled_mask(ty, si, 3, 4, eligible=~val).sum()) == res["train_rows"]


def test_evaluate_teacher_by_key(pair):
    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "aaaa1111", tx, ty)
    _write_store(tmp / "bbbb2222", vx, vy, split="test")
    res = evaluate_teacher(EvalConfig(cache="aaaa", test_cache="bbbb2222", cache_root=str(tmp), device="cpu",
                                      linear=False))
    assert res["knn_top1"] == 1.0 and res["linear_top1"] is None


def test_evaluate_teacher_refuses_mismatch(pair):
    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "train", tx, ty)
    _write_store(tmp / "other_teacher", vx, vy, teacher="t:b")
    _write_store(tmp / "other_dim", vx[:, :8], vy)
    with pytest.raises(StoreError, match="different teachers: 't:a' vs 't:b'"):
        evaluate_teacher(EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "other_teacher"), device="cpu"))
    with pytest.raises(StoreError, match="different feature dims: 16 vs 8"):
        evaluate_teacher(EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "other_dim"), device="cpu"))


def test_evaluate_teacher_refuses_incomplete(pair):
    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "train", tx, ty, done=False)
    _write_store(tmp / "test", vx, vy)
    with pytest.raises(StoreError, match=r"train cache .* is incomplete \(3/4 chunks done\)"):
        evaluate_teacher(EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "test"), device="cpu"))


def test_evaluate_teacher_refuses_damaged_features(pair):
    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "train", tx, ty)
    _write_store(tmp / "test", vx, vy)
    with open_store(tmp / "test", "a") as s:
        feats = s.read("features")
        feats[70, 0, 3] = np.inf
        s["features"][...] = feats
    cfg = EvalConfig(cache=str(tmp / "train"), test_cache=str(tmp / "test"), device="cpu", linear=False)
    with pytest.raises(StoreError, match=r"features rows 64\.\.79 hold NaN/Inf"):
        evaluate_teacher(cfg)
    chunk = next(p for p in (tmp / "train" / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"is damaged: 'features' rows \d+\.\.\d+ cannot be read"):
        evaluate_teacher(cfg)


def test_eval_command(pair):
    tmp, (tx, ty), (vx, vy) = pair
    _write_store(tmp / "train", tx, ty)
    _write_store(tmp / "test", vx, vy)
    out = tmp / "t.json"
    r = CliRunner().invoke(eval_cmd, ["--cache", str(tmp / "train"), "--test-cache", str(tmp / "test"),
                                      "--device", "cpu", "--k", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "kNN top-1 (k=5" in r.stdout and "100.00 %" in r.stdout
    assert json.loads(out.read_text())["k"] == 5
    r = CliRunner().invoke(eval_cmd, ["--cache", str(tmp / "nope"), "--test-cache", str(tmp / "test"),
                                      "--device", "cpu"])
    assert r.exit_code != 0 and isinstance(r.exception, StoreError)


def test_a_patch_cache_is_scored_on_its_mean_tokens_and_a_coordinate_cache_is_refused(tmp_path):
    from _train_fixtures import make_dense_cache, make_npz
    from tcskd.store.handle import open_cache
    from tcskd.train.evaluate import read_view0

    npz = make_npz(tmp_path / "d.npz", n_train=20, n_test=4, size=16)
    raw = make_dense_cache(tmp_path, npz, views=2, name="raw")
    with open_cache(raw) as cache:
        x, y, si = read_view0(cache)
        tokens = cache.store.read("features")[:, 0].astype(np.float32)        # N x T x D
    np.testing.assert_allclose(x, tokens.mean(1), rtol=1e-6)
    assert x.shape == (20, 16) and np.array_equal(y, np.load(npz)["y"]) and np.array_equal(si, np.arange(20))
    coords = make_dense_cache(tmp_path, npz, coords_of="pca", name="coords")
    with open_cache(coords) as cache, pytest.raises(StoreError, match="holds token coordinates in its own basis"):
        read_view0(cache)
