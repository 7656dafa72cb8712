"""Scale-out on the CPU: 2 gloo processes under torchrun give the one-process results."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcskd.store.backends import open_store

from _stores import map_teacher
from conftest import make_npz, run_cli
from tcskd.results import without_timings

pytestmark = pytest.mark.slow
ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tcskd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _last_path(out: str) -> Path:
    return Path([l for l in out.strip().splitlines() if l.strip()][-1].strip())


#: global features; raw patch tokens of a tiny map teacher; their first 3 PCA coordinates (the basis fitted on a
#: sample of 30 images, split between the ranks, its moments all-reduced).
KINDS = {"global": [], "patch": ["--tokens", "patch"],
         "coords": ["--tokens", "patch", "--dim", "3", "--basis-sample", "30", "--dtype", "float32"]}


def _same_basis(a, b) -> None:
    """Two stores' token bases agree (summation order aside) and their coordinates with them."""
    from tcskd.store.bases import load_basis

    x, y = load_basis(a, "pca"), load_basis(b, "pca")
    np.testing.assert_allclose(y.eigenvalues, x.eigenvalues, rtol=1e-9)
    np.testing.assert_allclose(y.mean, x.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.abs((x.components * y.components).sum(1)), 1.0, atol=1e-8)
    assert x.attrs["sample_images"] == y.attrs["sample_images"] == 30
    np.testing.assert_allclose(b.read("features"), a.read("features"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_two_ranks_equals_one_process(tmp_path, tiny_teacher, kind):
    data = make_npz(tmp_path / "d.npz", n=70)
    teacher = tiny_teacher if kind == "global" else map_teacher(tmp_path / "teacher")
    args = ["cache", "--data", data, "--teacher", teacher, "--image-size", "16", "--chunk-rows", "8",
            "--batch-size", "4", "--views", "2", "--device", "cpu", *KINDS[kind]]
    one = run_cli([*args, "--cache-root", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = torchrun([*args, "--cache-root", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    p1, p2 = _last_path(one.stdout), tmp_path / "two" / _last_path(one.stdout).name
    with open_store(p1) as a, open_store(p2) as b:
        for name in ARRAYS:
            if name != "features" or kind != "coords":  # coordinates: up to the basis's summation order
                assert a.read(name).tobytes() == b.read(name).tobytes(), name
        if kind == "coords":
            _same_basis(a, b)
        assert b.manifest["complete"]

    # Resume: chunks lost by a one-process run are finished by 2 ranks, and the reverse.
    def drop(chunks):
        with open_store(p2, "a") as s:
            for c in chunks:
                s["chunk_done"][c] = False
            s.set_attrs({"complete": False})

    def same():
        with open_store(p1) as a, open_store(p2) as b:
            if kind == "coords":
                _same_basis(a, b)
            else:
                assert a.read("features").tobytes() == b.read("features").tobytes()
            assert b.manifest["complete"]

    drop([3, 6])
    again = torchrun([*args, "--cache-root", str(tmp_path / "two")], nproc=2)
    assert again.returncode == 0, again.stderr
    same()
    drop([0, 5, 8])
    one_more = run_cli([*args, "--cache-root", str(tmp_path / "two")])
    assert one_more.returncode == 0, one_more.stderr
    same()


def test_hdf5_under_torchrun_is_refused(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    r = torchrun(["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--format", "hdf5",
                  "--cache-root", str(tmp_path / "c")])
    assert r.returncode != 0 and "use --format zarr under torchrun" in r.stderr


def test_basis_two_ranks_equals_one_process(tmp_path, tiny_teacher):
    from tcskd.store.bases import load_basis

    data = make_npz(tmp_path / "d.npz", n=90)
    args = ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--chunk-rows", "8",
            "--dtype", "float32", "--cache-root", str(tmp_path / "c")]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    path = _last_path(r.stdout)
    one = run_cli(["basis", "--cache", str(path), "--name", "one", "--dim", "8", "--coords", "--device", "cpu"])
    assert one.returncode == 0, one.stderr
    two = torchrun(["basis", "--cache", str(path), "--name", "two", "--dim", "8", "--coords", "--device", "cpu"])
    assert two.returncode == 0, two.stderr
    with open_store(path) as s:
        a, b = load_basis(s, "one"), load_basis(s, "two")
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-9)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.abs((a.components * b.components).sum(1)), 1.0, atol=1e-8)
        np.testing.assert_allclose(s.read("bases/two/coords"), s.read("bases/one/coords"), atol=1e-3)
        # by default both leave the same validation rows out (8: 2 of each class's 22-23)
        assert a.attrs["rows_used"] == b.attrs["rows_used"] == 90 - 8 == 90 - b.attrs["held_out_count"]
        assert a.attrs["held_out_rows"] == b.attrs["held_out_rows"] is not None
    # NaN in one rank's share: every rank fails (none waits forever in all_reduce), naming the chunk.
    with open_store(path, "a") as s:
        s["features"][20, 0, 3] = np.nan
    bad = torchrun(["basis", "--cache", str(path), "--name", "bad", "--dim", "8", "--device", "cpu"], timeout=180)
    assert bad.returncode != 0
    assert "chunk 2 (rows 16-23)" in bad.stderr and "NaN/Inf" in bad.stderr, bad.stderr[-2000:]


# -- training: DDP equals one process, tailoring uses every rank's data, a DDP checkpoint resumes anywhere --

TESTS = Path(__file__).parent
# Runs under torchrun: the real CLI, with spies on the tailoring; every rank writes what it saw per selection
# step (the importance of its own rows since the last step, the importance of every rank's rows the loop added,
# the importance the selection used, the mask before/after).
SPY = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
import tcskd.train.loop as loop
from tcskd.cli import main

rank = int(os.environ["RANK"])
acc, log = {}, []
real_stats, real_combine, real_apply = loop.step_stats, loop.combine, loop.apply_selection

def stats(select_by, world, **kw):
    out = real_stats(select_by, world, **kw)
    own = real_combine(select_by, real_stats(select_by, 1, **kw))  # as if this rank's rows were the batch
    acc["local"] = acc.get("local", torch.zeros_like(own)) + own
    return out

def combine(select_by, summed):
    out = real_combine(select_by, summed)
    acc["global"] = acc.get("global", torch.zeros_like(out)) + out
    return out

def apply(head, schedule, epoch):
    before, used = head.mask.clone(), head.importance.clone()
    changed = real_apply(head, schedule, epoch)
    zeros = torch.zeros_like(used)
    log.append({"epoch": epoch, "changed": changed, "local": acc.get("local", zeros).tolist(),
                "global": acc.get("global", zeros).tolist(), "used": used.tolist(),
                "mask_before": before.tolist(), "mask": head.mask.tolist(),
                "keep": schedule.keep(int(before.sum().item()))})
    if changed:
        acc.clear()
    return changed

loop.step_stats, loop.combine, loop.apply_selection = stats, combine, apply
runs = json.loads(sys.argv[2])
for name, args in runs.items():
    acc.clear()
    log.clear()
    main(["-q", "train", *args], standalone_mode=False)
    with open(os.path.join(os.path.dirname(args[args.index("--out") + 1]), f"{name}.rank{rank}.json"), "w") as fh:
        json.dump(log, fh)
"""
CRITERIA = ("error", "worst", "taylor", "ablation")
#: The taylor run also mirrors its metrics to TensorBoard (--log), when the package is installed.
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _toy_args(cache: Path, out: Path, select_by: str, *extra: str) -> list[str]:
    """A learnable toy (tests/test_method_toy.py) and a student without BatchNorm, every label: then
    2 ranks of 16 images compute the gradient of the same 32-image batch as one process does."""
    return ["--cache", str(cache), "--basis", "id", "--student", "python:test_method_toy:tiny_mlp",
            "--optimizer", "adamw", "--lr", "0.003", "--batch-size", "32", "--augment", "none", "--epochs", "4",
            "--select-every", "2", "--drop-frac", "0.5", "--min-dim", "4", "--select-by", select_by,
            "--classify-from", "feature", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch: a full 2-rank run per criterion, and an 'error' run stopped after epoch 1."""
    import json

    from test_method_toy import make_tailor_toy

    root = tmp_path_factory.mktemp("ddp")
    cache = make_tailor_toy(root / "toy")
    runs = {c: _toy_args(cache, root / c, c, *(["--log", "tensorboard"] if c == "taylor" and TENSORBOARD else []))
            for c in CRITERIA}
    runs["stopped"] = _toy_args(cache, root / "stopped", "error", "--stop-after", "1")
    script = root / "spy.py"
    script.write_text(SPY)
    # The tests' modules, then this checkout's tcskd (whichever checkout an editable install points to).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(TESTS), json.dumps(runs)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = {name: [json.loads((root / f"{name}.rank{k}.json").read_text()) for k in (0, 1)] for name in runs}
    return root, cache, logs


@pytest.fixture(scope="module")
def one_process_runs(ddp_runs, tmp_path_factory):
    """The same runs in this process (one intra-op thread, as each rank had): final.json per criterion."""
    import torch

    from tcskd.train.loop import TrainConfig, train

    _, cache, _ = ddp_runs
    root = tmp_path_factory.mktemp("one")
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {c: (root / c, train(TrainConfig(
            cache=str(cache), basis="id", student="python:test_method_toy:tiny_mlp", optimizer="adamw", lr=0.003,
            batch_size=32, augment="none", epochs=4, select_every=2, drop_frac=0.5, min_dim=4, select_by=c,
            classify_from="feature", device="cpu", workers=0, out=str(root / c)))) for c in CRITERIA}
    finally:
        torch.set_num_threads(was)


def _metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("select_by", CRITERIA)
def test_ddp_selection_uses_the_importance_of_every_rank(ddp_runs, one_process_runs, select_by):
    import json

    import torch

    from test_method_toy import NOISE, PREDICTABLE
    from tcskd.train.selection import select

    root, cache, logs = ddp_runs
    r0, r1 = logs[select_by]
    assert [e["epoch"] for e in r0] == [e["epoch"] for e in r1] == [0, 1, 2, 3]
    steps = [i for i, e in enumerate(r0) if e["changed"]]
    assert steps == [1] and [e["changed"] for e in r1] == [e["changed"] for e in r0]  # after epoch 2 only
    a, b = r0[1], r1[1]
    local0, local1 = torch.tensor(a["local"]), torch.tensor(b["local"])  # each rank's own rows, epoch 2
    assert not torch.allclose(local0, local1, rtol=1e-3)  # the ranks saw different images
    used = torch.tensor(a["used"])
    assert a["used"] == b["used"] == a["global"] == b["global"]  # both ranks select on the global batches' sum
    # ...which is neither rank's own importance (error, worst: nor the mean of the ranks' ratios)
    assert not torch.allclose(used, local0, rtol=1e-3) and not torch.allclose(used, local1, rtol=1e-3)
    if select_by in ("error", "worst"):  # one ratio over the 32 rows, not the mean of two 16-row ratios
        assert not torch.allclose(used, (local0 + local1) / 2, rtol=1e-4)
    assert a["mask"] == b["mask"]  # and keep the same coordinates
    assert a["mask"] == select(used, torch.tensor(a["mask_before"]), a["keep"]).tolist()
    kept = [i for i, m in enumerate(a["mask"]) if m]
    if select_by != "taylor":  # taylor's magnitude cannot tell noise from a followed target (test_method_toy)
        assert kept == (NOISE if select_by == "error" else PREDICTABLE)
    run = root / select_by
    rows = _metrics(run)  # one writer, rank 0
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and [r["active_coords"] for r in rows] == [8, 8, 4, 4]
    assert "world_size: 2" in (run / "config.yaml").read_text()
    ddp = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ddp["head"]["mask"].tolist() == a["mask"]
    # The checkpoint's importance (epochs 3-4) is what every rank holds: the global batches'.
    assert torch.equal(ddp["head"]["importance"], torch.tensor(r0[3]["global"]))
    assert r0[3]["global"] == r1[3]["global"]

    # One process on the same global batches: the same coordinates, weights and scores.
    final = json.loads((run / "final.json").read_text())
    one_dir, one = one_process_runs[select_by]
    ref = torch.load(one_dir / "checkpoint.pt", weights_only=True)
    assert torch.equal(ref["head"]["mask"], ddp["head"]["mask"]) and ref["step"] == ddp["step"]
    for part in ("student", "head"):
        for k in ref[part]:
            if k != "importance":  # its scale: test_ddp_importance_is_the_one_process_importance
                assert torch.allclose(ddp[part][k], ref[part][k], rtol=1e-4, atol=1e-6), (part, k)
    for key in ("val_top1", "test_top1", "knn_top1", "active_coords"):
        assert final[key] == one[key], key
    assert final["test_top1"] >= 0.25 + 0.25 and final["val_top1"] >= 0.25 + 0.25  # 4 classes


@pytest.mark.parametrize("select_by", CRITERIA)
def test_ddp_importance_is_the_one_process_importance(ddp_runs, one_process_runs, select_by):
    import torch

    root, _, _ = ddp_runs
    ddp = torch.load(root / select_by / "checkpoint.pt", weights_only=True)["head"]["importance"]
    ref = torch.load(one_process_runs[select_by][0] / "checkpoint.pt", weights_only=True)["head"]["importance"]
    # every rank adds the global batch's importance (error, worst: one ratio over both ranks' rows); the only
    # difference left is the weights', which agree to rounding (see above)
    assert torch.allclose(ddp, ref, rtol=1e-4, atol=1e-6), (ddp / ref).tolist()


@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is not installed (pip install 'tcskd[tensorboard]')")
def test_ddp_only_rank_0_logs(ddp_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = ddp_runs[0] / "taylor"
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    rows = _metrics(run)
    assert [(e.step, e.value) for e in acc.Scalars("epoch/loss")] == \
        [(r["epoch"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]


def test_ddp_checkpoint_resumed_in_one_process_equals_the_uninterrupted_run(ddp_runs):
    import json

    import torch

    root, cache, logs = ddp_runs
    out = root / "stopped"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and not (out / "final.json").exists()
    # Stopped between two selection steps (epoch 1 is the warm-up: nothing gathered yet), rank 0's checkpoint
    # holds what both ranks hold.
    r0, r1 = logs["stopped"]
    assert len(r0) == len(r1) == 1 and not r0[0]["changed"]
    assert r0[0]["used"] == r1[0]["used"] == ck["head"]["importance"].tolist() == [0.0] * 8
    # The DDP checkpoint continues in a single process (the CLI takes the saved options).
    one = run_cli(["train", "--out", str(out), "--resume", "--device", "cpu"],
                  env={"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])})
    assert one.returncode == 0, one.stderr[-3000:]
    full = root / "error"
    a, b = json.loads((full / "final.json").read_text()), json.loads((out / "final.json").read_text())
    for key in ("val_top1", "test_top1", "knn_top1", "knn_val_top1", "active_coords", "epochs", "best_val_top1",
                "kept_ranks", "final_kept_ranks"):  # the record of the kept ranks survives the resume
        assert b[key] == a[key], key
    ra, rb = _metrics(full), _metrics(out)
    assert [r["epoch"] for r in rb] == [1, 2, 3, 4]
    assert without_timings(rb[0]) == without_timings(ra[0])
    for x, y in zip(ra[1:], rb[1:]):  # epochs 2-4 in one process: the same losses up to rounding
        assert x["active_coords"] == y["active_coords"] and x["val_top1"] == y["val_top1"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4) and x["lr"] == pytest.approx(y["lr"], rel=1e-12)
    ca, cb = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, out))
    assert ca["epoch"] == cb["epoch"] == 4 and ca["step"] == cb["step"]
    assert torch.equal(ca["head"]["mask"], cb["head"]["mask"])
    for part in ("student", "head"):
        for k in ca[part]:
            if k != "importance":  # error: the importance of the stopped run's epochs 2-4 is compared above
                assert torch.allclose(ca[part][k], cb[part][k], rtol=1e-4, atol=1e-6), (part, k)
    assert "world_size: 1" in (out / "config.yaml").read_text()


def test_sync_bn_needs_cuda(tmp_path):
    from click.testing import CliRunner

    from tcskd.cli import main

    data = make_npz(tmp_path / "d.npz")
    r = CliRunner().invoke(main, ["train", "--data", data, "--method", "ce", "--device", "cpu", "--sync-bn",
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "--sync-bn needs CUDA" in r.output


# -- dense segmentation under DDP ------------------------------------------------------------------------

def test_ddp_trains_a_dense_segment_run_and_resumes_it(tmp_path):
    import json

    import torch

    from _train_fixtures import make_dense_cache, make_seg_npz

    npz = make_seg_npz(tmp_path / "s.npz", n_train=48, n_test=8, size=16)
    cache = make_dense_cache(tmp_path, npz, grid=(4, 4), dim=16, k=8, from_masks=True, name="seg")
    args = ["train", "--cache", str(cache), "--task", "segment", "--student", "cnn", "--epochs", "2",
            "--batch-size", "16", "--labels-per-class", "4", "--augment", "crop-flip", "--device", "cpu",
            "--val-frac", "0.25"]
    full = torchrun([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    final = json.loads((tmp_path / "full" / "final.json").read_text())
    assert final["task"] == "segment" and final["mimic_on"] == "dense"
    # the saved model's scores, recomputed by hand from its predictions (a confusion matrix in numpy)
    from _seg_check import predictions_and_masks, scores_by_hand
    from tcskd.train.config import TrainConfig, resolve_config
    from tcskd.train.inputs import load_run_inputs

    prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), task="segment", labels_per_class=4,
                                                      val_frac=0.25, device="cpu", workers=0)))
    for split, ds in (("val", prep.val_set), ("test", prep.test_set)):
        by_hand = scores_by_hand(*predictions_and_masks(tmp_path / "full", ds), classes=5)
        assert (final[f"{split}_miou"], final[f"{split}_pixel_acc"]) == pytest.approx(by_hand, abs=1e-9), split
    rows = _metrics(tmp_path / "full")
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["loss_dense"] > 0 and r["val_miou"] for r in rows)
    assert "world_size: 2" in (tmp_path / "full" / "config.yaml").read_text()
    # stopped after epoch 1 and resumed by 2 ranks: the uninterrupted run's weights and scores
    stopped = torchrun([*args, "--out", str(tmp_path / "part"), "--stop-after", "1"])
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = torchrun([*args, "--out", str(tmp_path / "part"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "part" / "final.json").read_text())
    for key in ("val_miou", "test_miou", "val_pixel_acc", "test_pixel_acc"):
        assert again[key] == final[key], key
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
