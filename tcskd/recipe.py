"""Recipes: one YAML file that runs cache -> basis -> a grid of training runs -> teacher eval -> report.

``tcskd run RECIPE.yaml [--set KEY=VALUE ...]`` and :func:`run_recipe` read a recipe::

    out: runs/demo            # runs, teacher evals and the report go here
    device: auto              # every stage's device unless its block sets one
    cache:                    # CacheConfig fields (not split), and
      splits: [train, test]   #   one cache per split: runs train on train, the teacher eval tests on test
      data: builtin:mnist5k
      teacher: builtin:efficientnet-lite0
    basis:                    # basis name -> BasisConfig fields, fitted on the train cache
      pca: {kind: pca, dim: 256, coords: true, exclude_val: true}
    train: {student: cnn, epochs: 15}          # TrainConfig fields shared by every run
    grid:                                      # TrainConfig field -> list of values: a run per combination
      labels_per_class: [null, 10]             #   (a list of such mappings: the union of their runs)
      method: [ce, fitnet, tcs]
    eval: {}                  # the teacher's kNN / probe at the grid's label budgets (EvalConfig fields); false: none
    report: true              # report.md and report.png in out

``include: base.yaml`` (or a list; relative to the recipe) starts from other recipes, whose values the
including file replaces (mappings merged key by key). ``--set a.b=v`` replaces a value by its dotted path
(``v`` read as YAML; ``grid.FIELD=v`` on a list of grids sets FIELD in each). The whole recipe is checked
before any stage runs (every config built and validated): an unknown key, a wrong type, a missing file or
a field the recipe sets itself is one TcskdError line naming the key and the file. Running is resumable:
caches are hits when built, a basis already in the cache with the same options is kept, a run with
``final.json`` is skipped and an unfinished one resumes from its checkpoint, a teacher eval whose JSON
exists is kept.

Dense and segmentation recipes: ``train: {task: segment}`` (or ``grid: {task: [...]}``) trains segmentation
runs (their mIoU in the report). The teacher eval (a kNN and a linear probe on global features with image
labels) is skipped, with a log line, when the cache holds patch tokens (``cache.tokens: patch``) or every run
segments: neither has global features with image labels to score. A cache built with ``cache.dim`` (token
coordinates) brings its basis (``pca``), so runs may use it without a ``basis`` block.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tcskd.cache.build import build_cache
from tcskd.cache.config import CacheConfig
from tcskd.errors import TcskdError
from tcskd.options import check_values, load_yaml
from tcskd.store.handle import open_cache
from tcskd.subspace.config import BasisConfig
from tcskd.subspace.fit import fit_basis
from tcskd.train.config import RESUME_FREE, EvalConfig, TrainConfig, resolve_config
from tcskd.train.evaluate import evaluate_teacher
from tcskd.train.inputs import mimic_for_cache
from tcskd.train.loop import train
from tcskd.train.report import load_runs, load_teacher_eval, markdown_table, plot_runs
from tcskd.train.rundir import CONFIG, FINAL

log = logging.getLogger(__name__)

#: The top-level keys of a recipe.
KEYS = ("include", "description", "out", "device", "cache", "basis", "train", "grid", "eval", "report")
#: Fields each block may not set: the recipe sets them (block -> field -> why).
SET_BY_RECIPE = {
    "cache": {"split": "give cache.splits"},
    "basis": {"cache": "bases are fitted on the train cache", "name": "the block's key is the name"},
    "train": {"cache": "runs train on the train cache", "out": "runs go to OUT/<run name>",
              "resume": "a recipe always resumes"},
    "eval": {"cache": "the train cache", "test_cache": "the test cache", "out": "OUT/teacher-lpc*-s*.json",
             "labels_per_class": "the grid's label budgets", "seed": "the grid's seeds"},
}
#: Options of the runs that the basis fit, a ``dim`` cache's token basis and the teacher eval take over unless
#: their block sets them.
_HOLDOUT = ("val_frac", "val_per_class", "val_seed")
#: Basis options that do not change the basis (a basis fitted with other values of these is kept).
_BASIS_FREE = ("cache", "cache_root", "device", "chunk_rows", "plot", "name", "wait")
#: Train options that do nothing in a run without tailoring (``select_every`` 0): a finished untailored run
#: is reused whatever they say (their defaults may change).
UNTAILORED_INERT = ("select_by", "drop_frac", "min_dim")
#: How a grid field appears in a run's name (the rest: field name + value); method, lpc and seed always do.
_NAME_ORDER = ("method", "student", "basis", "dim", "lam")


@dataclass
class Plan:
    """A checked recipe: every stage's config, in the order they run."""

    source: str
    out: Path
    caches: dict[str, CacheConfig]
    bases: dict[str, BasisConfig]
    runs: dict[str, TrainConfig]
    evals: dict[str, EvalConfig] = field(default_factory=dict)
    report: bool = True


def run_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Run the recipe at ``path`` with ``overrides`` (``["a.b=v", ...]`` or ``{"a.b": v}``) end to end.

    Returns ``{"caches": {split: path}, "cache_hits": {split: bool}, "bases": {name: "fitted" | "kept"},
    "runs": {name: {"run_dir", "status" ("trained" | "done" | "stopped"), "val_top1", "test_top1"}},
    "teacher": {name: file}, "report": Markdown file or None, "png": chart or None}``. TcskdError before
    any stage runs when the recipe is wrong.
    """
    plan = load_recipe(path, overrides)
    result: dict[str, Any] = {"caches": {}, "cache_hits": {}, "bases": {}, "runs": {}, "teacher": {},
                              "report": None, "png": None}
    for split, cfg in plan.caches.items():
        res = build_cache(cfg)
        log.info("cache %s: %s (%s)", split, res.path, "hit" if res.hit else f"{res.rows_computed} rows computed")
        result["caches"][split] = str(res.path)
        result["cache_hits"][split] = res.hit
    train_cache, test_cache = result["caches"].get("train"), result["caches"].get("test")
    for name, cfg in plan.bases.items():
        cfg = dataclasses.replace(cfg, cache=train_cache)
        result["bases"][name] = "kept" if _basis_is_current(cfg) else "fitted"
        if result["bases"][name] == "fitted":
            fit_basis(cfg)
    plan.out.mkdir(parents=True, exist_ok=True)
    for name, cfg in plan.evals.items():
        cfg = dataclasses.replace(cfg, cache=train_cache, test_cache=test_cache)
        if not _eval_is_current(cfg):
            evaluate_teacher(cfg)
        result["teacher"][name] = cfg.out
    for name, cfg in plan.runs.items():
        result["runs"][name] = _run(dataclasses.replace(cfg, cache=train_cache))
    finished = [r["run_dir"] for r in result["runs"].values() if r["status"] != "stopped"]
    if plan.report and finished:
        result["report"], result["png"] = _report(plan.out, finished, list(result["teacher"].values()))
    return result


def _run(cfg: TrainConfig) -> dict[str, Any]:
    """One run of the grid: skipped when finished, else trained (resuming its checkpoint)."""
    out = Path(cfg.out)
    if (out / FINAL).is_file():
        _refuse_if_changed(cfg, out)
        log.info("run %s is finished: skipped", out)
        status, res = "done", load_runs([out])[0]
    else:
        res = train(cfg)
        status = "stopped" if "stopped_after" in res else "trained"
        log.info("run %s: %s", out, status)
    scores = ("val_miou", "test_miou") if res.get("task") == "segment" else ()
    return {"run_dir": str(out), "status": status, "val_top1": res.get("val_top1"),
            "test_top1": res.get("test_top1"), **{k: res.get(k) for k in scores}}


def _plain(v: Any) -> Any:
    """Tuples as lists (how YAML and JSON hold them), for comparing a saved config with a planned one."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _refuse_if_changed(cfg: TrainConfig, out: Path) -> None:
    """A finished run is reused only when it was trained with the recipe's options on this cache; otherwise
    a TcskdError names what differs (the finished run is kept: remove it, or give the recipe another out)."""
    saved = load_yaml(out / CONFIG) or {}
    now = dataclasses.asdict(resolve_config(mimic_for_cache(cfg)))
    # without tailoring (select_every 0 in both) its criterion, step and floor change nothing
    inert = UNTAILORED_INERT if saved.get("select_every") == 0 == now["select_every"] else ()
    diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
            if k not in RESUME_FREE + inert and k in saved and _plain(saved[k]) != _plain(now[k])]
    key = (saved.get("resolved") or {}).get("cache_key")
    if key is not None and key != Path(cfg.cache).name:
        diff.insert(0, f"cache {key} -> {Path(cfg.cache).name}")
    if diff:
        raise TcskdError(f"{out} finished with other options than the recipe's ({', '.join(diff)}); remove it "
                         f"(or set another out) to train it again")


def _eval_is_current(cfg: EvalConfig) -> bool:
    """Whether ``cfg.out`` holds the teacher eval of these caches and options (a changed one is redone)."""
    path = Path(cfg.out)
    if not path.is_file():
        return False
    saved = (load_yaml(path) or {}).get("config") or {}
    now = dataclasses.asdict(cfg)
    same = all(_plain(saved.get(k)) == _plain(now[k]) for k in now if k not in ("out", "device", "cache_root"))
    if not same:
        log.info("teacher eval %s was made with other caches or options: evaluating again", path)
    return same


def _basis_is_current(cfg: BasisConfig) -> bool:
    """Whether the cache already holds a basis of this name fitted with the same options."""
    name = cfg.resolved_name()
    with open_cache(cfg.cache) as cache:
        if name not in cache.bases():
            return False
        saved = cache.basis(name).attrs.get("config") or {}
    want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _BASIS_FREE}
    same = all(saved.get(k) == v for k, v in want.items())
    if not same:
        log.warning("basis '%s' in %s was fitted with other options: fitting it again (runs already finished "
                    "on the old one are not retrained)", name, cfg.cache)
    return same


def _report(out: Path, run_dirs: list[str], teacher: list[str]) -> tuple[str, str]:
    runs = load_runs([Path(d) for d in run_dirs])
    evals = [load_teacher_eval(Path(f)) for f in teacher] or None
    table = markdown_table(runs, evals)
    (out / "report.md").write_text(table)
    png = plot_runs(runs, out / "report.png", evals)
    return str(out / "report.md"), str(png)


# -- reading and checking ------------------------------------------------------------

def load_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = (), check_paths: bool = True) -> Plan:
    """The recipe at ``path`` with ``overrides`` applied, checked: every stage's config built and validated
    (and, with ``check_paths``, the local data and teacher paths it names must exist)."""
    src = str(path)
    recipe = read_recipe(path)
    apply_overrides(recipe, overrides, src)
    unknown = [k for k in recipe if k not in KEYS]
    if unknown:
        raise TcskdError(f"{src}: unknown key '{unknown[0]}' (a recipe has {', '.join(KEYS)})")
    out = recipe.get("out")
    if not isinstance(out, str) or not out:
        raise TcskdError(f"{src}: key 'out' must be a folder name (got {out!r})")
    device = _block(recipe, "device", src, str, default="auto")
    try:
        shared = _fields(recipe, "train", TrainConfig, src)
        caches = _caches(recipe, src, device, shared, check_paths)
        bases = _bases(recipe, src, device, shared)
        runs = _runs(recipe, src, device, shared, Path(out), bases, _cache_basis(caches["train"]))
        evals = _evals(recipe, src, device, shared, Path(out), runs, caches)
    except TypeError as e:  # a dataclass without a required field
        raise TcskdError(f"{src}: {e}") from None
    report = _block(recipe, "report", src, bool, default=True)
    return Plan(src, Path(out), caches, bases, runs, evals, report)


def read_recipe(path: str | Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's mapping with its ``include:`` files (relative to it; one or a list) merged underneath:
    an included file's values are the defaults that the including file's values replace (mappings merged
    key by key). TcskdError for a missing file, a non-mapping or a circular include."""
    here = Path(path).resolve()
    if here in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(here):], here))
        raise TcskdError(f"{chain[0]}: circular include {cycle}")
    recipe = load_yaml(path)
    if not isinstance(recipe, dict):
        raise TcskdError(f"{path}: a recipe is a mapping (out, cache, basis, train, grid, eval, report)")
    includes = recipe.pop("include", None) or []
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        if not isinstance(inc, str):
            raise TcskdError(f"{path}: key 'include' must be a file name or a list of them (got {inc!r})")
        merged = _merge(merged, read_recipe(here.parent / inc, (*chain, here)))
    return _merge(merged, recipe)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any], src: str) -> None:
    """``--set a.b=v`` (``v`` read as YAML) or ``{"a.b": v}``: each value replaced in place by its dotted path."""
    import yaml

    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for o in overrides:
            key, eq, text = o.partition("=")
            if not eq or not key:
                raise TcskdError(f"{src}: --set {o!r}: expected KEY=VALUE (e.g. train.epochs=1)")
            try:
                items.append((key, yaml.safe_load(text)))
            except yaml.YAMLError:
                raise TcskdError(f"{src}: --set {key}: {text!r} is not a YAML value") from None
    for key, value in items:
        node, parts = recipe, key.split(".")
        if parts[0] == "grid" and len(parts) == 2 and isinstance(recipe.get("grid"), list):
            for grid in recipe["grid"]:  # a list of grids: the value goes into each of them
                if isinstance(grid, dict):
                    grid[parts[1]] = value
            continue
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None or node.get(part) is True:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise TcskdError(f"{src}: --set {key}: '{'.'.join(parts[:i + 1])}' is not a mapping")
        node[parts[-1]] = value


def _block(recipe: dict[str, Any], key: str, src: str, kind: type, default: Any) -> Any:
    value = recipe.get(key, default)
    if value is None:
        return {} if kind is dict else default
    if not isinstance(value, kind):
        what = {dict: "a mapping", bool: "true or false", str: "a string", list: "a list"}[kind]
        raise TcskdError(f"{src}: key '{key}' must be {what} (got {type(value).__name__} {value!r})")
    return value


def _fields(recipe: dict[str, Any], key: str, cls: type, src: str, block: Any = None) -> dict[str, Any]:
    """The fields of block ``key`` (or ``block`` itself, named ``key``), checked against ``cls``."""
    values = _block(recipe, key, src, dict, default={}) if block is None else block
    if not isinstance(values, dict):
        raise TcskdError(f"{src}: key '{key}' must be a mapping (got {type(values).__name__} {values!r})")
    section = {"grid": "train"}.get(key.split(".")[0], key.split(".")[0])
    for name in values:
        why = SET_BY_RECIPE.get(section, {}).get(name)
        if why:
            raise TcskdError(f"{src}: key '{key}.{name}' is set by the recipe ({why})")
    return check_values(cls, values, src, prefix=f"{key}.")


def _checked(cfg: Any, src: str, what: str) -> Any:
    try:
        cfg.validate()
    except TcskdError as e:
        raise TcskdError(f"{src}: {what}: {e}") from None
    return cfg


def _caches(recipe: dict[str, Any], src: str, device: str, shared: dict[str, Any],
            check_paths: bool = True) -> dict[str, CacheConfig]:
    block = dict(_block(recipe, "cache", src, dict, default={}))
    splits = block.pop("splits", ["train", "test"])
    if not isinstance(splits, list) or "train" not in splits or not all(s in ("train", "test") for s in splits):
        raise TcskdError(f"{src}: key 'cache.splits' must be a list of train and test, with train (got {splits!r})")
    values = {"device": device, **_fields(recipe, "cache", CacheConfig, src, block)}
    if values.get("dim"):  # a --dim token basis leaves out the runs' validation rows, as a fitted basis does
        values = {**{k: shared[k] for k in _HOLDOUT if k in shared}, **values}
    # cache.limit shrinks the training data only: the students are tested on the whole test split, and so is
    # the teacher, so that both figures of the report are on the same images.
    caches = {s: _checked(CacheConfig(**dict(values, limit=values.get("limit") if s == "train" else None), split=s),
                          src, f"cache {s}") for s in splits}
    for key in ("data", "teacher") if check_paths else ():
        _check_local_path(getattr(caches["train"], key), f"cache.{key}", src)
    return caches


def _check_local_path(spec: str, key: str, src: str) -> None:
    """A spec naming a local file or folder (``kind:/abs/path``, ``kind:./rel``; ``hub:`` up to its entry)
    that does not exist: refused before anything runs (the recipes' placeholders)."""
    kind, _, arg = spec.partition(":")
    path = arg.split("#")[0].split("@")[0]
    if kind == "hub":
        path = path.rsplit(":", 1)[0]
    if kind in ("cifar10", "cifar100", "imagefolder", "npz", "hf", "hub", "torchscript") and \
            path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise TcskdError(f"{src}: key '{key}': {path} does not exist (set it with --set {key}={kind}:PATH)")


def _bases(recipe: dict[str, Any], src: str, device: str, shared: dict[str, Any]) -> dict[str, BasisConfig]:
    out = {}
    for name, block in _block(recipe, "basis", src, dict, default={}).items():
        values = _fields(recipe, f"basis.{name}", BasisConfig, src, block or {})
        if values.get("exclude_val", True):  # the default: the runs' validation rows are left out
            values = {**{k: shared[k] for k in _HOLDOUT if k in shared}, **values}
        out[name] = _checked(BasisConfig(cache="<train cache>", name=name, **{"device": device, **values}), src,
                             f"basis {name}")
    return out


def _cache_basis(cache: CacheConfig) -> str | None:
    """The basis a cache brings itself: ``pca`` for patch tokens stored as coordinates (``cache.dim``)."""
    return "pca" if getattr(cache, "tokens", "global") == "patch" and getattr(cache, "dim", None) else None


def _runs(recipe: dict[str, Any], src: str, device: str, shared: dict[str, Any], out: Path,
          bases: dict[str, BasisConfig], cache_basis: str | None = None) -> dict[str, TrainConfig]:
    """Every run of the grid: one per combination of its values; a list of grids is their union (each
    names its runs by its own keys, so ``[{method: [ce]}, {method: [tcs], basis: [pca, random]}]`` gives
    ``ce-...``, ``tcs-pca-...`` and ``tcs-random-...``)."""
    block = recipe.get("grid") or {}
    grids = block if isinstance(block, list) else [_block(recipe, "grid", src, dict, default={})]
    runs: dict[str, TrainConfig] = {}
    for i, grid in enumerate(grids):
        where = f"grid[{i}]" if isinstance(block, list) else "grid"
        if not isinstance(grid, dict):
            raise TcskdError(f"{src}: key '{where}' must be a mapping (got {type(grid).__name__} {grid!r})")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise TcskdError(f"{src}: key '{where}.{key}' must be a non-empty list (got {values!r})")
            for v in values:
                _fields(recipe, "grid", TrainConfig, src, {key: v})
        for combo in itertools.product(*grid.values()):
            values = {**shared, **_fields(recipe, "grid", TrainConfig, src, dict(zip(grid, combo)))}
            name = run_name(values, list(grid))
            cfg = TrainConfig(**{"device": device, **values, "cache": "<train cache>", "out": str(out / name),
                                 "resume": True})
            if cfg.method == "tcs" and cfg.basis not in bases and cfg.basis != cache_basis:
                raise TcskdError(f"{src}: run {name} uses basis '{cfg.basis}', which the recipe's basis block "
                                 f"does not fit (it has {', '.join(bases) or 'none'})")
            if name in runs:
                raise TcskdError(f"{src}: two runs of the grid are both named {name}")
            runs[name] = _checked(cfg, src, f"run {name}")
    return runs


def run_name(values: Mapping[str, Any], grid_keys: Sequence[str]) -> str:
    """A run's folder name: ``<method>[-<student>...]-lpc<n|all>-s<seed>`` (the grid's other fields as
    ``<field><value>``)."""
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    parts = [cfg.method]
    short = {"student": "", "basis": "", "dim": "K", "lam": "lam"}
    for key in [*(k for k in _NAME_ORDER if k in grid_keys and k != "method"),
                *sorted(k for k in grid_keys if k not in _NAME_ORDER + ("labels_per_class", "seed"))]:
        value = getattr(cfg, key)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) \
            else str(value)
        parts.append(short.get(key, key.replace("_", "")) + text)
    parts += [f"lpc{cfg.labels_per_class if cfg.labels_per_class is not None else 'all'}", f"s{cfg.seed}"]
    return "-".join("".join(c if c.isalnum() or c in "._," else "-" for c in p) for p in parts)


def _evals(recipe: dict[str, Any], src: str, device: str, shared: dict[str, Any], out: Path,
           runs: dict[str, TrainConfig], caches: dict[str, CacheConfig]) -> dict[str, EvalConfig]:
    block = recipe.get("eval", {})
    if block is False:
        return {}
    values = _fields(recipe, "eval", EvalConfig, src, {} if block in (None, True) else block)
    if getattr(caches["train"], "tokens", "global") == "patch" or (
            runs and all(cfg.task == "segment" for cfg in runs.values())):
        log.info("%s: no teacher eval: the teacher's kNN / probe scores global features by image labels, and "
                 "this recipe has patch tokens or segmentation runs", src)
        return {}
    if "test" not in caches:
        raise TcskdError(f"{src}: key 'eval' needs a test cache: add test to cache.splits (or set eval: false)")
    values = {"device": device, **{k: shared[k] for k in _HOLDOUT if k in shared}, **values}
    budgets: dict[Any, list[int]] = {}
    for cfg in runs.values():
        seeds = budgets.setdefault(cfg.labels_per_class, [])
        if cfg.seed not in seeds:
            seeds.append(cfg.seed)
    evals = {}
    for lpc, seeds in budgets.items():
        for seed in seeds[:1] if lpc is None else seeds:  # with every label the seed only starts the probe
            name = f"teacher-lpc{lpc if lpc is not None else 'all'}-s{seed}"
            cfg = EvalConfig(cache="<train cache>", test_cache="<test cache>", labels_per_class=lpc, seed=seed,
                             out=str(out / f"{name}.json"), **values)
            evals[name] = _checked(cfg, src, name)
    return evals


__all__ = ["KEYS", "Plan", "run_recipe", "load_recipe", "read_recipe", "apply_overrides", "run_name"]
