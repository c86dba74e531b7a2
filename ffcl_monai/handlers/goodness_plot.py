"""PNG of the Forward-Forward goodness separation, one panel per layer.

Top row: the epoch means of positive and negative goodness of every layer (from ``engine.state.history``, written
by :func:`ffcl_monai.engines.forward_forward.create_ff_trainer`), with the threshold. Bottom row (when data are
given): histograms, on held-out images, of each layer's goodness for the true label against the best wrong label,
i.e. the margin the goodness prediction relies on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["GoodnessPlotHandler", "plot_goodness"]


def plot_goodness(
    history: list[dict[str, Any]],
    path: str | os.PathLike,
    threshold: float | None = None,
    g_true: torch.Tensor | None = None,
    g_wrong: torch.Tensor | None = None,
) -> Path:
    """Draw the goodness curves (and optional histograms) and save them as PNG at ``path``.

    Args:
        history: per-epoch dicts with ``layer{l}_g_pos`` / ``layer{l}_g_neg`` entries.
        path: output file.
        threshold: drawn as a dashed line when given.
        g_true: ``(N, L)`` goodness of the true label per layer (held-out data), optional.
        g_wrong: ``(N, L)`` goodness of the highest-scoring wrong label per layer, optional.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers/CI
    import matplotlib.pyplot as plt

    layers = sorted({int(k[5:].split("_")[0]) for h in history for k in h if k.startswith("layer") and "_g_" in k})
    n_layers = max(len(layers), g_true.shape[1] if g_true is not None else 0, 1)
    rows = 2 if g_true is not None and g_wrong is not None else 1
    fig, axes = plt.subplots(rows, n_layers, figsize=(4 * n_layers, 3.2 * rows), squeeze=False)
    for col in range(n_layers):
        ax = axes[0][col]
        li = layers[col] if col < len(layers) else col
        ep = [h["epoch"] for h in history if f"layer{li}_g_pos" in h]
        gp = [h[f"layer{li}_g_pos"] for h in history if f"layer{li}_g_pos" in h]
        gn = [h[f"layer{li}_g_neg"] for h in history if f"layer{li}_g_neg" in h]
        ax.plot(ep, gp, label="positive", color="tab:green")
        ax.plot(ep, gn, label="negative", color="tab:red")
        if threshold is not None:
            ax.axhline(threshold, ls="--", color="gray", lw=1, label="threshold")
        ax.set_title(f"layer {li}: mean goodness (train)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        if rows == 2:
            ax = axes[1][col]
            t = g_true[:, col].float().cpu().numpy()  # type: ignore[index]
            w = g_wrong[:, col].float().cpu().numpy()  # type: ignore[index]
            ax.hist(t, bins=40, alpha=0.6, color="tab:green", label="true label")
            ax.hist(w, bins=40, alpha=0.6, color="tab:red", label="best wrong label")
            ax.set_title(f"layer {li} held-out: {100 * float((t > w).mean()):.1f}% true > best wrong", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class GoodnessPlotHandler:
    """Write the goodness-separation PNG when training completes (and every ``every`` epochs if > 0).

    Attach it *before* MONAI's ``MLFlowHandler`` and pass the same path to that handler's ``artifacts`` so the PNG
    exists when MLflow uploads it at ``COMPLETED``; if an MLflow run is active in this process
    (``mlflow.active_run()``), the PNG is also logged to it directly.

    Args:
        output_path: PNG file to write.
        threshold: FF threshold drawn on the curves.
        net: the :class:`~ffcl_monai.networks.forward_forward.FFNet`; with ``data`` enables the histograms.
        data: held-out ``(x, y)`` tensors (a few hundred images are enough).
        every: also redraw every ``every`` epochs (0 = only at the end).
    """

    def __init__(
        self,
        output_path: str | os.PathLike,
        threshold: float | None = None,
        net: torch.nn.Module | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        every: int = 0,
    ) -> None:
        self.output_path = Path(output_path)
        self.threshold = threshold
        self.net = net
        self.data = data
        self.every = every

    def attach(self, engine: Engine) -> None:
        """Register on ``COMPLETED`` (and every ``every`` epochs)."""
        engine.add_event_handler(Events.COMPLETED, self)
        if self.every > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    @torch.no_grad()
    def _held_out(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.net is None or self.data is None:
            return None, None
        x, y = self.data
        dev = next(self.net.parameters()).device
        x = x[:1000].to(dev).flatten(1).float()
        y = y[:1000].to(dev).long()
        was_training = self.net.training
        self.net.eval()
        g = self.net.goodness_all_labels(x)  # (N, m, L)
        self.net.train(was_training)
        idx = torch.arange(len(y), device=dev)
        g_true = g[idx, y]
        g_wrong = g.clone()
        g_wrong[idx, y] = float("-inf")
        return g_true, g_wrong.max(dim=1).values

    def __call__(self, engine: Engine) -> None:
        """Draw from ``engine.state.history``; log to the active MLflow run if there is one."""
        history = getattr(engine.state, "history", [])
        g_true, g_wrong = self._held_out()
        path = plot_goodness(history, self.output_path, self.threshold, g_true, g_wrong)
        try:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_artifact(str(path))
        except Exception:  # pragma: no cover - plotting must never stop training
            pass
