"""Recipes: every shipped recipe parses and runs end to end on tiny stand-ins (a CIFAR-100-format folder, an
image folder, a tiny random-initialised DINOv2), a run of a recipe is resumable (caches hit, bases and
finished runs skipped, a stopped run resumes to the uninterrupted result), ``--set`` overrides by dotted
path, and a bad recipe is refused with one line naming the key and the file before anything runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.recipe import apply_overrides, load_recipe, run_recipe
from tcskd.results import TIMING_KEYS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))
#: Stand-ins for the recipes' placeholder paths, for the tests that only parse.
_PATHS = {"cache.data": "builtin:mnist5k", "cache.teacher": "builtin:efficientnet-lite0"}
#: final.json keys that depend on the clock, the memory or the folder.
_VOLATILE = ("run_dir", "timings", "created", *TIMING_KEYS)


# -- tiny stand-ins ------------------------------------------------------------------

def _cifar100(root: Path, n_train: int = 200, n_test: int = 60, classes: int = 5) -> Path:
    """The python-pickle release's layout: cifar-100-python/{train,test,meta}; ``classes`` classes used."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (classes, 3 * 32 * 32))
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % classes
        x = np.clip(0.7 * patterns[fine] + rng.integers(0, 77, (n, 3 * 32 * 32)), 0, 255).astype(np.uint8)
        batch = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": x}
        (d / name).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta))
    return root


def _imagefolder(root: Path, per_class: tuple[int, int] = (12, 4), classes: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                img = np.full((20, 20, 3), 60 * c, np.uint8) + rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("recipe-inputs")
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    Dinov2Model(cfg).eval().save_pretrained(root / "dinov2")
    return {"cifar": str(_cifar100(root / "cifar")), "images": str(_imagefolder(root / "images")),
            "teacher": f"hf:{root / 'dinov2'}"}


def _tiny(name: str, s: dict[str, str], out: Path) -> list[str]:
    """--set overrides that shrink a shipped recipe to seconds: few rows, 1 or 2 epochs, tiny images."""
    common = [f"out={out}", "device=cpu", "train.epochs=1", "cache.batch_size=32", f"cache.cache_root={out}/caches"]
    if name == "default.yaml":
        return common + ["cache.limit=120", "cache.image_size=32"]
    if name == "fewshot-builtin.yaml":  # two budgets, one seed
        return common + ["cache.limit=120", "cache.image_size=32", "grid.labels_per_class=[1, 2]", "grid.seed=[0]"]
    tiny = common + [f"cache.teacher={s['teacher']}", "cache.image_size=28", "train.batch_size=32", "basis.pca.dim=16",
                     "train.epochs=2", "train.milestones=[1]"]  # multistep, its one milestone within the 2 epochs
    if name.startswith("cifar100"):
        tiny += [f"cache.data=cifar100:{s['cifar']}", "train.image_size=16"]
        return tiny + (["grid.student=[resnet20]"] if "vitb14" in name else [])  # vits14 runs every student
    if name == "imagenet-dinov2.yaml":
        return tiny + [f"cache.data=imagefolder:{s['images']}", "train.image_size=32"]
    if name == "mnist-seg.yaml":  # patch tokens of a 2 x 2 grid, 60 canvases, one budget and seed
        return common + [f"cache.teacher={s['teacher']}", "cache.image_size=28", "train.batch_size=32",
                         "cache.limit=60", "basis.pca.dim=8", "basis.random.dim=8", "train.image_size=16",
                         "train.epochs=1", "grid.seed=[0]", "grid.labels_per_class=[10]"]
    if name == "mnist-seg-ksweep.yaml":  # the same, K 2 and 8 of two 8-d bases
        return common + [f"cache.teacher={s['teacher']}", "cache.image_size=28", "train.batch_size=32",
                         "cache.limit=60", "basis.pca.dim=8", "basis.random.dim=8", "train.image_size=16",
                         "grid.seed=[0]", "grid.labels_per_class=[10]", "grid.dim=[2, 8]"]
    if name == "fewshot.yaml":
        return tiny + [f"cache.data=cifar100:{s['cifar']}", "train.image_size=16", "grid.seed=[0]"]
    raise AssertionError(f"no stand-in for recipes/{name}: add one here")


# -- the shipped recipes ------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_parses(name):
    plan = load_recipe(RECIPES / name, _PATHS)
    dense = plan.caches["train"].tokens == "patch"  # scored on the data's test masks: no test cache
    assert plan.runs and set(plan.caches) == ({"train"} if dense else {"train", "test"}) and plan.report
    text = (RECIPES / name).read_text()
    assert "paper" in text and ("standard" in text or name == "default.yaml"), "say where the values come from"


def test_default_recipe_is_the_demo():
    plan = load_recipe(RECIPES / "default.yaml")
    assert list(plan.runs) == [f"{m}-lpc{n}-s0" for n in ("all", "10") for m in ("ce", "fitnet", "tcs")]
    cfg = plan.runs["tcs-lpc10-s0"]
    assert (cfg.student, cfg.epochs, cfg.labels_per_class, cfg.basis) == ("cnn", 15, 10, "pca")
    cache = plan.caches["train"]
    assert (cache.data, cache.teacher, cache.image_size) == ("builtin:mnist5k", "builtin:efficientnet-lite0", 112)
    assert sorted(plan.evals) == ["teacher-lpc10-s0", "teacher-lpcall-s0"]


def test_cifar_recipes_use_the_standard_schedule():
    for name in ("cifar100-dinov2-vits14.yaml", "cifar100-dinov2-vitb14.yaml"):
        plan = load_recipe(RECIPES / name, _PATHS)
        assert {c.student for c in plan.runs.values()} == {"resnet8x4", "resnet20", "wrn-16-2", "wrn-40-2", "vgg8",
                                                          "mobilenetv2", "shufflenetv2"}
        cfg = next(iter(plan.runs.values()))
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.milestones, cfg.gamma,
                cfg.image_size) == (240, 64, 0.05, 5e-4, "multistep", (150, 180, 210), 0.1, 32)
        assert plan.caches["train"].image_size == 224


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_runs_end_to_end(name, stand_ins, tmp_path):
    out = tmp_path / "out"
    res = run_recipe(RECIPES / name, _tiny(name, stand_ins, out))
    assert res["runs"] and all(r["status"] == "trained" for r in res["runs"].values())
    for r in res["runs"].values():
        assert (Path(r["run_dir"]) / "final.json").is_file()
    assert Path(res["report"]).is_file() and Path(res["png"]).is_file()
    if name == "mnist-seg.yaml":  # segmentation: every run scored by mIoU, no teacher kNN
        assert not res["teacher"] and {r["run_dir"].rsplit("/", 1)[-1] for r in res["runs"].values()} == {
            "ce-lpc10-s0", "fitnet-lpc10-s0", "tcs-pca-lpc10-s0", "tcs-random-lpc10-s0"}
        finals = [json.loads((Path(r["run_dir"]) / "final.json").read_text()) for r in res["runs"].values()]
        assert all(f["task"] == "segment" and f["test_miou"] > 0 for f in finals)
        return
    if name == "mnist-seg-ksweep.yaml":  # every basis at every K, each run mimicking K coordinates per token
        finals = {r["run_dir"].rsplit("/", 1)[-1]: json.loads((Path(r["run_dir"]) / "final.json").read_text())
                  for r in res["runs"].values()}
        assert {(f["basis_kind"], f["dim"], f["task"], f["mimic_on"]) for f in finals.values()} == {
            (b, k, "segment", "dense") for b in ("pca", "random") for k in (2, 8)}
        assert not res["teacher"]
        return
    assert res["teacher"] and all(Path(f).is_file() for f in res["teacher"].values())


# -- resumable ---------------------------------------------------------------------

def _npz_recipe(tmp_path: Path, npz: str, teacher: str) -> Path:
    recipe = {"out": str(tmp_path / "out"), "device": "cpu",
              "cache": {"data": npz, "teacher": teacher, "cache_root": str(tmp_path / "caches"), "chunk_rows": 16},
              "basis": {"pca": {"dim": 8, "coords": True, "exclude_val": True}},
              "train": {"epochs": 2, "batch_size": 8, "dim": 4, "workers": 0},
              "grid": {"method": ["ce", "tcs"], "labels_per_class": [None, 4]},
              "eval": {"k": 5}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _final(run_dir: str) -> dict:
    final = json.loads((Path(run_dir) / "final.json").read_text())
    return {k: v for k, v in final.items() if k not in _VOLATILE and not k.endswith(("_seconds", "_bytes", "_mb"))}


@pytest.mark.slow
def test_a_recipe_resumes(tmp_path, tiny_teacher):
    from conftest import make_npz

    recipe = _npz_recipe(tmp_path, make_npz(tmp_path / "d.npz", n=48, n_test=16, channels=3), tiny_teacher)
    first = run_recipe(recipe, ["train.stop_after=1"])  # every run stopped after its first epoch, as if killed
    assert not any(first["cache_hits"].values()) and first["bases"] == {"pca": "fitted"}
    assert {r["status"] for r in first["runs"].values()} == {"stopped"} and first["report"] is None
    again = run_recipe(recipe)
    assert all(again["cache_hits"].values()) and again["bases"] == {"pca": "kept"}
    assert {r["status"] for r in again["runs"].values()} == {"trained"}
    whole = run_recipe(recipe, {"out": str(tmp_path / "whole")})  # the same, never interrupted
    for name, r in again["runs"].items():
        assert _final(r["run_dir"]) == _final(whole["runs"][name]["run_dir"]), name
    done = run_recipe(recipe)
    assert {r["status"] for r in done["runs"].values()} == {"done"} and Path(done["report"]).is_file()
    changed = run_recipe(recipe, ["basis.pca.dim=6", "grid.method=[ce]", "grid.seed=[1]", "eval=false"])
    assert changed["bases"] == {"pca": "fitted"}  # other options: fitted again
    # A finished run is reused only with the recipe's options; a changed one is refused, the run kept.
    with pytest.raises(TcskdError, match=r"finished with other options than the recipe's \(epochs 2 -> 3\)"):
        run_recipe(recipe, ["train.epochs=3"])
    assert {r["status"] for r in run_recipe(recipe)["runs"].values()} == {"done"}
    # Untailored runs: the tailoring criterion changes nothing, so a finished run stands; tailoring does not
    assert {r["status"] for r in run_recipe(recipe, ["train.select_by=ablation"])["runs"].values()} == {"done"}
    with pytest.raises(TcskdError, match=r"finished with other options than the recipe's \(.*select_every 0 -> 1"):
        run_recipe(recipe, ["train.tailor=\"on\""])
    # A teacher eval made with other options is made again.
    evals = run_recipe(recipe, ["eval.k=3"])["teacher"]
    assert {json.loads(Path(f).read_text())["k"] for f in evals.values()} == {3}


def test_set_overrides_by_dotted_path():
    recipe = {"train": {"epochs": 3}, "eval": True, "grid": {"seed": [0]}}
    apply_overrides(recipe, ["train.epochs=1", "grid.seed=[0, 1]", "cache.data=npz:/x", "eval.k=5",
                             "train.lam=5e-4", "train.dim=null"], "r.yaml")
    assert recipe == {"train": {"epochs": 1, "lam": "5e-4", "dim": None}, "eval": {"k": 5},
                      "grid": {"seed": [0, 1]}, "cache": {"data": "npz:/x"}}
    with pytest.raises(TcskdError, match="expected KEY=VALUE"):
        apply_overrides(recipe, ["train.epochs"], "r.yaml")
    with pytest.raises(TcskdError, match="'train.epochs' is not a mapping"):
        apply_overrides(recipe, ["train.epochs.x=1"], "r.yaml")


# -- bad recipes ----------------------------------------------------------------------

BAD = [
    (["nonsense=1"], "unknown key 'nonsense' (a recipe has"),
    (["train.epochz=1"], "unknown key 'train.epochz' (TrainConfig has no such field"),
    (["train.epochs=many"], "key 'train.epochs' must be an integer (got str 'many')"),
    (["grid.lr=[0.1, fast]"], "key 'grid.lr' must be a number or null (got str 'fast')"),
    (["grid.seed=3"], "key 'grid.seed' must be a non-empty list (got 3)"),
    (["grid.nope=[1]"], "unknown key 'grid.nope' (TrainConfig has no such field"),
    (["cache.views=two"], "key 'cache.views' must be an integer"),
    (["cache.split=test"], "key 'cache.split' is set by the recipe (give cache.splits)"),
    (["train.out=x"], "key 'train.out' is set by the recipe"),
    (["basis.pca.dim=x"], "key 'basis.pca.dim' must be an integer or null"),
    (["basis.pca.colour=1"], "unknown key 'basis.pca.colour' (BasisConfig has no such field"),
    (["eval.kk=3"], "unknown key 'eval.kk' (EvalConfig has no such field"),
    (["train.basis=other"], "run tcs-lpcall-s0 uses basis 'other'"),
    (["train.epochs=0"], "run ce-lpcall-s0: --epochs must be >= 1 (got 0)"),
    (["report=maybe"], "key 'report' must be true or false"),
    (["train.schedule=multistep"], "run ce-lpcall-s0: --schedule multistep needs --milestones"),
]


@pytest.mark.parametrize("sets, message", BAD, ids=[s[0] for s, _ in BAD])
def test_a_bad_recipe_is_one_line_naming_key_and_file(tmp_path, sets, message):
    recipe = RECIPES / "default.yaml"
    args = ["run", str(recipe), "--set", f"out={tmp_path / 'out'}", "--set", f"cache.cache_root={tmp_path / 'c'}"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tcskd: error: {recipe}: {message}"), res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()  # nothing ran


def test_placeholder_paths_are_refused_before_anything_runs():
    recipe = RECIPES / "cifar100-dinov2-vits14.yaml"
    res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code != 0 and res.output.strip() == (
        f"tcskd: error: {recipe}: key 'cache.data': /path/to/cifar-100-python does not exist "
        f"(set it with --set cache.data=cifar100:PATH)")


def test_a_missing_recipe_and_a_non_mapping(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path / "none.yaml")])
    assert res.exit_code != 0 and res.output.strip() == f"tcskd: error: {tmp_path / 'none.yaml'}: no such file"
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(TcskdError, match="list.yaml: a recipe is a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_include_merges_and_refuses_a_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"out": "o", "train": {"epochs": 3, "lr": 0.1},
                                                        "grid": {"seed": [0, 1]}}))
    (tmp_path / "top.yaml").write_text(yaml.safe_dump({"include": "base.yaml", "train": {"epochs": 1},
                                                       "grid": {"method": ["ce"]}}))
    plan = load_recipe(tmp_path / "top.yaml", {"eval": False, "basis": None})
    assert {(c.epochs, c.lr, c.seed, c.method) for c in plan.runs.values()} == {(1, 0.1, 0, "ce"), (1, 0.1, 1, "ce")}
    (tmp_path / "a.yaml").write_text("include: b.yaml\nout: o\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    res = CliRunner().invoke(main, ["run", str(tmp_path / "a.yaml")])
    assert res.exit_code != 0
    assert res.output.strip() == f"tcskd: error: {tmp_path / 'a.yaml'}: circular include a.yaml -> b.yaml -> a.yaml"
    (tmp_path / "c.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(TcskdError, match="nowhere.yaml: no such file"):
        load_recipe(tmp_path / "c.yaml")


def test_dry_run_lists_the_runs():
    res = CliRunner().invoke(main, ["run", str(RECIPES / "default.yaml"), "--dry-run", "--set", "grid.seed=[0, 1]"])
    assert res.exit_code == 0, res.output
    assert "runs (12)" in res.output and "tcs-lpc10-s1" in res.output


def test_cache_limit_shrinks_the_training_data_only():
    # Students are tested on the whole test split: the teacher's test cache is whole too.
    plan = load_recipe(RECIPES / "default.yaml", ["cache.limit=100"])
    assert plan.caches["train"].limit == 100 and plan.caches["test"].limit is None


def test_a_segmentation_recipe_runs_without_a_teacher_eval(tmp_path, tiny_teacher):
    # train.task segment: the runs report mIoU; the teacher eval (image labels) is skipped, not failed
    from _train_fixtures import make_seg_npz

    npz = make_seg_npz(tmp_path / "s.npz", n_train=32, n_test=8, size=16)
    recipe = {"out": str(tmp_path / "out"), "device": "cpu",
              "cache": {"data": f"npz:{npz}", "teacher": tiny_teacher, "cache_root": str(tmp_path / "caches"),
                        "chunk_rows": 16, "image_size": 16},
              "basis": {"pca": {"dim": 8}},
              "train": {"task": "segment", "epochs": 1, "batch_size": 8, "dim": 4, "workers": 0},
              "grid": {"method": ["ce", "tcs"], "labels_per_class": [4]}}
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_recipe(path)
    assert res["teacher"] == {} and not list((tmp_path / "out").glob("teacher-*.json"))
    assert set(res["runs"]) == {"ce-lpc4-s0", "tcs-lpc4-s0"}
    for r in res["runs"].values():
        assert r["status"] == "trained" and r["val_top1"] is None and 0 <= r["val_miou"] <= 1
    assert "test mIoU (%)" in Path(res["report"]).read_text()
