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
