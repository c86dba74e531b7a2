"""MONAI Label app serving the ffcl-monai classifier bundle.

Start it with ``monailabel_app/start_server.sh <studies_dir> [port]`` (see monailabel_app/README.md), or directly::

    monailabel start_server --app monailabel_app --studies <dir> --host 127.0.0.1 --conf models xray

``--conf`` keys are documented in ``lib/models.py``. No model zoo is consulted: the models come from the repo's
``bundle/`` (or ``--conf bundle_path``), so the server starts offline.
"""

from __future__ import annotations

import logging
from typing import Dict

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

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

