"""Stage 3: train a student with the TCS head from cached targets, one page.

``train(TrainConfig) -> TrainResult`` reads top to bottom: prepare (:func:`load_run_inputs`:
rows, targets and datasets from the data and the cache, tcskd.train.inputs) ->
build (:func:`build_models`, :func:`build_run`: student, head, optimizer) ->
restore (:func:`restore`, when resuming) -> for each epoch (:func:`run_epochs`):
:func:`train_epoch`, :func:`evaluate_epoch`, :func:`select_coordinates` (tailoring),
:func:`save_epoch` -> :func:`finish` (the final scores, ``final.json``).
Learning-rate schedules (cosine, step, multistep) are pure functions of the step (tcskd.train.schedule.lr_at).

Every task and target kind goes through the same :func:`train_step` and :func:`train_epoch`: a dense run adds
the dense mimic term (the predicted coordinate maps aligned to the teacher's grid, tcskd.train.losses), a
segmentation run (``--task segment``) takes the masks as CE labels (255 = ignore) and is validated by mean IoU
(``val_miou``, which plays the part ``val_top1`` plays for classification).

The run directory and its files are described in tcskd.train.rundir, the
checkpoint in tcskd.train.checkpoint; the datasets, sampler and DataLoaders in
tcskd.train.data; evaluation in tcskd.train.evaluate.

Determinism and resume: the model is initialised from ``seed``; an epoch's
sample order and view choices come from a generator seeded by (seed, epoch),
augmentation from (seed, epoch, row) and not from the workers (the DataLoader's
workers are started once, seeded from (seed, first epoch)). On the CPU a run stopped after epoch e and resumed gives bit-identical
weights and metrics to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tcskd import dist
from tcskd.device import autocast, peak_memory_bytes, proc_status_bytes, resolve_device
from tcskd.errors import TcskdError
from tcskd.results import StoppedRun, TrainResult, seconds_per_epoch
from tcskd.train.config import RESUME_FREE, TrainConfig, resolve_config, tailoring_label
from tcskd.train.checkpoint import (CHECKPOINT, CHECKPOINT_FORMAT, check_resume, load_checkpoint, rng_state,
                                    save_checkpoint, set_rng_state)
from tcskd.train.data import AUGMENT_RNG, Batch, BatchPlan, batch_plan, resolve_workers, train_loader
from tcskd.train.evaluate import embed, final_scores, segment_scores, top1
from tcskd.train.head import TCSHead
from tcskd.train.inputs import RunInputs, load_run_inputs, mimic_for_cache, online_teacher
from tcskd.train.logger import MetricsLogger, NullLogger, open_logger
from tcskd.train.model import build_models, importance_rows, parallel_model
from tcskd.train.losses import LossParts, elsh_bias, tcs_loss
from tcskd.train.plots import plot_curves
from tcskd.train.rundir import (CONFIG, CURVES, FINAL, METRICS, SPLIT, append_metrics, read_metrics,
                                shared_run_dir, write_json, write_text_atomic)
from tcskd.train.schedule import lr_at
from tcskd.train.selection import (SelectionSchedule, ablation_deltas, apply_selection, combine, kept_ranks,
                                   step_stats, warmup_steps_of)
from tcskd.train.students import Student, count_parameters
from tcskd.train.targets import TorchProjection
from tcskd.views import center_view

log = logging.getLogger(__name__)

LOG_EVERY = 50

# -- the stage, one page -----------------------------------------------------------

def train(cfg: TrainConfig) -> TrainResult | StoppedRun:
    """Stage 3: train ``cfg.student`` on ``cfg.cache``; returns the content of ``final.json``
    (:data:`tcskd.results.TrainResult`), or a :class:`~tcskd.results.StoppedRun` after ``stop_after`` epochs."""
    t_start = time.perf_counter()
    rss_start = proc_status_bytes("VmRSS")
    cfg = resolve_config(mimic_for_cache(cfg))  # auto on a patch cache: dense, before the presets apply
    device = setup_device(cfg)
    prep = load_run_inputs(cfg)                                            # prepare
    teacher = online_teacher(prep) if cfg.method == "online" else None
    student, head = build_models(cfg, prep)                                # build
    out = shared_run_dir(cfg, prep.k)
    saved = saved_checkpoint(cfg, prep, out)
    if saved is not None and saved["epoch"] >= cfg.epochs and (out / FINAL).exists():
        log.info("%s is finished; nothing to do", out)
        return json.loads((out / FINAL).read_text())
    run = build_run(cfg, prep, device, out, student, head, teacher)
    run.rss_start = rss_start
    if saved is not None:
        restore(run, saved)                                                # restore
    start_run_dir(run)
    if teacher is not None:
        teacher.to(device)
    log.info("training %s (%s, %d params) on %d images (%d labelled), %s, method %s, K=%s%s, on %s",
             cfg.student, prep.data_spec, count_parameters(student), len(prep.train_set), prep.n_labelled,
             cfg.task, cfg.method, prep.k, f", mimic {prep.mimic_on}" if prep.mimic_on else "", device)
    try:
        run_epochs(run)                                                    # train, evaluate, select, save
    except BaseException:
        run.logger.close()  # a wandb run is not left open; metrics.jsonl and the checkpoint have what was done
        raise
    if not dist.is_main():  # rank 0 evaluates and writes the results
        return dist.broadcast_object(None)
    if run.state.epoch < cfg.epochs:
        run.logger.close()
        log.info("stopped after epoch %d of %d (--stop-after); resume with --resume", run.state.epoch, cfg.epochs)
        return dist.broadcast_object({"stopped_after": run.state.epoch, "run_dir": str(out)})
    return dist.broadcast_object(finish(run, t_start))                    # final scores


# -- prepare ----------------------------------------------------------------

def setup_device(cfg: TrainConfig) -> torch.device:
    """This process's device (one per rank under torchrun), the process group started, the options checked."""
    device = dist.device_for_rank(resolve_device(cfg.device))
    dist.init(device)
    if cfg.cache is not None:  # under torchrun every rank must see the cache as one folder
        from tcskd.store.registry import cache_parent

        dist.check_shared_root(cache_parent(cfg.cache, cfg.cache_root))
    if cfg.sync_bn and device.type != "cuda":
        raise TcskdError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if cfg.batch_size % dist.world():
        raise TcskdError(f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over "
                         f"{dist.world()} processes")
    return device


# -- build and restore --------------------------------------------------------

@dataclass
class LoopState:
    """A run's progress: what the checkpoint carries besides the weights."""

    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    images: int = 0


@dataclass
class Run:
    """One training run: its options and inputs, the models and optimizer, where it writes, its progress."""

    cfg: TrainConfig
    prep: RunInputs
    device: torch.device
    workers: int
    out: Path
    student: Student
    head: TCSHead
    optimizer: torch.optim.Optimizer
    meta: dict[str, Any]
    """What the checkpoint records of the run beside the config (student, shapes, cache, basis, ...)."""
    teacher: Any = None
    """The live teacher of ``--method online``."""
    state: LoopState = field(default_factory=LoopState)
    logger: MetricsLogger = field(default_factory=NullLogger)  # mirrors metrics.jsonl (--log, rank 0)
    kept: list[tuple[int, list[int]]] = field(default_factory=list)
    """Tailoring's record: (epochs done, the active coordinates' ranks in the basis) at the start and after
    every selection step that changed the mask."""
    rss_start: int | None = None
    """The process's RSS when ``train`` started (its imports done; None off Linux): the base of
    ``peak_mem_over_imports_bytes`` on the CPU."""


def saved_checkpoint(cfg: TrainConfig, prep: RunInputs, out: Path) -> dict[str, Any] | None:
    """With ``--resume``, the checkpoint in ``out`` checked against this run's options and cache; None when
    the run starts from scratch."""
    path = out / CHECKPOINT
    saved = load_checkpoint(path) if cfg.resume and path.exists() else None
    if saved is not None:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        check_resume(saved["config"], dataclasses.asdict(cfg), RESUME_FREE, prep.cache_key,
                     saved["meta"].get("cache_key"), defaults)
    elif cfg.resume:
        log.info("no checkpoint in %s: starting from scratch", out)
    return saved


def build_run(cfg: TrainConfig, prep: RunInputs, device: torch.device, out: Path, student: Student,
              head: TCSHead, teacher: Any) -> Run:
    """Student and head on the device, the optimizer over their trainable parameters, the run's meta."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    student.to(device)
    head.to(device)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
    params = list(student.parameters()) + head.trainable_parameters()
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                           weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = {"student": cfg.student, "feature_dim": student.feature_dim, "in_channels": prep.channels,
            "num_classes": prep.num_classes, "image_size": prep.image_size, "k": prep.k,
            "cache_key": prep.cache_key, "basis": prep.basis_name, "basis_kind": prep.basis_kind,
            "method": cfg.method, "data": prep.data_spec, "augment_rng": AUGMENT_RNG,
            "classify_from": head.classify_from}
    if head.needs_map:  # what load_run needs to rebuild a dense or segmentation head
        meta.update({"task": cfg.task, "mimic_on": prep.mimic_on, "student_stage": cfg.student_stage,
                     "map_channels": student.map_channels, "grid": list(prep.grid) if prep.grid else None})
    return Run(cfg, prep, device, _workers(cfg, prep, device), out, student, head, optimizer, meta, teacher)


def _workers(cfg: TrainConfig, prep: RunInputs, device: torch.device) -> int:
    """``--workers``; ``auto`` is 0 for images held in memory (arrays: the main process crops a whole batch at
    once, workers would only copy it), else one less than the cores (:func:`resolve_workers`)."""
    source = getattr(prep.train_set, "source", None)
    if cfg.workers in (None, "auto") and source is not None and source.load_many is not None:
        return 0
    return resolve_workers(cfg.workers, device)


def restore(run: Run, saved: dict[str, Any]) -> None:
    """Weights, optimizer, generators and progress from the checkpoint ``saved``."""
    run.student.load_state_dict(saved["student"])
    run.head.load_state_dict(saved["head"])
    run.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    run.kept = [(int(e), list(r)) for e, r in saved.get("kept_ranks", [])]  # absent from older checkpoints
    run.state = LoopState(saved["epoch"], saved["step"], saved["train_seconds"], saved["images"])
    log.info("resuming %s after epoch %d", run.out, run.state.epoch)
    was = (saved.get("meta") or {}).get("augment_rng", "numpy-per-row")
    if run.prep.augment != "none" and was != AUGMENT_RNG:
        log.warning("the checkpoint was written with another augmentation generator (%s, now %s): the run "
                    "goes on with the current one and will not equal an uninterrupted run", was, AUGMENT_RNG)


def start_run_dir(run: Run) -> None:
    """Drop the metric rows of epochs the checkpoint lacks; write ``config.yaml`` (the resolved config) and
    ``split.json`` and open the ``--log`` mirror (tcskd.train.logger) (rank 0)."""
    import yaml

    cfg, prep, out = run.cfg, run.prep, run.out
    # Metric rows beyond the checkpoint belong to an epoch that must be redone.
    rows = read_metrics(out / METRICS, run.state.epoch)
    if dist.is_main():
        (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    resolved = dataclasses.asdict(cfg)
    resolved["resolved"] = {
        "cache_path": prep.cache_path, "cache_key": prep.cache_key, "data": prep.data_spec, "dim": prep.k,
        "basis_kind": prep.basis_kind, "basis": prep.basis_name, "target_scale": prep.target_scale,
        "image_size": prep.image_size,
        "augment": prep.augment, "views": prep.views, "device": str(run.device), "workers": run.workers,
        "train_images": len(prep.train_set), "labelled_images": prep.n_labelled,
        "test_images": len(prep.test_set) if prep.test_set is not None else 0,
        "num_classes": prep.num_classes, "channels": prep.channels, "teacher_spec": prep.teacher_spec,
        "student_params": count_parameters(run.student), "head_params": count_parameters(run.head)}
    if run.head.needs_map:
        resolved["resolved"].update({"mimic_on": prep.mimic_on, "grid": list(prep.grid) if prep.grid else None})
    resolved["resolved"]["world_size"] = dist.world()
    if dist.is_main():
        write_text_atomic(out / CONFIG, yaml.safe_dump(resolved, sort_keys=False))  # --resume reads it
        write_json(out / SPLIT, prep.split)
        run.logger = open_logger(cfg.log, out, run.state.epoch, resolved)


# -- the epochs -----------------------------------------------------------------

@dataclass
class EpochLoop:
    """What the epochs of a run share: the model as one module, the one DataLoader, the step counts, the
    tailoring schedule, the live targets' projection (online) and the eLSH term of the current mask."""

    model: torch.nn.Module
    loader: DataLoader
    plan: BatchPlan
    total_steps: int
    warmup_steps: int
    schedule: SelectionSchedule
    project: TorchProjection | None
    elsh: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class EpochStats:
    """One epoch of training: mean loss parts (total, ce, mimic, eLSH), the last learning rate, the active
    coordinates at its start, its training time and images, and the input pipeline's share of it."""

    means: list[float]
    lr: float
    active: int | None
    seconds: float
    images: int
    steps: int
    data_wait_s: float
    """Time spent waiting for the next batch, summed over the steps (the first batch's included)."""
    first_batch_s: float | None


def epoch_loop(run: Run) -> EpochLoop:
    """The :class:`EpochLoop` of ``run``, from its current epoch on."""
    cfg, prep = run.cfg, run.prep
    model = parallel_model(run.student, run.head, run.device, cfg.sync_bn, prep.image_size)
    plan = batch_plan(len(prep.train_set), cfg.batch_size, dist.world())
    warmup = warmup_steps_of(cfg.warmup_epochs, plan.steps_per_epoch)
    schedule = SelectionSchedule(prep.k or 0, cfg.epochs, cfg.select_every, cfg.drop_frac, cfg.min_dim, warmup,
                                 plan.steps_per_epoch)
    project = TorchProjection(prep.basis, run.device, prep.target_scale) if run.teacher is not None else None
    elsh = _elsh_for_mask(prep, run.head, run.device)
    # One loader for the whole run: its workers stay alive, and each epoch sets the sampler's epoch
    # (order, views and augmentation are functions of (seed, epoch), not of the workers' state).
    loader = train_loader(prep, cfg, run.state.epoch, run.device, run.workers, persistent=True)
    return EpochLoop(model, loader, plan, cfg.epochs * plan.steps_per_epoch, warmup, schedule, project, elsh)


def run_epochs(run: Run) -> None:
    """Epochs ``run.state.epoch .. cfg.epochs - 1`` (or up to ``cfg.stop_after``): train, evaluate, select,
    save. Checkpoints, metrics and evaluation are rank 0's."""
    cfg = run.cfg
    loop = epoch_loop(run)
    if run.head.k and not run.kept:
        run.kept.append((run.state.epoch, kept_ranks(run.head.mask)))
    last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(run.state.epoch, last):
        t_epoch = time.perf_counter()
        loop.loader.sampler.epoch = epoch
        stats = train_epoch(run, loop, epoch)
        val = evaluate_epoch(run, epoch)
        select_coordinates(run, loop, epoch)
        run.state.epoch = epoch + 1
        if dist.is_main():
            save_epoch(run, stats, val, t_epoch)
    dist.barrier()


def train_step(run: Run, loop: EpochLoop, batch: Batch, lr: float) -> LossParts:
    """One optimizer step on ``batch`` at learning rate ``lr``; the head's importance accumulates."""
    cfg, device, head = run.cfg, run.device, run.head
    x, c, y, tx = batch.x, batch.target, batch.label, batch.teacher_x
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x = x.to(device, non_blocking=True)
    if cfg.task == "segment":  # per-pixel CE labels; 255 (ignore) becomes -1, as an unlabelled image's label
        y = batch.mask.to(device, non_blocking=True).long()
        y = y.masked_fill(y == 255, -1)
    else:
        y = y.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if run.teacher is not None:
        with torch.no_grad():
            tx = center_view(tx.to(device, non_blocking=True), run.teacher.image_size)
            with autocast(device):
                feats = run.teacher.features(tx)
            c = loop.project(feats)  # in float32, like the cached targets
    elif head.global_:
        c = c.to(device, non_blocking=True)
    # The mask enters the loss (and the classifier, reading coords) as a copy whose gradient
    # is the taylor criterion; its values are the head's.
    gather = bool(head.k) and loop.schedule.gathers(run.state.step)
    mask = head.mask.clone().requires_grad_(gather and cfg.select_by == "taylor") if head.k else None
    with autocast(device):
        # dense predictions come aligned to the teacher's grid, the student's augmentation undone
        f, logits, c_hat, d_hat, valid = loop.model(x, mask, run.prep.grid, batch.aug)
    dense: dict[str, Any] = {}
    if d_hat is not None:
        dense = {"d_hat": d_hat.float(), "d": batch.dense.to(device, non_blocking=True).float(), "valid": valid}
    parts = tcs_loss(logits, y, c_hat, c if head.global_ else None, mask, cfg.lam, cfg.mimic, loop.elsh,
                     cfg.elsh_weight if cfg.elsh_bits else 0.0, **dense)
    run.optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    if gather:
        add_importance(run, loop, logits, y, c_hat, c if head.global_ else None, mask, dense)
    run.optimizer.step()
    return parts


def add_importance(run: Run, loop: EpochLoop, logits: torch.Tensor, y: torch.Tensor,
                   c_hat: torch.Tensor | None, c: torch.Tensor | None, mask: torch.Tensor,
                   dense: dict[str, Any]) -> None:
    """The step's importance added to ``run.head.importance``: each rank's share of the statistics
    (tcskd.train.selection.step_stats), summed over the ranks, so every rank adds what one process would on
    the global batch."""
    cfg, head, world = run.cfg, run.head, dist.world()
    with torch.no_grad():
        if cfg.select_by in ("ablation", "ablation-ce"):
            w = head.classifier.weight if head.classify_from == "coords" else None
            if cfg.select_by == "ablation":  # the total loss
                deltas = ablation_deltas(logits, y, c_hat, c, mask, cfg.lam, cfg.mimic, loop.elsh,
                                         cfg.elsh_weight if cfg.elsh_bits else 0.0, w, **dense)
            else:  # CE alone
                deltas = ablation_deltas(logits, y, c_hat, None, mask, 0.0, classifier_weight=w)
            stats = step_stats(cfg.select_by, world, deltas=deltas)
        elif cfg.select_by == "taylor":
            stats = step_stats("taylor", world, mask_grad=mask.grad)
        else:
            pred, target = importance_rows(c_hat, c, dense)
            stats = step_stats(cfg.select_by, world, pred=pred, target=target)
        if world > 1:
            dist.all_reduce_sum(stats)
        head.importance += combine(cfg.select_by, stats)


def train_epoch(run: Run, loop: EpochLoop, epoch: int) -> EpochStats:
    """One pass over this rank's share of the training rows, one optimizer step per batch; the loss parts
    averaged over the steps and the ranks, and the time the steps waited for their batches."""
    cfg, state, device, world = run.cfg, run.state, run.device, dist.world()
    t_epoch = time.perf_counter()
    run.student.train()
    run.head.train()
    sums = torch.zeros(5, device=device)
    steps, lr, active = 0, cfg.lr, run.head.active
    waited, first = 0.0, None
    milestones = tuple(m * loop.plan.steps_per_epoch for m in cfg.milestones)
    bar = tqdm(loop.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
               disable=None if dist.is_main() else True)
    t_wait = time.perf_counter()
    for batch in bar:
        wait = time.perf_counter() - t_wait
        waited += wait
        first = wait if first is None else first
        lr = lr_at(state.step, loop.total_steps, loop.warmup_steps, cfg.lr, cfg.schedule, milestones, cfg.gamma)
        parts = train_step(run, loop, batch, lr)
        state.step += 1
        steps += 1
        sums += torch.stack([p.detach().float() for p in parts])
        if steps % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{(sums[0] / steps).item():.4f}", lr=f"{lr:.3g}")
        t_wait = time.perf_counter()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_epoch
    images = steps * loop.plan.local_batch * world if loop.plan.drop_last else len(run.prep.train_set)
    state.train_seconds += seconds
    state.images += images
    if world > 1:  # the loss parts of every rank
        dist.all_reduce_sum(sums)
        sums /= world
    means = (sums / max(1, steps)).tolist()
    return EpochStats(means, lr, active, seconds, images, steps, waited, first)


def evaluate_epoch(run: Run, epoch: int) -> dict[str, float | None]:
    """Validation scores after ``epoch`` (rank 0, every ``eval_every`` epochs and after the last): top-1
    (``val_top1``), or for segmentation ``val_miou`` and ``val_pixel_acc`` (``val_top1`` None); the test
    split is never looked at during training."""
    cfg, prep = run.cfg, run.prep
    if not (dist.is_main() and prep.val_set is not None
            and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)):
        return {"val_top1": None, **({"val_miou": None, "val_pixel_acc": None} if cfg.task == "segment" else {})}
    if cfg.task == "segment":
        miou, acc = segment_scores(run.student, run.head, prep.val_set, run.device, _eval_batch(cfg), run.workers)
        return {"val_top1": None, "val_miou": miou, "val_pixel_acc": acc}
    _, logits = embed(run.student, run.head, prep.val_set, run.device, _eval_batch(cfg), run.workers)
    return {"val_top1": top1(logits, prep.val_set.ce_labels)}


def select_coordinates(run: Run, loop: EpochLoop, epoch: int) -> None:
    """Tailoring after ``epoch``: the schedule's coordinates dropped (every rank holds the same importance),
    the kept ranks recorded (``run.kept``), the eLSH bias fitted again to the coordinates still active."""
    if not apply_selection(run.head, loop.schedule, epoch):
        return
    ranks = kept_ranks(run.head.mask)
    if not run.kept or run.kept[-1][1] != ranks:
        run.kept.append((epoch + 1, ranks))
    if loop.elsh is not None:
        loop.elsh = _elsh_for_mask(run.prep, run.head, run.device)  # the hash of the coordinates still active


def save_epoch(run: Run, stats: EpochStats, val: dict[str, float | None], t_epoch: float) -> None:
    """The epoch's row of ``metrics.jsonl`` and the checkpoint (rank 0)."""
    cfg, state, out = run.cfg, run.state, run.out
    row = {"epoch": state.epoch, "loss": stats.means[0], "loss_ce": stats.means[1],
           "loss_mimic": stats.means[2], "loss_elsh": stats.means[3], "lr": stats.lr,
           "active_coords": stats.active, "train_img_per_s": stats.images / stats.seconds,
           "val_top1": val["val_top1"],
           "seconds": time.perf_counter() - t_epoch, "train_seconds": stats.seconds, "data_wait_s": stats.data_wait_s,
           "first_batch_s": stats.first_batch_s, "steps": stats.steps}
    if run.head.needs_map:  # dense or segmentation runs: the dense term and the segmentation scores
        row.update({"loss_dense": stats.means[4], **{k: v for k, v in val.items() if k != "val_top1"}})
    append_metrics(out / METRICS, row)
    run.logger.log_epoch(row)
    save_checkpoint(out / CHECKPOINT, {
        "format": CHECKPOINT_FORMAT, "epoch": state.epoch, "step": state.step,
        "train_seconds": state.train_seconds, "images": state.images,
        "student": run.student.state_dict(), "head": run.head.state_dict(),
        "optimizer": run.optimizer.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(cfg),
        "meta": run.meta, "kept_ranks": [[e, r] for e, r in run.kept]})
    what, score = ("mIoU", val.get("val_miou")) if cfg.task == "segment" else ("top-1", val["val_top1"])
    log.info("epoch %d/%d: loss %.4f (ce %.4f, mimic %.4f, elsh %.4f, dense %.4f), active %s, val %s %s, "
             "%.0f img/s", state.epoch, cfg.epochs, *stats.means, stats.active, what,
             "-" if score is None else f"{score:.4f}", stats.images / stats.seconds)


def _elsh_for_mask(prep: RunInputs, head: TCSHead, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of the eLSH term with ``b = -median(W (m * c))`` for the head's current mask (None: off)."""
    if prep.elsh is None:
        return None
    w, _ = prep.elsh
    return w.to(device), elsh_bias(prep.elsh_rows, w, head.mask.detach().cpu()).to(device)


# -- the end ---------------------------------------------------------------------

def finish(run: Run, t_start: float) -> TrainResult:
    """The end of training (rank 0): validation and, once, the test split (kNN references: the labelled
    rows), ``curves.png`` and ``final.json``; returns final.json's content."""
    cfg, prep, state, student, head, out = run.cfg, run.prep, run.state, run.student, run.head, run.out
    t_eval = time.perf_counter()
    scores = final_scores(student, head, prep, run.device, _eval_batch(cfg), run.workers)
    rows = read_metrics(out / METRICS, state.epoch)
    peak = peak_memory_bytes(run.device)
    epoch_seconds = [r["train_seconds"] for r in rows if r.get("train_seconds") is not None]
    over_imports = peak - run.rss_start if run.device.type != "cuda" and run.rss_start else None
    if cfg.task == "segment":
        scores["best_val_miou"] = max((r["val_miou"] for r in rows if r.get("val_miou") is not None), default=None)
    final: TrainResult = {
        **scores, "train_seconds": state.train_seconds,
        "img_per_s": state.images / state.train_seconds if state.train_seconds > 0 else None,
        "seconds_per_epoch": seconds_per_epoch(epoch_seconds) if len(epoch_seconds) == state.epoch else None,
        "peak_mem_bytes": peak, "rss_after_imports_bytes": run.rss_start if run.device.type != "cuda" else None,
        "peak_mem_over_imports_bytes": over_imports, "method": cfg.method, "dim": prep.k,
        "active_coords": head.active if prep.k else None, "labels_per_class": cfg.labels_per_class,
        "seed": cfg.seed, "student": cfg.student, "student_params": count_parameters(student),
        "basis": prep.basis_name, "basis_kind": prep.basis_kind, "cache_key": prep.cache_key,
        "cache": prep.cache_path, "data": prep.data_spec, "lambda": cfg.lam, "mimic": cfg.mimic,
        "target_norm": cfg.target_norm, "target_scale": prep.target_scale,
        "elsh_bits": cfg.elsh_bits, "tailoring": tailoring_label(cfg), "classify_from": head.classify_from,
        "select_by": cfg.select_by, "epochs": cfg.epochs, "augment": prep.augment, "train_images": len(prep.train_set),
        "labelled_images": prep.n_labelled, "image_size": prep.image_size, "device": str(run.device),
        "setup_seconds": prep.setup_seconds, "eval_seconds": time.perf_counter() - t_eval,
        "total_seconds": time.perf_counter() - t_start, "run_dir": str(out),
        "best_val_top1": max((r["val_top1"] for r in rows if r.get("val_top1") is not None), default=None),
        "val_rows": len(prep.split["val"]), "holdout": prep.split["holdout"],
        "basis_excludes_val": prep.basis_excludes_val, "task": cfg.task, "mimic_on": prep.mimic_on,
        "kept_ranks": ({"epoch": [e for e, _ in run.kept], "ranks": [r for _, r in run.kept]}
                       if prep.k else None),
        "final_kept_ranks": kept_ranks(head.mask) if prep.k else None,
    }
    # final.json marks the run finished (a resume then does nothing): every other artifact comes first.
    plot_curves(rows, out / CURVES, f"{cfg.method} {cfg.student} K={prep.k} seed {cfg.seed}")
    write_json(out / FINAL, final)
    run.logger.log_final(final, state.epoch)
    run.logger.close()
    shown = ("val_miou", "test_miou") if cfg.task == "segment" else ("val_top1", "test_top1", "knn_top1")
    log.info("finished: %s, %.1f s of training; %s", ", ".join(f"{k} {final.get(k)}" for k in shown),
             state.train_seconds, out)
    return final


def _eval_batch(cfg: TrainConfig) -> int:
    return max(cfg.batch_size, 256)
