"""Export a trained run as a plain student: images in [0, 1] -> logits.

The TCS head is a training-time device. When the classifier reads the
student's feature ``f`` directly, the projector, the mask and the gate (which
only shape the training signal) are dropped; when it reads the predicted
coordinates, classifier, mask, gate and projector are linear and merge into
one linear layer (TCSHead.inference_classifier). Either way what is left is
``classifier(student(x))``: the student's own cost, nothing added.

Format: a ``torch.export`` program (``.pt2``; TorchScript is deprecated) of
the student + linear classifier in eval mode, with a dynamic batch size, at
the run's input size. Load it without tcskd:
``torch.export.load(FILE).module()(x)``. Beside it ``FILE.json`` describes the
model (student name, input size and channels, classes, input range, the
run's metrics). :func:`export_run` checks that the exported module reproduces
the training model's logits before it returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

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


def load_run(run_dir: Path | str) -> tuple[Student, TCSHead, dict[str, Any]]:
    """The student and head of a run's checkpoint (eval mode, CPU) and its meta."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise TcskdError(f"{run_dir} has no {CHECKPOINT} (not a tcskd run directory?)")
    ck = load_checkpoint(path)
    meta = ck["meta"]
    student = make_student(meta["student"], meta["num_classes"], meta["in_channels"])
    head = TCSHead(student.feature_dim, meta["num_classes"], meta["k"], meta.get("classify_from", "feature"))
    student.load_state_dict(ck["student"])
    head.load_state_dict(ck["head"])
    student.eval()
    head.eval()
    meta = dict(meta, epoch=ck["epoch"], epochs=ck["config"]["epochs"])
    return student, head, meta


def export_run(run_dir: Path | str, out_file: Path | str) -> Path:
    """Write the run's student as a torch.export program to ``out_file`` (+ ``out_file.json``); return the path."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    student, head, meta = load_run(run_dir)
    if meta["epoch"] < meta["epochs"]:
        log.warning("%s stopped after epoch %d of %d: exporting the unfinished model",
                    run_dir, meta["epoch"], meta["epochs"])
    model = ExportedStudent(student, head.inference_classifier()).eval()
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
        ref, _ = head(student(probe))
        got = program.module()(probe)
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):  # a merged head sums in another order
        raise TcskdError(f"export check failed: exported logits differ by {float((ref - got).abs().max()):.3g}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{out_file.name}")
    torch.export.save(program, str(tmp))
    tmp.replace(out_file)
    final = run_dir / "final.json"
    info = {
        "format": "torch.export", "load": "torch.export.load(FILE).module()", "input": "B x C x S x S float in [0, 1]",
        "output": "B x num_classes logits", "student": meta["student"], "in_channels": ch, "image_size": size,
        "num_classes": meta["num_classes"], "feature_dim": student.feature_dim, "method": meta.get("method"),
        "dim": meta.get("k"), "classify_from": meta.get("classify_from", "feature"), "run_dir": str(run_dir),
        "final": json.loads(final.read_text()) if final.exists() else None,
    }
    Path(str(out_file) + ".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("exported %s -> %s", run_dir, out_file)
    return out_file
