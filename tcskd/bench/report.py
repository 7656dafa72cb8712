"""What a benchmark run concludes: the goals (met or not), which side limits each stage, and the Markdown table
written beside the JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tcskd.bench.measure import ratio
from tcskd.bench.profiles import GOALS


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def goal(name: str, value: float | None, device: torch.device, note: str = "") -> dict[str, Any]:
    """The goal ``name`` of :data:`~tcskd.bench.profiles.GOALS` with its measured ``value``: met, and whether it
    applies on ``device``."""
    op, goal, where, what = GOALS[name]
    met = None if value is None else (value >= goal if op == ">=" else value <= goal)
    applies = where == "any" or device.type == where
    return {"value": None if value is None else round(float(value), 4), "goal": goal, "op": op, "met": met,
            "applies": applies, "what": what + ("" if applies else f" (goal set for {where})"), "note": note}


def compute_goals(res: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every goal the sections of ``res`` measured so far."""
    goals: dict[str, Any] = {}
    cache = res.get("cache") or {}
    main = next(iter(cache.get("teachers", [])), None)
    if main and main.get("cache_vs_forward") is not None:
        inp = main.get("inputs", {}).get("rows_per_s", {}).get("median")
        fwd = main["forward"]["rows_per_s"]["median"]
        note = (f"input pipeline {inp:.0f} rows/s vs forward {fwd:.0f} rows/s: "
                f"{'inputs are' if inp is not None and inp < fwd else 'the teacher is'} the limit"
                if inp is not None else "")
        goals["cache_vs_forward"] = goal("cache_vs_forward", main["cache_vs_forward"], device, note)
        fit = main["cache"].get("linear_fit") or {}
        sz = main["cache"]["sizes"]
        if len(sz) >= 2:
            per_row = (sz[-1]["seconds"]["median"] / sz[-1]["rows"]) / (sz[0]["seconds"]["median"] / sz[0]["rows"])
            goals["cache_cost_linear"] = goal("cache_cost_linear", per_row, device,
                                               f"linear fit: {fit.get('fixed_s', 0):.2f} s fixed + "
                                               f"{fit.get('marginal_rows_per_s') or 0:.0f} rows/s")
    basis = res.get("basis") or {}
    if basis.get("sizes"):
        last = basis["sizes"][-1]
        goals["basis_vs_read"] = goal("basis_vs_read", last["basis_vs_read"], device,
                                       f"{last['rows']} rows: read {last['read_s']['median']:.3f} s, basis "
                                       f"{last['basis_s']['median']:.3f} s")
    train = res.get("train") or {}

    def med(m: str, key: str = "img_per_s") -> float | None:
        r = train.get(m)
        return r[key]["median"] if r and r.get(key) else None

    if "ce" in train and "tcs" in train:
        goals["tcs_vs_ce_throughput"] = goal("tcs_vs_ce_throughput", ratio(med("tcs"), med("ce")), device)
    if "tcs" in train and "online" in train:
        goals["online_vs_tcs_time"] = goal("online_vs_tcs_time", ratio(med("tcs"), med("online")), device,
                                            f"online is limited by its {train['online']['data_wait']['limit']}")
        goals["tcs_vs_online_memory"] = goal(
            "tcs_vs_online_memory", ratio(train["tcs"]["peak_mem_bytes"], train["online"]["peak_mem_bytes"]),
            device, "CUDA max allocated" if device.type == "cuda" else "peak RSS of each training process")
    inp = (res.get("input") or {}).get("summary") or {}
    one = inp.get("1") or next(iter(inp.values()), None)
    if one and one.get("train_vs_cache_cpu") is not None:
        goals["train_vs_cache_input_cpu"] = goal("train_vs_cache_input_cpu", one["train_vs_cache_cpu"], device,
                                                  "the training loader also augments and converts to float")
    return goals


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


# -- the Markdown table --------------------------------------------------------------

def _f(v: Any, digits: int = 0) -> str:
    """A figure for the table: thousands separated, ``digits`` decimals, "-" for None."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _header(res: dict[str, Any]) -> list[str]:
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
    return lines


def _cache_table(res: dict[str, Any]) -> list[str]:
    teachers = (res.get("cache") or {}).get("teachers", [])
    if not teachers:
        return []
    lines = ["", "### cache (rows/s)", "",
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
    return lines


def _basis_table(res: dict[str, Any]) -> list[str]:
    basis = res.get("basis")
    if not basis:
        return []
    lines = ["", "### basis (seconds)", "", "| rows | D | K | read features | moments only | tcskd basis | "
             "of which: moments / eigh / write / plot / other | basis / read |", "|---|---|---|---|---|---|---|---|"]
    for b in basis["sizes"]:
        bp = b.get("basis_parts_s") or {}
        parts = " / ".join(_f(bp.get(n), 3) for n in ("moments", "decomposition", "write_basis", "plot", "other"))
        lines.append(f"| {b['rows']:,}{' (tiled)' if b.get('tiled') else ''} | {b['dim']} | {b['k']} | {_f(b['read_s']['median'], 3)} "
                     f"({_f(b['read_mb_per_s'])} MB/s) | {_f(b['moments_s']['median'], 3)} | "
                     f"{_f(b['basis_s']['median'], 3)} | {parts} | {_f(b['basis_vs_read'], 1)} |")
    return lines


def _dense_table(res: dict[str, Any]) -> list[str]:
    dense = res.get("dense")
    if not dense:
        return []
    if dense.get("skipped"):
        return ["", f"### dense vs global: skipped ({dense['skipped']})"]
    c = dense["cache"]
    lines = ["", f"### dense vs global: cache ({dense.get('teacher')}, {c['rows']} rows, batch {c['batch']})", "",
             "| cache | tokens x dim | img/s | img/s without the sample pass | tokens/s | bytes/image | "
             "features on disk/image | store on disk/image | of which: setup / basis sample / inputs / forward / "
             "write (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in c["configs"]:
        tm = r["timings_s"]
        parts = " / ".join(_f(tm.get(n, 0.0), 3) for n in ("setup", "basis", "inputs", "forward", "write"))
        what = f"{r['tokens_per_image']} x {r['dim']}" + (f" of {r['teacher_dim']}" if r["dim"] != r["teacher_dim"] else "")
        lines.append(f"| {r['config']} | {what} {r['dtype']} | {_f(r['img_per_s'])} | "
                     f"{_f(r.get('img_per_s_without_sample'))} | {_f(r['tokens_per_s'])} | "
                     f"{_f(r['bytes_per_image'])} | {_f(r.get('features_disk_bytes_per_image'))} | "
                     f"{_f(r['disk_bytes_per_image'])} | {parts} |")
    lines += ["", "### dense vs global: basis (tcskd basis, every token a sample)", "",
              "| cache | K | samples | read MB/s | fit MB/s | fit samples/s | read s | basis s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in dense["basis"]["configs"]:
        lines.append(f"| {r['config']} | {r['k']} | {_f(r['samples'])} | {_f(r['read_mb_per_s'], 1)} | "
                     f"{_f(r['fit_mb_per_s'], 1)} | {_f(r['fit_samples_per_s'])} | {_f(r['read_s']['median'], 3)} | "
                     f"{_f(r['basis_s']['median'], 3)} |")
    return lines


def _train_table(res: dict[str, Any]) -> list[str]:
    train = res.get("train")
    if not train:
        return []
    meta = train.get("_cache", {})
    st = res["settings"]
    lines = ["", f"### train ({st['student']}, batch {st['train_batch']}, {meta.get('rows')} cached rows of "
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
    return lines


def _peers_table(res: dict[str, Any]) -> list[str]:
    peers = res.get("peers")
    if not peers:
        return []
    if "skipped" in peers:
        return ["", f"### peers: skipped ({peers['skipped']})"]
    v = peers.get("versions") or {}
    lines = ["", f"### peers (the same job in torchdistill {v.get('torchdistill')} and timm {v.get('timm')}; "
             f"{peers.get('epochs_measured')} timed epochs after 1 warm-up, one seed)", "",
             "| arm | s/epoch | img/s | peak memory | / tcs s/epoch | / ce s/epoch |", "|---|---|---|---|---|---|"]
    for arm, err in (peers.get("errors") or {}).items():
        lines.append(f"| {arm} | failed: {err} | | | | |")
    for arm, r in (peers.get("arms") or {}).items():
        mem = f"{r['peak_mem_bytes'] / 2**20:,.0f} MiB"
        if r.get("peak_mem_over_imports_bytes") is not None:
            mem += f" (+{r['peak_mem_over_imports_bytes'] / 2**20:,.0f} over imports)"
        lines.append(f"| {arm} | {_f(r['seconds_per_epoch'], 2)} | {_f(r['img_per_s'])} | {mem} | "
                     f"{_f(r['per_epoch_vs_tcs'], 2)} | {_f(r['per_epoch_vs_ce'], 2)} |")
    return lines


def _input_table(res: dict[str, Any]) -> list[str]:
    inp = res.get("input")
    if not inp:
        return []
    kb = inp["jpeg_kb"]
    lines = ["", f"### input: the loaders alone ({inp['images']:,} JPEGs of {inp['width']}x{inp['height']}, "
                 f"{kb['min']:.0f}-{kb['max']:.0f} KB, mean {kb['mean']:.0f}; batch {inp['batch']}; "
                 f"{inp['usable_cores']} usable cores, auto = {inp['auto_workers']} workers; --decode draft decodes the "
                 f"centre view at 1/{inp['draft_reduction']} of its size for {inp['teacher_px']} px)", "",
             "| loader | decode | px | workers | img/s (the teacher img/s it feeds) | CPU ms / image | cores busy | "
             "cores per 1,000 img/s |", "|---|---|---|---|---|---|---|---|"]
    for c in inp["configs"]:
        lines.append(f"| {c['loader']} | {c['decode']} | {c['px']} | {c['workers']} | {_f(c['img_per_s']['median'])} | "
                     f"{_f(1e3 * c['cpu_s_per_image']['median'], 2)} | {_f(c['cores_busy'], 2)} | "
                     f"{_f(c['cores_per_1000_img_per_s'], 1)} |")
    for w, sm in inp.get("summary", {}).items():
        lines.append(f"\nWith {w} worker(s): CPU per image train / cache {_f(sm['train_vs_cache_cpu'], 2)} "
                     f"(goal <= 1.3), draft / full {_f(sm['draft_vs_full_cpu'], 2)}.")
    return lines


def _scale_table(res: dict[str, Any]) -> list[str]:
    sc = res.get("scale")
    if not sc:
        return []
    mb = 1 << 20
    lines = ["", f"### targets at scale: --targets ram vs store (K = {sc['k']}; dense: {sc['tokens']} tokens x K; "
                 f"store LRU {sc['budget_mb']} MB)", "",
             "| targets | mode | rows | set-up s | read img/s | img/s with set-up | peak RSS MB | held MB | "
             "targets in RAM MB | chunk reads |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, entry in sc["kinds"].items():
        for r in entry["runs"]:
            lines.append(f"| {kind} | {r['mode']} | {r['rows']:,} | {_f(r['setup_s'], 2)} | {_f(r['read_img_per_s'])} | "
                         f"{_f(r['img_per_s_with_setup'])} | {_f(r['peak_rss_bytes'] / mb, 1)} | "
                         f"{_f(r['held_rss_bytes'] / mb, 1)} | {_f(r['targets_ram_bytes'] / mb, 1)} | "
                         f"{_f(r['chunk_reads'])} |")
    lines += ["", f"Per-row cost at 4N / at N (set-up + one epoch of reads) and the RAM per rank projected to "
                  f"{sc['imagenet_rows']:,} rows (a line through the two peaks; `formula`: ram N x bytes per row of "
                  f"the targets, store the LRU budget):", "",
              "| targets | mode | cost growth | peak bytes/row | fixed MB | projected GB | formula GB |",
              "|---|---|---|---|---|---|---|"]
    for kind, entry in sc["kinds"].items():
        for mode in ("ram", "store"):
            sm = entry["summary"][mode]
            pr = sm["projected"]
            lines.append(f"| {kind} | {mode} | {_f(sm['cost_growth'], 2)} | {_f(pr['bytes_per_row'], 1)} | "
                         f"{_f(pr['fixed_bytes'] / mb, 1)} | {_f(pr['bytes'] / 2**30, 2)} | "
                         f"{_f(sm['projected_targets_bytes'] / 2**30, 3)} |")
    return lines


def render_markdown(res: dict[str, Any]) -> str:
    """The Markdown table of a run (or of the sections it has measured so far)."""
    return "\n".join(_header(res) + _cache_table(res) + _basis_table(res) + _train_table(res)
                     + _peers_table(res) + _dense_table(res) + _input_table(res) + _scale_table(res)) + "\n"
