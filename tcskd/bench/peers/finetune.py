"""Stage one of the traditional KD pipeline: fine-tune the cache's teacher for the target task.

``python -m tcskd.bench.peers.finetune --cache KEY [--labels-per-class N --seed S ...]`` trains the whole
teacher (unfrozen, its normalisation statistics updated) plus a linear classifier on its global embedding
with the cross-entropy, on exactly the labelled rows ``tcskd train`` and the peer arms use at the same
``--labels-per-class``, ``--seed``, ``--val-frac`` / ``--val-per-class`` and ``--val-seed``
(:func:`tcskd.train.inputs.load_run_inputs` of the same options: the validation rows are held out and never
seen; the unlabelled training rows are not used). The teacher sees the student's (augmented) input as the
peer arms' teacher does (:class:`~tcskd.bench.peers.glue.PeerTeacher`: its centre view at the cache's
resolution, the teacher's own normalisation).

The recipe is BiT-HyperRule's for datasets under 20 000 examples (Kolesnikov et al., "Big Transfer (BiT):
General Visual Representation Learning", ECCV 2020, sec. 3.3 and its released ``bit_hyperrule.py``): SGD with
momentum 0.9, learning rate 0.003, no weight decay, 500 optimizer steps, a linear warm-up over the first 100,
then x0.1 at steps 200, 300 and 400; BiT's batch of 512 is capped at the number of labelled rows (100 at 10
labels per class: every step sees all of them). The schedule is applied per optimizer step by ``LambdaLR``
with tcskd's ``lr_at`` (multistep), as the peer arms do.

It writes, in its directory (default ``runs/peers/finetune-lpc<N>-s<seed>``): ``teacher.pt`` (the fine-tuned
teacher's state and the head's, and the identity of the run it was fine-tuned for: cache, teacher, seed,
split options and a digest of the labelled rows and their labels) and ``finetune.json`` (its cost, measured
as the peer arms measure theirs: ``train_seconds``, ``epoch_seconds``, ``seconds_per_epoch``,
``peak_mem_bytes``; its top-1 on its own training rows, on the held-out validation rows and, once, on the test
split). The traditional arms (``--teacher-ckpt .../teacher.pt``) refuse a checkpoint whose identity differs
from their run's (:func:`load_finetuned`) and add this cost to their ``final.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn as nn

from tcskd.bench.peers.entry import pct, run_command, setup_logging
from tcskd.bench.peers.glue import PeerTeacher, peer_versions, state_digest, step_lr_lambda
from tcskd.device import DEVICES, autocast, peak_memory_bytes, proc_status_bytes, resolve_device
from tcskd.errors import TcskdError
from tcskd.options import HELP, click_options, config_from_params, opt
from tcskd.train.config import AUGMENTS, TrainConfig, resolve_config
from tcskd.train.data import Batch, ViewImages, eval_loader
from tcskd.train.evaluate import top1
from tcskd.train.inputs import RunInputs, load_run_inputs, online_teacher
from tcskd.train.losses import ce_loss
from tcskd.data.hashing import sha256_file
from tcskd.train.rundir import write_json

log = logging.getLogger(__name__)

#: The checkpoint's format tag.
CKPT_FORMAT = "tcskd-finetuned-teacher/1"
#: The checkpoint's and the cost record's file names in the fine-tuning directory.
CKPT_NAME, JSON_NAME = "teacher.pt", "finetune.json"
#: The options passed on to TrainConfig (same names, same meaning as tcskd train's).
SHARED = ("cache", "cache_root", "labels_per_class", "val_frac", "val_per_class", "val_seed", "augment",
          "image_size", "device", "seed", "workers")


@dataclass
class FinetuneConfig:
    """Options of the teacher's fine-tuning (module docstring: the defaults are BiT-HyperRule's)."""

    cache: str = opt(help="Train cache (key, key prefix or directory): its data, teacher and resolution.")
    """The train cache of the run the teacher is fine-tuned for: its data spec, teacher spec and resolution."""
    cache_root: str | None = opt(None)
    steps: int = opt(500, help="Optimizer steps (BiT-HyperRule, under 20k examples: 500).")
    batch_size: int = opt(512, help="Images per step, capped at the labelled rows (BiT: 512).")
    lr: float = opt(0.003, help="Peak learning rate of SGD (BiT: 0.003).")
    momentum: float = opt(0.9, help="SGD momentum (BiT: 0.9).")
    weight_decay: float = opt(0.0, help="SGD weight decay (BiT: none).")
    warmup_steps: int = opt(100, help="Linear warm-up steps (BiT: 100).")
    milestones: tuple[int, ...] = opt((200, 300, 400), metavar="S1,S2,...",
                                      help="Steps where the learning rate is multiplied by --gamma (BiT: 200,300,400).")
    gamma: float = opt(0.1, help="Learning-rate factor at each milestone (BiT: 0.1).")
    labels_per_class: int | None = opt(None, help="The labelled rows: n per class, as tcskd train (None: all rows).")
    val_frac: float = opt(0.1, help="As tcskd train --val-frac (held out, never seen).")
    val_per_class: int | None = opt(None)
    val_seed: int = opt(0)
    augment: str = opt("auto", choices=AUGMENTS, help="The input's augmentation, as tcskd train --augment.")
    image_size: int | None = opt(None, help="The student's input size the teacher's view is taken from.")
    device: str = opt("auto", choices=DEVICES)
    seed: int = opt(0, help="As tcskd train --seed: the labelled rows, the batches and the head's initialisation.")
    workers: int | str | None = opt(0, metavar="auto|N", help="DataLoader workers (the labelled rows are few).")
    out: str | None = opt(None, help="Directory of teacher.pt and finetune.json (default: "
                                     "runs/peers/finetune-lpc<N>-s<seed>).")
    threads: int | None = opt(None, help="torch.set_num_threads (default: leave it).")

    def validate(self) -> None:
        """One-line TcskdError for a bad option."""
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise TcskdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TcskdError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise TcskdError(f"--warmup-steps must be within 0..--steps ({self.steps}), got {self.warmup_steps}")
        if self.threads is not None and self.threads < 1:
            raise TcskdError(f"--threads must be at least 1, got {self.threads}")
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        """The TrainConfig (method ce) whose split and labelled rows the fine-tuning takes."""
        return dataclasses.replace(TrainConfig(), method="ce", tailor="off", elsh_bits=0,
                                   **{k: getattr(self, k) for k in SHARED})


class FineTunedTeacher(nn.Module):
    """The teacher and a linear classifier on its global embedding: ``forward(x)`` -> B x C logits.

    ``features`` is the :class:`PeerTeacher` (its ``embedding`` submodule gives the B x D embedding, which
    torchdistill hooks as ``features.embedding``), ``head`` the classifier (whose output is the logits KD
    distils)."""

    def __init__(self, features: PeerTeacher, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.num_features, int(num_classes))
        self.num_features = features.num_features
        self.spec = features.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def run_identity(prep: RunInputs, tcfg: TrainConfig) -> dict[str, Any]:
    """What a fine-tuned teacher must share with the run it serves: the cache, the teacher, the seed, the
    split options, and the labelled training rows with their labels (a sha256 of both)."""
    ds = prep.train_set
    keep = ds.ce_labels >= 0
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(ds.rows)[keep], np.int64).tobytes())
    h.update(np.ascontiguousarray(ds.ce_labels[keep], np.int64).tobytes())
    return {"cache_key": prep.cache_key, "teacher": prep.teacher_identity or {"spec": prep.teacher_spec},
            "seed": int(tcfg.seed), "labels_per_class": tcfg.labels_per_class, "val_frac": float(tcfg.val_frac),
            "val_per_class": tcfg.val_per_class, "val_seed": int(tcfg.val_seed),
            "labelled_rows": int(keep.sum()), "labelled_sha256": h.hexdigest()}


def build_teacher(prep: RunInputs, teacher_size: int) -> FineTunedTeacher:
    """The cache's teacher (checked against the cache's identity) with a fresh classifier, both on the CPU;
    the classifier is initialised from torch's global generator (seed it first)."""
    raw = online_teacher(dataclasses.replace(prep, teacher_size=int(teacher_size)))
    return FineTunedTeacher(PeerTeacher(raw, 1.0, normalize=True), prep.num_classes)


def _teacher_size(cfg_cache: str, cache_root: str | None) -> int:
    from tcskd.store.handle import open_cache

    with open_cache(cfg_cache, cache_root) as cache:
        return int(cache.manifest.image_size)


class LabelledSampler(torch.utils.data.Sampler):
    """Yields ``(i, view, epoch)`` for a permutation of the items ``items`` (the labelled rows of the training
    set), seeded by (seed, epoch) as tcskd's EpochSampler; one random view per item when there are several."""

    def __init__(self, items: np.ndarray, views: int, seed: int, epoch: int) -> None:
        self.items, self.views, self.seed, self.epoch = np.asarray(items, np.int64), views, seed, epoch

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.epoch) * 7_919) % (2 ** 63))
        order = torch.randperm(len(self.items), generator=g).numpy()
        view = torch.randint(self.views, (len(self.items),), generator=g) if self.views > 1 else None
        for j in order:
            yield (int(self.items[j]), int(view[j]) if view is not None else 0, self.epoch)


def labelled_loader(prep: RunInputs, batch_size: int, seed: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of the labelled training rows only (set ``loader.sampler.epoch`` before each epoch)."""
    items = np.flatnonzero(prep.train_set.ce_labels >= 0)
    if not len(items):
        raise TcskdError("no labelled training row to fine-tune the teacher on (check --labels-per-class)")
    sampler = LabelledSampler(items, prep.views, seed, 0)
    return torch.utils.data.DataLoader(prep.train_set, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, collate_fn=ViewImages.batch_collate, drop_last=False)


def train_step(model: FineTunedTeacher, optimizer: torch.optim.Optimizer, scheduler: Any, batch: Batch,
               device: torch.device) -> torch.Tensor:
    """One optimizer step of the cross-entropy on a batch of labelled rows; the loss."""
    y = batch.label.to(device)
    if bool((y < 0).any()):
        raise TcskdError("a fine-tuning batch holds an unlabelled row")  # the loader gives labelled rows only
    with autocast(device):
        logits = model(batch.x.to(device, non_blocking=True))
    loss = ce_loss(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def teacher_top1(model: FineTunedTeacher, ds: ViewImages | None, device: torch.device, batch_size: int,
                 items: np.ndarray | None = None) -> float | None:
    """Top-1 of the teacher's classifier on ``ds`` (its view 0, no augmentation; only ``items`` if given)."""
    if ds is None:
        return None
    was = model.training
    model.eval()
    logits = []
    for b in eval_loader(ds, batch_size, 0, device):
        with autocast(device):
            logits.append(model(b.x.to(device)).float().cpu())
    model.train(was)
    out, labels = torch.cat(logits).numpy(), np.asarray(ds.ce_labels)
    if items is not None:
        out, labels = out[items], labels[items]
    return top1(out, labels)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune the teacher of ``cfg`` (module docstring); writes teacher.pt and finetune.json and returns
    finetune.json's content."""
    t_start = time.perf_counter()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rss_imports = proc_status_bytes("VmRSS")
    tcfg = resolve_config(cfg.train_config())
    device = resolve_device(tcfg.device)
    prep = load_run_inputs(tcfg)
    teacher_size = _teacher_size(cfg.cache, cfg.cache_root)
    torch.manual_seed(cfg.seed)  # the head's initialisation
    model = build_teacher(prep, teacher_size).to(device)
    for q in model.parameters():  # the whole network is fine-tuned
        q.requires_grad_(True)
    before = state_digest(model.features)
    n_lab = int((prep.train_set.ce_labels >= 0).sum())
    batch = min(cfg.batch_size, n_lab)
    loader = labelled_loader(prep, batch, cfg.seed, int(cfg.workers) if str(cfg.workers).isdigit() else 0)
    steps_per_epoch = -(-n_lab // batch)
    epochs = -(-cfg.steps // steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_lr_lambda(
        cfg.steps, cfg.warmup_steps, cfg.lr, "multistep", tuple(cfg.milestones), cfg.gamma))
    out = Path(cfg.out or f"runs/peers/finetune-lpc{cfg.labels_per_class or 'all'}-s{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("fine-tuning %s on %d labelled rows: %d steps of %d (%d epochs) on %s", prep.teacher_spec, n_lab,
             cfg.steps, batch, epochs, device)
    epoch_seconds, epoch_loss, step = [], [], 0
    model.train()
    for epoch in range(epochs):
        loader.sampler.epoch = epoch
        t0, losses = time.perf_counter(), []
        for b in loader:
            if step == cfg.steps:
                break
            losses.append(train_step(model, optimizer, scheduler, b, device))
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_loss.append(float(torch.stack(losses).mean()))
        if not math.isfinite(epoch_loss[-1]):
            raise TcskdError(f"teacher fine-tuning: the loss of epoch {epoch + 1} is not finite ({epoch_loss[-1]})")
        log.info("epoch %d/%d: loss %.4f, %.1f s", epoch + 1, epochs, epoch_loss[-1], epoch_seconds[-1])
    train_seconds = float(sum(epoch_seconds))
    peak = peak_memory_bytes(device)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    if state_digest(model.features) == before:
        raise TcskdError("teacher fine-tuning left the teacher unchanged")
    eval_batch = max(256, batch)
    lab_items = np.flatnonzero(prep.train_set.ce_labels >= 0)
    scores = {"train_top1": teacher_top1(model, prep.train_set, device, eval_batch, lab_items)
              if prep.augment == "none" else _plain_top1(model, prep, device, eval_batch, lab_items),
              "val_top1": teacher_top1(model, prep.val_set, device, eval_batch),
              "test_top1": teacher_top1(model, prep.test_set, device, eval_batch)}
    identity = run_identity(prep, tcfg)
    ckpt = out / CKPT_NAME
    tmp = ckpt.with_name(f".{CKPT_NAME}.tmp-{os.getpid()}")
    torch.save({"format": CKPT_FORMAT, "identity": identity, "num_classes": int(prep.num_classes),
                "teacher_state": {k: v.cpu() for k, v in model.features.backbone.state_dict().items()},
                "head_state": {k: v.cpu() for k, v in model.head.state_dict().items()}}, tmp)
    os.replace(tmp, ckpt)
    seconds_per_epoch = float(np.median(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds))
    record = {**scores, "identity": identity, "checkpoint": CKPT_NAME, "checkpoint_sha256": sha256_file(str(ckpt)),
              "teacher": prep.teacher_spec, "teacher_size": teacher_size, "num_classes": int(prep.num_classes),
              "labelled_images": n_lab, "steps": step, "epochs": epochs, "batch_size": batch, "lr": cfg.lr,
              "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
              "milestones": list(cfg.milestones), "gamma": cfg.gamma, "augment": prep.augment,
              "epoch_loss": epoch_loss, "train_seconds": train_seconds, "epoch_seconds": epoch_seconds,
              "seconds_per_epoch": seconds_per_epoch, "peak_mem_bytes": peak, "rss_after_imports_bytes": rss_imports,
              "peak_mem_over_imports_bytes": (peak - rss_imports) if device.type != "cuda" and rss_imports else None,
              "threads": torch.get_num_threads(), "device": str(device), "peers": peer_versions(),
              "total_seconds": time.perf_counter() - t_start, "dir": str(out)}
    write_json(out / JSON_NAME, record)
    log.info("fine-tuned teacher: train %s, val %s, test %s; %s", scores["train_top1"], scores["val_top1"],
             scores["test_top1"], out)
    return record


def _plain_top1(model: FineTunedTeacher, prep: RunInputs, device: torch.device, batch_size: int,
                items: np.ndarray) -> float | None:
    """Top-1 on the labelled training rows without their augmentation."""
    ds = prep.train_set
    plain = ViewImages(ds.source, ds.rows, ds.size, ds.channels, params=ds.params, ce_labels=ds.ce_labels)
    return teacher_top1(model, plain, device, batch_size, items)


def load_finetuned(path: str | Path, prep: RunInputs, tcfg: TrainConfig, teacher_size: int,
                   device: torch.device) -> tuple[FineTunedTeacher, dict[str, Any]]:
    """The fine-tuned teacher of ``path`` (teacher.pt, frozen, eval mode, on ``device``) and its finetune.json;
    a one-line TcskdError when it is missing or was fine-tuned for another run (:func:`run_identity`)."""
    path = Path(path)
    if not path.is_file():
        raise TcskdError(f"--teacher-ckpt {path}: no such file (run python -m tcskd.bench.peers.finetune first)")
    record_path = path.with_name(JSON_NAME)
    if not record_path.is_file():
        raise TcskdError(f"--teacher-ckpt {path}: no {JSON_NAME} beside it (its fine-tuning cost is unknown)")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same one-line refusal
        raise TcskdError(f"--teacher-ckpt {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TcskdError(f"--teacher-ckpt {path}: not a fine-tuned teacher checkpoint ({CKPT_FORMAT})")
    want, got = run_identity(prep, tcfg), ckpt["identity"]
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        raise TcskdError(f"--teacher-ckpt {path} was fine-tuned for another run (differs in: {', '.join(diff)})")
    record = json.loads(record_path.read_text())
    model = build_teacher(prep, teacher_size)
    model.features.backbone.load_state_dict(ckpt["teacher_state"])
    model.head.load_state_dict(ckpt["head_state"])
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval().to(device), record


@click.command("finetune", context_settings=HELP)
@click_options(FinetuneConfig)
@click.option("-v", "--verbose", is_flag=True, help="Log every epoch.")
@click.pass_context
def finetune_cmd(ctx: click.Context, verbose: bool, **params) -> None:
    """Fine-tune the cache's teacher and a linear classifier on the run's labelled rows (traditional KD)."""
    setup_logging(verbose)
    res = finetune(config_from_params(FinetuneConfig, params, ctx))
    click.echo(f"fine-tuned {res['teacher']} on {res['labelled_images']} rows, {res['steps']} steps: val top-1 "
               f"{pct(res['val_top1'])}, test top-1 {pct(res['test_top1'])}, {res['train_seconds']:.1f} s, peak "
               f"{res['peak_mem_bytes'] / 2 ** 20:.0f} MB")
    click.echo(str(Path(res["dir"]) / CKPT_NAME))


def main() -> None:
    run_command(finetune_cmd)


if __name__ == "__main__":
    main()
