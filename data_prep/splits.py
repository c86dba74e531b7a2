"""Seeded, stratified, patient-grouped splitting with exact image counts.

Algorithm (:func:`carve`):

1. Images are grouped. A group is a connected set of images that share a patient ID *or* identical file content
   (sha256), found with union-find. Keeping byte-identical images together means a duplicate can never end up on
   both sides of a split, even when it was filed under two patients.
2. Each group gets one stratum: the most frequent stratum of its images (ties -> the smallest).
3. The target number of held-out images is split over strata in proportion to their image counts, with the
   largest-remainder method, so per-stratum targets are integers that add up to the requested count exactly.
4. Per stratum, the groups are shuffled with ``numpy.random.default_rng(seed)`` (after sorting by group key so the
   order does not depend on file-system order) and taken greedily: a group is taken when it still fits into the
   remaining target of its stratum. Large multi-image patients that do not fit are skipped, and the target is then
   topped up by smaller (usually single-image) patients further down the shuffled list.
5. Any shortfall left by a stratum (all its remaining groups too large) is filled in a final pass over all remaining
   groups in the same shuffled order, again only with groups that fit. If that still leaves a gap (only large
   patients remain), an exact subset-sum over the remaining groups closes it, and as a last resort over all groups
   (exact count, stratification best effort). If the count is truly unreachable, a :class:`SplitError` says so.

The result is exact (for Kermany ``--val-count 262`` gives 262 images), stratified to within one image per stratum
in practice, never splits a patient, and is a pure function of (entries, seed).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


class SplitError(ValueError):
    """A split request that cannot be satisfied (for example more validation images than training images)."""


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def build_groups(patients: Sequence[str | None], hashes: Sequence[str | None] | None = None) -> list[int]:
    """Return a group id per image: images sharing a patient ID or a content hash get the same id.

    Images without a patient ID and without a hash form their own group. Group ids are the smallest member index,
    so they are deterministic.
    """
    n = len(patients)
    uf = _UnionFind(n)
    for keys in (patients, hashes):
        if keys is None:
            continue
        first: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            if k is None:
                continue
            if k in first:
                uf.union(first[k], i)
            else:
                first[k] = i
    return [uf.find(i) for i in range(n)]


def resolve_count(n_total: int, count: int | None, fraction: float | None, what: str, option: str) -> int:
    """Turn ``--X-count`` / ``--X-fraction`` into an image count, with errors that name the option."""
    if count is not None and fraction is not None:
        raise SplitError(f"give either --{option}-count or --{option}-fraction, not both")
    if count is not None:
        if count < 0:
            raise SplitError(f"--{option}-count must be >= 0 (got {count})")
        if count >= n_total and count > 0:
            raise SplitError(
                f"--{option}-count {count} is not smaller than the {n_total} images available for the {what} split; "
                f"ask for fewer (for example --{option}-count {max(1, n_total // 20)}) or use --{option}-fraction"
            )
        return count
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise SplitError(f"--{option}-fraction must be in [0, 1) (got {fraction})")
        return int(round(fraction * n_total))
    return 0


def _largest_remainder(total: int, weights: dict[Hashable, int]) -> dict[Hashable, int]:
    keys = sorted(weights, key=str)
    s = sum(weights.values())
    if s == 0:
        return {k: 0 for k in keys}
    raw = {k: total * weights[k] / s for k in keys}
    out = {k: int(np.floor(raw[k])) for k in keys}
    rest = total - sum(out.values())
    order = sorted(keys, key=lambda k: (-(raw[k] - out[k]), str(k)))
    for k in order[:rest]:
        out[k] += 1
    return out


def carve(
    strata: Sequence[Hashable],
    groups: Sequence[Hashable],
    n_holdout: int,
    seed: int,
    eligible: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """Split indices into ``(keep, holdout)`` with exactly ``n_holdout`` images in holdout.

    ``strata[i]`` is the stratification key of image i (class, or a finer key such as bacteria/virus);
    ``groups[i]`` its group (see :func:`build_groups`). No group is ever divided. Raises :class:`SplitError` when
    the exact count is unreachable. ``eligible[i] = False`` keeps image i's whole group out of the holdout (used for
    patients that also appear in an official test split, so that a carved validation set never shares a patient
    with test). See the module docstring for the algorithm.
    """
    n = len(strata)
    if len(groups) != n:
        raise ValueError("strata and groups must have the same length")
    if n_holdout == 0:
        return list(range(n)), []
    if n_holdout >= n:
        raise SplitError(f"cannot hold out {n_holdout} of {n} images")

    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    group_keys = sorted(members, key=lambda g: (str(type(g)), str(g)))
    all_keys = list(group_keys)
    if eligible is not None:
        group_keys = [g for g in group_keys if all(eligible[i] for i in members[g])]
        if sum(len(members[g]) for g in group_keys) < n_holdout:
            raise SplitError(
                f"only {sum(len(members[g]) for g in group_keys)} images belong to patients that are not in another "
                f"split; cannot hold out {n_holdout}"
            )
    group_stratum: dict[Hashable, Hashable] = {}
    for g in all_keys:
        c = Counter(strata[i] for i in members[g])
        best = max(c.values())
        group_stratum[g] = sorted((s for s, v in c.items() if v == best), key=str)[0]

    # targets follow the class mix of the whole set, including groups that are not eligible for the holdout
    image_count = Counter(group_stratum[g] for g in all_keys for _ in members[g])
    targets = _largest_remainder(n_holdout, dict(image_count))

    rng = np.random.default_rng(seed)
    order = [group_keys[i] for i in rng.permutation(len(group_keys))]

    taken: set[Hashable] = set()
    remaining = dict(targets)
    for g in order:
        s = group_stratum[g]
        size = len(members[g])
        if 0 < size <= remaining[s]:
            taken.add(g)
            remaining[s] -= size
    left = sum(remaining.values())
    if left:
        for g in order:
            if g in taken:
                continue
            size = len(members[g])
            if size <= left:
                taken.add(g)
                left -= size
                if left == 0:
                    break
    if left:
        # Rare: the greedy passes got stuck (only large patients left). Solve the rest exactly as a subset sum over
        # the untaken groups; failing that, over all groups (exact count, stratification best effort).
        untaken = [g for g in order if g not in taken]
        pick = _subset_sum([len(members[g]) for g in untaken], left)
        if pick is not None:
            taken.update(untaken[i] for i in pick)
            left = 0
        else:
            pick = _subset_sum([len(members[g]) for g in order], n_holdout)
            if pick is not None:
                taken = {order[i] for i in pick}
                left = 0
    if left:
        raise SplitError(
            f"cannot hold out exactly {n_holdout} images without splitting a patient: no combination of whole "
            f"patients (group sizes {sorted(Counter(len(m) for m in members.values()).items())[:6]}...) adds up to "
            "it; choose another count or use a fraction"
        )
    holdout = sorted(i for g in taken for i in members[g])
    hold = set(holdout)
    keep = [i for i in range(n) if i not in hold]
    return keep, holdout


def _subset_sum(sizes: list[int], target: int) -> list[int] | None:
    """Indices of a subset of ``sizes`` summing to ``target`` (earliest items preferred), or None.

    Bitset dynamic programme with Python ints: ``reach[k]`` has bit t set when some subset of the first k items
    sums to t. Reconstruction walks backwards and keeps an item whenever the remainder stays reachable without it
    being skipped, which prefers items early in the (shuffled) order.
    """
    mask = (1 << (target + 1)) - 1
    reach = [1]
    for size in sizes:
        reach.append((reach[-1] | (reach[-1] << size)) & mask)
    if not (reach[-1] >> target) & 1:
        return None
    picked: list[int] = []
    t = target
    for k in range(len(sizes), 0, -1):
        if t == 0:
            break
        if (reach[k - 1] >> t) & 1:
            continue  # reachable without item k-1: skip it
        picked.append(k - 1)
        t -= sizes[k - 1]
    return sorted(picked)


def multilabel_stratum(label: Sequence[int], frequency: Sequence[int]) -> int:
    """Stratum for a multi-label entry: the index of its rarest positive label, or -1 when it has none.

    Stratifying on the rarest positive keeps rare findings represented in small held-out sets, which is what matters
    for per-label AUC; it is a standard simplification of iterative multi-label stratification.
    """
    pos = [j for j, v in enumerate(label) if v == 1]
    if not pos:
        return -1
    return min(pos, key=lambda j: (frequency[j], j))
