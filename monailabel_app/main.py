"""MONAI Label app serving the ffcl-monai classifier bundle.

Start it with ``monailabel_app/start_server.sh <studies_dir> [port]`` (see monailabel_app/README.md), or directly::

    monailabel start_server --app monailabel_app --studies <dir> --host 127.0.0.1 --conf models xray

``--conf`` keys are documented in ``lib/models.py``. No model zoo is consulted: the models come from the repo's
``bundle/`` (or ``--conf bundle_path``), so the server starts offline.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict, Optional

from fastapi import HTTPException

from lib.compat import install_torchvision_stub

install_torchvision_stub()  # before anything imports monailabel.transform.post

import monailabel  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402

from lib.infers import ClassifierInferTask  # noqa: E402
from lib.models import dedupe, parse_models  # noqa: E402

logger = logging.getLogger(__name__)

# The name tempfile.NamedTemporaryFile gives an upload that MONAI Label's /infer endpoint saves (tmp + 8 characters).
_UPLOAD_NAME = re.compile(r"^tmp[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)*$")


def image_reference_allowed(image: str, studies: str) -> bool:
    """Whether an ``image`` that names an existing file may be read: only files inside the studies folder, or an
    upload MONAI Label itself just saved to the temporary folder.

    MONAI Label reads ``request["image"]`` directly whenever that path exists on the server, and the request's
    ``params`` form field may set it (``params={"image": "/any/file"}``), as may an id that happens to name a file in
    the server's working directory; this check is where such a path is interpreted, so no route around it remains.
    """
    real = os.path.realpath(image)
    root = os.path.realpath(studies)
    if os.path.commonpath([real, root]) == root:
        return True
    return os.path.dirname(real) == os.path.realpath(tempfile.gettempdir()) and bool(_UPLOAD_NAME.match(os.path.basename(real)))

# MONAI Label's default datastore patterns lack .jpeg (Kermany) and .dcm (single-file DICOM).
REQUIRED_EXTENSIONS = ["*.jpeg", "*.jpg", "*.png", "*.dcm", "*.nii", "*.nii.gz"]


class FfclLabelApp(MONAILabelApp):
    """Infer (and train) tasks for the classifier(s) named by ``--conf models``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.specs = parse_models(conf, app_dir)
        # Extend (not replace) the datastore patterns, also when started without start_server.sh.
        settings.MONAI_LABEL_DATASTORE_FILE_EXT = dedupe([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *REQUIRED_EXTENSIONS])
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="ffcl-monai classifier",
            description="Image-level classifiers of the ffcl-monai bundle: "
            + ", ".join(f"{s.name} ({s.dimension}D)" for s in self.specs),
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for spec in self.specs:
            infers[spec.name] = ClassifierInferTask(spec, self.conf)
            logger.info(f"+++ Adding Inferer:: {spec.name} => {spec.bundle_path} ({spec.dimension}D)")
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        from lib.trainers import ClassifierTrainTask  # imported lazily: it pulls the training stack

        for spec in self.specs:
            try:
                spec.config_files("train")
            except FileNotFoundError as e:
                logger.warning(f"no trainer for {spec.name!r}: {e}")
                continue
            trainers[spec.name] = ClassifierTrainTask(spec, self.conf)
            logger.info(f"+++ Adding Trainer:: {spec.name} => output {spec.train_dir}")
        return trainers

    def infer(self, request: Dict[str, Any], datastore: Optional[Any] = None) -> Dict[str, Any]:
        image = request.get("image")
        if isinstance(image, str) and image and os.path.exists(image) and not image_reference_allowed(image, self.studies):
            logger.warning("refused an /infer request naming a file outside the studies folder")
            raise HTTPException(status_code=400, detail="`image` must be an image id of the studies folder or an upload, "
                                "not a path on the server")
        return super().infer(request, datastore)

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

