"""The peer arms: each drives a peer framework's own training machinery on modules tcskd supplies (tcskd.bench.peers.glue).

An arm is built by :func:`build_arm` from the student (:class:`~tcskd.bench.peers.glue.PeerStudent`), the
teacher (:class:`~tcskd.bench.peers.glue.PeerTeacher`, None for CE-only), the initial regressor (the
projector of tcskd's fitnet head, copied into the peer's own regressor so both start from the same weights)
and the optimiser / schedule settings; it exposes one interface to the epoch loop (tcskd.bench.peers.run):
``begin_epoch(epoch)``, ``step(x, y) -> loss`` (one optimizer step and one scheduler step) and ``end_epoch()``.
The forward of a step runs under ``tcskd.device.autocast`` as tcskd's loop runs its own (bf16 on CUDA, nothing
on the CPU); the losses are computed in float32 (torch autocasts ``mse_loss``; the CE casts its logits).

- ``torchdistill-fitnet``: a ``torchdistill.core.distillation.DistillationBox`` built from a declarative
  train config: the teacher hooked at ``embedding`` (its global embedding / the target scale), frozen
  (``requires_grad: False``: the box then runs it under ``no_grad`` and leaves it out of the optimizer); the
  student wrapped in torchdistill's ``Linear4CCKD`` auxiliary wrapper (a ``nn.Linear`` applied in
  ``secondary_forward`` to the hooked ``model.backbone`` output: the FitNet regressor on the hooked feature);
  the loss a ``WeightedSumLoss`` of ``SimpleLossWrapper``-wrapped terms: the labelled CE on the model's output
  (weight 1) and torch's ``MSELoss(reduction='mean')`` between the hooked ``linear`` output and the teacher's
  hooked ``embedding`` (weight lambda); optimizer ``SGD`` and scheduler ``LambdaLR`` from torchdistill's
  registries, ``scheduling_step: 1`` (stepped after every optimizer step by the box's
  ``post_forward_process``). Per step: ``box.forward_process(x, y)`` then ``box.post_forward_process(loss)``;
  per epoch: ``box.pre_epoch_process`` / ``box.post_epoch_process`` (the examples' ``train_one_epoch``).
- ``torchdistill-ce``: a ``torchdistill.core.training.TrainingBox`` with the labelled CE alone.
- ``timm-fitnet``: ``timm.task.FeatureDistillationTask`` (its own projection, loss and teacher
  normalisation: ``DistillationTeacher.normalize_input`` maps the student's input, mean 0 / std 1, to the
  teacher's mean / std) with ``task_loss_weight`` 1 and ``distill_loss_weight`` lambda; timm ships no training
  loop as a library (``train.py`` is a script), so the loop is the usual one: ``task(x, y)['loss']``, backward,
  ``torch.optim.SGD`` step, ``LambdaLR`` step.
- ``timm-ce``: ``timm.task.ClassificationTask`` with the labelled CE.

The traditional arms (:data:`TRADITIONAL`) distil a teacher fine-tuned for the task first
(tcskd.bench.peers.finetune: :class:`~tcskd.bench.peers.finetune.FineTunedTeacher`, its classifier's logits the
output ``.``, its global embedding hooked at ``features.embedding``), frozen and in eval mode, run on the
student's augmented input every step, all in a ``DistillationBox`` from a declarative config with
torchdistill's registered losses:

- ``torchdistill-kd``: Hinton KD. torchdistill's ``KDLoss`` (``temperature`` T, ``reduction: batchmean``) on
  the logits of every row of the batch, labelled or not (the teacher labels every image), with its ``alpha`` 0
  so that it returns its KL term alone (its own hard CE is ``nn.CrossEntropyLoss``, which fails on the label
  -1): the term is weighted (1 - alpha) T^2 in the ``WeightedSumLoss``, and the hard term is the labelled CE
  (mean over the labelled rows of the batch, 0 without one) weighted alpha; so the loss is KDLoss's own
  ``alpha * CE + (1 - alpha) * T^2 * KL`` with the CE over the rows that have a label. Defaults T 4, alpha
  0.1: the KD setting of the CRD benchmark (Tian et al., ICLR 2020, RepDistiller: ``-r 0.1 -a 0.9``, T 4).
- ``torchdistill-crd``: CRD as its paper's main setting (RepDistiller ``-r 1 -a 0 -b 0.8``): the labelled CE
  plus 0.8 x torchdistill's ``CRDLoss`` (feature 128, NCE temperature 0.07, memory momentum 0.5), the student
  and the teacher each in torchdistill's ``Linear4CRD`` wrapper (the teacher's ``model`` frozen, its
  embedding's projection trained, as torchdistill's sample config); the memory holds one row per training
  image (N = the training rows). ``CRDLoss`` needs each row's dataset index and its negatives in the batch's
  supplementary dict (``pos_idx``, ``contrast_idx``, read through the student wrapper's ``empty`` module):
  the index is the batch's ``item``; the negatives are drawn uniformly over the N rows (the loss's own noise
  distribution: its ``unigrams`` are all ones) by a generator of the run's seed, because torchdistill 1.1.5's
  own draw fails (``CRDLoss.draw`` reads ``self.prob``, which does not exist) and its ``CRDDatasetWrapper``
  draws class-conditional negatives from every row's label, which the unlabelled rows do not have.
  Negatives per row: ``--crd-negatives`` (4096; RepDistiller's 16384 is a third of CIFAR's 50 000 rows and
  costs 4x the memory and time here).
- ``torchdistill-rkd``: RKD: the labelled CE plus torchdistill's ``RKDLoss`` between the student's pooled
  feature (hooked ``backbone``) and the teacher's global embedding (``features.embedding``), distance weight
  25 and angle weight 50 (the RKD paper's classification setting, as RepDistiller). Chosen among the
  relational losses torchdistill ships (PKT, SPKD, RKD) because it compares global embeddings of any two
  widths with no projector (so the student's trainable parameters are tcskd's CE arm's), distance and angle
  both, and is the most used of them; SPKD is meant for feature maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from tcskd.device import autocast
from tcskd.errors import TcskdError
from tcskd.bench.peers.glue import LabelledCrossEntropy, PeerStudent, PeerTeacher

log = logging.getLogger(__name__)

#: The traditional arms: distillation from a teacher fine-tuned for the task (``--teacher-ckpt``).
TRADITIONAL = ("torchdistill-kd", "torchdistill-crd", "torchdistill-rkd")
#: The arms: framework-method.
ARMS = ("torchdistill-fitnet", "timm-fitnet", "torchdistill-ce", "timm-ce") + TRADITIONAL
#: CRD's settings (Tian et al., ICLR 2020; RepDistiller's defaults): the loss's weight, the feature width, the
#: NCE temperature and the memory's momentum.
CRD_WEIGHT, CRD_DIM, CRD_TEMPERATURE, CRD_MOMENTUM = 0.8, 128, 0.07, 0.5
#: RKD's distance and angle weights (Park et al., CVPR 2019, classification; RepDistiller's defaults).
RKD_DISTANCE, RKD_ANGLE = 25.0, 50.0
#: The name under which the labelled CE is registered in torchdistill's low-level loss registry.
TD_CE = "TcskdLabelledCrossEntropy"


def framework_of(arm: str) -> str:
    """``torchdistill`` or ``timm``."""
    return arm.split("-", 1)[0]


def distils(arm: str) -> bool:
    """Whether the arm is a FitNet (the cache's teacher, the regressor of tcskd's fitnet head)."""
    return arm.endswith("-fitnet")


def traditional(arm: str) -> bool:
    """Whether the arm distils a fine-tuned teacher (``--teacher-ckpt``: KD, CRD, RKD)."""
    return arm in TRADITIONAL


def require_framework(arm: str) -> None:
    """TcskdError (one line) when the arm's framework is not installed."""
    if arm not in ARMS:
        raise TcskdError(f"unknown peer arm '{arm}' (choose {', '.join(ARMS)})")
    name = framework_of(arm)
    try:
        __import__(name)
    except ImportError:
        raise TcskdError(f"peer arm {arm} needs {name}: pip install 'tcskd[peers]'") from None


@dataclass
class OptimSettings:
    """The optimiser and its per-step schedule, as ``tcskd train`` resolves them."""

    lr: float
    momentum: float
    weight_decay: float
    lr_factor: Callable[[int], float]
    """``LambdaLR``'s factor of optimizer step ``step`` (tcskd.bench.peers.glue.step_lr_lambda)."""


@dataclass
class TraditionalSettings:
    """The settings of the traditional arms (module docstring)."""

    kd_temperature: float = 4.0
    kd_alpha: float = 0.1
    """The hard (labelled) CE's weight; the soft term's is (1 - alpha) T^2 (torchdistill's KDLoss)."""
    crd_negatives: int = 4096
    num_samples: int = 0
    """Rows of CRD's memory: the training rows (the batches' ``item`` indexes them)."""
    seed: int = 0
    """Seed of CRD's negatives."""


class Arm:
    """The interface the epoch loop drives."""

    student: PeerStudent
    teacher: PeerTeacher | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device

    def begin_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on the batch ``x``, labels ``y`` (-1: none) and training-set indices ``item``."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        pass

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


# -- torchdistill ---------------------------------------------------------------------------------------

def _register_torchdistill_ce() -> None:
    from torchdistill.losses.registry import LOW_LEVEL_LOSS_DICT, register_low_level_loss

    if TD_CE not in LOW_LEVEL_LOSS_DICT:
        register_low_level_loss(key=TD_CE)(LabelledCrossEntropy)


def _td_term(criterion: dict[str, Any], inp: dict[str, Any], target: dict[str, Any], weight: float) -> dict:
    return {"criterion": criterion, "weight": float(weight),
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {"input": inp, "target": target}}}


def _td_ce_term() -> dict:
    return _td_term({"key": TD_CE, "kwargs": {}}, {"is_from_teacher": False, "module_path": ".", "io": "output"},
                    {"uses_label": True}, 1.0)


def _td_optim(opt: OptimSettings) -> tuple[dict, dict]:
    optimizer = {"key": "SGD", "kwargs": {"lr": opt.lr, "momentum": opt.momentum,
                                          "weight_decay": opt.weight_decay}}
    scheduler = {"key": "LambdaLR", "kwargs": {"lr_lambda": opt.lr_factor}, "scheduling_step": 1}
    return optimizer, scheduler


def torchdistill_fitnet_config(feature_dim: int, teacher_dim: int, lam: float, opt: OptimSettings,
                               epochs: int) -> dict[str, Any]:
    """The ``train`` config of the torchdistill FitNet arm (module docstring)."""
    optimizer, scheduler = _td_optim(opt)
    fitnet = _td_term({"key": "MSELoss", "kwargs": {"reduction": "mean"}},
                      {"is_from_teacher": False, "module_path": "linear", "io": "output"},
                      {"is_from_teacher": True, "module_path": "embedding", "io": "output"}, lam)
    return {
        "num_epochs": int(epochs),
        "teacher": {"forward_proc": "forward_batch_only", "forward_hook": {"input": [], "output": ["embedding"]},
                    "requires_grad": False},
        "student": {
            "auxiliary_model_wrapper": {"key": "Linear4CCKD", "kwargs": {
                "input_module": {"path": "model.backbone", "io": "output"},
                "linear_kwargs": {"in_features": int(feature_dim), "out_features": int(teacher_dim)}}},
            "forward_proc": "forward_batch_only",
            "forward_hook": {"input": [], "output": ["model.backbone", "linear"]},
            "requires_grad": True},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": _td_ce_term(), "fitnet": fitnet}}},
    }


def torchdistill_ce_config(opt: OptimSettings, epochs: int) -> dict[str, Any]:
    """The ``train`` config of the torchdistill CE-only arm."""
    optimizer, scheduler = _td_optim(opt)
    return {"num_epochs": int(epochs), "model": {"forward_proc": "forward_batch_only", "requires_grad": True}, "optimizer": optimizer,
            "scheduler": scheduler,
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": _td_ce_term()}}}}


class _TorchdistillArm(Arm):
    """An arm run by a torchdistill training or distillation box (``self.box``): its epoch hooks, forward
    process (under tcskd's autocast) and post-forward process (backward, optimiser and per-step scheduler)."""

    box: Any

    def begin_epoch(self, epoch: int) -> None:
        self.box.pre_epoch_process(epoch=epoch)

    def supp_dict(self, item: torch.Tensor | None) -> dict[str, Any] | None:
        """The batch's supplementary dict (torchdistill's ``supp_dict``): none but for CRD."""
        return None

    def step(self, x: torch.Tensor, y: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        supp = self.supp_dict(item)
        with autocast(self.device):  # the forward as tcskd's (bf16 on CUDA); backward and step outside
            loss = self.box.forward_process(x, y, supp)
        self.box.post_forward_process(loss)
        return loss.detach()

    def first_loss(self, x: torch.Tensor, y: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch without a step (for the parity check)."""
        return self.box.forward_process(x, y, self.supp_dict(item))

    def end_epoch(self) -> None:
        self.box.post_epoch_process()


class TorchdistillFitNet(_TorchdistillArm):
    def __init__(self, student: PeerStudent, teacher: PeerTeacher, regressor: nn.Linear, lam: float,
                 opt: OptimSettings, epochs: int, device: torch.device) -> None:
        from torchdistill.core.distillation import DistillationBox

        _register_torchdistill_ce()
        self.student, self.teacher = student, teacher
        self.device = device
        config = torchdistill_fitnet_config(student.num_features, teacher.num_features, lam, opt, epochs)
        self.box = DistillationBox(teacher, student, {}, config, device, None, False, 1)
        linear = self.box.student_model.linear
        with torch.no_grad():  # the same initial regressor as tcskd's fitnet head (the optimizer holds these)
            linear.weight.copy_(regressor.weight)
            linear.bias.copy_(regressor.bias)
        self.optimizer, self.scheduler = self.box.optimizer, self.box.lr_scheduler
        self.regressor = linear


class TorchdistillCE(_TorchdistillArm):
    def __init__(self, student: PeerStudent, opt: OptimSettings, epochs: int, device: torch.device) -> None:
        from torchdistill.core.training import TrainingBox

        _register_torchdistill_ce()
        self.student, self.teacher = student, None
        self.device = device
        self.box = TrainingBox(student, {}, torchdistill_ce_config(opt, epochs), device, None, False, 1)
        self.optimizer, self.scheduler = self.box.optimizer, self.box.lr_scheduler


def _td_teacher_student(teacher: dict[str, Any] | None = None, student: dict[str, Any] | None = None) -> dict:
    """The frozen teacher and the trained student of a traditional arm's box, run by ``forward_batch_only``."""
    return {"teacher": {"forward_proc": "forward_batch_only", "requires_grad": False, **(teacher or {})},
            "student": {"forward_proc": "forward_batch_only", "requires_grad": True, **(student or {})}}


def torchdistill_kd_config(s: TraditionalSettings, opt: OptimSettings, epochs: int) -> dict[str, Any]:
    """The ``train`` config of the torchdistill Hinton KD arm (module docstring)."""
    optimizer, scheduler = _td_optim(opt)
    t = float(s.kd_temperature)
    kd = {"criterion": {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
        "teacher_module_io": "output", "temperature": t, "alpha": 0.0, "reduction": "batchmean"}},
        "weight": (1.0 - float(s.kd_alpha)) * t * t}
    ce = {**_td_ce_term(), "weight": float(s.kd_alpha)}
    return {"num_epochs": int(epochs), **_td_teacher_student(), "optimizer": optimizer, "scheduler": scheduler,
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": ce, "kd": kd}}}}


def torchdistill_rkd_config(opt: OptimSettings, epochs: int) -> dict[str, Any]:
    """The ``train`` config of the torchdistill RKD arm (module docstring)."""
    optimizer, scheduler = _td_optim(opt)
    rkd = {"criterion": {"key": "RKDLoss", "kwargs": {
        "student_output_path": "backbone", "teacher_output_path": "features.embedding",
        "dist_factor": RKD_DISTANCE, "angle_factor": RKD_ANGLE, "reduction": "mean"}}, "weight": 1.0}
    models = _td_teacher_student({"forward_hook": {"input": [], "output": ["features.embedding"]}},
                                 {"forward_hook": {"input": [], "output": ["backbone"]}})
    return {"num_epochs": int(epochs), **models, "optimizer": optimizer, "scheduler": scheduler,
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": _td_ce_term(), "rkd": rkd}}}}


def torchdistill_crd_config(student_dim: int, teacher_dim: int, s: TraditionalSettings, opt: OptimSettings,
                            epochs: int) -> dict[str, Any]:
    """The ``train`` config of the torchdistill CRD arm (module docstring; torchdistill's sample CRD config
    with the KD term left out, as CRD's paper's main setting)."""
    optimizer, scheduler = _td_optim(opt)

    def wrapper(path: str, width: int) -> dict:
        return {"key": "Linear4CRD", "kwargs": {"input_module_path": path, "power": 2, "linear_kwargs": {
            "in_features": int(width), "out_features": CRD_DIM, "bias": True}}}

    teacher = {"forward_proc": "forward_batch_supp_dict",
               "auxiliary_model_wrapper": wrapper("model.features.embedding", teacher_dim),
               "forward_hook": {"input": [], "output": ["model.features.embedding", "normalizer"]},
               "requires_grad": True, "frozen_modules": ["model"]}
    student = {"forward_proc": "forward_batch_supp_dict",
               "auxiliary_model_wrapper": wrapper("model.backbone", student_dim),
               "forward_hook": {"input": ["empty"], "output": ["model.backbone", "normalizer"]},
               "requires_grad": True, "frozen_modules": []}
    crd = {"criterion": {"key": "CRDLoss", "kwargs": {
        "teacher_norm_module_path": "normalizer", "student_norm_module_path": "normalizer",
        "student_empty_module_path": "empty", "input_size": CRD_DIM, "output_size": int(s.num_samples),
        "num_negative_samples": int(s.crd_negatives), "num_samples": int(s.num_samples),
        "temperature": CRD_TEMPERATURE, "momentum": CRD_MOMENTUM, "eps": 1e-7}}, "weight": CRD_WEIGHT}
    return {"num_epochs": int(epochs), "teacher": teacher, "student": student, "optimizer": optimizer,
            "scheduler": scheduler,
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": _td_ce_term(), "crd": crd}}}}


class TorchdistillTraditional(_TorchdistillArm):
    """KD, CRD or RKD from the fine-tuned teacher in a torchdistill ``DistillationBox`` (module docstring)."""

    def __init__(self, arm: str, student: PeerStudent, teacher: nn.Module, settings: TraditionalSettings,
                 opt: OptimSettings, epochs: int, device: torch.device) -> None:
        from torchdistill.core.distillation import DistillationBox

        _register_torchdistill_ce()
        self.arm, self.student, self.teacher, self.device, self.settings = arm, student, teacher, device, settings
        if arm == "torchdistill-kd":
            config = torchdistill_kd_config(settings, opt, epochs)
        elif arm == "torchdistill-rkd":
            config = torchdistill_rkd_config(opt, epochs)
        else:
            if settings.num_samples < 2:
                raise TcskdError("torchdistill-crd needs at least 2 training rows for its memory")
            config = torchdistill_crd_config(student.num_features, teacher.num_features, settings, opt, epochs)
        self.config = config
        self.box = DistillationBox(teacher, student, {}, config, device, None, False, 1)
        self.optimizer, self.scheduler = self.box.optimizer, self.box.lr_scheduler
        self._negatives = torch.Generator().manual_seed(int(settings.seed) * 1_000_003 + 17)

    def supp_dict(self, item: torch.Tensor | None) -> dict[str, Any] | None:
        """CRD: ``pos_idx`` (the rows' training-set indices) and ``contrast_idx`` (B x (1 + negatives): the
        positive, then negatives drawn uniformly over the memory's rows)."""
        if self.arm != "torchdistill-crd":
            return None
        if item is None:
            raise TcskdError("torchdistill-crd needs each row's training-set index (the batch's item)")
        s = self.settings
        pos = item.long().cpu()
        contrast = torch.randint(s.num_samples, (len(pos), 1 + s.crd_negatives), generator=self._negatives)
        contrast[:, 0] = pos
        return {"pos_idx": pos.to(self.device), "contrast_idx": contrast.to(self.device)}


# -- timm -----------------------------------------------------------------------------------------------

class _TimmArm(Arm):
    task: Any

    def _optim(self, opt: OptimSettings) -> None:
        params = [p for p in self.task.trainable_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opt.lr_factor)

    def begin_epoch(self, epoch: int) -> None:
        self.task.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(self.device):  # as timm's train.py runs the task under AMP, and tcskd its forward
            loss = self.task(x, y)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def first_loss(self, x: torch.Tensor, y: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        return self.task(x, y)["loss"]


class TimmFitNet(_TimmArm):
    def __init__(self, student: PeerStudent, teacher: PeerTeacher, regressor: nn.Linear, lam: float,
                 opt: OptimSettings, device: torch.device) -> None:
        from timm.task import DistillationTeacher, FeatureDistillationTask

        self.student, self.teacher = student, teacher
        self.device = device
        self.task = FeatureDistillationTask(student, DistillationTeacher(teacher, device=device),
                                            criterion=LabelledCrossEntropy(), distill_loss_weight=float(lam),
                                            task_loss_weight=1.0, device=device, verbose=False)
        projection = self.task.trainable_module.projection
        if projection is None:  # equal dimensions: timm matches the features directly, tcskd still regresses
            raise TcskdError("timm-fitnet: the student's feature and the teacher's have the same size; timm then "
                             "uses no projection and the objective differs from tcskd fitnet's")
        with torch.no_grad():
            projection.weight.copy_(regressor.weight)
            projection.bias.copy_(regressor.bias)
        self.regressor = projection
        self.task.to(device)
        self._optim(opt)


class TimmCE(_TimmArm):
    def __init__(self, student: PeerStudent, opt: OptimSettings, device: torch.device) -> None:
        from timm.task import ClassificationTask

        self.student, self.teacher = student, None
        self.device = device
        self.task = ClassificationTask(student, criterion=LabelledCrossEntropy(), device=device, verbose=False)
        self.task.to(device)
        self._optim(opt)


def build_arm(arm: str, student: PeerStudent, teacher: nn.Module | None, regressor: nn.Linear | None,
              lam: float, opt: OptimSettings, epochs: int, device: torch.device,
              settings: TraditionalSettings | None = None) -> Arm:
    """The arm ``arm`` on these modules (its framework must be installed: :func:`require_framework`); a
    traditional arm's ``teacher`` is the fine-tuned one (tcskd.bench.peers.finetune.FineTunedTeacher)."""
    require_framework(arm)
    if distils(arm) and (teacher is None or regressor is None):
        raise TcskdError(f"peer arm {arm} needs a teacher and the initial regressor")
    if traditional(arm):
        if teacher is None or settings is None:
            raise TcskdError(f"peer arm {arm} needs the fine-tuned teacher (--teacher-ckpt)")
        return TorchdistillTraditional(arm, student, teacher, settings, opt, epochs, device)
    if arm == "torchdistill-fitnet":
        return TorchdistillFitNet(student, teacher, regressor, lam, opt, epochs, device)
    if arm == "torchdistill-ce":
        return TorchdistillCE(student, opt, epochs, device)
    if arm == "timm-fitnet":
        return TimmFitNet(student, teacher, regressor, lam, opt, device)
    return TimmCE(student, opt, device)
