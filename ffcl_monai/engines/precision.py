"""Mixed precision for the project's own engines (SimCLR/Barlow, auxiliary, FFCL local and global, Forward-Forward
and its backprop baseline): one autocast context and one backward/step path, chosen by the config keys ``amp`` and
``amp_dtype`` (common.yaml).

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer

__all__ = ["AMP_DTYPES", "Precision", "PrecisionTrainerMixin", "as_optimizer_list", "resolve_amp_dtype"]

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
        "scaler); set it in common.yaml or with --amp_dtype."
    )


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
    ) -> None:
        """Step every optimizer once, then (fp16) update the scale once.

        Several optimizers (e.g. one per Forward-Forward layer) share this one scaler: all gradients of the step
        come from one ``backward()`` of one scaled loss, so they all carry the same scale, and each optimizer is
        unscaled and stepped with it before ``update()`` changes it. One scaler per optimizer would need one
        backward per optimizer, and ``update()`` between two ``step()`` calls would unscale the second optimizer's
        gradients by a scale they were never multiplied with. Each optimizer still checks its own gradients for
        inf/NaN, so an overflow in one layer skips only that layer's step; ``update()`` lowers the scale if any
        optimizer found one. Optimizers without any gradient this step (frozen layers) are skipped.

        Args:
            optimizers: one optimizer or a sequence of them.
            max_grad_norm: clip each optimizer's gradients to this total norm (after unscaling); None = no clipping.
        """
        opts = as_optimizer_list(optimizers)
        if self.scaler is None:
            for opt in opts:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(_params(opt)), max_grad_norm)
                opt.step()
            return
        stepped = False
        for opt in opts:
            if not _has_grad(opt):  # GradScaler.step asserts that some gradient was checked
                continue
            if max_grad_norm is not None:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(list(_params(opt)), max_grad_norm)
            self.scaler.step(opt)  # skipped when this optimizer's gradients hold inf/NaN
            stepped = True
        if stepped:
            self.scaler.update()

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        max_grad_norm: float | None = None,
    ) -> None:
        """:meth:`backward` then :meth:`step` (the gradients must have been zeroed before the forward pass)."""
        self.backward(loss)
        self.step(optimizers, max_grad_norm)

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
