"""What ``tcskd cache --decode draft`` does to a teacher's features, and what it saves, on real photographs.

The photographs available offline: scikit-learn's sample images (china, flower) and, when scikit-image is
installed, its colour photos (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry,
retina) and greyscale ones (camera, grass, gravel, brick; as RGB). Each is centre-cropped to 4:3, resized
(Lanczos) to each ``--sizes`` entry and encoded as a JPEG of ``--quality`` into an image folder; both decoders
then give the cache stage's teacher inputs (``tcskd.cache.build.teacher_inputs``, the views of ``tcskd
cache --views V``) and the teacher's features (``teacher_forward``). Printed per size, teacher input and
views: the reductions the draft decoder chose, the cosine similarity between full and draft features
(mean, min over images x views) and the CPU time of decode + views per image (one thread, best of
``--repeats``), full and draft, and their ratio.

    python scripts/draft_cosine.py                     # builtin:efficientnet-lite0 at 224 px, 1 and 4 views
    python scripts/draft_cosine.py --image-size 112 --sizes 500x375,1024x768

Sizes above a photo's own are upscaled (most of these photos are 400-640 px wide): an upscaled photo has
less fine detail than a camera's, which flatters the draft decoder; the table says how many were.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def photos() -> dict[str, np.ndarray]:
    """name -> H x W x 3 uint8, every photograph this machine has offline."""
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    out = {Path(f).stem: img for f, img in zip(sk.filenames, sk.images)}
    try:
        from skimage import data
    except ImportError:
        print("(scikit-image is not installed: the two scikit-learn photos only)")
        return out
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "camera", "grass", "gravel", "brick"):
        img = np.asarray(getattr(data, name)())
        out[name] = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
    return out


def write_folder(root: Path, images: dict[str, np.ndarray], width: int, height: int, quality: int) -> int:
    """The photos as ``root/train/photo/<name>.jpg`` at width x height; returns how many were upscaled."""
    from PIL import Image

    folder = root / "train" / "photo"
    folder.mkdir(parents=True, exist_ok=True)
    upscaled = 0
    for name, img in images.items():
        h, w = img.shape[:2]
        if w * 3 > h * 4:   # wider than 4:3: cut the sides
            cw, ch = h * 4 // 3, h
        else:
            cw, ch = w, w * 3 // 4
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        crop = Image.fromarray(np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw]))
        upscaled += cw < width
        crop.resize((width, height), Image.LANCZOS).save(folder / f"{name}.jpg", "JPEG", quality=quality)
    return upscaled


def inputs_and_time(ds, n: int, repeats: int) -> tuple[torch.Tensor, np.ndarray, float]:
    """(the teacher inputs N x V x C x S x S, the view params, best CPU ms per image of decode + views)."""
    best = float("inf")
    [ds[i] for i in range(n)]  # warm-up: the files in the page cache, the libraries loaded
    for _ in range(repeats):
        t = time.process_time()
        items = [ds[i] for i in range(n)]
        best = min(best, (time.process_time() - t) / n * 1e3)
    bad = [e for *_, e in items if e]
    if bad:
        raise SystemExit(bad[0])
    return torch.stack([it[1] for it in items]), np.stack([it[3].numpy() for it in items]), best


def main() -> None:
    from tcskd.cache.build import teacher_forward, teacher_inputs
    from tcskd.cache.config import CacheConfig
    from tcskd.data import open_source
    from tcskd.teachers import load_teacher
    from tcskd.views import draft_reduction

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="builtin:efficientnet-lite0")
    ap.add_argument("--image-size", type=int, default=None, help="teacher input (default: the teacher's)")
    ap.add_argument("--sizes", default="500x375,1024x768", help="JPEG sizes, WxH,...")
    ap.add_argument("--views", default="1,4", help="views per image (tcskd cache --views), comma list")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's decode runs on one thread
    teacher = load_teacher(args.teacher, args.image_size)
    size = teacher.image_size
    images = photos()
    print(f"{len(images)} photos ({', '.join(images)}); teacher {args.teacher} at {size} px; JPEG quality "
          f"{args.quality}; CPU ms per image: decode + views, one thread, best of {args.repeats}\n")
    print("| JPEG size | views | upscaled | reductions (1/2/4/8) | cosine mean | cosine min (photo) | full ms | "
          "draft ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for wh in args.sizes.split(","):
            width, height = (int(v) for v in wh.lower().split("x"))
            root = Path(tmp) / wh
            upscaled = write_folder(root, images, width, height, args.quality)
            source = open_source(f"imagefolder:{root}", "train")
            n = len(source)
            for views in (int(v) for v in args.views.split(",")):
                got = {}
                for decode in ("full", "draft"):
                    ds = teacher_inputs(source, CacheConfig(views=views, decode=decode), size)
                    x, params, ms = inputs_and_time(ds, n, args.repeats)
                    feats = teacher_forward(teacher, x, torch.device("cpu")).reshape(n * views, -1)
                    got[decode] = (feats, params, ms)
                a, b = got["full"][0], got["draft"][0]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()
                red = [draft_reduction(p, height, width, size) for p in got["draft"][1]]
                hist = "/".join(str(red.count(r)) for r in (1, 2, 4, 8))
                full_ms, draft_ms = got["full"][2], got["draft"][2]
                worst = Path(source.describe(int(cos.argmin()) // views)).stem
                print(f"| {width}x{height} | {views} | {upscaled}/{n} | {hist} | {cos.mean():.4f} | {cos.min():.4f} "
                      f"({worst}) | "
                      f"{full_ms:.2f} | {draft_ms:.2f} | {full_ms / draft_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
