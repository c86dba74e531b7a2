"""Where does the classifier look? Grad-CAM / Grad-CAM++ saliency maps (MONAI ``monai.visualize``), 2D and 3D.

Three users:

- the **evaluate** workflow (:class:`SaliencyReport`): a fixed-size, seeded sample of every outcome (TP / FP / FN / TN
  for binary tasks) drawn as one grid, ``gradcam_grid.png`` (+ ``gradcam_grid.json``), logged to the evaluation's
  MLflow run;
- the **inference** workflow (:class:`SaliencyWriter`, ``save_saliency: true``): one ``.npy`` map and one PNG overlay
  per image, linked from ``inference.csv``;
- the **MONAI Label** app (:func:`saliency_reply`): the map (numbers and an RGBA heat-map PNG, never image pixels) in
  the ``/infer`` JSON reply when the request asks for it.

Choices, and why:

- **Target layer.** :func:`target_layer_candidates` names the candidate blocks of each backbone, deepest first:
  ResNet ``layer4, layer3, layer2, layer1`` (``backbone.blocks.4 .. 1``); DenseNet-121 ``dense4`` (denseblock4 ->
  norm5 -> ReLU, ``backbone.blocks.4``), then the dense blocks 3, 2, 1 before their transitions
  (``backbone.blocks.3.0`` ...). :func:`default_target_layer` takes the deepest one whose feature map has at least
  :data:`MIN_CAM_SIZE` (7) cells along every axis at the configured ``image_size``, the grid Grad-CAM was made with
  (ResNet layer4 at 224 px). So layer4 at 224 px, layer2 (8x8) at the 64 px default, where layer4 is 2x2, and
  layer1 (7x7x7) at the 28^3 3D default, where layer4 is 1x1x1 and its CAM a constant. A coarser grid cannot say
  lung from border: on synthetic data a 5x5 grid put the peak half a cell beside the evidence for 7 of 10 images of
  one training seed, a 10x10 grid inside it for all (tests/test_saliency.py). ``saliency_layer`` names any module.
- **Which class.** Each map explains the predicted class (single-label) or the row's label (multi-label); the title
  and the JSON say which, with its probability.
- **Scale.** Maps are ReLU-ed Grad-CAM, linearly upsampled to the input's spatial shape and divided by their
  maximum: 1 = the strongest evidence in this image, 0 = none. (MONAI's default post-processing maps max -> 0 and
  min -> 1, which reads backwards on an overlay.) A map with no positive evidence stays 0.
- **One image at a time, on a private copy of the network.** MONAI's ``ModelWithHooks`` indexes the class score with
  a per-sample tensor as ``logits[:, idx]``, which mixes the samples of a batch, and Grad-CAM++ multiplies by
  ``exp(score)`` broadcast along the wrong axis for batches > 1 (and overflows for logits above ~88). Maps are
  therefore computed per image, from logits shifted by their (detached) maximum, which changes no gradient. Its
  hooks cannot be removed, so they go on a deep copy; the evaluated or served network is never touched.
- **No identifiers.** Titles show outcome, classes and probability, never file names (file names can carry patient
  names); per-image maps are numbered; the grid's JSON names ``predictions.csv`` rows, not files.
- **Display.** MONAI loads PNG/JPEG/DICOM pixels as (x, y), the transpose of the numpy (row, column) array; overlays
  are transposed back so that they look like the image. 3D: the middle slice along the last axis (axial for NIfTI),
  with the second axis pointing up.
"""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ffcl_monai.data.distributed import unwrap_module
from ffcl_monai.networks.backbones import RESNET_LAYOUTS
from ffcl_monai.networks.checkpoints import atomic_write_text

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp")
#: A default target layer has at least this many cells along every spatial axis (Grad-CAM's 7x7 at 224 px).
MIN_CAM_SIZE = 7
#: The longest axis of a map in a MONAI Label reply (2D, 3D); larger inputs are average-pooled down to it.
REPLY_MAX_SIZE = {2: 64, 3: 32}
OVERLAY_ALPHA = 0.5

_RESNET_LAYERS = ["backbone.blocks.4", "backbone.blocks.3", "backbone.blocks.2", "backbone.blocks.1"]
_DENSENET_LAYERS = ["backbone.blocks.4", "backbone.blocks.3.0", "backbone.blocks.2.0", "backbone.blocks.1.0"]


# ----------------------------------------------------------------------------------------------------------------
# target layer
# ----------------------------------------------------------------------------------------------------------------
def target_layer_candidates(backbone: str) -> list[str]:
    """Grad-CAM target layers of a :class:`~ffcl_monai.networks.classifier.Classifier` backbone, deepest first.

    ResNet-10/18/34/50: the residual stages layer4 .. layer1. DenseNet-121: dense4 (denseblock4 -> norm5 -> ReLU),
    then denseblock3, 2, 1 (before their transitions, which halve the resolution).
    """
    if backbone in RESNET_LAYOUTS:
        return list(_RESNET_LAYERS)
    if backbone == "densenet121":
        return list(_DENSENET_LAYERS)
    raise ValueError(f"no default Grad-CAM layer for backbone {backbone!r}; set `saliency_layer` to a module name "
                     "(python -c \"print([n for n, _ in net.named_modules()])\" lists them).")


def _device(network: nn.Module) -> torch.device:
    p = next(network.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _in_channels(network: nn.Module) -> int:
    backbone = getattr(network, "backbone", None)
    if backbone is not None and hasattr(backbone, "in_channels"):
        return int(backbone.in_channels)
    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    raise ValueError("cannot tell the network's input channels")


def feature_shapes(
    network: nn.Module, spatial_size: Sequence[int], layers: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Spatial shape of each named layer's output for one input of ``spatial_size`` (a dry run, eval mode, no grad)."""
    network = unwrap_module(network)
    modules = dict(network.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        return lambda _module, _inputs, out: shapes.__setitem__(name, tuple(out.shape[2:]))

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers if name in modules]
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(torch.zeros(1, _in_channels(network), *[int(s) for s in spatial_size], device=_device(network)))
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    return shapes


def default_target_layer(network: nn.Module, spatial_size: Sequence[int], min_size: int = MIN_CAM_SIZE) -> str:
    """The deepest candidate layer (:func:`target_layer_candidates`) whose feature map has at least ``min_size``
    cells along every axis for inputs of ``spatial_size``; the shallowest candidate if none has."""
    network = unwrap_module(network)
    backbone = getattr(getattr(network, "backbone", None), "name", None)
    if backbone is None:
        raise ValueError("default Grad-CAM layers are defined for ffcl_monai Classifier networks; "
                         "set `saliency_layer`.")
    candidates = target_layer_candidates(backbone)
    shapes = feature_shapes(network, spatial_size, candidates)
    for name in candidates:
        if name in shapes and min(shapes[name]) >= min_size:
            return name
    return candidates[-1]


# ----------------------------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------------------------
class _ShiftedLogits(nn.Module):
    """Logits minus their detached maximum: the same gradients, and Grad-CAM++'s ``exp(score)`` cannot overflow."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits - logits.detach().amax(dim=1, keepdim=True)


def _scale_by_max(x: torch.Tensor) -> torch.Tensor:
    """Per-map division by the maximum (0 stays 0: no evidence is not stretched into some)."""
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    peak = x.flatten(1).amax(dim=1).view(-1, *[1] * (x.ndim - 1))
    return torch.where(peak > 1e-12, x / peak.clamp_min(1e-12), torch.zeros_like(x))


class SaliencyMapper:
    """Grad-CAM (or Grad-CAM++) maps of a classifier, at the input's spatial shape, scaled to [0, 1].

    Args:
        network: the classifier (left untouched: hooks go on a private deep copy, made once).
        spatial_size: the input's spatial shape (``image_size``), used to choose the default layer.
        method: ``gradcam`` or ``gradcampp``.
        layer: a module name of ``network`` (``saliency_layer``); None = :func:`default_target_layer`.
    """

    def __init__(self, network: nn.Module, spatial_size: Sequence[int], method: str = "gradcam",
                 layer: str | None = None) -> None:
        from monai.visualize import GradCAM, GradCAMpp

        check_method(method)
        net = unwrap_module(network)
        layer = as_layer(layer)
        check_layer(net, layer)
        self.method = method
        self.layer = layer or default_target_layer(net, spatial_size)
        self.net = copy.deepcopy(net).eval()
        self.net.requires_grad_(False)  # gradients flow to the input only: no parameter .grad is kept
        self.device = _device(self.net)
        cam_class = GradCAMpp if method == "gradcampp" else GradCAM
        self._cam = cam_class(nn_module=_ShiftedLogits(self.net), target_layers=f"net.{self.layer}",
                              postprocessing=_scale_by_max)

    def __call__(self, images: torch.Tensor, class_idx: Sequence[int] | None = None) -> np.ndarray:
        """Maps for ``images`` (B, C, *spatial) -> float32 array (B, *spatial) in [0, 1].

        ``class_idx``: the class each map explains (default: the predicted class).
        """
        out = []
        with torch.enable_grad():
            for i in range(len(images)):
                x = torch.as_tensor(images[i : i + 1]).detach().to(self.device, torch.float32).clone()
                x.requires_grad_(True)  # the gradient reaches the target layer even with a frozen backbone
                c = None if class_idx is None else int(class_idx[i])
                m = self._cam(x, class_idx=c)
                out.append(m[0, 0].detach().float().cpu().numpy())
        return np.stack(out).astype(np.float32)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0", ""}


def as_bool(value: Any, key: str) -> bool:
    """A config flag: a bool, 0/1, or the strings the CLI passes through (``--saliency False`` arrives as 'false')."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"`{key}` must be true or false, got {value!r}.")


def as_layer(layer: Any) -> str | None:
    """``saliency_layer``: a module name, or None ('null' / 'none' / '' from the CLI) for the default."""
    if layer is None or (isinstance(layer, str) and layer.strip().lower() in ("", "null", "none")):
        return None
    return str(layer)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"saliency_method must be one of {list(METHODS)}, got {method!r}.")
    return method


def check_layer(network: nn.Module, layer: str | None) -> None:
    if layer is None:
        return
    names = dict(unwrap_module(network).named_modules())
    if layer not in names:
        backbone = getattr(getattr(unwrap_module(network), "backbone", None), "name", None)
        hint = f"; defaults for {backbone}: {target_layer_candidates(backbone)}" if backbone else ""
        raise ValueError(f"saliency_layer {layer!r} is not a module of the network{hint}.")


# ----------------------------------------------------------------------------------------------------------------
# display
# ----------------------------------------------------------------------------------------------------------------
def display_slice(x: Any, channel_first: bool) -> np.ndarray:
    """A (C, *spatial) image (``channel_first``) or a (*spatial) map as the 2D array to show (rows, columns).

    2D: channel 0 transposed (MONAI's (x, y) back to the file's rows and columns). 3D: the middle slice along the
    last axis, transposed and flipped so that the second axis points up.
    """
    a = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    if channel_first:
        a = a[0]
    if a.ndim == 3:
        return np.flipud(a[:, :, a.shape[2] // 2].T)
    return a.T


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if np.isfinite(hi - lo) and hi - lo > 1e-8 else np.zeros_like(a)


def overlay_rgb(image2d: np.ndarray, cam2d: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB: the image in grey, the map in the ``jet`` colour map blended with opacity ``alpha * map``."""
    import matplotlib

    grey = _unit(np.asarray(image2d, dtype=np.float32))
    cam = np.clip(np.nan_to_num(np.asarray(cam2d, dtype=np.float32)), 0, 1)
    colour = matplotlib.colormaps["jet"](cam)[..., :3]
    a = (alpha * cam)[..., None]
    rgb = (1 - a) * grey[..., None] + a * colour
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def heatmap_rgba(cam2d: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGBA of the map alone: ``jet`` colours, opacity ``alpha * map``. Alpha-composited over the image it gives
    :func:`overlay_rgb`; it holds no pixel of the image."""
    import matplotlib

    cam = np.clip(np.nan_to_num(np.asarray(cam2d, dtype=np.float32)), 0, 1)
    rgba = matplotlib.colormaps["jet"](cam)
    rgba[..., 3] = alpha * cam
    return (rgba * 255).round().astype(np.uint8)


def _png(pixels: np.ndarray, min_side: int) -> bytes:
    from PIL import Image

    scale = max(1, int(np.ceil(min_side / max(1, min(pixels.shape[:2])))))
    img = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(image: Any, cam: Any, alpha: float = OVERLAY_ALPHA, min_side: int = 256) -> bytes:
    """PNG bytes of :func:`overlay_rgb` for a (C, *spatial) image and its map, enlarged (nearest) to ``min_side``."""
    return _png(overlay_rgb(display_slice(image, True), display_slice(cam, False), alpha), min_side)


def heatmap_png(cam: Any, alpha: float = OVERLAY_ALPHA, min_side: int = 256) -> bytes:
    """PNG bytes of :func:`heatmap_rgba` for a (*spatial) map, upright as :func:`display_slice` shows the image."""
    return _png(heatmap_rgba(display_slice(cam, False), alpha), min_side)


# ----------------------------------------------------------------------------------------------------------------
# sampling by outcome
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class OutcomeRow:
    """One row of the grid: an outcome, how many test images have it, and the sampled ones."""

    name: str
    total: int
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    cam_classes: list[int] = field(default_factory=list)


def select_outcomes(probs: np.ndarray, labels: np.ndarray, task: str, class_names: Sequence[str], per_outcome: int,
                    seed: int = 0) -> list[OutcomeRow]:
    """A fixed-size, seeded sample of test images per outcome.

    - binary (two classes): TP, FP, FN, TN of the positive class (index 1), predicted = argmax, as predictions.csv;
    - multiclass: per true class, ``<class> correct`` and ``<class> wrong``;
    - multilabel: per label, ``<label> TP``, ``<label> FP``, ``<label> FN`` at probability 0.5 (-1 labels ignored).

    Each row holds ``min(per_outcome, total)`` indices drawn without replacement by a generator seeded with
    ``(seed, row number)``, and the class each map explains: predicted class (single-label) or the label (multilabel).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    masks: list[tuple[str, np.ndarray, np.ndarray]] = []  # name, mask, cam class per image
    if task == "multilabel":
        for j, name in enumerate(class_names):
            y, p = labels[:, j], probs[:, j] >= 0.5
            cam = np.full(len(y), j)
            masks += [(f"{name} TP", (y == 1) & p, cam), (f"{name} FP", (y == 0) & p, cam),
                      (f"{name} FN", (y == 1) & ~p, cam)]
    else:
        labels = labels.reshape(-1).astype(int)
        if probs.shape[1] == 1:  # a single sigmoid output
            pred = (probs[:, 0] >= 0.5).astype(int)
            cam = np.zeros(len(pred), int)
        else:
            pred = probs.argmax(1)
            cam = pred
        if task == "binary" and probs.shape[1] <= 2:
            masks = [("TP", (labels == 1) & (pred == 1), cam), ("FP", (labels == 0) & (pred == 1), cam),
                     ("FN", (labels == 1) & (pred == 0), cam), ("TN", (labels == 0) & (pred == 0), cam)]
        else:
            for c, name in enumerate(class_names):
                masks += [(f"{name} correct", (labels == c) & (pred == c), cam),
                          (f"{name} wrong", (labels == c) & (pred != c), cam)]
    rows = []
    for r, (name, mask, cam) in enumerate(masks):
        idx = np.flatnonzero(mask)
        k = min(int(per_outcome), len(idx))
        chosen = np.sort(np.random.default_rng([int(seed), r]).choice(idx, size=k, replace=False)) if k else idx[:0]
        rows.append(OutcomeRow(name, int(len(idx)), chosen, [int(cam[i]) for i in chosen]))
    return rows


def _cell_title(task: str, class_names: Sequence[str], label: Any, prob: np.ndarray, cam_class: int) -> str:
    if task == "multilabel":
        name = class_names[cam_class]
        return (f"{name}: true {int(np.asarray(label)[cam_class])} / pred {int(prob[cam_class] >= 0.5)}\n"
                f"p({name})={prob[cam_class]:.2f}")
    pred = int(prob.argmax()) if len(prob) > 1 else int(prob[0] >= 0.5)
    names = list(class_names)
    return f"true {names[int(label)]} / pred {names[pred]}\np({names[cam_class]})={prob[cam_class]:.2f}"


def plot_saliency_grid(rows: Sequence[OutcomeRow], images: dict[int, torch.Tensor], maps: dict[int, np.ndarray],
                       probs: np.ndarray, labels: np.ndarray, task: str, class_names: Sequence[str],
                       per_outcome: int, path: str | os.PathLike, title: str, alpha: float = OVERLAY_ALPHA) -> Path:
    """One row per outcome, ``per_outcome`` columns: image in grey, map overlaid, outcome and scores as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(1, int(per_outcome))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.1 * ncols + 0.6, 2.3 * len(rows) + 0.5), dpi=110,
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row.indices):
                i = int(row.indices[c])
                ax.imshow(overlay_rgb(display_slice(images[i], True), display_slice(maps[i], False), alpha),
                          interpolation="nearest")
                ax.set_title(_cell_title(task, class_names, labels[i], probs[i], row.cam_classes[c]), fontsize=7)
            else:
                for s in ax.spines.values():
                    s.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, "no cases", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(f"{row.name}\n(n={row.total})", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# engine handlers
# ----------------------------------------------------------------------------------------------------------------
def _outputs(engine: Engine, key: str) -> torch.Tensor | None:
    out = engine.state.output
    if isinstance(out, list):  # MONAI evaluators decollate the batch
        if not out or out[0].get(key) is None:
            return None
        return torch.stack([torch.as_tensor(o[key]) for o in out])
    v = out.get(key) if isinstance(out, dict) else None
    return None if v is None else torch.as_tensor(v)


class _GradCAMHandler:
    """What the evaluate and inference saliency handlers share: the checked settings and the event wiring
    (``_reset`` at STARTED, ``_collect`` per iteration, ``_complete`` at COMPLETED; nothing when disabled)."""

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, class_names: Sequence[str],
                 image_size: Sequence[int], method: str, layer: str | None, enabled: Any, enabled_key: str,
                 alpha: float) -> None:
        self.enabled = as_bool(enabled, enabled_key)
        self.network = network
        self.dir = Path(output_dir)
        self.class_names = list(class_names)
        self.image_size = list(image_size)
        self.method = check_method(method) if self.enabled else method
        self.layer = as_layer(layer)
        if self.enabled:
            check_layer(network, self.layer)
        self.alpha = alpha

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        raise NotImplementedError

    def _complete(self, engine: Engine) -> None:
        raise NotImplementedError


class SaliencyReport(_GradCAMHandler):
    """Evaluate handler: ``gradcam_grid.png`` of a seeded sample per outcome (:func:`select_outcomes`), plus
    ``gradcam_grid.json`` (rows, counts, classes, probabilities, ``predictions.csv`` row numbers; no file names),
    logged as artifacts to the MLflow run of ``report`` (list this handler after it).

    Args:
        dataset: the evaluated dataset (same order as the loader); sampled images are read from it again.
        network: the evaluated classifier.
        output_dir: where the files go.
        task, class_names, image_size: as in the config.
        report: the :class:`~ffcl_monai.handlers.reports.TestReport` whose MLflow run receives the files.
        method, per_outcome, layer, seed: ``saliency_method``, ``saliency_per_outcome``, ``saliency_layer``, ``seed``.
        enabled: ``saliency``; false attaches nothing.
    """

    def __init__(self, dataset: Any, network: nn.Module, output_dir: str | os.PathLike, task: str,
                 class_names: Sequence[str], image_size: Sequence[int], report: Any = None, method: str = "gradcam",
                 per_outcome: int = 4, layer: str | None = None, seed: int = 0, enabled: bool = True,
                 filename: str = "gradcam_grid.png", alpha: float = OVERLAY_ALPHA) -> None:
        super().__init__(network, output_dir, class_names, image_size, method, layer, enabled, "saliency", alpha)
        self.dataset = dataset
        self.task = task
        self.report = report
        self.per_outcome = int(per_outcome)
        if self.enabled and self.per_outcome < 1:
            raise ValueError(f"saliency_per_outcome must be >= 1, got {per_outcome!r}; use `--saliency False` to skip.")
        self.seed = seed
        self.path = self.dir / filename
        self.files: list[Path] = []

    def _reset(self, engine: Engine) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        pred, label = _outputs(engine, "pred"), _outputs(engine, "label")
        if pred is None or label is None:
            raise ValueError("Grad-CAM by outcome needs labels; use the inference workflow's save_saliency instead.")
        self._logits.append(pred.detach().double().cpu())
        self._labels.append(label.detach().cpu())

    def _complete(self, engine: Engine) -> None:
        try:
            self.files = self.write()
        except Exception as e:  # a plotting problem must not cost the metrics, which are already written
            logger.warning("could not write the Grad-CAM grid %s: %s: %s", self.path, type(e).__name__, e)
            warnings.warn(f"Grad-CAM grid not written: {type(e).__name__}: {e}")
            return
        self._log_mlflow()

    def write(self) -> list[Path]:
        from ffcl_monai.handlers.metrics import probabilities

        logits = torch.cat(self._logits)
        probs = probabilities(logits, self.task).numpy()
        labels = torch.cat(self._labels).numpy()
        rows = select_outcomes(probs, labels, self.task, self.class_names, self.per_outcome, self.seed)
        wanted = sorted({int(i) for r in rows for i in r.indices})
        mapper = SaliencyMapper(self.network, self.image_size, self.method, self.layer)
        images = {i: torch.as_tensor(self.dataset[i]["image"]) for i in wanted}
        maps: dict[int, np.ndarray] = {}
        for row in rows:
            for i, c in zip(row.indices, row.cam_classes):
                if int(i) not in maps:
                    maps[int(i)] = mapper(images[int(i)][None], [c])[0]
        explains = "the label of the row" if self.task == "multilabel" else "the predicted class"
        title = (f"{'Grad-CAM++' if self.method == 'gradcampp' else 'Grad-CAM'} of {explains} at {mapper.layer}; "
                 f"up to {self.per_outcome} random test images per outcome (seed {self.seed})")
        grid = plot_saliency_grid(rows, images, maps, probs, labels, self.task, self.class_names, self.per_outcome,
                                  self.path, title, self.alpha)
        meta = {
            "method": self.method, "layer": mapper.layer, "per_outcome": self.per_outcome, "seed": self.seed,
            "explains": explains, "n": int(len(probs)),
            "peak_axes": "MONAI array order of the preprocessed image: x, y[, z] (2D files: column, row)",
            "rows": [
                {"outcome": r.name, "total": r.total, "shown": [
                    {"predictions_row": int(i) + 1, "label": np.asarray(labels[i]).tolist(),
                     "cam_class": self.class_names[c], "probability": round(float(probs[i][c]), 6),
                     "peak": [int(v) for v in np.unravel_index(int(np.argmax(maps[int(i)])), maps[int(i)].shape)]}
                    for i, c in zip(r.indices, r.cam_classes)]}
                for r in rows
            ],
        }
        sidecar = atomic_write_text(self.path.with_suffix(".json"), json.dumps(meta, indent=2))
        print(f"Grad-CAM grid ({self.method}, layer {mapper.layer}): {grid}", flush=True)
        return [grid, sidecar]

    def _log_mlflow(self) -> None:
        run_id = getattr(self.report, "run_id", None)
        uri = getattr(self.report, "tracking_uri", None)
        if not (run_id and uri):
            return
        try:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=uri)
            for f in self.files:
                client.log_artifact(run_id, str(f))
        except Exception as e:
            from ffcl_monai.redaction import redact_uri

            warnings.warn(f"MLflow Grad-CAM artifact logging failed ({type(e).__name__}: {redact_uri(str(e))}); "
                          "the files are in output_dir.")


class SaliencyWriter(_GradCAMHandler):
    """Inference handler (``save_saliency: true``): for every image, ``saliency/NNNNNN.npy`` (float32 map at the
    model input's shape, values 0..1) and ``saliency/NNNNNN.png`` (overlay), numbered in ``inference.csv`` order; then
    adds the columns ``saliency``, ``saliency_png`` (paths relative to ``output_dir``) and ``saliency_class`` (the
    class the map explains: the highest-probability one) to ``inference.csv`` and ``inference.json``.

    List it after :class:`~ffcl_monai.handlers.reports.InferenceWriter`, whose files it extends.
    """

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, class_names: Sequence[str],
                 image_size: Sequence[int], method: str = "gradcam", layer: str | None = None, enabled: bool = True,
                 folder: str = "saliency", alpha: float = OVERLAY_ALPHA) -> None:
        super().__init__(network, output_dir, class_names, image_size, method, layer, enabled, "save_saliency", alpha)
        self.folder = folder

    def _reset(self, engine: Engine) -> None:
        self._rows: list[tuple[str, str, str]] = []
        self._mapper: SaliencyMapper | None = None

    def _collect(self, engine: Engine) -> None:
        images = _outputs(engine, "image")
        if images is None:
            images = torch.as_tensor(engine.state.batch["image"])  # type: ignore[index]
        probs = _outputs(engine, "pred")
        if self._mapper is None:
            self._mapper = SaliencyMapper(self.network, self.image_size, self.method, self.layer)
        classes = [int(c) for c in probs.float().argmax(dim=1)]  # postprocessing already applied softmax/sigmoid
        maps = self._mapper(images, classes)
        out = self.dir / self.folder
        out.mkdir(parents=True, exist_ok=True)
        for img, m, c in zip(images, maps, classes):
            n = len(self._rows)
            npy, png = out / f"{n:06d}.npy", out / f"{n:06d}.png"
            tmp = out / f".{n:06d}.{os.getpid()}.tmp.npy"
            np.save(tmp, m.astype(np.float32))
            os.replace(tmp, npy)
            tmp = out / f".{n:06d}.{os.getpid()}.tmp.png"
            tmp.write_bytes(overlay_png(img, m, self.alpha))
            os.replace(tmp, png)
            self._rows.append((f"{self.folder}/{npy.name}", f"{self.folder}/{png.name}", self.class_names[c]))

    def _complete(self, engine: Engine) -> None:
        csv_path, json_path = self.dir / "inference.csv", self.dir / "inference.json"
        if not csv_path.is_file():
            raise RuntimeError(f"{csv_path} does not exist: list SaliencyWriter after InferenceWriter in `handlers`.")
        rows = list(csv.reader(io.StringIO(csv_path.read_text(), newline="")))
        if len(rows) - 1 != len(self._rows):
            raise RuntimeError(f"{len(self._rows)} saliency maps for {len(rows) - 1} rows of {csv_path}.")
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow([*rows[0], "saliency", "saliency_png", "saliency_class"])
        w.writerows([*r, *s] for r, s in zip(rows[1:], self._rows))
        atomic_write_text(csv_path, buf.getvalue())
        if json_path.is_file():
            items = json.loads(json_path.read_text())
            for item, (npy, png, c) in zip(items, self._rows):
                item.update({"saliency": npy, "saliency_png": png, "saliency_class": c})
            atomic_write_text(json_path, json.dumps(items, indent=2))
        print(f"{self.method} saliency maps for {len(self._rows)} image(s): {self.dir / self.folder}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# MONAI Label
# ----------------------------------------------------------------------------------------------------------------
def reply_shape(shape: Sequence[int]) -> list[int]:
    """Shape of the map in a MONAI Label reply: the input shape, scaled down (aspect kept) so that its longest axis
    is at most :data:`REPLY_MAX_SIZE` (64 in 2D, 32 in 3D)."""
    shape = [int(s) for s in shape]
    cap = REPLY_MAX_SIZE.get(len(shape), 64)
    if max(shape) <= cap:
        return shape
    f = cap / max(shape)
    return [max(1, int(round(s * f))) for s in shape]


def saliency_reply(network: nn.Module, image: torch.Tensor, class_idx: int, class_names: Sequence[str],
                   method: str = "gradcam", layer: str | None = None) -> dict[str, Any]:
    """The ``saliency`` entry of a MONAI Label ``/infer`` reply for one preprocessed image (C, *spatial).

    ``map`` is a nested list of the map (0..1, 4 decimals) in MONAI's axis order of the preprocessed image (x, y[, z]:
    for PNG/JPEG the transpose of the pixel rows and columns), of shape ``shape`` (:func:`reply_shape` of
    ``input_shape``); ``heatmap_png`` a base64 RGBA PNG of the map alone, upright (3D: middle slice of the last axis),
    to be alpha-composited over the client's view of the image. The reply carries no pixel of the image: whatever
    image a request manages to name, the answer is class scores and a coarse map.
    """
    image = torch.as_tensor(image)
    spatial = list(image.shape[1:])
    mapper = SaliencyMapper(network, spatial, method, layer)
    m = mapper(image[None], [class_idx])[0]
    shape = reply_shape(spatial)
    small = m
    if shape != spatial:
        t = torch.from_numpy(m)[None, None]
        pool = torch.nn.functional.adaptive_avg_pool2d if len(spatial) == 2 else torch.nn.functional.adaptive_avg_pool3d
        small = pool(t, shape)[0, 0].numpy()
    return {
        "method": method,
        "layer": mapper.layer,
        "class_idx": int(class_idx),
        "label": class_names[int(class_idx)],
        "input_shape": spatial,
        "shape": shape,
        "axes": "MONAI array order of the preprocessed image (x, y[, z]); 2D PNG/JPEG: transpose to get rows, columns",
        "map": np.round(small.astype(np.float64), 4).tolist(),
        "heatmap_png": base64.b64encode(heatmap_png(m)).decode("ascii"),
    }
