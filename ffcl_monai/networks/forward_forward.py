"""Forward-Forward networks (Hinton 2022; seeds 002 and 003): dense FF layers, label embedding, batched prediction.

A :class:`FFNet` is a stack of :class:`FFDense` layers. Each layer length-normalises its input, so the goodness of
layer ``l-1`` (the squared length of its output) cannot leak into layer ``l``; only the *direction* of the activity
vector is passed on (Hinton 2022, section 2.1; seed 003 section 2).

The label enters the input in one of two ways (config key ``embedding``):

- ``overlay``: the first ``m`` pixels are replaced by a one-hot code scaled to the image maximum (seeds 002/003).
- ``concat``: a one-hot code (times ``label_scale``) is appended to the flattened image, for medical images whose
  corners are not empty.

A neutral label (``1/m`` for every class) gives the label-free input for the linear read-out (:class:`LinearReadout`).
The backprop baseline of the same widths is :class:`MLP`; :func:`build_network` builds either for the ``ff`` workflow.

Fast all-label evaluation. The first layer sees ``[x_rest, s * c]`` where ``x_rest`` is the image part (the image
without the first ``m`` pixels for ``overlay``, the whole image for ``concat``), ``c`` the label code and ``s`` its
scale. Its normalised pre-activation is::

    z(x, c) = (W_rest x_rest + s W_lab c) / (||[x_rest, s c]|| / k + eps) + b,   ||[x_rest, s c]||^2 = ||x_rest||^2 + s^2 ||c||^2

so ``W_rest x_rest`` (the expensive ``D x H`` product) is computed once per image and the ``m`` label columns are
added by broadcasting. This is exact (tested against the naive path); the later layers then run as one batched
forward of shape ``(B * m, H)``. Nothing loops over labels or samples in Python.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ffcl_monai.losses.forward_forward import goodness as _goodness

__all__ = ["FFDense", "FFNet", "LinearReadout", "MLP", "build_network"]

_NORMS = ("l2", "rms")
_EMBEDDINGS = ("overlay", "concat")


class FFDense(nn.Module):
    """One Forward-Forward layer: length-normalise the input, then ``Linear`` and ``ReLU``.

    Args:
        in_features: input width.
        out_features: number of units.
        norm: ``"l2"`` divides by the L2 length (seeds 002/003: ``x / (||x|| + 1e-4)``); ``"rms"`` divides by the
            root-mean-square (length ``sqrt(in_features)``, as in loeweX/Forward-Forward), which keeps activations
            of order one at the default initialisation. Both keep only the direction of ``x``.
        eps: added to the length, as in the seeds.
    """

    def __init__(self, in_features: int, out_features: int, norm: str = "l2", eps: float = 1e-4) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"FF layer norm must be one of {_NORMS}, got {norm!r} (config key `norm`).")
        self.linear = nn.Linear(in_features, out_features)
        self.norm = norm
        self.eps = eps
        # the normalised input has length `k`: 1 for l2, sqrt(D) for rms
        self.k = 1.0 if norm == "l2" else math.sqrt(in_features)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Divide ``x`` by its length over the last dimension (scaled so that the result has length ``k``)."""
        return x / (x.norm(dim=-1, keepdim=True) / self.k + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(W normalise(x) + b)`` over the last dimension; any leading shape."""
        return F.relu(self.linear(self.normalise(x)))


class FFNet(nn.Module):
    """A stack of dense Forward-Forward layers with a label embedding.

    Args:
        in_features: flattened image size ``D`` (e.g. 784 for 28x28).
        num_classes: ``m``.
        hidden: widths of the FF layers (seeds: ``(500, 500)``; Hinton: ``(2000,) * 4``).
        embedding: ``"overlay"`` or ``"concat"`` (see module docstring).
        label_scale: multiplies the code; for ``overlay`` it multiplies the per-image maximum.
        norm: input normalisation of every layer, ``"l2"`` or ``"rms"`` (see :class:`FFDense`).
        goodness: ``"mean"`` or ``"sum"`` of squared activations.
        eps: length epsilon.
        skip_first: default for :meth:`forward`: leave the first layer out of the label score (Hinton 2022 s.3.3).

    ``forward(x)`` returns the goodness of every candidate label summed over the layers, ``(B, m)``, so that
    ``argmax`` is the FF prediction and the bundle's inferer/post-processing work unchanged. With
    ``goodness: sum`` it is divided by the number of units summed (a constant, so the argmax is unchanged) to keep
    ``softmax(scores)`` away from exact 0/1 ties, which would blunt the AUC.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (500, 500),
        embedding: str = "overlay",
        label_scale: float = 1.0,
        norm: str = "l2",
        goodness: str = "mean",
        eps: float = 1e-4,
        skip_first: bool = False,
    ) -> None:
        super().__init__()
        if embedding not in _EMBEDDINGS:
            raise ValueError(f"FF label embedding must be one of {_EMBEDDINGS}, got {embedding!r} (key `embedding`).")
        if embedding == "overlay" and in_features <= num_classes:
            raise ValueError(f"`overlay` needs more than {num_classes} input pixels; use embedding: concat.")
        if goodness not in ("mean", "sum"):
            raise ValueError(f"goodness must be 'mean' or 'sum', got {goodness!r} (config key `goodness`).")
        if len(hidden) < 1:
            raise ValueError("FF network needs at least one layer (config key `hidden`, e.g. [500, 500]).")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.embedding = embedding
        self.label_scale = float(label_scale)
        self.goodness_reduction = goodness
        self.skip_first = bool(skip_first)
        d_in = self.in_features + (self.num_classes if embedding == "concat" else 0)
        widths = [d_in, *[int(h) for h in hidden]]
        self.layers = nn.ModuleList(FFDense(a, b, norm=norm, eps=eps) for a, b in zip(widths[:-1], widths[1:]))

    # ------------------------------------------------------------------ label codes
    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int labels -> ``(B, m)`` float one-hot codes."""
        return F.one_hot(y.long(), self.num_classes).float()

    def neutral_code(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """``(B, 1, m)`` neutral codes: ``1/m`` for every class (Hinton's label-free input for the read-out)."""
        return torch.full((batch, 1, self.num_classes), 1.0 / self.num_classes, device=device)

    def all_codes(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """``(B, m, m)``: every candidate label for every sample (identity rows, broadcast, no copy)."""
        return torch.eye(self.num_classes, device=device).expand(batch, -1, -1)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image part ``x_rest`` and per-sample code scale ``s`` (``(B,)``)."""
        m = self.num_classes
        if self.embedding == "overlay":
            # seed 002 scales the code to the per-image maximum (`ops.amax(X_sample)`)
            return x[:, m:], x.amax(dim=1) * self.label_scale
        return x, torch.full((x.shape[0],), self.label_scale, device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ embedding (naive, for tests and loops)
    def embed(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Materialise the labelled inputs: ``x (B, D)``, ``codes (B, K, m)`` -> ``(B, K, D_in)``.

        This is what the seeds feed to the first layer; :meth:`first_layer` computes the same layer without it.
        """
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FFNet expects flattened inputs (B, {self.in_features}), got {tuple(x.shape)}.")
        x_rest, s = self._split(x)
        lab = s[:, None, None] * codes
        k = codes.shape[1]
        if self.embedding == "overlay":
            return torch.cat([lab, x_rest[:, None, :].expand(-1, k, -1)], dim=-1)
        return torch.cat([x_rest[:, None, :].expand(-1, k, -1), lab], dim=-1)

    # ------------------------------------------------------------------ fast first layer
    def first_layer(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """First FF layer for ``K`` label codes per image without building the ``K`` labelled images.

        Args:
            x: ``(B, D)`` flattened images.
            codes: ``(B, K, m)`` label codes (one-hot, neutral, or any mixture).

        Returns:
            ``(B, K, H1)`` activations, equal to ``layers[0](embed(x, codes))`` (see module docstring).
        """
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"FFNet expects flattened inputs (B, {self.in_features}), got {tuple(x.shape)}.")
        layer = self.layers[0]
        w, b = layer.linear.weight, layer.linear.bias
        m = self.num_classes
        if self.embedding == "overlay":
            w_lab, w_rest = w[:, :m], w[:, m:]
        else:
            w_rest, w_lab = w[:, : self.in_features], w[:, self.in_features :]
        x_rest, s = self._split(x)
        codes = codes.to(x.dtype)
        base = x_rest @ w_rest.t()  # (B, H): the only D x H product, once per image
        lab = codes @ w_lab.t()  # (B, K, H): m columns, cheap
        length = torch.sqrt(x_rest.square().sum(1)[:, None] + s[:, None].square() * codes.square().sum(-1))  # (B, K)
        denom = length / layer.k + layer.eps
        z = (base[:, None, :] + s[:, None, None] * lab) / denom[..., None] + b
        return F.relu(z)

    def activations(
        self, x: torch.Tensor, codes: torch.Tensor, factorised: bool = True, upto: int | None = None
    ) -> list[torch.Tensor]:
        """Activations of layers ``0..upto`` (all by default) for ``K`` codes per image: list of ``(B, K, H_l)``."""
        n = len(self.layers) if upto is None else upto + 1
        h = self.first_layer(x, codes) if factorised else self.layers[0](self.embed(x, codes))
        out = [h]
        for layer in self.layers[1:n]:
            h = layer(h)
            out.append(h)
        return out

    def layer_goodness(self, h: torch.Tensor) -> torch.Tensor:
        """Goodness of activations ``(..., H)`` with this net's reduction (``goodness`` key)."""
        return _goodness(h, self.goodness_reduction)

    # ------------------------------------------------------------------ prediction
    def goodness_all_labels(
        self, x: torch.Tensor, factorised: bool = True, upto: int | None = None
    ) -> torch.Tensor:
        """Goodness of every layer for every candidate label in one batched pass: ``(B, m, L)``.

        The first layer is computed once per image (:meth:`first_layer`), later layers see one ``(B * m, H)``
        batch. ``factorised=False`` materialises the ``(B, m, D_in)`` labelled inputs instead (same numbers).
        """
        acts = self.activations(x, self.all_codes(x.shape[0], x.device), factorised=factorised, upto=upto)
        return torch.stack([self.layer_goodness(h) for h in acts], dim=-1)

    @staticmethod
    def score(g: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
        """Sum goodness ``(B, m, L)`` over layers, skipping the first when asked and more than one exists."""
        if skip_first and g.shape[-1] > 1:
            g = g[..., 1:]
        return g.sum(-1)

    def forward(self, x: torch.Tensor, skip_first: bool | None = None) -> torch.Tensor:
        """Goodness score of every candidate label, ``(B, m)``: the argmax is the FF prediction (Hinton 2022 s.3.3).

        Images of any shape ``(B, ...)`` are flattened. ``skip_first=None`` uses the constructor's setting.
        """
        if x.dim() > 2:
            x = x.flatten(1)
        skip = self.skip_first if skip_first is None else skip_first
        score = self.score(self.goodness_all_labels(x), skip)
        if self.goodness_reduction == "sum":
            widths = [layer.linear.out_features for layer in self.layers]
            score = score / sum(widths[1:] if skip and len(widths) > 1 else widths)
        return score

    @torch.no_grad()
    def predict_goodness(self, x: torch.Tensor, skip_first: bool | None = None) -> torch.Tensor:
        """FF prediction: argmax over labels of the summed goodness, all labels batched. Returns ``(B,)`` labels."""
        return self.forward(x, skip_first).argmax(-1)

    @torch.no_grad()
    def predict_label_loop(self, x: torch.Tensor, skip_first: bool | None = None) -> torch.Tensor:
        """Reference implementation that loops over labels (mpezeshki ``predict``); for tests and the bench only."""
        skip_first = self.skip_first if skip_first is None else skip_first
        scores = []
        for label in range(self.num_classes):
            y = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
            h = self.embed(x, self.one_hot(y)[:, None, :])[:, 0]
            g = []
            for layer in self.layers:
                h = layer(h)
                g.append(self.layer_goodness(h))
            scores.append(self.score(torch.stack(g, -1)[:, None, :], skip_first)[:, 0])
        return torch.stack(scores, -1).argmax(-1)

    # ------------------------------------------------------------------ features for the linear read-out
    def features(self, x: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
        """Activations of the neutral-label input, concatenated over layers: ``(B, sum H_l)`` (Hinton 2022 s.3.3)."""
        acts = self.activations(x, self.neutral_code(x.shape[0], x.device))
        if skip_first and len(acts) > 1:
            acts = acts[1:]
        return torch.cat([a[:, 0] for a in acts], dim=-1)


class LinearReadout(nn.Module):
    """Softmax read-out on the neutral-label activations of a frozen :class:`FFNet` (Hinton 2022 s.3.3)."""

    def __init__(self, net: FFNet, skip_first: bool = False) -> None:
        super().__init__()
        widths = [layer.linear.out_features for layer in net.layers]
        if skip_first and len(widths) > 1:
            widths = widths[1:]
        self.net = net
        self.skip_first = skip_first
        self.head = nn.Linear(sum(widths), net.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, m)``; the FF net is not trained through this path."""
        with torch.no_grad():
            f = self.net.features(x.flatten(1).float(), self.skip_first)
        return self.head(f)


class MLP(nn.Module):
    """Backprop baseline of the same widths: ``D - hidden... - m`` with ReLU (flattened input)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (500, 500)) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(widths[-1], num_classes))
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, m)``."""
        return self.body(x.flatten(1).float())


def build_network(
    method: str,
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (500, 500),
    embedding: str = "overlay",
    label_scale: float = 1.0,
    norm: str = "rms",
    goodness: str = "sum",
    skip_first: bool = False,
    task: str = "multiclass",
) -> nn.Module:
    """The ``ff`` workflow's network: an :class:`FFNet` (``method: ff``) or the backprop :class:`MLP` baseline of
    the same widths (``method: backprop``)."""
    if task == "multilabel":
        raise ValueError("the ff workflow supports single-label tasks (binary, multiclass); `task` is multilabel.")
    if method == "ff":
        return FFNet(in_features, num_classes, hidden, embedding, label_scale, norm, goodness, skip_first=skip_first)
    if method == "backprop":
        return MLP(in_features, num_classes, hidden)
    raise ValueError(f"unknown `method` {method!r}; use ff or backprop.")
