"""The CPU data loader: random augmentations in one background worker that runs at a low CPU priority.

On a CPU the model already keeps every core busy, so a worker at normal priority only takes time from it (and a
prefetch thread is worse: ``bench pipeline`` measured ThreadDataLoader at 0.80-0.84 of model-only against 0.89-1.0
for the sequential loader). The model does leave some cycles idle, though: a 3D ResNet-10 step on 2 cores ran at
1.91 of 2 CPUs, the rest being single-threaded stretches of autograd and the optimizer. A worker with a high
``nice`` value gets exactly those cycles while the model runs, and the whole machine when the model waits for it,
so the augmentations are done without slowing the model down. ``python -m ffcl_monai.bench simclr_epoch``
(64^3 volumes, two views, 2 cores): 0.89 of model-only with the sequential loader, 1.01 with this one.

:class:`BackgroundDataLoader` is ``common.yaml``'s ``loader_class`` on CPU (CUDA keeps MONAI's ThreadDataLoader,
whose tensors may live on the GPU). Workers are forked where the platform supports it: a fork shares the
CacheDataset's memory with the main process instead of pickling it, and keeps ``set_track_meta(False)``.

Reproducibility is unchanged: the workers are created at the first batch of each epoch, after
:class:`~ffcl_monai.handlers.training.EpochSeedHandler` has re-seeded torch, and MONAI's ``worker_init_fn`` seeds each
worker's transforms from that, so epoch ``e`` draws the same augmentations in a straight and a resumed run.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.data.utils import worker_init_fn as monai_worker_init_fn

__all__ = ["BackgroundDataLoader", "LowPriorityWorkerInit", "default_num_workers"]


def default_num_workers() -> int:
    """``num_workers`` default: 0 with CUDA (ThreadDataLoader prepares batches in a thread) and where processes
    cannot be forked (macOS/Windows would pickle the whole cache into every worker), else 1."""
    if torch.cuda.is_available() or not sys.platform.startswith("linux"):
        return 0
    return 1


class LowPriorityWorkerInit:
    """``worker_init_fn`` that seeds the worker as MONAI does, then lowers its CPU priority and pins it to
    ``threads`` intra-op threads.

    Args:
        niceness: added to the worker's ``nice`` value (0-19; 0 leaves the priority alone). Lower values trade less
            starvation under a busy machine for more interference with the model's threads.
        threads: torch intra-op threads in the worker (the main process's threads belong to the model).
    """

    def __init__(self, niceness: int = 19, threads: int = 1) -> None:
        if not 0 <= int(niceness) <= 19:
            raise ValueError(f"BackgroundDataLoader: niceness must be in 0..19 (19 = lowest priority), got {niceness}.")
        self.niceness = int(niceness)
        self.threads = int(threads)

    def __call__(self, worker_id: int) -> None:
        monai_worker_init_fn(worker_id)
        if self.niceness and hasattr(os, "nice"):
            try:
                os.nice(self.niceness)
            except OSError:  # a sandbox may forbid it; the worker then just runs at normal priority
                pass
        torch.set_num_threads(self.threads)


class BackgroundDataLoader(DataLoader):
    """MONAI ``DataLoader`` whose workers run at a low CPU priority (see the module docstring).

    Args:
        dataset: the dataset (typically a CacheDataset followed by random transforms).
        num_workers: worker processes; 0 makes it a plain sequential MONAI DataLoader.
        niceness: CPU priority offset of the workers (:class:`LowPriorityWorkerInit`).
        kwargs: the rest of ``torch.utils.data.DataLoader``'s arguments. An explicit ``worker_init_fn`` or
            ``multiprocessing_context`` is kept as given.
    """

    def __init__(self, dataset: Dataset, num_workers: int = 1, niceness: int = 19, **kwargs: Any) -> None:
        if num_workers > 0:
            kwargs.setdefault("worker_init_fn", LowPriorityWorkerInit(niceness))
            if "fork" in multiprocessing.get_all_start_methods():
                kwargs.setdefault("multiprocessing_context", "fork")
        super().__init__(dataset, num_workers=num_workers, **kwargs)
