"""One peer arm from start to ``final.json``: :func:`run_arm`.

What comes from tcskd (so the arm differs from tcskd's own arms only in the framework that trains):
:func:`prepare` opens the cache and the data exactly as ``tcskd train`` does (``load_run_inputs`` with method
``ce``: no target is loaded), which gives the held-out validation rows, the labelled rows of the seed, the
student's augmentation and the test split; the student and its head come from ``build_models`` with the
head of ``--method fitnet`` (K = the teacher's dimension: the same classifier and projector initialisation at
the same seed as tcskd's fitnet run); the teacher from the cache's spec and resolution (checked against the
cache's teacher identity); the batches from ``tcskd.train.data.train_loader`` (the same order, the same
augmentation of each row in each epoch); the learning rate of every step from ``lr_at`` (warm-up and cosine,
per step); the scores from ``final_scores`` on the final weights (validation, then the test split once).

Figures: ``train_seconds`` (the epochs' training loops only, data waits included, validation excluded),
``epoch_seconds`` (each epoch) and ``seconds_per_epoch`` (their median over epochs >= 2, the first being a
warm-up; all of them with one epoch), ``total_seconds`` (the process's wall time from :func:`run_arm`'s
start), ``peak_mem_bytes`` (CUDA max allocated, else the process's peak RSS, as tcskd train reports) and, on
the CPU, ``rss_after_imports_bytes`` and ``peak_mem_over_imports_bytes`` (the peak less the RSS after the
frameworks are imported). ``peers`` records the frameworks' versions.

A traditional arm (``--teacher-ckpt``) takes the fine-tuned teacher (tcskd.bench.peers.finetune.load_finetuned:
refused unless fine-tuned for this run) and tcskd's CE arm's student and classifier at the seed; its
final.json adds ``teacher_finetune`` (the fine-tuning's cost and scores, from its finetune.json),
``pipeline_train_seconds`` (fine-tuning + distillation) and ``pipeline_peak_mem_bytes`` (the larger peak).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcskd.bench.peers.arms import (Arm, OptimSettings, TraditionalSettings, build_arm, distils, framework_of,
                                    require_framework, traditional)
from tcskd.bench.peers.config import PeerConfig
from tcskd.bench.peers.glue import (PeerStudent, PeerTeacher, fitnet_target_scale, peer_versions, state_digest,
                                    step_lr_lambda)
from tcskd.device import peak_memory_bytes, proc_status_bytes, resolve_device
from tcskd.errors import TcskdError
from tcskd.results import seconds_per_epoch
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.data import batch_plan, resolve_workers, train_loader
from tcskd.train.evaluate import embed, final_scores, top1
from tcskd.train.head import TCSHead
from tcskd.train.inputs import RunInputs, load_run_inputs, online_teacher
from tcskd.train.model import build_models
from tcskd.train.rundir import write_json, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """An arm's inputs: the resolved config, the data, the models tcskd initialised, the teacher."""

    cfg: PeerConfig
    train_cfg: TrainConfig
    """The resolved TrainConfig (method ce: the data; its lr, weight decay, ...)."""
    prep: RunInputs
    device: torch.device
    student: PeerStudent
    head: TCSHead
    """tcskd's head: its classifier is the student's; its projector the initial FitNet regressor (fitnet arms)."""
    teacher: torch.nn.Module | None
    """The cache's teacher (:class:`PeerTeacher`, FitNet arms) or the fine-tuned one (traditional arms)."""
    target_scale: float | None
    finetune: dict[str, Any] | None = None
    """The fine-tuned teacher's finetune.json (traditional arms)."""


def prepare(cfg: PeerConfig, device: torch.device | None = None) -> Prepared:
    """The data, models and teacher of ``cfg`` (module docstring)."""
    cfg.validate()
    tcfg = resolve_config(cfg.train_config("ce"))
    device = device or resolve_device(tcfg.device)
    prep = load_run_inputs(tcfg)
    teacher, scale, record = None, None, None
    if traditional(cfg.arm):
        from tcskd.bench.peers.finetune import load_finetuned
        from tcskd.store.handle import open_cache

        with open_cache(cfg.cache, cfg.cache_root) as cache:
            size = int(cache.manifest.image_size)
        teacher, record = load_finetuned(cfg.teacher_ckpt, prep, tcfg, size, device)
        student, head = build_models(tcfg, prep)
    elif distils(cfg.arm):
        from tcskd.store.handle import open_cache
        from tcskd.train.inputs import open_train_rows

        with open_cache(cfg.cache, cfg.cache_root) as cache:
            manifest = cache.manifest
            src = open_train_rows(tcfg, cache.store, manifest, cache.path)
        raw = online_teacher(dataclasses.replace(prep, teacher_size=int(manifest.image_size)))
        scale = fitnet_target_scale(cfg.cache, cfg.cache_root, src.store_rows[~src.val], cfg.target_norm)
        # timm normalises the teacher's input itself (DistillationTeacher.normalize_input)
        teacher = PeerTeacher(raw, scale, normalize=framework_of(cfg.arm) != "timm").to(device)
        fit_cfg = resolve_config(cfg.train_config("fitnet"))
        student, head = build_models(fit_cfg, dataclasses.replace(prep, k=int(raw.dim)))
    else:
        student, head = build_models(tcfg, prep)
    student.to(device)
    head.to(device)
    if device.type == "cuda":  # as tcskd train's student
        student.to(memory_format=torch.channels_last)
    return Prepared(cfg, tcfg, prep, device, PeerStudent(student, head.classifier), head, teacher, scale, record)


def optim_settings(tcfg: TrainConfig, steps_per_epoch: int) -> OptimSettings:
    """SGD's settings and the per-step factor of ``lr_at``, as ``tcskd train`` resolves them."""
    if tcfg.optimizer != "sgd":
        raise TcskdError(f"the peer arms use SGD as tcskd's default; --optimizer {tcfg.optimizer} is not wired")
    total = tcfg.epochs * steps_per_epoch
    warmup = round(tcfg.warmup_epochs * steps_per_epoch)
    milestones = tuple(m * steps_per_epoch for m in tcfg.milestones)
    factor = step_lr_lambda(total, warmup, tcfg.lr, tcfg.schedule, milestones, tcfg.gamma)
    return OptimSettings(tcfg.lr, tcfg.momentum, tcfg.weight_decay, factor)


def make_arm(p: Prepared) -> tuple[Arm, Any]:
    """The arm of ``p`` and its training DataLoader (persistent workers; set ``sampler.epoch`` per epoch)."""
    tcfg = p.train_cfg
    plan = batch_plan(len(p.prep.train_set), tcfg.batch_size, 1)
    regressor = p.head.projector if distils(p.cfg.arm) else None
    settings = TraditionalSettings(p.cfg.kd_temperature, p.cfg.kd_alpha, p.cfg.crd_negatives,
                                   len(p.prep.train_set), p.cfg.seed)
    arm = build_arm(p.cfg.arm, p.student, p.teacher, regressor, p.cfg.lam,
                    optim_settings(tcfg, plan.steps_per_epoch), tcfg.epochs, p.device, settings)
    workers = resolve_workers(tcfg.workers, p.device)
    if tcfg.workers in (None, "auto") and getattr(p.prep.train_set.source, "load_many", None) is not None:
        workers = 0  # images held in memory: as tcskd train's auto
    loader = train_loader(p.prep, tcfg, 0, p.device, workers, persistent=True)
    _check_no_teacher_in_optimizer(arm)
    return arm, loader


def _check_no_teacher_in_optimizer(arm: Arm) -> None:
    if arm.teacher is None:
        return
    teacher_ids = {id(t) for t in arm.teacher.parameters()}
    if any(id(q) in teacher_ids for q in arm.trained_parameters()):
        raise TcskdError("the peer's optimizer holds teacher parameters: the teacher would be trained")


def run_arm(cfg: PeerConfig) -> dict[str, Any]:
    """Train the arm of ``cfg`` and write ``final.json``, ``config.yaml`` and ``metrics.jsonl`` in its run
    directory; returns final.json's content."""
    t_start = time.perf_counter()
    cfg.validate()
    require_framework(cfg.arm)
    __import__(framework_of(cfg.arm))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rss_imports = proc_status_bytes("VmRSS")
    p = prepare(cfg)
    arm, loader = make_arm(p)
    out = Path(cfg.out or f"runs/peers/{cfg.arm}-s{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    digest = state_digest(p.teacher) if p.teacher is not None else None
    if p.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.device)
    log.info("peer arm %s: %s on %d images (%d labelled), %d epochs, on %s", cfg.arm, cfg.student,
             len(p.prep.train_set), p.prep.n_labelled, cfg.epochs, p.device)
    epoch_seconds, images, steps_done = [], 0, 0
    for epoch in range(p.train_cfg.epochs):
        row = train_one_epoch(p, arm, loader, epoch)
        epoch_seconds.append(row["seconds"])
        images += row["images"]
        steps_done += row["steps"]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            _, logits = embed(p.student.backbone, p.head, p.prep.val_set, p.device, max(cfg.batch_size, 256),
                              0) if p.prep.val_set is not None else (None, None)
            row["val_top1"] = top1(logits, p.prep.val_set.ce_labels) if logits is not None else None
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("epoch %d/%d: loss %.4f, lr %.4g, %.1f s, val %s", epoch + 1, cfg.epochs, row["loss"], row["lr"],
                 row["seconds"], row.get("val_top1"))
    if p.teacher is not None:
        if p.teacher.training or state_digest(p.teacher) != digest:
            raise TcskdError(f"{cfg.arm}: the teacher left training changed (train mode or updated weights/"
                             f"statistics): the run is not the comparison it claims to be")
    return finish(p, arm, out, epoch_seconds, images, rss_imports, t_start)


def train_one_epoch(p: Prepared, arm: Arm, loader: Any, epoch: int) -> dict[str, Any]:
    """One epoch through the arm's own step; the row of ``metrics.jsonl``."""
    loader.sampler.epoch = epoch
    t0 = time.perf_counter()
    arm.begin_epoch(epoch)
    losses, steps, n, lr = [], 0, 0, arm.lr()
    for batch in loader:
        x = batch.x.to(p.device, non_blocking=True)
        if p.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch.label.to(p.device, non_blocking=True)
        lr = arm.lr()
        losses.append(arm.step(x, y, batch.item))
        steps += 1
        n += len(x)
    arm.end_epoch()
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    seconds = time.perf_counter() - t0
    loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    if not np.isfinite(loss):
        raise TcskdError(f"{p.cfg.arm}: the loss of epoch {epoch + 1} is not finite ({loss})")
    return {"epoch": epoch + 1, "loss": loss, "lr": lr, "seconds": seconds, "images": n, "steps": steps,
            "train_img_per_s": n / seconds if seconds > 0 else None}


def traditional_record(p: Prepared, train_seconds: float, peak: int) -> dict[str, Any]:
    """final.json's keys of a traditional arm: ``mimic`` (kd, crd, rkd), ``lambda`` (the distillation term's
    weight in the WeightedSumLoss: (1 - alpha) T^2 for KD), the method's settings, and the fine-tuning's cost
    and scores (module docstring)."""
    from tcskd.bench.peers.arms import CRD_WEIGHT

    cfg, ft = p.cfg, p.finetune or {}
    method = cfg.arm.split("-", 1)[1]
    weight = {"kd": (1 - cfg.kd_alpha) * cfg.kd_temperature ** 2, "crd": CRD_WEIGHT, "rkd": 1.0}[method]
    keep = ("train_seconds", "epoch_seconds", "seconds_per_epoch", "peak_mem_bytes", "steps", "epochs",
            "batch_size", "lr", "labelled_images", "train_top1", "val_top1", "test_top1", "checkpoint_sha256",
            "device", "threads")
    return {"lambda": weight, "mimic": method, "mimic_on": "logits" if method == "kd" else "global",
            "teacher_ckpt": str(cfg.teacher_ckpt), "kd_temperature": cfg.kd_temperature if method == "kd" else None,
            "kd_alpha": cfg.kd_alpha if method == "kd" else None,
            "crd_negatives": cfg.crd_negatives if method == "crd" else None,
            "teacher_finetune": {k: ft.get(k) for k in keep},
            "pipeline_train_seconds": float(ft.get("train_seconds") or 0.0) + train_seconds,
            "pipeline_peak_mem_bytes": max(int(ft.get("peak_mem_bytes") or 0), int(peak))}


def finish(p: Prepared, arm: Arm, out: Path, epoch_seconds: list[float], images: int, rss_imports: int | None,
           t_start: float) -> dict[str, Any]:
    """Scores of the final weights (validation, then test once) and final.json."""
    import yaml

    cfg, tcfg, prep = p.cfg, p.train_cfg, p.prep
    t_eval = time.perf_counter()
    scores = final_scores(p.student.backbone, p.head, prep, p.device, max(tcfg.batch_size, 256), 0)
    train_seconds = float(sum(epoch_seconds))
    peak = peak_memory_bytes(p.device)
    trad = traditional(cfg.arm)
    teacher_dim = p.teacher.num_features if p.teacher is not None and not trad else None
    final = {
        **scores, "method": cfg.arm, "framework": framework_of(cfg.arm), "peers": peer_versions(),
        "basis_kind": "identity" if teacher_dim else None, "dim": teacher_dim, "basis": None,
        "labels_per_class": cfg.labels_per_class, "seed": cfg.seed, "student": cfg.student,
        "student_params": sum(q.numel() for q in p.student.backbone.parameters()),
        # as tcskd train records them (ce: lambda 0, the mimic options at their values, mimic_on None)
        "lambda": cfg.lam if teacher_dim else 0.0, "target_norm": cfg.target_norm, "target_scale": p.target_scale,
        "mimic": "mse", "mimic_on": "global" if teacher_dim else None, "tailoring": "off",
        "elsh_bits": 0, "classify_from": "feature", "epochs": cfg.epochs, "augment": prep.augment,
        "train_seconds": train_seconds, "epoch_seconds": epoch_seconds,
        "seconds_per_epoch": seconds_per_epoch(epoch_seconds),
        "img_per_s": images / train_seconds if train_seconds > 0 else None,
        "peak_mem_bytes": peak, "rss_after_imports_bytes": rss_imports,
        "peak_mem_over_imports_bytes": (peak - rss_imports) if p.device.type != "cuda" and rss_imports else None,
        "threads": torch.get_num_threads(), "device": str(p.device), "cache": prep.cache_path,
        "cache_key": prep.cache_key, "data": prep.data_spec, "teacher": p.teacher.spec if p.teacher else None,
        "train_images": len(prep.train_set), "labelled_images": prep.n_labelled, "image_size": prep.image_size,
        "val_rows": len(prep.split["val"]), "holdout": prep.split["holdout"], "task": "classify",
        "setup_seconds": prep.setup_seconds, "eval_seconds": time.perf_counter() - t_eval,
        "total_seconds": time.perf_counter() - t_start, "run_dir": str(out),
    }
    if trad:
        final.update(traditional_record(p, train_seconds, peak))
    resolved = {**dataclasses.asdict(cfg), "resolved": {
        "lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "augment": prep.augment, "target_scale": p.target_scale,
        "train_images": len(prep.train_set), "labelled_images": prep.n_labelled, "peers": peer_versions()}}
    resolved["milestones"] = list(cfg.milestones)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_json(out / "split.json", prep.split)
    write_json(out / "final.json", final)
    log.info("finished %s: val %s, test %s, %.2f s/epoch; %s", cfg.arm, final["val_top1"], final["test_top1"],
             final["seconds_per_epoch"] or 0.0, out)
    return final
