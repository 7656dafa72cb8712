"""``tcskd bench``: how fast each stage runs, against the figure it should be compared with.

Every comparison is measured in one process (the training methods: one child
process each, so that a CPU peak RSS belongs to one method) on the same inputs,
and every figure is the median of ``repeats`` runs after ``warmup`` runs:

- cache: end-to-end rows/s of :func:`tcskd.cache.build.build_cache` (what
  ``tcskd cache`` runs: teacher load, store creation, input pipeline, forward,
  writes) versus the teacher's forward alone on the same device and batch size,
  on pre-decoded inputs already on the device -> ``cache_vs_forward``; the
  input pipeline alone (the cache's DataLoader without the teacher); and
  rows/s at N, 2N and 4N rows with a linear fit (fixed seconds + marginal
  rows/s), whose per-row cost must not grow with N.
- basis: :func:`tcskd.subspace.fit.fit_basis` versus one plain sequential read
  of ``features`` -> ``basis_vs_read``; the streamed moments alone as well.
- train: :func:`tcskd.train.loop.train` for ``ce``, ``tcs`` (cached targets)
  and ``online`` (teacher in the loop) with the same student, batch and steps:
  img/s (the loop's own per-epoch figure; epoch 1 is the warm-up) and peak
  memory (CUDA max allocated, or the child process's peak RSS).
- dataloading: per training method, the time the loop waits for its next batch
  (the DataLoader is wrapped by a timer), and the DataLoader alone.

Profiles: ``cpu`` is the built-in default (builtin:mnist5k, EfficientNet-Lite0
at 64 px, student ``cnn``), sized to finish in under 3 minutes on 2 cores;
``gpu`` uses DINOv2-architecture teachers with random weights (ViT-S/14,
ViT-B/14, ViT-L/14 at 224 px, written with transformers into a temporary
folder) on synthetic CIFAR-like 32 px images, and a CIFAR student at batch 512.

Output: a JSON document (``--out``, rewritten after every section, so a run cut
short keeps what it measured) and a Markdown table, printed and written beside
the JSON (same name, ``.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tcskd
from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

BENCH_SCHEMA = 1
CHILD_MARK = "TCSKD_BENCH_CHILD "
REPO_ROOT = Path(__file__).resolve().parent.parent

#: DESIGN.md "Reference figures" (one NVIDIA H200, bf16, random weights).
REFERENCE = {
    "forward": {"vits14": 13758.0, "vitb14": 6211.0, "vitl14": 2144.0},
    "train_img_per_s": {"tcs": 36116.0, "online": 11426.0},
    "train_peak_gb": {"tcs": 1.35, "online": 2.12},
    "device": "NVIDIA H200 (DESIGN.md reference figures; CIFAR ResNet-18 student, ViT-S/14 teacher)",
}

#: DINOv2 architectures (hidden size, layers, heads; MLP ratio 4, patch 14, 224 px).
DINOV2 = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}

GOALS = {
    # name: (op, goal, applies on: "cuda" | "any", what)
    "cache_vs_forward": (">=", 0.9, "cuda", "end-to-end cache rows/s / teacher forward rows/s (largest N)"),
    "cache_cost_linear": ("<=", 1.1, "any", "seconds per row at 4N / at N rows (super-linear growth > 1)"),
    "basis_vs_read": ("<=", 1.5, "any", "tcskd basis seconds / one sequential read of features (largest N)"),
    "tcs_vs_ce_throughput": (">=", 0.95, "any", "img/s of tcs / img/s of ce"),
    "online_vs_tcs_time": (">=", 2.0, "cuda", "time per image of online / of tcs (ViT-S-class teacher)"),
    "tcs_vs_online_memory": ("<=", 0.7, "any", "peak memory of tcs / of online"),
}


# -- configuration -------------------------------------------------------------

@dataclass
class TeacherSpec:
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
    student: str = "cnn"
    train_batch: int = 128
    train_epochs: int = 3
    """Measured epochs; one warm-up epoch runs before them."""
    train_workers: int | None = None
    """None = tcskd train's own default (0 on the CPU, min(8, cores) on CUDA)."""
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


def profile_config(profile: str, device: str, quick: bool = False, **overrides: Any) -> BenchConfig:
    """The built-in ``cpu`` or ``gpu`` profile (``quick``: tiny sizes for a smoke run)."""
    if profile == "cpu":
        cfg = BenchConfig(
            profile="cpu", device=device, quick=quick, data="builtin:mnist5k",
            teachers=[TeacherSpec("efficientnet-lite0@64", "builtin:efficientnet-lite0", 64)],
            cache_rows=64 if quick else 256, cache_batch=32, cache_workers=0, forward_seconds=0.3 if quick else 1.0,
            basis_dim=64, basis_rows_large=0 if quick else 4096, student="cnn", train_batch=64 if quick else 128, train_epochs=1 if quick else 3,
            repeats=2 if quick else 3, warmup=1, budget_s=60.0 if quick else 170.0)
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
            repeats=2 if quick else 3, warmup=1, budget_s=150.0 if quick else 290.0)
        if quick:
            cfg.teachers = cfg.teachers[:1]
    else:
        raise TcskdError(f"unknown profile '{profile}' (choose cpu or gpu)")
    return dataclasses.replace(cfg, **overrides)


# -- small helpers ----------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(runs: list[float]) -> dict[str, Any]:
    a = np.asarray(runs, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "runs": [round(float(v), 6) for v in a]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    from tcskd.cache.build import _git_sha

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "tcskd": tcskd.__version__, "git_sha": _git_sha(), "torch": torch.__version__, "numpy": np.__version__,
    }
    try:
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, timeout=5, cwd=REPO_ROOT)
        env["git_dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git_dirty"] = None
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("zarr", "h5py", "numcodecs", "transformers", "torchvision", "faiss-cpu", "matplotlib"):
        try:
            env[mod] = version(mod)  # without importing it
        except PackageNotFoundError:
            env[mod] = None
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    return env


def threads_probe(reps: int = 10) -> dict[str, Any] | None:
    """A small convolution with torch's current intra-op threads and with one thread (CPU only).

    On a machine whose cores other processes keep busy, every parallel region waits for
    a descheduled thread: one thread can then be many times faster than several."""
    n = torch.get_num_threads()
    if n <= 1:
        return None
    x, w = torch.randn(8, 32, 32, 32), torch.randn(32, 32, 3, 3)

    def ms(threads: int) -> float:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(2):
                torch.nn.functional.conv2d(x, w, padding=1)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.conv2d(x, w, padding=1)
        return 1e3 * (time.perf_counter() - t0) / reps

    try:
        many, one = ms(n), ms(1)
    finally:
        torch.set_num_threads(n)
    return {"threads": n, "conv_ms": round(many, 3), "one_thread_conv_ms": round(one, 3),
            "one_thread_faster": one < many}


def _write_atomic(path: Path, text: str) -> None:
    from tcskd.train.rundir import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


# -- inputs: synthetic data and DINOv2 teachers ------------------------------------

def make_synthetic_npz(path: Path, n: int, size: int = 32, channels: int = 3, classes: int = 10,
                       seed: int = 0) -> str:
    """CIFAR-like uint8 images (smooth random blobs, so resizing sees real structure); a ``npz:`` spec."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, channels), dtype=np.uint8)
    x = np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2)
    x = np.clip(x.astype(np.int16) + rng.integers(-16, 17, x.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def make_dinov2(path: Path, arch: str, image_size: int = 224, **overrides: Any) -> str:
    """A randomly initialised DINOv2-architecture model saved with transformers; an ``hf:`` spec."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        raise TcskdError("the gpu profile needs transformers (DINOv2 teachers)") from None
    kw = dict(DINOV2.get(arch, {}))
    kw.update(overrides)
    config = Dinov2Config(image_size=image_size, patch_size=14, mlp_ratio=4, **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Dinov2Model(config).eval()
    path = Path(path)
    model.save_pretrained(str(path))
    del model
    return f"hf:{path}"


# -- cache --------------------------------------------------------------------------

def bench_forward(teacher_spec: str, data: str, image_size: int | None, batch: int, device: torch.device,
                  repeats: int, warmup: int, min_seconds: float) -> dict[str, Any]:
    """The teacher's forward alone (``tcskd cache``'s _forward) on one pre-decoded batch already on the device."""
    from tcskd.cache.build import _collate, _forward, _limit, _TeacherInputs
    from tcskd.cache.views import DEFAULT_SCALE
    from tcskd.data import open_source
    from tcskd.teachers import load_teacher

    teacher = load_teacher(teacher_spec, image_size).to(device)
    source = _limit(open_source(data, "train"), batch)
    ds = _TeacherInputs(source, 1, teacher.image_size, 0, DEFAULT_SCALE)
    items = [ds[i] for i in range(len(ds))]
    while len(items) < batch:  # a source smaller than a batch: repeat its rows
        items += items[: batch - len(items)]
    x = _collate(items)[1].to(device)

    def one() -> None:
        _forward(teacher, x, device).cpu()

    for _ in range(max(1, warmup) + 1):
        one()
    _sync(device)
    t0 = time.perf_counter()
    one()
    _sync(device)
    per_batch = time.perf_counter() - t0
    n_batches = int(min(500, max(2, round(min_seconds / max(per_batch, 1e-6)))))
    runs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            one()
        _sync(device)
        runs.append(n_batches * batch / (time.perf_counter() - t0))
    out = {"teacher": teacher_spec, "image_size": teacher.image_size, "dim": teacher.dim, "batch": batch,
           "batches_per_repeat": n_batches, "rows_per_s": _stats(runs)}
    del teacher, x
    _free(device)
    return out


def bench_cache_inputs(data: str, image_size: int, rows: int, batch: int, workers: int, chunk_rows: int,
                       device: torch.device, repeats: int) -> dict[str, Any]:
    """The cache stage's input pipeline alone: its DataLoader (decode, views, collate, pinning), no teacher
    (on a GPU, in-memory images are resized by the device, inside the cache's forward, not here)."""
    from torch.utils.data import DataLoader

    from tcskd.cache.build import _batches, _collate, _limit, _TeacherInputs
    from tcskd.cache.store import iter_chunks
    from tcskd.cache.views import DEFAULT_SCALE, resize_on_device
    from tcskd.data import open_source

    source = _limit(open_source(data, "train"), rows)
    ds = _TeacherInputs(source, 1, image_size, 0, DEFAULT_SCALE, resize_on_device(device))
    todo = list(iter_chunks(len(source), chunk_rows))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loader = DataLoader(ds, batch_sampler=_batches(todo, batch), num_workers=workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if workers else None)
        n = 0
        for _, x, *_ in loader:
            n += len(x)
        runs.append(n / (time.perf_counter() - t0))
    return {"rows": len(source), "batch": batch, "workers": workers, "rows_per_s": _stats(runs)}


def _linear_fit(sizes: list[int], seconds: list[float]) -> dict[str, Any] | None:
    if len(sizes) < 2:
        return None
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    pred = a + b * np.asarray(sizes, float)
    out = {"fixed_s": float(a), "marginal_rows_per_s": float(1.0 / b) if b > 0 else None,
           "max_rel_residual": float(np.max(np.abs(pred - seconds) / np.asarray(seconds)))}
    if len(sizes) >= 3:
        c1 = (seconds[1] - seconds[0]) / (sizes[1] - sizes[0])
        c2 = (seconds[2] - seconds[1]) / (sizes[2] - sizes[1])
        out["cost_growth"] = float(c2 / c1) if c1 > 0 else None
    return out


def bench_cache(teacher_spec: str, data: str, image_size: int | None, sizes: list[int], batch: int,
                workers: int, chunk_rows: int, device: torch.device, repeats: int, warmup: int,
                workdir: Path, keep: bool) -> dict[str, Any]:
    """End-to-end ``build_cache`` (what ``tcskd cache`` runs) at each size, each run into a fresh cache root.

    With ``keep`` the last cache of every size stays (for the basis and train benchmarks)."""
    from tcskd.cache.build import CacheConfig, build_cache

    def run(rows: int, root: Path) -> tuple[float, Any]:
        cfg = CacheConfig(data=data, teacher=teacher_spec, split="train", image_size=image_size,
                          batch_size=batch, cache_root=str(root), limit=rows, device=device.type,
                          workers=workers, chunk_rows=chunk_rows)
        _sync(device)
        t0 = time.perf_counter()
        res = build_cache(cfg)
        _sync(device)
        secs = time.perf_counter() - t0
        if res.hit or res.rows_computed != rows:
            raise TcskdError(f"bench: cache run computed {res.rows_computed} of {rows} rows (hit={res.hit})")
        _free(device)
        return secs, res

    for w in range(warmup):  # CUDA/allocator start, page cache, imports: a few batches suffice
        root = workdir / f"warm-{w}"
        run(min(min(sizes), max(4 * batch, chunk_rows)), root)
        shutil.rmtree(root, ignore_errors=True)
    per_size = []
    kept: dict[int, str] = {}
    for rows in sizes:
        secs = []
        for r in range(repeats):
            root = workdir / f"cache-{rows}-{r}"
            s, res = run(rows, root)
            secs.append(s)
            if keep and r == repeats - 1:
                kept[rows] = str(res.path)
            else:
                shutil.rmtree(root, ignore_errors=True)
        st = _stats(secs)
        per_size.append({"rows": rows, "seconds": st, "rows_per_s": rows / st["median"]})
    fit = _linear_fit([p["rows"] for p in per_size], [p["seconds"]["median"] for p in per_size])
    return {"batch": batch, "workers": workers, "chunk_rows": chunk_rows, "sizes": per_size, "linear_fit": fit,
            "kept": kept}


# -- basis ------------------------------------------------------------------------

def read_features(path: str | Path) -> int:
    """One plain sequential read of ``features``, chunk by chunk; returns the bytes read."""
    from tcskd.cache.store import open_store

    with open_store(Path(path)) as s:
        f = s["features"]
        n = int(f.shape[0])
        ch = int(s.manifest.get("chunk_rows") or 1024)
        total = 0
        for start in range(0, n, ch):
            total += np.asarray(f[start:min(n, start + ch)]).nbytes
    return total


def make_tiled_store(src: str | Path, dst: Path, rows: int) -> str:
    """A cache of ``rows`` rows whose features are ``src``'s tiled (same schema, chunking and codec).

    The basis stage's cost per row does not depend on the values, so this measures
    ``tcskd basis`` on a store large enough for reading to outweigh its fixed costs
    (eigh, writing, the plot) without running the teacher over ``rows`` images."""
    from tcskd.cache.registry import cache_key
    from tcskd.cache.store import open_store

    with open_store(Path(src)) as s:
        x = np.asarray(s.read("features"))
        manifest = dict(s.manifest)
        fmt = s.format
    n, v, d = x.shape
    ch = int(manifest.get("chunk_rows") or 1024)
    n_chunks = -(-rows // ch)
    manifest.update(n_rows=rows, complete=False, skipped=[])
    manifest["identity"] = {**(manifest.get("identity") or {}), "bench_tiled_rows": rows}
    manifest["key"] = cache_key(manifest["identity"])  # a cache of its own: readers check the key
    dst.parent.mkdir(parents=True, exist_ok=True)
    st = open_store(dst, "a", fmt)
    try:
        st.set_attrs(manifest)
        feats = st.create("features", (rows, v, d), manifest.get("dtype", str(x.dtype)), (ch, v, d), fill_value=0)
        for start in range(0, rows, ch):
            stop = min(rows, start + ch)
            idx = np.arange(start, stop) % n
            feats[start:stop] = x[idx]
        st.create("labels", (rows,), "int64", (ch,), fill_value=-1)[...] = -1
        st.create("sample_index", (rows,), "int64", (ch,), fill_value=-1)[...] = np.arange(rows)
        st.create("view_params", (rows, v, 5), "float32", (ch, v, 5), fill_value=0)
        st.create("row_ok", (rows,), "bool", (ch,), fill_value=False)[...] = True
        st.create("chunk_done", (n_chunks,), "bool", (1,), fill_value=False, compress=False)[...] = True
        st.require_group("bases")
        st.set_attrs({"complete": True})
        st.flush()
    finally:
        st.close()
    return str(dst)


@contextlib.contextmanager
def _plot_guard():
    """fit_basis draws a scree plot with matplotlib; without matplotlib the benchmark skips the plot."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        yield True
        return
    import tcskd.subspace.fit as fit_mod

    saved = fit_mod._plot
    fit_mod._plot = lambda *a, **k: None
    try:
        yield False
    finally:
        fit_mod._plot = saved


@contextlib.contextmanager
def _timed_calls(module: Any, names: tuple[str, ...]):
    """Time every call of ``module.<name>`` (looked up as a module global by its callers)."""
    names = tuple(n for n in names if callable(getattr(module, n, None)))  # tolerate a renamed helper
    spent: dict[str, float] = {n: 0.0 for n in names}
    saved = {n: getattr(module, n) for n in names}

    def wrap(n: str, fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[n] += time.perf_counter() - t0
        return timed

    for n, fn in saved.items():
        setattr(module, n, wrap(n, fn))
    try:
        yield spent
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def bench_basis(paths: dict[int, str], dim: int, device: torch.device, repeats: int, warmup: int,
                tiled: set[int] = frozenset()) -> dict[str, Any]:
    """``fit_basis`` (PCA, ``dim`` coordinates, as ``tcskd basis --dim K``) versus a plain read, per cache size.

    The last fit of every cache leaves the basis ``pca`` in it (the train benchmark uses it)."""
    from tcskd.cache.store import open_store
    import tcskd.subspace.fit as fit_mod
    from tcskd.subspace.fit import BasisConfig, fit_basis
    from tcskd.subspace.moments import stream_moments

    sizes = sorted(paths)
    rows_out = []
    with _plot_guard() as plotted:
        for w in range(warmup):
            read_features(paths[sizes[0]])
            with open_store(Path(paths[sizes[0]])) as s:
                k0 = min(dim, int(s["features"].shape[2]))
            fit_basis(BasisConfig(cache=paths[sizes[0]], name="pca", dim=k0, device=device.type))
        for rows in sizes:
            p = paths[rows]
            with open_store(Path(p)) as s:
                d = int(s["features"].shape[2])
            k = min(dim, d)
            reads, fits, moms, parts = [], [], [], []
            nbytes = 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                nbytes = read_features(p)
                reads.append(time.perf_counter() - t0)
                with open_store(Path(p)) as s:
                    _sync(device)
                    t0 = time.perf_counter()
                    stream_moments(s, "0", device)
                    _sync(device)
                    moms.append(time.perf_counter() - t0)
                _sync(device)
                with _timed_calls(fit_mod, ("_moments", "_fit_pca_eigh", "write_basis", "_plot")) as spent:
                    t0 = time.perf_counter()
                    fit_basis(BasisConfig(cache=p, name="pca", dim=k, device=device.type))
                    _sync(device)
                    fits.append(time.perf_counter() - t0)
                parts.append(dict(spent))
            rs, fs, ms = _stats(reads), _stats(fits), _stats(moms)
            breakdown = {n: float(np.median([pt[n] for pt in parts])) for n in parts[0]}
            for n in ("_moments", "_fit_pca_eigh", "write_basis", "_plot"):
                breakdown.setdefault(n, 0.0)
            breakdown["other"] = fs["median"] - sum(breakdown.values())
            rows_out.append({"rows": rows, "tiled": rows in tiled, "dim": d, "k": k, "bytes": nbytes, "read_s": rs, "moments_s": ms,
                             "basis_s": fs, "basis_vs_read": fs["median"] / rs["median"],
                             "basis_parts_s": {("decomposition" if n == "_fit_pca_eigh" else n.strip("_")): v
                                               for n, v in breakdown.items()},
                             "read_mb_per_s": nbytes / rs["median"] / 1e6})
    real = [r for r in rows_out if not r["tiled"]]
    fit_read = _linear_fit([r["rows"] for r in real], [r["read_s"]["median"] for r in real])
    fit_basis_ = _linear_fit([r["rows"] for r in real], [r["basis_s"]["median"] for r in real])
    return {"sizes": rows_out, "plot_drawn": plotted, "linear_fit_read": fit_read, "linear_fit_basis": fit_basis_}


# -- train --------------------------------------------------------------------------

class _TimedLoader:
    """Wraps the training DataLoader: the time the loop waits for every batch (worker start included)."""

    def __init__(self, loader: Any, record: list[dict[str, Any]]) -> None:
        self.loader, self.record = loader, record
        self.sampler = loader.sampler  # the loop sets its epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        t_start = time.perf_counter()
        it = iter(self.loader)
        waits: list[float] = []
        t0 = t_start
        while True:
            try:
                batch = next(it)
            except StopIteration:
                break
            waits.append(time.perf_counter() - t0)
            yield batch
            t0 = time.perf_counter()
        self.record.append({"waits": waits, "seconds": time.perf_counter() - t_start})


def _loader_only(args: tuple, kwargs: dict, orig: Callable, repeats: int = 1) -> dict[str, Any]:
    """The training DataLoader alone (same dataset, batch, workers), one epoch per repeat."""
    from tcskd.train.data import EpochSampler

    ds, sampler, *rest = args
    runs, steady = [], []
    for r in range(repeats):
        s = EpochSampler(sampler.n, sampler.views, sampler.seed, sampler.epoch + 1 + r, rank=sampler.rank,
                         world=sampler.world)
        t0 = time.perf_counter()
        n, t_first = 0, None
        for batch in orig(ds, s, *rest, **kwargs):
            if t_first is None:
                t_first = time.perf_counter()
                n_first = len(batch[0])
            n += len(batch[0])
        t1 = time.perf_counter()
        runs.append(n / (t1 - t0))
        if t_first is not None and n > n_first and t1 > t_first:
            steady.append((n - n_first) / (t1 - t_first))
    return {"img_per_s": _stats(runs), "steady_img_per_s": _stats(steady) if steady else None}


def process_rss() -> int | None:
    """This process's resident set size now (Linux), else None."""
    from tcskd.device import proc_status_bytes

    return proc_status_bytes("VmRSS")


def process_peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM on Linux; see tcskd.device)."""
    from tcskd.device import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def _summarise_train(metrics: list[dict[str, Any]], loads: list[dict[str, Any]], batch: int, workers: int,
                     peak: int, isolated: bool, loader_only: dict[str, Any] | None) -> dict[str, Any]:
    measured = metrics[1:] if len(metrics) > 1 else metrics
    loads_m = loads[1:] if len(loads) > 1 else loads
    img_s = [m["train_img_per_s"] for m in measured]
    steps = [len(ld["waits"]) for ld in loads_m]
    first = [ld["waits"][0] for ld in loads_m if ld["waits"]]
    rest = [float(np.mean(ld["waits"][1:])) for ld in loads_m if len(ld["waits"]) > 1]
    share = [sum(ld["waits"]) / ld["seconds"] for ld in loads_m if ld["seconds"] > 0]
    step_s = [ld["seconds"] / len(ld["waits"]) for ld in loads_m if ld["waits"]]
    wait_share = float(np.median(share)) if share else None
    # With workers the pipeline runs beside the step: any sizable wait means the step starves.
    # Without workers loading is part of every step; it is the limit when it takes most of the step.
    threshold = 0.1 if workers > 0 else 0.5
    limit = None if wait_share is None else ("input pipeline" if wait_share > threshold else "training step")
    return {
        "img_per_s": _stats(img_s), "epoch_seconds": _stats([m["seconds"] for m in measured]),
        "steps_per_epoch": int(np.median(steps)) if steps else None, "batch": batch, "workers": workers,
        "epochs_measured": len(measured), "peak_mem_bytes": int(peak), "peak_mem_isolated": isolated,
        "data_wait": {
            "first_batch_s": float(np.median(first)) if first else None,
            "per_step_ms": 1e3 * float(np.median(rest)) if rest else None,
            "step_ms": 1e3 * float(np.median(step_s)) if step_s else None,
            "wait_share": wait_share, "limit": limit, "threshold": threshold,
        },
        "loader_only": loader_only,
        "test_top1": None,
    }


def _run_train_inprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method with the loop's DataLoader timed; the summary of :func:`_summarise_train`."""
    import tcskd.train.data as data
    import tcskd.train.loop as loop
    from tcskd.device import peak_memory_bytes, resolve_device

    cfg = loop.TrainConfig(**spec["config"])
    baseline = process_rss()
    record: list[dict[str, Any]] = []
    calls: list[tuple[tuple, dict]] = []
    orig = getattr(data, "_loader", None)
    if orig is None:
        raise TcskdError("bench: tcskd.train.data has no _loader to time (renamed?); update tcskd.bench")

    def timed(*args: Any, **kwargs: Any):
        calls.append((args, kwargs))
        return _TimedLoader(orig(*args, **kwargs), record)

    data._loader = timed
    try:
        loop.train(cfg)
    finally:
        data._loader = orig
    device = resolve_device(cfg.device)
    _sync(device)
    peak = peak_memory_bytes(device) if device.type == "cuda" else process_peak_rss()
    out = Path(cfg.out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    import yaml

    resolved = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("resolved", {})
    workers = int(resolved.get("workers", 0))
    only = _loader_only(*calls[-1], orig) if calls and spec.get("loader_only", True) else None
    res = _summarise_train(metrics, record, cfg.batch_size, workers, peak, spec.get("isolated", False), only)
    if device.type == "cpu":
        res["rss_before_train_bytes"] = baseline
    return res


def _train_child() -> None:
    """Entry point of a child process: ``python -c '...; _train_child()' SPEC_JSON``; prints one result line."""
    spec = json.loads(sys.argv[-1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    spec["isolated"] = True
    try:
        res = _run_train_inprocess(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(CHILD_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()


def _run_train_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    code = "from tcskd.bench import _train_child; _train_child()"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO_ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            res = json.loads(line[len(CHILD_MARK):])
            if "error" in res:
                raise TcskdError(f"bench: training {spec['config']['method']} failed: {res['error']}")
            return res
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise TcskdError(f"bench: training child exited {proc.returncode} without a result: {tail}")


def bench_train(cache: str, methods: tuple[str, ...], student: str, batch: int, epochs: int, dim: int,
                device: torch.device, workdir: Path, workers: int | None = None, isolate: bool = True,
                threads: int | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Train each method for ``1 + epochs`` epochs (the first is the warm-up) on the same cache and rows."""
    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for method in methods:
        run_dir = workdir / f"run-{method}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = dict(cache=cache, basis="pca", student=student, method=method, dim=dim, batch_size=batch,
                      epochs=epochs + 2, stop_after=epochs + 1, eval_every=10**6, val_frac=0.0, device=device.type,
                      workers=workers, out=str(run_dir), seed=0)
        spec = {"config": config, "threads": threads}
        _free(device)
        t0 = time.perf_counter()
        try:
            if isolate:
                res = _run_train_child(spec, timeout)
            else:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = _run_train_inprocess(spec)
        except (TcskdError, subprocess.TimeoutExpired) as e:  # the other methods still run
            log.error("bench: training %s failed: %s", method, e)
            errors[method] = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        res["wall_s"] = time.perf_counter() - t0
        out[method] = res
        shutil.rmtree(run_dir, ignore_errors=True)
    if errors:
        out["_errors"] = errors
    return out


# -- the whole benchmark --------------------------------------------------------------

def _goal(name: str, value: float | None, device: torch.device, note: str = "") -> dict[str, Any]:
    op, goal, where, what = GOALS[name]
    met = None if value is None else (value >= goal if op == ">=" else value <= goal)
    applies = where == "any" or device.type == where
    return {"value": None if value is None else round(float(value), 4), "goal": goal, "op": op, "met": met,
            "applies": applies, "what": what + ("" if applies else f" (goal set for {where})"), "note": note}


def compute_goals(res: dict[str, Any], device: torch.device) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    cache = res.get("cache") or {}
    main = next(iter(cache.get("teachers", [])), None)
    if main and main.get("cache_vs_forward") is not None:
        inp = main.get("inputs", {}).get("rows_per_s", {}).get("median")
        fwd = main["forward"]["rows_per_s"]["median"]
        note = (f"input pipeline {inp:.0f} rows/s vs forward {fwd:.0f} rows/s: "
                f"{'inputs are' if inp is not None and inp < fwd else 'the teacher is'} the limit"
                if inp is not None else "")
        goals["cache_vs_forward"] = _goal("cache_vs_forward", main["cache_vs_forward"], device, note)
        fit = main["cache"].get("linear_fit") or {}
        sz = main["cache"]["sizes"]
        if len(sz) >= 2:
            per_row = (sz[-1]["seconds"]["median"] / sz[-1]["rows"]) / (sz[0]["seconds"]["median"] / sz[0]["rows"])
            goals["cache_cost_linear"] = _goal("cache_cost_linear", per_row, device,
                                               f"linear fit: {fit.get('fixed_s', 0):.2f} s fixed + "
                                               f"{fit.get('marginal_rows_per_s') or 0:.0f} rows/s")
    basis = res.get("basis") or {}
    if basis.get("sizes"):
        last = basis["sizes"][-1]
        goals["basis_vs_read"] = _goal("basis_vs_read", last["basis_vs_read"], device,
                                       f"{last['rows']} rows: read {last['read_s']['median']:.3f} s, basis "
                                       f"{last['basis_s']['median']:.3f} s")
    train = res.get("train") or {}

    def med(m: str, key: str = "img_per_s") -> float | None:
        r = train.get(m)
        return r[key]["median"] if r and r.get(key) else None

    if "ce" in train and "tcs" in train:
        goals["tcs_vs_ce_throughput"] = _goal("tcs_vs_ce_throughput", _ratio(med("tcs"), med("ce")), device)
    if "tcs" in train and "online" in train:
        goals["online_vs_tcs_time"] = _goal("online_vs_tcs_time", _ratio(med("tcs"), med("online")), device,
                                            f"online is limited by its {train['online']['data_wait']['limit']}")
        goals["tcs_vs_online_memory"] = _goal(
            "tcs_vs_online_memory", _ratio(train["tcs"]["peak_mem_bytes"], train["online"]["peak_mem_bytes"]),
            device, "CUDA max allocated" if device.type == "cuda" else "peak RSS of each training process")
    return goals


def run_bench(cfg: BenchConfig, out: Path | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every section of ``cfg``; rewrite ``out`` (JSON) and its ``.md`` after each; return the result.

    Order: the main teacher's cache figures, then the basis and train figures on its
    cache, then the optional teachers (skipped once the soft time budget runs short,
    or recorded as failed without stopping the rest)."""
    from tcskd.device import resolve_device

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    probe = threads_probe() if device.type == "cpu" else None
    if probe and probe["one_thread_faster"] and probe["one_thread_conv_ms"] * 2 < probe["conv_ms"]:
        msg = (f"one torch thread is {probe['conv_ms'] / probe['one_thread_conv_ms']:.1f}x faster than "
               f"{probe['threads']} here (busy cores?): consider --threads 1")
        log.warning("bench: %s", msg)
        if echo:
            echo(msg)
    own_tmp = cfg.workdir is None
    work = Path(tempfile.mkdtemp(prefix="tcskd-bench-")) if own_tmp else Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(cfg)
    settings["teachers"] = [dataclasses.asdict(t) for t in cfg.teachers]
    res: dict[str, Any] = {"schema": BENCH_SCHEMA, "profile": cfg.profile, "quick": cfg.quick,
                           "environment": {**environment(device), "threads_probe": probe}, "settings": settings, "reference": REFERENCE,
                           "cache": {"teachers": [], "skipped": []}, "basis": None, "train": None,
                           "dataloading": None, "goals": {}, "seconds": None}

    def save() -> None:
        res["goals"] = compute_goals(res, device)
        res["seconds"] = round(time.perf_counter() - t_start, 1)
        if out is not None:
            _write_atomic(out, json.dumps(res, indent=2) + "\n")
            _write_atomic(out.with_suffix(".md"), render_markdown(res))

    def say(msg: str) -> None:
        log.info("bench: %s", msg)
        if echo:
            echo(msg)

    measured_inputs: dict[int, dict[str, Any]] = {}

    def teacher_section(i: int, t: TeacherSpec, data: str) -> dict[int, str]:
        spec = t.spec
        if spec is None:
            say(f"writing a random-weight DINOv2 {t.arch} teacher")
            spec = make_dinov2(work / "teachers" / t.label, t.arch or t.label, t.image_size or 224,
                               **t.arch_overrides)
        say(f"cache: teacher {t.label}: forward only")
        fwd = bench_forward(spec, data, t.image_size, cfg.cache_batch, device, cfg.repeats, cfg.warmup,
                            cfg.forward_seconds)
        sizes = [cfg.cache_rows, 2 * cfg.cache_rows, 4 * cfg.cache_rows] if t.sizes else [cfg.cache_rows_other]
        if fwd["image_size"] in measured_inputs:  # the same images at the same size: measured once
            inputs = dict(measured_inputs[fwd["image_size"]], reused=True)
        else:
            say(f"cache: teacher {t.label}: input pipeline")
            inputs = bench_cache_inputs(data, fwd["image_size"], min(sizes), cfg.cache_batch, cfg.cache_workers,
                                        cfg.chunk_rows, device, cfg.repeats)
            measured_inputs[fwd["image_size"]] = inputs
        say(f"cache: teacher {t.label}: tcskd cache at {sizes} rows")
        cache = bench_cache(spec, data, t.image_size, sizes, cfg.cache_batch, cfg.cache_workers, cfg.chunk_rows,
                            device, cfg.repeats, cfg.warmup, work / f"caches-{t.label}", keep=(i == 0))
        kept = {int(k): v for k, v in cache.pop("kept").items()}
        entry = {"label": t.label, "forward": fwd, "inputs": inputs, "cache": cache,
                 "cache_vs_forward": cache["sizes"][-1]["rows_per_s"] / fwd["rows_per_s"]["median"],
                 "reference_forward_rows_per_s": REFERENCE["forward"].get(t.label)}
        fit = cache.get("linear_fit") or {}
        if fit.get("marginal_rows_per_s"):
            entry["marginal_vs_forward"] = fit["marginal_rows_per_s"] / fwd["rows_per_s"]["median"]
        res["cache"]["teachers"].append(entry)
        save()
        return kept

    def basis_and_train(main_paths: dict[int, str], label: str) -> None:
        basis_paths = dict(main_paths)
        if cfg.basis_rows_large > max(main_paths):
            say(f"basis: writing a {cfg.basis_rows_large}-row store (the features tiled)")
            basis_paths[cfg.basis_rows_large] = make_tiled_store(
                main_paths[max(main_paths)], work / "tiled" / "store", cfg.basis_rows_large)
        say("basis: tcskd basis vs a plain read of features")
        res["basis"] = bench_basis(basis_paths, cfg.basis_dim, device, cfg.repeats, cfg.warmup,
                                   tiled={cfg.basis_rows_large})
        if cfg.basis_rows_large in basis_paths and cfg.basis_rows_large not in main_paths:
            shutil.rmtree(basis_paths[cfg.basis_rows_large], ignore_errors=True)
        save()
        say(f"train: {', '.join(cfg.methods)} with student {cfg.student}")
        res["train"] = bench_train(main_paths[max(main_paths)], cfg.methods, cfg.student, cfg.train_batch,
                                   cfg.train_epochs, res["basis"]["sizes"][0]["k"], device, work, cfg.train_workers, cfg.isolate,
                                   cfg.threads, cfg.child_timeout_s)
        res["train"]["_cache"] = {"rows": max(main_paths), "teacher": label}
        res["dataloading"] = dataloading_summary(res)
        save()

    try:
        data = cfg.data
        if data is None:
            say(f"writing {cfg.synthetic_images} synthetic {cfg.synthetic_size} px images")
            data = make_synthetic_npz(work / "data" / "synthetic.npz", cfg.synthetic_images, cfg.synthetic_size)
        res["settings"]["data_resolved"] = data
        for i, t in enumerate(cfg.teachers):
            elapsed = time.perf_counter() - t_start
            if i > 0 and t.optional and elapsed > cfg.budget_s * (0.55 if i == 1 else 0.75):
                res["cache"]["skipped"].append({"teacher": t.label, "reason": f"time budget ({elapsed:.0f} s used)"})
                say(f"skipping teacher {t.label}: {elapsed:.0f} s of the {cfg.budget_s:.0f} s budget used")
                continue
            try:
                kept = teacher_section(i, t, data)
            except Exception as e:  # noqa: BLE001 - an optional teacher's failure keeps the rest
                if i == 0 or not t.optional:
                    raise
                log.error("bench: teacher %s failed: %s", t.label, e)
                res["cache"]["skipped"].append({"teacher": t.label, "reason": f"error: {type(e).__name__}: {e}"})
                save()
                continue
            if i == 0:
                basis_and_train(kept, t.label)
            for p in kept.values():
                shutil.rmtree(p, ignore_errors=True)
    finally:
        if hasattr(os, "getloadavg"):
            res["environment"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        save()
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return res


def dataloading_summary(res: dict[str, Any]) -> dict[str, Any]:
    """Which side limits each stage: the input pipeline or the computation."""
    out: dict[str, Any] = {}
    for t in (res.get("cache") or {}).get("teachers", []):
        inp = t["inputs"]["rows_per_s"]["median"]
        fwd = t["forward"]["rows_per_s"]["median"]
        out[f"cache/{t['label']}"] = {"input_rows_per_s": inp, "forward_rows_per_s": fwd,
                                      "limit": "input pipeline" if inp < fwd else "teacher forward"}
    for m, r in (res.get("train") or {}).items():
        if m.startswith("_"):
            continue
        dw = r["data_wait"]
        out[f"train/{m}"] = {"wait_per_step_ms": dw["per_step_ms"], "step_ms": dw["step_ms"],
                             "wait_share": dw["wait_share"], "first_batch_s": dw["first_batch_s"],
                             "loader_only_img_per_s": (r.get("loader_only") or {}).get("img_per_s", {}).get("median"),
                             "train_img_per_s": r["img_per_s"]["median"], "limit": dw["limit"]}
    return out


# -- report ---------------------------------------------------------------------------

def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def render_markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    dev = env["device_name"] + (f" ({env['cpu_count']} CPU cores, {env['torch_threads']} torch threads)"
                                if env["device"] == "cpu" else f" (CUDA {env.get('cuda')}, {env['cpu_count']} CPU cores)")
    lines = [f"## tcskd bench: {res['profile']} profile{' (quick)' if res['quick'] else ''}", "",
             f"Measured on **{dev}**, {env['date']}; torch {env['torch']}, tcskd {env['tcskd']}"
             f"{' @ ' + env['git_sha'][:8] if env.get('git_sha') else ''}{' (uncommitted changes)' if env.get('git_dirty') else ''}, python {env['python']}; "
             f"load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}; {res.get('seconds')} s in all. "
             f"Each figure: median of {res['settings']['repeats']} repeats after {res['settings']['warmup']} warm-up.",
             "", "| goal | value | target | met |", "|---|---|---|---|"]
    for name, g in res.get("goals", {}).items():
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        if not g["applies"]:
            met += " (n/a here)"
        lines.append(f"| `{name}`: {g['what']} | {_f(g['value'], 3)} | {g['op']} {g['goal']} | {met} |")
    teachers = (res.get("cache") or {}).get("teachers", [])
    if teachers:
        lines += ["", "### cache (rows/s)", "",
                  "| teacher | px | batch | workers | forward only | input pipeline | tcskd cache at N rows | "
                  "fixed s | marginal | cache / forward |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in teachers:
            c = t["cache"]
            at = ", ".join(f"{_f(s['rows_per_s'])} @ {s['rows']}" for s in c["sizes"])
            fit = c.get("linear_fit") or {}
            ref = t.get("reference_forward_rows_per_s")
            fwd = _f(t["forward"]["rows_per_s"]["median"]) + (f" (ref. {ref:,.0f})" if ref else "")
            lines.append(f"| {t['label']} | {t['forward']['image_size']} | {c['batch']} | {c['workers']} | {fwd} | "
                         f"{_f(t['inputs']['rows_per_s']['median'])} | {at} | {_f(fit.get('fixed_s'), 2)} | "
                         f"{_f(fit.get('marginal_rows_per_s'))} | {_f(t['cache_vs_forward'], 2)} |")
        for s in (res.get("cache") or {}).get("skipped", []):
            lines.append(f"| {s['teacher']} | skipped: {s['reason']} | | | | | | | | |")
    basis = res.get("basis")
    if basis:
        lines += ["", "### basis (seconds)", "", "| rows | D | K | read features | moments only | tcskd basis | "
                  "of which: moments / eigh / write / plot / other | basis / read |", "|---|---|---|---|---|---|---|---|"]
        for b in basis["sizes"]:
            bp = b.get("basis_parts_s") or {}
            parts = " / ".join(_f(bp.get(n), 3) for n in ("moments", "decomposition", "write_basis", "plot", "other"))
            lines.append(f"| {b['rows']:,}{' (tiled)' if b.get('tiled') else ''} | {b['dim']} | {b['k']} | {_f(b['read_s']['median'], 3)} "
                         f"({_f(b['read_mb_per_s'])} MB/s) | {_f(b['moments_s']['median'], 3)} | "
                         f"{_f(b['basis_s']['median'], 3)} | {parts} | {_f(b['basis_vs_read'], 1)} |")
    train = res.get("train")
    if train:
        meta = train.get("_cache", {})
        st = res["settings"]
        lines += ["", f"### train ({st['student']}, batch {st['train_batch']}, {meta.get('rows')} cached rows of "
                  f"{meta.get('teacher')}, {st['train_epochs']} measured epochs after 1 warm-up)", "",
                  "| method | img/s | peak memory | steps/epoch | workers | wait for data / step | step | wait share | "
                  "loader alone img/s | limit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m, err in (train.get("_errors") or {}).items():
            lines.append(f"| {m} | failed: {err} | | | | | | | | |")
        for m, r in train.items():
            if m.startswith("_"):
                continue
            dw = r["data_wait"]
            lo = (r.get("loader_only") or {}).get("img_per_s", {}).get("median")
            mem = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB"
            if r.get("rss_before_train_bytes"):
                mem += f" (+{(r['peak_mem_bytes'] - r['rss_before_train_bytes']) / 2**20:,.0f} over imports)"
            lines.append(f"| {m} | {_f(r['img_per_s']['median'])} | {mem} | "
                         f"{r['steps_per_epoch']} | {r['workers']} | {_f(dw['per_step_ms'], 1)} ms | "
                         f"{_f(dw['step_ms'], 1)} ms | {_f(dw['wait_share'], 2)} | {_f(lo)} | {dw['limit']} |")
    return "\n".join(lines) + "\n"


# -- command ------------------------------------------------------------------------

def _click_command():
    import click

    @click.command("bench")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--quick", is_flag=True, help="Tiny sizes and fewer repeats: a smoke run.")
    @click.option("--out", "out_file", default="bench/out/bench.json", show_default=True,
                  help="JSON result; the Markdown table goes beside it (.md).")
    @click.option("--profile", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                  help="auto: gpu on CUDA, else cpu.")
    @click.option("--repeats", type=int, default=None, help="Measured repeats per figure (default: 3, quick 2).")
    @click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    @click.option("--budget", "budget_s", type=float, default=None,
                  help="Soft time budget in seconds: optional teachers are skipped beyond it.")
    @click.option("--cache-workers", type=int, default=None,
                  help="DataLoader workers of the cache runs (default: 0 on the CPU, min(8, cores) on CUDA).")
    @click.option("--train-workers", type=int, default=None,
                  help="DataLoader workers of the training runs (default: tcskd train's own).")
    @click.option("--workdir", default=None, help="Keep caches and runs here (default: a temporary folder).")
    def bench_cmd(device: str, quick: bool, out_file: str, profile: str, repeats: int | None, threads: int | None,
                  budget_s: float | None, cache_workers: int | None, train_workers: int | None,
                  workdir: str | None) -> None:
        """Measure each stage against its reference (cache vs forward, basis vs read, tcs vs ce/online)."""
        from tcskd.device import resolve_device

        dev = resolve_device(device)
        prof = profile if profile != "auto" else ("gpu" if dev.type == "cuda" else "cpu")
        over: dict[str, Any] = {}
        if repeats is not None:
            if repeats < 1:
                raise TcskdError(f"--repeats must be >= 1 (got {repeats})")
            over["repeats"] = repeats
        if threads is not None:
            over["threads"] = threads
        if budget_s is not None:
            over["budget_s"] = budget_s
        if workdir is not None:
            over["workdir"] = workdir
        if cache_workers is not None:
            over["cache_workers"] = cache_workers
        if train_workers is not None:
            over["train_workers"] = train_workers
        cfg = profile_config(prof, dev.type, quick, **over)
        out = Path(out_file)
        res = run_bench(cfg, out, echo=lambda m: click.echo(f"bench: {m}", err=True))
        click.echo(render_markdown(res))
        click.echo(f"wrote {out} and {out.with_suffix('.md')}", err=True)

    return bench_cmd


bench_cmd = _click_command()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        bench_cmd()  # pylint: disable=no-value-for-parameter
    except TcskdError as e:
        print(f"tcskd: error: {e}", file=sys.stderr)
        sys.exit(2)
