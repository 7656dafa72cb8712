"""The options of one peer arm (``python -m tcskd.bench.peers``): the arm, and the ``tcskd train`` options it
shares with tcskd's own arms, with the same names and defaults (:func:`PeerConfig.train_config` turns them
into the :class:`~tcskd.train.config.TrainConfig` whose split, labelled rows, student, augmentation, batch
order, optimiser and schedule the arm takes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tcskd.device import DEVICES
from tcskd.errors import TcskdError
from tcskd.options import opt
from tcskd.train.config import AUGMENTS, SCHEDULES, TrainConfig
from tcskd.train.targets import TARGET_NORMS
from tcskd.bench.peers.arms import ARMS, TRADITIONAL, traditional

#: Fields passed on to TrainConfig unchanged (same names, same meaning).
SHARED = ("cache", "cache_root", "student", "lam", "target_norm", "epochs", "batch_size", "lr", "optimizer",
          "weight_decay", "momentum", "warmup_epochs", "schedule", "milestones", "gamma", "labels_per_class",
          "val_frac", "val_per_class", "val_seed", "augment", "image_size", "device", "seed", "workers",
          "eval_every")


@dataclass
class PeerConfig:
    """Options of one peer arm."""

    arm: str = opt(help=f"The peer arm: {', '.join(ARMS)}.", choices=ARMS)
    """framework-method: torchdistill-fitnet, timm-fitnet (online FitNet: the teacher runs on the student's
    augmented input every step), torchdistill-ce, timm-ce (CE only, in the framework's loop), and the
    traditional arms torchdistill-kd, torchdistill-crd, torchdistill-rkd (distillation from the teacher
    fine-tuned for the task: ``--teacher-ckpt``)."""
    cache: str = opt(help="Train cache (key, key prefix or directory): its data, teacher, split and rows.")
    """The train cache of tcskd's arms: the peer reads its data spec, teacher spec and resolution, the rows it
    holds and (``--target-norm global``) the fitnet target scale; never its features as targets."""
    cache_root: str | None = opt(None)
    student: str = opt("cnn", help="As tcskd train --student.")
    lam: float = opt(10.0, cli="--lambda", help="Weight of the FitNet term (tcskd train --lambda).")
    target_norm: str = opt("global", choices=TARGET_NORMS,
                           help="global: the teacher's features divided by tcskd fitnet's target scale.")
    """global: the peer's teacher features are divided by the one scale tcskd ``--method fitnet`` divides its
    cached targets by (so both optimise the same objective at the same lambda); none: raw features."""
    epochs: int = opt(30)
    batch_size: int = opt(128)
    lr: float | None = opt(None, help="Peak learning rate (default as tcskd train: 0.05 sgd, 1e-3 adamw).")
    optimizer: str = opt("sgd", choices=("sgd",), help="SGD with momentum, tcskd train's default (the only one wired).")
    weight_decay: float | None = opt(None, help="Default as tcskd train: 5e-4 sgd, 0.05 adamw.")
    momentum: float = opt(0.9)
    warmup_epochs: float = opt(1.0)
    schedule: str = opt("cosine", choices=SCHEDULES)
    milestones: tuple[int, ...] = opt((), metavar="E1,E2,...")
    gamma: float = opt(0.1)
    labels_per_class: int | None = opt(None, help="CE on n labelled training images per class (as tcskd train).")
    val_frac: float = opt(0.1)
    val_per_class: int | None = opt(None)
    val_seed: int = opt(0)
    augment: str = opt("auto", choices=AUGMENTS, help="Student augmentation, as tcskd train --augment.")
    """The student's augmentation (tcskd.train.data); the peer's teacher sees the augmented input (online KD).
    ``none`` for the control arms."""
    image_size: int | None = opt(None)
    device: str = opt("auto", choices=DEVICES)
    seed: int = opt(0)
    workers: int | str | None = opt("auto", metavar="auto|N")
    eval_every: int = opt(1, help="Validate every N epochs (outside the timed training).")
    out: str | None = opt(None, help="Run directory (default: runs/peers/<arm>-s<seed>).")
    threads: int | None = opt(None, help="torch.set_num_threads (default: leave it).")
    teacher_ckpt: str | None = opt(None, help="The fine-tuned teacher (teacher.pt of python -m "
                                              "tcskd.bench.peers.finetune): needed by the traditional arms.")
    """teacher.pt written by tcskd.bench.peers.finetune, with its finetune.json beside it; refused unless it
    was fine-tuned for this run (the same cache, teacher, seed, split and labelled rows)."""
    kd_temperature: float = opt(4.0, help="torchdistill-kd: KDLoss's temperature T (RepDistiller's KD: 4).")
    kd_alpha: float = opt(0.1, help="torchdistill-kd: weight of the labelled CE; the KL's is (1 - alpha) T^2 "
                                    "(RepDistiller's KD: 0.1).")
    crd_negatives: int = opt(4096, help="torchdistill-crd: negatives per row, drawn over the training rows.")

    def validate(self) -> None:
        """One-line TcskdError for an option tcskd train would refuse, or one the peers cannot follow."""
        if self.arm not in ARMS:
            raise TcskdError(f"unknown peer arm '{self.arm}' (choose {', '.join(ARMS)})")
        if self.threads is not None and self.threads < 1:
            raise TcskdError(f"--threads must be at least 1, got {self.threads}")
        if traditional(self.arm) and not self.teacher_ckpt:
            raise TcskdError(f"peer arm {self.arm} distils a teacher fine-tuned for the task: give --teacher-ckpt "
                             f"(python -m tcskd.bench.peers.finetune writes it)")
        if self.teacher_ckpt and not traditional(self.arm):
            raise TcskdError(f"--teacher-ckpt is for the traditional arms ({', '.join(TRADITIONAL)}), not {self.arm}")
        if self.kd_temperature <= 0 or not 0 <= self.kd_alpha <= 1:
            raise TcskdError(f"--kd-temperature must be positive and --kd-alpha within [0, 1], got "
                             f"{self.kd_temperature} and {self.kd_alpha}")
        if self.crd_negatives < 1:
            raise TcskdError(f"--crd-negatives must be at least 1, got {self.crd_negatives}")
        self.train_config("ce").validate()

    def train_config(self, method: str) -> TrainConfig:
        """The TrainConfig of the shared options with ``method`` (``ce``: the data without targets; ``fitnet``:
        the head, targets and scale tcskd's fitnet arm uses), tailoring off and the classifier on the feature."""
        shared = {k: getattr(self, k) for k in SHARED}
        return dataclasses.replace(TrainConfig(), method=method, tailor="off", elsh_bits=0,
                                   classify_from="feature", **shared)
