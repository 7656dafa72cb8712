"""Student networks: shapes, channels, names."""

import sys
import types

import pytest
import torch
import torch.nn as nn

from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT, CHECKPOINT_FORMAT, save_checkpoint
from tcskd.train.export import export_run
from tcskd.train.head import TCSHead
from tcskd.train.students import CIFAR_KD_STUDENTS, VGG8, build_student, count_parameters


@pytest.mark.parametrize("name", ["cnn", "resnet8x4", "resnet20", "resnet56", "wrn-16-2", "wrn-40-2",
                                  "mobilenetv2", "shufflenetv2", "vgg8"])
@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_students(name, channels):
    s = build_student(name, 10, channels).eval()
    with torch.no_grad():
        f = s(torch.rand(2, channels, 16, 16))
    assert f.shape == (2, s.feature_dim)


def test_the_cifar_kd_students_are_the_benchmarks():
    assert set(CIFAR_KD_STUDENTS) == {"resnet8x4", "resnet20", "wrn-16-2", "wrn-40-2", "vgg8", "mobilenetv2",
                                      "shufflenetv2"}


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR_KD_STUDENTS)
def test_cifar_kd_students_at_32_px_export(name, tmp_path):
    """Each CIFAR-100 KD student at 32 px, 3 channels, 100 classes: its feature feeds the TCS head, and
    ``tcskd export`` of a run with it gives the same logits (export_run checks them too)."""
    torch.manual_seed(0)
    student = build_student(name, 100, 3).eval()
    head = TCSHead(student.feature_dim, 100, 8, "feature").eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = student(x)
        logits, c_hat = head(f)
    assert f.shape == (2, student.feature_dim) and logits.shape == (2, 100) and c_hat.shape == (2, 8)
    assert torch.isfinite(logits).all()
    run = tmp_path / "run"
    run.mkdir()
    meta = {"student": name, "feature_dim": student.feature_dim, "in_channels": 3, "num_classes": 100,
            "image_size": 32, "k": 8, "classify_from": "feature"}
    save_checkpoint(run / CHECKPOINT, {"format": CHECKPOINT_FORMAT, "epoch": 1, "step": 1, "config": {"epochs": 1},
                                       "student": student.state_dict(), "head": head.state_dict(), "meta": meta})
    out = export_run(run, tmp_path / "student.pt2")
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x)
    assert torch.allclose(got, logits, rtol=1e-4, atol=1e-5)


def test_vgg8_is_repdistillers_vgg8_bn():
    """Five 3x3 convs (64, 128, 256, 512, 512) with BN, max-pooled after the first three: 32 px -> 4 x 4 x 512
    before the global pool; its parameters with a 100-class classifier are RepDistiller's vgg8_bn count."""
    net = VGG8(3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512] and all(c.bias is not None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net.features(torch.rand(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    # conv weights + biases, BN weights + biases, and a 512 x 100 classifier with its bias
    expect = sum(9 * a * b + b for a, b in zip((3, 64, 128, 256, 512), (64, 128, 256, 512, 512)))
    expect += 2 * (64 + 128 + 256 + 512 + 512) + 512 * 100 + 100
    assert count_parameters(net) + 512 * 100 + 100 == expect


def test_cnn_is_small():
    assert 100_000 <= count_parameters(build_student("cnn", 10, 1)) <= 300_000


def test_torchvision_student_greyscale():
    s = build_student("tv:resnet18", 10, 1).eval()
    with torch.no_grad():
        assert s(torch.rand(2, 1, 32, 32)).shape == (2, 512)


def test_python_factory(monkeypatch):
    mod = types.ModuleType("my_student_mod")

    class Net(nn.Module):
        feature_dim = 7

        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.lin = nn.Linear(in_channels * 16, 7)

        def forward(self, x):
            f = self.lin(x[:, :, :4, :4].flatten(1))
            return f, None

    mod.make = lambda num_classes, in_channels: Net(num_classes, in_channels)
    monkeypatch.setitem(sys.modules, "my_student_mod", mod)
    s = build_student("python:my_student_mod:make", 3, 1)
    assert s(torch.rand(2, 1, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet9000", "tv:not_a_model", "python:nope", "python:no_such_mod_x:f"])
def test_unknown_student(name):
    with pytest.raises(TcskdError):
        build_student(name, 10, 3)
