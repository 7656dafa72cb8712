"""recipes/fewshot-builtin.yaml: the few-shot grid on the built-in default (n = 1, 2, 5, 10 labels per class x
ce, fitnet, tcs x 3 seeds), every option that defines a report row pinned, and a teacher eval (kNN and a probe
whose decay is chosen on the validation rows) at each budget and seed, holding out the runs' rows."""

from __future__ import annotations

from pathlib import Path

from tcskd.recipe import load_recipe
from tcskd.train.config import resolve_config, table_row

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fewshot-builtin.yaml"
BUDGETS, METHODS, SEEDS = (1, 2, 5, 10), ("ce", "fitnet", "tcs"), (0, 1, 2)


def test_the_grid_and_its_pinned_rows():
    plan = load_recipe(RECIPE)
    assert sorted(plan.runs) == sorted(f"{m}-lpc{n}-s{s}" for n in BUDGETS for m in METHODS for s in SEEDS)
    cache = plan.caches["train"]
    assert (cache.data, cache.teacher, cache.image_size) == ("builtin:mnist5k", "builtin:efficientnet-lite0", 112)
    assert set(plan.caches) == {"train", "test"}
    # The basis of recipes/default.yaml: the same cache and basis serve both recipes (none is refitted).
    demo = load_recipe(RECIPE.parent / "default.yaml")
    assert plan.bases == demo.bases and plan.caches == demo.caches
    for name, cfg in plan.runs.items():
        method, lpc, seed = name.split("-")
        assert (cfg.method, cfg.labels_per_class, cfg.seed) == (method, int(lpc[3:]), int(seed[1:]))
        r = resolve_config(cfg)
        assert (r.student, r.epochs, r.batch_size, r.optimizer, r.lr, r.weight_decay, r.momentum, r.schedule,
                r.warmup_epochs, r.image_size) == ("cnn", 15, 128, "sgd", 0.05, 5e-4, 0.9, "cosine", 1.0, None)
        assert (r.val_frac, r.val_per_class, r.val_seed) == (0.1, None, 0)
        distils = method != "ce"
        assert table_row(r) == {
            "method": method, "basis": {"ce": None, "fitnet": "identity", "tcs": "pca"}[method],
            "dim": {"ce": None, "fitnet": "all", "tcs": 64}[method], "lambda": 10.0 if distils else 0.0,
            "tailoring": "off", "elsh_bits": 0, "classify_from": "feature", "labels_per_class": int(lpc[3:])}


def test_a_teacher_eval_per_budget_and_seed_on_the_runs_rows():
    plan = load_recipe(RECIPE)
    assert sorted(plan.evals) == sorted(f"teacher-lpc{n}-s{s}" for n in BUDGETS for s in SEEDS)
    for name, e in plan.evals.items():
        assert e.out == str(plan.out / f"{name}.json")
        assert (e.k, e.linear, e.probe_wd) == (20, True, "auto")
        assert (e.val_frac, e.val_per_class, e.val_seed) == (0.1, None, 0)  # the runs' holdout
        assert f"teacher-lpc{e.labels_per_class}-s{e.seed}" == name
