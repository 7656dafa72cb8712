"""``hfds:PATH``: Hugging Face datasets (save_to_disk folders and Hub-style parquet) as tcskd sources.

Every dataset here is written by the real ``datasets`` library (``Dataset.from_dict`` + ``Image``/``ClassLabel``
features, ``DatasetDict.save_to_disk``, ``Dataset.to_parquet``) and read back through ``tcskd.data``; the
same images are also written as an npz and as an image folder of PNG files, the references.
"""

from __future__ import annotations

import io
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

datasets = pytest.importorskip("datasets")
import fsspec  # noqa: E402 - a dependency of datasets

from click.testing import CliRunner  # noqa: E402

from tcskd.cache.build import CacheConfig, build_cache  # noqa: E402
from tcskd.cli import main  # noqa: E402
from tcskd.data import fingerprint, has_split, open_source  # noqa: E402
from tcskd.data import hfds  # noqa: E402
from tcskd.errors import DataError  # noqa: E402
from tcskd.store.backends import open_store  # noqa: E402

datasets.disable_progress_bars()

N_TRAIN, N_TEST, CLASSES, H, W = 13, 5, 3, 10, 14
NAMES = [f"c{k}" for k in range(CLASSES)]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random H x W RGB images and labels sorted by class (so an image folder lists them in row order)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), np.sort(rng.integers(0, CLASSES, n))


def _dataset(x: np.ndarray, y, image_feature=None, label_feature=None, **extra) -> "datasets.Dataset":
    feats = {"image": image_feature or datasets.Image(),
             "label": label_feature or datasets.ClassLabel(names=NAMES)}
    feats.update({k: datasets.Value("int64") for k in extra})
    cells = [None if a is None else {"bytes": a if isinstance(a, bytes) else _png(a), "path": None} for a in x]
    return datasets.Dataset.from_dict({"image": cells, "label": list(y), **extra},
                                      features=datasets.Features(feats))


def _save(dd: dict, root: Path, layout: str, shards: int = 2, group: int = 3) -> str:
    """A DatasetDict as a save_to_disk folder (``arrow``) or Hub-style parquet shards (``parquet``, ``group``
    rows per row group); the spec's PATH."""
    if layout == "arrow":
        datasets.DatasetDict(dd).save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True)
        for name, ds in dd.items():
            k = shards if name == "train" else 1
            for s in range(k):
                ds.shard(k, s, contiguous=True).to_parquet(str(root / "data" / f"{name}-{s:05d}-of-{k:05d}.parquet"),
                                                           batch_size=group)
    return str(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    """The same images and labels as npz, image folder (PNG), save_to_disk and parquet specs."""
    root = tmp_path_factory.mktemp("hfds")
    x, y = _arrays(N_TRAIN, 0)
    xt, yt = _arrays(N_TEST, 1)
    np.savez(root / "ref.npz", x=x, y=y, x_test=xt, y_test=yt)
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        for i, (a, lab) in enumerate(zip(xs, ys)):
            d = root / "folder" / name / NAMES[lab]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:03d}.png").write_bytes(_png(a))
    dd = {"train": _dataset(x, y), "test": _dataset(xt, yt)}
    return {"npz": f"npz:{root / 'ref.npz'}", "folder": f"imagefolder:{root / 'folder'}",
            "arrow": f"hfds:{_save(dd, root / 'sd', 'arrow')}", "parquet": f"hfds:{_save(dd, root / 'pq', 'parquet')}"}


def _one_line(fn, *needles: str) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_same_rows_as_npz_and_image_folder(sets, layout, split):
    ref, folder, src = (open_source(sets[k], split) for k in ("npz", "folder", layout))
    n = {"train": N_TRAIN, "test": N_TEST, "all": N_TRAIN + N_TEST}[split]
    assert len(src) == n and src.channels == 3 and src.num_classes == ref.num_classes == CLASSES
    for other in (ref, folder):
        assert src.indices.tolist() == other.indices.tolist() and src.labels.tolist() == other.labels.tolist()
    assert src.indices.dtype == np.int64 and src.labels.dtype == np.int64
    for i in range(n):
        assert np.array_equal(src.image(i), ref.image(i)) and np.array_equal(src.image(i), folder.image(i))
        assert src.encoded(i) == folder.encoded(i)  # the PNG bytes as written
    assert src.fingerprint == fingerprint(sets[layout], split)


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_cache_equals_image_folder_cache(sets, layout, tiny_teacher, tmp_path):
    def build(spec: str, split: str) -> dict[str, bytes]:
        cfg = CacheConfig(data=spec, teacher=tiny_teacher, cache_root=str(tmp_path / spec.split(":")[0]),
                          split=split, image_size=16, chunk_rows=4, batch_size=3, views=2, dtype="float32",
                          order="source")  # HF sets keep source order (--order auto): compare like with like
        with open_store(build_cache(cfg).path) as s:
            return {k: s.read(k).tobytes() for k in ("features", "labels", "sample_index", "view_params", "row_ok")}

    for split in ("train", "test"):
        assert build(sets[layout], split) == build(sets["folder"], split)


def test_parquet_rows_across_shards_and_row_groups(tmp_path):
    """Rows of several shards with several row groups each (an empty shard too) come back in order."""
    x, y = _arrays(11, 2)
    ds = _dataset(x, y)
    (tmp_path / "data").mkdir()
    ds.select(range(7)).to_parquet(str(tmp_path / "data" / "train-00000-of-00003.parquet"), batch_size=2)
    ds.select([]).to_parquet(str(tmp_path / "data" / "train-00001-of-00003.parquet"))
    ds.select(range(7, 11)).to_parquet(str(tmp_path / "data" / "train-00002-of-00003.parquet"), batch_size=3)
    src = open_source(f"hfds:{tmp_path}")
    assert src.indices.tolist() == list(range(11)) and src.labels.tolist() == y.tolist()
    for i in list(range(11)) + [10, 0, 5, 8, 1]:  # forward, then backward across row groups and files
        assert np.array_equal(src.load(i), x[i])


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_column_suffix(tmp_path, layout):
    x, y = _arrays(6, 3)
    xt, yt = _arrays(4, 4)
    fine = [5, 0, 9, 2, 2, 7]

    def part(xs, ys, fine_labels):
        ds = datasets.Dataset.from_dict(
            {"img": [{"bytes": _png(a), "path": None} for a in xs], "coarse": list(ys), "fine_label": fine_labels,
             "caption": [f"image {i}" for i in range(len(xs))]},
            features=datasets.Features({"img": datasets.Image(), "coarse": datasets.ClassLabel(names=NAMES),
                                        "fine_label": datasets.Value("int32"), "caption": datasets.Value("string")}))
        return ds

    path = _save({"train": part(x, y, fine), "validation": part(xt, yt, [1, 11, 3, 4])}, tmp_path / "ds", layout)
    auto = open_source(f"hfds:{path}")  # the Image column and the ClassLabel column
    assert auto.labels.tolist() == y.tolist() and auto.num_classes == CLASSES
    assert np.array_equal(auto.load(2), x[2])
    named = open_source(f"hfds:{path}#image=img,label=fine_label")
    assert named.labels.tolist() == fine and named.num_classes == 10  # no test split: train's largest + 1
    held = open_source(f"hfds:{path}#label=fine_label,test=validation", "test")
    assert held.indices.tolist() == [6, 7, 8, 9] and held.labels.tolist() == [1, 11, 3, 4]
    assert held.num_classes == 12 and np.array_equal(held.load(3), xt[3])  # largest of both splits + 1
    for spec in (f"hfds:{path}#label=", f"hfds:{path}#label=none,test=validation"):
        unl = open_source(spec, "all")
        assert unl.labels.tolist() == [-1] * len(unl) and unl.num_classes == 0
    assert len(open_source(f"hfds:{path}#test=validation", "all")) == 10
    # Whether a run has a test split: absent by default is no; a split named in the spec and absent is an error.
    assert has_split(f"hfds:{path}#test=validation", "test") and not has_split(f"hfds:{path}", "test")
    _one_line(lambda: has_split(f"hfds:{path}#test=valid", "test"), "no 'valid' split", "validation")
    _one_line(lambda: open_source(f"hfds:{path}#image=picture"), "no column 'picture'", "img, coarse")
    _one_line(lambda: open_source(f"hfds:{path}#label=fine"), "no column 'fine'")
    _one_line(lambda: open_source(f"hfds:{path}#image=caption"), "'caption' holds string", "not images")
    _one_line(lambda: open_source(f"hfds:{path}#label=caption"), "label column 'caption' holds string")
    _one_line(lambda: open_source(f"hfds:{path}#colour=rgb"), "unknown option 'colour=rgb'")
    _one_line(lambda: open_source(f"hfds:{path}#image=img,image=img"), "'image' given twice")
    _one_line(lambda: open_source(f"hfds:{path}", "test"), "no 'test' split", "train, validation")


def test_parse_spec():
    s = hfds.parse_hfds("s3://bucket/ds#image=img,label=,test=validation")
    assert (s.path, s.image, s.label, s.unlabelled) == ("s3://bucket/ds", "img", None, True)
    assert s.splits == {"train": "train", "test": "validation"}
    s = hfds.parse_hfds("/data/ds")
    assert (s.path, s.image, s.label, s.unlabelled, s.splits["test"]) == ("/data/ds", None, None, False, "test")
    assert hfds.parse_hfds("ds#label=fine_label").label == "fine_label"


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_plain_int_labels_and_label_column_fallbacks(tmp_path, layout):
    """Labels from an int column named ``label`` (num_classes = largest of both splits + 1, nulls -1), a
    struct<bytes, path> column without the Image feature, and no label column at all."""
    x, _ = _arrays(4, 5)
    xt, _ = _arrays(3, 6)
    path = _save({"train": _dataset(x, [0, 2, None, 1], label_feature=datasets.Value("uint8")),
                  "test": _dataset(xt, [4, 0, 1], label_feature=datasets.Value("int64"))}, tmp_path / "a", layout)
    src = open_source(f"hfds:{path}", "all")
    assert src.labels.tolist() == [0, 2, -1, 1, 4, 0, 1] and src.num_classes == 5
    plain = datasets.Dataset.from_dict({"picture": [{"bytes": _png(a), "path": None} for a in x], "n": [1, 2, 3, 4]})
    path = _save({"train": plain}, tmp_path / "b", layout)
    src = open_source(f"hfds:{path}")
    assert src.labels.tolist() == [-1] * 4 and src.num_classes == 0 and np.array_equal(src.load(3), x[3])


def test_image_paths_not_embedded(tmp_path):
    """``to_parquet`` keeps an Image cell made from a local file as its path (save_to_disk embeds the bytes):
    the file is read."""
    x, y = _arrays(3, 7)
    files = []
    for i, a in enumerate(x):
        files.append(str(tmp_path / f"{i}.png"))
        Path(files[-1]).write_bytes(_png(a))
    ds = datasets.Dataset.from_dict({"image": files, "label": y.tolist()}).cast_column("image", datasets.Image())
    path = _save({"train": ds}, tmp_path / "pq", "parquet")
    src = open_source(f"hfds:{path}")
    assert [np.array_equal(src.load(i), x[i]) for i in range(3)] == [True] * 3
    Path(files[1]).unlink()
    _one_line(lambda: src.load(1), "split 'train' row 1", "no image bytes", files[1])


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_bad_datasets(tmp_path, layout, tiny_teacher):
    x, y = _arrays(4, 8)
    cases = {
        "no image": ({"train": datasets.Dataset.from_dict({"label": [0, 1], "text": ["a", "b"]})},
                     ["has no Image column", "label, text", "#image=COL"]),
        "string labels": ({"train": _dataset(x, ["a", "b", "a", "c"], label_feature=datasets.Value("string"))},
                          ["label column 'label' holds string", "integer class ids"]),
        "float labels": ({"train": _dataset(x, [0.0, 1.5, 2.0, 1.0], label_feature=datasets.Value("float32"))},
                         ["label column 'label' holds float", "integer class ids"]),
        "two images": ({"train": datasets.Dataset.from_dict(
            {"a": [{"bytes": _png(a), "path": None} for a in x[:2]],
             "b": [{"bytes": _png(a), "path": None} for a in x[2:]]},
            features=datasets.Features({"a": datasets.Image(), "b": datasets.Image()}))},
            ["several image columns (a, b)"]),
    }
    for name, (dd, needles) in cases.items():
        path = _save(dd, tmp_path / name.replace(" ", "_"), layout)
        _one_line(lambda: open_source(f"hfds:{path}"), *needles)
        root = tmp_path / f"caches-{name}"
        cfg = CacheConfig(data=f"hfds:{path}", teacher=tiny_teacher, cache_root=str(root), image_size=16)
        _one_line(lambda: build_cache(cfg), *needles)
        assert not root.exists()  # nothing written
    path = _save({"train": _dataset(x, y)}, tmp_path / "train_only", layout)
    _one_line(lambda: open_source(f"hfds:{path}", "test"), "no 'test' split (splits: train)")
    assert len(open_source(f"hfds:{path}", "all")) == 4


def test_cli_refuses_in_one_line(sets, tmp_path, tiny_teacher):
    """``tcskd cache --data hfds:...`` on a bad spec: one error line, exit 2, no cache folder."""
    for data, needle in ((f"hfds:{tmp_path / 'nope'}", "dataset folder not found"),
                         (sets["arrow"] + "#label=nope", "no column 'nope'")):
        r = CliRunner().invoke(main, ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16",
                                      "--cache-root", str(tmp_path / "c")])
        err = r.stderr if hasattr(r, "stderr") else r.output
        lines = [line for line in err.strip().splitlines() if line.startswith("tcskd: error:")]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "c").exists()


def test_bad_paths(tmp_path):
    _one_line(lambda: open_source(f"hfds:{tmp_path / 'nope'}"), "dataset folder not found", str(tmp_path / "nope"))
    _one_line(lambda: fingerprint(f"hfds:{tmp_path / 'nope'}"), "dataset folder not found")
    (tmp_path / "empty").mkdir()
    _one_line(lambda: open_source(f"hfds:{tmp_path / 'empty'}"), "neither a save_to_disk folder",
              "data/<split>-*.parquet")
    x, y = _arrays(2, 9)
    _dataset(x, y).save_to_disk(str(tmp_path / "one"))
    _one_line(lambda: open_source(f"hfds:{tmp_path / 'one'}"), "one Dataset's save_to_disk folder", "DatasetDict")
    (tmp_path / "junk" / "data").mkdir(parents=True)
    (tmp_path / "junk" / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    _one_line(lambda: open_source(f"hfds:{tmp_path / 'junk'}"), "not a parquet file")
    _one_line(lambda: open_source("hfds:#image=x"), "bad data spec")


@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_bad_rows_name_the_row_and_skip_bad_records_them(tmp_path, layout, tiny_teacher):
    x, y = _arrays(6, 10)
    cells = [x[0], x[1], None, x[3], b"not an image", x[5]]
    path = _save({"train": _dataset(cells, y)}, tmp_path / "ds", layout)
    src = open_source(f"hfds:{path}")
    assert np.array_equal(src.load(5), x[5])
    _one_line(lambda: src.image(2), f"{path} split 'train' row 2", "no image")
    _one_line(lambda: src.image(4), f"{path} split 'train' row 4", "unreadable image")

    def cfg(**kw) -> CacheConfig:
        return CacheConfig(data=f"hfds:{path}", teacher=tiny_teacher, cache_root=str(tmp_path / "c"), image_size=16,
                           chunk_rows=3, batch_size=2, **kw)

    _one_line(lambda: build_cache(cfg()), "row 2", "--skip-bad")
    with open_store(build_cache(cfg(skip_bad=True)).path) as s:
        assert s.read("row_ok").tolist() == [True, True, False, True, False, True]
        assert s.read("labels").tolist() == [y[0], y[1], -1, y[3], -1, y[5]]


def test_missing_extra(monkeypatch, sets):
    for module in ("datasets", "pyarrow.parquet"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # the import fails as if the package were not installed
            _one_line(lambda: open_source(sets["parquet"]), "pip install 'tcskd[hfds]'", module)
            _one_line(lambda: fingerprint(sets["arrow"]), "pip install 'tcskd[hfds]'")


def test_fingerprint_follows_content(tmp_path):
    x, y = _arrays(5, 11)
    for layout in ("arrow", "parquet"):
        a = _save({"train": _dataset(x, y)}, tmp_path / f"{layout}-a", layout)
        b = _save({"train": _dataset(x, y)}, tmp_path / f"{layout}-b", layout)
        relabelled = _save({"train": _dataset(x, (y + 1) % CLASSES)}, tmp_path / f"{layout}-c", layout)
        with_test = _save({"train": _dataset(x, y), "test": _dataset(x[:2], y[:2])}, tmp_path / f"{layout}-d", layout)
        fa = fingerprint(f"hfds:{a}")
        assert fa == open_source(f"hfds:{a}").fingerprint == fingerprint(f"hfds:{a}", "test")
        if layout == "parquet":  # the same content written twice: the same names, sizes and footers
            assert fingerprint(f"hfds:{b}") == fa
        assert fingerprint(f"hfds:{relabelled}") != fa and fingerprint(f"hfds:{with_test}") != fa


def test_parquet_row_group_lru_is_bounded(sets, monkeypatch):
    """A process keeps at most GROUP_CACHE_BYTES of row groups (always the last) and OPEN_FILES files."""
    loc = hfds._locate(hfds.parse_hfds(sets["parquet"].partition(":")[2]))
    cells = hfds._parquet_parts(loc)["train"].cell
    n_groups = len(cells.group_start)
    assert n_groups == 5  # shards of 7 and 6 rows in row groups of 3
    monkeypatch.setattr(hfds, "GROUP_CACHE_BYTES", 1)
    monkeypatch.setattr(hfds, "OPEN_FILES", 1)
    for r in range(N_TRAIN):
        cells(r)
    assert list(cells._groups) == [n_groups - 1] and list(cells._open) == [1]
    monkeypatch.setattr(hfds, "GROUP_CACHE_BYTES", 1 << 30)
    for r in range(N_TRAIN):
        cells(r)
    assert sorted(cells._groups) == list(range(n_groups)) and cells._bytes == sum(
        a.nbytes for a in cells._groups.values())


def test_parquet_behind_an_fsspec_url(sets):
    """Parquet shards read through fsspec (memory://), equal to the local copy; a remote save_to_disk folder
    is refused."""
    fs = fsspec.filesystem("memory")
    local = Path(sets["parquet"].partition(":")[2])
    try:
        for f in sorted((local / "data").iterdir()):
            fs.pipe(f"/hfds-test/pq/data/{f.name}", f.read_bytes())
        for split in ("train", "test", "all"):
            remote, ref = open_source("hfds:memory://hfds-test/pq", split), open_source(sets["parquet"], split)
            assert remote.indices.tolist() == ref.indices.tolist() and remote.labels.tolist() == ref.labels.tolist()
            assert [remote.encoded(i) for i in range(len(ref))] == [ref.encoded(i) for i in range(len(ref))]
            assert remote.fingerprint == fingerprint("hfds:memory://hfds-test/pq", split)
        x, y = _arrays(2, 12)
        datasets.DatasetDict({"train": _dataset(x, y)}).save_to_disk("memory://hfds-test/sd")
        _one_line(lambda: open_source("hfds:memory://hfds-test/sd"), "save_to_disk folder on a remote filesystem",
                  "parquet")
        _one_line(lambda: open_source("hfds:memory://hfds-test/none"), "dataset folder not found")
    finally:
        fs.rm("/hfds-test", recursive=True)


def _read_in_child(cells, row: int):
    cell = cells(row)
    return list(cells._groups), list(cells._open), cell.as_py()


def test_parquet_on_s3(sets, s3_env_set):
    """Parquet shards in a bucket behind a real S3 endpoint: the same rows, labels, bytes and fingerprint as the
    local copy; a pickled reader (a spawned worker) opens its own connection."""
    import pickle

    fs = s3_env_set.fs()
    url = s3_env_set.prefix("hfds")
    key = url.removeprefix("s3://")
    local = Path(sets["parquet"].partition(":")[2])
    for f in sorted((local / "data").iterdir()):
        fs.pipe(f"{key}/data/{f.name}", f.read_bytes())
    spec = f"hfds:{url}"
    for split in ("train", "all"):
        remote, ref = open_source(spec, split), open_source(sets["parquet"], split)
        assert remote.indices.tolist() == ref.indices.tolist() and remote.labels.tolist() == ref.labels.tolist()
        assert [remote.encoded(i) for i in range(len(ref))] == [ref.encoded(i) for i in range(len(ref))]
        assert fingerprint(spec, split) == remote.fingerprint
    cells = hfds._parquet_parts(hfds._locate(hfds.parse_hfds(url)))["test"].cell
    again = pickle.loads(pickle.dumps(cells))
    assert again(3).as_py() == cells(3).as_py() == {"bytes": open_source(sets["parquet"], "test").encoded(3),
                                                    "path": None}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["arrow", "parquet"])
def test_cache_with_forked_workers(sets, layout, tiny_teacher, tmp_path):
    """Two forked DataLoader workers (each opening the parquet files itself after the parent read some rows)
    give the cache that no worker gives."""
    src = open_source(sets[layout])
    assert np.array_equal(src.load(0), open_source(sets["npz"]).image(0))  # the parent holds open state
    if layout == "parquet":  # a forked child opens its own files and row groups: none of the parent's
        cells = hfds._parquet_parts(hfds._locate(hfds.parse_hfds(sets[layout].partition(":")[2])))["train"].cell
        for r in range(N_TRAIN):
            cells(r)
        parent = (list(cells._groups), list(cells._open))
        ctx = multiprocessing.get_context("fork")  # as DataLoader workers: the object is inherited, not pickled
        queue = ctx.Queue()
        proc = ctx.Process(target=lambda: queue.put(_read_in_child(cells, 4)))
        proc.start()
        child = queue.get(timeout=60)
        proc.join(60)
        assert parent == ([0, 1, 2, 3, 4], [0, 1]) and child == ([1], [0], cells(4).as_py())

    def build(workers: int) -> dict[str, bytes]:
        cfg = CacheConfig(data=sets[layout], teacher=tiny_teacher, cache_root=str(tmp_path / str(workers)),
                          image_size=16, chunk_rows=4, batch_size=2, views=2, workers=workers, dtype="float32")
        with open_store(build_cache(cfg).path) as s:
            return {k: s.read(k).tobytes() for k in ("features", "labels", "sample_index", "row_ok")}

    assert build(2) == build(0)
