"""A recipe's grid as a list of grids: the union of their runs, each named by its own keys."""

from __future__ import annotations

import pytest
import yaml

from tcskd.errors import TcskdError
from tcskd.recipe import apply_overrides, load_recipe

ARMS = [{"method": ["ce", "fitnet"], "seed": [0, 1]}, {"method": ["tcs"], "basis": ["pca", "random"], "seed": [0, 1]}]


def _recipe(tmp_path, grid):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "cache": {"splits": ["train"]},
                                    "basis": {"pca": {"kind": "pca"}, "random": {"kind": "random"}},
                                    "train": {"epochs": 1}, "grid": grid, "eval": False}))
    return path


def test_a_list_of_grids_is_the_union_of_their_runs(tmp_path):
    plan = load_recipe(_recipe(tmp_path, ARMS))
    assert sorted(plan.runs) == sorted(f"{arm}-lpcall-s{s}" for arm in ("ce", "fitnet", "tcs-pca", "tcs-random")
                                       for s in (0, 1))
    assert {(c.method, c.basis) for n, c in plan.runs.items() if n.startswith("tcs-random")} == {("tcs", "random")}


def test_set_on_a_list_of_grids_sets_every_grid(tmp_path):
    plan = load_recipe(_recipe(tmp_path, ARMS), ["grid.seed=[3]", "grid.labels_per_class=[10]"])
    assert sorted(plan.runs) == ["ce-lpc10-s3", "fitnet-lpc10-s3", "tcs-pca-lpc10-s3", "tcs-random-lpc10-s3"]
    recipe = {"grid": [{"seed": [0]}, "oops"]}
    apply_overrides(recipe, ["grid.seed=[1]"], "r.yaml")
    assert recipe["grid"] == [{"seed": [1]}, "oops"]


@pytest.mark.parametrize("grid, message", [
    ([{"method": ["ce"]}, "tcs"], "key 'grid[1]' must be a mapping"),
    ([{"method": "ce"}], "key 'grid[0].method' must be a non-empty list"),
    ([{"method": ["ce"]}, {"method": ["ce"]}], "two runs of the grid are both named ce-lpcall-s0"),
])
def test_a_bad_list_of_grids_is_one_line(tmp_path, grid, message):
    with pytest.raises(TcskdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(_recipe(tmp_path, grid))
