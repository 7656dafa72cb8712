"""The options of stage 3: ``TrainConfig`` (``tcskd train``) and ``EvalConfig`` (``tcskd eval``).

Each field is declared once (type, default, choices, CLI help; tcskd.options) and the click commands in
tcskd.train.commands are generated from them. ``TrainConfig.validate`` and ``EvalConfig.validate`` are the
one place their values are checked; :func:`resolve_config` fills in the defaults that depend on other
options (the ``--tailor`` presets, learning rate and weight decay of the optimizer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcskd.device import DEVICES, resolve_workers
from tcskd.errors import TcskdError
from tcskd.options import non_default, opt, read_config_file
from tcskd.splits import Holdout
from tcskd.train.head import CLASSIFY_FROM
from tcskd.train.logger import check_backends
from tcskd.train.losses import MIMICS
from tcskd.train.selection import REMOVED, SELECT_BY
from tcskd.train.targets import DEFAULT_DIM, TARGET_MODES, TARGET_NORMS, default_target_cache_mb


log = logging.getLogger(__name__)

#: Training methods: tcs (basis coordinates), fitnet (raw features), ce (no distillation), online (live teacher).
METHODS = ("tcs", "fitnet", "ce", "online")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "multistep")
TAILOR = ("auto", "on", "off")
#: What the student learns: image classes (``classify``) or a class per pixel (``segment``).
TASKS = ("classify", "segment")
#: Which teacher targets the mimic term matches: the image's embedding (global), its token grid (dense), or both;
#: auto = global on a global cache, dense on a patch cache.
MIMIC_ON = ("auto", "global", "dense", "both")
#: Student augmentations with a 1-view cache (auto: crop for greyscale digits, else crop-flip).
AUGMENTS = ("auto", "none", "flip", "crop", "crop-flip")
#: The training order: auto (block with --targets store, else a plain permutation), epoch or block.
SAMPLERS = ("auto", "epoch", "block")
#: Config fields that ``--resume`` never takes from the run's config.yaml.
NOT_SAVED = ("resume", "out", "stop_after")
#: Config fields that may differ when a run is resumed.
RESUME_FREE = ("cache", "cache_root", "data", "out", "resume", "device", "workers", "eval_every", "stop_after",
               "sync_bn", "log", "targets", "target_cache_mb")


@dataclass
class TrainConfig:
    """Options of ``tcskd train``."""

    cache: str | None = opt(None, help="Train cache: key, key prefix or directory.")
    """Train cache: a key (or unique prefix) under ``cache_root``, or a directory (optional only for ``ce``
    with ``data``)."""
    basis: str = opt("pca", help="Basis name in the cache.")
    """Name of the basis in the cache (``bases/<name>``) whose coordinates are the targets."""
    task: str = opt("classify", choices=TASKS,
                    help="classify (image labels) or segment (per-pixel masks: CE on the labelled masks, "
                         "mIoU).")
    """classify: a classifier on the pooled student feature, top-1; segment: a 1x1-conv pixel classifier on the
    student's feature map upsampled to the input size, CE on the labelled masks (255 = ignore), mean IoU and pixel
    accuracy (tcskd.segmetrics). The data must have masks for segment."""
    mimic_on: str = opt("auto", choices=MIMIC_ON,
                        help="Mimic the teacher's global embedding, its token grid (dense; needs a patch cache) "
                             "or both; auto: global on a global cache, dense on a patch cache.")
    """Which targets the mimic term matches. global: the image's K coordinates, predicted from the pooled student
    feature; dense: the K coordinates of every teacher token, predicted per location by a 1x1 conv on the student's
    feature map and resized to the teacher's grid (tcskd.train.losses.align_to_grid); both: the sum of the two
    terms, sharing one coordinate mask. On a patch cache the global target is the mean of the view's token
    coordinates (the projection is linear, so it equals the coordinates of the mean-pooled token embedding).
    auto: global on a global cache, dense on a patch cache."""
    student_stage: int | None = opt(None, metavar="N",
                                    help="The student stage whose feature map the dense head and the pixel "
                                         "classifier read (default: the last).")
    """The stage of the student whose output is ``Student.feature_map`` (tcskd.train.students); None = the last."""
    student: str = opt("cnn", help="cnn, segnet, resnet8x4, resnet20, resnet32x4, resnet56, wrn-16-2, wrn-40-2, "
                                   "mobilenetv2, shufflenetv2, vgg8, tv:NAME or python:MODULE:FACTORY.")
    """Student network (tcskd.train.students): cnn, segnet (an encoder-decoder for segmentation), resnet8x4, ...,
    tv:NAME, python:MODULE:FACTORY."""
    method: str = opt("tcs", choices=METHODS)
    """tcs (basis coordinates), fitnet (identity basis / raw features), ce (no distillation), online (live teacher)."""
    dim: int | None = opt(None, help="K: first K coordinates of the basis (default: 64, or all when the basis has "
                                     "fewer).")
    """K: the first K coordinates of the basis; None = min(DEFAULT_DIM, the basis's K) (tcskd.train.targets,
    chosen on validation). fitnet always uses every dimension."""
    lam: float = opt(10.0, cli="--lambda",
                     help="Weight of the mimic term (10: best of a grid on the built-in default, see README).")
    """lambda: weight of the mimic term (forced to 0 for ce); 10 was best on validation, averaged over both label
    budgets of the built-in default's grid (README)."""
    target_norm: str = opt("global", choices=TARGET_NORMS,
                           help="global: divide targets by sqrt(mean coordinate variance), so lambda is scale-free.")
    """global: divide the targets by one scale, sqrt(mean variance of the K coordinates), so that lambda does not
    depend on the teacher's feature scale (predicting 0 costs MSE 1); none: the raw coordinates."""
    mimic: str = opt("mse", choices=MIMICS)
    """Mimic distance: mse, smooth-l1 or cosine."""
    epochs: int = opt(30)
    """Training epochs."""
    batch_size: int = opt(128)
    """Images per optimizer step, over all processes: under torchrun each of N ranks takes batch_size / N,
    so the global batch, the learning rate and the number of steps do not depend on N."""
    lr: float | None = opt(None, help="Peak learning rate (default: 0.05 sgd, 1e-3 adamw).")
    """Peak learning rate; None = 0.05 for sgd, 1e-3 for adamw."""
    optimizer: str = opt("sgd", choices=OPTIMIZERS)
    """sgd (Nesterov-free momentum SGD) or adamw."""
    weight_decay: float | None = opt(None, help="Default: 5e-4 sgd, 0.05 adamw.")
    """Weight decay; None = 5e-4 for sgd, 0.05 for adamw."""
    momentum: float = opt(0.9)
    """SGD momentum."""
    warmup_epochs: float = opt(1.0)
    """Linear warm-up length in epochs (may be fractional; 0 = none)."""
    schedule: str = opt("cosine", choices=SCHEDULES,
                        help="After the warm-up: cosine to 0, step (x0.1 at 50% and 75% of the steps), or "
                             "multistep (x gamma at each of --milestones).")
    """After the warm-up: cosine (to 0), step (x0.1 at 50% and 75% of the steps) or multistep (x ``gamma``
    at each epoch of ``milestones``, the CIFAR-100 KD standard: 150,180,210 of 240 epochs)."""
    milestones: tuple[int, ...] = opt((), metavar="E1,E2,...",
                                      help="Epochs at which multistep multiplies the lr by --gamma, e.g. "
                                           "150,180,210.")
    """Epochs (increasing, each in 1 .. epochs - 1) at whose start ``multistep`` multiplies the learning rate
    by ``gamma``: epoch e (0-based) trains at lr * gamma ** (milestones <= e), as torch's MultiStepLR and
    RepDistiller's ``--lr_decay_epochs``. Only for ``multistep``."""
    gamma: float = opt(0.1, help="Factor of each multistep milestone.")
    """Factor applied to the learning rate at each milestone of ``multistep`` (in (0, 1])."""
    labels_per_class: int | None = opt(None, help="CE (and kNN references) on n labelled training images per class; "
                                                  "with --task segment, n labelled images (masks) in all "
                                                  "(default: every label).")
    """CE on this many labelled images per class (seeded by ``seed``, drawn from the training rows); None =
    every label. The mimic term uses every training image; the kNN references are the labelled rows. With
    ``task segment`` it is the number of training images whose mask CE sees (the others carry an all-ignore
    mask; the dense mimic sees every training image)."""
    val_frac: float = opt(0.1, help="Share of each class of the training split held out for validation (0: none; "
                                    "segment: a share of the images).")
    """Share of each class of the training split held out for validation (seeded by ``val_seed``,
    stratified): used for ``val_top1`` only, never for CE, the mimic term or kNN references. 0 = none. For
    segmentation data (image labels -1) it is a share of the images (tcskd.splits)."""
    val_per_class: int | None = opt(None, help="Hold out n rows per class instead of --val-frac (segment: n images).")
    """Hold out this many rows of each class instead of ``val_frac`` (segmentation data: this many images)."""
    val_seed: int = opt(0, help="Seed of the validation split (the same for every --seed).")
    """Seed of the validation split; the same for every run seed, so seeds are compared on the same rows."""
    tailor: str = opt("auto", choices=TAILOR,
                      help="Tailoring: on = from 256 coordinates down to 64 by taylor importance, the classifier "
                           "reading the coordinates; off = the first 64 throughout; auto = off (no tailoring "
                           "schedule beat the first 64 on the built-in default's validation grid, see README). "
                           "The options below override parts.")
    """Tailoring (iterative coordinate selection): on = the TAILORED schedule, off = a fixed K, auto = off: on
    the built-in default's validation grid (3 seeds, 10 labels per class and all labels) neither the absolute
    taylor nor the ablation-ce criterion beat the first 64 coordinates (README). Each field below overrides
    its part."""
    select_every: int | None = opt(None, help="Tailoring period in epochs (0: off).")
    """Drop coordinates after every this-many epochs; 0 = no tailoring; None = from ``tailor``."""
    drop_frac: float | None = opt(None, help="Share of the active coordinates dropped per step.")
    """Share of the active coordinates dropped per selection step; None = from ``tailor``."""
    min_dim: int | None = opt(None, help="Tailoring stops at this many coordinates.")
    """Tailoring never goes below this many active coordinates; None = from ``tailor``."""
    select_by: str | None = opt(None, choices=SELECT_BY,
                                help="Tailoring importance, summed over the steps after the warm-up: the exact "
                                     "increase of the total loss (ablation) or of CE alone (ablation-ce) when a "
                                     "coordinate is switched off, |dL/dmask| per batch (taylor), or the per-coordinate "
                                     "relative error dropping the best- (error) or worst-matched (worst) coordinates.")
    """Importance for tailoring (tcskd.train.selection), summed over the optimizer steps after the learning-rate
    warm-up: ablation (the exact increase of the total loss when the coordinate alone is switched off),
    ablation-ce (the same for CE alone: 0 unless the classifier reads the coordinates), taylor
    (``|dL/dm_j|`` of the mask per batch), error (drops the best-matched coordinates) or worst (drops the
    worst-matched ones); None = from ``tailor``. ``grad`` was removed (use ablation)."""
    classify_from: str | None = opt(None, choices=CLASSIFY_FROM,
                                    help="The classifier reads the student feature, or the active predicted teacher "
                                         "coordinates.")
    """What the classifier reads: feature (the student's feature f) or coords (the predicted, active teacher
    coordinates m * c_hat, so CE also shapes the coordinates and the tailoring criteria see the task; merged
    into one linear layer at export); None = from ``tailor``."""
    elsh_bits: int = opt(0, help="Bits of the eLSH term (0: off).")
    """Bits of the eLSH term; 0 = off."""
    elsh_weight: float = opt(1.0)
    """mu: weight of the eLSH term (when elsh_bits > 0)."""
    augment: str = opt("auto", choices=AUGMENTS, help="Student augmentation with a 1-view cache.")
    """Student augmentation with a 1-view cache: none, flip, crop, crop-flip; auto = crop (no mirroring) for
    MNIST / greyscale data, else crop-flip. A V-view cache replays its stored views instead."""
    image_size: int | None = opt(None, help="Student input size (default: the data's).")
    """Student input size; None = the dataset's native size (e.g. 28 for MNIST, 32 for CIFAR)."""
    data: str | None = opt(None, help="Dataset spec overriding the cache's.")
    """Dataset spec overriding the cache manifest's (e.g. after moving the files)."""
    out: str | None = opt(None, help="Run directory (default: runs/<method>-<student>-<K>-s<seed>-<time>).")
    """Run directory; None = runs/<method>-<student>-<K>-s<seed>-<time>."""
    resume: bool = opt(False, help="Continue the run in --out (its config.yaml supplies the options not given).")
    """Continue the run in ``out`` from its checkpoint."""
    device: str = opt("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    seed: int = opt(0)
    """Seed of initialisation, order, views, augmentation, label subset, eLSH."""
    workers: int | str | None = opt("auto", metavar="auto|N",
                                    help="DataLoader worker processes; auto: one less than the usable cores, at "
                                         "most 16.")
    """DataLoader worker processes (tcskd.device.resolve_workers): a number, or ``auto`` = one less than the
    cores this process may use (under torchrun: its share of the node's), at most 16 (1 on 2 cores); None
    (older config files) = auto. Batches are
    pinned and prefetched on CUDA. Results do not depend on it (order, views and augmentation are functions
    of (seed, epoch, row)); the number used is recorded in config.yaml's ``resolved``."""
    cache_root: str | None = opt(None)
    """Where cache keys are looked up (default: $TCSKD_CACHE, else ./caches)."""
    eval_every: int = opt(1)
    """Evaluate validation top-1 after every this-many epochs (and always after the last); the test split
    is evaluated once, after training."""
    log: str = opt("none", metavar="BACKENDS",
                   help="Mirror metrics.jsonl to tensorboard (RUN_DIR/tb) and/or wandb (offline, RUN_DIR/wandb): "
                        "none, tensorboard, wandb or tensorboard,wandb.")
    """Experiment trackers that mirror ``metrics.jsonl`` (tcskd.train.logger): none, tensorboard, wandb or a
    comma list; each needs its optional package (``pip install 'tcskd[tensorboard]'``)."""
    stop_after: int | None = opt(None, hidden=True)
    """Stop (as if interrupted) after this many epochs, leaving a resumable run; for tests and time-boxed jobs."""
    sync_bn: bool = opt(False, help="Under torchrun: SyncBatchNorm over all ranks.")
    """Under torchrun: convert BatchNorm layers to SyncBatchNorm (batch statistics over all ranks)."""
    targets: str = opt("auto", choices=TARGET_MODES,
                       help="Where the training targets live: ram (all loaded at the start), store (read chunk by "
                            "chunk while training, with an LRU of --target-cache-mb per process) or auto (ram "
                            "when they take < 4 GB and < 25% of the available memory).")
    """``ram``: every training row's targets loaded at the start (N x V x K float32, N x V x T x K float16 for
    token grids) and the images visited in a plain permutation (:class:`tcskd.train.data.EpochSampler`);
    ``store``: targets read by chunk from the store as the batches need them, each DataLoader process keeping
    an LRU of decoded, projected, scaled chunks of at most ``target_cache_mb``, and the images visited chunk
    block by chunk block (:class:`tcskd.train.data.BlockSampler`); ``auto``: ram when the targets fit
    comfortably (< 4 GB and < 25 % of the available memory), else store (logged). Both give the same targets
    for a row, bit for bit."""
    target_cache_mb: int | None = opt(None, metavar="MB",
                                      help="With --targets store: the targets cache of each DataLoader process, in "
                                           "MB (default: min(2048, 5% of the memory)); also sizes the sampler's "
                                           "block of chunks.")
    """The byte budget of each process's chunk LRU (``--targets store``), in MB; None = min(2048, 5 % of the
    machine's memory), made a number by :func:`resolve_config` so that config.yaml records it: it sets the
    block sampler's window (how many chunks are shuffled together), so a resumed run keeps its order."""
    sampler: str = opt("auto", choices=SAMPLERS, hidden=True)
    """``auto``: the block sampler with store targets, the plain permutation with ram ones; ``block`` forces
    the block sampler with ram targets too (then both paths see the same order: for comparing them)."""

    def validate(self) -> None:
        """TcskdError (one line) for an unknown choice, a value out of range or a missing option.

        Tailoring fields left None (filled from the ``tailor`` preset by :func:`resolve_config`) pass.
        """
        for what, value, allowed in (("method", self.method, METHODS), ("mimic loss", self.mimic, MIMICS)):
            if value not in allowed:
                raise TcskdError(f"unknown {what} '{value}' (choose {', '.join(allowed)})")
        for name, value, allowed in (("task", self.task, TASKS), ("mimic-on", self.mimic_on, MIMIC_ON)):
            if value not in allowed:
                raise TcskdError(f"unknown --{name} '{value}' (choose {', '.join(allowed)})")
        if self.student_stage is not None and self.student_stage < 1:
            raise TcskdError(f"--student-stage must be >= 1 (got {self.student_stage})")
        if self.method == "online" and self.mimic_on in ("dense", "both"):
            raise TcskdError(f"--method online computes global targets only; --mimic-on {self.mimic_on} needs "
                             f"cached tokens (--method tcs or fitnet on a patch cache)")
        if self.elsh_bits and self.mimic_on in ("dense", "both"):
            raise TcskdError(f"--elsh-bits hashes global targets; it does not work with --mimic-on {self.mimic_on}")
        if self.task == "segment" and self.classify_from == "coords":
            raise TcskdError("--task segment: the pixel classifier reads the feature map (--classify-from feature)")
        for what, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise TcskdError(f"unknown {what} '{value}' (choose {', '.join(allowed[:-1])} or {allowed[-1]})")
        self._validate_milestones()
        if self.target_cache_mb is not None and self.target_cache_mb < 1:
            raise TcskdError(f"--target-cache-mb must be >= 1 (got {self.target_cache_mb})")
        if self.targets == "store" and self.elsh_bits:
            raise TcskdError("--elsh-bits fits its bias on a sample of all the targets: use --targets ram or auto")
        if self.select_by in REMOVED:
            raise TcskdError(REMOVED[self.select_by])
        for name, value, allowed in (("target-norm", self.target_norm, TARGET_NORMS), ("tailor", self.tailor, TAILOR),
                                     ("targets", self.targets, TARGET_MODES), ("sampler", self.sampler, SAMPLERS),
                                     ("select-by", self.select_by, SELECT_BY),
                                     ("classify-from", self.classify_from, CLASSIFY_FROM)):
            if value is not None and value not in allowed:
                raise TcskdError(f"unknown --{name} '{value}' (choose {', '.join(allowed)})")
        for name, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                                 ("select-every", self.select_every, 0), ("min-dim", self.min_dim, 1),
                                 ("elsh-bits", self.elsh_bits, 0), ("eval-every", self.eval_every, 1),
                                 ("dim", self.dim, 1)):
            if value is not None and value < low:
                raise TcskdError(f"--{name} must be >= {low} (got {value})")
        for name, value, strict in (("lr", self.lr, True), ("weight-decay", self.weight_decay, False),
                                    ("lambda", self.lam, False), ("warmup-epochs", self.warmup_epochs, False),
                                    ("elsh-weight", self.elsh_weight, False)):
            if value is not None and (not math.isfinite(value) or value < 0 or (strict and value == 0)):
                raise TcskdError(f"--{name} must be a finite number {'>' if strict else '>='} 0 (got {value})")
        if not 0.0 <= self.momentum < 1.0:
            raise TcskdError(f"--momentum must be in [0, 1) (got {self.momentum})")
        Holdout(self.val_frac, self.val_per_class, self.val_seed)  # checks the validation options
        if self.drop_frac is not None and not 0.0 <= self.drop_frac < 1.0:
            raise TcskdError(f"--drop-frac must be in [0, 1) (got {self.drop_frac})")
        if self.cache is None and not (self.method == "ce" and self.data):
            raise TcskdError("--cache is required (only --method ce can train from --data alone)")
        if self.resume and not self.out:
            raise TcskdError("--resume needs --out RUN_DIR (the run to continue)")
        if self.image_size is not None and self.image_size < 8:
            raise TcskdError(f"--image-size must be >= 8 (got {self.image_size})")
        resolve_workers(self.workers)
        check_backends(self.log)  # a known backend whose package is installed

    def _validate_milestones(self) -> None:
        """TcskdError unless ``milestones`` are increasing epochs >= 1, given for (and only for) ``multistep``,
        and ``gamma`` is in (0, 1]. Milestones at or past ``epochs`` change nothing (as torch's MultiStepLR);
        :func:`resolve_config` says so."""
        ms = tuple(self.milestones)
        if self.schedule != "multistep":
            if ms:
                raise TcskdError(f"--milestones is for --schedule multistep (the schedule is {self.schedule})")
            return
        if not ms:
            raise TcskdError("--schedule multistep needs --milestones (epochs, e.g. 150,180,210)")
        if any(not isinstance(m, int) or isinstance(m, bool) for m in ms):
            raise TcskdError(f"--milestones must be whole epochs (got {','.join(map(str, ms))})")
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise TcskdError(f"--milestones must be increasing (got {','.join(map(str, ms))})")
        if ms[0] < 1:
            raise TcskdError(f"--milestones must be epochs >= 1 (got {','.join(map(str, ms))})")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise TcskdError(f"--gamma must be in (0, 1] (got {self.gamma})")


# -- the --tailor presets and the resolved config ------------------------------

#: ``--tailor on``: start from (up to) 256 coordinates and drop a fifth of them after every epoch down to
#: DEFAULT_DIM, by the taylor importance (|dL/dm| per batch), the classifier reading the coordinates.
TAILORED = {"start_dim": 256, "select_every": 1, "drop_frac": 0.2, "min_dim": DEFAULT_DIM,
            "select_by": "taylor", "classify_from": "coords"}
#: ``--tailor off``: the first DEFAULT_DIM coordinates throughout, the classifier reading the feature.
FIXED = {"start_dim": DEFAULT_DIM, "select_every": 0, "drop_frac": 0.2, "min_dim": DEFAULT_DIM,
         "select_by": "taylor", "classify_from": "feature"}


def default_dim(cfg: TrainConfig) -> int:
    """K without ``--dim``: the preset's start (256 when tailoring, DEFAULT_DIM when not), or the basis's K
    when it has fewer components."""
    return int(tailoring_preset(cfg)["start_dim"] if cfg.select_every else DEFAULT_DIM)


def tailoring_preset(cfg: TrainConfig) -> dict[str, Any]:
    """The preset ``cfg.tailor`` stands for: ``on`` the TAILORED schedule, ``off`` and ``auto`` the FIXED one
    (``auto`` is what validation chose on the built-in default: with 10 labels per class no tailoring schedule
    beat the first 64 coordinates, and with all labels those that did kept none of the leading 64 ranks,
    scoring as CE alone; README, "Results on the built-in default"). With ``segment`` the classifier always
    reads the feature map."""
    if cfg.tailor not in TAILOR:
        raise TcskdError(f"unknown --tailor '{cfg.tailor}' (choose {', '.join(TAILOR)})")
    preset = TAILORED if cfg.tailor == "on" else FIXED
    return dict(preset, classify_from="feature") if cfg.task == "segment" else preset


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Check the options (``cfg.validate()``) and fill in the defaults that depend on others."""
    cfg.validate()
    preset = tailoring_preset(cfg)
    cfg = dataclasses.replace(cfg, **{k: preset[k] if getattr(cfg, k) is None else getattr(cfg, k)
                                      for k in ("select_every", "drop_frac", "min_dim", "select_by",
                                                "classify_from")})
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    wd = cfg.weight_decay if cfg.weight_decay is not None else (5e-4 if cfg.optimizer == "sgd" else 0.05)
    lam = 0.0 if cfg.method == "ce" else cfg.lam
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if late:
        log.warning("--milestones %s lie at or past the run's %d epochs: they do not change its learning rate",
                    ",".join(map(str, late)), cfg.epochs)
    cache_mb = cfg.target_cache_mb if cfg.target_cache_mb is not None else default_target_cache_mb()
    return dataclasses.replace(cfg, lr=lr, weight_decay=wd, lam=lam, milestones=tuple(cfg.milestones),
                               target_cache_mb=cache_mb)


def tailoring_label(cfg: TrainConfig) -> str:
    """A short description of the tailoring schedule (``off`` when it is)."""
    if cfg.method not in ("tcs", "fitnet", "online") or not cfg.select_every or not cfg.drop_frac:
        return "off"
    return f"{cfg.select_by}/{cfg.select_every}ep/-{cfg.drop_frac:g}/min{cfg.min_dim}"


def table_row(cfg: TrainConfig) -> dict[str, Any]:
    """The options of a resolved ``cfg`` that define a row of ``tcskd report``'s table, as ``final.json``
    records them (``tcskd train --print-config``), without opening the cache. ``basis`` is the basis's name
    (the report shows its kind: the same when a basis is named by its kind); ``dim`` is ``all`` for fitnet
    (every feature dimension of the cache) and, when ``--dim`` is not given, at most the basis's K."""
    distils = cfg.method != "ce"
    return {"method": cfg.method, "basis": ("identity" if cfg.method == "fitnet" else cfg.basis) if distils else None,
            "dim": ("all" if cfg.method == "fitnet" else cfg.dim or default_dim(cfg)) if distils else None,
            "lambda": cfg.lam, "tailoring": tailoring_label(cfg), "elsh_bits": cfg.elsh_bits,
            "classify_from": cfg.classify_from if distils and cfg.task == "classify"
            and cfg.mimic_on != "dense" else "feature",
            "labels_per_class": cfg.labels_per_class}


def with_saved_config(cfg: TrainConfig, given: set[str] | None = None) -> TrainConfig:
    """With ``cfg.resume``: ``cfg`` with the options not ``given`` taken from the run's ``out/config.yaml``.

    The same mechanism as ``--config``: the run's config.yaml is the file, the given options override it
    (except :data:`NOT_SAVED`, never taken from the file). ``given`` is the set of field names given
    explicitly (the CLI passes those on its command line); None (the Python API) = the fields whose value
    is not their default: a field set to its default in Python is taken from the run, and the log says
    which. Unchanged without ``resume``/``out`` or when the run has no config.yaml yet.
    """
    if not (cfg.resume and cfg.out):
        return cfg
    path = Path(cfg.out) / "config.yaml"
    if not path.is_file():
        return cfg
    saved = read_config_file(TrainConfig, path)
    from_python = given is None
    given = non_default(TrainConfig, dataclasses.asdict(cfg)) if given is None else given
    taken = {k: v for k, v in saved.items() if k not in given and k not in NOT_SAVED}
    changed = {k: v for k, v in taken.items() if v != getattr(cfg, k) and not (
        isinstance(v, (list, tuple)) and tuple(v) == tuple(getattr(cfg, k) or ()))}
    if from_python and changed:  # a field set to its default in Python looks the same as one not set
        log.info("resume: from %s, %s (fields at their defaults count as not given)", path,
                 ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
    return dataclasses.replace(cfg, **taken)


# -- tcskd eval ------------------------------------------------------------------

@dataclass
class EvalConfig:
    """``tcskd eval``: the teacher's accuracy measured on its cached features only."""

    cache: str = opt(help="Train cache: key, key prefix or directory.")
    """Train cache: a key (or unique key prefix) under ``cache_root``, or a directory."""
    test_cache: str = opt(help="Test cache of the same teacher: key or directory.")
    """Test cache of the same teacher (and dim): key or directory."""
    k: int = opt(20, help="Neighbours of the weighted kNN.")
    """Neighbours of the weighted kNN classifier."""
    temperature: float = opt(0.07, help="kNN vote weight exp(sim/T).")
    """Temperature T of the kNN vote weights exp(sim / T)."""
    linear: bool = opt(True, help="Also fit a linear probe.")
    """Also fit a linear probe (L-BFGS softmax regression on standardised features)."""
    device: str = opt("auto", choices=DEVICES)
    """auto | cpu | cuda."""
    cache_root: str | None = opt(None, help="Default: $TCSKD_CACHE, else ./caches.")
    """Where cache keys are looked up (default: $TCSKD_CACHE, else ./caches)."""
    labels_per_class: int | None = opt(None, help="References: n labelled training rows per class, as tcskd train "
                                                  "(default: every label).")
    """Fit kNN references and probe on n labelled training rows per class (the rows ``tcskd train`` with
    the same seed and validation options labels); None = every training row."""
    seed: int = opt(0, help="Seed of the labelled subset (as tcskd train --seed) and of the probe.")
    """Seed of the labelled subset (``labels_per_class``, as in ``tcskd train --seed``) and of the probe."""
    val_frac: float = opt(0.1, help="Validation share of each class of the train cache, held out as in tcskd train.")
    """Validation share of each class of the train cache, held out as in ``tcskd train`` (0 = none)."""
    val_per_class: int | None = opt(None, help="Validation rows per class instead of --val-frac.")
    """Validation rows per class instead of ``val_frac``."""
    val_seed: int = opt(0, help="Seed of the validation split.")
    """Seed of the validation split (as ``tcskd train --val-seed``)."""
    out: str | None = opt(None, metavar="FILE", help="Write the result as JSON here.")
    """Write the result as JSON to this file."""
    probe_epochs: int = opt(100, cli=False)
    """L-BFGS iterations of the linear probe."""
    probe_wd: float | str = opt("auto", metavar="auto|WD",
                                help="The probe's L2 weight decay, or auto: the best of 1e-5 .. 1000 on the validation "
                                     "rows (1e-3 when there are none).")
    """L2 penalty of the linear probe. ``auto``: each decay of ``tcskd.train.evaluate.PROBE_WD_GRID`` (1e-5,
    1e-4, ..., 1000) fits a probe on the labelled training rows, the one with the best top-1 on the held-out
    validation rows is kept (ties: the larger decay) and only that one is scored on the test split; without
    labelled validation rows (``val_frac`` 0) the probe uses ``PROBE_WD_DEFAULT`` (1e-3), logged and recorded
    as such. A number: that decay, no search."""

    def validate(self) -> None:
        """TcskdError (one line) for a value out of range."""
        if self.k < 1:
            raise TcskdError(f"k must be >= 1 (got {self.k})")
        if self.temperature <= 0:
            raise TcskdError(f"the kNN temperature must be > 0 (got {self.temperature})")
        Holdout(self.val_frac, self.val_per_class, self.val_seed)  # checks the validation options
        wd = self.probe_wd
        if not (wd == "auto" if isinstance(wd, str) else isinstance(wd, (int, float)) and not isinstance(wd, bool)
                and math.isfinite(wd) and wd >= 0):
            raise TcskdError(f"--probe-wd must be auto or a finite number >= 0 (got {wd!r})")
        if self.probe_epochs < 1:
            raise TcskdError(f"probe_epochs must be >= 1 (got {self.probe_epochs})")
        if self.out and Path(self.out).is_dir():
            raise TcskdError(f"--out {self.out} is a directory: give a file name")


__all__ = ["METHODS", "OPTIMIZERS", "SCHEDULES", "TAILOR", "TASKS", "MIMIC_ON", "NOT_SAVED", "RESUME_FREE", "TrainConfig",
           "with_saved_config", "TAILORED", "FIXED",
           "default_dim", "tailoring_preset", "resolve_config", "tailoring_label", "table_row", "EvalConfig"]
