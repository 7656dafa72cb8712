"""``tcskd export --format onnx``: ONNX Runtime gives the student's logits at any batch size; the format follows
the suffix; the sidecar records the opset; a missing package is one line naming the extra."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _train_fixtures import make_npz, make_train_cache
from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.train.config import TrainConfig
from tcskd.train.export import export_format, load_run
from tcskd.train.loop import train

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript or onnxruntime is not installed (pip install 'tcskd[onnx]')")

#: student -> (image size, channels, classify_from): a merged coordinate head and a plain one.
STUDENTS = {"cnn": (12, 1, "coords"), "resnet8x4": (16, 3, "feature")}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def run(request, tmp_path_factory):
    name = request.param
    size, channels, classify_from = STUDENTS[name]
    root = tmp_path_factory.mktemp(f"export-{name}")
    npz = make_npz(root / "d.npz", n_train=24, n_test=8, size=size, channels=channels)
    cache = make_train_cache(root, npz, name="c")
    out = root / "run"
    train(TrainConfig(cache=str(cache), student=name, epochs=1, batch_size=8, dim=6, out=str(out), device="cpu",
                      workers=0, tailor="off", classify_from=classify_from))
    return out, size, channels


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, prog_name="tcskd")


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize("how", ["suffix", "option"])
def test_onnx_runtime_gives_the_student_logits(run, tmp_path, how):
    import onnxruntime

    out, size, channels = run
    path = tmp_path / ("student.onnx" if how == "suffix" else "student.bin")
    r = _invoke(["export", str(out), "--out", str(path)] + (["--format", "onnx"] if how == "option" else []))
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert r.stdout.strip() == str(path)
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["format"] == "onnx" and isinstance(info["opset"], int) and info["opset"] >= 17
    assert info["checked_with_onnxruntime"] is True and info["image_size"] == size
    student, head, _ = load_run(out)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # a dynamic batch
        x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want, _ = head(student(x))
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_pt2_stays_the_default(run, tmp_path):
    out, _, _ = run
    r = _invoke(["export", str(out), "--out", str(tmp_path / "student.pt2")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    info = json.loads((tmp_path / "student.pt2.json").read_text())
    assert info["format"] == "torch.export" and "opset" not in info
    assert torch.export.load(str(tmp_path / "student.pt2")).module() is not None


def test_format_from_the_suffix():
    assert export_format("a/student.onnx") == "onnx" and export_format("s.ONNX") == "onnx"
    assert export_format("student.pt2") == "pt2" and export_format("student") == "pt2"
    assert export_format("student.pt2", "onnx") == "onnx"
    with pytest.raises(TcskdError, match="unknown export format"):
        export_format("s.pt2", "tflite")


@pytest.mark.slow
@needs_onnx
def test_without_onnxruntime_the_export_is_written_unchecked(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out, _, _ = run
    r = _invoke(["export", str(out), "--out", str(tmp_path / "student.onnx")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((tmp_path / "student.onnx.json").read_text())["checked_with_onnxruntime"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.onnx.json"]


@pytest.mark.parametrize("package", ["onnx", "onnxscript"])
def test_a_missing_onnx_package_is_one_line(run, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    out, _, _ = run
    r = _invoke(["export", str(out), "--out", str(tmp_path / "student.onnx")])
    assert r.exit_code != 0
    assert r.stderr.splitlines() == [f"tcskd: error: --format onnx needs the {package} package: "
                                     "pip install 'tcskd[onnx]'"], r.stderr
    assert not list(tmp_path.iterdir())
