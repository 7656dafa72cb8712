"""Student networks: ``--student NAME`` -> a backbone that maps images to features.

Every student is a :class:`Student`: ``forward(x) -> f`` (B x ``feature_dim``),
the penultimate feature. The classifier is not part of it: it lives in the
TCS head (tcskd.train.head), beside the projector, so that every student
exposes the same two outputs. Inputs are images in [0, 1]; the student
normalises them itself (fixed mean 0.5, std 0.25 per channel) so that an
exported student takes the same [0, 1] images.

Names:
- ``cnn``: a small CNN for 28/32 px inputs (~240k parameters), the default.
- CIFAR students in the style of the CRD repository (Tian et al. 2020):
  ``resnet8x4``, ``resnet20``, ``resnet32x4``, ``resnet56``, ``wrn-16-2``,
  ``wrn-40-2``, ``mobilenetv2`` (CRD's ``mobile_half``: width 0.5, expansion 6),
  ``shufflenetv2`` (net size 1) and ``vgg8`` (RepDistiller's ``vgg8_bn``). Global
  average pooling is adaptive, so any input size >= 8 px works.
- ``tv:NAME``: a torchvision model (``weights=None``); its last ``nn.Linear``
  becomes the identity and its input width is the feature dimension.
  Greyscale inputs are repeated to 3 channels.
- ``python:MODULE:FACTORY``: ``FACTORY(num_classes, in_channels)`` returns a
  module with an integer ``feature_dim`` whose forward returns the features
  (B x feature_dim), or a tuple whose first element is the features.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

INPUT_MEAN = 0.5
INPUT_STD = 0.25


class StudentError(TcskdError):
    """An unknown or unusable student name."""


class Student(nn.Module):
    """Input normalisation + a backbone returning B x ``feature_dim`` features."""

    def __init__(self, backbone: nn.Module, feature_dim: int, in_channels: int, name: str,
                 expand_to: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.in_channels = int(in_channels)
        self.name = name
        self.expand_to = expand_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - INPUT_MEAN) / INPUT_STD
        if self.expand_to is not None and x.shape[1] != self.expand_to:
            x = x.expand(-1, self.expand_to, -1, -1)
        out = self.backbone(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)


# -- cnn --------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int) -> tuple[nn.Module, int]:
    layers = (_conv_bn(in_channels, 32) + _conv_bn(32, 64, 2) + _conv_bn(64, 128, 2) + _conv_bn(128, 128)
              + [nn.AdaptiveAvgPool2d(1), nn.Flatten()])
    return nn.Sequential(*layers), 128


# -- CIFAR ResNets (CRD resnet.py) -------------------------------------------

class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, filters: tuple[int, int, int, int], in_channels: int) -> None:
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        inplanes = filters[0]
        stages = []
        for i, stride in ((1, 1), (2, 2), (3, 2)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(inplanes, filters[i], stride if j == 0 else 1))
                inplanes = filters[i]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = filters[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# -- Wide ResNets (CRD wrn.py) ------------------------------------------------

class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        if not self.equal:
            x = o
        out = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int) -> None:
        super().__init__()
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for i, stride in ((1, 1), (2, 2), (3, 2)):
            for j in range(n):
                blocks.append(_WideBlock(ch[i - 1] if j == 0 else ch[i], ch[i], stride if j == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch[3])
        self.feature_dim = ch[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# -- MobileNetV2 (CRD mobilenetv2.py, mobile_half) -------------------------------

class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
            nn.Conv2d(hid, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                   (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width)
        layers: list[nn.Module] = [*_conv_bn(in_channels, cin, 2)]
        for t, c, n, s in setting:
            cout = int(c * width)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.last = 1280
        layers += [nn.Conv2d(cin, self.last, 1, 1, 0, bias=False), nn.BatchNorm2d(self.last), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = self.last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


# -- ShuffleNetV2 (CRD ShuffleNetv2.py, net size 1) ----------------------------

def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.half = c
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.half], x[:, self.half:]
        return _shuffle(torch.cat([x1, self.branch(x2)], 1))


class _ShuffleDown(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, in_channels: int, out_channels: tuple[int, ...] = (116, 232, 464, 1024),
                 blocks: tuple[int, ...] = (3, 7, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24),
                                   nn.ReLU(inplace=True)]
        cin = 24
        for cout, n in zip(out_channels[:3], blocks):
            layers.append(_ShuffleDown(cin, cout))
            layers += [_ShuffleBlock(cout) for _ in range(n)]
            cin = cout
        layers += [nn.Conv2d(cin, out_channels[3], 1, bias=False), nn.BatchNorm2d(out_channels[3]),
                   nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = out_channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


# -- VGG8 (RepDistiller vgg.py, vgg8_bn) ----------------------------------------

class VGG8(nn.Module):
    """RepDistiller's ``vgg8_bn`` (configuration S): five stages of one 3x3 conv (with bias) + BN + ReLU, of
    64, 128, 256, 512 and 512 channels, 2x2 max-pooling after each of the first three, global average pooling
    to the 512-d feature (the classifier on it lives in the TCS head). Six weight layers with that classifier;
    the name follows the KD literature. Weights as RepDistiller initialises them (conv N(0, 2 / (9 C_out)),
    zero biases, BN 1 / 0). RepDistiller pools once more before the last stage at 64 px only; here the same
    layers serve every input size."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (64, 128, 256, 512, 512), pools: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < pools:
                layers.append(nn.MaxPool2d(2, 2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


# -- the registry ----------------------------------------------------------------

_BUILTIN: dict[str, Callable[[int], nn.Module]] = {
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

STUDENTS = ("cnn", *_BUILTIN, "tv:NAME", "python:MODULE:FACTORY")


def build_student(name: str, num_classes: int, in_channels: int) -> Student:
    """The student called ``name`` for ``in_channels``-channel images; StudentError if unknown."""
    if name == "cnn":
        backbone, dim = small_cnn(in_channels)
        return Student(backbone, dim, in_channels, name)
    if name in _BUILTIN:
        net = _BUILTIN[name](in_channels)
        return Student(net, net.feature_dim, in_channels, name)
    if name.startswith("tv:"):
        return _torchvision(name, num_classes, in_channels)
    if name.startswith("python:"):
        return _python(name, num_classes, in_channels)
    raise StudentError(f"unknown student '{name}' (choose one of {', '.join(STUDENTS)})")



def make_student(name: str, num_classes: int, in_channels: int) -> Student:
    """build_student, with whatever a ``python:`` factory raises turned into a one-line StudentError."""
    try:
        return build_student(name, num_classes, in_channels)
    except StudentError:
        raise
    except Exception as e:  # the user's module or factory failed (or is not a factory at all)
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise StudentError(f"cannot build student '{name}': {type(e).__name__}: {msg}") from e

def _torchvision(name: str, num_classes: int, in_channels: int) -> Student:
    import torchvision

    arch = name[3:]
    try:
        net = torchvision.models.get_model(arch, weights=None)
    except Exception as e:
        raise StudentError(f"torchvision cannot build '{arch}': {str(e).splitlines()[0] if str(e) else e}") from e
    last: tuple[nn.Module, str, nn.Linear] | None = None
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is None:
        raise StudentError(f"torchvision model '{arch}' has no linear classifier to replace")
    parent, child_name, linear = last
    setattr(parent, child_name, nn.Identity())
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
        if hasattr(net, "AuxLogits"):
            net.AuxLogits = None
    return Student(net, linear.in_features, in_channels, name, expand_to=3)


def _python(name: str, num_classes: int, in_channels: int) -> Student:
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
    return Student(net, dim, in_channels, name)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
