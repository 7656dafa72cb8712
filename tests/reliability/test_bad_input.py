"""Bad input: malformed specs and options, missing paths, unreadable or odd images, NaN/Inf from a
teacher, labels out of range, empty splits. Every case: one line naming the problem, a non-zero exit,
no traceback (unless --debug). Property-based tests (hypothesis, derandomised, fixed example counts)
sweep spec strings and CLI options."""

from __future__ import annotations

import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import one_error_line

PROPERTY = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def _cli(args):
    from tcskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def refused(args, pattern: str, code: int | None = None) -> str:
    """Run the CLI in-process: a non-zero exit and one `tcskd: error:` line matching ``pattern``."""
    r = _cli(args)
    assert r.exit_code != 0, (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    line = one_error_line(r.stderr)
    assert re.search(pattern, line), (args, line)
    if code is not None:
        assert r.exit_code == code
    tally("bad_inputs", args[0] if args[0] != "-q" else args[1])
    return line


def usage_error(args, option: str) -> None:
    """click's own refusal of an option value: exit 2, one `tcskd: error:` line naming the option, no traceback."""
    r = _cli(args)
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "Traceback" not in r.output
    assert r.stderr.splitlines() == [one_error_line(r.stderr)] and option in r.stderr, r.stderr
    tally("bad_inputs", args[0])


# -- fixtures: broken files ------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, world):
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (6, 10, 10), dtype=np.uint8)
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    np.savez(d / "object.npz", x=np.array([object()] * 4, dtype=object), allow_pickle=True)
    np.savez(d / "strlabels.npz", x=x, y=np.array(list("abcdef")))
    np.savez(d / "floatlabels.npz", x=x, y=np.array([0.0, 1.5, 2.0, 0.0, 1.0, 2.0]))
    np.savez(d / "nanlabels.npz", x=x, y=np.array([0.0, np.nan, 2.0, 0.0, 1.0, 2.0]))
    np.savez(d / "labels2d.npz", x=x, y=np.zeros((6, 2), np.int64))
    np.savez(d / "neglabels.npz", x=x, y=np.array([0, 1, -5, 0, 1, 2]))
    np.savez(d / "shortlabels.npz", x=x, y=np.array([0, 1]))
    np.savez(d / "empty.npz", x=np.zeros((0, 10, 10), np.uint8), y=np.zeros(0, np.int64))
    np.savez(d / "emptytest.npz", x=x, y=np.arange(6) % 2, x_test=np.zeros((0, 10, 10), np.uint8),
             y_test=np.zeros(0, np.int64))
    np.savez(d / "rgba.npz", x=np.zeros((4, 8, 8, 4), np.uint8))
    np.savez(d / "flat.npz", x=np.zeros((4, 64), np.uint8))
    np.savez(d / "noimages.npz", y=np.arange(4))
    (d / "dir.npz").mkdir()
    # cifar10 with a label out of range
    root = d / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), b"labels": [1, 12]}, f)
    # image folders
    (d / "nosplit").mkdir()
    (d / "noclasses" / "train").mkdir(parents=True)
    (d / "noclasses" / "train" / "x.png").write_bytes(b"")
    (d / "noimages" / "train" / "a").mkdir(parents=True)
    good = d / "unreadable" / "train"
    for c in ("a", "b"):
        (good / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(good / c / "ok.png")
    (good / "a" / "zero.png").write_bytes(b"")
    buf = (good / "b" / "ok.png").read_bytes()
    (good / "b" / "truncated.png").write_bytes(buf[: len(buf) // 2])
    (good / "b" / "text.jpg").write_text("hello")
    # teachers
    class ThreeD(torch.nn.Module):
        def forward(self, x):
            return x[:, :, :2, :2].flatten(2)

    class Picky(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-1] == 32, "expects 32 px"
            return x.mean(dim=(2, 3))

    class Inf(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(2, 3))
            return torch.where(m.mean(dim=1, keepdim=True) > 0.0, m / 0.0, m)

    class LateNan(torch.nn.Module):  # finite for the first rows, NaN for a bright image later on
        def forward(self, x):
            m = x.mean(dim=(2, 3))
            return torch.where(m.mean(dim=1, keepdim=True) > 1.2, m * float("nan"), m)

    for name, mod in (("threed", ThreeD()), ("picky", Picky()), ("inf", Inf()), ("latenan", LateNan())):
        torch.jit.script(mod.eval()).save(str(d / f"{name}.pt"))
    (d / "garbage.pt").write_bytes(b"\x00" * 100)
    late = rng.integers(0, 60, (24, 12, 12), dtype=np.uint8)
    late[20] = 255  # row 20, in chunk 2 (chunks of 8)
    np.savez(d / "late.npz", x=late, y=np.arange(24) % 3)
    return d


@pytest.fixture(scope="module")
def train_cache(world, tmp_path_factory):
    from tcskd.subspace.fit import BasisConfig, fit_basis

    cache = world.copy_ref("zarr", tmp_path_factory.mktemp("bad-train"))
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, device="cpu"))
    return cache


# -- explicit cases ---------------------------------------------------------------

DATA_CASES = [
    ("npz:{d}/garbage.npz", r"cannot read npz file .*garbage\.npz"),
    ("npz:{d}/object.npz", r"object\.npz.*'x'.*(pickle|object)"),
    ("npz:{d}/strlabels.npz", r"strlabels\.npz.*'y'.*integer"),
    ("npz:{d}/floatlabels.npz", r"floatlabels\.npz.*'y'.*integer"),
    ("npz:{d}/nanlabels.npz", r"nanlabels\.npz.*'y'.*integer"),
    ("npz:{d}/labels2d.npz", r"labels2d\.npz.*'y'.*shape"),
    ("npz:{d}/neglabels.npz", r"labels must be >= 0"),
    ("npz:{d}/shortlabels.npz", r"has 2 labels for 6 images"),
    ("npz:{d}/empty.npz", r"split 'train' has no samples"),
    ("npz:{d}/rgba.npz", r"'x' has shape \(4, 8, 8, 4\)"),
    ("npz:{d}/flat.npz", r"'x' has shape \(4, 64\)"),
    ("npz:{d}/noimages.npz", r"has no array 'x'"),
    ("npz:{d}/dir.npz", r"npz file not found"),
    ("npz:{d}/missing.npz", r"npz file not found: .*missing\.npz"),
    ("npz:", r"bad data spec 'npz:'"),
    ("npz:" + "n" * 300, r"File name too long"),
    (":x", r"unknown data spec|bad data spec"),
    ("NPZ:{d}/empty.npz", r"unknown data spec 'NPZ:"),
    ("cifar10:{d}/cifar", r"label 12 .*outside \[0, 10\)"),
    ("cifar100:{d}/cifar", r"cifar100: .* is missing"),
    ("imagefolder:{d}/nosplit", r"has no 'train' folder"),
    ("imagefolder:{d}/noclasses", r"has no class folders"),
    ("imagefolder:{d}/noimages", r"split 'train' has no samples"),
    ("imagefolder:{d}/unreadable", r"unreadable image .*(text\.jpg|truncated\.png|zero\.png).*--skip-bad"),
    ("imagefolder:{d}/missing", r"image folder not found"),
]


@pytest.mark.parametrize("spec, says", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(world, files, tmp_path, spec, says):
    refused(["cache", "--data", spec.format(d=files), "--teacher", world.teacher, "--image-size", "16",
             "--cache-root", tmp_path, "--device", "cpu"], says)


def test_empty_test_split(world, files, tmp_path):
    refused(["cache", "--data", f"npz:{files}/emptytest.npz", "--split", "test", "--teacher", world.teacher,
             "--image-size", "16", "--cache-root", tmp_path], r"split 'test' has no samples")


TEACHER_CASES = [
    ("torchscript:{d}/garbage.pt", r"cannot load torchscript module"),
    ("torchscript:{d}/threed.pt", r"expected 1 x D"),
    ("torchscript:{d}/picky.pt", r"teacher fails on a 1 x 3 x 16 x 16 input: .*expects 32 px"),
    ("torchscript:{d}/inf.pt", r"NaN/Inf features for rows 0\.\.7"),
    ("torchscript:{d}/none.pt", r"torchscript file not found"),
    ("torchscript:", r"bad teacher spec"),
    ("hub:{d}:entry", r"has no hubconf\.py"),
    ("hub:nothing", r"bad hub spec"),
    ("builtin:resnet", r"unknown built-in teacher 'resnet'"),
    ("timm:no_such_model_xyz", r"timm cannot build 'no_such_model_xyz'"),
    ("onnx:model.onnx", r"unknown teacher spec 'onnx:model\.onnx'"),
]


@pytest.mark.parametrize("spec, says", TEACHER_CASES, ids=[c[0] for c in TEACHER_CASES])
def test_bad_teacher(world, files, tmp_path, spec, says):
    refused(["cache", "--data", world.data, "--teacher", spec.format(d=files), "--image-size", "16",
             "--chunk-rows", "8", "--cache-root", tmp_path, "--device", "cpu"], says)


def test_teacher_nan_midway_keeps_earlier_chunks_only(world, files, tmp_path):
    from tcskd.store.registry import list_caches

    refused(["cache", "--data", f"npz:{files}/late.npz", "--teacher", f"torchscript:{files}/latenan.pt",
             "--image-size", "12", "--chunk-rows", "8", "--batch-size", "4", "--cache-root", tmp_path, "--device", "cpu",
             "--order", "source"],  # the bad samples 20.. are rows 20.. (the third chunk) in source order
            r"NaN/Inf features for rows 20\.\.23; nothing of this chunk was stored")
    (row,) = list_caches(tmp_path)
    assert row["chunks_done"] == "2/3" and row["complete"] is False
    r = _cli(["cache", "verify", row["path"]])
    assert r.exit_code == 1 and "incomplete" in r.output


def test_skip_bad_records_unreadable_images(world, files, tmp_path):
    from tcskd.store.backends import open_store

    r = _cli(["-q", "cache", "--data", f"imagefolder:{files}/unreadable", "--teacher", world.teacher, "--image-size",
              "16", "--cache-root", tmp_path, "--skip-bad", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with open_store(Path(r.stdout.strip().splitlines()[-1])) as s:
        assert len(s.manifest["skipped"]) == 3 and int(s.read("row_ok").sum()) == 2
    tally("bad_inputs", "cache")


CACHE_OPTION_CASES = [
    (["--views", "0"], r"--views must be >= 1"),
    (["--views", "-2"], r"--views must be >= 1"),
    (["--limit", "0"], r"--limit must be >= 1"),
    (["--limit", "-7"], r"--limit must be >= 1"),
    (["--chunk-rows", "0"], r"chunk rows must be >= 1"),
    (["--batch-size", "0"], r"--batch-size .* must be >= 1"),
    (["--image-size", "4"], r"--image-size must be >= 8"),
    (["--workers", "-1"], r"--workers must be >= 0"),
    (["--cache-root", "/dev/null/caches"], r"Not a directory|File exists"),
    (["--dim", "4"], r"--dim and --basis-from store coordinates of patch tokens: they need --tokens patch"),
    (["--tokens", "patch", "--dim", "0"], r"--dim must be >= 1"),
    (["--tokens", "patch", "--dim", "2", "--basis-sample", "1"], r"--basis-sample must be >= 2"),
    (["--tokens", "patch"], r"teacher torchscript:.*tiny\.pt gives no token grid \(only a global feature\)"),
]


@pytest.mark.parametrize("opts, says", CACHE_OPTION_CASES, ids=[" ".join(c[0]) for c in CACHE_OPTION_CASES])
def test_bad_cache_options(world, tmp_path, opts, says):
    args = ["cache", "--data", world.data, "--teacher", world.teacher, "--image-size", "16", "--cache-root", tmp_path,
            "--device", "cpu"]
    refused(args + opts, says)


@pytest.mark.parametrize("opts, option", [
    (["--split", "val"], "--split"), (["--format", "parquet"], "--format"), (["--dtype", "int8"], "--dtype"),
    (["--views", "two"], "--views"), (["--device", "tpu"], "--device"),
])
def test_click_usage_errors(world, tmp_path, opts, option):
    usage_error(["cache", "--data", world.data, "--cache-root", tmp_path] + opts, option)


def test_dense_basis_on_a_global_cache_is_refused_and_loses_nothing(world, tmp_path):
    """--basis-from a global cache, or --dim beyond the teacher's width; tcskd basis on a --dim K cache."""
    from tcskd.cache.verify import verify_cache

    glob = world.copy_ref("zarr", tmp_path)
    base = ["cache", "--data", world.data, "--teacher", world.dense_teacher, "--image-size", "16", "--tokens", "patch",
            "--cache-root", tmp_path, "--device", "cpu"]
    refused(base + ["--dim", "2", "--basis-from", glob], r"is a global cache .*a dense basis on a global cache")
    refused(base + ["--dim", "99"], r"--dim 99 exceeds the width of teacher torchscript:.* tokens \(8\)")
    assert verify_cache(glob).ok and sorted(p.name for p in tmp_path.iterdir()) == [glob.name]
    r = _cli(["-q", *base, "--dim", "2", "--chunk-rows", "8", "--basis-sample", "5"])
    assert r.exit_code == 0, r.output
    coords = r.stdout.strip().splitlines()[-1]
    refused(["basis", "--cache", coords, "--device", "cpu"],
            r"already holds coordinates of basis 'pca' \(built with tcskd cache --dim 2\)")
    assert verify_cache(Path(coords)).ok


def _train_case(cache, tmp_path, opts):
    base = ["train", "--cache", cache, "--student", SPEC, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--out", tmp_path / "run"]
    return base + opts


TRAIN_CASES = [
    (["--epochs", "0"], r"--epochs must be >= 1"),
    (["--batch-size", "0"], r"--batch-size must be >= 1"),
    (["--dim", "0"], r"--dim must be >= 1"),
    (["--dim", "99"], r"--dim 99 exceeds the 8 components"),
    (["--basis", "nope"], r"no complete basis 'nope' \(bases: pca\)"),
    (["--student", "nope"], r"unknown student 'nope'"),
    (["--student", "tv:nope"], r"torchvision cannot build 'nope'"),
    (["--student", "python:no_such_module_xyz:f"], r"cannot import student factory no_such_module_xyz:f"),
    (["--student", "python:math:pi"], r"cannot build student 'python:math:pi': TypeError: 'float' object is not call"),
    (["--student", "python:os.path:join"], r"cannot build student 'python:os\.path:join': TypeError"),
    (["--student", "python:a:b:c"], r"expected python:MODULE:FACTORY"),
    (["--student", "python:.rel:f"], r"cannot build student 'python:\.rel:f': TypeError: .*relative import"),
    (["--lr", "-1"], r"--lr must be a finite number > 0"),
    (["--lr", "nan"], r"--lr must be a finite number > 0"),
    (["--lr", "inf"], r"--lr must be a finite number > 0"),
    (["--weight-decay", "-0.1"], r"--weight-decay must be a finite number >= 0"),
    (["--momentum", "1.5"], r"--momentum must be in \[0, 1\)"),
    (["--lambda", "nan"], r"--lambda must be a finite number >= 0"),
    (["--lambda", "-2"], r"--lambda must be a finite number >= 0"),
    (["--warmup-epochs", "-1"], r"--warmup-epochs must be a finite number >= 0"),
    (["--elsh-weight", "inf"], r"--elsh-weight must be a finite number >= 0"),
    (["--drop-frac", "1"], r"--drop-frac must be in \[0, 1\)"),
    (["--min-dim", "0"], r"--min-dim must be >= 1"),
    (["--labels-per-class", "0"], r"--labels-per-class must be >= 1"),
    (["--image-size", "4"], r"--image-size must be >= 8"),
    (["--elsh-bits", "-1"], r"--elsh-bits must be >= 0"),
    (["--eval-every", "0"], r"--eval-every must be >= 1"),
]


@pytest.mark.parametrize("opts, says", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_bad_train_options(train_cache, tmp_path, opts, says):
    refused(_train_case(train_cache, tmp_path, opts), says)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_train_paths(world, train_cache, files, tmp_path):
    refused(["train", "--cache", tmp_path / "nope", "--out", tmp_path / "r"], r"no cache '.*nope'")
    refused(["train", "--method", "ce", "--out", tmp_path / "r"], r"--cache is required")
    refused(["train", "--cache", train_cache, "--resume"], r"--resume needs --out")
    (tmp_path / "file").write_text("")
    refused(_train_case(train_cache, tmp_path, ["--out", tmp_path / "file" / "run"]), r"Not a directory|File exists")
    refused(_train_case(train_cache, tmp_path, ["--data", f"npz:{files}/late.npz"]), r"does not match data")
    run = tmp_path / "broken"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    refused(_train_case(train_cache, tmp_path, ["--out", run, "--resume"]), r"cannot read checkpoint")
    refused(["export", run, "--out", tmp_path / "s.pt2"], r"cannot read checkpoint")
    refused(["export", tmp_path, "--out", tmp_path / "s.pt2"], r"has no checkpoint\.pt")


BASIS_CASES = [
    (["--dim", "0"], r"--dim must be at least 1"),
    (["--dim", "99"], r"--dim 99 exceeds the feature dimension 16"),
    (["--energy", "0"], r"--energy must be in \(0, 1\]"),
    (["--energy", "1.5"], r"--energy must be in \(0, 1\]"),
    (["--energy", "nan"], r"--energy must be in \(0, 1\]"),
    (["--dim", "3", "--energy", "0.5"], r"give --dim or --energy, not both"),
    (["--name", ".hidden"], r"invalid basis name '\.hidden'"),
    (["--name", "a/b"], r"invalid basis name 'a/b'"),
    (["--chunk-rows", "0"], r"--chunk-rows must be at least 1"),
    (["--fit-on", "/no/such/cache"], r"no cache '/no/such/cache'"),
    (["--kind", "identity", "--energy", "0.5"], r"identity basis keeps every dimension"),
]


@pytest.mark.parametrize("opts, says", BASIS_CASES, ids=[" ".join(c[0]) for c in BASIS_CASES])
def test_bad_basis_options(train_cache, opts, says):
    refused(["basis", "--cache", train_cache, "--device", "cpu"] + opts, says)


def test_other_missing_paths(tmp_path):
    refused(["basis", "--cache", tmp_path / "nope"], r"no cache")
    refused(["cache", "info", tmp_path], r"no cache")
    refused(["cache", "verify", tmp_path / "x"], r"no cache")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    refused(["cache", "info", tmp_path / "fake"], r"has no tcskd manifest")


def test_debug_shows_the_traceback(tmp_path):
    r = _cli(["--debug", "train", "--cache", tmp_path / "nope", "--out", tmp_path / "r"])
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)
    assert "no cache" in str(r.exception)
    tally("bad_inputs", "train")


def test_debug_shows_the_traceback_under_cache(tmp_path):
    r = _cli(["--debug", "cache", "--data", "nope:x", "--cache-root", tmp_path])
    assert r.exception is not None and not isinstance(r.exception, SystemExit)


# -- odd but valid images: accepted -------------------------------------------------

def test_odd_sizes_and_modes_are_accepted(world, tmp_path):
    from PIL import Image

    from tcskd.store.backends import open_store

    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    shapes = {"rgba.png": ("RGBA", (7, 5)), "palette.png": ("P", (13, 3)), "la.png": ("LA", (1, 1)),
              "i16.png": ("I;16", (20, 2)), "bw.png": ("1", (9, 31)), "cmyk.jpg": ("CMYK", (6, 6)),
              "tall.png": ("L", (1, 300)), "wide.png": ("RGB", (300, 1)), "float.tif": ("F", (5, 8))}
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for name, (mode, size) in shapes.items():
                arr = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
                Image.fromarray(arr, "RGBA").convert(mode).save(d / name)
    r = _cli(["-q", "cache", "--data", f"imagefolder:{root}", "--teacher", world.teacher, "--image-size", "16",
              "--views", "3", "--cache-root", tmp_path / "c", "--device", "cpu"])
    assert r.exit_code == 0, (r.output, r.exception)
    with open_store(Path(r.stdout.strip().splitlines()[-1])) as s:
        assert s.read("row_ok").all() and np.isfinite(s.read("features")).all() and s.manifest["complete"]
    odd = [np.zeros((3, 1, 1), np.uint8), np.full((3, 1, 40, 3), 200, np.uint8), np.ones((2, 17, 9), np.float32)]
    for i, x in enumerate(odd):
        np.savez(tmp_path / f"odd{i}.npz", x=x, y=np.arange(len(x)) % 2)
        r = _cli(["-q", "cache", "--data", f"npz:{tmp_path}/odd{i}.npz", "--teacher", world.teacher,
                  "--image-size", "16", "--views", "2", "--cache-root", tmp_path / "c", "--device", "cpu"])
        assert r.exit_code == 0, (x.shape, r.output, r.exception)
    tally("bad_inputs", "odd image accepted", len(shapes) + len(odd))


# -- property-based: spec strings and CLI options --------------------------------------------

KINDS = ["npz", "imagefolder", "cifar10", "cifar100", "builtin", "NPZ", "", "file"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)


@PROPERTY
@given(spec=st.one_of(TEXT, st.builds(lambda k, a: f"{k}:{a}", st.sampled_from(KINDS), TEXT)),
       split=st.sampled_from(["train", "test", "all", "val"]))
def test_any_data_spec_opens_or_fails_cleanly(spec, split):
    from tcskd.data import DataError, open_source

    tally("bad_inputs", "data spec (hypothesis)")
    try:
        open_source(spec, split)
    except DataError as e:
        assert str(e) and "\n" not in str(e)


TEACHER_KINDS = ["torchscript", "hub", "builtin", "timm", "onnx", ""]


@PROPERTY
@given(spec=st.one_of(TEXT, st.builds(lambda k, a: f"{k}:{a}", st.sampled_from(TEACHER_KINDS), TEXT)))
def test_any_teacher_spec_loads_or_fails_cleanly(spec):
    from tcskd.teachers import TeacherError, load_teacher

    tally("bad_inputs", "teacher spec (hypothesis)")
    try:
        load_teacher(spec, 16)
    except TeacherError as e:
        assert str(e)


@PROPERTY
@given(spec=st.one_of(TEXT, st.builds(lambda k, a: f"{k}{a}", st.sampled_from(["tv:", "python:", "resnet", ""]),
                                       st.text(alphabet="abc._:", max_size=12))))
def test_any_student_spec_builds_or_fails_cleanly(spec):
    from tcskd.train.students import make_student
    from tcskd.train.students import StudentError

    tally("bad_inputs", "student spec (hypothesis)")
    try:
        make_student(spec, 4, 1)
    except StudentError as e:
        assert str(e)


_CACHE_ROOT = tempfile.TemporaryDirectory(prefix="tcskd-rel-")
SMALL = st.integers(min_value=-3, max_value=20)


@settings(PROPERTY, max_examples=25)
@given(views=SMALL, limit=st.one_of(st.none(), SMALL), chunk=SMALL, batch=st.one_of(st.none(), SMALL),
       size=st.integers(min_value=-1, max_value=20), split=st.sampled_from(["train", "test", "all"]))
def test_any_cache_options_build_or_fail_cleanly(world, views, limit, chunk, batch, size, split):
    from tcskd.cache.verify import verify_cache

    args = ["-q", "cache", "--data", world.data, "--teacher", world.teacher, "--views", views, "--chunk-rows", chunk,
            "--image-size", size, "--split", split, "--cache-root", _CACHE_ROOT.name, "--device", "cpu"]
    args += ["--limit", limit] if limit is not None else []
    args += ["--batch-size", batch] if batch is not None else []
    r = _cli(args)
    tally("bad_inputs", "cache options (hypothesis)")
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    if r.exit_code == 0:
        assert verify_cache(Path(r.stdout.strip().splitlines()[-1])).ok
    else:
        assert r.exit_code == 2
        one_error_line(r.stderr)


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -1.0, 0.5, 1.0, 1e-3]))
INTS = st.integers(min_value=-2, max_value=12)


@settings(PROPERTY, max_examples=40)
@given(lr=FLOATS, lam=FLOATS, momentum=FLOATS, wd=FLOATS, drop=FLOATS, warmup=FLOATS, epochs=INTS, batch=INTS,
       dim=st.one_of(st.none(), INTS), min_dim=INTS, lpc=st.one_of(st.none(), INTS), select=INTS, bits=INTS,
       optimizer=st.sampled_from(["sgd", "adamw"]))
def test_any_train_options_start_or_fail_cleanly(train_cache, lr, lam, momentum, wd, drop, warmup, epochs, batch, dim,
                                                 min_dim, lpc, select, bits, optimizer):
    out = Path(tempfile.mkdtemp(prefix="run-", dir=_CACHE_ROOT.name))
    args = ["-q", "train", "--cache", train_cache, "--student", SPEC, "--device", "cpu", "--out", out / "r",
            "--lr", lr, "--lambda", lam, "--momentum", momentum, "--weight-decay", wd, "--drop-frac", drop,
            "--warmup-epochs", warmup, "--epochs", epochs, "--batch-size", batch, "--min-dim", min_dim,
            "--select-every", select, "--elsh-bits", bits, "--optimizer", optimizer, "--stop-after", "0"]
    args += ["--dim", dim] if dim is not None else []
    args += ["--labels-per-class", lpc] if lpc is not None else []
    r = _cli(args)
    tally("bad_inputs", "train options (hypothesis)")
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    if r.exit_code != 0:
        assert r.exit_code == 2
        one_error_line(r.stderr)
