"""The CPU loader: one forked worker at a low CPU priority, seeded as MONAI seeds its workers."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from monai.data import Dataset, set_track_meta
from monai.transforms import Compose, EnsureTyped, RandGaussianNoised, Randomizable

from ffcl_monai.data import loading
from ffcl_monai.data.loading import BackgroundDataLoader, LowPriorityWorkerInit, default_num_workers

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers: Linux")]


class _WorkerFacts(Randomizable):
    """Records, inside the worker, its nice value, torch threads and process id next to the image."""

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, d: dict) -> dict:
        return {**d, "nice": os.nice(0), "threads": torch.get_num_threads(), "pid": os.getpid()}


def _dataset(n: int = 8) -> Dataset:
    items = [{"image": torch.full((1, 4, 4), float(i))} for i in range(n)]
    return Dataset(items, Compose([EnsureTyped(keys="image", track_meta=False),
                                   RandGaussianNoised(keys="image", prob=1.0, std=1.0), _WorkerFacts()]))


def test_worker_runs_at_low_priority_with_one_thread() -> None:
    batches = list(BackgroundDataLoader(_dataset(), num_workers=1, batch_size=4))
    parent_nice = os.nice(0)
    for b in batches:
        assert all(int(p) != os.getpid() for p in b["pid"])  # the work happened in another process
        assert all(int(n) == min(19, parent_nice + 19) for n in b["nice"])
        assert all(int(t) == 1 for t in b["threads"])


def test_niceness_zero_leaves_the_priority_alone() -> None:
    b = next(iter(BackgroundDataLoader(_dataset(), num_workers=1, niceness=0, batch_size=8)))
    assert all(int(n) == os.nice(0) for n in b["nice"])


def test_same_seed_same_augmentations_and_metadata_tracking_stays_off() -> None:
    """MONAI's worker seeding is kept: after the same torch seed (what EpochSeedHandler does at each epoch start),
    an epoch draws the same random augmentations; a different seed draws others."""

    def epoch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = BackgroundDataLoader(_dataset(), num_workers=1, batch_size=4, shuffle=True)
        return torch.cat([b["image"] for b in loader])

    set_track_meta(False)
    try:
        a, b, c = epoch(5), epoch(5), epoch(6)
    finally:
        set_track_meta(True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert type(a) is torch.Tensor  # forked workers keep set_track_meta(False): plain tensors, no MetaTensor


def test_sequential_when_num_workers_is_zero() -> None:
    b = next(iter(BackgroundDataLoader(_dataset(), num_workers=0, batch_size=8)))
    assert all(int(p) == os.getpid() for p in b["pid"])


def test_defaults_and_bad_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_num_workers() == (0 if torch.cuda.is_available() else 1)
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    assert default_num_workers() == 0  # CUDA: ThreadDataLoader, the cache may live on the GPU
    with pytest.raises(ValueError, match="niceness must be in 0..19"):
        LowPriorityWorkerInit(niceness=25)
