"""Which classifier(s) the app serves: ``--conf`` parsing.

A served model is the repo's bundle (configs + metadata) plus a checkpoint plus an optional modality overlay::

    --conf models xray                 # 2D model (default)
    --conf models xray,volume3d        # a 2D and a 3D model side by side
    --conf bundle_path /path/to/bundle # default: <repo>/bundle
    --conf model_path /path/model.pt   # checkpoint of the (first) model; e.g. <output_dir>/models/model.pt of a run
    --conf volume3d_model_path ...     # per-model checkpoint; also <name>_bundle_path, <name>_overlays
    --conf model_dir /path             # where MONAI Label training writes (default: <app>/model)

Workflow configs follow the model-zoo convention: ``train.yaml`` and ``inference.yaml`` each stand alone, followed
by the model's overlays (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

APP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = APP_DIR.parent
DEFAULT_BUNDLE = REPO_ROOT / "bundle"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Defaults for a model name: modality overlay(s) and checkpoint file name under ``<bundle>/models``."""

    dimension: int
    overlays: tuple[str, ...]
    checkpoint: str
    description: str


PRESETS: dict[str, Preset] = {
    "xray": Preset(2, (), "model.pt", "2D classifier (PNG/JPEG/DICOM images)"),
    "volume3d": Preset(3, ("3d.yaml",), "model_3d.pt", "3D classifier (NIfTI/DICOM volumes)"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the infer and train tasks need to know about one served model."""

    name: str
    bundle_path: Path
    overlays: tuple[str, ...]
    checkpoint: Path
    checkpoint_explicit: bool
    dimension: int
    train_dir: Path
    description: str

    def config_files(self, workflow: str) -> list[Path]:
        """``<workflow>.yaml|json`` (standalone, model-zoo style) + overlays, in merge order (later wins)."""
        cfg = self.bundle_path / "configs"
        files: list[Path] = []
        main = next((cfg / f"{workflow}{ext}" for ext in (".yaml", ".json") if (cfg / f"{workflow}{ext}").exists()), None)
        if main is None:
            raise FileNotFoundError(f"model {self.name!r}: no {workflow}.yaml or {workflow}.json in {cfg}")
        files.append(main)
        for overlay in self.overlays:
            path = Path(overlay) if os.path.isabs(overlay) else cfg / overlay
            if not path.exists():
                raise FileNotFoundError(f"model {self.name!r}: overlay config {path} does not exist")
            files.append(path)
        return files

    @property
    def metadata_file(self) -> Path:
        return self.bundle_path / "configs" / "metadata.json"

    @property
    def trained_checkpoint(self) -> Path:
        """Where a MONAI Label training run of this model writes its best model (``<output_dir>/models/model.pt``)."""
        return self.train_dir / "models" / "model.pt"

    def checkpoints(self) -> list[Path]:
        """Candidate checkpoints, oldest first: MONAI Label serves the last one that exists."""
        return [self.checkpoint, self.trained_checkpoint]

    def latest_checkpoint(self) -> Path | None:
        existing = [p for p in self.checkpoints() if p.exists()]
        return existing[-1] if existing else None


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_models(conf: Mapping[str, str], app_dir: str | os.PathLike = APP_DIR) -> list[ModelSpec]:
    """Turn MONAI Label's ``--conf`` key/value pairs into model specs. Raises ``ValueError`` with the fix on bad input."""
    names = _split(conf.get("models", "xray"))
    if not names:
        raise ValueError("--conf models is empty; use e.g. --conf models xray or --conf models xray,volume3d")
    unknown = [n for n in names if n not in PRESETS and f"{n}_overlays" not in conf]
    if unknown:
        raise ValueError(
            f"unknown model name(s) {unknown}; known: {sorted(PRESETS)}. A custom 2D name needs "
            f"--conf <name>_overlays '' (no overlay) or a list of overlay configs, e.g. --conf ct_overlays 3d.yaml"
        )
    model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model").expanduser().resolve()

    specs = []
    for i, name in enumerate(names):
        preset = PRESETS.get(name)
        bundle = Path(conf.get(f"{name}_bundle_path") or conf.get("bundle_path") or DEFAULT_BUNDLE).expanduser()
        bundle = bundle.resolve()
        if not (bundle / "configs" / "metadata.json").exists():
            raise ValueError(f"model {name!r}: {bundle} is not a bundle (no configs/metadata.json)")

        if f"{name}_overlays" in conf:
            overlays = tuple(_split(conf[f"{name}_overlays"]))
        else:
            overlays = preset.overlays if preset else ()
        dimension = int(conf.get(f"{name}_dimension") or (preset.dimension if preset else (3 if overlays else 2)))

        # `model_path` is the checkpoint of the first model, so `--conf model_path run/models/model.pt` just works
        explicit = conf.get(f"{name}_model_path") or (conf.get("model_path") if i == 0 else None)
        if explicit:
            checkpoint = Path(explicit).expanduser().resolve()
            if not checkpoint.is_file():
                raise ValueError(f"model {name!r}: checkpoint {checkpoint} does not exist")
        else:
            checkpoint = bundle / "models" / (preset.checkpoint if preset else f"model_{name}.pt")

        specs.append(
            ModelSpec(
                name=name,
                bundle_path=bundle,
                overlays=overlays,
                checkpoint=checkpoint,
                checkpoint_explicit=bool(explicit),
                dimension=dimension,
                train_dir=model_dir / name,
                description=preset.description if preset else f"{dimension}D classifier",
            )
        )
    return specs


def class_names(metadata: Mapping) -> dict[int, str]:
    """Class index -> name from ``network_data_format.outputs.<first>.channel_def`` (MONAI Label uses the first)."""
    outputs: Mapping = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise ValueError("metadata.json has no network_data_format.outputs")
    pred = next(iter(outputs.values()))
    channel_def = pred.get("channel_def")
    if not channel_def:
        raise ValueError("metadata.json network_data_format.outputs.<first> has no channel_def (class names)")
    return {int(k): str(v) for k, v in sorted(channel_def.items(), key=lambda kv: int(kv[0]))}


def dedupe(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]
