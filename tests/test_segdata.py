"""Segmentation data: masks through views, builtin:mnist-seg, npz masks and mask folders (and their errors)."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from tcskd import segdata
from tcskd.data import (DataError, _mnist_arrays, fingerprint, mnist5k_split, mnist_seg_split, open_source,
                        sha256_file)
from tcskd.data.builtin import _mnist_file
from tcskd.views import apply_mask_view, apply_view, center_params, view_params


# -- apply_mask_view ---------------------------------------------------------

def _blocky(h, w, block, seed):
    """A mask of random class ids constant on block x block tiles, and an image whose grey value encodes it."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 12, (h // block + 1, w // block + 1)).astype(np.uint8)
    mask = np.kron(tiles, np.ones((block, block), np.uint8))[:h, :w]
    return mask, mask * 20  # grey = 20 x class id


def _far_from_edges(mask_view):
    """Pixels whose 5 x 5 neighbourhood in the rendered mask holds one class (away from block edges)."""
    m = mask_view.numpy().astype(np.int64)
    pad = np.pad(m, 2, mode="edge")
    same = np.ones_like(m, bool)
    for dy in range(5):
        for dx in range(5):
            same &= pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] == m
    return same


@pytest.mark.parametrize("h,w,size", [(96, 80, 32), (64, 64, 48), (40, 56, 64)])
def test_mask_view_follows_the_image_view(h, w, size):
    mask, img = _blocky(h, w, block=24, seed=h + w)
    img_t = torch.from_numpy(img)[None]  # 1 x H x W uint8
    params = view_params(7, h, w, views=8, seed=3)
    assert params[1:, 4].min() == 0 and params[1:, 4].max() == 1  # both flips among the views
    for p in params:
        view_img = apply_view(img_t, p, size)[0].numpy().astype(np.int64)
        view_mask = apply_mask_view(torch.from_numpy(mask), p, size)
        assert view_mask.shape == (size, size) and view_mask.dtype == torch.uint8
        inner = _far_from_edges(view_mask)
        assert inner.mean() > 0.3
        decoded = np.round(view_img / 20.0)
        assert np.array_equal(decoded[inner], view_mask.numpy()[inner].astype(np.int64)), p
        # a batch of masks sharing one box comes out as each alone
        both = apply_mask_view(torch.from_numpy(np.stack([mask, 11 - mask])), p, size)
        assert torch.equal(both[0], view_mask) and torch.equal(both[1], apply_mask_view(torch.from_numpy(11 - mask), p, size))


def test_mask_view_identity_and_no_new_classes():
    mask, _ = _blocky(30, 30, block=4, seed=1)
    mask[0, :5] = 255
    t = torch.from_numpy(mask)
    assert torch.equal(apply_mask_view(t, center_params(30, 30), 30), t)
    flipped = apply_mask_view(t, np.array([0, 0, 1, 1, 1.0], np.float32), 30)
    assert torch.equal(flipped, t.flip(-1))
    out = apply_mask_view(t, view_params(2, 30, 30, 3, seed=0)[2], 57)
    assert set(np.unique(out.numpy())) <= set(np.unique(mask))


# -- builtin:mnist-seg --------------------------------------------------------

def test_mnist_seg_sources_have_masks_and_documented_counts():
    tr, te, al = (open_source("builtin:mnist-seg", s) for s in ("train", "test", "all"))
    assert (len(tr), len(te), len(al)) == (2000, 500, 2500)
    assert tr.has_masks and tr.num_classes == 11 and tr.channels == 1
    assert (tr.labels == -1).all()
    assert np.array_equal(al.indices, np.arange(2500)) and np.array_equal(te.indices, np.arange(2000, 2500))
    img, m = tr.image(5), tr.mask(5)
    assert img.shape == (64, 64, 1) and img.dtype == np.uint8 and m.shape == (64, 64) and m.dtype == np.uint8
    assert np.array_equal(tr.masks(np.array([5, 6])), np.stack([tr.mask(5), tr.mask(6)]))
    assert np.array_equal(al.image(2003), te.image(3)) and np.array_equal(al.mask(2003), te.mask(3))
    counts = (mnist_seg_split("train").digits >= 0).sum(1)
    assert [int((counts == k).sum()) for k in (1, 2, 3)] == [667, 666, 667]
    assert not open_source("builtin:mnist5k").has_masks
    with pytest.raises(DataError, match="has no masks"):
        open_source("builtin:mnist5k").mask(0)


def test_mnist_seg_fingerprint_is_mnist_file_and_version():
    fp = fingerprint("builtin:mnist-seg")
    assert fp == open_source("builtin:mnist-seg", "test").fingerprint
    assert fp != sha256_file(_mnist_file()) and fp != fingerprint("builtin:mnist5k")
    assert fp == hashlib.sha256(f"{sha256_file(_mnist_file())}:{segdata.MNIST_SEG_VERSION}".encode()).hexdigest()


def test_mnist_seg_is_the_same_in_another_process():
    code = ("import hashlib; from tcskd.data import mnist_seg_split as f; c = f('train'); t = f('test');"
            "print(hashlib.sha256(c.images.tobytes() + c.masks.tobytes() + t.images.tobytes() + t.masks.tobytes()"
            " + c.digits.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    c, t = mnist_seg_split("train"), mnist_seg_split("test")
    here = hashlib.sha256(c.images.tobytes() + c.masks.tobytes() + t.images.tobytes() + t.masks.tobytes()
                          + c.digits.tobytes()).hexdigest()
    assert out == here
    # and a different seed draws different canvases
    x, y, _ = _mnist_arrays()
    rows = mnist5k_split(y)[1]
    assert not np.array_equal(segdata.compose_mnist_seg(x, y, rows, 9).images, t.images)


def test_mnist_seg_uses_each_split_digit_once_and_only_its_own():
    _, y, _ = _mnist_arrays()
    train_rows, test_rows = mnist5k_split(y)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        d = mnist_seg_split(split).digits
        used = d[d >= 0]
        assert len(used) == len(np.unique(used)) == len(rows)
        assert set(used.tolist()) == set(rows.tolist())
    assert not set(mnist_seg_split("train").digits.ravel().tolist()) & set(test_rows.tolist())


def test_mnist_seg_masks_agree_with_ink_and_digits():
    x, y, _ = _mnist_arrays()
    c = mnist_seg_split("test")
    img = c.images[..., 0]
    ink = (c.masks >= 1) & (c.masks <= 10)
    assert np.array_equal(ink, img >= segdata.INK)                  # ink is exactly the bright pixels
    assert np.array_equal(c.masks == 0, img < segdata.RIM)          # background exactly the dark ones
    assert np.array_equal(c.masks == 255, (img >= segdata.RIM) & (img < segdata.INK))
    assert set(np.unique(c.masks).tolist()) == set(range(11)) | {255}
    assert (img[c.masks == 0] > 0).mean() > 0.5                      # a textured, not a black, background
    for n in range(len(c.digits)):
        on = c.digits[n][c.digits[n] >= 0]
        present = set(np.unique(c.masks[n]).tolist()) - {0, 255}
        assert present == {1 + int(y[r]) for r in on}, n
        # each digit's ink is one piece of the canvas: as many ink pixels as the digit (rescaled) brings
        assert ink[n].sum() > 20 * len(on)


def test_mnist_seg_classes_are_roughly_balanced():
    _, y, _ = _mnist_arrays()
    c = mnist_seg_split("train")
    used = c.digits[c.digits >= 0]
    assert np.array_equal(np.bincount(y[used], minlength=10), np.bincount(y[mnist5k_split(y)[0]], minlength=10))
    pixels = np.bincount(c.masks.ravel(), minlength=256)[1:11].astype(float)
    share = pixels / pixels.sum()
    assert share.min() > 0.1 / 3 and share.max() < 0.1 * 3   # within a factor 3 of uniform ("1" is thin)
    assert pixels.argmin() == 1                                # the thinnest digit ("1") has the fewest pixels


def test_digit_counts_sum_and_shape():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000, 4001):
        counts = segdata.digit_counts(n, rng)
        assert counts.sum() == n and set(counts.tolist()) <= {1, 2, 3}


# -- npz masks ----------------------------------------------------------------

def _one_line_error(fn, *parts):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def _seg_npz(tmp_path, name="seg.npz", **over):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (6, 8, 10, 3), dtype=np.uint8),
              "y": rng.integers(0, 4, (6, 8, 10)).astype(np.uint8),
              "x_test": rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8),
              "y_test": rng.integers(0, 6, (3, 8, 10)).astype(np.int64)}
    arrays["y"][0, 0, :4] = 255
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **arrays)
    return path, arrays


def test_npz_masks_make_a_segmentation_source(tmp_path):
    path, a = _seg_npz(tmp_path)
    tr, te, al = (open_source(f"npz:{path}", s) for s in ("train", "test", "all"))
    assert tr.has_masks and te.has_masks and al.has_masks
    assert tr.num_classes == te.num_classes == int(a["y_test"].max()) + 1  # both splits' ids counted
    assert (tr.labels == -1).all() and np.array_equal(te.indices, [6, 7, 8])
    assert np.array_equal(tr.mask(0), a["y"][0]) and tr.mask(0).dtype == np.uint8
    assert np.array_equal(te.masks(np.array([2, 0])), a["y_test"][[2, 0]].astype(np.uint8))
    assert np.array_equal(al.mask(7), a["y_test"][1]) and np.array_equal(al.image(7), a["x_test"][1])
    assert tr.fingerprint == sha256_file(path)
    # a split without its y: no labelled pixel
    path2, _ = _seg_npz(tmp_path, "noytest.npz", y_test=None)
    te2 = open_source(f"npz:{path2}", "test")
    assert te2.has_masks and (te2.mask(0) == 255).all() and te2.num_classes == int(a["y"][a["y"] != 255].max()) + 1


def test_npz_one_dimensional_labels_are_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "cls.npz", x=x, y=np.array([0, 2, 1, 2, 0]))
    src = open_source(f"npz:{tmp_path / 'cls.npz'}")
    assert not src.has_masks and src.masks is None and src.load_mask is None
    assert src.num_classes == 3 and src.labels.tolist() == [0, 2, 1, 2, 0]


def test_npz_mask_errors_name_file_array_and_row(tmp_path):
    path, a = _seg_npz(tmp_path, "size.npz", y=np.zeros((6, 8, 9), np.uint8))
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y'", "8x9", "8x10", "row 0")
    bad = a["y_test"].copy()
    bad[2, 3, 4] = 300
    path, _ = _seg_npz(tmp_path, "big.npz", y_test=bad)
    _one_line_error(lambda: open_source(f"npz:{path}", "test"), str(path), "'y_test'", "row 2", "300")
    bad = np.zeros((6, 8, 10), np.int16)
    bad[4, 0, 0] = -1
    path, _ = _seg_npz(tmp_path, "neg.npz", y=bad)
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y'", "row 4", "-1")
    path, _ = _seg_npz(tmp_path, "float.npz", y=np.full((6, 8, 10), 0.5))
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y'", "non-integer")
    path, _ = _seg_npz(tmp_path, "count.npz", y=np.zeros((5, 8, 10), np.uint8))
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y'", "5 masks for 6 images")
    path, _ = _seg_npz(tmp_path, "two.npz", y=np.zeros((6, 8), np.uint8))
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y'", "N x H x W")
    path, _ = _seg_npz(tmp_path, "mixed.npz", y_test=np.array([0, 1, 2]))
    _one_line_error(lambda: open_source(f"npz:{path}"), str(path), "'y_test'", "masks")
    # a float mask with integral values is accepted
    path, a = _seg_npz(tmp_path, "intfloat.npz", y=np.full((6, 8, 10), 2.0))
    assert open_source(f"npz:{path}").mask(3).tolist() == np.full((8, 10), 2).tolist()


# -- mask folders -------------------------------------------------------------

def _save(path, arr, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = _palette(arr) if mode == "P" else Image.fromarray(arr)
    im.save(path)


def _palette(arr):
    """A palette PNG whose indices are the class ids (VOC style); its colours are not the ids."""
    from PIL import Image

    im = Image.new("P", (arr.shape[1], arr.shape[0]))
    im.putpalette([v for i in range(256) for v in (i, (7 * i) % 256, (13 * i) % 256)])
    im.putdata(arr.reshape(-1).tolist())
    return im


def _seg_folder(root, n_train=3, n_test=2, size=(12, 16), classes=None, seed=0):
    rng = np.random.default_rng(seed)
    made = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            h, w = size
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = rng.integers(0, 5, (h, w)).astype(np.uint8)
            mask[0, 0] = 255
            ext = ".jpg" if k == 1 else ".png"
            _save(root / split / "images" / f"im{k}{ext}", img)
            _save(root / split / "masks" / f"im{k}.png", mask, mode="P" if k == 2 else None)
            made[(split, k)] = mask
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return made


def test_mask_folder_is_a_segmentation_source(tmp_path):
    made = _seg_folder(tmp_path / "ds")
    tr, te = open_source(f"imagefolder:{tmp_path / 'ds'}"), open_source(f"imagefolder:{tmp_path / 'ds'}", "test")
    assert tr.has_masks and len(tr) == 3 and len(te) == 2 and np.array_equal(te.indices, [3, 4])
    assert (tr.labels == -1).all() and tr.channels == 3
    assert tr.num_classes == te.num_classes == 1 + max(int(m[m != 255].max()) for m in made.values())
    for k in range(3):
        assert np.array_equal(tr.mask(k), made[("train", k)]), k  # L and P (palette index) masks alike
        assert tr.image(k).shape == (12, 16, 3)
    from PIL import Image
    assert Image.open(tmp_path / "ds" / "train" / "masks" / "im2.png").mode == "P"
    assert np.array_equal(te.mask(1), made[("test", 1)])
    fp = tr.fingerprint
    (tmp_path / "ds" / "classes.txt").write_text("bg\na\nb\nc\nd\ne\nf\n")
    tr2 = open_source(f"imagefolder:{tmp_path / 'ds'}")
    assert tr2.num_classes == 7 and tr2.fingerprint != fp


def test_classic_class_folders_still_classify(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            _save(tmp_path / "cls" / split / c / "a.png", np.zeros((4, 4, 3), np.uint8))
    src = open_source(f"imagefolder:{tmp_path / 'cls'}")
    assert not src.has_masks and src.labels.tolist() == [0, 1] and src.num_classes == 2


def test_mask_folder_errors_name_both_files(tmp_path):
    root = tmp_path / "missing"
    _seg_folder(root)
    (root / "train" / "masks" / "im1.png").unlink()
    _one_line_error(lambda: open_source(f"imagefolder:{root}"), str(root / "train" / "images" / "im1.jpg"),
                    str(root / "train" / "masks" / "im1.png"), "no mask")

    root = tmp_path / "size"
    _seg_folder(root)
    _save(root / "train" / "masks" / "im0.png", np.zeros((12, 15), np.uint8))
    _one_line_error(lambda: open_source(f"imagefolder:{root}"), str(root / "train" / "masks" / "im0.png"),
                    str(root / "train" / "images" / "im0.png"), "15x12", "16x12")

    root = tmp_path / "later"  # a mask replaced after the source was opened: caught when loaded
    _seg_folder(root, classes=["bg", "a", "b", "c", "d"])
    src = open_source(f"imagefolder:{root}")
    _save(root / "train" / "masks" / "im2.png", np.zeros((13, 16), np.uint8))
    _one_line_error(lambda: src.mask(2), str(root / "train" / "masks" / "im2.png"),
                    str(root / "train" / "images" / "im2.png"), "16x13")
    _save(root / "train" / "masks" / "im2.png", np.full((12, 16), 5, np.uint8))
    _one_line_error(lambda: src.mask(2), str(root / "train" / "masks" / "im2.png"), "class 5", "5 classes")
    _save(root / "train" / "masks" / "im2.png", np.zeros((12, 16, 3), np.uint8))
    _one_line_error(lambda: src.mask(2), str(root / "train" / "masks" / "im2.png"), "RGB")

    root = tmp_path / "layout"
    _seg_folder(root)
    import shutil
    shutil.rmtree(root / "test" / "masks")
    _one_line_error(lambda: open_source(f"imagefolder:{root}", "test"), str(root / "test"), "masks/")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "classes.txt").write_text("\n")
    _seg_folder(tmp_path / "empty")
    _one_line_error(lambda: open_source(f"imagefolder:{tmp_path / 'empty'}"), "classes.txt", "no classes")
