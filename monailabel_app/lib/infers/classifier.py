"""MONAI Label infer task for the ffcl-monai classifier bundle.

It runs the bundle's own inference pipeline (``preprocessing`` -> ``inferer`` -> ``postprocessing`` of
``inference.yaml`` (standalone) + modality overlay, network from ``network_def``) and answers with MONAI Label's
classification JSON::

    {"prediction": [{"idx": 0, "label": "NORMAL", "score": 0.93}, ...], "label_names": {...}, "latencies": {...}}

Differences from the stock ``BundleInferTask`` set-up, and why:
- ``type=CLASSIFICATION`` and no ``Restored`` post-transform: the stock task guesses the type from the folder name and
  appends ``Restored``, which tries to resize the class vector to the image shape and fails.
- Several config files are merged (bundle convention), not the single ``inference.json``.
- The checkpoint need not live in ``<bundle>/models``: ``--conf model_path`` or the output of a MONAI Label training
  run; the newest existing one is served, and a missing one is an error instead of silently random weights.
- Class names keep the case of ``channel_def`` (the stock task lower-cases them).
- Checkpoints load strictly: a checkpoint for another architecture or class count fails loudly.

Saliency (off by default): ``{"saliency": true}`` in the request's ``params`` form field adds a Grad-CAM map of the
top-scoring class to the reply, computed after (and apart from) the scores, which are unchanged::

    "saliency": {"method": "gradcam", "layer": "backbone.blocks.2", "class_idx": 1, "label": "PNEUMONIA",
                 "input_shape": [64, 64], "shape": [64, 64], "axes": "...", "map": [[0.0, ...], ...],
                 "heatmap_png": "<base64 RGBA PNG of the map alone, to composite over the image>"}

``map`` (values 0..1) has the model input's shape (``image_size`` after the bundle's preprocessing), in MONAI's
array order (x, y[, z]; for PNG/JPEG the transpose of rows/columns), average-pooled so that its longest axis is at
most 64 (2D) or 32 (3D); ``shape`` says which. ``saliency_method`` (``gradcam`` | ``gradcampp``) may be sent too; the
defaults (and ``saliency_layer``) come from the bundle's ``inference.yaml``. The reply holds no image pixels (the PNG
is the map alone), so a request that names an image the client may not see gets no picture of it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.transforms import SaveClassificationd, SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.utils.others.generic import strtobool

from ffcl_monai.handlers.saliency import METHODS as SALIENCY_METHODS
from ffcl_monai.handlers.saliency import as_bool, saliency_reply
from lib.configs import load_workflow_config
from lib.models import ModelSpec, class_names

logger = logging.getLogger(__name__)

# Probabilities must lie in [0, 1] and softmax outputs sum to 1; allow float32 rounding.
PROB_TOL = 1e-4
# Where run_inferer leaves the saliency entry for writer(); always overwritten, so a request cannot inject one.
SALIENCY_RESULT = "_ffcl_saliency_result"


def _flag(value: Any, name: str) -> bool:
    """A request boolean: JSON true/false (or 0/1, "true"/"false"); anything else is a 400 naming the key."""
    try:
        return as_bool(value, name)
    except ValueError:
        raise HTTPException(status_code=400, detail=f"request parameter {name!r} must be true or false") from None


class ClassifierInferTask(BundleInferTask):
    """Serve one classifier described by a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, conf: Mapping[str, str]) -> None:
        # BundleInferTask.__init__ is skipped on purpose (see module docstring); the attributes its methods
        # (pre_transforms, inferer, post_transforms, _update_device) rely on are set here instead.
        self.spec = spec
        self.valid = False
        self.const = BundleConstants()
        self.pre_filter = None
        # file writers have no place in a server reply (the JSON is the result)
        self.post_filter = [SaveImaged, SaveClassificationd]
        self.extend_load_image = True  # accept images MONAI Label already loaded (e.g. DICOMweb) as well as paths
        self.dropout = 0.0
        self.add_post_restore = False
        self.displayable_configs: Dict[str, Any] = {}

        self.bundle_path = str(spec.bundle_path)
        self.config_files = [str(f) for f in spec.config_files("inference")]
        self.bundle_config_path = self.config_files[-1]
        self.bundle_config = self._load_bundle_config(self.bundle_path, self.config_files)
        self.bundle_config.config["use_click"] = False

        with open(spec.metadata_file) as fp:
            metadata = json.load(fp)
        fmt = metadata["network_data_format"]
        self.key_image = next(iter(fmt["inputs"]))
        self.key_pred = next(iter(fmt["outputs"]))
        self.class_names = class_names(metadata)

        network = self.bundle_config.get_parsed_content(self.const.key_network_def(), instantiate=True)
        BasicInferTask.__init__(
            self,
            path=[str(p) for p in spec.checkpoints()],  # last existing one wins (trained > initial)
            network=network,
            type=InferType.CLASSIFICATION,
            labels={name: idx for idx, name in self.class_names.items()},
            dimension=spec.dimension,
            description=f"{spec.description}: {metadata.get('description', '')}".strip(": "),
            input_key=self.key_image,
            output_label_key=self.key_pred,
            load_strict=True,
            preload=False,
        )
        for k in self.const.key_displayable_configs():
            if self.bundle_config.get(k):
                self.displayable_configs = self.bundle_config.get_parsed_content(k, instantiate=True)
                self._config.update(self.displayable_configs)

        # saliency defaults (shown by /info, so that clients such as 3D Slicer offer the option); off unless asked
        self.saliency_method = str(self._bundle_value("saliency_method", "gradcam"))
        self.saliency_layer = self._bundle_value("saliency_layer", None)
        self._config.update({"saliency": False, "saliency_method": self.saliency_method})

        self.version = metadata.get("version")
        self.valid = True
        latest = spec.latest_checkpoint()
        if latest is None:
            logger.warning(
                f"model {spec.name!r}: no checkpoint yet ({', '.join(map(str, spec.checkpoints()))}); "
                "inference answers with an error until one exists (train it, or pass --conf model_path)"
            )
        else:
            logger.info(f"model {spec.name!r}: configs {self.config_files}; checkpoint {latest}")
        if strtobool(conf.get("preload", "false")) and latest is not None:
            self._get_network("cpu", None)

    def _load_bundle_config(self, path: str, config: Any) -> ConfigParser:
        """Merge the workflow's config files (``inference.yaml`` + overlay) and the metadata."""
        files = list(config) if isinstance(config, (list, tuple)) else [config]
        return load_workflow_config(files, self.spec.metadata_file, path)

    def _bundle_value(self, key: str, default: Any) -> Any:
        return self.bundle_config.get_parsed_content(key) if key in self.bundle_config else default

    def run_inferer(self, data: Dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> Dict[str, Any]:
        """The bundle's inferer (scores), then, only when the request asks for it, the saliency map."""
        want = _flag(data.get("saliency"), "saliency")
        method = data.get("saliency_method") or self.saliency_method
        if want and (not isinstance(method, str) or method not in SALIENCY_METHODS):
            raise HTTPException(status_code=400, detail=f"saliency_method must be one of {list(SALIENCY_METHODS)}")
        data = super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        data[SALIENCY_RESULT] = None
        if want:
            pred = data[self.key_pred]
            scores = (pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)).reshape(-1)
            network = self._get_network(device, data)  # the cached one; saliency works on its own copy
            names = [self.class_names[i] for i in sorted(self.class_names)]
            data[SALIENCY_RESULT] = saliency_reply(network, data[self.input_key], int(np.argmax(scores)), names,
                                                   method=method, layer=self.saliency_layer)
        return data

    def info(self) -> Dict[str, Any]:
        i = super().info()
        latest = self.spec.latest_checkpoint()
        i["checkpoint"] = str(latest) if latest else None
        return i

    def _get_network(self, device: Any, data: Any) -> torch.nn.Module:
        if self.get_path() is None:
            # BasicInferTask would fall back to the freshly initialised network_def: refuse instead. An HTTPException
            # (not MONAILabelException, which the server turns into a bare "Internal Server Error") gives the client
            # the reason as {"detail": ...}.
            raise HTTPException(
                status_code=503,
                detail=f"model {self.spec.name!r} has no checkpoint: none of {[str(p) for p in self.spec.checkpoints()]} "
                "exists. Start the server with --conf model_path <run>/models/model.pt or train it first.",
            )
        return super()._get_network(device, data)

    def writer(self, data: Dict[str, Any], extension: Any = None, dtype: Any = None) -> Tuple[Any, Dict[str, Any]]:
        """MONAI Label classification JSON from the probability vector in ``data[pred]``.

        Written here rather than by ``ClassificationWriter`` so that plain tensors/arrays work as well as MetaTensors,
        and so that a pipeline that does not end in probabilities fails with a clear message.
        """
        pred = data[self.key_pred]
        scores = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
        scores = scores.astype(np.float64).reshape(-1)
        if scores.size != len(self.class_names):
            raise HTTPException(
                status_code=500,
                detail=f"model {self.spec.name!r}: prediction has {scores.size} values but metadata.json channel_def names "
                f"{len(self.class_names)} classes",
            )
        if not np.all(np.isfinite(scores)) or scores.min() < -PROB_TOL or scores.max() > 1 + PROB_TOL:
            raise HTTPException(
                status_code=500,
                detail=f"model {self.spec.name!r}: prediction {scores.tolist()} is not a probability vector; the bundle's "
                "postprocessing must end with a softmax or sigmoid (Activationsd)",
            )
        prediction = [
            {"idx": idx, "label": self.class_names[idx], "score": float(score)} for idx, score in enumerate(scores)
        ]
        result: Dict[str, Any] = {"prediction": prediction}
        if data.get(SALIENCY_RESULT) is not None:
            result["saliency"] = data[SALIENCY_RESULT]
        return None, result
