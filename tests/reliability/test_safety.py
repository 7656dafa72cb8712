"""Safety: checkpoints and weights load with torch.load(weights_only=True); nothing is unpickled from
a cache; `python:` and `torchscript:` specs, and the teacher a cache names, run only when asked for."""

from __future__ import annotations

import ast
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tcskd
from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import one_error_line

PACKAGE = Path(tcskd.__file__).parent


def _cli(args):
    from tcskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


class Payload:
    """Unpickling this creates ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


_TREES = {py.relative_to(PACKAGE): ast.parse(py.read_text(), str(py)) for py in sorted(PACKAGE.rglob("*.py"))}


def _calls(name: str):
    for where, tree in _TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    dotted = f"{f.value.id}.{f.attr}"
                elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute):
                    dotted = f"{f.value.attr}.{f.attr}"
                if dotted == name:
                    yield where, node


def test_source_never_unpickles_untrusted_data():
    loads = list(_calls("torch.load"))
    assert loads, "expected torch.load calls to check"
    for where, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
    for where, node in _calls("np.load"):
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
    # the only pickle read is the CIFAR release's own format (a dataset the user names)
    assert [str(w) for w, _ in _calls("pickle.load")] == ["data/arrays.py"]
    for banned in ("pickle.loads", "yaml.load", "yaml.unsafe_load", "marshal.loads", "dill.load"):
        assert not list(_calls(banned)), banned
    for builtin in ("eval", "exec"):
        assert not [w for w, n in _calls(builtin) if isinstance(n.func, ast.Name)], builtin
    # code is loaded from exactly two user-named places: a python: student and a torchscript:/hub: teacher;
    # elsewhere import_module loads tcskd's own modules only, by fixed names (the lazy Python API)
    lazy = {"__init__.py", "train/__init__.py"}
    assert {str(w) for w, _ in _calls("importlib.import_module")} <= {"train/students.py"} | lazy
    for where, node in _calls("importlib.import_module"):
        if str(where) == "train/__init__.py":
            assert isinstance(node.args[0], ast.Constant) and node.args[0].value.startswith("tcskd."), where
    import tcskd

    assert all(module.startswith("tcskd.") for module, _ in tcskd._API.values())
    assert {str(w) for w, _ in _calls("jit.load")} == {"teachers.py"}
    tally("bad_inputs", "source scan for unpickling")


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    from tcskd.subspace.fit import BasisConfig, fit_basis

    root = tmp_path_factory.mktemp("safety")
    cache = world.copy_ref("zarr", root)
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, device="cpu"))
    run = root / "run"
    r = _cli(["train", "--cache", cache, "--student", SPEC, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
              "--out", run])
    assert r.exit_code == 0, r.output
    return cache, run


def test_a_pickled_checkpoint_is_never_executed(trained, tmp_path):
    cache, run = trained
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    (victim / "final.json").unlink()
    sentinel = tmp_path / "pwned"
    ck = torch.load(victim / "checkpoint.pt", weights_only=True)
    ck["meta"]["evil"] = Payload(sentinel)
    ck["epoch"] = 0
    torch.save(ck, victim / "checkpoint.pt")
    r = _cli(["train", "--cache", cache, "--student", SPEC, "--epochs", "2", "--batch-size", "8", "--device", "cpu",
              "--out", victim, "--resume"])
    assert r.exit_code == 2 and "cannot read checkpoint" in one_error_line(r.stderr)
    r = _cli(["export", victim, "--out", tmp_path / "s.pt2"])
    assert r.exit_code == 2 and "cannot read checkpoint" in one_error_line(r.stderr)
    assert not sentinel.exists()
    tally("bad_inputs", "pickle payload refused", 2)


def test_pickled_teacher_weights_and_modules_are_never_executed(world, tmp_path):
    sentinel = tmp_path / "pwned"
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(pretrained=False):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """))
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": Payload(sentinel)}, evil)
    for spec, says in ((f"hub:{repo}:tiny@{evil}", r"cannot load teacher weights .*weights_only"),
                       (f"torchscript:{evil}", r"cannot load torchscript module")):
        r = _cli(["cache", "--data", world.data, "--teacher", spec, "--image-size", "16", "--cache-root",
                  tmp_path / "c", "--device", "cpu"])
        assert r.exit_code == 2, r.output
        assert __import__("re").search(says, one_error_line(r.stderr))
        tally("bad_inputs", "pickle payload refused")
    assert not sentinel.exists()


def test_a_cache_never_unpickles(world, tmp_path):
    """A store crafted to hold a pickled chunk (numcodecs' pickle codec) or pickled attributes."""
    import pickle

    import numpy as np

    sentinel = tmp_path / "pwned"
    cache = world.copy_ref("zarr", tmp_path / "caches")
    meta = json.loads((cache / "labels" / "zarr.json").read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {"protocol": 5}}]
    (cache / "labels" / "zarr.json").write_text(json.dumps(meta))
    for f in (cache / "labels" / "c").iterdir():
        f.write_bytes(pickle.dumps(np.array([Payload(sentinel)] * 8, dtype=object)))
    r = _cli(["cache", "verify", cache])
    assert r.exit_code == 1 and "'labels'" in r.output
    r = _cli(["train", "--cache", cache, "--method", "ce", "--student", SPEC, "--out", tmp_path / "run",
              "--device", "cpu"])
    assert r.exit_code == 2 and "'labels'" in one_error_line(r.stderr)
    r = _cli(["cache", "ls", "--cache-root", tmp_path / "caches"])
    assert r.exit_code == 0

    h5 = world.copy_ref("hdf5", tmp_path / "h5")
    import h5py

    with h5py.File(h5 / "store.h5", "r+") as f:
        f.attrs["complete"] = np.void(pickle.dumps(Payload(sentinel)))
    r = _cli(["cache", "verify", h5])
    assert r.exit_code == 1 and "manifest field complete=" in r.output
    assert not sentinel.exists()
    tally("bad_inputs", "pickle payload refused", 2)


def test_the_teacher_a_cache_names_runs_only_when_asked(world, trained, tmp_path):
    """A (consistently) forged manifest names a hub teacher whose code would leave a mark: reading,
    verifying, fitting on and training from the cache never runs it; --recompute and --method online
    are the only commands that load the cache's teacher, by design."""
    from tcskd.store.registry import cache_key
    from tcskd.store.backends import open_store

    cache, _ = trained
    sentinel = tmp_path / "ran"
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    victim = tmp_path / "caches" / cache.name
    shutil.copytree(cache, victim)
    with open_store(victim, "a") as s:
        m = s.manifest
        spec = f"hub:{repo}:tiny"
        ident = dict(m["identity"], teacher=dict(m["identity"]["teacher"], spec=spec))
        s.set_attrs({"teacher_spec": spec, "identity": ident, "key": cache_key(ident)})
        s.set_attrs({"cache_key": cache_key(ident)}, "bases/pca")
    for args in (["cache", "ls", "--cache-root", victim.parent], ["cache", "info", victim], ["cache", "verify", victim],
                 ["basis", "--cache", victim, "--name", "again", "--device", "cpu"],
                 ["train", "--cache", victim, "--student", SPEC, "--epochs", "1", "--batch-size", "8",
                  "--device", "cpu", "--out", tmp_path / "run"]):
        r = _cli(args)
        assert r.exit_code == 0, (args, r.output, r.exception)
    assert not sentinel.exists()
    r = _cli(["cache", "verify", victim, "--recompute", "1", "--device", "cpu"])
    assert r.exit_code != 0
    assert sentinel.exists()  # asked for: the teacher the cache names is loaded
    tally("bad_inputs", "code named by a cache not run", 5)


def test_python_student_runs_only_the_named_factory(trained, tmp_path, monkeypatch):
    cache, _ = trained
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "named_student.py").write_text(textwrap.dedent(f"""
        import torch.nn as nn
        open({str(tmp_path / 'imported')!r}, 'w').close()
        class S(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.f = nn.Sequential(nn.Conv2d(c, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.feature_dim = 4
            def forward(self, x):
                return self.f(x)
        def factory(num_classes, in_channels):
            open({str(tmp_path / 'called')!r}, 'w').close()
            return S(in_channels)
        def other(num_classes, in_channels):
            open({str(tmp_path / 'other')!r}, 'w').close()
    """))
    monkeypatch.syspath_prepend(str(pkg))
    r = _cli(["train", "--cache", cache, "--student", "python:named_student:factory", "--epochs", "1",
              "--batch-size", "8", "--device", "cpu", "--out", tmp_path / "run"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "imported").exists() and (tmp_path / "called").exists() and not (tmp_path / "other").exists()
    r = _cli(["train", "--cache", cache, "--student", "python:named_student:missing", "--epochs", "1",
              "--device", "cpu", "--out", tmp_path / "run2"])
    assert r.exit_code == 2 and "cannot import student factory named_student:missing" in one_error_line(r.stderr)
    assert not (tmp_path / "other").exists()
    tally("bad_inputs", "python: spec", 2)
