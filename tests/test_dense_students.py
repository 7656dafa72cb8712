"""Dense students: feature maps at each stage, their shapes and strides, the pooled feature, segnet."""

from __future__ import annotations

import functools
import hashlib
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tcskd.errors import TcskdError
from tcskd.train.students import Student, StudentError, build_student, count_parameters, make_student

# (channels, stride) per stage, as the students module documents them (3-channel input)
STAGES = {
    "cnn": [(32, 1), (64, 2), (128, 4), (128, 4)],
    "segnet": [(32, 2), (64, 4), (128, 8), (32, 1)],
    "resnet8x4": [(64, 1), (128, 2), (256, 4)],
    "resnet20": [(16, 1), (32, 2), (64, 4)],
    "resnet32x4": [(64, 1), (128, 2), (256, 4)],
    "resnet56": [(16, 1), (32, 2), (64, 4)],
    "wrn-16-2": [(32, 1), (64, 2), (128, 4)],
    "wrn-40-2": [(32, 1), (64, 2), (128, 4)],
    "mobilenetv2": [(12, 2), (16, 4), (48, 8), (1280, 16)],
    "shufflenetv2": [(116, 2), (232, 4), (1024, 8)],
    "vgg8": [(64, 1), (128, 2), (256, 4), (512, 8), (512, 8)],
}
# the state-dict keys and shapes of main's students before feature maps existed (commit 2c98f9b, 3 channels):
# (number of entries, sha256 of "key:shape" lines)[:16]; a checkpoint saved then loads now with strict=True
KEYS = {
    "cnn": (24, "25de0ce7cb032477"),
    "resnet8x4": (60, "81516a40446ced59"),
    "resnet20": (126, "24e219f11c605ffa"),
    "resnet32x4": (204, "19dde0703fb0131b"),
    "resnet56": (342, "27b0c118bfe3d52b"),
    "wrn-16-2": (81, "c4197b4436538cf7"),
    "wrn-40-2": (225, "ec1dabda008d9344"),
    "mobilenetv2": (318, "9a9aee4ac8d0af6a"),
    "shufflenetv2": (336, "a7d8c6c05f45bb70"),
    "vgg8": (35, "200972a5332efc01"),
}


def _x(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _built(name: str) -> Student:
    """One seeded greyscale build per student for the whole module (building the large ones is the cost)."""
    torch.manual_seed(0)
    return build_student(name, 10, 1)


def _student(name: str, stage: int | None = None) -> Student:
    """The cached student's backbone behind a Student for ``stage`` (what build_student(stage=...) makes)."""
    s = _built(name)
    return Student(s.backbone, s.feature_dim, 1, name, stage=stage)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_state_dict_keys_are_unchanged(name):
    sd = build_student(name, 10, 3).state_dict()
    digest = hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items()).encode()).hexdigest()[:16]
    assert (len(sd), digest) == KEYS[name]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_forward_is_the_pool_of_the_last_map(name):
    """For every built-in student ``forward`` is exactly the global average pool of the default map."""
    s = _student(name).eval()
    x = _x(2, 1, 32)
    with torch.no_grad():
        m, f = s.feature_map(x), s(x)
    assert s.stage == s.num_stages == len(STAGES[name])
    assert torch.equal(F.adaptive_avg_pool2d(m, 1).flatten(1), f)
    assert f.shape == (2, s.feature_dim)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_maps_have_the_documented_shape(name):
    for size in (32, 64):
        x = _x(1, 1, size)
        for stage, (channels, stride) in enumerate(STAGES[name], 1):
            s = _student(name, stage).eval()
            with torch.no_grad():
                m = s.feature_map(x)
            assert (s.map_channels, s.map_stride) == (channels, stride)
            assert m.shape == (1, channels, size // stride, size // stride), (size, stage, m.shape)


# the module whose output each stage's map is, as documented (names inside the backbone)
STAGE_MODULES = {
    "cnn": ["2", "5", "8", "11"],
    "resnet8x4": ["layer1", "layer2", "layer3"],
    "wrn-16-2": ["blocks.1", "blocks.3", "bn"],  # stage 3: after the final BN's ReLU, checked below
    "mobilenetv2": ["features.5", "features.8", "features.15", "features.22"],
    "shufflenetv2": ["features.6", "features.14", "features.21"],
    "vgg8": ["features.2", "features.6", "features.10", "features.14", "features.17"],
    "segnet": ["enc1", "enc2", "enc3", "dec0"],
}


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_stage_maps_are_the_networks_own_activations(name):
    """Stage k's map is the activation of the documented module in the full forward pass (caught by a hook)."""
    full = _student(name).eval()
    seen: dict[str, torch.Tensor] = {}
    hooks = [full.backbone.get_submodule(where).register_forward_hook(
        lambda mod, inp, out, where=where: seen.__setitem__(where, out.clone())) for where in STAGE_MODULES[name]]
    x = _x(2, 1, 32)
    with torch.no_grad():
        full(x)
        for h in hooks:
            h.remove()
        for stage, where in enumerate(STAGE_MODULES[name], 1):
            part = build_student(name, 10, 1, stage=stage).eval() if name == "cnn" else _student(name, stage)
            part.load_state_dict(full.state_dict())
            want = F.relu(seen[where]) if (name, where) == ("wrn-16-2", "bn") else seen[where]
            assert torch.equal(part.feature_map(x), want), (stage, where)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_gradients_reach_the_first_conv_from_the_map(name):
    s = _student(name, 1 if name != "segnet" else None).train()
    s.zero_grad()
    s.feature_map(_x(2, 1, 16)).square().mean().backward()
    first = next(m for m in s.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0, 4, -1, True, "2", 2.0])
def test_stage_out_of_range_is_one_line(bad):
    with pytest.raises(StudentError) as e:
        build_student("resnet20", 10, 1, stage=bad)
    assert "1..3" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TcskdError):
        make_student("resnet20", 10, 1, stage=bad)


def test_segnet_map_is_at_the_input_resolution():
    """Any input size (also sizes not divisible by its total stride 8): the map is H x W, 32 channels."""
    s = build_student("segnet", 5, 1).eval()
    assert 300_000 <= count_parameters(s) <= 600_000
    for h, w in ((64, 64), (32, 32), (36, 44), (50, 30)):
        with torch.no_grad():
            m = s.feature_map(torch.rand(2, 1, h, w))
        assert m.shape == (2, s.map_channels, h, w) and s.map_stride == 1


def _shapes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy canvases with a bright square (class 1) in one half and a bright disc (class 2) in the other."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    y = torch.zeros(n, size, size, dtype=torch.long)
    half = size // 2
    for i in range(n):
        sq_off, ci_off = (0, half) if torch.rand(1, generator=g) < 0.5 else (half, 0)
        side = int(torch.randint(11, 15, (1,), generator=g))
        r = int(torch.randint(6, 8, (1,), generator=g))
        x0 = int(torch.randint(0, half - side + 1, (1,), generator=g)) + sq_off
        y0 = int(torch.randint(0, size - side + 1, (1,), generator=g))
        cx = int(torch.randint(r, half - r, (1,), generator=g)) + ci_off
        cy = int(torch.randint(r, size - r, (1,), generator=g))
        square = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        y[i][square], y[i][disc] = 1, 2
        x[i, 0][square | disc] += 0.5
    return x, y


def test_segnet_learns_a_per_pixel_task():
    """segnet + a 1x1 conv classifier tell squares from discs from background pixel by pixel (which needs
    more than a pixel's brightness: both shapes are equally bright) far above the majority-class rate."""
    torch.manual_seed(0)
    x, y = _shapes(16, 32, seed=0)
    majority = (y == 0).float().mean().item()
    s = build_student("segnet", 3, 1)
    cls = nn.Conv2d(s.map_channels, 3, 1)
    opt = torch.optim.Adam([*s.parameters(), *cls.parameters()], lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(cls(s.feature_map(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s.eval()
    with torch.no_grad():
        acc = (cls(s.feature_map(x)).argmax(1) == y).float().mean().item()
        bright = (x[:, 0] > 0.5).long()  # the best a brightness threshold can do: shape pixels as one class
        thresh = max(((bright * c) == y).float().mean().item() for c in (1, 2))
    assert majority < 0.75 and thresh < 0.9
    assert acc > 0.9 and acc > majority + 0.15


def test_torchvision_resnet_stages():
    s = build_student("tv:resnet18", 10, 1, stage=2).eval()
    with torch.no_grad():
        m = s.feature_map(_x(1, 1, 64))
    assert m.shape == (1, 128, 8, 8) and (s.map_channels, s.map_stride) == (128, 8)
    last = build_student("tv:resnet18", 10, 1).eval()
    with torch.no_grad():
        assert torch.equal(F.adaptive_avg_pool2d(last.feature_map(_x(2, 1, 64)), 1).flatten(1), last(_x(2, 1, 64)))
    assert (last.num_stages, last.map_channels, last.map_stride) == (4, 512, 32)
    with pytest.raises(StudentError, match="1..4"):
        build_student("tv:resnet18", 10, 1, stage=5)


def test_torchvision_traced_map_is_the_features_output():
    """MobileNetV3 has ``features``: its map is torchvision's own ``features(x)``; an MLP follows the pool, so
    ``forward`` is that MLP of the pooled map, not the pool."""
    torch.manual_seed(0)
    s = build_student("tv:mobilenet_v3_small", 10, 3).eval()
    x = _x(2, 3, 64)
    net = s.backbone
    with torch.no_grad():
        m = s.feature_map(x)
        assert torch.equal(m, net.features(s._prepare(x)))
        assert torch.allclose(s(x), net.classifier(net.avgpool(m).flatten(1)))
    assert (s.map_channels, s.map_stride, s.num_stages) == (576, 32, 1)


def test_torchvision_traced_map_pools_to_the_feature():
    """EfficientNet: only the classifier follows the pool, so ``forward`` is the pool of the traced map (its
    ``features`` output; the squeeze-excitation pools inside the blocks are not taken for the global pool)."""
    s = build_student("tv:efficientnet_b0", 10, 1).eval()
    x = _x(2, 1, 64)
    with torch.no_grad():
        m = s.feature_map(x)
        assert torch.equal(m, s.backbone.features(s._prepare(x)))
        assert torch.allclose(F.adaptive_avg_pool2d(m, 1).flatten(1), s(x), atol=1e-6)
    assert (s.map_channels, s.map_stride) == (1280, 32)


def test_torchvision_model_without_a_map_is_one_line():
    s = build_student("tv:vit_b_16", 10, 3)  # builds as before: only dense use fails
    for use in (lambda: s.feature_map(_x(1, 3, 224)), lambda: s.map_channels):
        with pytest.raises(StudentError, match="no dense feature map") as e:
            use()
        assert "\n" not in str(e.value)
    with pytest.raises(StudentError, match="no dense feature map"):
        build_student("tv:vit_b_16", 10, 3, stage=1)


def _module(monkeypatch, dense: bool) -> str:
    mod = types.ModuleType("my_dense_student_mod")

    class Net(nn.Module):
        feature_dim = 6

        def __init__(self, in_channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 6, 3, stride=2, padding=1)
            if dense:
                self.map_channels = 6

        def forward(self, x):
            return self.conv(x).mean((2, 3))

        if dense:
            def feature_map(self, x):
                return self.conv(x)

    mod.make = lambda num_classes, in_channels: Net(in_channels)
    monkeypatch.setitem(sys.modules, "my_dense_student_mod", mod)
    return "python:my_dense_student_mod:make"


def test_python_student_with_a_feature_map(monkeypatch):
    s = build_student(_module(monkeypatch, True), 3, 1, stage=1)
    x = _x(2, 1, 16)
    m = s.feature_map(x)
    assert torch.equal(m, s.backbone.conv((x - 0.5) / 0.25))
    assert (s.map_channels, s.map_stride) == (6, 2)  # the stride measured on a probe image
    assert s.training and s.backbone.conv.training  # the probe left the modes as they were
    with pytest.raises(StudentError, match="stage 1"):
        build_student(_module(monkeypatch, True), 3, 1, stage=2)


def test_python_student_without_a_feature_map(monkeypatch):
    name = _module(monkeypatch, False)
    s = build_student(name, 3, 1)
    assert s(_x(2, 1, 16)).shape == (2, 6)
    with pytest.raises(StudentError, match="feature_map"):
        s.feature_map(_x(2, 1, 16))
    with pytest.raises(StudentError, match="feature_map"):
        build_student(name, 3, 1, stage=1)
