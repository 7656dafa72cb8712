"""tcskd bench at tiny sizes: every section runs and the JSON has its figures (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from tcskd import bench
from tcskd.bench import BenchConfig, TeacherSpec


def _tiny_config(data: str, teacher: str, workdir, **kw) -> BenchConfig:
    base = dict(profile="cpu", device="cpu", quick=True, data=data,
                teachers=[TeacherSpec("tiny", teacher, 16)], cache_rows=8, cache_batch=8, chunk_rows=8,
                forward_seconds=0.01, basis_dim=4, basis_rows_large=48, student="cnn", train_batch=8,
                train_epochs=1, isolate=False, repeats=1, warmup=1, workdir=str(workdir))
    base.update(kw)
    return BenchConfig(**base)


def test_bench_sections_in_process(tmp_path, tiny_teacher, monkeypatch):
    import tcskd.subspace.fit as fit_mod

    monkeypatch.setattr(fit_mod, "_plot", lambda *a, **k: None)  # the scree plot costs seconds here
    data = make_npz(tmp_path / "d.npz", n=40, size=12, channels=3)
    out = tmp_path / "out" / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine two threads cost more than they give
        res = bench.run_bench(_tiny_config(data, tiny_teacher, tmp_path / "work", threads=1), out)
    finally:
        torch.set_num_threads(threads)

    saved = json.loads(out.read_text())
    assert saved["schema"] == bench.BENCH_SCHEMA
    for key in ("environment", "settings", "cache", "basis", "train", "dataloading", "goals"):
        assert saved[key], key
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["date"]

    t = saved["cache"]["teachers"][0]
    assert t["forward"]["rows_per_s"]["median"] > 0 and t["inputs"]["rows_per_s"]["median"] > 0
    assert [s["rows"] for s in t["cache"]["sizes"]] == [8, 16, 32]
    assert all(s["rows_per_s"] > 0 for s in t["cache"]["sizes"])
    assert t["cache"]["linear_fit"] is not None

    rows = [b["rows"] for b in saved["basis"]["sizes"]]
    assert rows == [8, 16, 32, 48] and saved["basis"]["sizes"][-1]["tiled"]
    assert all(b["basis_vs_read"] > 0 for b in saved["basis"]["sizes"])

    for m in ("ce", "tcs", "online"):
        r = saved["train"][m]
        assert r["img_per_s"]["median"] > 0 and r["peak_mem_bytes"] > 0
        assert r["steps_per_epoch"] == 4 and r["data_wait"]["limit"] in ("input pipeline", "training step")
        assert saved["dataloading"][f"train/{m}"]["wait_share"] >= 0
    assert saved["dataloading"]["cache/tiny"]["limit"] in ("input pipeline", "teacher forward")

    goals = saved["goals"]
    for name in ("cache_vs_forward", "cache_cost_linear", "basis_vs_read", "tcs_vs_ce_throughput",
                 "online_vs_tcs_time", "tcs_vs_online_memory"):
        g = goals[name]
        assert g["value"] > 0 and set(g) >= {"value", "goal", "met", "applies"}, name
    assert goals["online_vs_tcs_time"]["applies"] is False  # a GPU goal, measured on the CPU
    assert res["goals"].keys() == goals.keys()

    md = out.with_suffix(".md").read_text()
    assert "| ce |" in md and "cache_vs_forward" in md and "(tiled)" in md
    # the temporary caches stay in the given workdir, never in the repository
    assert not (bench.REPO_ROOT / "caches").exists() or not any(
        p.name.startswith("bench-tiled") for p in (bench.REPO_ROOT / "caches").iterdir())


@pytest.mark.slow
def test_train_child_process(tmp_path, tiny_teacher):
    """The isolated path: one method in its own process, peak RSS of that process."""
    data = make_npz(tmp_path / "d.npz", n=16, size=12, channels=3)
    cfg = _tiny_config(data, tiny_teacher, tmp_path / "work", repeats=1)
    from tcskd.cache.build import CacheConfig, build_cache

    cache = build_cache(CacheConfig(data=data, teacher=tiny_teacher, image_size=16, batch_size=8,
                                    cache_root=str(tmp_path / "c"), device="cpu")).path
    from tcskd.subspace.fit import BasisConfig, fit_basis

    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=4, device="cpu"))
    res = bench.bench_train(str(cache), ("tcs",), "cnn", cfg.train_batch, 1, 4, torch.device("cpu"),
                            tmp_path / "work", isolate=True, threads=1, timeout=120)
    r = res["tcs"]
    assert r["peak_mem_isolated"] is True and r["peak_mem_bytes"] >= r["rss_before_train_bytes"] > 0
    assert r["img_per_s"]["median"] > 0


def test_gpu_profile_inputs_on_cpu(tmp_path):
    """The GPU profile's inputs (a DINOv2-architecture hf teacher, synthetic 32 px npz) work, here tiny."""
    pytest.importorskip("transformers")
    data = bench.make_synthetic_npz(tmp_path / "s.npz", 12)
    spec = bench.make_dinov2(tmp_path / "dino", "vits14", image_size=28, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2)
    assert spec.startswith("hf:")
    fwd = bench.bench_forward(spec, data, None, 4, torch.device("cpu"), 1, 1, 0.01)
    assert fwd["dim"] == 32 and fwd["image_size"] == 28 and fwd["rows_per_s"]["median"] > 0
    cfg = bench.profile_config("gpu", "cuda")
    assert [t.arch for t in cfg.teachers] == ["vits14", "vitb14", "vitl14"] and cfg.train_batch == 512
    assert bench.profile_config("cpu", "cpu").data == "builtin:mnist5k"


def test_linear_fit_and_goals():
    fit = bench._linear_fit([1, 2, 4], [1.5, 2.0, 3.0])
    assert fit["fixed_s"] == pytest.approx(1.0) and fit["marginal_rows_per_s"] == pytest.approx(2.0)
    assert fit["cost_growth"] == pytest.approx(1.0)
    g = bench._goal("basis_vs_read", 2.0, torch.device("cpu"))
    assert g["met"] is False and g["goal"] == 1.5 and g["applies"]


def test_cli_help():
    r = CliRunner().invoke(bench.bench_cmd, ["--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "--device" in r.output
