"""Cache keys stay what they were: existing caches of every older kind stay hits.

The expected fingerprints and keys (BEFORE) were computed by the code before ``tcskd/data/`` (one
``tcskd/data.py``) on the files these helpers write (their bytes are fixed: no timestamps, no encoder
versions), with the specs given relative to the working directory and a fixed stand-in for the teacher's
identity; the demo's keys include the real built-in teacher. Those caches hold their rows in source order,
which ``--order source`` still reproduces key for key; the default since then (``--order auto``: shuffled rows
for these kinds) adds the order to the identity, and SHUFFLED pins those keys.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from tcskd.cache.config import CacheConfig
from tcskd.cache.create import identity_of
from tcskd.data import fingerprint
from tcskd.store.registry import cache_key

BEFORE = {
    "builtin:mnist5k|train": ("846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d", "1ca494130478b609"),
    "builtin:mnist5k|test": ("846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d", "c772f1231cc98496"),
    "builtin:mnist5k|all": ("846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d", "c40630387a52b90e"),
    "builtin:mnist-seg|train": ("484f95d4679ca211c70ccedd71646d2b6e5dbb429786f878ee2273d3eaaf3b42", "cbfb9bee6ff30819"),
    "builtin:mnist-seg|test": ("484f95d4679ca211c70ccedd71646d2b6e5dbb429786f878ee2273d3eaaf3b42", "1fb4e6f8abc1d9d9"),
    "builtin:mnist-seg|all": ("484f95d4679ca211c70ccedd71646d2b6e5dbb429786f878ee2273d3eaaf3b42", "0790d55f369d68a4"),
    "npz:d.npz|train": ("a0da8dad45537c59cdbebce77cfaa3af320a761ebe2e0bc7df79a4a8b315765f", "fa9c535d10ca54cb"),
    "npz:d.npz|test": ("a0da8dad45537c59cdbebce77cfaa3af320a761ebe2e0bc7df79a4a8b315765f", "cea7439a5dd3fcc0"),
    "npz:d.npz|all": ("a0da8dad45537c59cdbebce77cfaa3af320a761ebe2e0bc7df79a4a8b315765f", "2e55077dc984eb52"),
    "imagefolder:folder|train": ("2b596bb21637af871d7d25edfc0b25b871201d57e1a55cc2e4a6df21d1c14386", "58e7e0304066aaba"),
    "imagefolder:folder|test": ("f8d20de3eb250afba1d6d8bf3d5c0281212a29c8239d0d466c0b6e1fdaa67463", "ff48e9d600b40e20"),
    "imagefolder:folder|all": ("66b9fc66560e5028e0bf792f73346cb5649c5b95b9723267caccd8cb5934b5b4", "1f6b55d54f1dfcb3"),
    "cifar100:cifar|train": ("db1939cb729a1e6f49ab16a02e63f72a48e6f7cb8c3e2fb486b07ed6afe1d9b6", "39f8b2244d2794a4"),
    "cifar100:cifar|test": ("db1939cb729a1e6f49ab16a02e63f72a48e6f7cb8c3e2fb486b07ed6afe1d9b6", "d0c52d0565b3d944"),
    "cifar100:cifar|all": ("db1939cb729a1e6f49ab16a02e63f72a48e6f7cb8c3e2fb486b07ed6afe1d9b6", "53c584c48cacec5c"),
}
DEMO_KEYS = {"train": "6935345108b48f45", "test": "f4c7ed5a47b33ddc"}  # builtin:mnist5k, builtin teacher, 112 px
SHUFFLED = {
    "builtin:mnist-seg|all": "643d62c59a57a30b",
    "builtin:mnist-seg|test": "3458be0b37708cd4",
    "builtin:mnist-seg|train": "16443681d75c3ef0",
    "builtin:mnist5k|all": "5dc1310a0c3271bd",
    "builtin:mnist5k|test": "19331fe7307448aa",
    "builtin:mnist5k|train": "3495ea533a2e1f30",
    "cifar100:cifar|all": "7c1934f3f5a24e37",
    "cifar100:cifar|test": "c862dfbb5f609082",
    "cifar100:cifar|train": "db973b73bbe55d51",
    "imagefolder:folder|all": "e2871ddd43251aaf",
    "imagefolder:folder|test": "1e2d6c750c4736f8",
    "imagefolder:folder|train": "5e140581b86b261b",
    "npz:d.npz|all": "0040ac4df83b12f9",
    "npz:d.npz|test": "3effd862aa91e373",
    "npz:d.npz|train": "ff1b677a99cdbf0c",
}
DEMO_SHUFFLED_KEYS = {"train": "7084938bbe778a95", "test": "38d45a0f7b353c4a"}


def write_npz(path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), "y": np.arange(20) % 4,
              "x_test": rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), "y_test": np.arange(6) % 4}
    with zipfile.ZipFile(path, "w") as z:
        for k, a in arrays.items():
            b = io.BytesIO(); np.lib.format.write_array(b, np.ascontiguousarray(a), version=(1, 0))
            z.writestr(zipfile.ZipInfo(k + ".npy", date_time=(2020, 1, 1, 0, 0, 0)), b.getvalue())

def write_folder(root):
    for split, n in (("train", 5), ("test", 2)):
        for c in ("cat", "dog", "eel"):
            d = os.path.join(root, split, c); os.makedirs(d)
            for j in range(n):
                with open(os.path.join(d, f"{c}_{j:03d}.png"), "wb") as f:
                    f.write(bytes(range(256))[: 17 * (j + 1) + len(c)])

def write_cifar(root):
    d = os.path.join(root, "cifar-100-python"); os.makedirs(d)
    for name, n in (("train", 6), ("test", 3)):
        obj = {b"data": [[(i * 7 + j) % 256 for j in range(3072)] for i in range(n)], b"fine_labels": [i % 100 for i in range(n)]}
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(obj, f, protocol=2)


@pytest.fixture
def fixed_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_npz("d.npz")
    write_folder("folder")
    write_cifar("cifar")


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_fingerprints_and_keys_unchanged(fixed_files, case):
    spec, split = case.split("|")
    fp = fingerprint(spec, split)
    key = cache_key(identity_of(CacheConfig(data=spec, split=split, order="source"), fp, {"spec": "fixed"}))
    assert (fp, key) == BEFORE[case]


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_shuffled_keys_are_pinned(fixed_files, case):
    spec, split = case.split("|")
    ident = identity_of(CacheConfig(data=spec, split=split), fingerprint(spec, split), {"spec": "fixed"})
    assert ident["order"] == "permutation/1"
    assert cache_key(ident) == SHUFFLED[case] != BEFORE[case][1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_demo_caches_keep_their_keys(split):
    from tcskd.cache.build import plan_cache

    assert plan_cache(CacheConfig(image_size=112, split=split, order="source"))[2] == DEMO_KEYS[split]
    assert plan_cache(CacheConfig(image_size=112, split=split))[2] == DEMO_SHUFFLED_KEYS[split]
