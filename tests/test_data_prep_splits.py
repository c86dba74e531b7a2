"""data_prep.splits: exact counts, stratification, patient grouping, determinism; phi: salted hashing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_prep.phi import DEFAULT_SALT, patient_hash, resolve_salt
from data_prep.splits import SplitError, build_groups, carve, multilabel_stratum, resolve_count


def _synthetic(n_patients: int = 300, seed: int = 0):
    """Patients with 1-8 images each, a patient-level class, imbalanced 1:3."""
    rng = np.random.default_rng(seed)
    strata, patients = [], []
    for p in range(n_patients):
        cls = int(rng.random() < 0.75)
        for _ in range(int(rng.integers(1, 9))):
            strata.append(cls)
            patients.append(f"p{p}")
    return strata, patients


@pytest.mark.parametrize("n_hold", [1, 17, 262, 500])
def test_exact_count_grouped_and_stratified(n_hold):
    strata, patients = _synthetic()
    groups = build_groups(patients)
    keep, hold = carve(strata, groups, n_hold, seed=0)
    assert len(hold) == n_hold and sorted(keep + hold) == list(range(len(strata)))
    # one patient never spans the two sides
    assert not {patients[i] for i in keep} & {patients[i] for i in hold}
    # stratified: per-class share within one image of the proportional target
    total = Counter(strata)
    got = Counter(strata[i] for i in hold)
    for c in total:
        assert abs(got[c] - n_hold * total[c] / len(strata)) <= max(2, 0.02 * n_hold)


def test_deterministic_and_seed_dependent():
    strata, patients = _synthetic()
    g = build_groups(patients)
    assert carve(strata, g, 50, seed=1) == carve(strata, g, 50, seed=1)
    assert carve(strata, g, 50, seed=1)[1] != carve(strata, g, 50, seed=2)[1]


def test_groups_join_identical_content():
    patients = ["a", "b", "c", "d", None]
    hashes = ["h1", "h2", "h1", "h3", "h2"]  # a~c by content, b~e by content
    g = build_groups(patients, hashes)
    assert g[0] == g[2] and g[1] == g[4] and len(set(g)) == 3


def test_impossible_and_invalid_requests():
    with pytest.raises(SplitError, match="--val-count 10 is not smaller"):
        resolve_count(10, 10, None, "training", "val")
    with pytest.raises(SplitError, match="either"):
        resolve_count(10, 1, 0.1, "training", "val")
    with pytest.raises(SplitError, match="must be in"):
        resolve_count(10, None, 1.5, "training", "val")
    assert resolve_count(1000, None, 0.05, "training", "val") == 50
    # two patients with 5 images each: 3 images cannot be held out without splitting one
    with pytest.raises(SplitError, match="no combination of whole patients"):
        carve([0] * 10, ["a"] * 5 + ["b"] * 5, 3, seed=0)


def test_multilabel_stratum_prefers_rare_labels():
    freq = [100, 3, 50]
    assert multilabel_stratum([1, 1, 1], freq) == 1
    assert multilabel_stratum([1, 0, 1], freq) == 2
    assert multilabel_stratum([0, 0, 0], freq) == -1
    assert multilabel_stratum([-1, 0, 1], freq) == 2  # ignored (-1) labels are not positives


def test_patient_hash_is_salted_and_stable(monkeypatch):
    monkeypatch.delenv("DATA_PREP_SALT", raising=False)
    assert resolve_salt(None) == (DEFAULT_SALT, "default")
    assert resolve_salt("s3cret") == ("s3cret", "custom")
    monkeypatch.setenv("DATA_PREP_SALT", "env-salt")
    assert resolve_salt(None) == ("env-salt", "custom")
    h = patient_hash("MRN-0042", DEFAULT_SALT)
    assert h == patient_hash(" MRN-0042 ", DEFAULT_SALT) and len(h) == 16 and "0042" not in h
    assert h != patient_hash("MRN-0042", "other")
