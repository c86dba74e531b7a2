"""Handlers that make long runs trustworthy: deterministic epochs, resume, NaN guard, a best model that is never
chosen on a NaN metric, and early stopping (on a validation metric: :class:`EarlyStopper`; on an epoch loss of a
stage without validation, e.g. FFCL's local and global stages: :class:`LossEarlyStopper`, Ignite's ``EarlyStopping``
with resumable state). The checkpoint savers are in :mod:`ffcl_monai.handlers.checkpoint`, the local history that
survives a tracking-server outage in :mod:`ffcl_monai.handlers.history`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.utils import set_determinism

from ffcl_monai.networks.checkpoints import atomic_save, previous_generation, safe_load

logger = logging.getLogger(__name__)


class EpochSeedHandler:
    """Re-seed every random source at the start of each epoch from ``seed + epoch``.

    Epoch e then draws the same shuffling and augmentations whether the run went straight through or was resumed
    from a checkpoint, which is what makes a resumed run end with the same metrics (on CPU).
    """

    def __init__(self, seed: int = 0, datasets: Sequence[Any] = ()) -> None:
        self.seed = seed
        self.datasets = list(datasets)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        s = self.seed + engine.state.epoch
        set_determinism(seed=s)
        for ds in self.datasets:
            set_rnd(ds, s)


class NaNGuard:
    """Stop at the first non-finite loss, say where and what to try, and leave the last good checkpoints alone.

    Raising (instead of ``engine.terminate()``) makes ``python -m monai.bundle run`` exit non-zero, and no
    checkpoint handler runs after the bad iteration, so ``model.pt`` and the resume checkpoint stay the last good ones.
    """

    def __init__(self, output_transform: Any = None) -> None:
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        if self.output_transform is not None:
            loss = self.output_transform(out)
        elif isinstance(out, dict):
            loss = out.get("loss")
        elif isinstance(out, (list, tuple)) and out and isinstance(out[0], dict):
            loss = out[0].get("loss")
        else:
            loss = out
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; training stopped. "
                "The last good checkpoints are kept (best model and resume checkpoint in output_dir). Try a lower "
                "`learning_rate`, check the images for NaN/inf values, or disable `amp`."
            )


class ResumeHandler:
    """Save everything needed to continue a run at the end of every epoch; load it at start when ``resume``.

    The checkpoint holds state dicts only (weights_only-loadable): network, optimizer, LR scheduler, the trainer's
    epoch/iteration counters and the validator's best metric, so best-model selection also continues correctly. When
    the trainer has an enabled gradient scaler (``engine.scaler``: fp16 autocast, ``amp_dtype: float16``), its loss
    scale and growth tracker are saved and restored too, so a resumed fp16 run does not restart from the initial
    scale and skip steps again.

    ``extra_state``: other handlers whose state must resume too, ``{name: object with state_dict() and
    load_state_dict()}`` (e.g. a :class:`LossEarlyStopper`'s best loss and counter); stored under ``"extra"``. Register
    such a handler *before* this one on ``EPOCH_COMPLETED`` so that the saved state includes the epoch just finished.

    The state is copied at the end of the epoch and written by a background thread (temporary file, fsync, rename), so
    the next epoch does not wait for the disk; a write still in flight is finished before the next one starts and when
    the run ends or fails. The last two generations are kept (``resume.pt`` and ``resume.prev.pt``); resume falls back
    to the older one, with a warning, when the newest is missing or damaged.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        validator: Engine | None = None,
        resume: bool = False,
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.resume = resume
        self.extra_state = dict(extra_state or {})
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.wait)

    def _net(self) -> torch.nn.Module:
        return getattr(self.network, "module", self.network)  # unwrap DDP

    def save(self, engine: Engine) -> None:
        payload: dict[str, Any] = {
            "model": self._net().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration},
        }
        if self.lr_scheduler is not None:
            payload["lr_scheduler"] = self.lr_scheduler.state_dict()
        scaler = _scaler(engine)
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        if self.validator is not None:
            payload["validator"] = {
                "best_metric": float(getattr(self.validator.state, "best_metric", -1)),
                "best_metric_epoch": int(getattr(self.validator.state, "best_metric_epoch", -1)),
            }
        if self.extra_state:
            payload["extra"] = {name: dict(obj.state_dict()) for name, obj in self.extra_state.items()}
        self.wait()
        snapshot = _cpu_copy(payload)  # the next optimizer step changes the live tensors in place
        self._writer = threading.Thread(target=self._write, args=(snapshot,), name="resume-checkpoint")
        # not a daemon: if training fails, the interpreter still finishes this write before it exits
        self._writer.start()

    def _write(self, payload: dict[str, Any]) -> None:
        try:
            atomic_save(payload, self.path, keep_previous=True)  # the last two generations survive
        except BaseException as e:  # surfaced in the training thread by wait()
            self._write_error = e

    def wait(self, engine: Engine | None = None) -> None:
        """Block until the last checkpoint write is on disk; raise its error, if any."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            err, self._write_error = self._write_error, None
            raise RuntimeError(f"could not write the resume checkpoint {self.path}: {err}") from err

    def load(self, engine: Engine) -> None:
        if not self.resume:
            return
        ckpt = self._load_newest_readable()
        self._net().load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in ckpt:
            try:
                self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            except (KeyError, TypeError, ValueError) as e:
                # e.g. a run started under CosineAnnealingLR resumed under a config that builds a LambdaLR
                raise RuntimeError(
                    f"the resume checkpoint {self.path} holds the state of another learning-rate schedule "
                    f"({type(self.lr_scheduler).__name__} cannot load it: {type(e).__name__}: {e}). Resume with the "
                    "config the run started with (its config_resolved.json), or start over with --overwrite True."
                ) from e
        scaler = _scaler(engine)
        if scaler is not None and ckpt.get("scaler"):  # absent when the interrupted run was not fp16
            scaler.load_state_dict(ckpt["scaler"])
        engine.state.epoch = int(ckpt["trainer"]["epoch"])
        engine.state.iteration = int(ckpt["trainer"]["iteration"])
        if self.validator is not None and "validator" in ckpt:
            self.validator.state.best_metric = ckpt["validator"]["best_metric"]
            self.validator.state.best_metric_epoch = ckpt["validator"]["best_metric_epoch"]
        for name, state in (ckpt.get("extra") or {}).items():
            if name in self.extra_state:  # a checkpoint of a run without that handler simply lacks the entry
                self.extra_state[name].load_state_dict(state)
        logger.info("resumed at epoch %d", engine.state.epoch)

    def _load_newest_readable(self) -> dict[str, Any]:
        """The newest resume checkpoint that loads; the previous generation when the newest is missing or damaged
        (a crash between the two renames of a write, a disk error), saying so."""
        older = previous_generation(self.path)
        candidates = [p for p in (self.path, older) if p.is_file()]
        if not candidates:
            raise FileNotFoundError(
                f"`resume` is set but there is no resume checkpoint at {self.path}. Use the same --output_dir as the "
                "interrupted run, or drop --resume to start fresh."
            )
        errors = []
        for path in candidates:
            try:
                ckpt = safe_load(path)
                if not isinstance(ckpt, dict) or "model" not in ckpt or "trainer" not in ckpt:
                    raise RuntimeError("not a resume checkpoint (no model/trainer state)")
            except Exception as e:
                errors.append(f"{path}: {e}")
                logger.warning("resume checkpoint %s is damaged or unreadable (%s); trying the previous generation",
                               path, str(e).splitlines()[0][:200])
                continue
            if path != self.path:
                logger.warning("resuming from the previous generation %s (epoch %s): the newest one was missing or "
                               "damaged", path, ckpt["trainer"].get("epoch"))
            else:
                logger.info("resuming from %s", path)
            return ckpt
        raise RuntimeError("no readable resume checkpoint:\n  " + "\n  ".join(errors))


def _scaler(engine: Engine) -> Any:
    """The engine's enabled GradScaler (MONAI trainers and the project's engines keep it as ``engine.scaler``)."""
    scaler = getattr(engine, "scaler", None)
    return scaler if scaler is not None and hasattr(scaler, "state_dict") and scaler.is_enabled() else None


def _cpu_copy(obj: Any) -> Any:
    """Nested dicts/lists of tensors with every tensor copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class FiniteBestMetric:
    """Never let a NaN (or infinite) key metric become the validator's best.

    MONAI's evaluator takes the first validation as best whatever its value, and ``nan > best`` is always False, so
    a NaN AUC at the first validation (a split without a class, NaN outputs) used to stay "best" for the whole run
    and ``model.pt`` stayed the epoch-1 model. This handler snapshots ``best_metric``/``best_metric_epoch`` when each
    validation starts and restores them when it ends with a non-finite key metric. A non-finite best carried over
    (a resume checkpoint written before this fix) counts as no best.

    Attach it to the validator first in ``val_handlers`` (MONAI's own comparison runs before any handler), before
    :class:`~ffcl_monai.handlers.checkpoint.BestModelSaver`, ``StatsHandler`` and early stopping read the best. It runs on every rank (not in
    ``RANK0_ONLY_HANDLERS``), so multi-GPU ranks keep agreeing on the best epoch.
    """

    def __init__(self) -> None:
        self.non_finite_epochs: list[int] = []
        self._before: tuple[float, int] = (-1.0, -1)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._snapshot)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _snapshot(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch != -1 and not _is_finite(engine.state.best_metric):
            engine.state.best_metric, engine.state.best_metric_epoch = -1, -1
        self._before = (engine.state.best_metric, engine.state.best_metric_epoch)

    def __call__(self, engine: Engine) -> None:
        name = engine.state.key_metric_name
        if name is None or _is_finite(engine.state.metrics.get(name)):
            return
        engine.state.best_metric, engine.state.best_metric_epoch = self._before
        self.non_finite_epochs.append(engine.state.epoch)
        logger.warning(
            "validation %s is %s at epoch %d: not taken as a best model (best stays %s).", name,
            engine.state.metrics.get(name), engine.state.epoch,
            f"epoch {self._before[1]}" if self._before[1] > 0 else "unset",
        )


class NoBestModelError(FloatingPointError):
    """Training ended without a finite validation metric, so there is no best model to keep."""


class RequireBestModel:
    """Fail the run (non-zero exit) when training ends without any finite validation key metric.

    Attached to the trainer; at ``COMPLETED`` it checks the validator's ``best_metric_epoch``. Without it, a run
    whose every validation AUC was NaN (or that never validated) ended "successfully" with no usable ``model.pt``.

    Args:
        validator: the evaluator whose key metric selects the best model.
        path: the best-model checkpoint, named in the message.
        val_interval: the trainer's validation interval, named in the message.
    """

    def __init__(self, validator: Engine, path: str | os.PathLike, val_interval: int = 1) -> None:
        self.validator = validator
        self.path = Path(path)
        self.val_interval = val_interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = self.validator.state
        if getattr(state, "best_metric_epoch", -1) >= 1 and _is_finite(getattr(state, "best_metric", None)):
            return
        name = getattr(state, "key_metric_name", None) or "key metric"
        if not getattr(state, "epoch", 0):
            cause = (f"no validation ran in {engine.state.epoch} epoch(s) (val_interval={self.val_interval}); lower "
                     "`val_interval` or raise `max_epochs`.")
        else:
            cause = (f"every validation gave a non-finite {name} (last: {state.metrics.get(name)}). A NaN AUC means "
                     "the validation split lacks a class or the network outputs NaN: re-create the split stratified "
                     "by class, check the images, or lower `learning_rate` / disable `amp`.")
        stale = f" The file at {self.path} is from an earlier run; do not use it." if self.path.exists() else ""
        raise NoBestModelError(f"training finished without a best model, none was saved to {self.path}: {cause}{stale}")


class EarlyStopper:
    """Stop training when the validator's key metric has not improved for ``patience`` validations.

    Attached to the trainer (after the ValidationHandler) and driven by MONAI's own ``best_metric_epoch``, so it
    needs no second score bookkeeping and survives resume.
    """

    def __init__(self, validator: Engine, patience: int, val_interval: int = 1) -> None:
        self.validator = validator
        self.patience = patience
        self.val_interval = val_interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        best_epoch = getattr(self.validator.state, "best_metric_epoch", -1)
        if best_epoch < 1 or self.validator.state.epoch != engine.state.epoch:
            return
        if (engine.state.epoch - best_epoch) // self.val_interval >= self.patience:
            logger.info("early stopping at epoch %d: no improvement since epoch %d", engine.state.epoch, best_epoch)
            print(f"early stopping at epoch {engine.state.epoch}: best validation at epoch {best_epoch}", flush=True)
            engine.terminate()


class LossEarlyStopper:
    """Stop training when an epoch metric of the trainer (lower is better) has not improved for ``patience`` epochs.

    For workflows without model selection, whose only per-epoch signal is their own loss: FFCL's local and global
    stages (``stage_early_stop_patience``). Ignite's :class:`~ignite.handlers.EarlyStopping` does the counting on the
    score ``-metric`` (an epoch counts as an improvement when its loss is strictly below the best so far); this class
    adds what a bundle workflow needs around it:

    - ``metric``: a key of ``engine.state.metrics`` written before the config's handlers run (the project's trainers
      write their epoch means there); ``None`` = the epoch mean of the trainer's ``loss`` output, whatever the trainer
      names it (``local_loss``, ``global_loss``: ``engine.epoch_means``);
    - resumable: :meth:`state_dict` / :meth:`load_state_dict` (pass it to the ResumeHandler's ``extra_state`` and
      register it before the ResumeHandler), and a resumed run whose saved state had already reached ``patience``
      stops before training another epoch;
    - under torchrun the metric is averaged over the ranks first, so every rank stops at the same epoch;
    - ``enabled=False`` (``patience`` 0) attaches nothing, so the handler can sit in a handler list unconditionally.

    Refused for the greedy local schedule (``local_schedule: greedy``), which trains block after block: a plateau of
    one block's loss would stop the stage before the later blocks were trained.

    Args:
        patience: epochs without improvement before stopping (>= 1 when enabled).
        metric: the ``engine.state.metrics`` key to watch; None = the trainer's epoch loss.
        enabled: False = do nothing.
    """

    def __init__(self, patience: int, metric: str | None = None, enabled: bool = True) -> None:
        self.enabled = bool(enabled) and int(patience) > 0
        if enabled and int(patience) < 0:
            raise ValueError(f"early-stopping patience must be >= 0 (0 = off), got {patience}.")
        self.patience = int(patience)
        self.metric = metric
        self.stopper: Any = None  # ignite EarlyStopping, built in attach (it needs the trainer)
        self._pending: Mapping[str, Any] | None = None
        self.stopped_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if getattr(engine, "schedule", None) == "greedy":
            raise ValueError(
                "stage early stopping cannot be combined with `local_schedule: greedy` (blocks are trained one after "
                "another; a plateau of one block's loss would leave the later blocks untrained). Set "
                "`stage_early_stop_patience: 0` or `local_schedule: single_pass`."
            )
        from ignite.handlers import EarlyStopping

        self.stopper = EarlyStopping(patience=self.patience, score_function=self._score, trainer=engine)
        if self._pending is not None:
            self.load_state_dict(self._pending)
        engine.add_event_handler(Events.EPOCH_STARTED, self._stop_if_exhausted)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _metric_name(self, engine: Engine) -> str:
        if self.metric:
            return str(self.metric)
        means = getattr(engine, "epoch_means", None)
        name = means.names("loss") if means is not None else None
        if not name:
            raise ValueError(
                f"{type(engine).__name__} writes no epoch mean of its loss; set `stage_early_stop_metric` to a key of "
                f"engine.state.metrics ({sorted(engine.state.metrics)})."
            )
        return str(name)

    def _score(self, engine: Engine) -> float:
        name = self._metric_name(engine)
        if name not in engine.state.metrics:
            raise KeyError(
                f"early stopping watches `{name}`, which is not in engine.state.metrics "
                f"({sorted(engine.state.metrics)}); set `stage_early_stop_metric`."
            )
        value = float(engine.state.metrics[name])
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # one decision for every rank: the mean over ranks
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([value], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            value = float(t.item()) / dist.get_world_size()
        return -value  # Ignite's EarlyStopping maximises its score

    def __call__(self, engine: Engine) -> None:
        self.stopper(engine)
        if self.stopper.counter >= self.patience:
            self.stopped_epoch = engine.state.epoch
            logger.info("early stopping at epoch %d: %s did not improve for %d epochs (best %.6g)", engine.state.epoch,
                        self._metric_name(engine), self.patience, -float(self.stopper.best_score))

    def _stop_if_exhausted(self, engine: Engine) -> None:
        # a resumed run whose checkpoint was written at the stopping epoch: do not train one epoch more
        if self.stopper.counter >= self.patience:
            self.stopped_epoch = engine.state.epoch - 1
            logger.info("early stopping: the resumed state had already stopped after epoch %d", engine.state.epoch - 1)
            engine.terminate()

    def state_dict(self) -> dict[str, Any]:
        """``{"counter", "best_score"}`` of the Ignite handler (empty when disabled or not attached yet)."""
        if self.stopper is None:
            return dict(self._pending or {})
        best = self.stopper.best_score
        return {"counter": int(self.stopper.counter), "best_score": None if best is None else float(best)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (kept until :meth:`attach` when not attached yet)."""
        if not state:
            return
        if self.stopper is None:
            self._pending = dict(state)
            return
        self.stopper.counter = int(state["counter"])
        self.stopper.best_score = None if state.get("best_score") is None else float(state["best_score"])


class ProgressBar:
    """Ignite's progress bar, attached only when ``enabled`` (the config key ``progress``: on in a terminal).

    A switch instead of ``_disabled_``, so that the handler can be referenced by name from several handler lists
    (``train.yaml``'s ``pretrain_handlers``) without leaving a ``None`` in them.
    """

    def __init__(self, enabled: bool = True, persist: bool = True) -> None:
        self.enabled = enabled
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            from ignite.handlers import ProgressBar as IgniteProgressBar

            IgniteProgressBar(persist=self.persist).attach(engine)
