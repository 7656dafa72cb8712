"""Student networks: shapes, channels, names."""

import sys
import types

import pytest
import torch
import torch.nn as nn

from tcskd.errors import TcskdError
from tcskd.train.students import build_student, count_parameters


@pytest.mark.parametrize("name", ["cnn", "resnet8x4", "resnet20", "resnet56", "wrn-16-2", "wrn-40-2",
                                  "mobilenetv2", "shufflenetv2"])
@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_students(name, channels):
    s = build_student(name, 10, channels).eval()
    with torch.no_grad():
        f = s(torch.rand(2, channels, 16, 16))
    assert f.shape == (2, s.feature_dim)


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
