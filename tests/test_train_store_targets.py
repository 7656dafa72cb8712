"""Targets read from the store while training (--targets store): the same bits as the ram path, memory within
the LRU's budget, the block sampler's order, and whole runs equal to the ram path's in the same order."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _train_fixtures import make_dense_cache, make_npz, make_train_cache
from tcskd.errors import TcskdError
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.data import BlockSampler, block_window, train_loader
from tcskd.train.inputs import load_run_inputs
from tcskd.train.commands import train as train_cmd
from tcskd.train.targets import StoreTargets, choose_target_mode
from tcskd.results import without_timings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-targets")
    npz = make_npz(root / "d.npz", n_train=60, n_test=12)
    return root, npz


def _prep(cache, targets, **kw):
    base = dict(cache=str(cache), device="cpu", workers=0, targets=targets, target_cache_mb=1)
    base.update(kw)
    return load_run_inputs(resolve_config(TrainConfig(**base)))


def _all(t, views):
    """Every (item, view) of targets ``t`` (an array or StoreTargets), items in a scrambled order."""
    n = t.shape[0]
    idx = np.repeat(np.random.default_rng(0).permutation(n), views)
    v = np.tile(np.arange(views), n)
    return t[idx, v]


@pytest.mark.parametrize("method,coords,norm", [("tcs", True, "global"), ("tcs", False, "global"),
                                                ("fitnet", False, "global"), ("tcs", False, "none")])
def test_global_targets_from_the_store_equal_the_ram_path(data, method, coords, norm):
    root, npz = data
    cache = make_train_cache(root, npz, views=2, dim=12, k=6, coords=coords, chunk_rows=8,
                             name=f"g-{coords}")
    ram = _prep(cache, "ram", method=method, dim=6 if method == "tcs" else None, target_norm=norm)
    store = _prep(cache, "store", method=method, dim=6 if method == "tcs" else None, target_norm=norm)
    assert isinstance(store.train_set.targets, StoreTargets) and isinstance(ram.train_set.targets, np.ndarray)
    assert store.store_targets and not ram.store_targets
    assert store.target_scale == pytest.approx(ram.target_scale, rel=1e-12)  # exact but for fitnet's raw sums
    want = _all(ram.train_set.targets, 2)
    got = _all(store.train_set.targets, 2)
    assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)
    # fitnet on raw features: the scale comes from the data (one pass over the chunks)
    assert (ram.target_scale != 1.0) == (norm == "global")


@pytest.mark.parametrize("coords_of,mimic", [(None, "both"), ("tok", "dense"), (None, "global")])
def test_dense_and_pooled_targets_from_the_store_equal_the_ram_path(data, coords_of, mimic):
    root, npz = data
    cache = make_dense_cache(root, npz, grid=(4, 4), dim=16, k=6, views=2, chunk_rows=8, coords_of=coords_of,
                             name=f"d-{coords_of}")
    kw = dict(mimic_on=mimic, dim=6, tailor="off")
    if coords_of:
        kw["basis"] = coords_of
    ram, store = _prep(cache, "ram", **kw), _prep(cache, "store", **kw)
    # the pooled scale comes from the data, summed chunk by chunk here: equal to float64 rounding (and the
    # float32 divisor, so the targets, the same)
    assert store.target_scale == pytest.approx(ram.target_scale, rel=1e-12)
    assert np.float32(store.target_scale) == np.float32(ram.target_scale)
    for name in ("dense_targets", "targets"):
        r, s = getattr(ram.train_set, name), getattr(store.train_set, name)
        assert (r is None) == (s is None)
        if r is not None:
            assert isinstance(s, StoreTargets) and s.shape == r.shape
            assert np.array_equal(_all(s, 2), _all(r, 2))


def test_fitnet_raw_dense_scale_from_the_store(data):
    root, npz = data
    cache = make_dense_cache(root, npz, grid=(2, 2), dim=8, k=8, chunk_rows=8, name="d-raw")
    ram = _prep(cache, "ram", method="fitnet", mimic_on="dense", tailor="off")
    store = _prep(cache, "store", method="fitnet", mimic_on="dense", tailor="off")
    assert store.target_scale == pytest.approx(ram.target_scale, rel=1e-12) and ram.target_scale != 1.0
    assert np.array_equal(_all(store.train_set.dense_targets, 1), _all(ram.train_set.dense_targets, 1))


def test_auto_chooses_by_size_and_elsh_refuses_store(data):
    assert choose_target_mode("auto", 100 << 20, available=8 << 30) == "ram"
    assert choose_target_mode("auto", 3 << 30, available=8 << 30) == "store"    # > 25 % of what is free
    assert choose_target_mode("auto", 5 << 30, available=512 << 30) == "store"  # > 4 GB
    assert choose_target_mode("store", 1, available=8 << 30) == "store"
    with pytest.raises(TcskdError, match="--targets"):
        choose_target_mode("disk", 1)
    with pytest.raises(TcskdError, match="--elsh-bits"):
        resolve_config(TrainConfig(cache="c", targets="store", elsh_bits=8))
    with pytest.raises(TcskdError, match="--target-cache-mb"):
        resolve_config(TrainConfig(cache="c", target_cache_mb=0))
    assert resolve_config(TrainConfig(cache="c")).target_cache_mb >= 16  # a number, recorded in config.yaml


# -- memory ------------------------------------------------------------------------------------------------

def test_store_targets_stay_within_the_lru_budget_and_read_each_chunk_once(tmp_path):
    """4,000 rows x 64 tokens x K=16 float16: ram holds 7.4 MB of dense targets, the store path at most its
    1 MB budget while a whole epoch is drawn through the block sampler, reading every chunk once."""
    npz = make_npz(tmp_path / "big.npz", n_train=4000, n_test=4, size=16)
    cache = make_dense_cache(tmp_path, npz, grid=(8, 8), dim=16, k=16, coords_of="tok", chunk_rows=64,
                             name="big")
    kw = dict(mimic_on="dense", dim=16, tailor="off", batch_size=64, basis="tok")
    ram, store = _prep(cache, "ram", **kw), _prep(cache, "store", **kw)
    held_ram = ram.train_set.dense_targets.nbytes
    t = store.train_set.dense_targets
    assert held_ram == t.ram_bytes == len(t) * 64 * 16 * 2
    cfg = resolve_config(TrainConfig(cache=str(cache), batch_size=64, target_cache_mb=1, **{
        k: v for k, v in kw.items() if k != "batch_size"}))
    peak, seen = 0, []
    for batch in train_loader(store, cfg, 0, torch.device("cpu"), 0):
        peak = max(peak, t.lru.held_bytes)
        seen.append(batch.item.numpy())
    budget = 1 << 20
    assert 0 < peak <= budget < held_ram
    n_chunks = len(np.unique(store.blocks[0]))
    assert t.lru.reads == n_chunks  # each chunk decoded once in the epoch (window <= half the LRU)
    items = np.concatenate(seen)
    assert len(np.unique(items)) == len(items) == len(t) // 64 * 64  # full batches, no row twice


# -- the block sampler --------------------------------------------------------------------------------------

def _chunks(n=203, chunk=10, seed=3):
    """Store rows of n items (a held-out share missing, shuffled as a run's train rows are not) -> chunks."""
    rows = np.sort(np.random.default_rng(seed).choice(n + n // 5, n, replace=False))
    return rows // chunk


def test_block_sampler_visits_every_row_once_deterministically_and_in_windows():
    chunk_of = _chunks()
    s = BlockSampler(chunk_of, 3, seed=5, epoch=2, window=3)
    order, views = s.order()
    assert np.array_equal(np.sort(order), np.arange(len(chunk_of)))          # every row once
    again, views2 = BlockSampler(chunk_of, 3, seed=5, epoch=2, window=3).order()
    assert np.array_equal(order, again) and np.array_equal(views, views2)   # a function of (seed, epoch)
    other, _ = BlockSampler(chunk_of, 3, seed=5, epoch=3, window=3).order()
    assert not np.array_equal(order, other)
    assert [k for k, _, _ in s] == order.tolist()
    # consecutive windows of 3 chunks: the chunks seen change 3 at a time, never coming back
    c = chunk_of[order]
    firsts = c[np.r_[True, c[1:] != c[:-1]]]
    assert len(firsts) > len(np.unique(c))                           # shuffled inside windows ...
    distinct_in_order = list(dict.fromkeys(c.tolist()))  # the chunks in the order first met
    win = {ch: i // 3 for i, ch in enumerate(distinct_in_order)}
    assert np.all(np.diff([win[x] for x in c.tolist()]) >= 0)        # ... never across them
    # batches of 16 span at most two windows, i.e. at most 2 * window chunks (what the LRU holds)
    assert max(len(set(c[i:i + 16].tolist())) for i in range(0, len(c), 16)) <= 6


def test_block_sampler_ranks_are_disjoint_and_cover_and_read_their_own_chunks():
    chunk_of = _chunks(n=200)
    world = 3
    parts = [BlockSampler(chunk_of, 1, 7, 0, 2, rank=r, world=world).order()[0] for r in range(world)]
    size = -(-200 // world)
    assert all(len(p) == size for p in parts)
    allx = np.concatenate(parts)
    assert np.array_equal(np.sort(np.unique(allx)), np.arange(200))           # covering
    assert len(allx) - len(np.unique(allx)) == size * world - 200              # disjoint but for the padding
    chunks = [set(chunk_of[p].tolist()) for p in parts]
    for a in range(world):
        for b in range(a + 1, world):
            assert len(chunks[a] & chunks[b]) <= 2  # a shared chunk only at a slice's ends (and the padding)


def test_block_window_is_half_the_chunks_the_budget_holds():
    assert block_window(10 << 20, 1 << 20) == 5 and block_window(1, 1 << 20) == 1


# -- whole runs -------------------------------------------------------------------------------------------

@pytest.mark.slow  # DataLoader worker processes
def test_a_store_run_equals_the_ram_run_in_the_same_order(data, tmp_path):
    """Same block order: ram and store give the same losses (workers 0 and 1, the LRU per process) and the
    same final.json; the ram run in its own order (EpochSampler) is reported too."""
    from tcskd.train.loop import train

    root, _ = data
    npz = make_npz(root / "run.npz", n_train=160, n_test=40)
    cache = make_train_cache(root, npz, dim=12, k=6, chunk_rows=8, name="run")
    common = dict(cache=str(cache), epochs=3, batch_size=16, device="cpu", dim=6, target_cache_mb=1)
    ram = train(TrainConfig(out=str(tmp_path / "ram"), targets="ram", sampler="block", workers=0, **common))
    cli = CliRunner().invoke(train_cmd, ["--cache", str(cache), "--epochs", "3", "--batch-size", "16", "--dim", "6",
                                         "--device", "cpu", "--targets", "store", "--target-cache-mb", "1",
                                         "--workers", "1", "--out", str(tmp_path / "store")])
    assert cli.exit_code == 0, cli.output
    store = json.loads((tmp_path / "store" / "final.json").read_text())
    plain = train(TrainConfig(out=str(tmp_path / "plain"), targets="ram", workers=0, **common))

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r.get("loss"), r.get("val_top1")) for r in rows]

    assert losses("ram") == losses("store") and len(losses("ram")) >= 2
    drop = ("seconds", "time", "wall", "img_per_s", "out", "run_dir")
    clean = [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in (ram, store)]
    assert clean[0]["val_top1"] == clean[1]["val_top1"] and clean[0]["test_top1"] == clean[1]["test_top1"]
    assert losses("plain") != losses("ram")  # the ram default keeps its own order (EpochSampler)
    print("val/test top-1: ram+block", ram["val_top1"], ram["test_top1"], "store", store["val_top1"],
          store["test_top1"], "ram (own order)", plain["val_top1"], plain["test_top1"])


def test_a_store_run_resumes_exactly(data, tmp_path):
    """The block order is a function of (seed, epoch) and the budget recorded in config.yaml: a run stopped
    after an epoch and resumed equals the uninterrupted one."""
    from tcskd.train.loop import train

    root, npz = data
    cache = make_train_cache(root, npz, dim=12, k=6, chunk_rows=8, name="resume")
    common = dict(cache=str(cache), epochs=2, batch_size=8, device="cpu", dim=6, workers=0, targets="store",
                  target_cache_mb=1)
    full = train(TrainConfig(out=str(tmp_path / "full"), **common))
    train(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **common))
    resumed = train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common))
    def rows(name):
        return [without_timings(json.loads(x))
                for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert rows("full") == rows("part") and len(rows("full")) == 2
    assert resumed["val_top1"] == full["val_top1"] and resumed["test_top1"] == full["test_top1"]


@pytest.mark.slow
def test_two_ranks_read_their_own_chunks_and_equal_the_ram_run_in_the_same_order(data, tmp_path):
    """Under torchrun (2 gloo processes) each rank's block sampler takes its slice of the chunk order; the store
    run's losses equal those of the ram run in the same order."""
    import os
    import subprocess
    import sys

    root, npz = data
    cache = make_train_cache(root, npz, dim=12, k=6, chunk_rows=8, name="ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tcskd",
               "train", "--cache", str(cache), "--epochs", "2", "--batch-size", "8", "--dim", "6", "--device",
               "cpu", "--workers", "0", "--target-cache-mb", "1", "--out", str(tmp_path / name), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        return [(r["loss"], r["val_top1"]) for r in
                (json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines())]

    assert run("store", "--targets", "store") == run("ram", "--targets", "ram", "--sampler", "block")


def test_store_targets_read_a_cache_on_s3(s3_env_set):
    """A cache on a real S3 endpoint (moto's server): the chunks are read over HTTP by the LRU (opened by the
    process that reads), the targets equal the ram path's."""
    from _stores import write_cache
    from tcskd.store.backends import open_store
    from tcskd.store.bases import write_basis
    from tcskd.store.paths import as_location
    from tcskd.train.targets import load_targets, resolve_basis

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 2, 8)).astype(np.float16)
    comps = np.linalg.qr(rng.normal(size=(8, 8)))[0][:4]

    def bases(s):
        write_basis(s, "pca", {"mean": np.full(8, 0.1), "components": comps, "eigenvalues": np.arange(4, 0, -1.0),
                               "explained_ratio": np.linspace(0.4, 1, 4)}, {"kind": "pca", "whiten": False})

    path = write_cache(as_location(s3_env_set.prefix("targets") + "/0123abcd"), feats, chunk_rows=8, bases=bases)
    rows = np.array([49, 3, 17, 0, 8, 33, 40])
    with open_store(path) as s:
        basis = resolve_basis(s, "tcs", "pca", 4)
        want = load_targets(s, rows, basis, progress=False)
        t = StoreTargets(s, rows, basis, budget_bytes=200)
    views = np.array([1, 0, 1, 1, 0, 0, 1])
    assert np.array_equal(t[np.arange(7), views], want[np.arange(7), views])
    assert t.lru.reads == 6 and t.lru.held_bytes <= 200  # 6 chunks hold these rows; a 200-byte LRU keeps few


def test_windows_of_a_class_ordered_cache_are_measured_and_warned_about(caplog):
    """Rows in class order (an image folder's cache) and a window of few chunks: each window holds few classes,
    which collapses accuracy; the run says so. Shuffled rows, or a window of every chunk, hold them all."""
    from tcskd.train.inputs import warn_unmixed_windows, window_class_share

    labels = np.repeat(np.arange(10), 100)              # 1,000 rows in class order
    chunk_of = np.arange(1000) // 50                    # 20 chunks of 50 rows: each chunk holds one class
    assert window_class_share(labels, chunk_of, 2) <= 0.2
    assert window_class_share(labels, chunk_of, 20) == 1.0
    shuffled = np.random.default_rng(0).permutation(labels)
    assert window_class_share(shuffled, chunk_of, 2) == 1.0
    with caplog.at_level("WARNING"):
        warn_unmixed_windows(labels, chunk_of, 2, 1000 * 256)
    assert "ordered by class" in caplog.text and "--target-cache-mb" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_unmixed_windows(shuffled, chunk_of, 2, 1000 * 256)
    assert caplog.text == ""
