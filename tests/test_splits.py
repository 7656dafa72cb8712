"""The validation holdout and the labelled subset: seeded, stratified, independent of row order."""

import numpy as np
import pytest

from tcskd.errors import TcskdError
from tcskd.splits import Holdout, labelled_mask


def _data(n_per_class=40, classes=5, seed=0):
    labels = np.repeat(np.arange(classes), n_per_class)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    return labels[order], np.arange(len(labels))[order] * 3 + 7  # shuffled rows, arbitrary sample ids


def test_holdout_is_stratified_and_seeded():
    labels, si = _data()
    h = Holdout(val_frac=0.1, val_seed=3)
    m = h.mask(labels, si)
    assert [int(m[labels == c].sum()) for c in range(5)] == [4] * 5
    assert np.array_equal(m, Holdout(val_frac=0.1, val_seed=3).mask(labels, si))
    assert not np.array_equal(m, Holdout(val_frac=0.1, val_seed=4).mask(labels, si))
    per = Holdout(val_per_class=7).mask(labels, si)
    assert [int(per[labels == c].sum()) for c in range(5)] == [7] * 5
    assert not Holdout(val_frac=0.0).mask(labels, si).any()


def test_holdout_does_not_depend_on_row_order():
    labels, si = _data()
    m = Holdout(val_frac=0.2, val_seed=1).mask(labels, si)
    perm = np.random.default_rng(9).permutation(len(labels))
    m2 = Holdout(val_frac=0.2, val_seed=1).mask(labels[perm], si[perm])
    assert set(si[m].tolist()) == set(si[perm][m2].tolist())


def test_holdout_keeps_a_training_row_per_class_and_checks_options():
    labels = np.array([0, 0, 1, 2, 2, 2])
    m = Holdout(val_per_class=5).mask(labels, np.arange(6))
    assert all((~m)[labels == c].any() for c in range(3))
    with pytest.raises(TcskdError, match="val-frac"):
        Holdout(val_frac=1.0)
    with pytest.raises(TcskdError, match="val-per-class"):
        Holdout(val_per_class=-1)


def test_labelled_rows_come_from_the_eligible_rows_only():
    labels, si = _data()
    labels = labels.copy()
    labels[:5] = -1
    val = Holdout(val_frac=0.25).mask(labels, si)
    lab = labelled_mask(labels, si, 4, seed=1, eligible=~val)
    assert not (lab & val).any() and not lab[labels < 0].any()
    assert all(lab[labels == c].sum() == 4 for c in range(5))
    assert np.array_equal(lab, labelled_mask(labels, si, 4, seed=1, eligible=~val))
    assert not np.array_equal(lab, labelled_mask(labels, si, 4, seed=2, eligible=~val))
    assert np.array_equal(labelled_mask(labels, si, None, seed=0, eligible=~val), (labels >= 0) & ~val)
    with pytest.raises(TcskdError, match="labels-per-class"):
        labelled_mask(labels, si, 0, seed=0)
