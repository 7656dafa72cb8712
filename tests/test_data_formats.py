"""The same images as an image folder, WebDataset shards and a Hugging Face dataset (save_to_disk and parquet)
give the same cache (features, labels, sample indices) and the same training run."""

from __future__ import annotations

import json
import tarfile
import io
from pathlib import Path

import numpy as np
import pytest

from tcskd.cache.build import CacheConfig, build_cache
from tcskd.data import open_source
from tcskd.store.backends import open_store

CLASSES = ("ant", "bee", "cat")
PER_CLASS = {"train": 8, "test": 3}


def _images() -> dict[str, list[tuple[np.ndarray, int, str]]]:
    """Per split, in the folder's sorted order: (pixels H x W x 3, label, name); sizes vary per image."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {}
    for split, n in PER_CLASS.items():
        rows = []
        for label, c in enumerate(CLASSES):
            for j in range(n):
                h, w = 14 + j % 3, 18 - j % 4
                rows.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), label, f"{c}/{c}_{j:03d}"))
        out[split] = rows
    return out


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_formats(root: Path) -> dict[str, str]:
    """The images in four formats; returns their data specs."""
    images = _images()
    folder, shards, hf = root / "folder", root / "wds", root / "hf"
    for split, rows in images.items():
        for img, _, name in rows:
            f = folder / split / f"{name}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(_png(img))
        (shards / split).mkdir(parents=True)
        per_shard = 5
        for s in range(0, len(rows), per_shard):
            with tarfile.open(shards / split / f"shard-{s // per_shard:05d}.tar", "w") as tar:
                for k, (img, label, name) in enumerate(rows[s:s + per_shard]):
                    key = f"{s + k:06d}"
                    for ext, data in (("png", _png(img)), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"image": [{"bytes": _png(img), "path": None} for img, _, _ in rows],
                                           "label": [label for _, label, _ in rows]}, features=features)
        for split, rows in images.items()})
    dd.save_to_disk(str(hf / "disk"))
    (hf / "parquet" / "data").mkdir(parents=True)
    for split, ds in dd.items():
        half = len(ds) // 2
        for part, rows in enumerate((range(0, half), range(half, len(ds)))):
            ds.select(rows).to_parquet(str(hf / "parquet" / "data" / f"{split}-{part:05d}-of-00002.parquet"))
    return {"imagefolder": f"imagefolder:{folder}", "wds": f"wds:{shards}", "hfds-disk": f"hfds:{hf / 'disk'}",
            "hfds-parquet": f"hfds:{hf / 'parquet'}"}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("datasets")
    return write_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_sources_agree(formats, split):
    ref = open_source(formats["imagefolder"], split)
    for kind, spec in formats.items():
        src = open_source(spec, split)
        assert len(src) == len(ref), kind
        assert src.indices.tolist() == ref.indices.tolist(), kind
        assert src.labels.tolist() == ref.labels.tolist(), kind
        assert src.num_classes == ref.num_classes == len(CLASSES), kind
        for i in range(len(src)):
            np.testing.assert_array_equal(src.image(i, 3), ref.image(i, 3), err_msg=f"{kind} row {i}")


def test_caches_and_training_agree(formats, tiny_teacher, tmp_path):
    from tcskd.train.config import TrainConfig
    from tcskd.train.loop import train

    root = tmp_path / "caches"
    arrays = {}
    finals = {}
    for kind, spec in formats.items():
        paths = {split: build_cache(CacheConfig(data=spec, teacher=tiny_teacher, split=split, image_size=16,
                                                chunk_rows=8, batch_size=4, device="cpu", cache_root=str(root),
                                                workers=0, order="source")).path
                 for split in ("train", "test")}
        with open_store(paths["train"]) as s:
            arrays[kind] = {name: s.read(name) for name in ("features", "labels", "sample_index", "view_params")}
        out = tmp_path / "runs" / kind
        train(TrainConfig(cache=str(paths["train"]), method="fitnet", student="cnn", epochs=2, batch_size=8,
                          image_size=16, device="cpu", out=str(out), cache_root=str(root), workers=0, seed=0,
                          val_frac=0.25, eval_every=1))
        finals[kind] = json.loads((out / "final.json").read_text())
    for kind in formats:
        for name, ref in arrays["imagefolder"].items():
            assert arrays[kind][name].tobytes() == ref.tobytes(), (kind, name)
        for key in ("val_top1", "test_top1", "knn_top1"):
            assert finals[kind].get(key) == finals["imagefolder"].get(key), (kind, key)
    assert "test_top1" in finals["imagefolder"]
