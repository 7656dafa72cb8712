"""Segmentation data: masks through views, builtin:mnist-seg, npz masks and mask folders (and their errors)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from tcskd import segdata
from tcskd.data import (DataError, _mnist_arrays, fingerprint, mnist5k_split, mnist_seg_split, open_source,
                        sha256_file, _mnist_file)
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
    import hashlib
    assert fp == hashlib.sha256(f"{sha256_file(_mnist_file())}:{segdata.MNIST_SEG_VERSION}".encode()).hexdigest()


def test_mnist_seg_is_the_same_in_another_process():
    code = ("import hashlib; from tcskd.data import mnist_seg_split as f; c = f('train'); t = f('test');"
            "print(hashlib.sha256(c.images.tobytes() + c.masks.tobytes() + t.images.tobytes() + t.masks.tobytes()"
            " + c.digits.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib
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
