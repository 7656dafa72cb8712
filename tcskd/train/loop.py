"""Stage 3: train a student with the TCS head from cached targets.

``train(TrainConfig) -> dict`` prepares the data (tcskd.train.targets), builds
the student and head, and runs :func:`fit`, the one explicit training loop.
Learning-rate schedules are pure functions of the step (:func:`lr_at`).

Run directory (``--out``, default ``runs/<method>-<student>-<K>-s<seed>-<time>``):
``config.yaml`` (the resolved config, written at start), ``metrics.jsonl`` (one
line per epoch), ``checkpoint.pt`` (after every epoch, written atomically),
``final.json`` and ``curves.png`` (at the end).

Checkpoint (``torch.save`` of primitives and tensors only, so that
``torch.load(weights_only=True)`` reads it): ``format`` (1), ``epoch`` (epochs
completed), ``step`` (optimizer steps taken; the learning rate is a pure
function of it), ``student`` / ``head`` / ``optimizer`` state dicts (the head's
holds ``mask``, ``gate`` and the accumulated ``importance``), ``rng`` (torch,
CUDA, numpy and python generator states as tensors), ``config`` (the resolved
TrainConfig as a dict), ``meta`` (student name, feature_dim, in_channels,
num_classes, image_size, k, cache_key, basis, ...), ``train_seconds`` and ``images``.

Determinism and resume: the model is initialised from ``seed``; an epoch's
sample order and view choices come from a generator seeded by (seed, epoch),
augmentation from (seed, epoch, row), DataLoader worker seeds from (seed,
epoch). On the CPU a run stopped after epoch e and resumed gives bit-identical
weights and metrics to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from tcskd.errors import StoreError, TcskdError
from tcskd.splits import Holdout, labelled_mask, rows_digest
from tcskd.store.handle import open_cache
from tcskd.store.manifest import Manifest
from tcskd.train.config import RESUME_FREE, TrainConfig, default_dim, resolve_config, tailoring_label
from tcskd.train.head import TCSHead
from tcskd.train.losses import elsh_bias, elsh_planes, elsh_sample, tcs_loss
from tcskd.train.selection import SelectionSchedule, apply_selection, step_importance
from tcskd.train.students import Student, StudentError, build_student, count_parameters
from tcskd.train.targets import (AUGMENT_RNG, EpochSampler, TorchProjection, ViewImages,
                                 RAW, load_targets, match_rows, resolve_augment,
                                 resolve_basis, target_scale)
from tcskd.views import center_view, resize_on_device

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
LOG_EVERY = 50


def make_student(name: str, num_classes: int, in_channels: int) -> Student:
    """build_student, with whatever a ``python:`` factory raises turned into a one-line StudentError."""
    try:
        return build_student(name, num_classes, in_channels)
    except StudentError:
        raise
    except Exception as e:  # the user's module or factory failed (or is not a factory at all)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise StudentError(f"cannot build student '{name}': {type(e).__name__}: {msg}") from e


# -- schedules (pure) -----------------------------------------------------------

def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0 or steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        passed = sum(step >= int(f * total_steps) for f in (0.5, 0.75))
        return base_lr * 0.1 ** passed
    raise ValueError(f"unknown schedule '{schedule}'")


# -- data -------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything the loop needs that comes from the dataset and the cache."""

    train_set: ViewImages
    val_set: ViewImages | None
    test_set: ViewImages | None
    knn_set: ViewImages
    views: int
    num_classes: int
    channels: int
    image_size: int
    augment: str
    k: int | None
    basis_name: str | None
    basis_kind: str | None
    basis: Any
    target_scale: float | None
    elsh: tuple[torch.Tensor, torch.Tensor] | None
    data_spec: str
    cache_path: str | None
    cache_key: str | None
    teacher_spec: str | None
    teacher_size: int | None
    n_labelled: int
    setup_seconds: float
    split: dict[str, Any]
    basis_excludes_val: bool | None
    teacher_identity: dict[str, Any] | None = None
    elsh_rows: torch.Tensor | None = None


def prepare(cfg: TrainConfig) -> Prepared:
    """Open the data and the cache, check they match, and load the targets into memory."""
    from tcskd.data import has_split, open_source
    from tcskd.device import resolve_device

    t0 = time.perf_counter()
    manifest = Manifest()
    store = None
    cache_path = None
    if cfg.cache is not None:
        cache = open_cache(cfg.cache, cfg.cache_root)  # refused unless complete and sound
        cache_path, store, manifest = cache.path, cache.store, cache.manifest
    try:
        data_spec = cfg.data or manifest.data_spec
        if not data_spec:
            raise StoreError(f"cache {cache_path} names no dataset (data_spec); pass --data")
        split = manifest.split or "train"
        train_split = "test" if split == "test" else "train"
        if split == "test":
            log.warning("cache %s holds the test split: the student trains on test images", cache_path)
        train_source = open_source(data_spec, train_split)
        if store is not None:
            split_source = train_source if split == train_split else open_source(data_spec, split)
            limited = manifest.limited
            rows, store_rows = match_rows(store, split_source, train_source, limited)
            views = int(store["features"].shape[1])
            params = np.asarray(store.read("view_params"), np.float32)[store_rows]
            if cfg.data is None and manifest.data_fingerprint not in (None, train_source.fingerprint):
                log.warning("the dataset's files differ from those the cache was built from")
        else:
            rows, store_rows, views, params = np.arange(len(train_source)), None, 1, None
        # The validation rows are chosen before anything is read for training: no target of theirs is loaded.
        labels = train_source.labels[rows]
        sample_index = np.asarray(train_source.indices, np.int64)[rows]
        holdout = Holdout(cfg.val_frac, cfg.val_per_class, cfg.val_seed)
        val = holdout.mask(labels, sample_index)
        fit_rows = ~val
        basis = (resolve_basis(store, cfg.method, cfg.basis, cfg.dim, default_dim(cfg)) if store is not None
                 else None)
        targets = None
        elsh = elsh_rows = None
        if basis is not None and (cfg.method != "online" or cfg.elsh_bits):
            targets = load_targets(store, store_rows[fit_rows], basis)
        scale = target_scale(basis, targets, cfg.target_norm) if basis is not None else None
        if targets is not None:
            targets /= np.float32(scale)
            if cfg.elsh_bits:  # the sample is kept: the bias is fitted again when the mask changes
                elsh_rows = elsh_sample(targets, cfg.seed)
                w = elsh_planes(cfg.elsh_bits, targets.shape[-1], cfg.seed)
                elsh = (w, elsh_bias(elsh_rows, w))
            if cfg.method == "online":
                targets = None  # only needed for the eLSH bias; the teacher computes them live
    finally:
        if store is not None:
            store.close()

    channels = train_source.channels
    if holdout.empty:
        log.warning("no validation rows (--val-frac 0): choose settings on a held-out split, not on test")
    labelled = labelled_mask(labels, sample_index, cfg.labels_per_class, cfg.seed, eligible=fit_rows)
    # The basis left exactly this run's validation rows out when it recorded the same set of rows.
    fitted = basis is not None and basis.name != RAW and basis.kind != "identity"
    basis_excludes_val = (None if not fitted else
                          bool(val.any()) and basis.attrs.get("held_out_rows") == rows_digest(sample_index[val]))
    if fitted and val.any() and not basis_excludes_val:
        log.warning("basis '%s' was fitted on rows this run holds out for validation (fit it with "
                    "`tcskd basis --exclude-val` and the same --val-* options)", basis.name)
    size = cfg.image_size or min(train_source.image(int(rows[0])).shape[:2])
    augment = resolve_augment(cfg.augment, data_spec, channels) if views == 1 else "none"
    if views > 1 and cfg.augment not in ("auto", "none"):
        log.info("a %d-view cache: the student replays the stored views; --augment %s is not used",
                 views, cfg.augment)
    teacher_size = int(manifest.image_size) if cfg.method == "online" else None
    # Online on a GPU: the teacher's upsampled input is made on the device, not image by image on the CPU.
    defer = teacher_size is not None and resize_on_device(resolve_device(cfg.device))
    view0 = params[:, :1] if params is not None else None

    def part(mask: np.ndarray, **kw: Any) -> ViewImages:
        p = kw.pop("params", view0)
        return ViewImages(train_source, rows[mask], size, channels, p[mask] if p is not None else None, **kw)

    ce_labels = np.where(labelled, labels, -1).astype(np.int64)
    train_set = part(fit_rows, params=params, targets=targets, ce_labels=ce_labels[fit_rows], augment=augment,
                     seed=cfg.seed, teacher_size=teacher_size, defer_teacher_resize=defer)
    knn_set = part(labelled)  # the kNN references: only the labels the run was given
    val_set = part(val) if val.any() else None
    test_set = None
    if train_split == "train" and has_split(data_spec, "test"):
        test_source = open_source(data_spec, "test")
        test_set = ViewImages(test_source, np.arange(len(test_source)), size, channels)
    split = {"train": sample_index[fit_rows].tolist(), "val": sample_index[val].tolist(),
             "labelled": sample_index[labelled].tolist(), "holdout": holdout.as_dict(),
             "labels_per_class": cfg.labels_per_class, "seed": cfg.seed,
             "source_split": train_split, "data": data_spec, "cache_key": manifest.key}
    return Prepared(
        train_set=train_set, val_set=val_set, test_set=test_set, knn_set=knn_set, views=views,
        num_classes=int(train_source.num_classes), channels=channels, image_size=int(size), augment=augment,
        k=basis.k if basis is not None else None,
        basis_name=basis.name if basis is not None else None,
        basis_kind=basis.kind if basis is not None else None, basis=basis, target_scale=scale, elsh=elsh,
        elsh_rows=elsh_rows,
        data_spec=data_spec,
        cache_path=str(cache_path) if cache_path else None, cache_key=manifest.key,
        teacher_spec=manifest.teacher_spec, teacher_size=teacher_size, n_labelled=int(labelled.sum()),
        teacher_identity=manifest.teacher_identity, split=split,
        basis_excludes_val=basis_excludes_val,
        setup_seconds=time.perf_counter() - t0)


def _online_teacher(prep: Prepared) -> Any:
    """The cache's teacher, for method online; refused when it is no longer the one the cache was built with."""
    from tcskd.teachers import load_teacher  # only this method ever imports the teacher code

    if not prep.teacher_spec:
        raise StoreError(f"cache {prep.cache_path} names no teacher (teacher_spec); --method online needs one")
    teacher = load_teacher(prep.teacher_spec, prep.teacher_size)
    want = prep.teacher_identity
    if want and teacher.identity() != want:
        now = teacher.identity()
        diff = sorted(k for k in set(now) | set(want) if now.get(k) != want.get(k))
        raise StoreError(f"teacher {prep.teacher_spec} is not the one cache {prep.cache_key} was built with "
                         f"(differs in: {', '.join(diff)}); online targets would not match the cached basis")
    return teacher


def _loader(ds: ViewImages, sampler: EpochSampler, batch_size: int, workers: int, device: torch.device,
            drop_last: bool, seed: int, persistent: bool = False) -> DataLoader:
    """Batches of ``ds`` in ``sampler``'s order (the dataset builds whole batches, see ViewImages).

    ``persistent`` keeps the worker processes between epochs: set ``sampler.epoch`` before each pass.
    """
    g = torch.Generator().manual_seed((int(seed) * 31 + sampler.epoch) % (2 ** 63))
    # Sources hold closures (not picklable): workers are forked, whatever the platform's default.
    ctx = "fork" if workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=ViewImages.batch_collate, pin_memory=device.type == "cuda",
                      drop_last=drop_last, generator=g, multiprocessing_context=ctx,
                      persistent_workers=persistent and workers > 0)


# -- evaluation -------------------------------------------------------------

@torch.no_grad()
def embed(student: Student, head: TCSHead, ds: ViewImages, device: torch.device, batch_size: int,
          workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(features N x d_s, logits N x C) of every image of ``ds`` (its view 0, no augmentation)."""
    from tcskd.device import autocast

    was = student.training
    student.eval()
    head.eval()
    feats, logits = [], []
    loader = _loader(ds, EpochSampler(len(ds), 1, 0, 0, shuffle=False), batch_size, workers, device, False, 0)
    for x, *_ in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            f = student(x)
            lo, _ = head(f)
        feats.append(f.float().cpu())
        logits.append(lo.float().cpu())
    student.train(was)
    head.train(was)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float | None:
    keep = labels >= 0
    if not keep.any():
        return None
    return float((logits[keep].argmax(1) == labels[keep]).mean())


def final_scores(student: Student, head: TCSHead, prep: Prepared, device: torch.device, batch_size: int,
                 workers: int) -> dict[str, Any]:
    """Top-1 of the classifier on the validation rows and on the test split, and of a weighted kNN on the
    student's features whose references are the labelled training rows only (``knn_reference_rows``)."""
    from tcskd.train.evaluate import knn_top1

    out: dict[str, Any] = {"val_top1": None, "test_top1": None, "knn_top1": None, "knn_val_top1": None,
                           "knn_reference_rows": int((prep.knn_set.ce_labels >= 0).sum())}
    ref = None
    for name, ds in (("val", prep.val_set), ("test", prep.test_set)):
        if ds is None or not (ds.ce_labels >= 0).any():
            continue
        feats, logits = embed(student, head, ds, device, batch_size, workers)
        out[f"{name}_top1"] = top1(logits, ds.ce_labels)
        if out["knn_reference_rows"]:
            if ref is None:
                ref = embed(student, head, prep.knn_set, device, batch_size, workers)[0]
            key = "knn_top1" if name == "test" else "knn_val_top1"
            out[key] = knn_top1(ref, prep.knn_set.ce_labels, feats, ds.ce_labels, k=20, device=device)
    return out


# -- checkpoints ------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python_version": int(py_state[0]), "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # the previous checkpoint, if any, is untouched
        if isinstance(e, (RuntimeError, OSError)):  # torch's writer reports a full disk as a RuntimeError
            text = str(e).strip()
            msg = text.splitlines()[-1] if text else type(e).__name__
            raise TcskdError(f"cannot write checkpoint {path} (is the disk full?): {msg}") from e
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TcskdError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e}") from e


# -- the run directory -------------------------------------------------------

def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


def run_dir(cfg: TrainConfig, k: int | None) -> Path:
    """The run directory; refuses to overwrite a run unless resuming."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.method}-{_slug(cfg.student)}-{k or 'na'}-s{cfg.seed}-{stamp}"
    if not cfg.resume:
        if (out / "final.json").exists():
            raise TcskdError(f"run directory {out} holds a finished run; pass --resume or another --out")
        if (out / CHECKPOINT).exists():
            raise TcskdError(f"run directory {out} holds an unfinished run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, cache_key: str | None, meta_key: str | None) -> None:
    now = _config_dict(cfg)
    diff = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise TcskdError(f"cannot resume: the run was started with {k}={saved.get(k)!r}, now {now[k]!r} "
                         f"({len(diff)} option(s) differ: {', '.join(diff)})")
    if meta_key != cache_key:
        raise TcskdError(f"cannot resume: the run used cache {meta_key}, now {cache_key}")


# -- the loop ---------------------------------------------------------------

@dataclass
class LoopState:
    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    images: int = 0


class StudentWithHead(torch.nn.Module):
    """Student and TCS head as one module, so that DistributedDataParallel syncs both."""

    def __init__(self, student: Student, head: TCSHead) -> None:
        super().__init__()
        self.student, self.head = student, head

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        f = self.student(x)
        logits, c_hat = self.head(f, mask)
        return f, logits, c_hat


def fit(cfg: TrainConfig, prep: Prepared, student: Student, head: TCSHead, optimizer: torch.optim.Optimizer,
        state: LoopState, device: torch.device, workers: int, out: Path, meta: dict[str, Any],
        teacher: Any = None, model: torch.nn.Module | None = None) -> LoopState:
    """The training loop: epochs ``state.epoch .. cfg.epochs - 1`` (or up to ``cfg.stop_after``).

    ``model`` is the student and head as one module (DistributedDataParallel under
    torchrun); checkpoints, metrics and evaluation are rank 0's.
    """
    from tqdm.auto import tqdm

    from tcskd import dist
    from tcskd.device import autocast

    model = model if model is not None else StudentWithHead(student, head)
    world, rank = dist.world(), dist.rank()
    ds = prep.train_set
    n = len(ds)
    local_batch = cfg.batch_size // world
    local_n = -(-n // world)
    drop_last = local_n >= local_batch
    steps_per_epoch = local_n // local_batch if drop_last else 1
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = SelectionSchedule(prep.k or 0, cfg.epochs, cfg.select_every, cfg.drop_frac, cfg.min_dim)
    project = TorchProjection(prep.basis, device, prep.target_scale) if teacher is not None else None
    elsh = _elsh_for_mask(prep, head, device)
    eval_bs = max(cfg.batch_size, 256)
    last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    metrics_path = out / "metrics.jsonl"

    # One loader for the whole run: its workers stay alive, and each epoch sets the sampler's epoch
    # (order, views and augmentation are functions of (seed, epoch), not of the workers' state).
    sampler = EpochSampler(n, prep.views, cfg.seed, state.epoch, rank=rank, world=world)
    loader = _loader(ds, sampler, local_batch, workers, device, drop_last, cfg.seed, persistent=True)
    for epoch in range(state.epoch, last):
        t_epoch = time.perf_counter()
        student.train()
        head.train()
        sampler.epoch = epoch
        sums = torch.zeros(4, device=device)
        steps = 0
        lr = cfg.lr
        active = head.active
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if dist.is_main() else True)
        for x, c, y, _, _, tx in bar:
            lr = lr_at(state.step, total_steps, warmup_steps, cfg.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if teacher is not None:
                with torch.no_grad():
                    tx = center_view(tx.to(device, non_blocking=True), teacher.image_size)
                    with autocast(device):
                        feats = teacher.features(tx)
                    c = project(feats)  # in float32, like the cached targets
            elif head.k:
                c = c.to(device, non_blocking=True)
            # The mask enters the loss (and the classifier, reading coords) as a copy whose gradient
            # is the taylor criterion; its values are the head's.
            mask = head.mask.clone().requires_grad_(cfg.select_by == "taylor") if head.k else None
            with autocast(device):
                f, logits, c_hat = model(x, mask)
            parts = tcs_loss(logits, y, c_hat, c if head.k else None, mask, cfg.lam, cfg.mimic, elsh,
                             cfg.elsh_weight if cfg.elsh_bits else 0.0)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            if head.k:
                with torch.no_grad():
                    # Per rank, a share of the step's importance: summed over ranks it is one process's
                    # (grad is the gradient DDP already averaged, the same on every rank).
                    share = 1 if cfg.select_by == "grad" else world
                    head.importance += step_importance(cfg.select_by, head.gate.grad, mask.grad, c_hat, c) / share
                head.gate.grad = None
            optimizer.step()
            state.step += 1
            steps += 1
            sums += torch.stack([p.detach().float() for p in parts])
            if steps % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{(sums[0] / steps).item():.4f}", lr=f"{lr:.3g}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t_epoch
        images = steps * local_batch * world if drop_last else n
        state.train_seconds += seconds
        state.images += images
        means = (sums / max(1, steps)).tolist()

        if world > 1:  # the loss parts of every rank
            dist.all_reduce_sum(sums)
            sums /= world
            means = (sums / max(1, steps)).tolist()
        val = None  # the test split is never looked at during training: only the validation rows
        if (dist.is_main() and prep.val_set is not None
                and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)):
            _, logits = embed(student, head, prep.val_set, device, eval_bs, workers)
            val = top1(logits, prep.val_set.ce_labels)
        _gather_importance(head, cfg.select_by, world, rank, everywhere=schedule.selects_after(epoch))
        if apply_selection(head, schedule, epoch) and elsh is not None:
            elsh = _elsh_for_mask(prep, head, device)  # the hash of the coordinates still active
        state.epoch = epoch + 1
        if not dist.is_main():
            continue
        row = {"epoch": epoch + 1, "loss": means[0], "loss_ce": means[1], "loss_mimic": means[2],
               "loss_elsh": means[3], "lr": lr, "active_coords": active, "train_img_per_s": images / seconds,
               "val_top1": val, "seconds": time.perf_counter() - t_epoch}
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(out / CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "epoch": state.epoch, "step": state.step,
            "train_seconds": state.train_seconds, "images": state.images,
            "student": student.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "config": _config_dict(cfg), "meta": meta})
        log.info("epoch %d/%d: loss %.4f (ce %.4f, mimic %.4f, elsh %.4f), active %s, val top-1 %s, %.0f img/s",
                 epoch + 1, cfg.epochs, *means, active, "-" if val is None else f"{val:.4f}", images / seconds)
    dist.barrier()
    return state


def _gather_importance(head: TCSHead, select_by: str, world: int, rank: int, everywhere: bool) -> None:
    """Under torchrun, after every epoch: rank 0's importance becomes the sum over all ranks and the
    others start again from 0, so rank 0's checkpoint holds what every rank accumulated (a run resumed
    with any number of processes goes on from the same total); before a selection step (``everywhere``)
    every rank keeps the sum, so all drop the same coordinates. ``grad`` needs nothing: DDP averages the
    gate's gradient, so every rank accumulates the same values."""
    from tcskd import dist

    if world == 1 or not head.k or select_by == "grad":
        return
    dist.all_reduce_sum(head.importance)
    if rank != 0 and not everywhere:
        head.importance.zero_()


def _elsh_for_mask(prep: Prepared, head: TCSHead, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of the eLSH term with ``b = -median(W (m * c))`` for the head's current mask (None: off)."""
    if prep.elsh is None:
        return None
    w, _ = prep.elsh
    return w.to(device), elsh_bias(prep.elsh_rows, w, head.mask.detach().cpu()).to(device)


# -- the stage --------------------------------------------------------------

def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """The metric rows of epochs 1..upto (rows of epochs lost to a crash are dropped)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto]


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [r["epoch"] for r in rows]
    shown = [k for k in ("loss", "loss_ce", "loss_mimic", "loss_elsh") if any(r.get(k) for r in rows)]
    for key in shown:
        a.plot(ep, [r[key] for r in rows], label=key, marker="." if len(rows) < 20 else None)
    if all(r[k] > 0 for r in rows for k in shown):
        a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend(fontsize=8)
    acc = [(r["epoch"], r["val_top1"]) for r in rows if r.get("val_top1") is not None]
    if acc:
        b.plot([e for e, _ in acc], [v for _, v in acc], marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel("validation top-1")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Stage 3: train ``cfg.student`` on ``cfg.cache``; returns the content of ``final.json``."""
    import yaml

    from tcskd.device import peak_memory_bytes, resolve_device

    from tcskd import dist

    t_start = time.perf_counter()
    cfg = resolve_config(cfg)
    device = dist.device_for_rank(resolve_device(cfg.device))
    dist.init(device)
    if cfg.sync_bn and device.type != "cuda":
        raise TcskdError("--sync-bn needs CUDA devices (SyncBatchNorm runs on GPUs only)")
    if cfg.batch_size % dist.world():
        raise TcskdError(f"--batch-size {cfg.batch_size} is the global batch: it must divide evenly over "
                         f"{dist.world()} processes")
    workers = cfg.workers if cfg.workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    prep = prepare(cfg)
    teacher = _online_teacher(prep) if cfg.method == "online" else None
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    random.seed(cfg.seed)
    student = make_student(cfg.student, prep.num_classes, prep.channels)
    head = TCSHead(student.feature_dim, prep.num_classes, prep.k, cfg.classify_from)

    out = _shared_run_dir(cfg, prep.k)
    ckpt_path = out / CHECKPOINT
    saved = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if saved is not None:
        _check_resume(saved["config"], cfg, prep.cache_key, saved["meta"].get("cache_key"))
        if saved["epoch"] >= cfg.epochs and (out / "final.json").exists():
            log.info("%s is finished; nothing to do", out)
            return json.loads((out / "final.json").read_text())
    elif cfg.resume:
        log.info("no checkpoint in %s: starting from scratch", out)
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
    state = LoopState()
    if saved is not None:
        student.load_state_dict(saved["student"])
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        if dist.rank() != 0 and cfg.select_by != "grad" and head.k:
            head.importance.zero_()  # the checkpoint's importance is the sum over ranks: rank 0 carries it
        state = LoopState(saved["epoch"], saved["step"], saved["train_seconds"], saved["images"])
        log.info("resuming %s after epoch %d", out, state.epoch)
        was = (saved.get("meta") or {}).get("augment_rng", "numpy-per-row")
        if prep.augment != "none" and was != AUGMENT_RNG:
            log.warning("the checkpoint was written with another augmentation generator (%s, now %s): the run "
                        "goes on with the current one and will not equal an uninterrupted run", was, AUGMENT_RNG)
    # Metric rows beyond the checkpoint belong to an epoch that must be redone.
    rows = _read_metrics(out / "metrics.jsonl", state.epoch)
    if dist.is_main():
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    resolved = _config_dict(cfg)
    resolved["resolved"] = {
        "cache_path": prep.cache_path, "cache_key": prep.cache_key, "data": prep.data_spec, "dim": prep.k,
        "basis_kind": prep.basis_kind, "basis": prep.basis_name, "target_scale": prep.target_scale,
        "image_size": prep.image_size,
        "augment": prep.augment, "views": prep.views, "device": str(device), "workers": workers,
        "train_images": len(prep.train_set), "labelled_images": prep.n_labelled,
        "test_images": len(prep.test_set) if prep.test_set is not None else 0,
        "num_classes": prep.num_classes, "channels": prep.channels, "teacher_spec": prep.teacher_spec,
        "student_params": count_parameters(student), "head_params": count_parameters(head)}
    resolved["resolved"]["world_size"] = dist.world()
    if dist.is_main():
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        _write_json(out / "split.json", prep.split)

    if teacher is not None:
        teacher.to(device)
    log.info("training %s (%s, %d params) on %d images (%d labelled), method %s, K=%s, on %s",
             cfg.student, prep.data_spec, count_parameters(student), len(prep.train_set), prep.n_labelled,
             cfg.method, prep.k, device)

    model: torch.nn.Module = StudentWithHead(student, head)
    if dist.world() > 1:
        # Each rank accumulates its own importance (summed over ranks before a selection step): DDP must
        # not overwrite it with rank 0's buffer at every forward.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ["head.importance"])
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    state = fit(cfg, prep, student, head, optimizer, state, device, workers, out, meta, teacher, model)
    if not dist.is_main():  # rank 0 evaluates and writes the results
        final = dist.broadcast_object(None)
        return final
    if state.epoch < cfg.epochs:
        log.info("stopped after epoch %d of %d (--stop-after); resume with --resume", state.epoch, cfg.epochs)
        return dist.broadcast_object({"stopped_after": state.epoch, "run_dir": str(out)})

    # The end of training: validation and, once, the test split; kNN references are the labelled rows.
    t_eval = time.perf_counter()
    scores = final_scores(student, head, prep, device, max(cfg.batch_size, 256), workers)
    rows = _read_metrics(out / "metrics.jsonl", state.epoch)
    final = {
        **scores, "train_seconds": state.train_seconds,
        "img_per_s": state.images / state.train_seconds if state.train_seconds > 0 else None,
        "peak_mem_bytes": peak_memory_bytes(device), "method": cfg.method, "dim": prep.k,
        "active_coords": head.active if prep.k else None, "labels_per_class": cfg.labels_per_class,
        "seed": cfg.seed, "student": cfg.student, "student_params": count_parameters(student),
        "basis": prep.basis_name, "basis_kind": prep.basis_kind, "cache_key": prep.cache_key,
        "cache": prep.cache_path, "data": prep.data_spec, "lambda": cfg.lam, "mimic": cfg.mimic,
        "target_norm": cfg.target_norm, "target_scale": prep.target_scale,
        "elsh_bits": cfg.elsh_bits, "tailoring": tailoring_label(cfg), "classify_from": head.classify_from,
        "select_by": cfg.select_by, "epochs": cfg.epochs, "train_images": len(prep.train_set),
        "labelled_images": prep.n_labelled, "image_size": prep.image_size, "device": str(device),
        "setup_seconds": prep.setup_seconds, "eval_seconds": time.perf_counter() - t_eval,
        "total_seconds": time.perf_counter() - t_start, "run_dir": str(out),
        "best_val_top1": max((r["val_top1"] for r in rows if r.get("val_top1") is not None), default=None),
        "val_rows": len(prep.split["val"]), "holdout": prep.split["holdout"],
        "basis_excludes_val": prep.basis_excludes_val,
    }
    # final.json marks the run finished (a resume then does nothing): every other artifact comes first.
    plot_curves(rows, out / "curves.png", f"{cfg.method} {cfg.student} K={prep.k} seed {cfg.seed}")
    _write_json(out / "final.json", final)
    log.info("finished: val top-1 %s, test top-1 %s, kNN top-1 %s, %.1f s of training; %s",
             final["val_top1"], final["test_top1"], final["knn_top1"], state.train_seconds, out)
    return dist.broadcast_object(final)


def _shared_run_dir(cfg: TrainConfig, k: int | None) -> Path:
    """Rank 0 picks (and checks) the run directory; every rank gets the same one."""
    from tcskd import dist

    picked: tuple[str | None, str | None] = (None, None)
    if dist.is_main():
        try:
            picked = (str(run_dir(cfg, k)), None)
        except TcskdError as e:
            picked = (None, str(e))
    path, error = dist.broadcast_object(picked)
    if error:
        raise TcskdError(error)
    return Path(path)
