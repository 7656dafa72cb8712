"""``wds:ROOT``: WebDataset tar shards give what the same images as an image folder give (rows, labels,
pixels, masks, a whole cache), from an index built once; local and fsspec URLs; bad input is one line."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tcskd.cache.build import CacheConfig, build_cache
from tcskd.cli import main
from tcskd.data import fingerprint, open_source, reindex
from tcskd.data import index as saved
from tcskd.errors import DataError
from tcskd.store.backends import open_store

ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
CLASSES = 3


@pytest.fixture(autouse=True)
def _index_in_tmp(tmp_path, monkeypatch):
    """Every test its own index folder ($TCSKD_INDEX), so no test sees another's saved index."""
    monkeypatch.setenv("TCSKD_INDEX", str(tmp_path / "indexes"))


# -- writing shards ---------------------------------------------------------------------------------

def _encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(img).save(b, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return b.getvalue()


def make_samples(n: int, seed: int, seg: bool = False, classes: int = CLASSES) -> list[dict]:
    """``n`` samples in order: key, image bytes (PNG and JPEG alternating, sizes varying), class (non-
    decreasing, so that an image folder's sorted ``class/name`` order is this order) or a mask."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        h, w = 10 + j % 3, 12 + j % 4
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = "png" if j % 2 == 0 else "jpg"
        s = {"key": f"{j:06d}", "ext": ext, "image": _encode(img, "PNG" if ext == "png" else "JPEG"),
             "cls": j * classes // n}
        if seg:
            m = rng.integers(0, classes, (h, w), dtype=np.uint8)
            m[0, :3] = 255
            s["mask"] = _encode(m, "PNG")
        out.append(s)
    return out


def write_shards(folder: Path, samples: list[dict], per_shard: int, extra: bool = True) -> list[Path]:
    """``samples`` as tar shards ``shard-00000.tar``... of ``per_shard`` samples, by webdataset's TarWriter
    (as img2dataset writes them; with json and txt members that a reader ignores)."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(samples), per_shard):
        path = folder / f"shard-{k // per_shard:05d}.tar"
        with webdataset.TarWriter(str(path)) as w:
            for s in samples[k:k + per_shard]:
                d = {"__key__": s["key"], s["ext"]: s["image"]}
                if "mask" in s:
                    d["seg.png"] = s["mask"]
                else:
                    d["cls"] = str(s["cls"]).encode()
                if extra:
                    d["json"] = b'{"caption": "x"}'
                    d["txt"] = b"a caption"
                w.write(d)
        paths.append(path)
    return paths


def write_imagefolder(folder: Path, samples: list[dict]) -> None:
    """The same images as ``ROOT/<split>/<class>/<key>.<ext>`` (or ``images/`` + ``masks/``)."""
    for s in samples:
        if "mask" in s:
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            (folder / "images" / f"{s['key']}.{s['ext']}").write_bytes(s["image"])
            (folder / "masks" / f"{s['key']}.png").write_bytes(s["mask"])
        else:
            (folder / f"c{s['cls']}").mkdir(parents=True, exist_ok=True)
            (folder / f"c{s['cls']}" / f"{s['key']}.{s['ext']}").write_bytes(s["image"])


def make_set(tmp: Path, n_train: int = 18, n_test: int = 6, per_shard: int = 6, seg: bool = False,
             seed: int = 0) -> tuple[Path, Path]:
    """A ``wds`` root and an image folder holding the same samples; train 3 shards, test 1 (by default)."""
    wds_root, folder = tmp / "wds", tmp / "folder"
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        samples = make_samples(n, s, seg)
        write_shards(wds_root / split, samples, per_shard)
        write_imagefolder(folder / split, samples)
    return wds_root, folder


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of ``members`` (name, bytes) written by ``tarfile`` with fixed metadata: equal bytes, equal tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _members(samples: list[dict]) -> list[tuple[str, bytes]]:
    out = []
    for s in samples:
        out.append((f"{s['key']}.{s['ext']}", s["image"]))
        out.append((f"{s['key']}.seg.png", s["mask"]) if "mask" in s else (f"{s['key']}.cls", str(s["cls"]).encode()))
    return out


def _saved_index(wds_root: Path) -> saved.SavedIndex:
    path = saved.index_dir("wds", str(wds_root.resolve()))
    found = saved.load(path, json.loads((path / "meta.json").read_text())["signature"])
    assert found is not None
    return found


class Opens(logging.Handler):
    """Counts the reader's debug lines ``open shard NAME``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "open shard %s":
            self.names.append(record.args[0])


@pytest.fixture
def opens():
    h = Opens()
    logger = logging.getLogger("tcskd.data.wds")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def _cfg(data: str, teacher: str, root: Path, **kw) -> CacheConfig:
    # In-process reads (workers 0), so that this process's log counts every shard open.
    base = dict(data=data, teacher=teacher, cache_root=str(root), image_size=16, chunk_rows=6, batch_size=4,
                device="cpu", workers=0)
    base.update(kw)
    return CacheConfig(**base)


def _arrays(path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: np.asarray(s.read(name)) for name in ARRAYS}


def _same_arrays(a, b) -> None:
    for name in ARRAYS:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


# -- the same samples as an image folder ---------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_rows_labels_and_pixels_equal_the_image_folder(tmp_path, split):
    wds_root, folder = make_set(tmp_path)
    w, f = open_source(f"wds:{wds_root}", split), open_source(f"imagefolder:{folder}", split)
    assert len(w) == len(f) == {"train": 18, "test": 6, "all": 24}[split]
    assert w.indices.tolist() == f.indices.tolist()
    assert w.labels.tolist() == f.labels.tolist() and w.labels.dtype == np.int64
    assert w.num_classes == f.num_classes == CLASSES and w.channels == 3 and not w.has_masks
    for i in range(len(w)):
        assert w.encoded(i) == f.encoded(i)
        np.testing.assert_array_equal(w.load(i), f.load(i))
        np.testing.assert_array_equal(w.image(i, 3), f.image(i, 3))
    first_test = 18 if split == "all" else 0
    if split != "train":
        assert w.describe(first_test) == "test/shard-00000.tar:000000"
    if split != "test":
        assert w.describe(7) == "train/shard-00001.tar:000007"


def test_keys_and_classes_are_webdatasets_own(tmp_path, memory_root):
    """The index groups members as webdataset's own reader does: keys up to the basename's first dot (dotted
    folders, upper-case extensions, pax headers, __meta__ members), classes from ``cls``."""
    import webdataset

    root = tmp_path / "wds"
    write_shards(root / "train", make_samples(12, 0), per_shard=5)
    png = make_samples(1, 5)[0]["image"]
    long = "dir.v1/sub/" + "k" * 120
    write_tar(root / "train" / "shard-00009.tar", [
        ("__index__", b"meta"), (f"{long}.PNG", png), (f"{long}.cls", b" 2\n"), ("x.y/a.b.seg.txt", b"t"),
        ("x.y/a.jpeg", png), ("x.y/a.Cls", b"1")])
    src = open_source(f"wds:{root}")
    ds = webdataset.WebDataset([str(p) for p in sorted((root / "train").glob("*.tar"))], shardshuffle=False)
    theirs = [(f"{s['__url__'].rsplit('/', 2)[-2]}/{Path(s['__url__']).name}:{s['__key__']}", int(s["cls"]))
              for s in ds]
    ours = [(src.describe(i), int(src.labels[i])) for i in range(len(src))]
    assert ours == theirs and len(ours) == 14
    assert ours[-2] == (f"train/shard-00009.tar:{long}", 2)
    assert ours[-1] == ("train/shard-00009.tar:x.y/a", 1)
    assert src.encoded(12) == png == src.encoded(13)
    fs, path = memory_root  # the same shards streamed (a remote index reads each shard start to end)
    for p in sorted((root / "train").glob("*.tar")):
        fs.pipe(f"{path}/train/{p.name}", p.read_bytes())
    remote = open_source(f"wds:memory://{path}")
    assert [(remote.describe(i), int(remote.labels[i])) for i in range(len(remote))] == ours
    assert [remote.encoded(i) for i in range(14)] == [src.encoded(i) for i in range(14)]


def test_cache_equals_the_image_folder_cache(tmp_path, tiny_teacher):
    wds_root, folder = make_set(tmp_path)
    for split in ("train", "test"):
        a = build_cache(_cfg(f"wds:{wds_root}", tiny_teacher, tmp_path / "c", split=split, views=2))
        b = build_cache(_cfg(f"imagefolder:{folder}", tiny_teacher, tmp_path / "c", split=split, views=2,
                             order="source"))  # tar shards keep source order (--order auto): compare like with like
        assert a.rows_computed == b.rows_computed == (18 if split == "train" else 6) and a.key != b.key
        _same_arrays(_arrays(a.path), _arrays(b.path))
        with open_store(a.path) as s:
            assert s.manifest["num_classes"] == CLASSES


# -- the index: built once, reused, rebuilt when a shard changes ------------------------------------------

def test_index_is_built_once_and_rebuilt_when_a_shard_changes(tmp_path, opens):
    wds_root, _ = make_set(tmp_path)
    spec = f"wds:{wds_root}"
    fp = fingerprint(spec, "train")
    built = sorted(opens.names)
    assert built == ["test/shard-00000.tar"] + [f"train/shard-0000{k}.tar" for k in range(3)]
    opens.names.clear()

    src = open_source(spec, "train")  # the index is reused: no shard is read to open or fingerprint
    assert fingerprint(spec, "train") == fp == src.fingerprint and opens.names == []
    assert len({fingerprint(spec, s) for s in ("train", "test", "all")}) == 3
    for i in (6, 11, 7, 8):  # rows of shard 1 only: it alone is opened, once
        src.load(i)
    assert opens.names == ["train/shard-00001.tar"]
    opens.names.clear()

    # The saved arrays: one row per sample, no Python objects, keys and shard names packed.
    idx = _saved_index(wds_root)
    assert {k: str(v.dtype) for k, v in idx.arrays.items()} == {
        "shard": "int16", "offset": "int64", "nbytes": "int32", "ext": "uint8", "label": "int64",
        "key_blob": "uint8", "key_offsets": "int64", "shard_blob": "uint8", "shard_offsets": "int64"}
    assert len(idx["offset"]) == 24 and idx["shard"].tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6

    # A shard whose size changed (one more sample): the index is rebuilt, every shard read once more.
    samples = make_samples(7, 9)
    write_shards(wds_root / "train", samples[:1], per_shard=1)  # shard-00000.tar: 1 sample, not 6
    src = open_source(spec, "train")
    assert len(src) == 13 and sorted(opens.names) == built
    assert src.fingerprint != fp and src.encoded(0) == samples[0]["image"]
    assert open_source(spec, "test").indices.tolist() == list(range(13, 19))
    opens.names.clear()

    reindex(spec)  # tcskd cache --reindex: every shard read again whatever the signature says
    assert sorted(opens.names) == built and fingerprint(spec, "train") == src.fingerprint


def test_fingerprint_follows_labels_not_image_bytes(tmp_path):
    """Content-defined from the index: a cls changed in place (same size) changes it; image bytes are not
    read (the same sizes and keys give the same fingerprint)."""
    root = tmp_path / "wds"
    samples = make_samples(8, 0)

    def write() -> str:
        for k in range(2):
            write_tar(root / "train" / f"shard-{k:05d}.tar", _members(samples[4 * k:4 * k + 4]))
        return fingerprint(f"wds:{root}")

    fp = write()
    samples[2]["cls"] = samples[2]["cls"] + 1
    changed = write()
    assert changed != fp
    samples[3]["image"] = bytes(len(samples[3]["image"]))  # other bytes, same size
    assert write() == changed
    samples[3]["image"] += b"x"
    assert write() != changed


def test_classes_txt_gives_the_number_of_classes(tmp_path):
    wds_root, _ = make_set(tmp_path)
    (wds_root / "classes.txt").write_text("cat\ndog\nemu\nfox\n\n")
    assert open_source(f"wds:{wds_root}").num_classes == 4  # not the largest cls + 1 (3)
    (wds_root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"^train/shard-00002.tar:000012: cls 2 is outside the 2 classes of "
                                        r"classes.txt$"):
        open_source(f"wds:{wds_root}")


# -- the cache stage: --limit and resume ---------------------------------------------------------------

def test_limit_gives_the_image_folders_rows(tmp_path, tiny_teacher):
    wds_root, folder = make_set(tmp_path)
    a = build_cache(_cfg(f"wds:{wds_root}", tiny_teacher, tmp_path / "c", limit=7, seed=3))
    b = build_cache(_cfg(f"imagefolder:{folder}", tiny_teacher, tmp_path / "c", limit=7, seed=3, order="source"))
    x, y = _arrays(a.path), _arrays(b.path)
    _same_arrays(x, y)
    assert len(x["sample_index"]) == 7 and sorted(set(x["labels"].tolist())) == [0, 1, 2]
    full = _arrays(build_cache(_cfg(f"wds:{wds_root}", tiny_teacher, tmp_path / "c")).path)
    assert full["features"][x["sample_index"]].tobytes() == x["features"].tobytes()


def test_resume_rewrites_a_lost_chunk(tmp_path, tiny_teacher, opens):
    wds_root, _ = make_set(tmp_path)
    cfg = _cfg(f"wds:{wds_root}", tiny_teacher, tmp_path / "c")
    first = build_cache(cfg)
    ref = _arrays(first.path)
    with open_store(first.path, "a") as s:
        s["chunk_done"][1] = False
        s["features"][6:12] = np.zeros_like(ref["features"][6:12])
        s.set_attrs({"complete": False})
    opens.names.clear()
    again = build_cache(cfg)
    assert not again.hit and again.rows_computed == 6
    assert opens.names == ["train/shard-00001.tar"]  # chunk 1 = shard 1: nothing else is read
    _same_arrays(ref, _arrays(first.path))


# -- masks ---------------------------------------------------------------------------------------------

def test_masks_equal_the_mask_folder(tmp_path):
    wds_root, folder = make_set(tmp_path, seg=True)
    for split in ("train", "test", "all"):
        w, f = open_source(f"wds:{wds_root}", split), open_source(f"imagefolder:{folder}", split)
        assert w.has_masks and f.has_masks and w.num_classes == f.num_classes == CLASSES
        assert w.labels.tolist() == f.labels.tolist() == [-1] * len(f)
        assert w.indices.tolist() == f.indices.tolist()
        for i in range(len(w)):
            np.testing.assert_array_equal(w.mask(i), f.mask(i))
            np.testing.assert_array_equal(w.load(i), f.load(i))
    (wds_root / "classes.txt").write_text("bg\na\nb\nc\nd\n")
    (folder / "classes.txt").write_text("bg\na\nb\nc\nd\n")
    assert open_source(f"wds:{wds_root}").num_classes == open_source(f"imagefolder:{folder}").num_classes == 5


def test_a_mask_of_another_size_is_named(tmp_path):
    root = tmp_path / "wds"
    samples = make_samples(4, 0, seg=True)
    samples[2]["mask"] = _encode(np.zeros((3, 3), np.uint8), "PNG")
    write_shards(root / "train", samples, per_shard=4)
    src = open_source(f"wds:{root}")
    src.mask(1)
    with pytest.raises(DataError, match=r"the mask of train/shard-00000.tar:000002 is 3x3 px but its image is"):
        src.mask(2)


# -- fsspec URLs ---------------------------------------------------------------------------------------

@pytest.fixture
def memory_root(tmp_path):
    """An empty folder of fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/wds-test-{tmp_path.name}"
    yield fs, path
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_memory_url_gives_the_local_cache(tmp_path, tiny_teacher, memory_root, opens):
    fs, path = memory_root
    wds_root, _ = make_set(tmp_path)
    for p in sorted(wds_root.rglob("*.tar")):
        fs.pipe(f"{path}/{p.parent.name}/{p.name}", p.read_bytes())
    url = f"memory://{path}"
    local, remote = open_source(f"wds:{wds_root}", "all"), open_source(f"wds:{url}", "all")
    assert remote.fingerprint == local.fingerprint
    assert [remote.describe(i) for i in range(24)] == [local.describe(i) for i in range(24)]
    assert all(remote.encoded(i) == local.encoded(i) for i in range(24))
    a = build_cache(_cfg(f"wds:{wds_root}", tiny_teacher, tmp_path / "c"))
    opens.names.clear()
    b = build_cache(_cfg(f"wds:{url}", tiny_teacher, tmp_path / "c"))
    _same_arrays(_arrays(a.path), _arrays(b.path))
    assert sorted(opens.names) == [f"train/shard-0000{k}.tar" for k in range(3)]  # the index was reused


def test_s3_shards_read_like_local_ones(tmp_path, s3_env_set, opens):
    """Shards in a bucket behind a real S3 endpoint (tests/_s3.py) read like the local ones."""
    fs = s3_env_set.fs()
    url = s3_env_set.prefix("wds")
    key = url.removeprefix("s3://")
    wds_root, _ = make_set(tmp_path)
    for p in sorted(wds_root.rglob("*.tar")):
        fs.put(str(p), f"{key}/{p.parent.name}/{p.name}")
    local, remote = open_source(f"wds:{wds_root}", "all"), open_source(f"wds:{url}", "all")
    assert remote.fingerprint == local.fingerprint and remote.labels.tolist() == local.labels.tolist()
    rows = (20, 3, 19, 4)
    expected = [(local.encoded(i), local.load(i)) for i in rows]
    opens.names.clear()
    for i, (data, pixels) in zip(rows, expected):  # random access by range requests; each shard opened once
        assert remote.encoded(i) == data
        np.testing.assert_array_equal(remote.load(i), pixels)
    assert opens.names == ["test/shard-00000.tar", "train/shard-00000.tar"]
    opens.names.clear()
    assert open_source(f"wds:{url}").fingerprint == fingerprint(f"wds:{wds_root}") and opens.names == []
    # An object replaced by one of another size (a new ETag): the index is rebuilt.
    fs.put(str(wds_root / "train" / "shard-00000.tar"), f"{key}/train/shard-00001.tar")
    assert len(open_source(f"wds:{url}")) == 18 and len(opens.names) == 4
    fs.rm(key, recursive=True)


class _Encoded(torch.utils.data.Dataset):
    """Row -> (row, the reading process's id, the shards that process opened so far, the row's bytes)."""

    def __init__(self, source, opens: Opens) -> None:
        self.source, self.opens = source, opens

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        data = self.source.encoded(i)
        return i, os.getpid(), list(self.opens.names), data


def test_forked_workers_open_their_own_shard_files(tmp_path, opens):
    """DataLoader workers forked after the parent read rows (its shard files open) open the shards they read
    themselves, once each, and read every row right."""
    wds_root, _ = make_set(tmp_path)
    src = open_source(f"wds:{wds_root}")
    expected = [src.encoded(i) for i in range(len(src))]  # the parent holds every train shard open
    opens.names.clear()
    loader = torch.utils.data.DataLoader(_Encoded(src, opens), batch_size=3, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")
    got = [item for batch in loader for item in batch]
    assert [row for row, _, _, _ in got] == list(range(18)) and [data for *_, data in got] == expected
    pids = {pid for _, pid, _, _ in got}
    assert len(pids) == 2 and os.getpid() not in pids and opens.names == []
    for pid in pids:  # each worker read rows of every shard (batches of 3 rows, shards of 6) and opened each once
        assert max((o for _, p, o, _ in got if p == pid), key=len) == [f"train/shard-0000{k}.tar" for k in range(3)]


# -- bad input: one line, nothing written ----------------------------------------------------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _missing_extra() -> tuple[str, str]:
    """A URL protocol whose fsspec package is not installed, and that package."""
    import importlib.util

    for proto, pkg in (("gs", "gcsfs"), ("az", "adlfs"), ("oci", "ocifs")):
        if importlib.util.find_spec(pkg) is None:
            return proto, pkg
    pytest.skip("gcsfs, adlfs and ocifs are all installed: no protocol lacks its package")


def _bad(tmp: Path, case: str) -> tuple[str, str]:
    """(data spec, the error's expected text) of a bad input."""
    root = tmp / "wds"
    if case == "no root":
        return f"wds:{root}", f"wds root not found: {root}"
    root.mkdir()
    if case == "no train folder":
        (root / "test").mkdir()
        return f"wds:{root}", f"wds:{root} has no 'train' folder (expected ROOT/train/*.tar)"
    (root / "train").mkdir()
    if case == "no shards":
        (root / "train" / "notes.txt").write_text("x")
        return f"wds:{root}", f"wds:{root}/train holds no .tar shards"
    samples = make_samples(6, 0, seg=case == "no mask")
    if case == "no mask":
        del samples[4]["mask"]
        samples[4]["cls"] = 0
    if case == "not a tar":
        write_shards(root / "train", samples, per_shard=3)
        (root / "train" / "shard-00001.tar").write_bytes(b"this is not a tar file " * 40)
        return f"wds:{root}", "train/shard-00001.tar is not a tar file"
    if case == "cut short":  # what a killed writer leaves: whole members, no end-of-archive blocks
        write_shards(root / "train", samples, per_shard=3)
        shard = root / "train" / "shard-00001.tar"
        data = shard.read_bytes()
        last = tarfile.open(shard).getmembers()[-1]
        shard.write_bytes(data[:last.offset_data + -(-last.size // 512) * 512])
        return f"wds:{root}", "train/shard-00001.tar ends without the tar end-of-archive blocks"
    write_shards(root / "train", samples[:3], per_shard=3)
    members = []
    for s in samples[3:]:
        if case == "no image" and s["key"] == "000004":
            members.append((f"{s['key']}.json", b"{}"))
        else:
            members.append((f"{s['key']}.{s['ext']}", s["image"]))
        if "mask" in s:
            members.append((f"{s['key']}.seg.png", s["mask"]))
        elif not (case == "no cls" and s["key"] == "000005"):
            bad = case == "cls not an integer" and s["key"] == "000003"
            members.append((f"{s['key']}.cls", b"dog" if bad else str(s["cls"]).encode()))
    write_tar(root / "train" / "shard-00001.tar", members)
    expected = {"no image": "train/shard-00001.tar:000004 has no image",
                "no cls": "train/shard-00001.tar:000005 has no cls",
                "cls not an integer": "train/shard-00001.tar:000003: cls 'dog' is not a class id",
                "no mask": "train/shard-00001.tar:000004 has no seg.png"}
    return f"wds:{root}", expected[case]


@pytest.mark.parametrize("case", ["no root", "no train folder", "no shards", "not a tar", "cut short", "no image", "no cls",
                                  "cls not an integer", "no mask", "unreachable url", "missing extra"])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, tiny_teacher, case):
    if case == "unreachable url":
        spec, expected = f"wds:http://127.0.0.1:{_closed_port()}/shards", "cannot list wds:http://127.0.0.1:"
    elif case == "missing extra":
        proto, pkg = _missing_extra()
        spec, expected = f"wds:{proto}://bucket/shards", f"wds:{proto}://bucket/shards needs an optional package"
    else:
        spec, expected = _bad(tmp_path, case)
    with pytest.raises(DataError, match="^" + re.escape(expected)):
        open_source(spec)
    caches = tmp_path / "caches"
    r = CliRunner().invoke(main, ["-q", "cache", "--data", spec, "--teacher", tiny_teacher, "--image-size", "16",
                                  "--cache-root", str(caches)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], r.output
    if case == "missing extra":
        assert pkg in lines[0]
    assert not caches.exists()
    assert not list((tmp_path / "indexes").rglob("meta.json"))  # no index saved either
