"""Student networks: ``--student NAME`` -> a backbone that maps images to features and feature maps.

Every student is a :class:`Student`: ``forward(x) -> f`` (B x ``feature_dim``), the penultimate feature,
and ``feature_map(x) -> B x map_channels x h x w``, the dense map a dense head reads (tcskd.train), taken
after the student's last stage or the ``stage`` given to :func:`build_student` (1-based; ``map_stride`` is
the number of input pixels per map cell along each side, exact for input sizes divisible by it). The
classifier is not part of it: it lives in the TCS head (tcskd.train.head), beside the projector, so that
every student exposes the same two outputs. Inputs are images in [0, 1]; the student normalises them itself
(fixed mean 0.5, std 0.25 per channel) so that an exported student takes the same [0, 1] images.

Names, with their stages as ``stage: channels /stride`` (``*`` = the default, last stage; ``=`` after the name:
``forward`` is exactly the global average pool of the last stage's map):

- ``cnn`` = : a small CNN for 28/32 px inputs (~240k parameters), the default.
  1: 32 /1, 2: 64 /2, 3: 128 /4, 4*: 128 /4 (each conv+BN+ReLU's output).
- ``segnet`` = : a small encoder-decoder (U-Net) for segmentation (~0.44M parameters at 1 channel).
  1: 32 /2, 2: 64 /4, 3: 128 /8 (the encoder), 4*: 32 /1 (the decoder's output at the input resolution).
- CIFAR students in the style of the CRD repository (Tian et al. 2020), all ``=``; global average pooling is
  adaptive, so any input size >= 8 px works:
  ``resnet8x4``, ``resnet32x4``: 1: 64 /1, 2: 128 /2, 3*: 256 /4 (layer1..layer3);
  ``resnet20``, ``resnet56``: 1: 16 /1, 2: 32 /2, 3*: 64 /4;
  ``wrn-16-2``, ``wrn-40-2``: 1: 32 /1, 2: 64 /2 (pre-activation group outputs), 3*: 128 /4 (after the final
  BN + ReLU);
  ``mobilenetv2`` (CRD's ``mobile_half``: width 0.5, expansion 6): 1: 12 /2, 2: 16 /4, 3: 48 /8, 4*: 1280 /16
  (the last block at each resolution; 4 = the final 1x1 conv);
  ``shufflenetv2`` (net size 1): 1: 116 /2, 2: 232 /4, 3*: 1024 /8 (group outputs; 3 = the final 1x1 conv);
  ``vgg8`` (RepDistiller's ``vgg8_bn``): 1: 64 /1, 2: 128 /2, 3: 256 /4, 4: 512 /8, 5*: 512 /8 (each conv's
  ReLU output, before its max-pool; no pool follows the last conv, so ``forward`` pools exactly that map).
- ``tv:NAME``: a torchvision model (``weights=None``); its last ``nn.Linear`` becomes the identity and its
  input width is the feature dimension. Greyscale inputs are repeated to 3 channels. ResNets (``resnet*``,
  ``resnext*``, ``wide_resnet*``): 1: layer1 /4, 2: layer2 /8, 3: layer3 /16, 4*: layer4 /32 (``=``). Other
  models have one stage: the 4-D activation their global average pool reads, found by tracing the model
  with torchvision.models.feature_extraction (the ``features`` output of MobileNet, EfficientNet, ConvNeXt,
  VGG, ...; after DenseNet's final ReLU; after Swin's permute to channels-first); channels and stride are
  measured once, on a 128 px input (224 px if that fails; stride rounded to a power of two). Models with no such map (ViTs:
  their pool is the class token) build as before but fail with one line when a dense map is asked for.
  ``forward`` is the pool of the map where nothing but the classifier follows the pool (ResNets,
  EfficientNet, MobileNetV2, DenseNet, RegNet, MnasNet, ShuffleNetV2, GoogLeNet, Swin, ...), not where an
  MLP or a norm does (VGG, AlexNet, MobileNetV3, ConvNeXt, MaxViT).
- ``python:MODULE:FACTORY``: ``FACTORY(num_classes, in_channels)`` returns a module with an integer
  ``feature_dim`` whose forward returns the features (B x feature_dim), or a tuple whose first element is
  the features. For dense use it also has ``feature_map(x)`` (normalised images -> B x C x h x w) and an
  integer ``map_channels`` (optionally ``map_stride``, else measured as for ``tv:``); one stage.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import re
from typing import Callable

import torch
import torch.nn as nn

from tcskd.errors import TcskdError
from tcskd.train.backbones import (VGG8, CifarResNet, MobileNetV2, SegNet, ShuffleNetV2, SmallCNN, WideResNet,
                                   small_cnn)

log = logging.getLogger(__name__)

INPUT_MEAN = 0.5
INPUT_STD = 0.25
PROBE_SIZES = (128, 224)  # px of the inputs that measure a traced map's channels and stride

__all__ = ["CIFAR_KD_STUDENTS", "STUDENTS", "Student", "StudentError", "VGG8", "build_student",
           "count_parameters", "make_student", "small_cnn"]


class StudentError(TcskdError):
    """An unknown or unusable student name, or a stage / dense map it does not have."""


class _Maps:
    """How a student's backbone gives its stage maps (a plain object: it adds nothing to the state dict)."""

    def stages(self, backbone: nn.Module) -> int:
        return 1

    def channels(self, backbone: nn.Module, stage: int) -> int | None:
        return None  # unknown: measured by Student._probe

    def stride(self, backbone: nn.Module, stage: int) -> int | None:
        return None

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        raise NotImplementedError


class _StagedMaps(_Maps):
    """A built-in :class:`Staged` backbone (or the cnn): it declares its stages."""

    def stages(self, backbone: nn.Module) -> int:
        return len(backbone.stage_channels)

    def channels(self, backbone: nn.Module, stage: int) -> int | None:
        return int(backbone.stage_channels[stage - 1])

    def stride(self, backbone: nn.Module, stage: int) -> int | None:
        return int(backbone.stage_strides[stage - 1])

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        return backbone.forward_map(x, stage)


class Student(nn.Module):
    """Input normalisation + a backbone returning B x ``feature_dim`` features, and its stage maps.

    ``stage`` (1..``num_stages``) chooses the map ``feature_map`` gives; ``map_channels`` and ``map_stride``
    describe it. How the backbone gives its maps (``maps``) is a plain object, outside the state dict, so
    the parameter names are the backbone's alone, whatever the stage."""

    def __init__(self, backbone: nn.Module, feature_dim: int, in_channels: int, name: str,
                 expand_to: int | None = None, stage: int | None = None, maps: _Maps | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.in_channels = int(in_channels)
        self.name = name
        self.expand_to = expand_to
        self._maps = maps if maps is not None else _StagedMaps()
        self.num_stages = self._maps.stages(backbone)
        self.stage = _check_stage(name, stage, self.num_stages)
        self._probed: tuple[int, int] | None = None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - INPUT_MEAN) / INPUT_STD
        if self.expand_to is not None and x.shape[1] != self.expand_to:
            x = x.expand(-1, self.expand_to, -1, -1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(self._prepare(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """B x ``map_channels`` x h x w: the map after stage ``self.stage`` of images ``x`` in [0, 1]."""
        return self._maps.forward_map(self.backbone, self._prepare(x), self.stage)

    @property
    def map_channels(self) -> int:
        c = self._maps.channels(self.backbone, self.stage)
        return c if c is not None else self._probe()[0]

    @property
    def map_stride(self) -> int:
        s = self._maps.stride(self.backbone, self.stage)
        return s if s is not None else self._probe()[1]

    def _probe(self) -> tuple[int, int]:
        """(channels, stride) of the map, measured once on a grey image in eval mode: PROBE_SIZES px, the
        first that the model takes (MaxViT's windows want 224)."""
        if self._probed is None:
            modes = [(m, m.training) for m in self.modules()]
            p = next(self.parameters(), None)
            self.eval()
            try:
                for i, size in enumerate(PROBE_SIZES):
                    x = torch.full((1, self.in_channels, size, size), 0.5, device=p.device if p is not None else None)
                    try:
                        with torch.no_grad():
                            m = self.feature_map(x)
                        break
                    except StudentError:
                        if i == len(PROBE_SIZES) - 1:
                            raise
            finally:
                for mod, mode in modes:
                    mod.training = mode
            if m.dim() != 4:
                raise StudentError(f"student '{self.name}': feature_map gives a {m.dim()}-D tensor, not B x C x h x w")
            self._probed = (int(m.shape[1]), 2 ** round(math.log2(size / m.shape[-1])))
        return self._probed


def _check_stage(name: str, stage: int | None, n: int) -> int:
    if stage is None:
        return n
    if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or not 1 <= stage <= n:
        valid = "only stage 1" if n == 1 else f"stages 1..{n}"
        raise StudentError(f"student '{name}' has {valid} (default: the last); got stage {stage!r}")
    return int(stage)


# -- the registry ----------------------------------------------------------------

_BUILTIN: dict[str, Callable[[int], nn.Module]] = {
    "cnn": lambda c: SmallCNN(c),
    "segnet": lambda c: SegNet(c),
    "resnet8x4": lambda c: CifarResNet(8, (32, 64, 128, 256), c),
    "resnet20": lambda c: CifarResNet(20, (16, 16, 32, 64), c),
    "resnet32x4": lambda c: CifarResNet(32, (32, 64, 128, 256), c),
    "resnet56": lambda c: CifarResNet(56, (16, 16, 32, 64), c),
    "wrn-16-2": lambda c: WideResNet(16, 2, c),
    "wrn-40-2": lambda c: WideResNet(40, 2, c),
    "vgg8": lambda c: VGG8(c),
    "mobilenetv2": lambda c: MobileNetV2(c),
    "shufflenetv2": lambda c: ShuffleNetV2(c),
}

#: The students of the CIFAR-100 KD benchmarks (CRD / RepDistiller tables), all built in.
CIFAR_KD_STUDENTS = ("resnet8x4", "resnet20", "wrn-16-2", "wrn-40-2", "vgg8", "mobilenetv2", "shufflenetv2")

STUDENTS = (*_BUILTIN, "tv:NAME", "python:MODULE:FACTORY")


def build_student(name: str, num_classes: int, in_channels: int, stage: int | None = None) -> Student:
    """The student called ``name`` for ``in_channels``-channel images, its ``feature_map`` after ``stage``
    (None: the last); StudentError if the name or the stage is unknown."""
    if name in _BUILTIN:
        net = _BUILTIN[name](in_channels)
        return Student(net, net.feature_dim, in_channels, name, stage=stage)
    if name.startswith("tv:"):
        return _torchvision(name, num_classes, in_channels, stage)
    if name.startswith("python:"):
        return _python(name, num_classes, in_channels, stage)
    raise StudentError(f"unknown student '{name}' (choose one of {', '.join(STUDENTS)})")


def make_student(name: str, num_classes: int, in_channels: int, stage: int | None = None) -> Student:
    """build_student, with whatever a ``python:`` factory raises turned into a one-line StudentError."""
    try:
        return build_student(name, num_classes, in_channels, stage)
    except StudentError:
        raise
    except Exception as e:  # the user's module or factory failed (or is not a factory at all)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise StudentError(f"cannot build student '{name}': {type(e).__name__}: {msg}") from e


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- tv: and python: students ------------------------------------------------------

_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class _TVResNetMaps(_Maps):
    """torchvision ResNets: stage k = layer k (strides 4, 8, 16, 32)."""

    def stages(self, backbone: nn.Module) -> int:
        return 4

    def channels(self, backbone: nn.Module, stage: int) -> int | None:
        bns = [m for m in getattr(backbone, f"layer{stage}")[-1].children() if isinstance(m, nn.BatchNorm2d)]
        return int(bns[-1].num_features)

    def stride(self, backbone: nn.Module, stage: int) -> int | None:
        return 2 ** (stage + 1)

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        for k in range(1, stage + 1):
            x = getattr(backbone, f"layer{k}")(x)
        return x


#: fx node names of a global pool (the last one in the graph is the model's; earlier ones are SE blocks')
_POOL_NODE = re.compile(r"(avgpool|adaptive_avg_pool2d|mean)(_[0-9]+)?")


def _is_pool(net: nn.Module, node: str) -> bool:
    """Whether the fx node ``node`` of ``net`` is an average pool (a module, or a functional call by its name)."""
    if _POOL_NODE.fullmatch(node.rsplit(".", 1)[-1]):
        return True
    try:
        return isinstance(net.get_submodule(node), (nn.AdaptiveAvgPool2d, nn.AvgPool2d))
    except AttributeError:
        return False


class _TracedMaps(_Maps):
    """Other torchvision models: the activation that their last global-pool node reads (traced once)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._extractor: nn.Module | None = None
        self._node: str | None = None
        self._device: torch.device | None = None

    def _trace(self, backbone: nn.Module) -> nn.Module:
        device = next(backbone.parameters()).device
        if self._extractor is None or device != self._device:  # traced tensors (get_attr) do not follow .to()
            self._device = device
            from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

            try:
                _, nodes = get_graph_node_names(backbone)
            except Exception as e:
                raise StudentError(f"student '{self.name}' has no dense feature map: torch.fx cannot trace it "
                                   f"({type(e).__name__})") from e
            pools = [i for i, n in enumerate(nodes) if i > 0 and _is_pool(backbone, n)]
            if not pools:
                raise StudentError(f"student '{self.name}' has no dense feature map (no global average pool of a "
                                   f"4-D activation; ViTs pool a class token)")
            self._node = nodes[pools[-1] - 1]
            self._extractor = create_feature_extractor(backbone, return_nodes={self._node: "map"})
        return self._extractor

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        ext = self._trace(backbone)
        if ext.training != backbone.training:  # swap its train/eval graph, leaving the modules' own modes be
            modes = [(m, m.training) for m in backbone.modules()]
            ext.train(backbone.training)
            for m, mode in modes:
                m.training = mode
        try:
            out = ext.forward(x)["map"]  # not ext(x): fx's __call__ prints a traceback on errors
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a trace may fix a size-dependent branch that this input size does not take
            raise StudentError(f"student '{self.name}': its traced feature map fails on a {tuple(x.shape)} input: "
                               f"{str(e).strip().splitlines()[0]}") from e
        if out.dim() != 4:
            raise StudentError(f"student '{self.name}' has no dense feature map: its pool reads a "
                               f"{out.dim()}-D activation ('{self._node}')")
        return out


class _NoMaps(_Maps):
    def __init__(self, why: str) -> None:
        self.why = why

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        raise StudentError(self.why)


class _PythonMaps(_Maps):
    """A ``python:`` module's own ``feature_map`` (one stage), ``map_channels`` and optional ``map_stride``."""

    def channels(self, backbone: nn.Module, stage: int) -> int | None:
        return int(backbone.map_channels)

    def stride(self, backbone: nn.Module, stage: int) -> int | None:
        s = getattr(backbone, "map_stride", None)
        return int(s) if isinstance(s, int) else None

    def forward_map(self, backbone: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
        return backbone.feature_map(x)


def _torchvision(name: str, num_classes: int, in_channels: int, stage: int | None) -> Student:
    import torchvision

    arch = name[3:]
    try:
        net = torchvision.models.get_model(arch, weights=None)
    except Exception as e:
        raise StudentError(f"torchvision cannot build '{arch}': {str(e).splitlines()[0] if str(e) else e}") from e
    if hasattr(net, "aux_logits"):  # GoogLeNet / Inception: their auxiliary heads' Linears are not the classifier
        net.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    linears = [q for q, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StudentError(f"torchvision model '{arch}' has no linear classifier to replace")
    # the last Linear in registration order (Swin's head comes after its blocks' MLPs)
    parent_name, _, child_name = linears[-1].rpartition(".")
    parent = net.get_submodule(parent_name)
    linear = getattr(parent, child_name)
    setattr(parent, child_name, nn.Identity())
    maps: _Maps = _TVResNetMaps() if all(hasattr(net, a) for a in _RESNET_PARTS) else _TracedMaps(name)
    student = Student(net, linear.in_features, in_channels, name, expand_to=3, stage=stage, maps=maps)
    if stage is not None and isinstance(maps, _TracedMaps):
        maps._trace(net)  # a dense map asked for by name: fail now, in one line, if there is none
    return student


def _python(name: str, num_classes: int, in_channels: int, stage: int | None) -> Student:
    parts = name.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise StudentError(f"bad student '{name}': expected python:MODULE:FACTORY")
    try:
        factory = getattr(importlib.import_module(parts[1]), parts[2])
    except (ImportError, AttributeError) as e:
        raise StudentError(f"cannot import student factory {parts[1]}:{parts[2]}: {e}") from e
    net = factory(num_classes, in_channels)
    dim = getattr(net, "feature_dim", None)
    if not isinstance(net, nn.Module) or not isinstance(dim, int):
        raise StudentError(f"{parts[1]}:{parts[2]} must return an nn.Module with an integer 'feature_dim'")
    if callable(getattr(net, "feature_map", None)) and isinstance(getattr(net, "map_channels", None), int):
        maps: _Maps = _PythonMaps()
    else:
        maps = _NoMaps(f"student '{name}' has no dense feature map: its module needs a 'feature_map(x)' method "
                       f"and an integer 'map_channels'")
    student = Student(net, dim, in_channels, name, stage=stage, maps=maps)
    if stage is not None and isinstance(maps, _NoMaps):
        raise StudentError(maps.why)
    return student
