"""The learning curves of a training run (``curves.png``): loss parts and validation top-1 per epoch."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """The metric rows of ``metrics.jsonl`` as two panels (losses, validation top-1), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [r["epoch"] for r in rows]
    shown = [k for k in ("loss", "loss_ce", "loss_mimic", "loss_elsh") if any(r.get(k) for r in rows)]
    for key in shown:
        a.plot(ep, [r[key] for r in rows], label=key, marker="." if len(rows) < 20 else None)
    if all(r[k] > 0 for r in rows for k in shown):
        a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend(fontsize=8)
    acc = [(r["epoch"], r["val_top1"]) for r in rows if r.get("val_top1") is not None]
    if acc:
        b.plot([e for e, _ in acc], [v for _, v in acc], marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel("validation top-1")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
