"""Export a trained run as a plain student: images in [0, 1] -> logits.

The TCS head is a training-time device. When the classifier reads the
student's feature ``f`` directly, the projector, the mask and the gate (which
only shape the training signal) are dropped; when it reads the predicted
coordinates, classifier, mask, gate and projector are linear and merge into
one linear layer (TCSHead.inference_classifier). Either way what is left is
``classifier(student(x))``: the student's own cost, nothing added. A dense
projector (``--mimic-on dense|both``) is dropped the same way. A segmentation
run (``--task segment``) exports the student's feature map, the pixel
classifier and the bilinear upsampling to the input size: B x C x S x S logits
per pixel (:class:`ExportedSegmenter`).

Format: a ``torch.export`` program (``.pt2``; TorchScript is deprecated) of
the student + linear classifier in eval mode, with a dynamic batch size, at
the run's input size. Load it without tcskd:
``torch.export.load(FILE).module()(x)``. Beside it ``FILE.json`` describes the
model (student name, input size and channels, classes, input range, the
run's metrics). :func:`export_run` checks that the exported module reproduces
the training model's logits before it returns.

``--format onnx`` (or an ``.onnx`` file name) converts the same program with
``torch.onnx.export`` (the dynamo exporter; packages onnx and onnxscript, the
``onnx`` extra): input ``x`` with a dynamic batch, output ``logits``, the opset
recorded in ``FILE.json``; with onnxruntime installed, ONNX Runtime's logits
are checked too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT, load_checkpoint
from tcskd.train.head import TCSHead
from tcskd.train.students import Student, make_student

log = logging.getLogger(__name__)


class ExportedStudent(nn.Module):
    """``classifier(student(x))``: logits only."""

    def __init__(self, student: Student, classifier: nn.Linear) -> None:
        super().__init__()
        self.student = student
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.student(x))


class ExportedSegmenter(nn.Module):
    """``upsample(pixel_classifier(student.feature_map(x)))``: B x C x S x S logits per pixel."""

    def __init__(self, student: Student, pixel_classifier: nn.Conv2d) -> None:
        super().__init__()
        self.student = student
        self.pixel_classifier = pixel_classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.pixel_classifier(self.student.feature_map(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def load_run(run_dir: Path | str) -> tuple[Student, TCSHead, dict[str, Any]]:
    """The student and head of a run's checkpoint (eval mode, CPU) and its meta."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise TcskdError(f"{run_dir} has no {CHECKPOINT} (not a tcskd run directory?)")
    ck = load_checkpoint(path)
    meta = ck["meta"]
    student = make_student(meta["student"], meta["num_classes"], meta["in_channels"], meta.get("student_stage"))
    if "map_channels" in meta:  # a dense or segmentation run (tcskd.train.model.build_models)
        mimic = meta.get("mimic_on")
        head = TCSHead(student.feature_dim, meta["num_classes"], meta["k"], meta.get("classify_from", "feature"),
                       map_channels=meta["map_channels"], dense=mimic in ("dense", "both"),
                       global_=mimic in ("global", "both"), task=meta.get("task", "classify"))
    else:
        head = TCSHead(student.feature_dim, meta["num_classes"], meta["k"], meta.get("classify_from", "feature"))
    student.load_state_dict(ck["student"])
    head.load_state_dict(ck["head"])
    student.eval()
    head.eval()
    meta = dict(meta, epoch=ck["epoch"], epochs=ck["config"]["epochs"])
    return student, head, meta


#: Export formats: a torch.export program or an ONNX model.
FORMATS = ("pt2", "onnx")
#: ``--format onnx`` -> the packages torch.onnx.export (dynamo) needs, and the extra that installs them.
ONNX_PACKAGES = ("onnx", "onnxscript")
#: Loggers of the ONNX exporter kept at WARNING while it runs.
ONNX_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


def export_format(out_file: Path | str, fmt: str | None = None) -> str:
    """``fmt``, or the format the suffix of ``out_file`` names (``.onnx``; anything else is ``pt2``)."""
    if fmt is None:
        return "onnx" if Path(out_file).suffix.lower() == ".onnx" else "pt2"
    if fmt not in FORMATS:
        raise TcskdError(f"unknown export format '{fmt}' (choose {' or '.join(FORMATS)})")
    return fmt


def export_run(run_dir: Path | str, out_file: Path | str, fmt: str | None = None) -> Path:
    """Write the run's student to ``out_file`` (+ ``out_file.json``) as a torch.export program (``pt2``) or an
    ONNX model (``onnx``; default: from the suffix, :func:`export_format`); return the path."""
    run_dir, out_file, fmt = Path(run_dir), Path(out_file), export_format(out_file, fmt)
    if fmt == "onnx":
        _check_onnx_packages()
    student, head, meta = load_run(run_dir)
    if meta["epoch"] < meta["epochs"]:
        log.warning("%s stopped after epoch %d of %d: exporting the unfinished model",
                    run_dir, meta["epoch"], meta["epochs"])
    segment = head.task == "segment"
    model = (ExportedSegmenter(student, head.pixel_classifier) if segment
             else ExportedStudent(student, head.inference_classifier())).eval()
    size, ch = int(meta["image_size"]), int(meta["in_channels"])
    example = torch.rand(2, ch, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as e:
        raise TcskdError(f"torch.export cannot export student '{meta['student']}': "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    with torch.no_grad():
        probe = torch.rand(3, ch, size, size, generator=torch.Generator().manual_seed(1))
        ref = head.segment(student.feature_map(probe), (size, size)) if segment else head(student(probe))[0]
    _check_logits(ref, program.module()(probe), "exported")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{out_file.name}")
    try:
        if fmt == "onnx":
            info = _save_onnx(program, tmp, probe, ref, meta["student"])
        else:
            torch.export.save(program, str(tmp))
            info = {"format": "torch.export", "load": "torch.export.load(FILE).module()"}
        tmp.replace(out_file)
    finally:
        tmp.unlink(missing_ok=True)
    final = run_dir / "final.json"
    info.update({
        "input": "B x C x S x S float in [0, 1]",
        "output": "B x num_classes x S x S logits per pixel" if segment else "B x num_classes logits",
        "student": meta["student"], "in_channels": ch, "image_size": size,
        "num_classes": meta["num_classes"], "feature_dim": student.feature_dim, "method": meta.get("method"),
        "dim": meta.get("k"), "classify_from": meta.get("classify_from", "feature"), "run_dir": str(run_dir),
        "final": json.loads(final.read_text()) if final.exists() else None,
    })
    if segment:
        info["task"] = "segment"
    Path(str(out_file) + ".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("exported %s -> %s", run_dir, out_file)
    return out_file


def _check_logits(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):  # a merged head sums in another order
        raise TcskdError(f"export check failed: {what} logits differ by {float((ref - got).abs().max()):.3g}")


def _check_onnx_packages() -> None:
    """TcskdError (one line naming the extra) when a package of the ONNX exporter is missing."""
    for package in ONNX_PACKAGES:
        if importlib.util.find_spec(package) is None:
            raise TcskdError(f"--format onnx needs the {package} package: pip install 'tcskd[onnx]'")


def _save_onnx(program: torch.export.ExportedProgram, path: Path, probe: torch.Tensor, ref: torch.Tensor,
               student: str) -> dict[str, Any]:
    """``program`` as an ONNX model (dynamic batch, input ``x``, output ``logits``) at ``path``, checked
    with onnxruntime when it is installed; the sidecar's format fields."""
    import onnx

    chatty = [logging.getLogger(name) for name in ONNX_LOGGERS]
    levels = [lg.level for lg in chatty]
    try:
        for lg in chatty:  # their INFO lines (optimizer passes) are not ours to show
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        torch.onnx.export(program, f=str(path), dynamo=True, input_names=["x"], output_names=["logits"],
                          external_data=False, verbose=False)
    except Exception as e:
        raise TcskdError(f"torch.onnx cannot export student '{student}': "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        for lg, level in zip(chatty, levels):
            lg.setLevel(level)
    opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
    checked = importlib.util.find_spec("onnxruntime") is not None
    if checked:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"x": probe.numpy()})[0]
        _check_logits(ref, torch.from_numpy(got), "ONNX Runtime")
    else:
        log.warning("onnxruntime is not installed: the ONNX model's logits are not checked")
    return {"format": "onnx", "opset": int(opset), "input_name": "x", "output_name": "logits",
            "load": "onnxruntime.InferenceSession(FILE).run(['logits'], {'x': x})", "checked_with_onnxruntime": checked}
