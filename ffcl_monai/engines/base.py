"""One base for the project's own trainers: :class:`BaseTrainer`, a MONAI ``SupervisedTrainer``.

The two-view (SimCLR, Barlow Twins), auxiliary-target and FFCL local/global trainers differ only in how a batch
becomes a loss; everything else is the same and lives here, modelled on MONAI's ``SupervisedTrainer._iteration``:

1. every batch goes through ``self.prepare_batch`` (MONAI's semantics: ``(batch, device, non_blocking, **to_kwargs)
   -> (inputs, targets)`` or ``(inputs, targets, args, kwargs)``; a config can pass its own ``prepare_batch``);
   MetaTensors become plain tensors (their metadata is unused here and costs time in every op);
2. ``engine.state.output`` is filled as MONAI fills it -- ``image`` and ``label`` first, ``pred`` after the
   forward pass, ``loss`` (and the trainer's named parts, e.g. one loss per block) after the loss -- and the MONAI
   ``IterationEvents`` fire in MONAI's order: ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` (before
   the optimizer step), ``MODEL_COMPLETED`` (after it). Handlers of ``monai.engines.IterationEvents`` (gradient
   monitors, loss inspectors, ...) attach to these trainers as they do to MONAI's;
3. mixed precision from :class:`~ffcl_monai.engines.precision.Precision` (``amp``, ``amp_dtype``; the forward pass
   autocasts, the loss is computed outside autocast -- the project's losses cast their inputs to float32 -- and
   fp16 adds a GradScaler kept as ``self.scaler``);
4. a non-finite loss or gradient skips the optimizer step in every precision (fp16 through the GradScaler, float32 and
   bf16 through :meth:`Precision.step`'s check) and :class:`~ffcl_monai.engines.precision.SkippedStepGuard` reports
   it: a warning naming the iteration, ``engine.state.metrics["skipped_steps"]`` per epoch, and a
   ``FloatingPointError`` naming the fixes after ``max_skipped_steps`` skipped steps in a row;
5. at every epoch end, before any handler of the config runs (so MLflow, the stats handler and the history see them):
   the epoch means of the trainer's step outputs (:class:`~ffcl_monai.handlers.history.EpochMeans`, names chosen
   by each trainer), ``engine.state.metrics["lr"]`` (the learning rate used in the epoch) and ``skipped_steps``.

A subclass says how a batch becomes a loss through :meth:`forward` (under autocast; default: MONAI's inferer on
``self.network``) and :meth:`compute_loss` (float32; default: ``loss_function(pred, targets)``), and optionally
:meth:`train_mode` (which modules train) and :meth:`optimizers` (what steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from ffcl_monai.engines.precision import PrecisionTrainerMixin, SkippedStepGuard, default_amp
from ffcl_monai.handlers.history import EpochMeans

__all__ = ["BaseTrainer", "plain", "detached"]


def _map_leaves(x: Any, leaf: Callable[[Any], Any]) -> Any:
    """``leaf`` applied to every item of nested tuples, lists and dicts (containers rebuilt, other values as is)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_map_leaves(v, leaf) for v in x)
    if isinstance(x, dict):
        return {k: _map_leaves(v, leaf) for k, v in x.items()}
    return leaf(x)


def plain(x: Any) -> Any:
    """MetaTensor -> Tensor (also inside tuples, lists and dicts); anything else unchanged."""
    return _map_leaves(x, lambda v: v.as_tensor() if hasattr(v, "as_tensor") else v)


def detached(x: Any) -> Any:
    """Tensors detached (also inside tuples, lists and dicts), so no handler keeps an iteration's autograd graph."""
    return _map_leaves(x, lambda v: v.detach() if isinstance(v, torch.Tensor) else v)


class BaseTrainer(PrecisionTrainerMixin, SupervisedTrainer):
    """Base of the project's trainers (module docstring). Arguments not listed are MONAI ``SupervisedTrainer``'s.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function, epoch_length, non_blocking,
            prepare_batch, train_handlers: as MONAI's ``SupervisedTrainer``.
        amp: autocast in ``amp_dtype`` on the training device; ``None`` = on only on CUDA.
        amp_dtype: ``bfloat16`` (no gradient scaler) or ``float16`` (adds a :class:`torch.amp.GradScaler`).
        epoch_metrics: step-output key -> metric name for the epoch means (a mapping, or a callable returning None
            for keys to leave out); None = none.
        epoch_metric_weights: step-output key -> key of its weight in the output (:class:`EpochMeans`).
        max_grad_norm: clip the gradients to this total norm before the step; None = no clipping.
        max_skipped_steps: stop with a ``FloatingPointError`` after this many optimizer steps in a row were skipped
            for a non-finite loss or gradient (``<= 0``: never).
        kwargs: further ``SupervisedTrainer`` arguments (``inferer``, ``iteration_update``, ``event_names``,
            ``to_kwargs``, ``compile``, ...). Its ``amp``/``amp_kwargs``/``decollate`` are fixed here and gradient
            accumulation is not supported.
    """

    #: error raised when ``prepare_batch`` gives no targets; None = targets are optional (self-supervised)
    missing_targets_message: str | None = None

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        amp: bool | None = None,
        amp_dtype: str | torch.dtype = "bfloat16",
        epoch_metrics: Mapping[str, str] | Callable[[str], str | None] | None = None,
        epoch_metric_weights: Callable[[str], str | None] | None = None,
        max_grad_norm: float | None = None,
        max_skipped_steps: int = 20,
        **kwargs: Any,
    ) -> None:
        # MONAI's `amp_kwargs={"dtype": ...}` (train.yaml's trainer, which the pretraining overlays extend) names the
        # autocast dtype; nothing else of it applies here.
        amp_kwargs = dict(kwargs.pop("amp_kwargs", None) or {})
        if "dtype" in amp_kwargs:
            amp_dtype = amp_kwargs.pop("dtype")
        fixed = sorted({"decollate", "postprocessing"} & set(kwargs)) + [f"amp_kwargs#{k}" for k in amp_kwargs]
        if fixed:
            raise TypeError(f"{type(self).__name__} does not take {fixed}: outputs are not decollated and "
                            "precision comes from `amp` and `amp_dtype` (or amp_kwargs' dtype).")
        if int(kwargs.pop("accumulation_steps", 1)) != 1:
            raise ValueError(f"{type(self).__name__} steps the optimizer on every batch; gradient accumulation "
                             "(`accumulation_steps`) is not supported.")
        # MONAI's own `amp` autocasts "cuda" only and adds a CUDA GradScaler whenever it is on; self.precision does
        # both for the training device and dtype instead, so MONAI's flag stays off. The config's handlers are
        # registered below, after this trainer's own.
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            train_handlers=None,
            amp=False,
            decollate=False,  # the output holds scalar losses and batch embeddings, not per-sample predictions
            **kwargs,
        )
        self._init_precision(default_amp(self.state.device) if amp is None else amp, amp_dtype)
        self.max_grad_norm = max_grad_norm
        self.step_guard = SkippedStepGuard(max_skipped_steps)
        self.epoch_means = (
            EpochMeans(epoch_metrics, epoch_metric_weights) if epoch_metrics is not None else None
        )
        self._lr: float | None = None
        # Ignite calls handlers in registration order: ours first, so that the epoch means, `lr` and `skipped_steps`
        # are in state.metrics when the config's LR scheduler, MLflow, stats and history handlers run.
        self.step_guard.attach(self)
        if self.epoch_means is not None:
            self.epoch_means.attach(self)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._remember_lr)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_lr)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    # ------------------------------------------------------------------------------------------------ bookkeeping
    @property
    def bf16(self) -> bool:
        """Autocast is on in bfloat16."""
        return self.precision.enabled and self.precision.dtype == torch.bfloat16

    def _remember_lr(self, engine: Engine) -> None:
        # the rate this iteration used: an iteration-level scheduler registered later has not stepped yet
        self._lr = float(self.optimizers()[0].param_groups[0]["lr"])

    def _epoch_lr(self, engine: Engine) -> None:
        lr = self._lr if self._lr is not None else self.optimizers()[0].param_groups[0]["lr"]
        engine.state.metrics["lr"] = float(lr)

    # ---------------------------------------------------------------------------------------------------- hooks
    def optimizers(self) -> list[Optimizer]:
        """The optimizers zeroed and stepped every iteration."""
        return [self.optimizer]

    def train_mode(self) -> None:
        """Put the modules in training mode before the forward pass."""
        self.network.train()

    def forward(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """The forward pass (run under autocast): MONAI's inferer on ``self.network``."""
        return self.inferer(inputs, self.network, *args, **kwargs)

    def compute_loss(self, pred: Any, targets: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss to back-propagate and the entries to report in ``engine.state.output`` (``"loss"`` and any named
        parts, detached), computed outside autocast."""
        loss = self.loss_function(pred, targets).mean()
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------------------------------------ iteration
    def _prepare(self, batchdata: Any) -> tuple[Any, Any, tuple, dict]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        if len(batch) == 2:
            (inputs, targets), args, kwargs = batch, (), {}
        else:
            inputs, targets, args, kwargs = batch
        if targets is None and self.missing_targets_message is not None:
            raise ValueError(self.missing_targets_message)
        return plain(inputs), plain(targets), tuple(args), dict(kwargs)

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward (scaled with fp16), ``BACKWARD_COMPLETED``, then the optimizer step unless a loss or gradient is
        non-finite (then the step guard warns, counts and eventually stops the run). Returns whether it stepped."""
        self.precision.backward(loss)
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        stepped = self.precision.step(self.optimizers(), self.max_grad_norm, loss=loss)
        self.step_guard.record(self, stepped, scaled=self.precision.scaler is not None)
        return stepped

    def _iteration(self, engine: Any, batchdata: Any) -> dict[str, Any]:
        """One training step, in the order of MONAI's ``SupervisedTrainer._iteration`` (module docstring)."""
        inputs, targets, args, kwargs = self._prepare(batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        self.train_mode()
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)  # None, not 0: frozen parameters stay out of the step and its checks
        with self.precision.autocast():
            pred = self.forward(inputs, *args, **kwargs)
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss, report = self.compute_loss(pred, targets)
        engine.state.output.update(report)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self.backward_step(loss)
        engine.state.output[Keys.PRED] = detached(pred)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
