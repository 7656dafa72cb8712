"""Rows, targets, views and label subsets from the cache."""

import numpy as np
import pytest
import torch

from _train_fixtures import make_npz, make_train_cache
from tcskd.store.backends import open_store
from tcskd.views import apply_view
from tcskd.data import open_source
from tcskd.errors import StoreError
from tcskd.store.bases import load_basis
from tcskd.train.data import EpochSampler
from tcskd.train.loop import TrainConfig, load_run_inputs, resolve_config, train
from tcskd.train.targets import load_targets, match_rows, resolve_basis, target_scale


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    npz = make_npz(root / "d.npz", n_train=48, n_test=16)
    return root, npz


def test_few_labels_in_training_config(data):
    root, npz = data
    cache = make_train_cache(root, npz, name="few")
    prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), labels_per_class=3, seed=5)))
    ce = prep.train_set.ce_labels
    assert (ce >= 0).sum() == 3 * 4 and prep.n_labelled == 12
    assert all((ce == c).sum() == 3 for c in range(4))
    # the mimic term sees every training image; the validation rows (1 of each class's 12) are held out
    train_ids, val_ids = set(prep.split["train"]), set(prep.split["val"])
    assert len(val_ids) == 4 and not train_ids & val_ids and len(train_ids | val_ids) == 48
    assert prep.train_set.targets.shape[0] == len(prep.train_set) == 44
    assert set(prep.split["labelled"]) <= train_ids and len(prep.split["labelled"]) == 12
    assert len(prep.val_set) == 4 and (prep.val_set.ce_labels >= 0).all()
    # kNN references: exactly the labelled rows
    assert len(prep.knn_set) == 12 and sorted(prep.knn_set.rows.tolist()) == sorted(
        np.flatnonzero(np.isin(prep.train_set.source.indices, prep.split["labelled"])).tolist())
    # the validation rows do not depend on the run's seed
    other = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), labels_per_class=3, seed=6)))
    assert other.split["val"] == prep.split["val"] and other.split["labelled"] != prep.split["labelled"]


def test_targets_from_coords_match_projected_features(data):
    root, npz = data
    cache = make_train_cache(root, npz, views=2, coords=True, name="coords")
    with open_store(cache) as s:
        rows = np.arange(48)[::-1].copy()
        basis = load_basis(s, "pca").truncate(5)
        from_coords = load_targets(s, rows, basis)
        s_feats = s.read("features").astype(np.float32)
    assert from_coords.shape == (48, 2, 5)
    projected = basis.project(s_feats[rows])
    assert np.allclose(from_coords, projected, atol=2e-2)


def test_multi_view_replay_uses_the_stored_crop(data):
    root, npz = data
    cache = make_train_cache(root, npz, views=3, name="views")
    prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), augment="crop-flip")))
    ds = prep.train_set
    assert prep.views == 3 and ds.augment == "none"  # the stored views are the augmentation
    with open_store(cache) as s:
        params = s.read("view_params")
    src = open_source(f"npz:{npz}", "train")
    for i, v in ((0, 1), (7, 2), (11, 0)):
        x, target, label, item, view, _ = ds[(i, v, 4)]
        row = int(ds.rows[i])  # the training rows skip the validation rows; store row = source row here
        img = src.image(row)
        want = apply_view(torch.from_numpy(img).permute(2, 0, 1), params[row, v], ds.size).float() / 255  # uint8 crop
        assert torch.equal(x, want)
        assert torch.equal(target, torch.from_numpy(ds.targets[i, v]))
        assert (item, view, label) == (i, v, int(src.labels[row]))
    # each epoch picks one view per image, seeded by (seed, epoch)
    a = list(EpochSampler(48, 3, seed=0, epoch=2))
    assert a == list(EpochSampler(48, 3, seed=0, epoch=2))
    assert a != list(EpochSampler(48, 3, seed=0, epoch=3))
    assert sorted(k[0] for k in a) == list(range(48)) and {k[1] for k in a} == {0, 1, 2}


def test_one_view_augmentation_is_seeded_per_epoch(data):
    root, npz = data
    cache = make_train_cache(root, npz, name="aug")
    ds = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), augment="crop"))).train_set
    assert torch.equal(ds[(3, 0, 1)][0], ds[(3, 0, 1)][0])
    assert any(not torch.equal(ds[(i, 0, 1)][0], ds[(i, 0, 2)][0]) for i in range(8))


@pytest.mark.parametrize("views, augment", [(1, "crop-flip"), (1, "flip"), (3, "none")])
def test_a_batch_equals_its_images_one_by_one(data, views, augment):
    # The in-memory path builds a batch as one tensor; it must give every image exactly as the
    # one-by-one path does (a source without load_many, like an image folder), teacher input included.
    from dataclasses import replace

    from tcskd.train.data import ViewImages

    root, npz = data
    cache = make_train_cache(root, npz, views=views, name=f"batch{views}")
    ds = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), augment=augment, seed=3))).train_set
    assert ds.source.load_many is not None
    slow = ViewImages(replace(ds.source, load_many=None), ds.rows, ds.size, ds.channels, ds.params, ds.targets,
                      ds.ce_labels, ds.augment, ds.seed, teacher_size=24)
    fast = ViewImages(ds.source, ds.rows, ds.size, ds.channels, ds.params, ds.targets, ds.ce_labels,
                      ds.augment, ds.seed, teacher_size=24)
    keys = list(EpochSampler(len(ds), views, seed=1, epoch=5))[:20]
    a, b = fast.__getitems__(keys), slow.__getitems__(keys)
    for got, want in zip(a, b):
        assert got.shape == want.shape and torch.equal(got, want)
    assert a[0].shape == (20, ds.channels, ds.size, ds.size) and a[5].dtype == torch.uint8
    one = [fast[k] for k in keys[:4]]  # an item alone equals its row of a batch
    assert all(torch.equal(o[0], a[0][j]) and o[2] == int(a[2][j]) for j, o in enumerate(one))


def test_teacher_input_left_to_the_device_is_the_same_view(data):
    # Online on a GPU: the worker ships the image at its own size and the loop takes the centre crop
    # at the teacher's size on the device (center_view); that must equal the worker-made input.
    from tcskd.views import center_view
    from tcskd.train.data import ViewImages

    root, npz = data
    cache = make_train_cache(root, npz, name="defer")
    ds = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), augment="crop", seed=2))).train_set
    args = (ds.source, ds.rows, ds.size, ds.channels, ds.params, ds.targets, ds.ce_labels, ds.augment, ds.seed, 40)
    keys = list(EpochSampler(len(ds), 1, seed=1, epoch=0))[:16]
    made = ViewImages(*args).__getitems__(keys)
    left = ViewImages(*args, defer_teacher_resize=True).__getitems__(keys)
    assert made[5].shape[-1] == 40 and left[5].shape[-1] != 40  # really left at the images' size
    assert torch.equal(center_view(left[5], 40), made[5])
    assert all(torch.equal(a, b) for a, b in zip(made[:5], left[:5]))


def test_float_pixels_fall_back_to_one_by_one_once(tmp_path):
    from tcskd.train.data import ViewImages

    x = np.random.default_rng(0).random((12, 10, 10)).astype(np.float32)  # floats in [0, 1]
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(12) % 3)
    src = open_source(f"npz:{tmp_path / 'f.npz'}", "train")
    assert src.load_many is not None
    ds = ViewImages(src, np.arange(12), 8, 1, augment="crop", seed=0)
    keys = [(i, 0, 1) for i in (4, 0, 9)]
    batch = ds.__getitems__(keys)
    assert src.load_many is None  # decided once for this source: its images are not uint8
    assert torch.equal(batch[0], torch.stack([ds[k][0] for k in keys]))
    assert batch[0].shape == (3, 1, 8, 8) and batch[2].tolist() == [1, 0, 0]


def test_augmentation_draws_cover_every_offset_and_flip_half_the_images():
    from tcskd.train.data import augment_batch, row_uniforms

    rows = np.arange(4000)
    u = row_uniforms(0, np.full(4000, 2), rows, 3)
    assert u.shape == (4000, 3) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.02 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    assert not np.array_equal(u, row_uniforms(0, np.full(4000, 3), rows, 3))  # another epoch
    assert np.array_equal(u[10:20], row_uniforms(0, np.full(10, 2), rows[10:20], 3))  # any batch
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(4000, 1, 4, 4).contiguous()
    out = augment_batch(x, "crop-flip", 0, np.full(4000, 2), rows)  # pad 1: offsets 0..2, coin flip
    assert out.shape == x.shape
    seen = {tuple(o.flatten().tolist()) for o in out}
    assert len(seen) == 18  # 3 x 3 offsets, each mirrored or not
    flipped = augment_batch(x, "flip", 0, np.full(4000, 2), rows)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert ((flipped == x).flatten(1).all(1) ^ mirrored).all() and 0.45 < float(mirrored.float().mean()) < 0.55


def test_incomplete_cache_is_refused(data, tmp_path):
    root, npz = data
    cache = make_train_cache(root, npz, complete=False, name="incomplete")
    with pytest.raises(StoreError, match="incomplete"):
        train(TrainConfig(cache=str(cache), epochs=1, out=str(tmp_path / "run"), device="cpu"))
    assert not (tmp_path / "run").exists()


def test_missing_rows_are_refused(data):
    root, npz = data
    cache = make_train_cache(root, npz, drop_rows=5, name="short")
    with pytest.raises(StoreError, match="lacks 5"):
        load_run_inputs(resolve_config(TrainConfig(cache=str(cache))))


def test_bad_rows_are_left_out(data):
    root, npz = data
    cache = make_train_cache(root, npz, bad_rows=(2, 9), name="bad")
    src = open_source(f"npz:{npz}", "train")
    with open_store(cache) as s:
        rows, store_rows = match_rows(s, src, src, limited=False)
    assert len(rows) == 46 and 2 not in rows and 9 not in rows
    assert np.array_equal(rows, store_rows)


def test_wrong_data_is_refused(data, tmp_path):
    root, npz = data
    cache = make_train_cache(root, npz, name="other")
    other = make_npz(tmp_path / "other.npz", n_train=48, n_test=16, seed=9)
    with pytest.raises(StoreError, match="label"):
        load_run_inputs(resolve_config(TrainConfig(cache=str(cache), data=f"npz:{other}")))


def test_basis_choice(data):
    root, npz = data
    cache = make_train_cache(root, npz, identity=True, name="ident")
    plain = make_train_cache(root, npz, name="plain")
    with open_store(cache) as s:
        assert resolve_basis(s, "fitnet", "pca", None).name == "identity"
        assert resolve_basis(s, "tcs", "pca", 3).k == 3
        assert resolve_basis(s, "ce", "pca", None) is None
        with pytest.raises(StoreError):
            resolve_basis(s, "tcs", "nope", None)
        with pytest.raises(StoreError):
            resolve_basis(s, "tcs", "pca", 99)
    with open_store(plain) as s:
        raw = resolve_basis(s, "fitnet", "pca", None)
        assert raw.name == "raw" and raw.kind == "identity" and raw.k == 16
        assert resolve_basis(s, "fitnet", "pca", 4).k == 16  # --dim does not truncate fitnet
        t = load_targets(s, np.arange(48), raw)
        assert np.array_equal(t, s.read("features").astype(np.float32))


def test_target_scale(data):
    root, npz = data
    cache = make_train_cache(root, npz, name="scale")
    with open_store(cache) as s:
        basis = resolve_basis(s, "tcs", "pca", 4)
        t = load_targets(s, np.arange(48), basis)
        raw = resolve_basis(s, "fitnet", "pca", None)
    scale = target_scale(basis, t, "global")
    # the PCA eigenvalues are the coordinates' variances: the scaled targets have mean variance 1
    assert np.mean(np.var(t[:, 0] / scale, axis=0, ddof=1)) == pytest.approx(1.0, rel=1e-2)
    assert target_scale(basis, t, "none") == 1.0
    assert target_scale(raw, t, "global") == pytest.approx(float(np.sqrt(np.mean(t.astype(np.float64) ** 2))))
    prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), dim=4)))
    assert np.allclose(prep.train_set.targets, t[prep.train_set.rows] / scale, atol=1e-6)


def test_tcs_without_dim_takes_the_default_k_not_every_coordinate(data, monkeypatch):
    import tcskd.train.targets as targets

    root, npz = data
    cache = make_train_cache(root, npz, name="defaultk", k=8)
    with open_store(cache) as s:
        monkeypatch.setattr(targets, "DEFAULT_DIM", 5)
        assert resolve_basis(s, "tcs", "pca", None).k == 5  # not all 8: tcs is not FitNet in a rotated basis
        assert resolve_basis(s, "tcs", "pca", 7).k == 7
        monkeypatch.setattr(targets, "DEFAULT_DIM", 64)
        assert resolve_basis(s, "tcs", "pca", None).k == 8  # a basis with fewer components: all of them
