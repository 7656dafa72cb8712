"""The built-in student architectures, each with numbered stages that give a dense feature map.

Every backbone here is a :class:`Staged` network: ``stage_channels`` / ``stage_strides`` (one entry per stage,
1-based in the API), ``forward_map(x, stage) -> B x C x h x w`` (the map after that stage, the input already
normalised), and ``forward(x)`` = the global average pool of ``forward_map(x, last stage)`` (B x ``feature_dim``).
The stages, their channels and strides (input pixels per map cell at input sizes divisible by the total
stride) are listed in tcskd.train.students, which wraps these in a ``Student``. The layers and their
parameter names are those of the original zoo (CRD / RepDistiller), so old checkpoints load unchanged.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class Staged(nn.Module):
    """A backbone with stages: ``forward_map(x, stage)``; ``forward`` pools the last stage's map."""

    stage_channels: tuple[int, ...] = ()
    stage_strides: tuple[int, ...] = ()
    feature_dim: int = 0

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.forward_map(x, len(self.stage_channels)), 1).flatten(1)


def _run(layers: nn.Sequential, x: torch.Tensor, end: int) -> torch.Tensor:
    """``layers[:end](x)`` without building a new Sequential."""
    for m in itertools.islice(layers, end):
        x = m(x)
    return x


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# -- cnn --------------------------------------------------------------------

class SmallCNN(nn.Sequential):
    """Four 3x3 conv+BN+ReLU (32, 64/2, 128/2, 128), global average pool: ~240k parameters. A Sequential, so
    the parameter names stay ``0.weight``, ``1.weight``, ...; stage k is the output of the k-th ReLU."""

    def __init__(self, in_channels: int) -> None:
        super().__init__(*(_conv_bn(in_channels, 32) + _conv_bn(32, 64, 2) + _conv_bn(64, 128, 2)
                           + _conv_bn(128, 128)), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 128
        self.stage_channels = (32, 64, 128, 128)
        self.stage_strides = (1, 2, 4, 4)

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        return _run(self, x, 3 * stage)


def small_cnn(in_channels: int) -> tuple[nn.Module, int]:
    net = SmallCNN(in_channels)
    return net, net.feature_dim


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


class CifarResNet(Staged):
    """Stem conv, then layer1 (stride 1), layer2 (/2), layer3 (/4): stage k = layer k's output."""

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
        self.stage_channels = tuple(filters[1:])
        self.stage_strides = (1, 2, 4)

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3)[:stage]:
            x = layer(x)
        return x


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


class WideResNet(Staged):
    """Pre-activation WRN: stage k = group k's output (stages 1 and 2 before any BN/ReLU, as CRD's hint
    features; stage 3 after the final BN + ReLU, the map ``forward`` pools)."""

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
        self.stage_channels = tuple(ch[1:])
        self.stage_strides = (1, 2, 4)
        self._per_group = n

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        x = self.conv1(x)
        if stage < 3:
            return _run(self.blocks, x, stage * self._per_group)
        return F.relu(self.bn(self.blocks(x)))


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


class _Features(Staged):
    """A ``features`` Sequential whose stage k ends at layer index ``_ends[k - 1]``."""

    features: nn.Sequential
    _ends: tuple[int, ...] = ()

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        if stage == len(self._ends):
            return self.features(x)
        return _run(self.features, x, self._ends[stage - 1])


class MobileNetV2(_Features):
    """Stage k = the last block at each resolution: 1: the 24-blocks (/2), 2: the 32-blocks (/4), 3: the
    96-blocks (/8), 4: the final 1x1 conv to 1280 (/16) (channels at width 0.5: 12, 16, 48, 1280)."""

    def __init__(self, in_channels: int, expand: int = 6, width: float = 0.5) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                   (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width)
        layers: list[nn.Module] = [*_conv_bn(in_channels, cin, 2)]
        ends, channels = [], []
        for t, c, n, s in setting:
            cout = int(c * width)
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            if c in (24, 32, 96):
                ends.append(len(layers))
                channels.append(cout)
        self.last = 1280
        layers += [nn.Conv2d(cin, self.last, 1, 1, 0, bias=False), nn.BatchNorm2d(self.last), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = self.last
        self._ends = (*ends, len(layers))
        self.stage_channels = (*channels, self.last)
        self.stage_strides = (2, 4, 8, 16)


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


class ShuffleNetV2(_Features):
    """Stage k = group k's output: 1: 116 channels (/2), 2: 232 (/4), 3: the 464-group + the final 1x1 conv
    to 1024 (/8)."""

    def __init__(self, in_channels: int, out_channels: tuple[int, ...] = (116, 232, 464, 1024),
                 blocks: tuple[int, ...] = (3, 7, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24),
                                   nn.ReLU(inplace=True)]
        cin = 24
        ends = []
        for cout, n in zip(out_channels[:3], blocks):
            layers.append(_ShuffleDown(cin, cout))
            layers += [_ShuffleBlock(cout) for _ in range(n)]
            ends.append(len(layers))
            cin = cout
        layers += [nn.Conv2d(cin, out_channels[3], 1, bias=False), nn.BatchNorm2d(out_channels[3]),
                   nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = out_channels[3]
        self._ends = (*ends[:2], len(layers))
        self.stage_channels = (*out_channels[:2], out_channels[3])
        self.stage_strides = (2, 4, 8)


# -- VGG8 (RepDistiller vgg.py, vgg8_bn) ----------------------------------------

class VGG8(_Features):
    """RepDistiller's ``vgg8_bn`` (configuration S): five stages of one 3x3 conv (with bias) + BN + ReLU, of
    64, 128, 256, 512 and 512 channels, 2x2 max-pooling after each of the first three, global average pooling
    to the 512-d feature (the classifier on it lives in the TCS head). Six weight layers with that classifier;
    the name follows the KD literature. Weights as RepDistiller initialises them (conv N(0, 2 / (9 C_out)),
    zero biases, BN 1 / 0). RepDistiller pools once more before the last stage at 64 px only; here the same
    layers serve every input size. Stage k = conv k's ReLU output, before its max-pool (strides 1, 2, 4, 8,
    8), so the last stage is the map the global pool reads."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (64, 128, 256, 512, 512), pools: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ends, strides, stride = [], [], 1
        cin = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            ends.append(len(layers))
            strides.append(stride)
            if i < pools:
                layers.append(nn.MaxPool2d(2, 2))
                stride *= 2
            cin = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self._ends = (*ends[:-1], len(layers))
        self.stage_channels = tuple(widths)
        self.stage_strides = tuple(strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# -- segnet: a small encoder-decoder for segmentation -----------------------------

class SegNet(Staged):
    """A small U-Net for greyscale canvases (any size; ~0.44M parameters at 1 channel). Encoder: three
    stages of two 3x3 conv+BN+ReLU, the first of each with stride 2: 32 channels at /2, 64 at /4, 128 at /8.
    Decoder: nearest 2x upsampling + concatenation with the encoder map of that size + one conv (64 at /4,
    32 at /2), then an upsampling to the input size concatenated with a 16-channel full-resolution conv of
    the input, and a last 3x3 conv to 32 channels. Stages: 1-3 the encoder maps, 4 the decoder's output at
    the input resolution (the map ``feature_map`` gives by default; ``forward`` pools it to 32 features).
    The encoder starts with a stride-2 conv and the full-resolution work is two thin convs: a training step
    on 64 x 64 canvases takes about a third of the time of a U-Net whose first stage is 32 channels at full
    resolution."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int] = (32, 64, 128), top: int = 16,
                 out: int = 32) -> None:
        super().__init__()
        a, b, c = widths
        self.enc1 = nn.Sequential(*_conv_bn(in_channels, a, 2), *_conv_bn(a, a))
        self.enc2 = nn.Sequential(*_conv_bn(a, b, 2), *_conv_bn(b, b))
        self.enc3 = nn.Sequential(*_conv_bn(b, c, 2), *_conv_bn(c, c))
        self.dec2 = nn.Sequential(*_conv_bn(c + b, b))
        self.dec1 = nn.Sequential(*_conv_bn(b + a, a))
        self.top = nn.Sequential(*_conv_bn(in_channels, top))
        self.dec0 = nn.Sequential(*_conv_bn(a + top, out))
        self.feature_dim = out
        self.stage_channels = (a, b, c, out)
        self.stage_strides = (2, 4, 8, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(x, size=like.shape[-2:], mode="nearest"), like], 1)

    def forward_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        e1 = self.enc1(x)
        if stage == 1:
            return e1
        e2 = self.enc2(e1)
        if stage == 2:
            return e2
        e3 = self.enc3(e2)
        if stage == 3:
            return e3
        y = self.dec1(self._up(self.dec2(self._up(e3, e2)), e1))
        return self.dec0(self._up(y, self.top(x)))
