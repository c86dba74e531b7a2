"""ffcl-monai: contrastive, Forward-Forward Contrastive (FFCL) and Forward-Forward pretraining of medical-image
classifiers as MONAI bundle workflows, tracked in MLflow."""

__version__ = "0.1.0"

from ffcl_monai.errors import install_excepthook as _install_excepthook
from ffcl_monai.redaction import install_log_redaction as _install_log_redaction

_install_excepthook()
_install_log_redaction()  # before MONAI's run summary echoes a --tracking_uri with credentials


def bundle_root() -> str:
    """The MONAI bundle folder: ``bundle/`` of this repository (editable install), else ``./bundle``."""
    import os

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
    return here if os.path.isdir(here) else os.path.abspath("bundle")
