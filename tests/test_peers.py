"""Peer arms (tcskd.bench.peers): torchdistill's and timm's own distillation machinery on tcskd's job.

Parity checks that fail when the harness is wrong: the peer's teacher (hooked inside torchdistill's box,
normalised by timm's task) gives the cached features of the same centre-view rows; the peer's first FitNet
loss equals tcskd fitnet's on the same batch and initialisation; the CE-only arms reproduce ``tcskd train
--method ce`` step for step; the learning rate follows tcskd's per-step schedule; the teacher leaves training
as it came and out of the optimizer. Skipped with a reason when the ``peers`` extra is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from _train_fixtures import make_npz
from conftest import one_line_error
from tcskd.cache.build import build_cache
from tcskd.cache.config import CacheConfig

torchdistill = pytest.importorskip("torchdistill", reason="the peers extra is not installed (pip install 'tcskd[peers]')")
timm = pytest.importorskip("timm", reason="the peers extra is not installed (pip install 'tcskd[peers]')")

from tcskd.bench.peers import PeerConfig, prepare  # noqa: E402
from tcskd.bench.peers.glue import LabelledCrossEntropy, state_digest  # noqa: E402
from tcskd.bench.peers.run import make_arm, run_arm  # noqa: E402
from tcskd.errors import TcskdError  # noqa: E402
from tcskd.train.config import resolve_config  # noqa: E402
from tcskd.train.inputs import load_run_inputs  # noqa: E402
from tcskd.train.losses import tcs_loss  # noqa: E402
from tcskd.train.model import build_models  # noqa: E402
from tcskd.train.schedule import lr_at  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_teacher):
    """A real cache (the tiny torchscript teacher at 16 px) of a 40-image, 4-class npz: 36 train rows after the
    held-out 10 %, batches of 8."""
    root = tmp_path_factory.mktemp("peers")
    npz = make_npz(root / "d.npz", n_train=40, n_test=16)
    res = build_cache(CacheConfig(data=f"npz:{npz}", teacher=tiny_teacher, image_size=16, chunk_rows=16,
                                  batch_size=8, device="cpu", workers=0, cache_root=str(root / "caches")))
    return root, str(res.path)


def _cfg(job, arm: str, **kw) -> PeerConfig:
    root, cache = job
    base = dict(arm=arm, cache=cache, epochs=2, batch_size=8, labels_per_class=3, device="cpu", workers=0,
                augment="none", out=str(root / "runs" / arm))
    base.update(kw)
    return PeerConfig(**base)


def _first_batch(loader):
    loader.sampler.epoch = 0
    return next(iter(loader))


def _arm_and_first_batch(job, arm: str):
    """(config, prepared job, the arm, its loader's first batch of epoch 0) of ``arm`` on the test job."""
    cfg = _cfg(job, arm)
    p = prepare(cfg)
    a, loader = make_arm(p)
    return cfg, p, a, _first_batch(loader)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def _tcskd_fitnet(cfg: PeerConfig):
    """tcskd fitnet's data (cached targets, scaled) and models at the same seed."""
    fcfg = resolve_config(cfg.train_config("fitnet"))
    prep = load_run_inputs(fcfg)
    student, head = build_models(fcfg, prep)
    return fcfg, prep, student, head


@pytest.mark.parametrize("arm", ["torchdistill-fitnet", "timm-fitnet"])
def test_the_peer_teacher_gives_the_cached_features_of_the_same_rows(job, arm):
    cfg, p, a, batch = _arm_and_first_batch(job, arm)
    if arm == "torchdistill-fitnet":  # the output torchdistill's forward hook on `embedding` records
        _, io = a.box.get_teacher_output(batch.x, batch.label, None)
        live = io["embedding"]["output"]
    else:  # timm: the task maps the student's input to the teacher's normalisation, then the pooled features
        t = a.task
        with torch.no_grad():
            live = t.teacher(t.teacher.normalize_input(batch.x, t.student_mean, t.student_std), return_features=True)
    _, fprep, _, _ = _tcskd_fitnet(cfg)
    cached = torch.from_numpy(np.asarray(fprep.train_set.targets[batch.item.numpy(), 0]))  # the same rows, scaled
    assert fprep.target_scale == pytest.approx(p.target_scale, rel=1e-6)
    assert live.shape == cached.shape == (8, 16)
    assert _cos(live, cached).min() >= 0.999
    ratio = live.norm(dim=1) / cached.norm(dim=1)
    assert float((ratio - 1).abs().max()) < 5e-3
    # a wrong normalisation (the teacher's input left in [0, 1]) is caught by the same check
    if arm == "torchdistill-fitnet":
        p.teacher.normalize = False
        with torch.no_grad():
            wrong = p.teacher(batch.x)
        assert _cos(wrong, cached).min() < 0.999


@pytest.mark.parametrize("arm", ["torchdistill-fitnet", "timm-fitnet"])
def test_the_first_fitnet_loss_equals_tcskd_fitnet(job, arm):
    cfg, p, a, batch = _arm_and_first_batch(job, arm)
    assert int((batch.label >= 0).sum()) > 0  # the batch has labels: both terms count
    fcfg, fprep, student, head = _tcskd_fitnet(cfg)
    # the same initialisation: the peer starts from tcskd fitnet's student, classifier and projector
    for mine, theirs in ((student, p.student.backbone), (head.classifier, p.student.classifier),
                         (head.projector, a.regressor)):
        for u, v in zip(mine.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(u, v)
    a.begin_epoch(0)
    peer = float(a.first_loss(batch.x, batch.label).detach())
    student.train()
    head.train()
    c = torch.from_numpy(np.asarray(fprep.train_set.targets[batch.item.numpy(), 0]))
    f = student(batch.x)
    logits, c_hat = head(f)
    mine = float(tcs_loss(logits, batch.label, c_hat, c, head.mask, fcfg.lam).total.detach())
    assert abs(peer - mine) / abs(mine) < 1e-3
    # the mimic term is most of it (a harness that dropped it, or lambda, would fail above)
    ce_only = float(tcs_loss(logits, batch.label, None, None, None, 0.0).total.detach())
    assert abs(peer - ce_only) / abs(mine) > 0.05


def test_a_batch_without_labels_costs_no_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    none = torch.full((4,), -1)
    assert math.isnan(float(torch.nn.CrossEntropyLoss(ignore_index=-1)(logits, none).detach()))  # the pitfall
    loss = LabelledCrossEntropy()(logits, none)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
    y = torch.tensor([2, -1, 0, -1])
    want = torch.nn.functional.cross_entropy(logits[[0, 2]], y[[0, 2]])
    assert float(LabelledCrossEntropy()(logits, y).detach()) == pytest.approx(float(want.detach()), rel=1e-6)


@pytest.mark.parametrize("arm", ["torchdistill-fitnet", "timm-fitnet", "torchdistill-ce", "timm-ce"])
def test_lr_per_step_teacher_frozen_and_out_of_the_optimizer(job, arm):
    cfg = _cfg(job, arm, epochs=3, warmup_epochs=1.0)
    p = prepare(cfg)
    a, loader = make_arm(p)
    steps_per_epoch = 36 // 8
    total = 3 * steps_per_epoch
    before = state_digest(p.teacher) if p.teacher is not None else None
    seen = []
    for epoch in range(2):
        loader.sampler.epoch = epoch
        a.begin_epoch(epoch)
        for batch in loader:
            seen.append(a.lr())
            a.step(batch.x, batch.label)
        a.end_epoch()
    want = [lr_at(s, total, steps_per_epoch, 0.05) for s in range(2 * steps_per_epoch)]
    assert seen == pytest.approx(want, rel=1e-12)  # per step, warm-up included; an epoch-stepped one is flat
    n_trained = sum(q.numel() for q in a.trained_parameters())
    tcskd_params = sum(q.numel() for q in p.student.parameters())  # student + classifier
    if p.teacher is not None:
        tcskd_params += p.head.projector.weight.numel() + p.head.projector.bias.numel()
        assert not p.teacher.training and state_digest(p.teacher) == before
    assert n_trained == tcskd_params


def test_the_ce_arms_reproduce_tcskd_ce_step_for_step(job):
    from tcskd.train.loop import train
    from tcskd.train.rundir import read_metrics

    root, cache = job
    cfg = _cfg(job, "torchdistill-ce", augment="auto", batch_size=18)  # 2 steps per epoch, 2 epochs
    ours = train(dataclasses.replace(cfg.train_config("ce"), out=str(root / "runs" / "tcskd-ce")))
    rows = read_metrics(root / "runs" / "tcskd-ce" / "metrics.jsonl", 2)
    for arm in ("torchdistill-ce", "timm-ce"):
        final = run_arm(dataclasses.replace(cfg, arm=arm, out=str(root / "runs" / arm)))
        peer_rows = [json.loads(r) for r in (root / "runs" / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in peer_rows] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
        assert final["val_top1"] == ours["val_top1"] and final["test_top1"] == ours["test_top1"]
        assert final["method"] == arm and final["peers"][arm.split("-")[0]] is not None


def test_a_fitnet_run_writes_a_final_json_that_tcskd_report_tables(job):
    from tcskd.train.report import load_runs, markdown_table

    cfg = _cfg(job, "torchdistill-fitnet", epochs=1)
    final = run_arm(cfg)
    saved = json.loads((job[0] / "runs" / "torchdistill-fitnet" / "final.json").read_text())
    assert saved["method"] == "torchdistill-fitnet" and saved["dim"] == 16 and saved["basis_kind"] == "identity"
    assert saved["peers"]["torchdistill"] == torchdistill.__version__
    assert saved["epoch_seconds"] and saved["seconds_per_epoch"] == saved["epoch_seconds"][0]
    assert saved["train_images"] == 36 and saved["labelled_images"] == 12 and saved["val_rows"] == 4
    assert final["test_top1"] == saved["test_top1"]
    table = markdown_table(load_runs([job[0] / "runs" / "torchdistill-fitnet"]))
    assert "torchdistill-fitnet" in table


def test_bad_options_are_one_line(job):
    with pytest.raises(TcskdError, match="unknown peer arm 'kd'"):
        _cfg(job, "kd").validate()
    with pytest.raises(TcskdError, match="--epochs must be >= 1"):
        _cfg(job, "timm-ce", epochs=0).validate()


def test_the_built_in_teacher_inside_torchdistill_gives_its_cached_features(tmp_path):
    """The real default teacher (EfficientNet-Lite0 at 112 px, inputs scaled to [-1, 1]) on 20 digits."""
    res = build_cache(CacheConfig(data="builtin:mnist5k", teacher="builtin:efficientnet-lite0", image_size=112,
                                  limit=20, batch_size=20, device="cpu", workers=0, cache_root=str(tmp_path)))
    cfg = PeerConfig(arm="torchdistill-fitnet", cache=str(res.path), batch_size=16, val_frac=0.0, device="cpu",
                     workers=0, augment="none", epochs=1)
    p = prepare(cfg)
    a, loader = make_arm(p)
    batch = _first_batch(loader)
    _, io = a.box.get_teacher_output(batch.x, batch.label, None)
    _, fprep, _, _ = _tcskd_fitnet(cfg)
    cached = torch.from_numpy(np.asarray(fprep.train_set.targets[batch.item.numpy(), 0]))
    live = io["embedding"]["output"]
    assert live.shape == (16, 1280)
    assert _cos(live, cached).min() >= 0.999
    # the cache rounds the resized input to whole grey levels (uint8), the peer resizes floats: norms within 2 %
    assert float((live.norm(dim=1) / cached.norm(dim=1) - 1).abs().max()) < 2e-2


def test_the_control_tcskd_online_identity_and_the_peer_fitnets_follow_one_objective(tmp_path, tiny_teacher):
    """Without augmentation, tcskd online with the identity basis and both peers' FitNet optimise the same
    objective from the same start on the same batches: their epoch losses agree (the cache's uint8 rounding of
    the teacher's input is the one difference) and far closer than to CE alone."""
    from tcskd.subspace.config import BasisConfig
    from tcskd.subspace.fit import fit_basis
    from tcskd.train.loop import train
    from tcskd.train.rundir import read_metrics

    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    res = build_cache(CacheConfig(data=f"npz:{npz}", teacher=tiny_teacher, image_size=16, chunk_rows=16,
                                  batch_size=8, device="cpu", workers=0, cache_root=str(tmp_path / "caches")))
    fit_basis(BasisConfig(cache=str(res.path), name="identity", kind="identity", exclude_val=True, device="cpu"))
    cfg = _cfg((tmp_path, str(res.path)), "torchdistill-fitnet", batch_size=18)
    online = dataclasses.replace(cfg.train_config("online"), basis="identity", dim=16, out=str(tmp_path / "online"))
    train(online)
    ours = [r["loss"] for r in read_metrics(tmp_path / "online" / "metrics.jsonl", 2)]
    ce = dataclasses.replace(cfg.train_config("ce"), out=str(tmp_path / "ce"))
    train(ce)
    ce_loss = [r["loss"] for r in read_metrics(tmp_path / "ce" / "metrics.jsonl", 2)]
    for arm in ("torchdistill-fitnet", "timm-fitnet"):
        run_arm(dataclasses.replace(cfg, arm=arm, out=str(tmp_path / arm)))
        peer = [json.loads(r)["loss"] for r in (tmp_path / arm / "metrics.jsonl").read_text().splitlines()]
        gap = max(abs(a - b) / b for a, b in zip(peer, ours))
        assert gap < 2e-3
        assert min(abs(a - b) / b for a, b in zip(peer, ce_loss)) > 20 * gap


def test_the_command_refuses_a_missing_cache_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from tcskd.bench.peers.__main__ import main

    out = tmp_path / "run"
    err = one_line_error(main, ["peers", "--arm", "timm-ce", "--cache", str(tmp_path / "nope"), "--device", "cpu",
                                "--out", str(out)], monkeypatch, capsys)
    assert "nope" in err
    assert not out.exists()
