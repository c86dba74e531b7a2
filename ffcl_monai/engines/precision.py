"""Mixed precision for the project's own engines (SimCLR/Barlow, auxiliary, FFCL local and global, Forward-Forward
and its backprop baseline): one autocast context and one backward/step path, chosen by the config keys ``amp`` and
``amp_dtype`` (train.yaml).

- ``amp_dtype: bfloat16`` (default): bf16 autocast, plain ``backward()`` and ``optimizer.step()``. bf16 has float32's
  exponent range, so gradients cannot underflow or overflow where float32 would not; no scaler.
- ``amp_dtype: float16``: fp16 autocast with a :class:`torch.amp.GradScaler` on the training device: the loss is
  scaled before ``backward()`` (small fp16 gradients would flush to 0 otherwise), the optimizer step is skipped when
  a scaled gradient is inf/NaN, and the scale is lowered after such a step and raised after a run of good ones.
- ``amp`` off: float32, plain backward and step, whatever ``amp_dtype`` says (it is still validated, so a typo fails
  at start and not the day fp16 is switched on).

Losses stay float32: the engines compute them outside autocast or cast their inputs (see each loss's docstring).
The scaler's state is part of the engine (``engine.scaler``, as MONAI's own trainers hold it), so
:class:`~ffcl_monai.handlers.training.ResumeHandler` saves and restores it with the run.

Non-finite steps: :meth:`Precision.step` never applies a NaN/inf gradient. With a GradScaler (fp16) the scaler skips
such a step, as PyTorch documents. Without one (float32, bf16) nothing did: one NaN gradient went into Adam's moments
and every weight it touched became NaN for good (seen in CI on another CPU: the bf16 FFCL local stage's first step had
a finite loss and non-finite gradients, every later loss was NaN). :meth:`Precision.step` now checks the loss and the
gradients first and skips the step of any optimizer whose gradients are not all finite, as GradScaler does. The engines
report skipped steps through :class:`SkippedStepGuard`: a warning naming the iteration, ``skipped_steps`` per epoch
in ``engine.state.metrics``, and a :class:`FloatingPointError` after ``max_skipped_steps`` skipped steps in a row
(a run that never recovers should stop, not spin).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer

__all__ = [
    "AMP_DTYPES",
    "Precision",
    "PrecisionTrainerMixin",
    "SkippedStepGuard",
    "as_optimizer_list",
    "default_amp",
    "resolve_amp_dtype",
]

logger = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` / ``torch.float16`` from the config value (a name such as ``"float16"``, ``"torch.float16"``,
    or the dtype itself).

    Raises:
        ValueError: for anything else, naming the config key ``amp_dtype`` and the allowed values.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in AMP_DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in AMP_DTYPES:
            return AMP_DTYPES[name]
    raise ValueError(
        f"unsupported `amp_dtype` {dtype!r}: use bfloat16 (default, no gradient scaler) or float16 (adds a gradient "
        "scaler); set it in train.yaml or with --amp_dtype."
    )


def default_amp(device: torch.device | str | None) -> bool:
    """Autocast is on by default only on CUDA (CPU bf16 is slower than fp32 on most CPUs)."""
    return device is not None and torch.device(device).type == "cuda"


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


def as_optimizer_list(
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
) -> list[torch.optim.Optimizer]:
    """One optimizer or a sequence of them, as a list."""
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    return (p for g in optimizer.param_groups for p in g["params"])


def _has_grad(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for p in _params(optimizer))


def _finite_flags(optimizers: Sequence[torch.optim.Optimizer], loss: torch.Tensor | None) -> list[bool]:
    """Per optimizer: its gradients (and ``loss``) are all finite; one host sync for all of them.

    The max-norm (``inf``) of the gradients is NaN or inf exactly when one entry is, and never overflows, unlike
    the 2-norm of large finite gradients.
    """
    flags = []
    for opt in optimizers:
        grads = [p.grad for p in _params(opt) if p.grad is not None]
        flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))
    if not flags:
        return []
    device = flags[0].device
    ok = torch.stack([f.to(device) for f in flags])
    if loss is not None:
        ok = ok & torch.isfinite(loss.detach()).all().to(device)
    return [bool(v) for v in ok.tolist()]


class Precision:
    """Autocast context and backward/step path of one engine.

    Args:
        device: the training device (its type picks the autocast and the scaler backend: ``cuda``, ``cpu``, ...).
        amp: autocast on; off means float32 everywhere.
        dtype: ``amp_dtype``: ``bfloat16`` or ``float16`` (names or torch dtypes). float16 with ``amp`` on adds a
            :class:`torch.amp.GradScaler`.
        init_scale: the scaler's first loss scale (PyTorch's default 2**16; halved after every step with an inf/NaN
            gradient until the gradients fit, so the first step or two of an fp16 run may be skipped).

    Attributes:
        enabled: autocast on.
        dtype: the autocast dtype.
        scaler: the GradScaler (float16 and ``amp`` on), else ``None``.
    """

    def __init__(self, device: str | torch.device | None, amp: bool, dtype: str | torch.dtype = "bfloat16",
                 init_scale: float = 2.0**16) -> None:
        self.device_type = _device_type(device)
        self.dtype = resolve_amp_dtype(dtype)
        self.enabled = bool(amp)
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(self.device_type, init_scale=init_scale)
            if self.enabled and self.dtype == torch.float16
            else None
        )

    def __repr__(self) -> str:
        mode = "float32" if not self.enabled else str(self.dtype).removeprefix("torch.")
        return f"Precision({self.device_type}, {mode}{', GradScaler' if self.scaler is not None else ''})"

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward pass (a no-op context when ``amp`` is off)."""
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss multiplied by the current scale when fp16 uses a scaler."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        max_grad_norm: float | None = None,
        loss: torch.Tensor | None = None,
    ) -> bool:
        """Step every optimizer once, except those with a non-finite gradient, then (fp16) update the scale once.

        Several optimizers (e.g. one per Forward-Forward layer) share this one scaler: all gradients of the step
        come from one ``backward()`` of one scaled loss, so they all carry the same scale, and each optimizer is
        unscaled and stepped with it before ``update()`` changes it. One scaler per optimizer would need one
        backward per optimizer, and ``update()`` between two ``step()`` calls would unscale the second optimizer's
        gradients by a scale they were never multiplied with. Each optimizer still checks its own gradients for
        inf/NaN, so an overflow in one layer skips only that layer's step; ``update()`` lowers the scale if any
        optimizer found one. Optimizers without any gradient this step (frozen layers) are skipped.

        Without a scaler (float32, bf16) the same rule holds: an optimizer whose gradients hold NaN/inf is not
        stepped (all of them when ``loss`` is given and not finite), where before the bad gradient went into the
        optimizer's state and the weights (module docstring). The check costs one host sync per step, as
        GradScaler's own.

        Args:
            optimizers: one optimizer or a sequence of them.
            max_grad_norm: clip each optimizer's gradients to this total norm (after unscaling); None = no clipping.
            loss: the step's loss, checked with the gradients when there is no scaler (a NaN loss can leave some
                gradients finite, e.g. zero, and the step would still be garbage).

        Returns:
            False when a step was skipped for a non-finite loss or gradient (fp16: the scaler lowered its scale),
            True otherwise.
        """
        opts = [opt for opt in as_optimizer_list(optimizers) if _has_grad(opt)]
        if self.scaler is None:
            finite = _finite_flags(opts, loss)
            for opt, ok in zip(opts, finite):
                if not ok:
                    continue
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(_params(opt)), max_grad_norm)
                opt.step()
            return all(finite)
        if not opts:  # GradScaler.step asserts that some gradient was checked
            return True
        scale = self.scaler.get_scale()
        for opt in opts:
            if max_grad_norm is not None:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(list(_params(opt)), max_grad_norm)
            self.scaler.step(opt)  # skipped when this optimizer's gradients hold inf/NaN
        self.scaler.update()
        # update() lowers the scale exactly when some optimizer found an inf/NaN (it only grows after good steps)
        return not self.scaler.get_scale() < scale

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        max_grad_norm: float | None = None,
    ) -> bool:
        """:meth:`backward` then :meth:`step` (the gradients must have been zeroed before the forward pass).

        Returns:
            :meth:`step`'s answer: False when a step was skipped for a non-finite loss or gradient.
        """
        self.backward(loss)
        return self.step(optimizers, max_grad_norm, loss=loss)

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without a scaler), for resume checkpoints."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state saved by :meth:`state_dict` (ignored without a scaler)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class PrecisionTrainerMixin:
    """For MONAI ``Trainer`` subclasses whose autocast and gradient scaler come from :class:`Precision`.

    List it before the MONAI base class and call :meth:`_init_precision` after the base ``__init__``. MONAI's
    ``Trainer.run`` would replace ``self.scaler`` (a CUDA GradScaler whenever MONAI's own ``amp`` flag is on, else
    ``None``); these engines own their scaler (float16 only, on the training device), so :meth:`run` skips it and
    goes straight to ``Workflow.run``.
    """

    precision: Precision
    scaler: torch.amp.GradScaler | None

    def _init_precision(self, amp: bool, amp_dtype: str | torch.dtype) -> None:
        self.precision = Precision(self.state.device, amp, amp_dtype)  # type: ignore[attr-defined]
        self.scaler = self.precision.scaler  # where MONAI's trainers keep theirs (ResumeHandler saves it)

    def run(self) -> None:
        super(Trainer, self).run()  # type: ignore[misc]


class SkippedStepGuard:
    """Report the steps :meth:`Precision.step` skipped, and stop a run that keeps skipping them.

    The engine's iteration calls :meth:`record` with :meth:`Precision.step`'s answer. A skipped step without a
    scaler (float32, bf16) is logged as a warning naming the epoch and iteration; with fp16 at info level, because
    GradScaler skips the first steps of every run on purpose while it lowers its initial scale. Skipped steps are
    counted per epoch into ``engine.state.metrics["skipped_steps"]`` (so MLflow and the history record them), and
    ``max_consecutive`` skipped steps in a row raise a :class:`FloatingPointError` that names the likely fixes: the
    weights are still those of the last good step, but nothing suggests the next step will be better.

    Args:
        max_consecutive: skipped steps in a row before the run stops; ``<= 0`` never stops (counting only).
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.epoch_skipped = 0
        self.total_skipped = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.epoch_skipped = 0

    def _write(self, engine: Engine) -> None:
        engine.state.metrics["skipped_steps"] = self.epoch_skipped

    def record(self, engine: Engine, stepped: bool, scaled: bool = False) -> None:
        """Book one optimizer step: ``stepped`` is :meth:`Precision.step`'s answer, ``scaled`` whether a GradScaler
        made it (fp16).

        Raises:
            FloatingPointError: on the ``max_consecutive``-th skipped step in a row.
        """
        if stepped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.epoch_skipped += 1
        self.total_skipped += 1
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        if scaled:
            logger.info("%s: fp16 gradient overflow, GradScaler skipped the optimizer step and lowered its scale "
                        "(%d in a row)", where, self.consecutive)
        else:
            logger.warning("%s: the loss or a gradient is NaN/inf; optimizer step skipped, weights unchanged "
                           "(%d in a row, %d this epoch)", where, self.consecutive, self.epoch_skipped)
        if 0 < self.max_consecutive <= self.consecutive:
            raise FloatingPointError(
                f"{self.consecutive} optimizer steps in a row were skipped because the loss or a gradient was NaN/inf "
                f"(last at {where}); training stopped, the weights are those of the last good step. Try a lower "
                "`learning_rate`, turn mixed precision off (`amp: false`, or `pretrain_amp: false` in the FFCL "
                "stages), or check the images for NaN/inf values."
            )
