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

#: The arms: framework-method.
ARMS = ("torchdistill-fitnet", "timm-fitnet", "torchdistill-ce", "timm-ce")
#: The name under which the labelled CE is registered in torchdistill's low-level loss registry.
TD_CE = "TcskdLabelledCrossEntropy"


def framework_of(arm: str) -> str:
    """``torchdistill`` or ``timm``."""
    return arm.split("-", 1)[0]


def distils(arm: str) -> bool:
    """Whether the arm has a teacher (FitNet) or is CE-only."""
    return arm.endswith("-fitnet")


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


class Arm:
    """The interface the epoch loop drives."""

    student: PeerStudent
    teacher: PeerTeacher | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device

    def begin_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):  # the forward as tcskd's (bf16 on CUDA); backward and step outside
            loss = self.box.forward_process(x, y)
        self.box.post_forward_process(loss)
        return loss.detach()

    def first_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a batch without a step (for the parity check)."""
        return self.box.forward_process(x, y)

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


# -- timm -----------------------------------------------------------------------------------------------

class _TimmArm(Arm):
    task: Any

    def _optim(self, opt: OptimSettings) -> None:
        params = [p for p in self.task.trainable_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opt.lr_factor)

    def begin_epoch(self, epoch: int) -> None:
        self.task.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):  # as timm's train.py runs the task under AMP, and tcskd its forward
            loss = self.task(x, y)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def first_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def build_arm(arm: str, student: PeerStudent, teacher: PeerTeacher | None, regressor: nn.Linear | None,
              lam: float, opt: OptimSettings, epochs: int, device: torch.device) -> Arm:
    """The arm ``arm`` on these modules (its framework must be installed: :func:`require_framework`)."""
    require_framework(arm)
    if distils(arm) and (teacher is None or regressor is None):
        raise TcskdError(f"peer arm {arm} needs a teacher and the initial regressor")
    if arm == "torchdistill-fitnet":
        return TorchdistillFitNet(student, teacher, regressor, lam, opt, epochs, device)
    if arm == "torchdistill-ce":
        return TorchdistillCE(student, opt, epochs, device)
    if arm == "timm-fitnet":
        return TimmFitNet(student, teacher, regressor, lam, opt, device)
    return TimmCE(student, opt, device)
