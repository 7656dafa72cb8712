"""The whole benchmark: every section of a :class:`~tcskd.bench.profiles.BenchConfig`, in order, its JSON and
Markdown rewritten after each (a run cut short keeps what it measured)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tcskd.bench.basis import bench_basis
from tcskd.bench.cache import bench_cache, bench_cache_inputs, bench_forward
from tcskd.bench.dense import bench_dense
from tcskd.bench.env import environment, threads_probe
from tcskd.bench.inputs import bench_input
from tcskd.bench.peerbench import bench_peers
from tcskd.bench.profiles import BENCH_SCHEMA, REFERENCE, BenchConfig, TeacherSpec
from tcskd.bench.report import compute_goals, dataloading_summary, render_markdown, write_atomic
from tcskd.bench.scale import bench_scale
from tcskd.bench.synthetic import make_dinov2, make_synthetic_npz, make_tiled_store
from tcskd.bench.train import bench_train
from tcskd.device import resolve_device

log = logging.getLogger(__name__)


class _Run:
    """One run's state: its settings, device, work folder, the result so far, and where it is written."""

    def __init__(self, cfg: BenchConfig, device: torch.device, work: Path, out: Path | None,
                 echo: Callable[[str], None] | None, probe: dict[str, Any] | None, t_start: float) -> None:
        self.cfg, self.device, self.work, self.out, self.echo = cfg, device, work, out, echo
        self.t_start = t_start
        self.measured_inputs: dict[int, dict[str, Any]] = {}
        self.specs: dict[str, str] = {}
        """Each teacher's spec (a DINOv2 written at run time: its hf: folder)."""
        settings = dataclasses.asdict(cfg)
        settings["teachers"] = [dataclasses.asdict(t) for t in cfg.teachers]
        self.res: dict[str, Any] = {
            "schema": BENCH_SCHEMA, "profile": cfg.profile, "quick": cfg.quick,
            "environment": {**environment(device), "threads_probe": probe}, "settings": settings,
            "reference": REFERENCE, "cache": {"teachers": [], "skipped": []}, "basis": None, "train": None,
            "dense": None, "peers": None, "dataloading": None, "input": None, "scale": None, "goals": {}, "seconds": None}

    def save(self) -> None:
        self.res["goals"] = compute_goals(self.res, self.device)
        self.res["seconds"] = round(time.perf_counter() - self.t_start, 1)
        if self.out is not None:
            write_atomic(self.out, json.dumps(self.res, indent=2) + "\n")
            write_atomic(self.out.with_suffix(".md"), render_markdown(self.res))

    def say(self, msg: str) -> None:
        log.info("bench: %s", msg)
        if self.echo:
            self.echo(msg)

    def inputs(self, data: str, image_size: int, rows: int) -> dict[str, Any]:
        """The cache's input pipeline at ``image_size`` px: the same images at the same size are measured once."""
        cfg = self.cfg
        if image_size in self.measured_inputs:
            return dict(self.measured_inputs[image_size], reused=True)
        inputs = bench_cache_inputs(data, image_size, rows, cfg.cache_batch, cfg.cache_workers, cfg.chunk_rows,
                                    self.device, cfg.repeats)
        self.measured_inputs[image_size] = inputs
        return inputs

    def teacher_section(self, i: int, t: TeacherSpec, data: str) -> dict[int, str]:
        """Forward, input pipeline and ``build_cache`` of one teacher; the caches kept for the main teacher."""
        cfg, spec = self.cfg, t.spec
        if spec is None:
            self.say(f"writing a random-weight DINOv2 {t.arch} teacher")
            spec = make_dinov2(self.work / "teachers" / t.label, t.arch or t.label, t.image_size or 224,
                               **t.arch_overrides)
        self.specs[t.label] = spec
        self.say(f"cache: teacher {t.label}: forward only")
        fwd = bench_forward(spec, data, t.image_size, cfg.cache_batch, self.device, cfg.repeats, cfg.warmup,
                            cfg.forward_seconds)
        sizes = [cfg.cache_rows, 2 * cfg.cache_rows, 4 * cfg.cache_rows] if t.sizes else [cfg.cache_rows_other]
        if fwd["image_size"] not in self.measured_inputs:
            self.say(f"cache: teacher {t.label}: input pipeline")
        inputs = self.inputs(data, fwd["image_size"], min(sizes))
        self.say(f"cache: teacher {t.label}: tcskd cache at {sizes} rows")
        cache = bench_cache(spec, data, t.image_size, sizes, cfg.cache_batch, cfg.cache_workers, cfg.chunk_rows,
                            self.device, cfg.repeats, cfg.warmup, self.work / f"caches-{t.label}", keep=(i == 0))
        kept = {int(k): v for k, v in cache.pop("kept").items()}
        entry = {"label": t.label, "forward": fwd, "inputs": inputs, "cache": cache,
                 "cache_vs_forward": cache["sizes"][-1]["rows_per_s"] / fwd["rows_per_s"]["median"],
                 "reference_forward_rows_per_s": REFERENCE["forward"].get(t.label)}
        fit = cache.get("linear_fit") or {}
        if fit.get("marginal_rows_per_s"):
            entry["marginal_vs_forward"] = fit["marginal_rows_per_s"] / fwd["rows_per_s"]["median"]
        self.res["cache"]["teachers"].append(entry)
        self.save()
        return kept

    def basis_and_train(self, main_paths: dict[int, str], label: str) -> None:
        """The basis figures on the main teacher's caches (and a tiled large store), then training on the largest."""
        cfg, work = self.cfg, self.work
        basis_paths = dict(main_paths)
        if cfg.basis_rows_large > max(main_paths):
            self.say(f"basis: writing a {cfg.basis_rows_large}-row store (the features tiled)")
            basis_paths[cfg.basis_rows_large] = make_tiled_store(
                main_paths[max(main_paths)], work / "tiled" / "store", cfg.basis_rows_large)
        self.say("basis: tcskd basis vs a plain read of features")
        self.res["basis"] = bench_basis(basis_paths, cfg.basis_dim, self.device, cfg.repeats, cfg.warmup,
                                        tiled={cfg.basis_rows_large}, plot=cfg.basis_plot)
        if cfg.basis_rows_large in basis_paths and cfg.basis_rows_large not in main_paths:
            shutil.rmtree(basis_paths[cfg.basis_rows_large], ignore_errors=True)
        self.save()
        self.say(f"train: {', '.join(cfg.methods)} with student {cfg.student}")
        self.res["train"] = bench_train(main_paths[max(main_paths)], cfg.methods, cfg.student, cfg.train_batch,
                                        cfg.train_epochs, self.res["basis"]["sizes"][0]["k"], self.device, work,
                                        cfg.train_workers, cfg.isolate, cfg.threads, cfg.child_timeout_s)
        self.res["train"]["_cache"] = {"rows": max(main_paths), "teacher": label}
        self.res["dataloading"] = dataloading_summary(self.res)
        self.save()
        if cfg.peer_arms:
            self.say(f"peers: {', '.join(cfg.peer_arms)}, {cfg.train_epochs} timed epochs each")
            self.res["peers"] = bench_peers(main_paths[max(main_paths)], cfg.peer_arms, cfg.student, cfg.train_batch,
                                            cfg.train_epochs, self.device, work, cfg.train_workers, cfg.threads,
                                            cfg.child_timeout_s, self.res["train"])
            if "skipped" in self.res["peers"]:
                self.say(f"peers skipped: {self.res['peers']['skipped']}")
            self.save()

    def dense_section(self, t: TeacherSpec, data: str) -> None:
        """Dense caches against global ones on the main teacher (tcskd.bench.dense): cache and basis stages."""
        cfg = self.cfg
        if not cfg.dense_rows:
            return
        self.say(f"dense: teacher {t.label}: global vs patch tokens vs --dim {cfg.dense_dim} at {cfg.dense_rows} rows")
        self.res["dense"] = {"teacher": t.label, **bench_dense(
            self.specs[t.label], data, t.image_size, cfg.dense_rows, cfg.cache_batch, cfg.cache_workers,
            cfg.chunk_rows, cfg.dense_dim, self.device, cfg.repeats, self.work / f"dense-{t.label}", cfg.warmup)}
        self.save()

    def input_section(self) -> None:
        """The loaders alone on photo-sized JPEGs (tcskd.bench.inputs): the img/s and CPU per image they cost."""
        cfg = self.cfg
        if not cfg.input_images:
            return
        self.say(f"input: the cache's and the training loader on {cfg.input_images} 500x375 JPEGs")
        self.res["input"] = bench_input(self.work / "input", cfg.input_images, self.device, batch=cfg.input_batch,
                                        teacher_size=cfg.input_px, student_size=cfg.input_px,
                                        repeats=cfg.input_repeats)
        shutil.rmtree(self.work / "input", ignore_errors=True)
        self.save()

    def scale_section(self) -> None:
        """Targets in RAM vs read from the store as the rows grow (tcskd.bench.scale): img/s and peak RSS."""
        cfg = self.cfg
        sizes = {k: list(v) for k, v in (("global", cfg.scale_global_rows), ("dense", cfg.scale_dense_rows)) if v}
        if not sizes:
            return
        self.say(f"scale: targets ram vs store at {sizes} rows")
        self.res["scale"] = bench_scale(self.work / "scale", sizes, k=cfg.scale_k, tokens=cfg.scale_tokens,
                                        budget_mb=cfg.scale_budget_mb, echo=self.echo)
        shutil.rmtree(self.work / "scale", ignore_errors=True)
        self.save()

    def teachers(self, data: str) -> None:
        """Every teacher in order: an optional one is skipped once the soft budget runs short, or recorded as
        failed without stopping the rest."""
        cfg = self.cfg
        for i, t in enumerate(cfg.teachers):
            elapsed = time.perf_counter() - self.t_start
            if i > 0 and t.optional and elapsed > cfg.budget_s * (0.55 if i == 1 else 0.75):
                self.res["cache"]["skipped"].append({"teacher": t.label, "reason": f"time budget ({elapsed:.0f} s used)"})
                self.say(f"skipping teacher {t.label}: {elapsed:.0f} s of the {cfg.budget_s:.0f} s budget used")
                continue
            try:
                kept = self.teacher_section(i, t, data)
            except Exception as e:  # noqa: BLE001 - an optional teacher's failure keeps the rest
                if i == 0 or not t.optional:
                    raise
                log.error("bench: teacher %s failed: %s", t.label, e)
                self.res["cache"]["skipped"].append({"teacher": t.label, "reason": f"error: {type(e).__name__}: {e}"})
                self.save()
                continue
            if i == 0:
                self.basis_and_train(kept, t.label)
                self.dense_section(t, data)
            for p in kept.values():
                shutil.rmtree(p, ignore_errors=True)


def _threads_warning(device: torch.device, echo: Callable[[str], None] | None) -> dict[str, Any] | None:
    """The threads probe on the CPU; a warning when one thread is much faster than several (busy cores)."""
    probe = threads_probe() if device.type == "cpu" else None
    if probe and probe["one_thread_faster"] and probe["one_thread_conv_ms"] * 2 < probe["conv_ms"]:
        msg = (f"one torch thread is {probe['conv_ms'] / probe['one_thread_conv_ms']:.1f}x faster than "
               f"{probe['threads']} here (busy cores?): consider --threads 1")
        log.warning("bench: %s", msg)
        if echo:
            echo(msg)
    return probe


def run_bench(cfg: BenchConfig, out: Path | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every section of ``cfg``; rewrite ``out`` (JSON) and its ``.md`` after each; return the result.

    Order: the main teacher's cache figures, then the basis and train figures on its
    cache, then the optional teachers (skipped once the soft time budget runs short,
    or recorded as failed without stopping the rest), then the input section (the loaders alone on JPEGs), then the scale section (targets ram vs store)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    probe = _threads_warning(device, echo)
    own_tmp = cfg.workdir is None
    work = Path(tempfile.mkdtemp(prefix="tcskd-bench-")) if own_tmp else Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, device, work, out, echo, probe, t_start)
    try:
        data = cfg.data
        if data is None:
            run.say(f"writing {cfg.synthetic_images} synthetic {cfg.synthetic_size} px images")
            data = make_synthetic_npz(work / "data" / "synthetic.npz", cfg.synthetic_images, cfg.synthetic_size)
        run.res["settings"]["data_resolved"] = data
        run.teachers(data)
        run.input_section()
        run.scale_section()
    finally:
        if hasattr(os, "getloadavg"):
            run.res["environment"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        run.save()
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return run.res
