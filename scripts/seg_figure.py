"""The README's picture of predicted masks: input, truth and each run's prediction on test images.

    python scripts/seg_figure.py RUN_DIR [RUN_DIR ...] --names CE,"dense TCS" --out docs/mnist-seg-masks.png

Each run is a finished ``tcskd train --task segment`` run; the images are the first ``--n`` of the
data's test split (the runs' own data spec unless ``--data`` is given), at each run's input size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tcskd.data import open_source
from tcskd.train.export import ExportedSegmenter, load_run
from tcskd.views import apply_mask_view, apply_view, center_params, to_tensor


def predict(run: str, images: list[np.ndarray]) -> tuple[np.ndarray, int]:
    student, head, meta = load_run(run)
    model = ExportedSegmenter(student, head.pixel_classifier).eval()
    size = int(meta["image_size"])
    x = torch.stack([apply_view(to_tensor(im), center_params(*im.shape[:2]), size) for im in images])
    with torch.no_grad():
        return model(x).argmax(1).numpy(), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--names", required=True, help="comma-separated column titles, one per run")
    ap.add_argument("--data", default="builtin:mnist-seg")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--out", default="docs/mnist-seg-masks.png")
    args = ap.parse_args()
    names = args.names.split(",")
    if len(names) != len(args.runs):
        raise SystemExit(f"seg_figure: {len(args.runs)} runs but {len(names)} names")
    src = open_source(args.data, "test")
    rows = np.arange(min(args.n, len(src)))
    images = [src.image(int(i)) for i in rows]
    preds = [predict(r, images) for r in args.runs]
    size = preds[0][1]
    truth = [apply_mask_view(torch.from_numpy(src.mask(int(i))), center_params(*images[j].shape[:2]), size).numpy()
             for j, i in enumerate(rows)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    k = src.num_classes
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: k - 1]
    cmap = ListedColormap(np.vstack([[0, 0, 0, 1], colours, [0.5, 0.5, 0.5, 1]]))  # background, digits, ignore
    show = lambda m: np.where(m == 255, k, m)
    cols = ["input", "truth", *names]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.6 * len(rows)), squeeze=False)
    for j in range(len(rows)):
        panels = [images[j][..., 0], show(truth[j]), *(show(p[0][j]) for p in preds)]
        for c, (ax, panel) in enumerate(zip(axes[j], panels)):
            if c == 0:
                ax.imshow(panel, cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(panel, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(cols[c], fontsize=9)
    fig.suptitle(f"{args.data} test images: colours are classes 0-9, black background, grey ignored rim", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
