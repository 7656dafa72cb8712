"""tcskd: teacher-free distillation through a tailored coordinate system.

Three stages talk only through a feature store:
``cache`` (teacher forward, once) -> ``basis`` (PCA of the cached features)
-> ``train`` (students learn the teacher's coordinates from the cache).

The Python API: each stage is a function of its config (the dataclass whose fields are also the stage's
command-line options, ``tcskd <stage> --help``) and returns a typed result (tcskd.results)::

    import tcskd

    c = tcskd.build_cache(tcskd.CacheConfig(limit=600))           # -> CacheResult (.key, .path, .hit, ...)
    b = tcskd.fit_basis(tcskd.BasisConfig(cache=c.key))           # -> BasisResult (dict)
    r = tcskd.train(tcskd.TrainConfig(cache=c.key, epochs=2))     # -> TrainResult (dict: final.json)
    e = tcskd.evaluate(tcskd.EvalConfig(cache=c.key, test_cache=KEY))  # -> EvalResult (the teacher's kNN / probe)
    with tcskd.open_cache(c.key) as cache:                        # -> Cache: numpy arrays as stored
        x, y, pca = cache.features(), cache.labels(), cache.basis("pca")
    tcskd.run_recipe(path, overrides)                             # a recipe end to end (tcskd run)

- :func:`build_cache` (:class:`CacheConfig` -> :class:`CacheResult`): stage 1, ``tcskd cache``.
- :func:`fit_basis` (:class:`BasisConfig` -> :class:`BasisResult`): stage 2, ``tcskd basis``.
- :func:`train` (:class:`TrainConfig` -> :data:`TrainResult`, or :class:`StoppedRun` with ``stop_after``):
  stage 3, ``tcskd train``. ``tcskd.train`` is also the stage's package (``tcskd.train.loop``, ...): calling
  it runs the stage.
- :func:`evaluate` (:class:`EvalConfig` -> :class:`EvalResult`): the teacher's accuracy from its cached
  features, ``tcskd eval``.
- :func:`open_cache` (key, key prefix, directory or URL -> :class:`Cache`): ``features(view)``, ``labels()``,
  ``row_ok()``, ``sample_index()``, ``view_params()``, ``bases()``, ``basis(name)`` (a :class:`Basis`),
  ``coords(name)``.
- :func:`run_recipe` (a recipe file and ``KEY=VALUE`` overrides): ``tcskd run``.

Errors are :class:`TcskdError` (one line naming the problem). ``import tcskd`` is cheap: the names above load
their modules (and torch) when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

SCHEMA_VERSION = 1

#: The public names -> (module, attribute; None: the module itself), imported on first use (PEP 562).
_API: dict[str, tuple[str, str | None]] = {
    "build_cache": ("tcskd.cache.build", "build_cache"),
    "CacheConfig": ("tcskd.cache.config", "CacheConfig"),
    "CacheResult": ("tcskd.cache.build", "CacheResult"),
    "fit_basis": ("tcskd.subspace.fit", "fit_basis"),
    "BasisConfig": ("tcskd.subspace.config", "BasisConfig"),
    "BasisResult": ("tcskd.results", "BasisResult"),
    "train": ("tcskd.train", None),
    "TrainConfig": ("tcskd.train.config", "TrainConfig"),
    "TrainResult": ("tcskd.results", "TrainResult"),
    "StoppedRun": ("tcskd.results", "StoppedRun"),
    "evaluate": ("tcskd.train.evaluate", "evaluate_teacher"),
    "EvalConfig": ("tcskd.train.config", "EvalConfig"),
    "EvalResult": ("tcskd.results", "EvalResult"),
    "open_cache": ("tcskd.store.handle", "open_cache"),
    "Cache": ("tcskd.store.handle", "Cache"),
    "Basis": ("tcskd.store.bases", "Basis"),
    "run_recipe": ("tcskd.recipe", "run_recipe"),
    "TcskdError": ("tcskd.errors", "TcskdError"),
}

#: ``from tcskd import *`` takes the names whose module is there (``run_recipe`` needs ``tcskd.recipe``).
__all__ = ["__version__", *(n for n in _API if n != "run_recipe" or importlib.util.find_spec("tcskd.recipe"))]

if TYPE_CHECKING:
    from tcskd import train
    from tcskd.cache.build import CacheResult, build_cache
    from tcskd.cache.config import CacheConfig
    from tcskd.errors import TcskdError
    from tcskd.recipe import run_recipe
    from tcskd.results import BasisResult, EvalResult, StoppedRun, TrainResult
    from tcskd.store.bases import Basis
    from tcskd.store.handle import Cache, open_cache
    from tcskd.subspace.config import BasisConfig
    from tcskd.subspace.fit import fit_basis
    from tcskd.train.config import EvalConfig, TrainConfig
    from tcskd.train.evaluate import evaluate_teacher as evaluate


def __getattr__(name: str) -> Any:
    """A public name of the API, imported on first use; AttributeError for any other."""
    if name not in _API:
        raise AttributeError(f"module 'tcskd' has no attribute '{name}'")
    module, attr = _API[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise AttributeError(f"tcskd.{name} is not available in this version ({module} is missing)") from e
    value = mod if attr is None else getattr(mod, attr)
    if attr is not None:
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
