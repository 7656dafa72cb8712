"""The traditional KD pipeline in the peer harness: the teacher fine-tuned on the run's labelled rows
(tcskd.bench.peers.finetune), then torchdistill's KD, CRD and RKD from it (tcskd.bench.peers.arms).

The fine-tuning sees exactly the run's labelled rows (spied on); the fine-tuned teacher changes and learns a
small separable set; each arm's first loss equals the loss written out here by hand from its paper's
definition (torch's ``kl_div``, ``cdist``, ``smooth_l1_loss``; never torchdistill) on the same batch; the
teacher leaves distillation as it came; a missing or foreign checkpoint is refused in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchdistill", reason="the peers extra is not installed (pip install 'tcskd[peers]')")
pytest.importorskip("timm", reason="the peers extra is not installed (pip install 'tcskd[peers]')")

from test_peers import _cfg, _first_batch  # noqa: E402  (the peer options and first batch of a test job)
from conftest import one_line_error  # noqa: E402
from tcskd.cache.build import build_cache  # noqa: E402
from tcskd.cache.config import CacheConfig  # noqa: E402
from tcskd.bench.peers import finetune as ft  # noqa: E402
from tcskd.bench.peers import prepare  # noqa: E402
from tcskd.bench.peers.arms import (CRD_DIM, CRD_MOMENTUM, CRD_TEMPERATURE, CRD_WEIGHT, RKD_ANGLE,  # noqa: E402
                                    RKD_DISTANCE)
from tcskd.bench.peers.glue import state_digest  # noqa: E402
from tcskd.bench.peers.run import make_arm, run_arm  # noqa: E402
from tcskd.errors import TcskdError  # noqa: E402
from tcskd.train.config import resolve_config  # noqa: E402
from tcskd.train.inputs import load_run_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: one torch thread (tests/conftest.py)

#: The test job's fine-tuning: 12 labelled rows (3 per class), batches of 4, 3 steps an epoch, 10 epochs.
STEPS, BATCH = 30, 4


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_teacher):
    """A real cache (the tiny torchscript teacher at 16 px, as tests/test_peers.py's) of a 40-image, 4-class npz
    whose class is the image's brightness (a set the tiny teacher can learn: its features are pooled): 36
    training rows after the held-out 10 %, 3 labelled per class, batches of 8."""
    root = tmp_path_factory.mktemp("traditional")
    rng = np.random.default_rng(0)

    def draw(n: int):
        y = np.arange(n) % 4
        return (y[:, None, None] * 60 + rng.integers(0, 30, (n, 12, 12))).astype(np.uint8), y

    (x, y), (xt, yt) = draw(40), draw(16)
    np.savez(root / "b.npz", x=x, y=y, x_test=xt, y_test=yt)
    res = build_cache(CacheConfig(data=f"npz:{root / 'b.npz'}", teacher=tiny_teacher, image_size=16, chunk_rows=16,
                                  batch_size=8, device="cpu", workers=0, cache_root=str(root / "caches")))
    return root, str(res.path)


def _ft_cfg(job, **kw) -> ft.FinetuneConfig:
    root, cache = job
    base = dict(cache=cache, steps=STEPS, batch_size=BATCH, lr=0.05, warmup_steps=0, milestones=(),
                labels_per_class=3, device="cpu", augment="none", out=str(root / "ft"))
    base.update(kw)
    return ft.FinetuneConfig(**base)


@pytest.fixture(scope="module")
def tuned(job):
    """The teacher fine-tuned for the test job's run at seed 0 (3 labels per class), every step's batch spied."""
    seen = []
    real = ft.train_step

    def spy(model, optimizer, scheduler, batch, device):
        seen.append((batch.item.clone(), batch.label.clone()))
        return real(model, optimizer, scheduler, batch, device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "train_step", spy)
        record = ft.finetune(_ft_cfg(job))
    return record, seen, job[0] / "ft" / ft.CKPT_NAME


def _tcfg(job, **kw):
    return resolve_config(_cfg(job, "torchdistill-ce", **kw).train_config("ce"))


def test_finetuning_sees_exactly_the_runs_labelled_rows_and_never_a_val_row(job, tuned):
    record, seen, _ = tuned
    prep = load_run_inputs(_tcfg(job))  # tcskd train's own split and labelled rows at these options
    labelled = np.flatnonzero(prep.train_set.ce_labels >= 0)
    assert len(labelled) == 12 and record["labelled_images"] == 12
    assert len(seen) == STEPS and record["steps"] == STEPS
    for epoch in range(STEPS * BATCH // 12):  # every epoch: each labelled row once, no other row
        items = torch.cat([s[0] for s in seen[epoch * 3:(epoch + 1) * 3]]).numpy()
        assert sorted(items.tolist()) == labelled.tolist()
    items = torch.cat([s[0] for s in seen]).numpy()
    labels = torch.cat([s[1] for s in seen]).numpy()
    rows = np.asarray(prep.train_set.rows)[items]
    assert np.array_equal(labels, np.asarray(prep.train_set.source.labels)[rows])  # true labels, none -1
    val_rows = set(np.asarray(prep.split["val"]).tolist())
    assert len(val_rows) == 4 and not val_rows & set(rows.tolist())
    assert record["identity"]["labelled_rows"] == 12 and record["identity"]["seed"] == 0


def test_the_finetuned_teacher_changed_and_learned_its_rows(job, tuned):
    record, _, ckpt = tuned
    prep = load_run_inputs(_tcfg(job))
    raw = ft.build_teacher(prep, 16)
    model, _ = ft.load_finetuned(ckpt, prep, _tcfg(job), 16, torch.device("cpu"))
    assert state_digest(model.features) != state_digest(raw.features)
    assert record["epoch_loss"][-1] < 0.5 * record["epoch_loss"][0]
    # its classifier on its own 12 training rows, computed here from the source's images
    labelled = np.flatnonzero(prep.train_set.ce_labels >= 0)
    x = torch.from_numpy(np.asarray(prep.train_set.source.images(np.asarray(prep.train_set.rows)[labelled], 1)))
    x = x.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    acc = float((pred == prep.train_set.ce_labels[labelled]).mean())
    assert acc == pytest.approx(record["train_top1"])
    assert acc > 0.5  # chance is 0.25
    assert record["val_top1"] is not None and record["test_top1"] is not None
    assert record["train_seconds"] > 0 and record["peak_mem_bytes"] > 0


def _trad(job, tuned, arm: str, **kw):
    cfg = _cfg(job, arm, teacher_ckpt=str(tuned[2]), **kw)
    p = prepare(cfg)
    a, loader = make_arm(p)
    batch = _first_batch(loader)
    a.begin_epoch(0)
    return cfg, p, a, batch


def _labelled_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = y >= 0
    return F.cross_entropy(logits[keep], y[keep])


def test_the_first_kd_loss_is_hintons_on_every_row(job, tuned):
    cfg, p, a, b = _trad(job, tuned, "torchdistill-kd")
    assert 0 < int((b.label >= 0).sum()) < len(b.label)  # labelled and unlabelled rows in the batch
    peer = float(a.first_loss(b.x, b.label, b.item).detach())
    t, alpha = cfg.kd_temperature, cfg.kd_alpha
    with torch.no_grad():
        s = p.student(b.x)
        teach = p.teacher(b.x)
        kl_rows = F.kl_div(F.log_softmax(s / t, 1), F.softmax(teach / t, 1), reduction="none").sum(1)
    hard, soft = alpha * _labelled_ce(s, b.label), (1 - alpha) * t * t * kl_rows.mean()
    assert peer == pytest.approx(float(hard + soft), rel=1e-5)
    assert float(soft) > 0.1 * float(hard)
    # the soft term is over every row: over the labelled rows alone it would differ
    keep = b.label >= 0
    labelled_only = alpha * _labelled_ce(s, b.label) + (1 - alpha) * t * t * kl_rows[keep].mean()
    assert abs(peer - float(labelled_only)) / peer > 1e-3


def _rkd_by_hand(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def distances(e):
        d = torch.cdist(e.double(), e.double())
        off = ~torch.eye(len(e), dtype=torch.bool)
        return d / d[off].mean()

    def angles(e):
        e = e.double()
        v = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # v[i, j] = unit(e_j - e_i)
        return torch.einsum("ijd,ikd->ijk", v, v)

    dist = F.smooth_l1_loss(distances(s), distances(t))
    ang = F.smooth_l1_loss(angles(s), angles(t))
    return RKD_DISTANCE * dist + RKD_ANGLE * ang


def test_the_first_rkd_loss_is_the_papers(job, tuned):
    cfg, p, a, b = _trad(job, tuned, "torchdistill-rkd")
    peer = float(a.first_loss(b.x, b.label, b.item).detach())
    with torch.no_grad():
        f = p.student.backbone(b.x)
        logits = p.student.classifier(f)
        emb = p.teacher.features(b.x)
    assert emb.shape == (8, 16) and f.shape[0] == 8  # the embeddings of two widths, compared without projector
    ce, rkd = _labelled_ce(logits, b.label).double(), _rkd_by_hand(f, emb)
    assert peer == pytest.approx(float(ce + rkd), rel=1e-5)
    assert float(rkd) > 0.1 * float(ce)  # the relational term counts (a harness that dropped it fails above)


def test_the_first_crd_loss_is_the_papers_nce(job, tuned):
    cfg, p, a, b = _trad(job, tuned, "torchdistill-crd", crd_negatives=5)
    n = len(p.prep.train_set)
    assert n == 36
    g = torch.Generator().manual_seed(3)
    contrast = torch.randint(n, (8, 6), generator=g)
    contrast[:, 0] = b.item
    a.supp_dict = lambda item: {"pos_idx": item, "contrast_idx": contrast}
    crd = a.box.criterion.term_dict["crd"][0]
    mem_v1, mem_v2 = crd.memory_v1.clone().double(), crd.memory_v2.clone().double()
    peer = float(a.first_loss(b.x, b.label, b.item).detach())
    with torch.no_grad():
        f = p.student.backbone(b.x)
        logits = p.student.classifier(f)
        emb = p.teacher.features(b.x)
        s_lin, t_lin = a.box.student_model.normalizer.linear, a.box.teacher_model.normalizer.linear
        zs = F.normalize(F.linear(f, s_lin.weight, s_lin.bias).double(), dim=1)
        zt = F.normalize(F.linear(emb, t_lin.weight, t_lin.bias).double(), dim=1)
    assert zs.shape == (8, CRD_DIM)
    # memory v1 (the student's) scores the teacher's embedding, memory v2 the student's; exp(./tau)/Z
    score_t = torch.exp(torch.einsum("bkd,bd->bk", mem_v1[contrast], zt) / CRD_TEMPERATURE)
    score_s = torch.exp(torch.einsum("bkd,bd->bk", mem_v2[contrast], zs) / CRD_TEMPERATURE)

    def nce(scores):
        prob = scores / (scores.mean() * n)  # Z: the mean score times the memory's rows (set on the 1st batch)
        m, pn, eps = 5, 1.0 / n, 1e-7
        pos = torch.log(prob[:, 0] / (prob[:, 0] + m * pn + eps)).sum()
        neg = torch.log(m * pn / (prob[:, 1:] + m * pn + eps)).sum()
        return -(pos + neg) / len(prob)

    ce, crd_term = _labelled_ce(logits, b.label).double(), CRD_WEIGHT * (nce(score_s) + nce(score_t))
    assert peer == pytest.approx(float(ce + crd_term), rel=1e-5)
    assert float(crd_term) > 0.1 * float(ce)
    # the memory moved the batch's rows towards the embeddings (momentum CRD_MOMENTUM)
    row = int(b.item[0])
    moved = CRD_MOMENTUM * mem_v1[row] + (1 - CRD_MOMENTUM) * zs[0].double()
    assert torch.allclose(crd.memory_v1[row].double(), moved / moved.norm(), atol=1e-6)


def test_torchdistills_own_crd_draw_fails_so_the_harness_draws_the_negatives():
    """The pitfall: torchdistill 1.1.5's CRDLoss without ``contrast_idx`` calls its ``draw``, which reads an
    attribute that does not exist (``self.prob``). If this starts passing, the workaround can go."""
    from torchdistill.losses.mid_level import CRDLoss

    loss = CRDLoss("normalizer", "empty", "normalizer", 4, 10, 3, 10)
    io_s = {"normalizer": {"output": F.normalize(torch.randn(2, 4), dim=1)},
            "empty": {"input": {"pos_idx": torch.tensor([0, 1])}}}
    io_t = {"normalizer": {"output": F.normalize(torch.randn(2, 4), dim=1)}}
    with pytest.raises(AttributeError, match="prob"):
        loss(io_s, io_t)


@pytest.mark.parametrize("arm", ["torchdistill-kd", "torchdistill-crd", "torchdistill-rkd"])
def test_the_teacher_stays_frozen_in_eval_mode_and_final_json_adds_the_finetuning(job, tuned, arm):
    record, _, ckpt = tuned
    cfg = _cfg(job, arm, teacher_ckpt=str(ckpt), epochs=1, crd_negatives=8, out=str(job[0] / "runs" / arm))
    p = prepare(cfg)
    a, _ = make_arm(p)
    teacher_ids = {id(q) for q in p.teacher.parameters()}
    assert not any(id(q) in teacher_ids for q in a.trained_parameters())
    student = sum(q.numel() for q in p.student.parameters())
    crd_heads = (16 + 1) * CRD_DIM + (p.student.num_features + 1) * CRD_DIM if arm == "torchdistill-crd" else 0
    assert sum(q.numel() for q in a.trained_parameters()) == student + crd_heads
    final = run_arm(cfg)  # checks the teacher's mode and digest after training (TcskdError otherwise)
    saved = json.loads((job[0] / "runs" / arm / "final.json").read_text())
    assert saved["method"] == arm and final["test_top1"] == saved["test_top1"]
    assert saved["teacher_finetune"]["train_seconds"] == record["train_seconds"]
    assert saved["pipeline_train_seconds"] == pytest.approx(record["train_seconds"] + saved["train_seconds"])
    assert saved["teacher_finetune"]["steps"] == STEPS and saved["teacher_ckpt"] == str(ckpt)


def test_the_harness_stops_a_run_whose_teacher_moved(job, tuned, monkeypatch):
    """The digest check of run_arm catches a teacher that changed during distillation."""
    from tcskd.bench.peers import run as run_mod

    real = run_mod.train_one_epoch

    def nudging(p, arm, loader, epoch):
        row = real(p, arm, loader, epoch)
        with torch.no_grad():
            p.teacher.head.bias.add_(1e-3)
        return row

    monkeypatch.setattr(run_mod, "train_one_epoch", nudging)
    cfg = _cfg(job, "torchdistill-kd", teacher_ckpt=str(tuned[2]), epochs=1, out=str(job[0] / "runs" / "moved"))
    with pytest.raises(TcskdError, match="the teacher left training changed"):
        run_arm(cfg)


def test_a_missing_or_foreign_checkpoint_is_refused_in_one_line(job, tuned, tmp_path):
    _, _, ckpt = tuned
    with pytest.raises(TcskdError, match="give --teacher-ckpt"):
        _cfg(job, "torchdistill-kd").validate()
    with pytest.raises(TcskdError, match="--teacher-ckpt is for the traditional arms"):
        _cfg(job, "torchdistill-fitnet", teacher_ckpt=str(ckpt)).validate()
    with pytest.raises(TcskdError, match="no such file"):
        prepare(_cfg(job, "torchdistill-kd", teacher_ckpt=str(tmp_path / "nope.pt")))
    with pytest.raises(TcskdError, match=r"another run \(differs in: labelled_sha256, seed\)"):
        prepare(_cfg(job, "torchdistill-kd", teacher_ckpt=str(ckpt), seed=1))
    with pytest.raises(TcskdError, match=r"differs in: labelled_rows, labelled_sha256, labels_per_class"):
        prepare(_cfg(job, "torchdistill-rkd", teacher_ckpt=str(ckpt), labels_per_class=2))
    other = tmp_path / "other.pt"  # a file that is not a fine-tuned teacher
    torch.save({"state_dict": {}}, other)
    (tmp_path / ft.JSON_NAME).write_text("{}")
    with pytest.raises(TcskdError, match="not a fine-tuned teacher checkpoint"):
        prepare(_cfg(job, "torchdistill-crd", teacher_ckpt=str(other)))


def test_the_command_refuses_an_arm_without_checkpoint_in_one_line(job, tmp_path, monkeypatch, capsys):
    from tcskd.bench.peers.__main__ import main

    out = tmp_path / "run"
    err = one_line_error(main, ["peers", "--arm", "torchdistill-kd", "--cache", job[1], "--device", "cpu", "--out",
                                str(out)], monkeypatch, capsys)
    assert "--teacher-ckpt" in err
    assert not out.exists()


def test_finetune_options_are_checked_in_one_line(job, tmp_path, monkeypatch, capsys):
    for kw, msg in ((dict(steps=0), "--steps must be at least 1"), (dict(lr=0.0), "--lr must be positive"),
                    (dict(warmup_steps=50), "--warmup-steps must be within")):
        with pytest.raises(TcskdError, match=msg):
            _ft_cfg(job, **kw).validate()
    out = tmp_path / "ft"
    err = one_line_error(ft.main, ["finetune", "--cache", job[1], "--steps", "0", "--out", str(out)], monkeypatch,
                         capsys)
    assert err == "tcskd: error: --steps must be at least 1, got 0" and not out.exists()


def test_a_traditional_arm_starts_from_tcskd_ces_student_and_classifier(job, tuned):
    """Loading the fine-tuned teacher first does not move the student's initialisation off tcskd ce's."""
    from tcskd.train.model import build_models

    cfg = _cfg(job, "torchdistill-kd", teacher_ckpt=str(tuned[2]))
    p = prepare(cfg)
    tcfg = _tcfg(job)
    student, head = build_models(tcfg, load_run_inputs(tcfg))
    for mine, theirs in ((student, p.student.backbone), (head.classifier, p.student.classifier)):
        for (k, u), v in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(u, v), k
