"""tcskd bench at tiny sizes: every section runs and the JSON has its figures (no timing assertions), and the
timings the stages return (the seams the benchmark measures through) are there and add up."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _stores import map_teacher
from conftest import make_npz
from tcskd.bench.cache import bench_forward
from tcskd.bench.dense import bench_dense
from tcskd.bench.inputs import bench_input
from tcskd.bench.cli import bench_cmd
from tcskd.bench.env import REPO_ROOT
from tcskd.bench.measure import linear_fit
from tcskd.bench.profiles import BENCH_SCHEMA, BenchConfig, TeacherSpec, profile_config
from tcskd.bench.report import _peers_table, goal
from tcskd.bench.run import run_bench
from tcskd.bench.synthetic import make_dinov2, make_synthetic_npz, make_tiled_store
from tcskd.bench.train import bench_train, data_wait, epochs_from_metrics
from tcskd.cache.build import CacheConfig, build_cache
from tcskd.errors import TcskdError
from tcskd.store.registry import cache_key
from tcskd.store.backends import open_store
from tcskd.store.integrity import first_problem
from tcskd.subspace.fit import BasisConfig, fit_basis


def _tiny_config(data: str, teacher: str, workdir, **kw) -> BenchConfig:
    base = dict(profile="cpu", device="cpu", quick=True, data=data,
                teachers=[TeacherSpec("tiny", teacher, 16)], cache_rows=8, cache_batch=8, chunk_rows=8,
                forward_seconds=0.01, basis_dim=4, basis_rows_large=48, basis_plot=False, student="cnn",
                train_batch=8, train_epochs=1, isolate=False, repeats=1, warmup=1, workdir=str(workdir), dense_rows=8,
                input_images=16, input_batch=8, input_px=32, peer_arms=())
    base.update(kw)
    return BenchConfig(**base)


def _tiny_cache(tmp_path, teacher: str, n: int = 16, **kw):
    data = make_npz(tmp_path / "d.npz", n=n, size=12, channels=3)
    cfg = CacheConfig(data=data, teacher=teacher, image_size=16, batch_size=8, chunk_rows=8,
                      cache_root=str(tmp_path / "c"), device="cpu", **kw)
    return cfg


def _listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.slow
def test_bench_sections_in_process(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=40, size=12, channels=3)
    out = tmp_path / "out" / "bench.json"
    repo_caches = _listing(REPO_ROOT / "caches")
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine two threads cost more than they give
        res = run_bench(_tiny_config(data, tiny_teacher, tmp_path / "work", threads=1), out)
    finally:
        torch.set_num_threads(threads)

    saved = json.loads(out.read_text())
    assert saved["schema"] == BENCH_SCHEMA
    for key in ("environment", "settings", "cache", "basis", "train", "dense", "dataloading", "input", "goals"):
        assert saved[key], key
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"]

    t = saved["cache"]["teachers"][0]
    assert t["forward"]["rows_per_s"]["median"] > 0 and t["inputs"]["rows_per_s"]["median"] > 0
    assert [s["rows"] for s in t["cache"]["sizes"]] == [8, 16, 32]
    assert all(s["rows_per_s"] > 0 for s in t["cache"]["sizes"])
    for s in t["cache"]["sizes"]:  # the parts build_cache reports, within the run's own time
        assert set(s["timings_s"]) == {"setup", "inputs", "forward", "write"}
        assert all(v > 0 for v in s["timings_s"].values()) and sum(s["timings_s"].values()) <= s["seconds"]["max"]
    assert t["cache"]["linear_fit"] is not None

    basis = saved["basis"]
    rows = [b["rows"] for b in basis["sizes"]]
    assert rows == [8, 16, 32, 48] and basis["sizes"][-1]["tiled"]
    assert all(b["basis_vs_read"] > 0 for b in basis["sizes"])
    assert basis["plot_drawn"] is False
    for b in basis["sizes"]:  # the parts fit_basis reports
        parts = b["basis_parts_s"]
        assert list(parts) == ["moments", "decomposition", "write_basis", "plot", "other"]
        assert parts["moments"] > 0 and parts["decomposition"] > 0 and parts["write_basis"] > 0
        assert parts["plot"] == 0.0 and parts["other"] >= 0

    for m in ("ce", "tcs", "online"):
        r = saved["train"][m]
        assert r["img_per_s"]["median"] > 0 and r["peak_mem_bytes"] > 0
        assert r["steps_per_epoch"] == 4 and r["data_wait"]["limit"] in ("input pipeline", "training step")
        assert r["data_wait"]["first_batch_s"] > 0 and r["data_wait"]["step_ms"] > 0
        assert 0 < r["data_wait"]["wait_share"] <= 1  # the waits lie within the epoch
        assert r["loader_only"]["img_per_s"]["median"] > 0
        assert saved["dataloading"][f"train/{m}"]["wait_share"] >= 0
    assert saved["dataloading"]["cache/tiny"]["limit"] in ("input pipeline", "teacher forward")

    goals = saved["goals"]
    for name in ("cache_vs_forward", "cache_cost_linear", "basis_vs_read", "tcs_vs_ce_throughput",
                 "online_vs_tcs_time", "tcs_vs_online_memory", "train_vs_cache_input_cpu"):
        g = goals[name]
        assert g["value"] > 0 and set(g) >= {"value", "goal", "met", "applies"}, name
    assert goals["online_vs_tcs_time"]["applies"] is False  # a GPU goal, measured on the CPU
    assert res["goals"].keys() == goals.keys()

    assert saved["dense"]["skipped"].startswith(f"teacher {tiny_teacher} gives no token grid")  # a global teacher

    md = out.with_suffix(".md").read_text()
    assert "| ce |" in md and "cache_vs_forward" in md and "(tiled)" in md and "dense vs global: skipped" in md
    assert saved["input"]["images"] == 16 and "### input: the loaders alone" in md
    assert not (tmp_path / "work" / "input").exists()  # its JPEGs are removed
    # the caches and runs went into the given workdir (and were removed there), never into the repository
    assert "caches-tiny" in _listing(tmp_path / "work") and "tiled" in _listing(tmp_path / "work")
    assert _listing(REPO_ROOT / "caches") == repo_caches


def test_dense_section_compares_tokens_with_global_features(tmp_path):
    """tcskd bench's dense section: the cache stage for global, raw patch and --dim K caches (img/s, tokens/s,
    bytes per image) and the basis stage on the global and the patch cache, in the JSON and the Markdown."""
    from tcskd.bench.report import render_markdown

    data = make_npz(tmp_path / "d.npz", n=16, size=12, channels=3)
    teacher = map_teacher(tmp_path / "t")  # 4 x 4 tokens of 8 dims at 16 px
    work = tmp_path / "work"
    res = bench_dense(teacher, data, 16, 16, 8, 0, 8, 4, torch.device("cpu"), 1, work)
    cache = {c["config"]: c for c in res["cache"]["configs"]}
    assert list(cache) == ["global", "patch", "coords"] and res["cache"]["k"] == 4
    assert [(c["tokens_per_image"], c["dim"], c["teacher_dim"]) for c in cache.values()] == [(1, 8, 8), (16, 8, 8),
                                                                                             (16, 4, 8)]
    assert [c["bytes_per_image"] for c in cache.values()] == [8 * 2, 16 * 8 * 2, 16 * 4 * 2]
    for c in cache.values():
        assert c["img_per_s"] > 0 and c["tokens_per_s"] == pytest.approx(c["img_per_s"] * c["tokens_per_image"])
        assert c["disk_bytes_per_image"] > c["features_disk_bytes_per_image"] > 0 and c["timings_s"]["forward"] > 0
    assert cache["coords"]["timings_s"]["basis"] > 0 and "basis" not in cache["global"]["timings_s"]
    basis = {b["config"]: b for b in res["basis"]["configs"]}
    assert list(basis) == ["global", "patch"]
    assert basis["global"]["samples"] == 16 and basis["patch"]["samples"] == 16 * 16  # every token a sample
    assert all(b["fit_samples_per_s"] > 0 and b["read_mb_per_s"] > 0 for b in basis.values())
    assert not work.exists() or not any(work.rglob("zarr.json"))  # its caches are removed
    md = render_markdown({"environment": {"device_name": "cpu", "cpu_count": 2, "torch_threads": 1, "device": "cpu",
                                          "date": "today", "torch": "x", "tcskd": "x", "python": "x"},
                          "profile": "cpu", "quick": True, "settings": {"repeats": 1, "warmup": 1},
                          "dense": {"teacher": "map", **res}})
    assert "### dense vs global: cache" in md and "| coords | 16 x 4 of 8 float16 |" in md
    assert "### dense vs global: basis" in md and "| patch | 4 | 256 |" in md
    assert profile_config("gpu", "cuda").dense_rows > 0 and profile_config("cpu", "cpu").dense_rows > 0


def test_input_section_measures_both_loaders(tmp_path):
    """tcskd bench's input section: the cache stage's loader (full and draft decode) and the training loader
    alone on a folder of JPEGs, img/s and CPU per image each, and the train / cache ratio; JSON and Markdown."""
    from tcskd.bench.report import compute_goals, render_markdown

    res = bench_input(tmp_path / "w", 24, torch.device("cpu"), width=120, height=90, teacher_size=32,
                      student_size=32, batch=8, workers=(1,))
    assert (res["images"], res["width"], res["height"], res["batch"]) == (24, 120, 90, 8)
    assert res["draft_reduction"] == 2  # the 90 px centre view is 45 >= 32 px at 1/2, 23 at 1/4
    assert sorted(p.suffix for p in (tmp_path / "w" / "jpegs").rglob("*.*")) == [".jpg"] * 24
    assert 0 < res["jpeg_kb"]["min"] <= res["jpeg_kb"]["mean"] <= res["jpeg_kb"]["max"]
    assert [(c["loader"], c["decode"], c["workers"], c["images"]) for c in res["configs"]] == [
        ("cache", "full", 1, 24), ("cache", "draft", 1, 24), ("train", "full", 1, 24)]
    for c in res["configs"]:
        rate, cpu = c["img_per_s"]["median"], c["cpu_s_per_image"]["median"]
        assert rate > 0 and cpu > 0 and c["cores_busy"] == round(rate * cpu, 3)
        assert c["cores_per_1000_img_per_s"] == round(1000 * cpu, 3)
    sm = res["summary"]["1"]
    cpu = {(c["loader"], c["decode"]): c["cpu_s_per_image"]["median"] for c in res["configs"]}
    assert sm["train_vs_cache_cpu"] == pytest.approx(cpu["train", "full"] / cpu["cache", "full"])
    assert sm["draft_vs_full_cpu"] == pytest.approx(cpu["cache", "draft"] / cpu["cache", "full"])
    assert set(sm["teacher_img_per_s_fed"]) == {"full", "draft"} and sm["student_img_per_s_fed"] > 0
    whole = {"input": res}
    g = compute_goals(whole, torch.device("cpu"))["train_vs_cache_input_cpu"]
    assert g["value"] == round(sm["train_vs_cache_cpu"], 4) and g["goal"] == 1.3 and g["applies"]
    md = render_markdown({"environment": {"device_name": "cpu", "cpu_count": 2, "torch_threads": 1, "device": "cpu",
                                          "date": "today", "torch": "x", "tcskd": "x", "python": "x"},
                          "profile": "cpu", "quick": True, "settings": {"repeats": 1, "warmup": 1}, **whole})
    assert "### input: the loaders alone (24 JPEGs of 120x90" in md and "| train | full | 32 | 1 |" in md
    assert profile_config("cpu", "cpu").input_images == 2000 and profile_config("cpu", "cpu", quick=True).input_images


def test_tiled_store_is_a_cache_of_its_own(tmp_path, tiny_teacher):
    """The basis's large store: the source's features tiled, under a key that hashes its own identity."""
    src = build_cache(_tiny_cache(tmp_path, tiny_teacher)).path
    dst = make_tiled_store(src, tmp_path / "tiled" / "store", 40)
    with open_store(src) as a, open_store(dst) as b:
        m = b.manifest
        assert m["identity"]["bench_tiled_rows"] == 40 and m["key"] == cache_key(m["identity"])
        assert m["key"] != a.manifest["key"] and m["n_rows"] == 40 and m["complete"]
        assert first_problem(b) is None  # complete and sound, by the one integrity check readers use
        np.testing.assert_array_equal(b.read("features"), a.read("features")[np.arange(40) % 16])
    fit_basis(BasisConfig(cache=dst, name="pca", dim=4, device="cpu", plot=False))  # a reader accepts it


def test_stages_return_their_timings(tmp_path, tiny_teacher):
    """build_cache and fit_basis time their own parts: present, positive, within the call's wall time."""
    cfg = _tiny_cache(tmp_path, tiny_teacher, n=24)
    t0 = time.perf_counter()
    res = build_cache(cfg)
    wall = time.perf_counter() - t0
    assert not res.hit and set(res.timings) == {"setup", "inputs", "forward", "write"}
    assert all(v > 0 for v in res.timings.values()), res.timings
    assert sum(res.timings.values()) <= res.seconds <= wall
    hit = build_cache(cfg)
    assert hit.hit and list(hit.timings) == ["setup"] and 0 < hit.timings["setup"] <= hit.seconds

    t0 = time.perf_counter()
    s = fit_basis(BasisConfig(cache=str(res.path), name="pca", dim=4, device="cpu", coords=True, plot=False))
    wall = time.perf_counter() - t0
    tm = s["timings"]
    assert set(tm) == {"read", "compute", "write", "plot"}
    assert tm["read"] > 0 and tm["compute"] > 0 and tm["write"] > 0 and tm["plot"] == 0.0
    assert sum(tm.values()) <= wall
    assert s["plot"] is None and not list(res.path.parent.glob("basis-*.png"))  # plot=False draws nothing


def test_data_wait_from_the_loops_own_figures():
    """Per-epoch waits as the loop writes them to metrics.jsonl; rows without them are refused."""
    rows = [{"train_img_per_s": 10.0, "seconds": 2.0, "data_wait_s": 1.5, "first_batch_s": 1.0, "steps": 6},
            {"train_img_per_s": 12.0, "seconds": 1.0, "data_wait_s": 0.6, "first_batch_s": 0.1, "steps": 6}]
    epochs = epochs_from_metrics(rows)
    assert epochs == [{"data_wait_s": 1.5, "first_batch_s": 1.0, "steps": 6, "seconds": 2.0},
                      {"data_wait_s": 0.6, "first_batch_s": 0.1, "steps": 6, "seconds": 1.0}]
    dw = data_wait(epochs[1:], workers=0)
    assert dw["per_step_ms"] == pytest.approx(100.0) and dw["step_ms"] == pytest.approx(1e3 / 6)
    assert dw["wait_share"] == pytest.approx(0.6) and dw["limit"] == "input pipeline"
    assert data_wait(epochs[1:], workers=2)["threshold"] == 0.1
    with pytest.raises(TcskdError, match="data_wait_s"):  # a loop that stops reporting its waits is not 0 s
        epochs_from_metrics([{"train_img_per_s": 1.0, "seconds": 1.0}])


@pytest.mark.slow
def test_train_child_process(tmp_path, tiny_teacher):
    """The isolated path: one method in its own process, peak RSS of that process."""
    cache = build_cache(_tiny_cache(tmp_path, tiny_teacher)).path
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=4, device="cpu", plot=False))
    res = bench_train(str(cache), ("tcs",), "cnn", 8, 1, 4, torch.device("cpu"), tmp_path / "work", isolate=True,
                      threads=1, timeout=120)
    r = res["tcs"]
    assert r["peak_mem_isolated"] is True and r["peak_mem_bytes"] >= r["rss_before_train_bytes"] > 0
    assert r["img_per_s"]["median"] > 0


def test_gpu_profile_inputs_on_cpu(tmp_path):
    """The GPU profile's inputs (a DINOv2-architecture hf teacher, synthetic 32 px npz) work, here tiny."""
    pytest.importorskip("transformers")
    data = make_synthetic_npz(tmp_path / "s.npz", 12)
    spec = make_dinov2(tmp_path / "dino", "vits14", image_size=28, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    assert spec.startswith("hf:")
    fwd = bench_forward(spec, data, None, 4, torch.device("cpu"), 1, 1, 0.01)
    assert fwd["dim"] == 32 and fwd["image_size"] == 28 and fwd["rows_per_s"]["median"] > 0
    cfg = profile_config("gpu", "cuda")
    assert [t.arch for t in cfg.teachers] == ["vits14", "vitb14", "vitl14"] and cfg.train_batch == 512
    assert profile_config("cpu", "cpu").data == "builtin:mnist5k"


def test_linear_fit_and_goals():
    fit = linear_fit([1, 2, 4], [1.5, 2.0, 3.0])
    assert fit["fixed_s"] == pytest.approx(1.0) and fit["marginal_rows_per_s"] == pytest.approx(2.0)
    assert fit["cost_growth"] == pytest.approx(1.0)
    g = goal("basis_vs_read", 2.0, torch.device("cpu"))
    assert g["met"] is False and g["goal"] == 1.5 and g["applies"]


def test_cli_help():
    r = CliRunner().invoke(bench_cmd, ["--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "--device" in r.output


def test_scale_section_reads_the_same_targets_from_ram_and_store(tmp_path):
    """tcskd bench's scale section at tiny sizes (in process): per (kind, rows, mode) the figures, the targets'
    RAM bytes (global: rows x K float32; dense: rows x T x K float16), every chunk read once by the store's
    LRU, the same values read in both modes; the summary (cost growth, ImageNet-1k projection); JSON keys and
    the Markdown table."""
    from tcskd.bench.report import render_markdown
    from tcskd.bench.scale import IMAGENET_ROWS, bench_scale

    res = bench_scale(tmp_path / "w", {"global": [200, 800], "dense": [100, 400]}, k=8, tokens=16, budget_mb=1,
                      isolate=False)
    assert (res["k"], res["tokens"], res["budget_mb"], res["imagenet_rows"]) == (8, 16, 1, IMAGENET_ROWS)
    assert list(res["kinds"]) == ["global", "dense"]
    for kind, entry in res["kinds"].items():
        runs = entry["runs"]
        assert [(r["mode"]) for r in runs] == ["ram", "store"] * 2
        for ram, store in (runs[0:2], runs[2:4]):
            n = ram["rows"]
            assert store["rows"] == n and n == {200: 180, 800: 720, 100: 90, 400: 360}[n * 10 // 9]  # 10 % held out
            per_row = 8 * 4 if kind == "global" else 16 * 8 * 2
            assert ram["targets_ram_bytes"] == store["targets_ram_bytes"] == n * per_row
            assert store["checksum"] == pytest.approx(ram["checksum"], rel=1e-9, abs=1e-9)
            assert ram["chunk_reads"] is None and store["lru_budget_bytes"] == 1 << 20
            chunk = 1024 if kind == "global" else 32
            total = ram["rows"] * 10 // 9
            assert store["chunk_reads"] <= -(-total // chunk) and store["chunk_reads"] >= -(-n // chunk)
            for r in (ram, store):
                assert r["read_img_per_s"] > 0 and r["setup_s"] > 0 and r["peak_reset"] in (True, False)
        sm = entry["summary"]
        for mode in ("ram", "store"):
            assert sm[mode]["rows_ratio"] == 4.0 and sm[mode]["cost_growth"] > 0
            assert set(sm[mode]["projected"]) == {"bytes_per_row", "fixed_bytes", "rows", "bytes"}
        assert sm["ram"]["projected_targets_bytes"] == pytest.approx(per_row * IMAGENET_ROWS)
        assert sm["store"]["projected_targets_bytes"] == 1 << 20
    assert not list((tmp_path / "w").iterdir())  # every store removed after its measurement
    md = render_markdown({"environment": {"device_name": "cpu", "cpu_count": 2, "torch_threads": 1, "device": "cpu",
                                          "date": "today", "torch": "x", "tcskd": "x", "python": "x"},
                          "profile": "cpu", "quick": True, "settings": {"repeats": 1, "warmup": 1}, "scale": res})
    assert "### targets at scale: --targets ram vs store (K = 8; dense: 16 tokens x K; store LRU 1 MB)" in md
    assert "| global | store | 720 |" in md and "| dense | ram | 360 |" in md and "| dense | store | " in md
    cpu, quick = profile_config("cpu", "cpu"), profile_config("cpu", "cpu", quick=True)
    assert (cpu.scale_global_rows, cpu.scale_dense_rows) == ((50000, 200000), (5000, 20000))
    assert quick.scale_global_rows and quick.scale_dense_rows


@pytest.mark.slow
def test_bench_peers_section_times_each_arm_beside_tcskds_train(tmp_path, tiny_teacher):
    """The peers section runs each arm in its own process on the bench's cache; its seconds per epoch are the
    median of the timed epochs, and its ratio is over the train section's tcs."""
    from tcskd.bench.peerbench import bench_peers

    res = build_cache(_tiny_cache(tmp_path, tiny_teacher, n=24))
    train = {"tcs": {"epoch_seconds": {"median": 0.5}}, "ce": {"epoch_seconds": {"median": 0.25}}}
    out = bench_peers(str(res.path), ("torchdistill-ce", "timm-fitnet", "no-such-arm"), "cnn", 8, 2,
                      torch.device("cpu"), tmp_path / "work", workers=0, threads=1, train=train)
    assert set(out["arms"]) == {"torchdistill-ce", "timm-fitnet"} and list(out["errors"]) == ["no-such-arm"]
    for arm, r in out["arms"].items():
        assert len(r["epoch_seconds"]) == 3  # one warm-up + 2 timed
        assert r["seconds_per_epoch"] == pytest.approx(float(np.median(r["epoch_seconds"][1:])))
        assert r["per_epoch_vs_tcs"] == pytest.approx(r["seconds_per_epoch"] / 0.5)
        assert r["per_epoch_vs_ce"] == pytest.approx(r["seconds_per_epoch"] / 0.25)
        assert r["framework"] == arm.split("-")[0]
    assert out["versions"]["torchdistill"] and out["versions"]["timm"]
    md = "\n".join(_peers_table({"peers": out}))
    assert "| timm-fitnet |" in md and "| no-such-arm | failed:" in md
    assert not (tmp_path / "work" / "peer-timm-fitnet").exists()  # run folders are removed


def test_bench_peers_section_is_one_line_without_the_extra(monkeypatch, tmp_path):
    import tcskd.bench.peerbench as pb

    monkeypatch.setattr(pb, "missing_frameworks", lambda: ["timm"])
    out = pb.bench_peers("unused", ("timm-ce",), "cnn", 8, 1, torch.device("cpu"), tmp_path)
    assert out == {"skipped": "timm not installed: pip install 'tcskd[peers]'"}
    md = "\n".join(_peers_table({"peers": out}))
    assert [ln for ln in md.splitlines() if "peers" in ln] == ["### peers: skipped (timm not installed: pip install "
                                                                "'tcskd[peers]')"]
