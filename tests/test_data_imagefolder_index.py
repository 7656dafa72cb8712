"""The saved index of image folders: built once, memory-mapped, reused while the folders are unchanged.

The second open of a folder lists no folder (os.scandir / os.listdir counted), a change rebuilds the index,
``--reindex`` forces it, and a forked worker that touches every row copies almost nothing.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tcskd.data import has_split, open_source, reindex
from tcskd.data import imagefolder
from tcskd.data.index import index_dir
from tcskd.errors import DataError


def _folder(root: Path, per_class: dict[str, tuple[int, int]]) -> Path:
    """``root/<split>/<class>/<class>_<j>.png`` of a few bytes each (sizes vary), classes as given."""
    for c, counts in per_class.items():
        for split, n in zip(("train", "test"), counts):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                (d / f"{c}_{j:04d}.png").write_bytes(b"x" * (10 + j % 7))
    return root


def _walk_fingerprint(root: Path, names: list[str]) -> tuple[list[str], str]:
    """The rows and fingerprint as a plain walk defines them (sorted paths relative to the split folder)."""
    h = hashlib.sha256()
    rows = []
    for name in ("train", "test"):
        d = root / name
        if not d.is_dir():
            continue
        rels = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        if name in names:
            for rel in rels:
                rows.append(f"{name}/{rel}")
                h.update(f"{name}/{rel}:{(d / rel).stat().st_size}\n".encode())
    return rows, h.hexdigest()


class _Listings:
    """Counts os.scandir and os.listdir calls (os.walk and pathlib list folders through them)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in ("scandir", "listdir"):
            real = getattr(os, name)

            def counting(*a, _real=real, **k):
                self.calls += 1
                return _real(*a, **k)

            monkeypatch.setattr(os, name, counting)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_rows_labels_and_fingerprint_as_a_walk_defines_them(tmp_path, split):
    # "a-b" sorts before "a/" as a path but after "a" as a class: the rows follow the paths, labels the classes.
    root = _folder(tmp_path / "f", {"a": (3, 1), "a-b": (2, 2), "b": (1, 0)})
    (root / "train" / "a" / "nested").mkdir()
    (root / "train" / "a" / "nested" / "z.jpg").write_bytes(b"jpg")
    src = open_source(f"imagefolder:{root}", split)
    rows, fp = _walk_fingerprint(root, ["train", "test"] if split == "all" else [split])
    assert [str(Path(src.describe(i)).relative_to(root)) for i in range(len(src))] == rows
    classes = ["a", "a-b", "b"]
    assert [classes[lab] for lab in src.labels] == [r.split("/")[1] for r in rows]
    assert src.fingerprint == fp
    n_train = 7
    first = n_train if split == "test" else 0
    assert src.indices.tolist() == list(range(first, first + len(rows)))
    assert src.encoded(0) == (root / rows[0]).read_bytes()


def test_second_open_lists_no_folder_and_a_change_rebuilds(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", {f"c{k}": (5, 2) for k in range(4)})
    first = open_source(f"imagefolder:{root}", "train")
    listings = _Listings(monkeypatch)
    again = open_source(f"imagefolder:{root}", "train")
    assert listings.calls == 0
    assert again.fingerprint == first.fingerprint and len(again) == 20

    time.sleep(0.01)
    (root / "train" / "c2" / "c2_9999.png").write_bytes(b"new")  # a new file: its folder's stamp changes
    grown = open_source(f"imagefolder:{root}", "train")
    assert listings.calls > 0 and len(grown) == 21 and grown.fingerprint != first.fingerprint
    assert grown.fingerprint == _walk_fingerprint(root, ["train"])[1]


def test_reindex_rebuilds_after_a_rewrite_in_place(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f", {"a": (3, 1), "b": (3, 1)})
    spec = f"imagefolder:{root}"
    before = open_source(spec, "train").fingerprint
    f = root / "train" / "a" / "a_0000.png"
    f.write_bytes(b"a longer file than before")  # rewritten in place: its folder does not change
    assert open_source(spec, "train").fingerprint == before  # the saved index is trusted...
    reindex(spec)  # ...until --reindex
    after = open_source(spec, "train").fingerprint
    assert after != before and after == _walk_fingerprint(root, ["train"])[1]


def test_bad_folders_are_one_line(tmp_path):
    root = _folder(tmp_path / "f", {"a": (2, 1)})
    (root / "test" / "zzz").mkdir()
    with pytest.raises(DataError, match="class 'zzz' is not among the train split's classes"):
        open_source(f"imagefolder:{root}", "train")
    empty = tmp_path / "e" / "train"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="has no class folders"):
        open_source(f"imagefolder:{empty.parent}", "train")
    only_train = _folder(tmp_path / "t", {"a": (2, 0)})
    import shutil

    shutil.rmtree(only_train / "test")
    with pytest.raises(DataError, match="has no 'test' split"):
        open_source(f"imagefolder:{only_train}", "test")
    assert not has_split(f"imagefolder:{only_train}", "test")  # absent: the run simply has no test split
    with pytest.raises(DataError, match="reads local folders only"):
        open_source("imagefolder:s3://bucket/images", "train")


def _anonymous_kb() -> int:
    """This process's anonymous (heap and copied-on-write) memory, kB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError("no Anonymous line in smaps_rollup")


def _touch_every_row(src, q) -> None:
    before = _anonymous_kb()
    n = sum(len(src.describe(i)) for i in range(len(src)))
    q.put((n, _anonymous_kb() - before))


@pytest.mark.slow
def test_200k_files_index_loads_fast_small_and_shared_by_forked_workers(tmp_path, monkeypatch):
    """200,000 files: the second open lists no folder, loads in < 1 s, keeps < 50 B per file on disk, and a
    forked worker that touches every row copies < 10 MB."""
    root = tmp_path / "big"
    classes, per_class = 200, 1000
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for j in range(per_class):
            os.close(os.open(d / f"n{c:08d}_{j}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    spec = f"imagefolder:{root}"
    first = open_source(spec, "train")
    assert len(first) == classes * per_class

    listings = _Listings(monkeypatch)
    t = time.perf_counter()
    src = open_source(spec, "train")
    seconds = time.perf_counter() - t
    assert listings.calls == 0
    assert seconds < 1.0, seconds
    path = index_dir("imagefolder", str(root.resolve()))
    per_file = sum(p.stat().st_size for p in path.iterdir()) / len(src)
    assert per_file < 50, per_file
    within = sorted(f"n00000123_{j}.JPEG" for j in range(per_class))  # string order: _0, _1, _10, _100, ...
    assert src.describe(123_456).endswith(f"n00000123/{within[456]}") and src.labels[123_456] == 123

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_touch_every_row, args=(src, q))
    p.start()
    chars, grown_kb = q.get(timeout=120)
    p.join(timeout=30)
    assert chars > 0
    assert grown_kb < 10 * 1024, grown_kb


def test_cache_reindex_after_a_rewrite_in_place_makes_a_new_cache(tmp_path, tiny_teacher):
    """`tcskd cache --reindex` (the user's way out when files were rewritten under the same names)."""
    from click.testing import CliRunner
    from PIL import Image

    from tcskd.cli import main

    root = tmp_path / "f"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "train" / c / f"{j}.png")
    args = ["-q", "cache", "--data", f"imagefolder:{root}", "--teacher", tiny_teacher, "--image-size", "16",
            "--device", "cpu", "--workers", "0", "--cache-root", str(tmp_path / "c")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / "train" / "a" / "1.png")
    stale = CliRunner().invoke(main, args)
    assert stale.output == first.output  # the saved index is trusted: the same cache
    fresh = CliRunner().invoke(main, [*args, "--reindex"])
    assert fresh.exit_code == 0, fresh.output
    assert fresh.output.strip().splitlines()[-1] != first.output.strip().splitlines()[-1]
