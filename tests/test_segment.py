"""``tcskd train --task segment`` and dense runs end to end: dense TCS beats CE with few labelled masks, masks
and splits, the metrics, resume, export (pt2 and ONNX), and one-line errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _seg_check import predictions_and_masks, scores_by_hand
from _train_fixtures import make_dense_cache, make_npz, make_seg_npz
from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.data import EpochSampler, apply_augment
from tcskd.train.evaluate import segment_scores
from tcskd.train.export import export_run, load_run
from tcskd.train.inputs import load_run_inputs
from tcskd.train.loop import train
from tcskd.views import apply_mask_view

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript or onnxruntime is not installed (pip install 'tcskd[onnx]')")


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    npz = make_seg_npz(root / "s.npz", n_train=96, n_test=8, size=16, seed=0)
    cache = make_dense_cache(root, npz, grid=(4, 4), dim=16, k=8, from_masks=True, name="seg")
    return root, npz, cache


def _cfg(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache) if cache is not None else None, task="segment", student="cnn", epochs=2, batch_size=16, lr=0.02, device="cpu",
                workers=0, out=str(out), val_frac=0.25)
    return TrainConfig(**{**base, **kw})


def test_dense_tcs_beats_ce_with_few_labelled_masks(seg, tmp_path):
    # The fake teacher's tokens encode the classes of their patch: mimicking them on every image teaches the
    # student what 8 labelled masks alone do not (same seed, epochs, schedule; validation mIoU). Measured on
    # 3 synthetic datasets x 2 seeds: +0.13 to +0.25 mIoU (0.29-0.35 -> 0.41-0.55).
    _, _, cache = seg
    opts = dict(epochs=12, labels_per_class=8, eval_every=12, seed=0, warmup_epochs=0)
    ce = train(_cfg(cache, tmp_path / "ce", method="ce", **opts))
    tcs = train(_cfg(cache, tmp_path / "tcs", method="tcs", **opts))
    assert tcs["mimic_on"] == "dense" and ce["mimic_on"] is None
    assert tcs["labelled_images"] == ce["labelled_images"] == 8
    assert tcs["val_miou"] > ce["val_miou"] + 0.05, (tcs["val_miou"], ce["val_miou"])


def test_a_segment_run_reports_miou_every_epoch_and_on_test_once(seg, tmp_path):
    _, _, cache = seg
    res = train(_cfg(cache, tmp_path / "run", labels_per_class=5))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    prep = load_run_inputs(resolve_config(_cfg(cache, tmp_path / "x", labels_per_class=5)))
    classes = 5  # background and 4 textures
    val_pred, val_truth = predictions_and_masks(tmp_path / "run", prep.val_set)
    counted = int((val_truth != 255).sum())
    for r in rows:
        # a share of the counted validation pixels, as a whole number of them
        right = r["val_pixel_acc"] * counted
        assert r["val_top1"] is None and abs(right - round(right)) < 1e-6
        assert r["loss_dense"] > 0 and r["loss_mimic"] == 0
    assert res["task"] == "segment" and res["val_top1"] is None and res["knn_top1"] is None
    assert res["val_miou"] == rows[-1]["val_miou"] and res["best_val_miou"] == max(r["val_miou"] for r in rows)
    # the last epoch's validation and the test split's scores are the saved model's, recomputed by hand
    by_hand = scores_by_hand(val_pred, val_truth, classes)
    assert (rows[-1]["val_miou"], rows[-1]["val_pixel_acc"]) == pytest.approx(by_hand, abs=1e-9)
    test_pred, test_truth = predictions_and_masks(tmp_path / "run", prep.test_set)
    test_by_hand = scores_by_hand(test_pred, test_truth, classes)
    assert (res["test_miou"], res["test_pixel_acc"]) == pytest.approx(test_by_hand, abs=1e-9)
    student, head, _ = load_run(tmp_path / "run")
    assert (res["test_miou"], res["test_pixel_acc"]) == segment_scores(student, head, prep.test_set,
                                                                       torch.device("cpu"), 64, 0)
    assert json.loads((tmp_path / "run" / "final.json").read_text())["test_miou"] == res["test_miou"]


def test_masks_follow_the_view_and_augmentation_and_unlabelled_images_are_ignored(seg):
    _, npz, cache = seg
    prep = load_run_inputs(resolve_config(_cfg(cache, "unused", labels_per_class=3, seed=4, augment="crop-flip")))
    ds = prep.train_set
    assert prep.n_labelled == 3 and int(ds.mask_rows.sum()) == 3
    y = np.load(npz)["y"]
    batch = ds.__getitems__(list(EpochSampler(len(ds), 1, seed=4, epoch=1)))
    assert batch.mask.shape == (len(ds), 16, 16) and batch.dense.shape == (len(ds), 16, 8)
    for j, i in enumerate(batch.item.tolist()):
        if not ds.mask_rows[i]:
            assert (batch.mask[j] == 255).all()  # CE sees no pixel of it; the dense mimic sees the image
            continue
        view = apply_mask_view(torch.from_numpy(y[ds.rows[i]]), ds.params[i, 0], 16)
        assert torch.equal(batch.mask[j], apply_augment(view[None], batch.aug[j:j + 1], fill=255)[0])
    assert batch.aug[:, :2].abs().sum() > 0 and batch.aug[:, 2].sum() > 0  # shifts and flips happened


def test_the_validation_split_of_segmentation_data_is_a_share_of_the_images_for_every_seed(seg):
    _, _, cache = seg
    a = load_run_inputs(resolve_config(_cfg(cache, "u", seed=0, labels_per_class=2)))
    b = load_run_inputs(resolve_config(_cfg(cache, "u", seed=1, labels_per_class=2)))
    assert a.split["val"] == b.split["val"] and len(a.split["val"]) == 24  # 25 % of 96 images
    assert a.split["labelled"] != b.split["labelled"]  # the labelled images follow the run's seed
    assert not set(a.split["val"]) & set(a.split["labelled"])
    n = load_run_inputs(resolve_config(_cfg(cache, "u", val_frac=0.1, val_per_class=5)))
    assert len(n.split["val"]) == 5  # --val-per-class: images


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, prog_name="tcskd")


def test_segmentation_errors_are_one_line(seg, tmp_path):
    root, npz, cache = seg
    plain = make_npz(tmp_path / "plain.npz", n_train=16, n_test=4, size=16)
    with pytest.raises(TcskdError, match=r"--task segment: npz:.*plain.npz has no masks"):
        train(_cfg(None, tmp_path / "r", method="ce", data=f"npz:{plain}"))
    z = dict(np.load(npz))
    z["y"] = z["y"][:, :12, :12]  # masks smaller than their images
    np.savez(tmp_path / "bad.npz", **z)
    r = _invoke(["train", "--task", "segment", "--method", "ce", "--data", f"npz:{tmp_path / 'bad.npz'}",
                 "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "masks are 12x12" in r.output and "16x16" in r.output, r.output
    assert not (tmp_path / "r2").exists()  # refused before anything was written
    r = _invoke(["train", "--method", "ce", "--data", f"npz:{npz}", "--epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "r3")])  # masks and no image labels: classification makes no sense
    assert r.exit_code == 2 and r.output.strip().endswith("has per-pixel masks and no image labels: train it with "
                                                          "--task segment"), r.output
    assert not (tmp_path / "r3").exists()


def _export_check(run_dir, tmp_path, fmt):
    student, head, meta = load_run(run_dir)
    path = export_run(run_dir, tmp_path / f"model.{fmt}")
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = (head.segment(student.feature_map(x), (16, 16)) if head.task == "segment"
                else head(student(x))[0])
    if fmt == "onnx":
        import onnxruntime

        (got,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})
        got = torch.from_numpy(got)
    else:
        got = torch.export.load(str(path)).module()(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    return json.loads((tmp_path / f"model.{fmt}.json").read_text()), path


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=[needs_onnx, pytest.mark.slow])])
def test_a_segment_run_exports_per_pixel_logits(seg, tmp_path, fmt):
    _, _, cache = seg
    train(_cfg(cache, tmp_path / "run", epochs=1, mimic_on="dense"))
    info, _ = _export_check(tmp_path / "run", tmp_path, fmt)
    assert info["task"] == "segment" and info["output"].startswith("B x num_classes x S x S")


def test_a_classify_run_with_dense_mimic_exports_as_a_plain_student(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n_train=32, n_test=8, size=16)
    cache = make_dense_cache(tmp_path, npz, grid=(4, 4), k=6, name="cls")
    res = train(TrainConfig(cache=str(cache), mimic_on="both", student="cnn", epochs=1, batch_size=8,
                            device="cpu", workers=0, out=str(tmp_path / "run"), tailor="off"))
    assert res["task"] == "classify" and res["mimic_on"] == "both" and res["test_top1"] is not None
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_mimic"] > 0 and rows[0]["loss_dense"] > 0 and "val_miou" not in rows[0]
    info, path = _export_check(tmp_path / "run", tmp_path, "pt2")
    assert info["output"] == "B x num_classes logits" and "task" not in info
    names = set(torch.export.load(str(path)).state_dict)
    assert names and all(n.startswith(("student.", "classifier.")) for n in names)  # no projector of either kind


@pytest.mark.slow
def test_a_dense_segment_run_resumed_equals_an_uninterrupted_one(seg, tmp_path):
    _, _, cache = seg
    opts = dict(epochs=3, labels_per_class=4, seed=2, augment="crop-flip", mimic_on="dense", select_every=1,
                drop_frac=0.25, min_dim=4, select_by="error")
    full = train(_cfg(cache, tmp_path / "full", **opts))
    assert train(_cfg(cache, tmp_path / "part", stop_after=1, **opts))["stopped_after"] == 1
    part = train(_cfg(cache, tmp_path / "part", resume=True, **opts))
    for key in ("val_miou", "test_miou", "val_pixel_acc", "test_pixel_acc", "best_val_miou", "active_coords"):
        assert part[key] == full[key], key
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    for piece in ("student", "head"):
        for k in a[piece]:
            assert torch.equal(a[piece][k], b[piece][k]), (piece, k)
    assert a["head"]["mask"].sum() < 8  # tailoring worked on the dense coordinates


def test_student_stage_chooses_the_map_the_dense_head_reads(tmp_path):
    # cnn stage 2: 64 channels at stride 2 (8 x 8 at 16 px), averaged over each 4 x 4-pixel teacher cell
    npz = make_npz(tmp_path / "d.npz", n_train=24, n_test=8, size=16)
    cache = make_dense_cache(tmp_path, npz, grid=(4, 4), k=6, name="stage")
    res = train(TrainConfig(cache=str(cache), student="cnn", student_stage=2, epochs=1, batch_size=8, device="cpu",
                            workers=0, out=str(tmp_path / "run"), tailor="off"))
    ck = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ck["head"]["dense_projector.weight"].shape == (6, 64, 1, 1) and ck["meta"]["student_stage"] == 2
    assert res["mimic_on"] == "dense" and "projector.weight" not in ck["head"]
    student, head, _ = load_run(tmp_path / "run")
    assert student.stage == 2 and head(student(torch.rand(2, 1, 16, 16)))[0].shape == (2, 4)
    with pytest.raises(TcskdError, match="stage"):
        train(TrainConfig(cache=str(cache), student="cnn", student_stage=9, epochs=1, device="cpu",
                          out=str(tmp_path / "bad")))
