"""The input section: the loaders alone on photo-sized JPEGs, so one knows how many teacher images per second the
CPUs can feed, and at what CPU cost per image.

On an image folder of synthetic 500 x 375 JPEGs (:func:`tcskd.bench.synthetic.make_jpeg_folder`, 60-100 KB
each, written under the bench's work folder) it runs, to exhaustion, the cache stage's loader
(:func:`tcskd.cache.build.input_loader` over :func:`~tcskd.cache.build.teacher_inputs`: decode, centre view,
uint8 resize to the teacher's input, collate) with ``--decode full`` and ``draft``, and the training loader
(:func:`tcskd.train.data.train_loader` over a :class:`~tcskd.train.data.ViewImages` of the same folder:
decode, centre view, uint8 resize to the student's input, crop-flip augmentation, float), each with 1 worker
and with ``--workers auto`` (when that is not 1). For each: img/s (wall), and CPU seconds per image (this
process and its reaped workers: ``getrusage`` self + children, before and after). The loader's img/s is
the teacher (or student) img/s it can feed; CPU seconds per image x 1,000 is the cores it needs per 1,000
img/s.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from tcskd.bench.measure import stats
from tcskd.bench.synthetic import make_jpeg_folder
from tcskd.cache.build import CacheConfig, input_loader, teacher_inputs
from tcskd.data import open_source
from tcskd.device import resolve_workers, usable_cores
from tcskd.store.backends import iter_chunks
from tcskd.train.config import TrainConfig
from tcskd.train.data import ViewImages, train_loader
from tcskd.views import draft_reduction, view_params

log = logging.getLogger(__name__)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _drain(make: Callable[[], Iterable], repeats: int) -> dict[str, Any]:
    """Run the loader ``make()`` gives to exhaustion ``repeats`` times (its workers end with it and are reaped,
    so their CPU time is counted): img/s and CPU seconds per image of each run, and their medians."""
    rates, cpu = [], []
    n = 0
    for _ in range(repeats):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n = 0
        for batch in make():
            n += len(batch[0])  # the rows of a cache batch, the images of a training one
        secs = time.perf_counter() - t0
        rates.append(n / secs)
        cpu.append((_cpu_seconds() - c0) / n)
    img_s, cpu_img = stats(rates), stats(cpu)
    return {"images": n, "img_per_s": img_s, "cpu_s_per_image": cpu_img,
            "cores_busy": round(img_s["median"] * cpu_img["median"], 3),
            "cores_per_1000_img_per_s": round(1000 * cpu_img["median"], 3)}


def bench_input(workdir: Path, images: int, device: torch.device, width: int = 500, height: int = 375,
                teacher_size: int = 224, student_size: int = 224, batch: int = 64, repeats: int = 1,
                workers: tuple[int | str, ...] = (1, "auto")) -> dict[str, Any]:
    """The input section's figures (see the module's docstring); the JPEG folder is written under ``workdir``."""
    t0 = time.perf_counter()
    spec = make_jpeg_folder(Path(workdir) / "jpegs", images, width, height)
    sizes = [p.stat().st_size for p in (Path(workdir) / "jpegs").rglob("*.jpg")]
    write_s = time.perf_counter() - t0
    source = open_source(spec, "train")
    counts = sorted({resolve_workers(w) for w in workers})
    todo = list(iter_chunks(len(source), 1024))
    configs: list[dict[str, Any]] = []
    for w in counts:
        for decode in ("full", "draft"):
            ds = teacher_inputs(source, CacheConfig(decode=decode), teacher_size, device)
            log.info("bench input: cache loader, %s decode, %d worker(s)", decode, w)
            configs.append({"loader": "cache", "decode": decode, "workers": w, "px": teacher_size,
                            **_drain(lambda: input_loader(ds, todo, batch, w, device), repeats)})
        train_set = ViewImages(source, np.arange(len(source)), student_size, 3, augment="crop-flip", seed=0)
        prep = SimpleNamespace(train_set=train_set, views=1)
        cfg = TrainConfig(batch_size=batch, seed=0)
        log.info("bench input: training loader, %d worker(s)", w)
        configs.append({"loader": "train", "decode": "full", "workers": w, "px": student_size,
                        **_drain(lambda: train_loader(prep, cfg, 0, device, w), repeats)})
    centre = view_params(0, height, width, 1, 0)
    out = {"images": len(source), "width": width, "height": height, "jpeg_kb": {
               "mean": round(float(np.mean(sizes)) / 1e3, 1), "min": round(min(sizes) / 1e3, 1),
               "max": round(max(sizes) / 1e3, 1)},
           "write_s": round(write_s, 2), "batch": batch, "teacher_px": teacher_size, "student_px": student_size,
           "usable_cores": usable_cores(), "auto_workers": resolve_workers("auto"), "repeats": repeats,
           "draft_reduction": draft_reduction(centre, height, width, teacher_size), "configs": configs}
    out["summary"] = input_summary(configs)
    return out


def input_summary(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per worker count: CPU seconds per image of the training loader / of the cache's (full decode) — the goal
    is <= 1.3 — and of draft / full; the teacher img/s each loader feeds."""
    out: dict[str, Any] = {}
    for w in sorted({c["workers"] for c in configs}):
        by = {(c["loader"], c["decode"]): c for c in configs if c["workers"] == w}
        full, draft, train = by.get(("cache", "full")), by.get(("cache", "draft")), by.get(("train", "full"))
        cpu = {k: v["cpu_s_per_image"]["median"] if v else None
               for k, v in (("full", full), ("draft", draft), ("train", train))}
        out[str(w)] = {
            "train_vs_cache_cpu": cpu["train"] / cpu["full"] if cpu["train"] and cpu["full"] else None,
            "draft_vs_full_cpu": cpu["draft"] / cpu["full"] if cpu["draft"] and cpu["full"] else None,
            "teacher_img_per_s_fed": {k: v["img_per_s"]["median"] for k, v in
                                      (("full", full), ("draft", draft)) if v},
            "student_img_per_s_fed": train["img_per_s"]["median"] if train else None}
    return out
