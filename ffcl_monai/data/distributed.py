"""torch.distributed (torchrun) helpers the ``multi_gpu*.yaml`` overlays call.

The overlays follow the model-zoo multi-GPU wiring (``LOCAL_RANK`` device, DDP network, rank-0 handlers) with three
changes that matter at scale:

- :func:`setup` initialises the process group from the ``device`` expression itself, so it also works in workflows
  whose ``initialize`` list comes from a later config file (the FFCL pipeline layers ``ffcl.yaml`` after the
  overlays). It is idempotent, so the pipeline's steps share one process group, which is destroyed at interpreter
  exit; :func:`teardown` (``finalize``) only waits for every rank.
- :func:`partition` splits the datalist per rank *before* caching (``monai.data.partition_dataset``), so every rank's
  ``CacheDataset`` holds 1/world of the images and host RAM does not grow with the number of ranks (MONAI#913,
  model-zoo#395: the RAM blow-up shows up only as "exitcode -9"). Partitions are padded to equal length
  (``even_divisible``) because DDP deadlocks when ranks run different numbers of iterations.
- :func:`rank0_handlers` removes the handlers that write files or MLflow runs on ranks > 0 (by class, so it does not
  depend on the order of the handler list the way model-zoo's ``train#handlers[:-2]`` slicing does), and keeps the
  *loading* half of :class:`~ffcl_monai.handlers.training.ResumeHandler` so that every rank resumes the same state.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

# Handlers that write files, checkpoints or MLflow runs, or print per-rank duplicates; kept on rank 0 only.
RANK0_ONLY_HANDLERS = frozenset(
    {
        "MLFlowHandler",
        "SafeMLFlowHandler",
        "StatsHandler",
        "TensorBoardStatsHandler",
        "ProgressBar",
        "CheckpointSaver",
        "BestModelSaver",
        "HistoryWriter",
        "ViewGridSaver",
        "CollapseMonitor",
        "BackboneSaver",
        "GoodnessPlotHandler",
        "MetricsSaver",
        "ClassificationSaver",
    }
)
# Handlers that both load (needed on every rank) and save (rank 0 only).
_LOAD_ON_ALL_RANKS = frozenset({"ResumeHandler"})



def env_rank() -> int:
    """Global rank: from the process group if initialised, else torchrun's ``RANK`` (0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank on this node (torchrun's ``LOCAL_RANK``), which picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def unwrap_module(network: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers, or
    ``network`` itself: what handlers that read or hook the model's layers (monitor, Grad-CAM) work on."""
    for _ in range(4):  # wrappers nest at most a few deep (compile inside DDP)
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        network = inner
    return network


def is_rank0() -> bool:
    """True on the rank that writes checkpoints, reports and MLflow runs."""
    return env_rank() == 0


def is_not_rank0() -> bool:
    """Model-zoo's ``is_not_rank0`` for ``_disabled_`` keys."""
    return not is_rank0()


def default_backend() -> str:
    """``nccl`` with CUDA, ``gloo`` on CPU (the only backend CPU tensors can use)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup(backend: str | None = "auto") -> torch.device:
    """Initialise the process group once (torchrun sets the env:// variables) and return this rank's device.

    Args:
        backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``; the ``backend`` config key.

    Returns:
        ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    """
    if backend in (None, "", "auto"):
        backend = default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"`backend` must be auto, nccl or gloo, got {backend!r}.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("`backend` nccl needs CUDA GPUs; use `--backend gloo` (or auto) on CPU machines.")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "the multi_gpu overlay must be launched by torchrun, e.g. `torchrun --standalone --nproc_per_node=2 -m "
            "monai.bundle run --config_file \"[...,'bundle/configs/multi_gpu_train.yaml']\"` (RANK/WORLD_SIZE are unset)."
        )
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank()}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        # Destroyed at exit, not in a workflow's `finalize`: pipelines run several workflows in one process and
        # re-creating a group under torchrun's shared store is fragile.
        atexit.register(_destroy)
        logger.info("process group %s: rank %d of %d (local rank %d) on %s", backend, dist.get_rank(),
                    dist.get_world_size(), local_rank(), device)
    return device


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(device: torch.device | str | None = None) -> None:
    """Wait for every rank (no-op without a process group). ``device`` is taken only so that a config's
    ``initialize`` can pass ``@device`` and thereby initialise the group first."""
    del device
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group), e.g. an MLflow run id."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def teardown() -> None:
    """``finalize`` of the overlays: wait until every rank is done (rank 0 may still be writing checkpoints)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def partition(data: Sequence[Any], shuffle: bool = True, seed: int = 0) -> list[Any]:
    """This rank's share of ``data`` (a datalist), to be cached by this rank only.

    ``monai.data.partition_dataset`` with ``even_divisible=True``: every rank gets ``ceil(N / world)`` items (a few
    repeated), so all ranks run the same number of iterations per epoch, which DDP requires. ``shuffle`` (seeded, the
    same on every rank) spreads classes and patients over the ranks; the split is fixed for the whole run, and the
    loader reshuffles within each rank's share every epoch.
    """
    from monai.data import partition_dataset

    data = list(data)
    world = world_size()
    if world == 1:
        return data
    if len(data) < world:
        raise ValueError(f"the datalist has {len(data)} items for {world} ranks; use fewer GPUs (--nproc_per_node).")
    return list(partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=True)[env_rank()])


class DDP(DistributedDataParallel):
    """``DistributedDataParallel`` that forwards unknown attributes to the wrapped module.

    Configs written for one process reach into the network (``@network.backbone.parameters()`` in ffcl.yaml,
    ``network.backbone`` in checkpoint handlers). Plain DDP hides them; this wrapper keeps them reachable, so the same
    workflow file runs with and without the overlay. A DDP wrapper that is never called (the FFCL stage trainers wrap
    blocks or their own model instead) does no communication after its initial weight broadcast.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(
    network: nn.Module,
    device: torch.device | str,
    sync_batchnorm: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``network`` (already on ``device``) wrapped in :class:`DDP`; returned as is without a process group.

    Args:
        sync_batchnorm: convert BatchNorm layers to ``SyncBatchNorm`` (CUDA only; the ``sync_batchnorm`` key). See
            docs/performance.md for where it is needed (contrastive pretraining) and where not (fine-tuning).
        find_unused_parameters: for networks with branches unused in some steps (the ``find_unused_parameters`` key).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return network
    device = torch.device(device)
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("`sync_batchnorm` needs CUDA (torch's SyncBatchNorm has no CPU kernel); set it to false.")
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    ids = [device] if device.type == "cuda" else None
    return DDP(network, device_ids=ids, find_unused_parameters=find_unused_parameters)


class _LoadOnly:
    """Attach only the resume *loading* of a ResumeHandler (ranks > 0 must start from the same state)."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.handler.load)


def rank0_handlers(handlers: Iterable[Any] | None) -> list[Any] | None:
    """``handlers`` on rank 0; on other ranks the same list without :data:`RANK0_ONLY_HANDLERS`.

    Disabled entries (``None``) are dropped too. Use it for every handler list of a workflow:
    ``train#trainer#train_handlers: $ffcl_monai.data.distributed.rank0_handlers(@train#handlers)``.
    """
    if handlers is None:
        return None
    handlers = [h for h in handlers if h is not None]
    if is_rank0():
        return handlers
    kept: list[Any] = []
    for h in handlers:
        names = {c.__name__ for c in type(h).__mro__}
        if names & RANK0_ONLY_HANDLERS:
            continue
        kept.append(_LoadOnly(h) if names & _LOAD_ON_ALL_RANKS else h)
    return kept


def seed_for_rank(seed: int) -> int:
    """Per-rank seed for random augmentations (different draws on every rank, reproducible per rank)."""
    return int(seed) + 1000 * env_rank()
