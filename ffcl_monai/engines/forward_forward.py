"""Ignite engines for Hinton's Forward-Forward training (seeds 002/003), its linear read-out and a backprop baseline.

Speed on CPU comes from keeping the whole (small) data set as tensors in memory (:class:`TensorBatches`), large
minibatches, one ``backward()`` per step for all layers (inputs are detached, so each layer's gradient is still
local: the sum of independent losses has the per-layer gradients), and the factorised first layer of
:class:`~ffcl_monai.networks.forward_forward.FFNet` for positives, negatives and all-label prediction.

Schedules (key ``schedule``):
    - ``greedy``: layer after layer, each for ``epochs_per_layer`` epochs (seeds 002/003). The engine runs
      ``epochs_per_layer * L`` epochs; epoch ``e`` trains layer ``(e - 1) // epochs_per_layer``, lower layers are
      frozen and evaluated without gradients.
    - ``simultaneous``: every layer on every batch, each on the detached output of the layer below
      (loeweX/Forward-Forward).

Negatives (key ``negatives``):
    - ``wrong_label``: a label drawn uniformly from the ``m - 1`` wrong ones (``(y + U{1..m-1}) mod m``), never the
      true one (mpezeshki's ``y[randperm]`` sometimes is).
    - ``hard``: the wrong label with the highest current goodness (Hinton 2022 s.3.3).
    - ``other_sample``: another sample's image with this sample's label, seed 003's ``x_i*`` (Eq. 3.3, ``j != i``);
      we also require a different class when the batch has one, otherwise the "negative" would be positive data.
    - ``shuffled_label``: the batch's labels in a random order, seed 002's ``tf.random.shuffle(y)`` (and
      mpezeshki's ``y[randperm]``). About ``sum_c p_c^2`` of these are the true label (1/m for balanced classes), so
      that share of the "negatives" is positive data; kept to reproduce seed 002 (``seed002_ff.yaml``).

``engine.state.output`` is MONAI's ``{"image", "label", "pred", "loss"}`` plus ``layer{l}_loss``, ``layer{l}_g_pos``
and ``layer{l}_g_neg`` of the layers trained in the step; at every epoch end ``engine.state.metrics`` holds ``loss``
and, for every layer ``l`` trained so far, the epoch means of those three (the shared
:class:`~ffcl_monai.handlers.history.EpochMeans`, registered before any config handler, so MONAI's
``MLFlowHandler``/``StatsHandler`` log them per epoch), ``skipped_steps`` and ``train_time_s``.
``engine.state.history`` keeps the epoch's means per epoch for the goodness plot.

Why plain Ignite engines built by functions and not :class:`~ffcl_monai.engines.base.BaseTrainer` subclasses, as the
other trainers are: a Forward-Forward step is not "a batch -> one network -> one loss -> one optimizer". It has a list
of optimizers (one per layer is allowed), a greedy schedule that changes which layers run and step every epoch, a
per-iteration cosine schedule per layer phase, negatives built inside the step (hard negatives score the current
net), and in-memory ``(x, y)`` tensor batches that the bundle passes to ``engine.run(batches, max_epochs=...)``.
Each of these would override a part of MONAI's ``SupervisedTrainer`` (``prepare_batch``, ``optimizer``,
``run(data, max_epochs)``) until little of it is left. The engines share what the base gives the others instead: the
MONAI ``IterationEvents`` fired in MONAI's order (``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``,
``MODEL_COMPLETED``), the epoch means, :class:`~ffcl_monai.engines.precision.Precision` (mixed precision and the
non-finite-step check) and :class:`~ffcl_monai.engines.precision.SkippedStepGuard` (``max_skipped_steps``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from ffcl_monai.engines.precision import Precision, SkippedStepGuard, as_optimizer_list
from ffcl_monai.handlers.history import EpochMeans
from ffcl_monai.losses.forward_forward import get_ff_loss
from ffcl_monai.networks.checkpoints import atomic_save, safe_load
from ffcl_monai.networks.forward_forward import FFNet, LinearReadout

__all__ = [
    "TensorBatches",
    "shift_augment",
    "wrong_labels",
    "shuffled_labels",
    "hard_labels",
    "other_sample_index",
    "create_ff_trainer",
    "ff_scores",
    "create_backprop_trainer",
    "train_linear_readout",
]

logger = logging.getLogger(__name__)

SCHEDULES = ("greedy", "simultaneous")
NEGATIVES = ("wrong_label", "hard", "other_sample", "shuffled_label")


# ---------------------------------------------------------------------------------------------------------- data
class TensorBatches:
    """Minibatches of in-memory tensors, reshuffled every epoch; an iterable with ``len`` for ``Engine.run``.

    Args:
        x: ``(N, ...)`` inputs (already on the training device).
        y: ``(N,)`` labels.
        batch_size: samples per step; ``<= 0`` means full batch.
        shuffle: new random order every epoch.
        drop_last: drop a last incomplete batch (keeps the per-step statistics comparable).
        seed: generator seed for the order.

    :meth:`set_random_state` re-seeds the order (MONAI's ``set_rnd`` calls it): ``EpochSeedHandler`` does so at every
    epoch start from ``seed + epoch``, so epoch e draws the same order whether the run went straight through or was
    resumed from a checkpoint (a generator seeded once would restart its sequence on resume).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 100,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y lengths differ: {len(x)} vs {len(y)}")
        self.x, self.y = x, y
        n = len(x)
        self.batch_size = n if batch_size <= 0 or batch_size > n else int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> TensorBatches:
        """Re-seed the shuffling generator (the signature of MONAI's ``Randomizable.set_random_state``; ``state`` is
        not supported: the order is drawn by torch)."""
        if state is not None:
            raise TypeError("TensorBatches draws its order with torch: set its random state with `seed`.")
        if seed is not None:
            self.generator.manual_seed(int(seed))
        return self

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def shift_augment(x: torch.Tensor, image_shape: Sequence[int], max_shift: int) -> torch.Tensor:
    """Random integer translation by up to ``max_shift`` pixels per sample (zero fill), on flattened 2D images.

    One gather on the whole batch, no Python loop over samples. ``x``: ``(B, H*W)``; returns the same shape.
    """
    if max_shift <= 0:
        return x
    h, w = int(image_shape[-2]), int(image_shape[-1])
    b = x.shape[0]
    img = F.pad(x.view(b, h, w), (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    return img[torch.arange(b, device=x.device)[:, None, None], rows, cols].reshape(b, h * w)


# ---------------------------------------------------------------------------------------------------- negatives
def wrong_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random label different from ``y`` for every sample: ``(y + U{1..m-1}) mod m``."""
    if num_classes < 2:
        raise ValueError("negatives need at least two classes")
    return (y + torch.randint(1, num_classes, y.shape, device=y.device)) % num_classes


def shuffled_labels(y: torch.Tensor) -> torch.Tensor:
    """The batch's labels in a random order (seed 002: ``random_y = tf.random.shuffle(y)``); may equal ``y``."""
    return y[torch.randperm(y.shape[0], device=y.device)]


def hard_labels(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The wrong label with the highest goodness score: ``scores (B, m)``, ``y (B,)`` -> ``(B,)``."""
    masked = scores.masked_fill(F.one_hot(y.long(), scores.shape[1]).bool(), float("-inf"))
    return masked.argmax(1)


def other_sample_index(y: torch.Tensor, tries: int = 4) -> torch.Tensor:
    """Index ``j != i`` of another sample for every ``i``, preferring ``y[j] != y[i]`` (seed 003 Eq. 3.3).

    Start from a cyclic shift along a random permutation (a derangement, so ``j != i`` always), then redraw the
    entries whose class equals the sample's own a few times.
    """
    b = y.shape[0]
    if b < 2:
        raise ValueError("other_sample negatives need batches of at least two samples (key `batch_size`).")
    perm = torch.randperm(b, device=y.device)
    j = torch.empty_like(perm)
    j[perm] = perm.roll(1)
    for _ in range(tries):
        bad = (y[j] == y) & (j != -1)
        if not bool(bad.any()):
            break
        cand = torch.randint(0, b, (int(bad.sum()),), device=y.device)
        idx = bad.nonzero().squeeze(1)
        ok = (y[cand] != y[idx]) & (cand != idx)
        j[idx[ok]] = cand[ok]
    return j


# ------------------------------------------------------------------------------------------------------ trainer
def create_ff_trainer(
    net: FFNet,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    schedule: str = "simultaneous",
    epochs_per_layer: int = 10,
    loss: str = "softplus",
    threshold: float = 2.0,
    negatives: str = "wrong_label",
    skip_first: bool = False,
    hard_layers: int = 0,
    image_shape: Sequence[int] | None = None,
    max_shift: int = 0,
    lr_schedule: str = "constant",
    amp: bool = False,
    device: str | torch.device | None = None,
    amp_dtype: str | torch.dtype = "bfloat16",
    max_skipped_steps: int = 20,
) -> Engine:
    """Ignite engine that trains ``net`` with the Forward-Forward algorithm on ``(x, y)`` minibatches.

    Args:
        net: the :class:`FFNet` (already on ``device``).
        optimizer: one optimiser over all layers, or a sequence of them (e.g. one per layer). Layers never share a
            gradient (inputs are detached and frozen layers get ``grad=None``), so one Adam is the same as one Adam
            per layer.
        schedule: ``"greedy"`` or ``"simultaneous"`` (module docstring).
        epochs_per_layer: greedy epochs per layer (ignored by ``simultaneous``; run that for any ``max_epochs``).
        loss: name in :data:`~ffcl_monai.losses.forward_forward.FF_LOSSES`.
        threshold: ``theta``.
        negatives: ``"wrong_label"``, ``"hard"``, ``"other_sample"`` or ``"shuffled_label"`` (module docstring).
        skip_first: skip the first layer when scoring labels for hard negatives (as in prediction).
        hard_layers: score hard negatives with the first ``hard_layers`` layers only (0 = every layer trained so
            far). ``1`` is almost free: the factorised first layer gives all ``m`` labels for the price of one.
        image_shape: ``(H, W)`` of the flattened images, needed for ``max_shift``.
        max_shift: random translation augmentation in pixels (0 = off).
        lr_schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over the run; per layer for greedy). Needs
            ``engine.run(..., max_epochs=...)`` to know the length.
        amp: autocast for the matmuls (goodness and losses stay float32).
        device: where batches are moved (defaults to the net's device).
        amp_dtype: ``bfloat16`` or ``float16``; float16 adds one gradient scaler shared by all optimizers
            (:meth:`~ffcl_monai.engines.precision.Precision.step` says why one), as ``engine.scaler``.
        max_skipped_steps: stop with a ``FloatingPointError`` after this many steps in a row were skipped for a
            non-finite loss or gradient (:class:`~ffcl_monai.engines.precision.SkippedStepGuard`).

    Returns:
        The engine; run it with ``engine.run(TensorBatches(...), max_epochs=...)``. For ``greedy`` use
        ``max_epochs = epochs_per_layer * len(net.layers)``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown FF schedule {schedule!r} (config key `schedule`); choose from {SCHEDULES}")
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown FF negatives {negatives!r} (config key `negatives`); choose from {NEGATIVES}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r} (key `lr_schedule`).")
    if max_shift > 0 and image_shape is None:
        raise ValueError("`max_shift` > 0 needs `image_shape` (H, W) of the flattened images.")
    if epochs_per_layer < 1:
        raise ValueError("`epochs_per_layer` must be >= 1")
    loss_fn = get_ff_loss(loss)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    n_layers = len(net.layers)
    m = net.num_classes
    optimizers = as_optimizer_list(optimizer)
    base_lrs = [g["lr"] for opt in optimizers for g in opt.param_groups]
    precision = Precision(dev, amp, amp_dtype)
    guard = SkippedStepGuard(max_skipped_steps)

    def current_layer(engine: Engine) -> int:
        """Greedy: the layer this epoch trains; simultaneous: the last layer (all are trained)."""
        if schedule == "simultaneous":
            return n_layers - 1
        return min((engine.state.epoch - 1) // epochs_per_layer, n_layers - 1)

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        net.train()
        x, y = batch
        x = x.to(dev, non_blocking=True).flatten(1).float()
        y = y.to(dev, non_blocking=True).long()
        if max_shift > 0:
            x = shift_augment(x, image_shape, max_shift)  # type: ignore[arg-type]
        engine.state.output = {"image": x, "label": y}
        top = current_layer(engine)
        first = 0 if schedule == "simultaneous" else top
        eye = torch.eye(m, device=dev)
        h_all = None  # layer-0 activations for every label, when hard negatives computed them anyway
        with precision.autocast():
            if negatives == "other_sample":
                j = other_sample_index(y)
                xs = torch.cat([x, x[j]], 0)
                codes = eye[torch.cat([y, y])][:, None, :]  # (2B, 1, m)
            else:
                upto = top if hard_layers <= 0 else min(hard_layers - 1, top)
                if negatives == "wrong_label":
                    y_neg = wrong_labels(y, m)
                elif negatives == "shuffled_label":
                    y_neg = shuffled_labels(y)
                elif upto == 0 and first == 0:
                    # hard, scored by layer 0 alone: its all-label activations (one D x H product) also serve as the
                    # positive/negative pair of the training step, so the image product is computed once
                    h_all = net.first_layer(x, eye.expand(len(y), m, m))  # (B, m, H), with grad
                    y_neg = hard_labels(net.layer_goodness(h_all.detach()), y)
                else:  # hard: the current net's most "good" wrong label
                    with torch.no_grad():
                        g_all = net.goodness_all_labels(x, upto=upto)
                        y_neg = hard_labels(net.score(g_all, skip_first), y)
                xs = x
                codes = torch.stack([eye[y], eye[y_neg]], 1)  # (B, 2, m)
            if first == 0:
                if h_all is not None:  # hard negatives scored by layer 0: reuse its all-label activations
                    h = h_all[torch.arange(len(y), device=dev)[:, None], torch.stack([y, y_neg], 1)]  # (B, 2, H)
                else:
                    h = net.first_layer(xs, codes)
                trained = [(0, h)]
                for li in range(1, top + 1):
                    # detached input: layer li learns only from its own loss
                    h = net.layers[li](h.detach())
                    trained.append((li, h))
            else:
                # greedy, layer >= 1: frozen lower layers run without building a graph
                trained = [(first, net.layers[first](_input_of(net, xs, codes, first)))]
        out = engine.state.output
        out["pred"] = [act for _, act in trained]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        losses = []
        for li, act in trained:
            g = net.layer_goodness(act)
            if negatives == "other_sample":
                g_pos, g_neg = g[: len(y), 0], g[len(y) :, 0]
            else:
                g_pos, g_neg = g[:, 0], g[:, 1]
            losses.append(loss_fn(g_pos, g_neg, threshold))
            out[f"layer{li}_loss"] = losses[-1].detach()
            out[f"layer{li}_g_pos"] = g_pos.detach().mean()
            out[f"layer{li}_g_neg"] = g_neg.detach().mean()
        total = torch.stack(losses).sum()
        out["loss"] = total.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        # One backward of the summed (and, with fp16, scaled) losses gives every layer its own gradient, all with the
        # same loss scale; hence one scaler shared by the optimizers, each stepped, then one scale update per step.
        precision.backward(total)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        guard.record(engine, precision.step(optimizers, loss=total), scaled=precision.scaler is not None)
        out["pred"] = [act.detach() for act in out["pred"]]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out

    engine = _engine(step, precision, guard)
    _attach_epoch_history(engine)

    if lr_schedule == "cosine":

        @engine.on(Events.ITERATION_STARTED)
        def _cosine(engine: Engine) -> None:
            total_epochs = engine.state.max_epochs or 1
            per = engine.state.epoch_length or 1
            if schedule == "greedy":
                phase_epochs = epochs_per_layer
                e_in = (engine.state.epoch - 1) % epochs_per_layer
                if current_layer(engine) == n_layers - 1:
                    phase_epochs = max(total_epochs - epochs_per_layer * (n_layers - 1), 1)
                    e_in = engine.state.epoch - 1 - epochs_per_layer * (n_layers - 1)
            else:
                phase_epochs, e_in = total_epochs, engine.state.epoch - 1
            it_in = (engine.state.iteration - 1) % per
            t = (e_in * per + it_in) / max(phase_epochs * per, 1)
            # the optimizers' current groups: load_state_dict (a resumed run) replaces the group dicts
            groups = [g for opt in optimizers for g in opt.param_groups]
            for g, lr0 in zip(groups, base_lrs):
                g["lr"] = 0.5 * lr0 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return engine


def _timed(step: Callable[[Engine, Any], Any]) -> Callable[[Engine, Any], Any]:
    """Wrap a process function to add its own duration to ``engine.state.train_step_s`` (training time without
    validation, logging or plotting handlers)."""

    def run(engine: Engine, batch: Any) -> Any:
        t0 = time.perf_counter()
        out = step(engine, batch)
        if isinstance(out, dict) and out["loss"].is_cuda:
            torch.cuda.synchronize()  # honest step times on GPUs (queued kernels)
        engine.state.train_step_s = getattr(engine.state, "train_step_s", 0.0) + time.perf_counter() - t0
        return out

    return run


def _attach_timer_metrics(engine: Engine) -> None:
    """``train_time_s`` (cumulative seconds inside training steps) in ``state.metrics`` each epoch; logged at the end."""

    @engine.on(Events.STARTED)
    def _start(engine: Engine) -> None:
        engine.state.train_step_s = 0.0
        engine.state.train_wall_t0 = time.perf_counter()

    @engine.on(Events.EPOCH_COMPLETED)
    def _epoch(engine: Engine) -> None:
        engine.state.metrics["train_time_s"] = engine.state.train_step_s

    @engine.on(Events.COMPLETED)
    def _done(engine: Engine) -> None:
        wall = time.perf_counter() - engine.state.train_wall_t0
        logger.info("training: %.1f s in training steps, %.1f s wall with handlers (%d epochs)",
                    engine.state.train_step_s, wall, engine.state.epoch)


def _input_of(net: FFNet, x: torch.Tensor, codes: torch.Tensor, layer: int) -> torch.Tensor:
    """Input of ``net.layers[layer]`` (``layer >= 1``) computed without gradients (frozen lower layers)."""
    with torch.no_grad():
        h = net.first_layer(x, codes)
        for li in range(1, layer):
            h = net.layers[li](h)
    return h


def _engine(step: Callable[[Engine, Any], Any], precision: Precision, guard: SkippedStepGuard) -> Engine:
    """The Ignite engine of a step function, with what every project trainer has, registered before any config
    handler so that they see the new values: MONAI's ``IterationEvents``, ``engine.precision``/``engine.scaler``
    (ResumeHandler saves the scaler), ``train_time_s``, ``skipped_steps`` and the epoch means of ``loss`` and of the
    per-layer ``layer{l}_*`` entries. Metrics of layers a greedy schedule no longer trains keep their last value."""
    engine = Engine(_timed(step))
    engine.register_events(*IterationEvents)
    engine.precision, engine.scaler = precision, precision.scaler  # type: ignore[attr-defined]
    _attach_timer_metrics(engine)
    guard.attach(engine)
    engine.epoch_means = EpochMeans(  # type: ignore[attr-defined]
        lambda k: k if k == "loss" or k.startswith("layer") else None, drop_stale=False
    )
    engine.epoch_means.attach(engine)  # type: ignore[attr-defined]
    return engine


def _attach_epoch_history(engine: Engine) -> None:
    """``engine.state.history``: one dict of the epoch's means per epoch (the goodness plot's data)."""

    @engine.on(Events.STARTED)
    def _history(engine: Engine) -> None:
        if not hasattr(engine.state, "history"):
            engine.state.history = []  # type: ignore[attr-defined]

    @engine.on(Events.EPOCH_COMPLETED)
    def _append(engine: Engine) -> None:
        means = engine.epoch_means.last  # type: ignore[attr-defined]
        engine.state.history.append({"epoch": engine.state.epoch, **means})  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def ff_scores(
    net: FFNet,
    x: torch.Tensor,
    skip_first: bool = False,
    batch_size: int = 1000,
    amp: bool = False,
    amp_dtype: str | torch.dtype = "bfloat16",
) -> torch.Tensor:
    """Summed goodness of every label for every sample, ``(N, m)``, in chunks of ``batch_size`` images.

    ``amp`` autocasts the matmuls in ``amp_dtype`` (no scaler: nothing is back-propagated). Turn the scores into
    probabilities with ``softmax`` (a monotone map, so argmax and per-class AUC ranks are unchanged).
    """
    net.eval()
    dev = next(net.parameters()).device
    precision = Precision(dev, amp, amp_dtype)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(dev).flatten(1).float()
        with precision.autocast():
            out.append(net(xb, skip_first=skip_first).float())
    return torch.cat(out)


def train_linear_readout(
    net: FFNet,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 256,
    skip_first: bool = False,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearReadout:
    """Fit the linear read-out on features of ``x`` computed once (the FF net is frozen), with an Ignite engine."""
    readout = LinearReadout(net, skip_first).to(next(net.parameters()).device)
    net.eval()
    with torch.no_grad():
        feats = torch.cat(
            [net.features(x[i : i + 1000].flatten(1).float(), skip_first) for i in range(0, len(x), 1000)]
        )
    engine = create_backprop_trainer(
        readout.head, torch.optim.Adam(readout.head.parameters(), lr=lr, weight_decay=weight_decay)
    )
    engine.run(TensorBatches(feats, y.long(), batch_size, seed=seed), max_epochs=epochs)
    return readout


# ---------------------------------------------------------------------------------------------- backprop baseline
def create_backprop_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    image_shape: Sequence[int] | None = None,
    max_shift: int = 0,
    amp: bool = False,
    amp_dtype: str | torch.dtype = "bfloat16",
    max_skipped_steps: int = 20,
) -> Engine:
    """Plain supervised Ignite engine on the same in-memory batches and augmentation as the FF trainer.

    ``amp`` autocasts the forward pass in ``amp_dtype`` (float16 adds a gradient scaler, ``engine.scaler``); the loss
    is computed in float32. Fires MONAI's ``IterationEvents`` and writes the epoch mean ``loss``, ``skipped_steps``
    and ``train_time_s`` to ``engine.state.metrics``, as :func:`create_ff_trainer`.
    """
    if max_shift > 0 and image_shape is None:
        raise ValueError("`max_shift` > 0 needs `image_shape` (H, W) of the flattened images.")
    dev = next(model.parameters()).device
    precision = Precision(dev, amp, amp_dtype)
    guard = SkippedStepGuard(max_skipped_steps)

    def step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        model.train()
        x, y = batch
        x = x.to(dev).float()
        y = y.to(dev).long()
        if max_shift > 0:
            x = shift_augment(x.flatten(1), image_shape, max_shift)  # type: ignore[arg-type]
        engine.state.output = out = {"image": x, "label": y}
        with precision.autocast():
            logits = model(x)
        out["pred"] = logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = loss_fn(logits.float(), y)
        out["loss"] = loss.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        guard.record(engine, precision.step(optimizer, loss=loss), scaled=precision.scaler is not None)
        out["pred"] = logits.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out

    return _engine(step, precision, guard)


# ------------------------------------------------------------------------------------------- bundle wiring helpers
def create_trainer(method: str, network: nn.Module, optimizer: torch.optim.Optimizer, **ff_kwargs: Any) -> Engine:
    """:func:`create_ff_trainer` for ``method: ff``, :func:`create_backprop_trainer` (same batches, augmentation and
    ``amp``, ``amp_dtype``) for ``method: backprop``."""
    if method == "ff":
        return create_ff_trainer(network, optimizer, **ff_kwargs)  # type: ignore[arg-type]
    keep = {k: ff_kwargs[k] for k in ("image_shape", "max_shift", "amp", "amp_dtype", "max_skipped_steps")
            if k in ff_kwargs}
    return create_backprop_trainer(network, optimizer, **keep)


def max_epochs_for(method: str, schedule: str, epochs: int, n_layers: int) -> int:
    """Engine epochs: ``epochs`` per layer for greedy FF, ``epochs`` otherwise."""
    return epochs * n_layers if method == "ff" and schedule == "greedy" else epochs


def ff_splits(
    datalist: str,
    num_classes: int,
    task: str,
    val_source: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Training and model-selection items; the test split is never touched here.

    ``val_source`` (config key):
        - ``datalist``: the datalist's ``validation`` split (data_prep carves it from the training pool),
        - ``carve``: a seeded, stratified ``val_fraction`` of the training split,
        - ``auto``: ``datalist`` when that split is non-empty, else ``carve``,
        - ``none``: no model selection: train on all training items for a fixed number of epochs.
    """
    from ffcl_monai.data.datalist import load_datalist

    train = load_datalist(datalist, "training", num_classes, task)
    if val_source not in ("auto", "datalist", "carve", "none"):
        raise ValueError(f"unknown `val_source` {val_source!r}; use auto, datalist, carve or none.")
    if val_source == "none":
        return {"training": train, "validation": []}
    if val_source in ("auto", "datalist"):
        content = json.loads(Path(datalist).read_text())
        if content.get("validation"):
            return {"training": train, "validation": load_datalist(datalist, "validation", num_classes, task)}
        if val_source == "datalist":
            raise ValueError(f"datalist {datalist} has no validation split; set `val_source: carve` (or auto).")
    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1) to carve a validation split, got {val_fraction}.")
    from sklearn.model_selection import train_test_split

    labels = [int(d["label"]) for d in train]
    tr, va = train_test_split(list(range(len(train))), test_size=val_fraction, stratify=labels, random_state=seed)
    return {"training": [train[i] for i in sorted(tr)], "validation": [train[i] for i in sorted(va)]}


def dataset_tensors(
    dataset: Any, device: str | torch.device = "cpu", allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack a (cached) MONAI dataset of ``{"image", "label"}`` dicts into ``(N, D)`` float images and ``(N,)``
    labels on ``device``, once, so that every FF epoch is pure tensor work. An empty or absent (disabled) dataset
    gives ``None`` when ``allow_empty`` (the optional validation split), an error otherwise."""
    if dataset is None or len(dataset) == 0:
        if allow_empty:
            return None
        raise ValueError("empty dataset: no images to train or evaluate on (check the datalist split).")
    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        xs.append(torch.as_tensor(item["image"]).float().reshape(-1))
        ys.append(torch.as_tensor(item["label"]).long().reshape(()))
    return torch.stack(xs).to(device), torch.stack(ys).to(device)


def attach_handlers(engine: Engine, handlers: Sequence[Any]) -> Engine:
    """Attach handlers (anything with ``attach(engine)``) in order; ``None`` entries (disabled) are skipped."""
    for h in handlers:
        if h is not None:
            h.attach(engine)
    return engine


def finish_training(network: nn.Module, ckpt_path: str, use_best: bool) -> nn.Module:
    """After training: load the best-on-validation checkpoint (``use_best``) or save the final weights there."""
    path = Path(ckpt_path)
    if use_best and path.is_file():
        state = safe_load(path)
        network.load_state_dict(state.get("model", state))
        logger.info("loaded the best-on-validation weights from %s", path)
    else:
        atomic_save({"model": network.state_dict()}, path)
    return network


def eval_network(
    prediction: str,
    network: nn.Module,
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int = 30,
    lr: float = 1e-2,
    skip_first: bool = False,
    ckpt_dir: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """The module that scores test images: the FF net itself (``prediction: goodness``), a linear read-out trained
    on its frozen neutral-label activations (``prediction: linear``), or the MLP baseline unchanged."""
    if not isinstance(network, FFNet) or prediction == "goodness":
        return network
    if prediction != "linear":
        raise ValueError(f"unknown `prediction` {prediction!r}; use goodness or linear.")
    if tensors is None:
        raise ValueError("`prediction: linear` needs the training tensors to fit the read-out.")
    readout = train_linear_readout(network, tensors[0], tensors[1], epochs=epochs, lr=lr, skip_first=skip_first, seed=seed)
    if ckpt_dir:
        atomic_save({"model": readout.head.state_dict()}, Path(ckpt_dir) / "readout.pt")
    return readout
