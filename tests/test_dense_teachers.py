"""Golden tests of the teachers' token grids (``Teacher.token_map``) against the wrapped libraries' own outputs.

hf: a tiny random DINOv2 (with and without registers) saved to a folder: the token map is transformers'
``last_hidden_state`` without CLS and registers, reshaped row-major; ``#mean`` is its mean. builtin: the
package's own ``extract_features``; its spatial mean is ``features``. timm: ``forward_features`` without the
prefix tokens (ViT) or as it is (CNN). hub/torchscript: a module's own 4-D map, or no tokens.
"""

from __future__ import annotations

import pytest
import torch

from tcskd.teachers import NoTokensError, load_teacher
from test_teacher_golden import _PRE, _hopper_224, _normalise, _reference_lite0, _tiny_hf
from _stores import map_teacher


def _u8(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_token_map_is_the_patch_tokens_of_last_hidden_state(tmp_path, registers):
    d, model = _tiny_hf(tmp_path, registers)
    cls, mean = load_teacher(f"hf:{d}"), load_teacher(f"hf:{d}#mean")
    assert cls.grid == (5, 5) and cls.patch == 7.0  # 35 px crop, patch 7
    x = _u8((3, 3, 35, 35), 1)
    with torch.inference_mode():
        tokens = model(pixel_values=_normalise(x, _PRE["image_mean"], _PRE["image_std"])).last_hidden_state
        got = cls.token_map(x)
        pooled = mean.features(x)
    assert tokens.shape[1] == 1 + registers + 25
    patches = tokens[:, 1 + registers:]  # CLS and registers left out
    want = patches.reshape(3, 5, 5, 32).permute(0, 3, 1, 2)  # row-major (y, x): token i*5+j at (i, j)
    assert got.dtype == torch.float32 and got.shape == (3, 32, 5, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, :, 1, 3], patches[:, 1 * 5 + 3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, got.mean((2, 3)), rtol=1e-4, atol=1e-5)
    if registers:
        assert not torch.allclose(got.flatten(2).transpose(1, 2), tokens[:, 1:26], atol=1e-3)


def test_hf_grid_follows_the_image_size(tmp_path):
    d, model = _tiny_hf(tmp_path, 0)
    t = load_teacher(f"hf:{d}", image_size=56)
    x = _u8((2, 3, 56, 56), 2)
    with torch.inference_mode():
        want = model(pixel_values=_normalise(x, _PRE["image_mean"], _PRE["image_std"])).last_hidden_state[:, 1:]
        got = t.token_map(x)
    assert t.grid == (8, 8) and t.patch == 7.0
    torch.testing.assert_close(got, want.reshape(2, 8, 8, 32).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size, grid", [(224, (7, 7)), pytest.param(448, (14, 14), marks=pytest.mark.slow)])
def test_builtin_token_map_is_extract_features(size, grid):
    ref = _reference_lite0()
    t = load_teacher("builtin:efficientnet-lite0", size)
    x = _hopper_224() if size == 224 else torch.nn.functional.interpolate(_hopper_224().float(), size=size,
                                                                          mode="bilinear").round().byte()
    with torch.inference_mode():
        want = ref.extract_features(_normalise(x, (0.5,) * 3, (0.5,) * 3))
        got = t.token_map(x)
        feat = t.features(x)
    assert t.grid == grid and t.patch == 32.0 and got.shape == (1, 1280, *grid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.mean((2, 3)), feat, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, size, grid", [("test_resnet", 64, (2, 2)), ("test_vit", None, (10, 10))])
def test_timm_token_map_is_forward_features(name, size, grid):
    import timm

    t = load_teacher(f"timm:{name}", size)
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    ref.load_state_dict(t.module.state_dict())
    ref.eval()
    side = t.image_size
    x = _u8((2, 3, side, side), 3)
    with torch.inference_mode():
        out = ref.forward_features(_normalise(x, t.mean, t.std))
        got = t.token_map(x)
    if out.ndim == 3:  # a ViT: the class token (num_prefix_tokens) left out, the rest on the patch grid
        assert ref.num_prefix_tokens == 1
        out = out[:, 1:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
    assert t.grid == grid and got.shape == (2, ref.num_features, *grid)
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)


def test_module_teachers_tokens_are_their_own_map_or_none(tmp_path, tiny_teacher):
    spec = map_teacher(tmp_path)
    t = load_teacher(spec, 16)
    x = _u8((2, 3, 16, 16), 4)
    with torch.inference_mode():
        want = t.module(t.normalize(x.float() / 255))
        torch.testing.assert_close(t.token_map(x), want)
        torch.testing.assert_close(t.features(x), want.mean((2, 3)))
    assert t.grid == (4, 4) and t.patch == 4.0 and t.dim == 8
    flat = load_teacher(tiny_teacher, 16)  # returns B x D: no tokens
    assert flat.grid is None and flat.patch is None
    with pytest.raises(NoTokensError, match="torchscript:.* gives no token grid"):
        flat.token_map(x)
