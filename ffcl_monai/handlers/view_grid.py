"""PNG grid of the view pairs the network actually trains on (first batch), for MLflow.

Looking at the views is the quickest check of an augmentation setting: too weak and the task is trivial, too strong
and the anatomy is gone. Rows are images, the two columns their two views (middle axial slice for 3D volumes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

from ffcl_monai.data.two_view import to_display

logger = logging.getLogger(__name__)


def save_view_grid(batch: dict, path: str | os.PathLike, view_keys: tuple[str, str] = ("view1", "view2"),
                   max_pairs: int = 8) -> Path:
    """Write a (pairs x 2) grid of the two views of the first ``max_pairs`` images of ``batch`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v1, v2 = batch[view_keys[0]], batch[view_keys[1]]
    n = min(max_pairs, len(v1))
    fig, axes = plt.subplots(n, 2, figsize=(3.2, 1.6 * n), squeeze=False)
    for i in range(n):
        for j, v in enumerate((v1, v2)):
            axes[i, j].imshow(to_display(v[i]), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    axes[0, 0].set_title(view_keys[0], fontsize=8)
    axes[0, 1].set_title(view_keys[1], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class ViewGridSaver:
    """Save :func:`save_view_grid` of the first training batch once, when the first iteration completes.

    List the same path in the MLflow handler's ``artifacts``: it is uploaded when training completes.
    """

    def __init__(self, path: str | os.PathLike, view_keys: tuple[str, str] = ("view1", "view2"), max_pairs: int = 8,
                 enabled: bool = True) -> None:
        self.path = Path(path)
        self.view_keys = tuple(view_keys)
        self.max_pairs = max_pairs
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        try:
            save_view_grid(engine.state.batch, self.path, self.view_keys, self.max_pairs)  # type: ignore[arg-type]
        except Exception as e:  # a plotting problem must not stop pretraining
            logger.warning("could not save the view grid to %s: %s", self.path, e)
