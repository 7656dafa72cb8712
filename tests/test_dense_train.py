"""Dense TCS in stage 3: targets from patch caches, the dense head, its alignment and loss, the options' errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _train_fixtures import make_dense_cache, make_npz, make_train_cache
from tcskd.errors import StoreError, TcskdError
from tcskd.store.backends import open_store
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.head import TCSHead
from tcskd.train.losses import align_to_grid, dense_mimic_loss, mimic_loss, tcs_loss
from tcskd.train.selection import ablation_deltas, step_importance
from tcskd.train.targets import load_dense_targets, resolve_basis, target_scale


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    npz = make_npz(root / "d.npz", n_train=40, n_test=8, size=12)
    return root, npz


# -- targets ---------------------------------------------------------------------------------------------

def test_dense_targets_project_every_token_and_pool_to_the_mean_token(data):
    root, npz = data
    cache = make_dense_cache(root, npz, grid=(4, 4), dim=16, k=6, views=2, chunk_rows=8, name="raw")
    rows = np.array([7, 0, 33, 12, 8])
    with open_store(cache) as s:
        tokens = s.read("features").astype(np.float64)                     # N x V x T x D
        basis = resolve_basis(s, "tcs", "pca", 6)
        dense, pooled = load_dense_targets(s, rows, basis, pooled=True)
    want = (tokens[rows] - basis.mean) @ basis.components.T              # N x V x T x K
    assert dense.shape == (5, 2, 16, 6) and dense.dtype == np.float16
    assert np.allclose(dense, want, atol=2e-2, rtol=2e-3)
    # linear: the mean of the tokens' coordinates = the coordinates of the mean token
    assert np.allclose(pooled, (tokens[rows].mean(2) - basis.mean) @ basis.components.T, atol=1e-4)
    assert target_scale(basis, dense) == pytest.approx(math.sqrt(basis.eigenvalues.mean()))


def test_coordinate_cache_is_read_as_it_is_and_dim_slices_it(data):
    root, npz = data
    raw = make_dense_cache(root, npz, k=6, name="raw-c")
    coords = make_dense_cache(root, npz, k=6, coords_of="tok", name="coords")
    rows = np.arange(10)
    with open_store(raw) as s:
        want, _ = load_dense_targets(s, rows, resolve_basis(s, "tcs", "pca", 4))
    with open_store(coords) as s:
        basis = resolve_basis(s, "tcs", "pca", 4, coords_of="tok")  # the default name means that basis
        assert basis.name == "tok" and basis.k == 4
        got, _ = load_dense_targets(s, rows, basis, coords_of="tok")
        stored = s.read("features")
        assert np.array_equal(got, stored[rows][..., :4])  # as stored: no projection
        with pytest.raises(StoreError, match="--basis must be tok"):
            resolve_basis(s, "tcs", "rand", 4, coords_of="tok")
        with pytest.raises(StoreError, match="fitnet"):
            resolve_basis(s, "fitnet", "pca", None, coords_of="tok")
    assert np.allclose(got.astype(np.float32), want.astype(np.float32), atol=3e-2)


def test_fitnet_on_a_patch_cache_mimics_the_raw_tokens(data):
    root, npz = data
    cache = make_dense_cache(root, npz, dim=12, name="fit")
    with open_store(cache) as s:
        basis = resolve_basis(s, "fitnet", "pca", None)
        assert basis.k == 12 and basis.kind == "identity"
        dense, _ = load_dense_targets(s, np.arange(4), basis)
        assert np.array_equal(dense, s.read("features")[:4])


# -- head, alignment, loss --------------------------------------------------------------------------------

def test_dense_head_shares_gate_and_mask_with_the_global_projector():
    torch.manual_seed(0)
    head = TCSHead(8, 3, 5, map_channels=6, dense=True, global_=True)
    fmap = torch.randn(2, 6, 7, 7)
    d_hat = head.project_map(fmap)
    assert d_hat.shape == (2, 5, 7, 7)
    with torch.no_grad():
        head.gate[1] = 0.0
    assert torch.equal(head.project_map(fmap)[:, 1], torch.zeros(2, 7, 7))
    assert torch.equal(head.project(torch.randn(2, 8))[:, 1], torch.zeros(2))
    ids = {id(p) for p in head.trainable_parameters()}
    assert id(head.dense_projector.weight) in ids and id(head.gate) not in ids
    only = TCSHead(8, 3, 5, map_channels=6, dense=True, global_=False, classify_from="coords")
    assert only.projector is None and only.classify_from == "feature"  # no global coordinates to read
    seg = TCSHead(8, 4, 5, map_channels=6, dense=True, task="segment", global_=False)
    assert seg.segment(fmap, (28, 28)).shape == (2, 4, 28, 28)


@pytest.mark.parametrize("h,mode", [(8, "area"), (4, None), (2, "bilinear")])
def test_alignment_resizes_predictions_to_the_grid(h, mode):
    d_hat = torch.randn(3, 5, h, h)
    got, valid = align_to_grid(d_hat, (4, 4))
    assert got.shape == (3, 5, 4, 4) and valid is None
    if mode == "area":
        assert torch.allclose(got, F.avg_pool2d(d_hat, 2))  # the mean over each teacher cell
    elif mode is None:
        assert torch.equal(got, d_hat)
    else:
        assert torch.allclose(got, F.interpolate(d_hat, size=(4, 4), mode="bilinear", align_corners=False))


def test_alignment_undoes_the_students_shift_and_flip():
    from tcskd.train.data import apply_augment

    size = 16
    view = torch.randn(2, 3, size, size)  # a map at input resolution, in the view's frame
    aug = torch.tensor([[4.0, -4.0, 0.0], [0.0, 4.0, 1.0]])
    seen = apply_augment(view, aug)        # what the student's map looks like on the augmented input
    got, valid = align_to_grid(seen, (4, 4), aug, size)
    want = F.avg_pool2d(view, 4)
    assert valid.shape == (2, 4, 4)
    # image 0 saw view pixels (i + 4, j - 4): the top row and the right column of cells were not in its input;
    # image 1 saw (i, j + 4), mirrored: the left column was not
    assert valid[0].sum() == 9 and valid[0, 0].sum() == 0 and valid[0, :, 3].sum() == 0
    assert valid[1].sum() == 12 and valid[1, :, 0].sum() == 0
    ok = valid[:, None].expand_as(got) > 0
    assert torch.allclose(got[ok], want[ok], atol=1e-5)
    # the loss only sees the valid locations
    target = want.permute(0, 2, 3, 1).reshape(2, 16, 3)
    assert dense_mimic_loss(got, target, torch.ones(3), "mse", valid).item() < 1e-9
    assert dense_mimic_loss(got, target, torch.ones(3), "mse", None).item() > 1e-3


@pytest.mark.parametrize("kind", ["mse", "smooth-l1", "cosine"])
def test_dense_mimic_is_the_mimic_per_location(kind):
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 9, 5, generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    rows = pred.permute(0, 2, 3, 1).reshape(-1, 5)
    want = mimic_loss(rows, tgt.reshape(-1, 5), mask, kind)
    assert torch.allclose(dense_mimic_loss(pred, tgt, mask, kind), want)
    valid = torch.ones(2, 3, 3)
    assert torch.allclose(dense_mimic_loss(pred, tgt, mask, kind, valid), want, atol=1e-6)
    # locations of weight 0 do not count
    valid[1] = 0
    half = mimic_loss(rows[:9], tgt[0], mask, kind)
    assert torch.allclose(dense_mimic_loss(pred, tgt, mask, kind, valid), half, atol=1e-6)


def test_loss_parts_add_the_dense_term_and_segmentation_ce_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    y[1] = -1                                 # an image outside the labelled subset: all ignored
    y[0, 0] = -1
    d_hat, d = torch.randn(2, 5, 2, 2, generator=g), torch.randn(2, 4, 5, generator=g)
    c_hat, c, mask = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.ones(5)
    parts = tcs_loss(logits, y, c_hat, c, mask, 2.0, d_hat=d_hat, d=d)
    keep = y[0] >= 0
    ce = F.cross_entropy(logits[0].permute(1, 2, 0)[keep], y[0][keep])
    assert parts.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts.dense.item() == pytest.approx(dense_mimic_loss(d_hat, d, mask).item())
    assert parts.mimic.item() == pytest.approx(mimic_loss(c_hat, c, mask).item())
    assert parts.total.item() == pytest.approx(ce.item() + 2.0 * (parts.mimic.item() + parts.dense.item()), rel=1e-5)
    dense_only = tcs_loss(logits, y, None, None, mask, 2.0, d_hat=d_hat, d=d)
    assert dense_only.mimic.item() == 0 and dense_only.total.item() == pytest.approx(
        ce.item() + 2.0 * parts.dense.item(), rel=1e-5)
    assert tcs_loss(logits, torch.full_like(y, -1), None, None, None, 1.0).total.item() == 0.0


@pytest.mark.parametrize("select_by", ["ablation", "taylor", "error", "worst"])
def test_tailoring_criteria_work_per_coordinate_on_dense_predictions(select_by):
    # a coordinate the student predicts exactly at every location has no error and costs nothing to keep
    g = torch.Generator().manual_seed(2)
    head = TCSHead(4, 2, 3, map_channels=4, dense=True, global_=False)
    fmap = torch.randn(6, 4, 4, 4, generator=g)
    with torch.no_grad():
        d_true = head.project_map(fmap)
    target = d_true.permute(0, 2, 3, 1).reshape(6, 16, 3).clone()
    target[..., 0] += 1.0                        # coordinate 0 is off everywhere, 1 and 2 exact
    target[..., 2] *= 1.0 + 1e-3
    mask = head.mask.clone().requires_grad_(True)
    loss = tcs_loss(torch.zeros(6, 2), torch.full((6,), -1), None, None, mask, 1.0,
                    d_hat=head.project_map(fmap), d=target)
    loss.total.backward()
    rows = head.project_map(fmap).detach().permute(0, 2, 3, 1).reshape(-1, 3)
    deltas = ablation_deltas(torch.zeros(6, 2), torch.full((6,), -1), None, None, head.mask, 1.0,
                             d_hat=head.project_map(fmap), d=target)
    imp = step_importance(select_by, mask_grad=mask.grad, deltas=deltas, pred=rows, target=target.reshape(-1, 3))
    # switching coordinate 0 off lowers the loss (ablation < 0) and moves it most (taylor); its error is the largest
    stands_out = int(imp.argmin()) if select_by in ("ablation", "worst") else int(imp.argmax())
    assert stands_out == 0  # coordinate 0 stands out by every criterion


# -- options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"task": "detect"}, "unknown --task"),
    ({"mimic_on": "tokens"}, "unknown --mimic-on"),
    ({"student_stage": 0}, "--student-stage must be >= 1"),
    ({"method": "online", "mimic_on": "dense"}, "--method online computes global targets only"),
    ({"elsh_bits": 8, "mimic_on": "both"}, "--elsh-bits hashes global targets"),
    ({"task": "segment", "classify_from": "coords"}, "pixel classifier reads the feature map"),
])
def test_bad_dense_options_are_one_line_errors(kw, match):
    with pytest.raises(TcskdError, match=match) as e:
        resolve_config(TrainConfig(cache="c", **kw))
    assert "\n" not in str(e.value)


def test_segment_and_dense_options_tailor_only_when_asked():
    assert resolve_config(TrainConfig(cache="c")).select_every == 0  # auto: off
    seg = resolve_config(TrainConfig(cache="c", task="segment"))
    assert seg.select_every == 0 and seg.classify_from == "feature"
    assert resolve_config(TrainConfig(cache="c", mimic_on="dense")).select_every == 0
    on = resolve_config(TrainConfig(cache="c", task="segment", tailor="on"))
    assert on.select_every == 1 and on.classify_from == "feature"


def test_dense_mimic_on_a_global_cache_is_refused_in_one_line(data, tmp_path):
    from tcskd.train.loop import train

    root, npz = data
    cache = make_train_cache(root, npz, name="global-only")
    for kw in ({"mimic_on": "dense"}, {"mimic_on": "both"}):
        with pytest.raises(TcskdError, match="holds global features; dense mimicking needs a cache built with "
                                             "`tcskd cache --tokens patch`") as e:
            train(TrainConfig(cache=str(cache), out=str(tmp_path / "r"), epochs=1, device="cpu", **kw))
        assert "\n" not in str(e.value)
    dense = make_dense_cache(root, npz, name="dense-elsh")
    with pytest.raises(TcskdError, match="--elsh-bits hashes global targets; it does not work with --mimic-on dense"):
        train(TrainConfig(cache=str(dense), out=str(tmp_path / "r2"), epochs=1, device="cpu", elsh_bits=8))
    with pytest.raises(TcskdError, match="holds token grids \\(--mimic-on global\\): use --elsh-bits 0"):
        train(TrainConfig(cache=str(dense), out=str(tmp_path / "r2g"), epochs=1, device="cpu", elsh_bits=8,
                          mimic_on="global"))
    assert not (tmp_path / "r2g").exists()
    with pytest.raises(TcskdError, match="--method online computes global targets only"):
        train(TrainConfig(cache=str(dense), out=str(tmp_path / "r3"), epochs=1, device="cpu", method="online"))
    with pytest.raises(TcskdError, match="--task segment: npz:.* has no masks"):
        train(TrainConfig(cache=str(dense), out=str(tmp_path / "r4"), epochs=1, device="cpu", task="segment"))


def test_the_pooled_feature_comes_from_the_map_only_when_forward_is_its_pool():
    from tcskd.train.model import StudentWithHead, pools_its_map
    from tcskd.train.students import make_student

    torch.manual_seed(0)
    last, early = make_student("cnn", 4, 1), make_student("cnn", 4, 1, 2)
    assert pools_its_map(last, 16) and not pools_its_map(early, 16)
    head = TCSHead(last.feature_dim, 4, 5, map_channels=last.map_channels, dense=True)
    x = torch.rand(3, 1, 16, 16)
    last.eval()
    f, logits, c_hat, d_hat, valid = StudentWithHead(last, head, pool_map=True).eval()(x)
    assert torch.allclose(f, last(x), atol=1e-5) and d_hat.shape == (3, 5, 4, 4) and c_hat.shape == (3, 5)
    assert valid is None
    assert torch.allclose(logits, head(last(x))[0], atol=1e-5)


def test_auto_on_a_patch_cache_is_dense_before_the_presets_apply(data, tmp_path):
    import yaml

    from tcskd.train.inputs import mimic_for_cache
    from tcskd.train.loop import train

    root, npz = data
    cache = make_dense_cache(root, npz, grid=(4, 4), k=6, name="auto")
    assert mimic_for_cache(TrainConfig(cache=str(cache))).mimic_on == "dense"
    assert mimic_for_cache(TrainConfig(cache=str(cache), method="ce")).mimic_on == "auto"
    assert mimic_for_cache(TrainConfig(cache=str(make_train_cache(root, npz, name="g")))).mimic_on == "auto"
    assert mimic_for_cache(TrainConfig(cache=str(tmp_path / "nothing"))).mimic_on == "auto"  # refused later
    res = train(TrainConfig(cache=str(cache), epochs=1, batch_size=8, device="cpu", out=str(tmp_path / "run")))
    assert res["mimic_on"] == "dense" and res["tailoring"] == "off" and res["dim"] == 6
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["mimic_on"] == "dense" and saved["select_every"] == 0
    again = train(TrainConfig(cache=str(cache), epochs=1, batch_size=8, device="cpu", out=str(tmp_path / "run"),
                              resume=True))  # resumes (finished): the saved dense equals auto made dense
    assert again["val_top1"] == res["val_top1"]


@pytest.mark.parametrize("aug", [None, "shift-flip"])
def test_aligning_the_map_before_projecting_equals_projecting_first(aug):
    # The model aligns the student's map to the teacher's grid and then projects it (cheap for a wide K);
    # on every location that counts this is the alignment of the projected map.
    from tcskd.train.losses import align_to_grid
    from tcskd.train.model import StudentWithHead
    from tcskd.train.students import make_student

    torch.manual_seed(0)
    student = make_student("segnet", 4, 1).eval()
    head = TCSHead(student.feature_dim, 4, 6, map_channels=student.map_channels, dense=True, task="segment").eval()
    x = torch.rand(4, 1, 32, 32)
    shifts = torch.tensor([[2.0, -3.0, 1.0], [0.0, 0.0, 0.0], [-4.0, 1.0, 0.0], [1.0, 5.0, 1.0]])
    a = shifts if aug else None
    with torch.no_grad():
        _, _, _, d_hat, valid = StudentWithHead(student, head)(x, None, (7, 7), a)
        first, valid_first = align_to_grid(head.project_map(student.feature_map(x)), (7, 7), a, 32)
    assert d_hat.shape == first.shape == (4, 6, 7, 7)
    keep = torch.ones(4, 7, 7, dtype=torch.bool) if valid is None else valid.bool()
    assert valid is None or (torch.equal(valid, valid_first) and 0 < keep.sum() < keep.numel())
    diff = (d_hat - first).abs().amax(1)[keep]
    assert diff.max() < 1e-4 * (1 + first.abs().max())
