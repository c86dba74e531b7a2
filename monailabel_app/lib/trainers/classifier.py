"""MONAI Label train task: fine-tune the classifier from per-image labels saved in the datastore.

Classification labels are one class per image, not masks. Save one with the REST API as a small JSON (or text) file::

    echo '{"label": "PNEUMONIA"}' > label.json
    curl -X PUT "http://127.0.0.1:8000/datastore/label?image=<image_id>&tag=final" -F "label=@label.json"

The value is a class name from metadata.json ``channel_def`` (case-insensitive) or its integer index. It may also be
given in the label's ``params`` (``-F 'params={"label": "PNEUMONIA"}'``) with any label file. The train task maps it to
the integer the bundle's train workflow expects and runs that workflow (``train.yaml`` + overlay)
through MONAI Label's ``BundleTrainTask`` machinery, with these overrides:

- ``datalist``: a decathlon datalist JSON (docs/conventions.md format: header + ``training``/``validation`` with
  ``{"image": path, "label": int}``) written to ``<output_dir>/datalist.json`` from the datastore, split per class.
  The bundle then loads and checks it exactly as in a command-line run. (A bundle whose ``train#dataset`` is a
  component with a ``data`` list gets ``train#dataset#data``/``validate#dataset#data`` instead, as in the stock task.)
- ``max_epochs`` / ``train#trainer#max_epochs``, ``device``, ``bundle_root``,
- ``output_dir``: ``<model_dir>/<model name>`` so the best model lands in ``<output_dir>/models/model.pt``, which the
  infer task then serves (newest existing checkpoint wins),
- ``train#handlers``: a ``CheckpointLoader`` of the currently served checkpoint is prepended when ``pretrained``.
- ``resume: false``, ``overwrite: true``: MONAI Label retrains into one folder on purpose, so every training says so
  explicitly (``ffcl_monai.workflows.ownership``: a run into a folder that holds an earlier run's results is refused
  without one of them). The task claims the folder itself before the bundle runs: the earlier training's results move
  to ``<output_dir>/.overwritten/<timestamp>/`` (nothing is deleted) and, when that training's model is the one being
  served, fine-tuning starts from its moved copy. The bundle's own claim in the same process is then a re-entrant
  one with nothing left to move. Another process training into the same folder at the same time is refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import monai.bundle
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask

from ffcl_monai.workflows.ownership import claim_output_dir, current_claim

from lib.configs import load_workflow_config
from lib.models import ModelSpec, class_names
from lib.train_request import validate_assembled_request

logger = logging.getLogger(__name__)

LABEL_KEYS = ("label", "class", "class_name")
# `_desc_` of the CheckpointLoader this task adds (MONAI ignores `_desc_` when it builds the handler)
_SERVED_LOADER = "ffcl-monai: the checkpoint served when this MONAI Label training began"


def _to_index(value: Any, names: Mapping[int, str], where: str) -> int:
    """Class name (case-insensitive) or integer index -> index, with an error that lists the valid classes."""
    by_name = {n.lower(): i for i, n in names.items()}
    if isinstance(value, bool):
        raise ValueError(f"{where}: label {value!r} is not a class")
    if isinstance(value, (int, float)) and float(value).is_integer() and int(value) in names:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in by_name:
            return by_name[text.lower()]
        if text.lstrip("-").isdigit() and int(text) in names:
            return int(text)
    raise ValueError(f"{where}: label {value!r} is not one of {dict(names)} (name or index)")


def read_class_label(label_file: Optional[str], label_info: Optional[Mapping], names: Mapping[int, str]) -> int:
    """The class index of one labelled image.

    Looks at the label file first (``.json``: ``{"label": ...}`` or a bare name/index; ``.txt``: the name/index), then
    at the label's info (``params`` given when it was saved).
    """
    if label_file and os.path.isfile(label_file):
        suffix = "".join(Path(label_file).suffixes).lower()
        if suffix.endswith(".json") or suffix.endswith(".txt"):
            text = Path(label_file).read_text(encoding="utf-8").strip()
            value: Any = text
            if suffix.endswith(".json"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{label_file}: not valid JSON ({e})") from e
            if isinstance(value, dict):
                value = next((value[k] for k in LABEL_KEYS if k in value), None)
            if value is not None and value != "":
                return _to_index(value, names, label_file)
    for k in LABEL_KEYS:
        if label_info and label_info.get(k) is not None:
            return _to_index(label_info[k], names, f"label info of {label_file}")
    raise ValueError(
        f"{label_file}: no class label found. Save classification labels as a .json file {{\"label\": \"<class>\"}} "
        f"(or .txt with the class name), or pass params {{\"label\": \"<class>\"}}; classes: {dict(names)}"
    )


class _Constants(BundleConstants):
    def configs(self) -> List[str]:
        return ["train.yaml", "train.json"]


class ClassifierTrainTask(BundleTrainTask):
    """``BundleTrainTask`` for an image-level classifier described by a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, conf: Mapping[str, str]) -> None:
        self.spec = spec  # needed by _load_bundle_config, which BundleTrainTask.__init__ calls
        self.config_files = [str(f) for f in spec.config_files("train")]
        super().__init__(str(spec.bundle_path), dict(conf), const=_Constants(), enable_tracking=False, load_strict=True)
        with open(spec.metadata_file) as fp:
            self.class_names = class_names(json.load(fp))
        self.description = f"Fine-tune {spec.name} ({spec.dimension}D) from per-image labels in the datastore"

    def _load_bundle_config(self, path: str, config: Any) -> ConfigParser:
        return load_workflow_config(self.config_files, self.spec.metadata_file, path)

    def config(self) -> Dict[str, Any]:
        """The options clients see (and send back): only keys of :data:`lib.train_request.TRAIN_FIELDS`.

        The stock list also offers a tracking URI, run id, checkpoint file name and GPU list; those are set on the
        server only (a URI may carry credentials, and MONAI Label logs every request to ``/logs``).
        """
        options = super().config()
        return {
            "device": options["device"],
            "pretrained": True,
            "max_epochs": int(self.conf.get("max_epochs", 10)),
            "val_split": 0.2,
            "multi_gpu": False,  # multi-GPU needs a multi_gpu_train config; not part of this app
        }

    def _fetch_datalist(self, request: Dict[str, Any], datastore: Datastore) -> List[Dict[str, Any]]:
        """``[{"image": path, "label": class index}]`` for every image with a final label."""
        tag = DefaultLabelTag.FINAL.value
        datalist = []
        for image_id in datastore.get_labeled_images():
            label_file = datastore.get_label_uri(image_id, tag)
            info = datastore.get_label_info(image_id, tag)
            datalist.append(
                {
                    "image": datastore.get_image_uri(image_id),
                    "label": read_class_label(label_file, info, self.class_names),
                }
            )
        if not datalist:
            raise ValueError("no labelled images in the datastore; save labels first (see monailabel_app/README.md)")
        counts = {self.class_names[i]: sum(d["label"] == i for d in datalist) for i in self.class_names}
        logger.info(f"train datalist for {self.spec.name}: {len(datalist)} images, per class {counts}")
        return datalist

    def _partition_datalist(
        self, datalist: List[Dict[str, Any]], request: Dict[str, Any], shuffle: bool = False
    ) -> tuple[List[Dict[str, Any]], Optional[List[Dict[str, Any]]]]:
        """Per-class (stratified), seeded split, so that validation sees every class whenever it can.

        The stock split takes the last ``val_split`` fraction in datastore order, which for a handful of labels is
        often a single class: ROC-AUC is then undefined and the bundle never saves a best model.
        ``val_split <= 0`` validates on the training images (only useful to get a checkpoint from very few labels).
        """
        val_split = float(request.get("val_split", 0.2))
        if val_split <= 0:
            logger.warning("val_split <= 0: validating on the training images")
            return datalist, list(datalist)
        rng = random.Random(int(request.get("seed", 0)))
        train, val = [], []
        for idx in sorted({d["label"] for d in datalist}):
            items = [d for d in datalist if d["label"] == idx]
            rng.shuffle(items)
            n_val = min(len(items) - 1, max(1, round(val_split * len(items)))) if len(items) > 1 else 0
            val += items[:n_val]
            train += items[n_val:]
        if not val:
            logger.warning("too few labels for a validation split: validating on the training images")
            val = list(train)
        logger.info(f"{len(train)} training / {len(val)} validation images (val_split={val_split})")
        return train, val

    def _write_datalist(self, train: List[Dict[str, Any]], val: List[Dict[str, Any]]) -> Path:
        """The datastore labels as a datalist in the project's format (absolute image paths)."""
        task = self.bundle_config.get("task", "binary")
        header = {
            "name": f"monailabel_{self.spec.name}",
            "description": "labels saved in the MONAI Label datastore (written by monailabel_app)",
            "task": task if isinstance(task, str) and not task.startswith("$") else "binary",
            "labels": {str(i): n for i, n in self.class_names.items()},
            "num_classes": len(self.class_names),
            "spatial_dims": self.spec.dimension,
        }
        path = self.spec.train_dir / "datalist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**header, "training": train, "validation": val}, indent=2))
        os.replace(tmp, path)
        return path

    def _start_over(self) -> Optional[Path]:
        """Claim the training folder with ``overwrite=True`` (earlier results moved aside); return the checkpoint
        served until now, at its new place when it was the earlier training's model (None: nothing served yet)."""
        served = self.spec.latest_checkpoint()
        claim_output_dir(self.spec.train_dir, resume=False, overwrite=True, kind=f"monailabel-train:{self.spec.name}")
        claim = current_claim(self.spec.train_dir)
        moved_to = claim.moved_to if claim is not None else None
        if moved_to is not None and served == self.spec.trained_checkpoint:
            served = moved_to / self.spec.trained_checkpoint.relative_to(self.spec.train_dir)
        logger.info(
            f"MONAI Label retrains {self.spec.name} into one folder, {self.spec.train_dir}: passing resume=False, "
            f"overwrite=True; earlier results "
            + (f"moved to {moved_to}" if moved_to is not None else "none")
        )
        return served

    def _load_checkpoint(self, model_pytorch: Any, pretrained: Any, train_handlers: List[Any]) -> None:
        """Start from the checkpoint the infer task served when this training began (not
        ``<bundle>/models/<model_filename>``): the path :meth:`_start_over` returned, which may lie under
        ``.overwritten/``.

        The loader is added here rather than by the stock method: that one keeps a loader an earlier training of this
        (long-lived) task left in the shared handler list, which would now point at an older model, and it cannot read
        a handler list of ``'@name'`` references.
        """
        train_handlers[:] = [
            h for h in train_handlers if not (isinstance(h, dict) and h.get("_desc_") == _SERVED_LOADER)
        ]
        latest = getattr(self, "_served", None)
        if not pretrained or latest is None or not Path(latest).is_file():
            logger.info(f"training {self.spec.name} from the bundle's initialisation (pretrained={pretrained})")
            return
        if any(isinstance(h, dict) and h.get("_target_") == "CheckpointLoader" for h in train_handlers):
            logger.info(f"the bundle's train#handlers load a checkpoint themselves; {latest} is not loaded")
            return
        logger.info(f"fine-tuning {self.spec.name} from {latest}")
        train_handlers.insert(
            0,
            {
                "_target_": "CheckpointLoader",
                "_desc_": _SERVED_LOADER,
                "load_path": str(latest),
                "load_dict": {self.model_dict_key: f"$@{self.const.key_network()}"},
                "strict": self.load_strict,
            },
        )

    def _update_overrides(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        self.spec.train_dir.mkdir(parents=True, exist_ok=True)
        overrides["output_dir"] = str(self.spec.train_dir)
        max_epochs = overrides[self.const.key_train_trainer_max_epochs()]
        # explicit, see the module docstring: _start_over already moved the earlier results aside under the claim
        overrides["resume"] = False
        overrides["overwrite"] = True
        if "max_epochs" in self.bundle_config.config:  # type: ignore[operator]
            overrides["max_epochs"] = max_epochs  # also drives e.g. the LR schedule length
        dataset = self.bundle_config.get("train#dataset")
        if not (isinstance(dataset, dict) and "data" in dataset):
            # train#dataset is built from the `datalist` file (ffcl-monai bundle): hand the labels over as a
            # datalist, so the bundle's own loading, checks and summaries run unchanged.
            train = overrides.pop(self.const.key_train_dataset_data())
            val = overrides.pop(self.const.key_validate_dataset_data(), None) or list(train)
            overrides["datalist"] = str(self._write_datalist(train, val))
        return overrides

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        # Only typed, allow-listed keys go on (the server guard checked the body before queueing; this covers every
        # other route into the task). Nothing from the request can reach $-evaluation in the bundle config.
        request = validate_assembled_request(request, [self.spec.name])
        # one process: a torchrun job would have to release the claim on the training folder that this task holds
        request["multi_gpu"] = False
        if "max_epochs" not in request:
            request["max_epochs"] = int(self.conf.get("max_epochs", 10))
        self._served = self._start_over()
        before = self._mtime(self.spec.trained_checkpoint)
        super().__call__(request, datastore)
        after = self._mtime(self.spec.trained_checkpoint)
        if after is None or after == before:
            raise RuntimeError(
                f"training of {self.spec.name} finished without writing {self.spec.trained_checkpoint}; "
                "check that the bundle's train workflow saves <output_dir>/models/model.pt"
            )
        logger.info(f"new checkpoint: {self.spec.trained_checkpoint}")
        return {"checkpoint": str(self.spec.trained_checkpoint)}

    def run_single_gpu(self, request: Dict[str, Any], overrides: Dict[str, Any]) -> None:
        monai.bundle.run(
            run_id=request.get("run_id") or "run",
            meta_file=str(self.spec.metadata_file),
            config_file=self.config_files,
            **overrides,
        )

    @staticmethod
    def _mtime(path: Path) -> Optional[float]:
        return path.stat().st_mtime if path.exists() else None
