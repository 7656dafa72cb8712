"""What ``tcskd bench`` measures: its configuration, the built-in profiles, the goals and reference figures."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from tcskd.errors import TcskdError

BENCH_SCHEMA = 1

#: DESIGN.md "Reference figures" (one NVIDIA H200, bf16, random weights).
REFERENCE = {
    "forward": {"vits14": 13758.0, "vitb14": 6211.0, "vitl14": 2144.0},
    "train_img_per_s": {"tcs": 36116.0, "online": 11426.0},
    "train_peak_gb": {"tcs": 1.35, "online": 2.12},
    "device": "NVIDIA H200 (DESIGN.md reference figures; CIFAR ResNet-18 student, ViT-S/14 teacher)",
}

GOALS = {
    # name: (op, goal, applies on: "cuda" | "any", what)
    "cache_vs_forward": (">=", 0.9, "cuda", "end-to-end cache rows/s / teacher forward rows/s (largest N)"),
    "cache_cost_linear": ("<=", 1.1, "any", "seconds per row at 4N / at N rows (super-linear growth > 1)"),
    "basis_vs_read": ("<=", 1.5, "any", "tcskd basis seconds / one sequential read of features (largest N)"),
    "tcs_vs_ce_throughput": (">=", 0.95, "any", "img/s of tcs / img/s of ce"),
    "online_vs_tcs_time": (">=", 2.0, "cuda", "time per image of online / of tcs (ViT-S-class teacher)"),
    "tcs_vs_online_memory": ("<=", 0.7, "any", "peak memory of tcs / of online"),
    "train_vs_cache_input_cpu": ("<=", 1.3, "any", "CPU s per image of the training loader / of the cache's "
                                                   "loader (500x375 JPEGs, 224 px, 1 worker)"),
}


@dataclass
class TeacherSpec:
    """One teacher a profile measures: a spec, or a DINOv2 architecture written at run time."""

    label: str
    spec: str | None
    """A teacher spec; None for a DINOv2 architecture written at run time (``arch``)."""
    image_size: int | None = None
    arch: str | None = None
    arch_overrides: dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    """Skipped when the time budget runs short."""
    sizes: bool = True
    """Measure N, 2N, 4N rows (the main teacher); else only ``cache_rows_other`` rows."""


@dataclass
class BenchConfig:
    """What ``tcskd bench`` measures; :func:`profile_config` fills it for a profile."""

    profile: str = "cpu"
    device: str = "cpu"
    quick: bool = False
    data: str | None = "builtin:mnist5k"
    """Dataset spec; None = synthetic CIFAR-like npz of ``synthetic_images`` 32 px images."""
    synthetic_images: int = 0
    synthetic_size: int = 32
    teachers: list[TeacherSpec] = field(default_factory=list)
    cache_rows: int = 256
    """N: the main teacher's cache is built at N, 2N and 4N rows."""
    cache_rows_other: int = 1024
    """Rows of the other teachers' caches."""
    cache_batch: int = 32
    cache_workers: int = 0
    chunk_rows: int = 1024
    forward_seconds: float = 0.5
    """Minimum seconds per repeat of the forward-only measurement."""
    basis_dim: int = 64
    basis_rows_large: int = 0
    """Also time the basis on a store of this many rows (the main cache's features tiled); 0 = no."""
    basis_plot: bool = True
    """Draw ``fit_basis``'s scree plot, as ``tcskd basis`` does (needs matplotlib; drawn only where it is
    installed); False leaves it out of every figure."""
    student: str = "cnn"
    train_batch: int = 128
    train_epochs: int = 3
    """Measured epochs; one warm-up epoch runs before them."""
    train_workers: int | None = None
    """None = tcskd train's own default (``auto``: one less than the usable cores, at most 16)."""
    methods: tuple[str, ...] = ("ce", "tcs", "online")
    isolate: bool = True
    """Each training method in its own child process (peak RSS per method)."""
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    budget_s: float = 170.0
    """Soft time budget: optional teachers are skipped when it runs short."""
    workdir: str | None = None
    """Where caches and runs go (a temporary folder, removed at the end, when None)."""
    child_timeout_s: float = 600.0
    dense_rows: int = 0
    """Rows of the dense-vs-global comparison (tcskd.bench.dense) on the main teacher; 0 = none."""
    dense_dim: int = 64
    """K of the ``--dim K`` cache in that comparison (at most the teacher's width)."""
    input_images: int = 0
    """JPEGs (500 x 375, written at run time) of the input section (tcskd.bench.inputs); 0 = no section."""
    input_repeats: int = 1
    """Runs of each loader over them (the median is reported)."""
    input_batch: int = 64
    input_px: int = 224
    """Teacher and student input size of the input section."""
    scale_global_rows: tuple[int, ...] = ()
    """N of the targets-at-scale section (tcskd.bench.scale), global K-coordinate targets; () = none."""
    scale_dense_rows: tuple[int, ...] = ()
    """N of that section's dense targets (``scale_tokens`` tokens x K coordinates); () = none."""
    scale_k: int = 64
    scale_tokens: int = 256
    scale_budget_mb: int = 16
    """``--target-cache-mb`` of its store mode."""
    peer_arms: tuple[str, ...] = ("torchdistill-ce", "timm-ce", "torchdistill-fitnet", "timm-fitnet")
    """The peers section (tcskd.bench.peerbench): these arms of tcskd.bench.peers on the main cache, timed as
    the train section (``train_epochs`` after one warm-up, its student, batch and workers); () = none."""


def profile_config(profile: str, device: str, quick: bool = False, **overrides: Any) -> BenchConfig:
    """The built-in ``cpu`` or ``gpu`` profile (``quick``: tiny sizes for a smoke run)."""
    if profile == "cpu":
        cfg = BenchConfig(
            profile="cpu", device=device, quick=quick, data="builtin:mnist5k",
            teachers=[TeacherSpec("efficientnet-lite0@64", "builtin:efficientnet-lite0", 64)],
            cache_rows=64 if quick else 256, cache_batch=32, cache_workers=0, forward_seconds=0.3 if quick else 1.0,
            basis_dim=64, basis_rows_large=0 if quick else 4096, student="cnn", train_batch=64 if quick else 128, train_epochs=1 if quick else 3,
            repeats=2 if quick else 3, warmup=1, budget_s=60.0 if quick else 170.0, dense_rows=64 if quick else 256,
            input_images=200 if quick else 2000, input_repeats=1,
            # dense: 20k rows x 256 x 64 float16 is 655 MB already (200k would be 6.5 GB to write)
            scale_global_rows=(2000, 8000) if quick else (50000, 200000),
            scale_dense_rows=(100, 400) if quick else (5000, 20000))
    elif profile == "gpu":
        cores = os.cpu_count() or 1
        cfg = BenchConfig(
            profile="gpu", device=device, quick=quick, data=None,
            synthetic_images=2048 * 4 if quick else 4096 * 4, synthetic_size=32,
            teachers=[TeacherSpec("vits14", None, 224, arch="vits14"),
                      TeacherSpec("vitb14", None, 224, arch="vitb14", optional=True, sizes=False),
                      TeacherSpec("vitl14", None, 224, arch="vitl14", optional=True, sizes=False)],
            cache_rows=2048 if quick else 4096, cache_rows_other=8192, cache_batch=256,
            cache_workers=min(8, cores), forward_seconds=0.5 if quick else 1.0, basis_dim=64,
            basis_rows_large=65536 if quick else 262144,
            student="resnet32x4", train_batch=512, train_epochs=1 if quick else 3,
            repeats=2 if quick else 3, warmup=1, budget_s=150.0 if quick else 290.0, dense_rows=1024 if quick else 4096,
            input_images=500 if quick else 2000, input_repeats=1 if quick else 3,
            scale_global_rows=(2000, 8000) if quick else (50000, 200000),
            scale_dense_rows=(100, 400) if quick else (5000, 20000))
        if quick:
            cfg.teachers = cfg.teachers[:1]
    else:
        raise TcskdError(f"unknown profile '{profile}' (choose cpu or gpu)")
    return dataclasses.replace(cfg, **overrides)
