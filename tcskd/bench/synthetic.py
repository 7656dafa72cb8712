"""Inputs the benchmarks make at run time: synthetic CIFAR-like images, random-weight DINOv2 teachers, and a
large store whose features are a real cache's tiled (for the basis at scale without running the teacher)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcskd.store.backends import open_store
from tcskd.store.layout import create_store
from tcskd.store.manifest import Manifest
from tcskd.store.registry import cache_key
from tcskd.errors import TcskdError

#: DINOv2 architectures (hidden size, layers, heads; MLP ratio 4, patch 14, 224 px).
DINOV2 = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


def make_synthetic_npz(path: Path, n: int, size: int = 32, channels: int = 3, classes: int = 10,
                       seed: int = 0) -> str:
    """CIFAR-like uint8 images (smooth random blobs, so resizing sees real structure); a ``npz:`` spec."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, channels), dtype=np.uint8)
    x = np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2)
    x = np.clip(x.astype(np.int16) + rng.integers(-16, 17, x.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def make_dinov2(path: Path, arch: str, image_size: int = 224, **overrides: Any) -> str:
    """A randomly initialised DINOv2-architecture model saved with transformers; an ``hf:`` spec."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        raise TcskdError("the gpu profile needs transformers (DINOv2 teachers)") from None
    kw = dict(DINOV2.get(arch, {}))
    kw.update(overrides)
    config = Dinov2Config(image_size=image_size, patch_size=14, mlp_ratio=4, **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Dinov2Model(config).eval()
    path = Path(path)
    model.save_pretrained(str(path))
    del model
    return f"hf:{path}"


def make_tiled_store(src: str | Path, dst: Path, rows: int) -> str:
    """A cache of ``rows`` rows whose features are ``src``'s tiled (same schema, chunking and codec).

    The basis stage's cost per row does not depend on the values, so this measures
    ``tcskd basis`` on a store large enough for reading to outweigh its fixed costs
    (eigh, writing, the plot) without running the teacher over ``rows`` images. Its identity records
    ``bench_tiled_rows``, so its key (the hash of the identity) is its own."""
    with open_store(Path(src)) as s:
        x = np.asarray(s.read("features"))
        manifest = Manifest.read(s)
        fmt = s.format
    n = x.shape[0]
    ch = int(manifest.chunk_rows)
    identity = {**manifest.identity, "bench_tiled_rows": rows}
    # a cache of its own: readers check the key
    manifest = dataclasses.replace(manifest, n_rows=rows, complete=False, skipped=[], identity=identity,
                                   key=cache_key(identity))
    dst.parent.mkdir(parents=True, exist_ok=True)
    st = create_store(dst, manifest, fmt)
    try:
        for start in range(0, rows, ch):
            stop = min(rows, start + ch)
            st["features"][start:stop] = x[np.arange(start, stop) % n]
        st["labels"][...] = -1
        st["sample_index"][...] = np.arange(rows)
        st["view_params"][...] = 0
        st["row_ok"][...] = True
        st["chunk_done"][...] = True
        st.set_attrs({"complete": True})
        st.flush()
    finally:
        st.close()
    return str(dst)


def make_jpeg_folder(root: Path, n: int, width: int = 500, height: int = 375, classes: int = 10,
                     quality: int = 90, seed: int = 0) -> str:
    """``n`` photo-like JPEGs of ``width`` x ``height`` in ``root/train/<class>/`` (an ``imagefolder:`` spec).

    Each image is a random window of one textured canvas (smooth colour fields at four scales, like a
    photo's regions and edges) plus luminance grain of a per-image strength, encoded at ``quality``: at
    500 x 375 and quality 90 the files are 60 to 100 KB, as ImageNet's photos are, so decoding costs what it
    costs on real data. Seeded: the same arguments give the same bytes.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    ch, cw = 2 * height + 64, 2 * width + 64
    canvas = np.full((ch, cw, 3), 128.0, np.float32)
    for cells, amp in ((6, 90), (24, 40), (96, 25), (400, 18)):
        low = rng.normal(0, 1, (max(2, cells * ch // cw), cells, 3)).astype(np.float32)
        field = Image.fromarray(np.clip(low * 40 + 128, 0, 255).astype(np.uint8)).resize((cw, ch), Image.BICUBIC)
        canvas += (np.asarray(field, np.float32) - 128) * (amp / 64)
    grain = rng.normal(0, 1, (ch, cw, 1)).astype(np.float32)
    root = Path(root)
    for c in range(classes):
        (root / "train" / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y, x = int(rng.integers(0, ch - height + 1)), int(rng.integers(0, cw - width + 1))
        gy, gx = int(rng.integers(0, ch - height + 1)), int(rng.integers(0, cw - width + 1))
        img = canvas[y:y + height, x:x + width] + grain[gy:gy + height, gx:gx + width] * rng.uniform(4.0, 12.0)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "train" / f"c{i % classes:02d}" / f"{i:06d}.jpg", "JPEG", quality=quality)
    return f"imagefolder:{root}"
