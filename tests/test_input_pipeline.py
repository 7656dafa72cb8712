"""The input pipeline: ``--workers auto``, the student's uint8 crop path, ``--decode draft``, and results that
do not depend on the number of workers."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from conftest import make_npz
from tcskd.cache.build import CacheConfig, build_cache, plan_cache, teacher_inputs
from tcskd.cache.create import decode_of, identity_of
from tcskd.cache.verify import verify_cache
from tcskd.data import DataError, open_source
from tcskd.data.decode import decode_rgb, decode_rgb_reduced
from tcskd.device import MAX_AUTO_WORKERS, resolve_workers
from tcskd.errors import TcskdError
from tcskd.options import click_options, config_from_params, read_config_file
from tcskd.store.backends import open_store
from tcskd.train.config import TrainConfig
from tcskd.train.data import ViewImages, apply_augment, augment_draws
from tcskd.views import apply_view, center_params, crop_box, draft_reduction, teacher_views, to_tensor, view_params


# -- --workers auto ------------------------------------------------------------------

def test_auto_workers_is_one_less_than_the_usable_cores():
    import os

    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    auto = resolve_workers("auto")
    assert auto == max(0, min(MAX_AUTO_WORKERS, cores - 1))
    assert resolve_workers(None) == auto  # older config files hold workers: null
    if cores > 1:
        assert auto > 0
    assert CacheConfig().workers == "auto" and TrainConfig().workers == "auto"


@pytest.mark.parametrize("cores, local, expected", [(1, None, 0), (2, None, 1), (3, None, 2), (16, None, 15),
                                                   (17, None, 16), (64, None, 16), (64, "8", 7), (16, "8", 1),
                                                   (8, "8", 0), (2, "1", 1)])
def test_auto_workers_formula(monkeypatch, cores, local, expected):
    """One less than the usable cores, at most 16; under torchrun, of this process's share of the node."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert resolve_workers("auto") == expected


@pytest.mark.parametrize("value, expected", [(0, 0), (3, 3), ("5", 5), (" 2", 2)])
def test_workers_as_a_number(value, expected):
    assert resolve_workers(value) == expected


@pytest.mark.parametrize("value, message", [
    (-1, "--workers must be >= 0 (got -1)"), ("-3", "--workers must be >= 0 (got -3)"),
    ("many", "--workers must be auto or a whole number >= 0 (got 'many')"),
    (1.5, "--workers must be auto or a whole number >= 0 (got 1.5)"),
    (True, "--workers must be auto or a whole number >= 0 (got True)")])
def test_bad_workers_are_one_line(value, message):
    for cfg in (CacheConfig(workers=value), TrainConfig(cache="x", workers=value)):
        with pytest.raises(TcskdError) as e:
            cfg.validate()
        assert str(e.value) == message


def test_workers_on_the_command_line_and_in_files(tmp_path):
    seen = {}

    @click.command()
    @click_options(TrainConfig)
    def cmd(**params):
        seen["cfg"] = config_from_params(TrainConfig, params)

    for args, want in (([], "auto"), (["--workers", "3"], 3), (["--workers", "auto"], "auto")):
        r = CliRunner().invoke(cmd, args)
        assert r.exit_code == 0, r.output
        assert seen["cfg"].workers == want
    f = tmp_path / "c.yaml"
    for text, want in (("workers: 2\n", 2), ("workers: auto\n", "auto"), ("workers: null\n", None)):
        f.write_text(text)
        assert read_config_file(TrainConfig, f) == {"workers": want}
    f.write_text("workers: [1]\n")
    with pytest.raises(TcskdError, match="key 'workers' must be an integer or a string or null"):
        read_config_file(TrainConfig, f)
    f.write_text("workers: 2\n")
    assert read_config_file(CacheConfig, f) == {"workers": 2}


# -- the student's inputs: crop and resize in uint8 -------------------------------------------

def _old_apply_augment(x: torch.Tensor, aug: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """The augmentation as it was written before (a gather over a padded batch): the reference."""
    if len(x) == 0 or not bool(aug.any()):
        return x
    squeeze = x.ndim == 3
    x = x[:, None] if squeeze else x
    b, _, s_h, s_w = x.shape
    shift = aug[:, :2].long()
    pad = int(shift.abs().max())
    if pad:
        ys = (shift[:, :1] + pad) + torch.arange(s_h)
        xs = (shift[:, 1:] + pad) + torch.arange(s_w)
        padded = F.pad(x, (pad, pad, pad, pad), value=fill).permute(0, 2, 3, 1)
        x = padded[torch.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
    flip = (aug[:, 2] >= 0.5)[:, None, None, None]
    x = torch.where(flip, x.flip(-1), x).contiguous()
    return x[:, 0] if squeeze else x


def _old_float_inputs(ds: ViewImages, keys: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's inputs and masks exactly as the code before made them (ViewImages._views and
    __getitems__ as they were): the whole image converted to float, then cropped and resized in float, then
    augmented. The reference, strides included (a 1-channel batch's strides pick the conv kernels)."""
    idx = np.array([k[0] for k in keys])
    views = np.array([k[1] for k in keys])
    epochs = np.array([k[2] for k in keys])
    arr = ds.source.images(ds.rows[idx], ds.channels)
    box = ds._shared_box(idx, views, arr.shape[1], arr.shape[2]) if arr is not None else None
    if arr is not None and box is not None:
        u8 = torch.from_numpy(arr).permute(0, 3, 1, 2)
        x = apply_view(u8.float().div_(255.0), box, ds.size).contiguous()
    else:
        xs = []
        for i, view in zip(idx, views):
            img = to_tensor(ds.source.image(int(ds.rows[i]), ds.channels))
            p = center_params(img.shape[1], img.shape[2]) if ds.params is None else ds.params[i, view]
            xs.append(apply_view(img, p, ds.size).contiguous())
        x = torch.stack(xs)
    aug = augment_draws(ds.augment, ds.seed, epochs, idx, min(x.shape[-2:]))
    x = _old_apply_augment(x, aug) if ds.augment != "none" else x
    mask = _old_apply_augment(ds._masks(idx, views), aug, fill=255) if ds.masks else torch.zeros(len(idx), 0)
    return x, mask


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, dtype, shape and strides."""
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


def test_augmentation_moves_the_same_pixels_as_before():
    g = torch.Generator().manual_seed(0)
    for kind in ("crop", "flip", "crop-flip"):
        for shape in ((64, 3, 32, 32), (64, 1, 28, 28), (64, 28, 28), (40, 3, 20, 24)):
            x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
            aug = augment_draws(kind, 1, np.zeros(shape[0], np.int64), np.arange(shape[0]), min(shape[-2:]))
            for fill in (0, 255):
                assert torch.equal(apply_augment(x, aug, fill), _old_apply_augment(x, aug, fill))
                xf = x.float() / 255
                assert torch.equal(apply_augment(xf, aug, fill), _old_apply_augment(xf, aug, fill))
    x = torch.randint(0, 256, (4, 3, 3, 3), dtype=torch.uint8, generator=g)  # shifts beyond the image: all fill
    aug = torch.tensor([[-5.0, 0, 1], [5, 2, 0], [2, -2, 1], [0, 4, 0]])
    assert torch.equal(apply_augment(x, aug, 7), _old_apply_augment(x, aug, 7))


def _keys(n: int, views: int = 1, epoch: int = 3) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1)
    return [(int(i), int(rng.integers(views)), epoch) for i in rng.permutation(n)]


def test_mnist_students_get_bit_identical_inputs():
    """``make demo``: 28 px students on 28 px MNIST digits, augmentation ``crop`` (no resize): the uint8 path
    gives the very same floats as converting the whole image first, whole batches and image by image."""
    src = open_source("builtin:mnist5k", "train")
    rows = np.arange(0, 640, 5)
    for augment in ("crop", "none", "crop-flip"):
        for source in (src, dataclasses.replace(src, load_many=None)):
            ds = ViewImages(source, rows, 28, 1, augment=augment, seed=4)
            keys = _keys(len(rows))
            got = ds.__getitems__(keys).x
            assert got.dtype == torch.float32 and got.shape == (len(rows), 1, 28, 28)
            assert _same(got, _old_float_inputs(ds, keys)[0]), augment


def test_segmentation_inputs_and_masks_are_as_before():
    """builtin:mnist-seg (1-channel canvases with masks), augmented: images and masks as before, bit for bit."""
    src = open_source("builtin:mnist-seg", "train")
    rows = np.arange(48)
    size = min(src.image(0).shape[:2])
    for source in (src, dataclasses.replace(src, load_many=None, masks=None,
                                            load_mask=lambda i: src.masks(np.asarray([i]))[0])):
        ds = ViewImages(source, rows, size, 1, augment="crop-flip", seed=1, masks=True,
                        mask_rows=np.arange(48) % 3 > 0)
        keys = _keys(len(rows))
        b = ds.__getitems__(keys)
        x, mask = _old_float_inputs(ds, keys)
        assert _same(b.x, x) and _same(b.mask, mask)


def test_uint8_inputs_equal_the_float_ones_without_resize_and_within_a_level_with_it(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n=24, size=40, channels=3)
    src = open_source(npz, "train")
    rows = np.arange(len(src))
    params = np.stack([view_params(int(i), 40, 40, 3, 0) for i in src.indices])
    keys = _keys(len(rows), views=3)
    for source in (src, dataclasses.replace(src, load_many=None)):
        same = ViewImages(source, rows, 40, 3, augment="crop-flip", seed=2)  # centre crop of 40 px: no resize
        assert _same(same.__getitems__(keys).x, _old_float_inputs(same, keys)[0])
        for size in (24, 56):  # stored random views, resized down and up
            ds = ViewImages(source, rows, size, 3, params=params, seed=2)
            diff = (ds.__getitems__(keys).x - _old_float_inputs(ds, keys)[0]).abs()
            # uint8 resizing rounds to whole levels (after each of its two passes): at most one level off
            assert float(diff.max()) <= 1.01 / 255 and float(diff.mean()) < 0.5 / 255
            assert float(diff.max()) > 0  # the two paths do differ there: the check above is not vacuous


def test_online_teacher_inputs_are_the_cache_stages(tmp_path):
    """Method online: the teacher's input is exactly the cache stage's (uint8 crop and resize)."""
    npz = make_npz(tmp_path / "d.npz", n=12, size=20, channels=3)
    src = open_source(npz, "train")
    params = np.stack([view_params(int(i), 20, 20, 2, 0) for i in src.indices])
    keys = _keys(len(src), views=2)
    for source in (src, dataclasses.replace(src, load_many=None)):
        ds = ViewImages(source, np.arange(len(src)), 16, 3, params=params, teacher_size=32)
        tx = ds.__getitems__(keys).teacher_x
        want = torch.stack([teacher_views(src.image(i, 3), params[i, v:v + 1], 32)[0] for i, v, _ in keys])
        assert tx.dtype == torch.uint8 and torch.equal(tx, want)


# -- --decode draft -------------------------------------------------------------------

def _jpeg(path: Path, w: int, h: int, seed: int = 0, quality: int = 90) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)
    return path


@pytest.mark.parametrize("h, w, size, boxes, expected", [
    (768, 1024, 224, [], 2),        # centre 768 px: 384 at 1/2, 192 < 224 at 1/4
    (768, 1024, 96, [], 8),         # 96 px at 1/8: just enough
    (768, 1024, 97, [], 4),
    (375, 500, 224, [], 1),         # 188 < 224 at 1/2: decoded whole
    (375, 500, 112, [], 2),         # 94 < 112 at 1/4
    (1536, 2048, 224, [], 4),
    (768, 1024, 112, [(0.1, 0.2, 0.3, 0.3, 1.0)], 2),  # a 230 x 307 view caps the centre's 1/4 at 1/2
    (768, 1024, 112, [(0.0, 0.0, 0.1, 0.5, 0.0)], 1),  # a 77 px tall view: no reduction
])
def test_draft_reduction_is_the_largest_that_keeps_every_crop(h, w, size, boxes, expected):
    params = np.concatenate([center_params(h, w)[None], np.asarray(boxes, np.float32).reshape(-1, 5)])
    r = draft_reduction(params, h, w, size)
    assert r == expected
    if r > 1:  # reduced only where every view keeps the teacher's size
        rh, rw = -(-h // r), -(-w // r)
        assert all(min(crop_box(p, rh, rw)[2:]) >= size for p in params)
    if r < 8:  # the next reduction would cut some view below the teacher's size
        nh, nw = -(-h // (2 * r)), -(-w // (2 * r))
        assert any(min(crop_box(p, nh, nw)[2:]) < size for p in params)


def test_reduced_jpeg_decode(tmp_path):
    data = _jpeg(tmp_path / "a.jpg", 1000, 750).read_bytes()
    asked = []
    for s in (1, 2, 4, 8):
        got = decode_rgb_reduced(data, "a.jpg", lambda h, w: asked.append((h, w)) or s)
        assert got.full_size == (750, 1000) and got.reduction == s
        assert got.image.shape == (-(-750 // s), -(-1000 // s), 3) and got.image.dtype == np.uint8
    assert asked == [(750, 1000)] * 4
    assert np.array_equal(decode_rgb_reduced(data, "a.jpg", lambda h, w: 1).image, decode_rgb(data, "a.jpg"))
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    png = decode_rgb_reduced(buf.getvalue(), "a.png", lambda h, w: pytest.fail("a PNG is never reduced"))
    assert png.reduction == 1 and np.array_equal(png.image, decode_rgb(buf.getvalue(), "a.png"))
    with pytest.raises(DataError, match="unreadable image broken.jpg"):
        decode_rgb_reduced(data[:200], "broken.jpg", lambda h, w: 2)


def test_draft_is_part_of_the_cache_key_only_when_asked(tmp_path):
    full, draft = CacheConfig(), CacheConfig(decode="draft")
    a = identity_of(full, "fp", {"spec": "t"})
    b = identity_of(draft, "fp", {"spec": "t"})
    assert "decode" not in a and {k: v for k, v in b.items() if k != "decode"} == a
    assert decode_of(a) == "full" and decode_of(b) == "draft"
    keys = {plan_cache(CacheConfig(image_size=112, decode=d))[2] for d in ("full", "draft")}
    assert len(keys) == 2
    with pytest.raises(TcskdError, match="unknown --decode 'fast'"):
        CacheConfig(decode="fast").validate()


def _folder(root: Path, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        p = root / "train" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return f"imagefolder:{root}"


def _features(res) -> np.ndarray:
    with open_store(res.path) as s:
        return np.asarray(s.read("features"), np.float32)


def test_draft_falls_back_to_a_full_decode_for_other_formats(tmp_path, tiny_teacher):
    """PNGs (and any image that is not a JPEG) decode whole under --decode draft: the same features."""
    from PIL import Image

    files = {}
    for i in range(6):
        buf = io.BytesIO()
        Image.open(_jpeg(tmp_path / "src" / f"{i}.jpg", 96, 64, seed=i)).save(buf, "PNG")
        files[f"c{i % 2}/{i}.png"] = buf.getvalue()
    data = _folder(tmp_path / "png", files)
    base = dict(data=data, teacher=tiny_teacher, image_size=16, views=3, batch_size=4, chunk_rows=4,
                cache_root=str(tmp_path / "c"), device="cpu", workers=0, dtype="float32")
    full, draft = build_cache(CacheConfig(**base)), build_cache(CacheConfig(**base, decode="draft"))
    assert full.key != draft.key
    assert np.array_equal(_features(full), _features(draft))


def test_draft_cache_views_and_verify(tmp_path, tiny_teacher):
    """A draft cache stores the views drawn from the full size, its images are decoded reduced, and
    ``tcskd cache verify`` recomputes its rows the way they were made."""
    files = {f"c{i % 2}/{i}.jpg": _jpeg(tmp_path / "src" / f"{i}.jpg", 320, 240, seed=i).read_bytes()
             for i in range(6)}
    data = _folder(tmp_path / "jpg", files)
    base = dict(data=data, teacher=tiny_teacher, image_size=16, views=2, batch_size=4, chunk_rows=4,
                cache_root=str(tmp_path / "c"), device="cpu", workers=0, dtype="float32")
    full, draft = build_cache(CacheConfig(**base)), build_cache(CacheConfig(**base, decode="draft"))
    with open_store(full.path) as a, open_store(draft.path) as b:
        assert np.array_equal(a.read("view_params"), b.read("view_params"))  # same views
    src = open_source(data, "train")
    ds = teacher_inputs(src, CacheConfig(**base, decode="draft"), 16)
    row, x, _, params, err = ds[0]
    assert not err and x.shape == (2, 3, 16, 16)
    r = draft_reduction(params.numpy(), 240, 320, 16)
    assert r == 8  # every view of 240 x 320 is >= 16 px at 1/8
    small = decode_rgb_reduced(src.encoded(0), "0", lambda h, w: r).image
    assert torch.equal(x, teacher_views(small, params.numpy(), 16))
    assert not np.array_equal(_features(full), _features(draft))
    report = verify_cache(draft.path, recompute=4, device="cpu")
    assert report.ok and report.recomputed_rows == 4 and report.max_rel_error < 1e-4


def _photos(size: tuple[int, int] | None = None) -> dict[str, bytes]:
    """Real photographs (scikit-learn's sample images, 640 x 427 JPEGs) as they are, or resized (Lanczos) to
    ``size`` (W, H) and encoded as JPEGs of quality 90."""
    from PIL import Image

    sk = pytest.importorskip("sklearn.datasets")
    out = {}
    for name in ("china.jpg", "flower.jpg"):
        data = (Path(sk.__file__).parent / "images" / name).read_bytes()
        if size is not None:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.LANCZOS).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
        out[f"c0/{name}"] = data
    return out


@pytest.mark.parametrize("size, photo_size", [(112, None), (224, (1024, 768))])
def test_draft_features_are_close_to_full_ones(tmp_path, size, photo_size):
    """The built-in teacher on two real photographs, decoded at 1/2: at 112 px from the 640 x 427 originals,
    at its own 224 px from the photos at 1024 x 768 (the centre view). scripts/draft_cosine.py measures more."""
    from tcskd.cache.build import teacher_forward
    from tcskd.teachers import load_teacher

    source = open_source(_folder(tmp_path / "photos", _photos(photo_size)), "train")
    teacher = load_teacher("builtin:efficientnet-lite0", size)
    feats = {}
    for decode in ("full", "draft"):
        ds = teacher_inputs(source, CacheConfig(decode=decode), size)
        items = [ds[i] for i in range(len(source))]
        feats[decode] = teacher_forward(teacher, torch.stack([it[1] for it in items]), torch.device("cpu"))[:, 0]
    h, w = (427, 640) if photo_size is None else photo_size[::-1]
    assert draft_reduction(center_params(h, w)[None], h, w, size) == 2
    cos = F.cosine_similarity(feats["full"], feats["draft"], dim=1)
    assert float(cos.min()) > 0.99 and not torch.equal(feats["full"], feats["draft"])


# -- the number of workers changes nothing ----------------------------------------------------

@pytest.mark.slow
def test_worker_count_changes_neither_the_cache_nor_training(tmp_path, tiny_teacher):
    from tcskd.subspace.fit import BasisConfig, fit_basis
    from tcskd.train.loop import train

    files = {f"c{i % 3}/{i:02d}.jpg": _jpeg(tmp_path / "src" / f"{i}.jpg", 64 + 8 * (i % 3), 48, seed=i).read_bytes()
             for i in range(30)}
    data = _folder(tmp_path / "jpg", files)
    caches = []
    for w in (0, 2):
        cfg = CacheConfig(data=data, teacher=tiny_teacher, image_size=16, views=2, batch_size=4, chunk_rows=8,
                          cache_root=str(tmp_path / f"c{w}"), device="cpu", workers=w, decode="draft")
        caches.append(build_cache(cfg))
    with open_store(caches[0].path) as a, open_store(caches[1].path) as b:
        for name in ("features", "view_params", "sample_index", "labels", "row_ok"):
            assert np.array_equal(a.read(name), b.read(name)), name
    fit_basis(BasisConfig(cache=str(caches[0].path), name="pca", dim=4, device="cpu", plot=False))
    runs = {}
    for w in (0, 2):
        out = tmp_path / f"run{w}"
        train(TrainConfig(cache=str(caches[0].path), student="cnn", image_size=24, epochs=2, batch_size=8,
                          dim=4, device="cpu", workers=w, out=str(out), tailor="off", val_frac=0.2))
        runs[w] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["workers"] == w and saved["resolved"]["workers"] == w
    for key in ("loss", "loss_ce", "loss_mimic"):
        assert [r[key] for r in runs[0]] == [r[key] for r in runs[2]], key
