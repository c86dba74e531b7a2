"""ffcl-monai: contrastive, Forward-Forward Contrastive (FFCL) and Forward-Forward pretraining of medical-image
classifiers as MONAI bundle workflows, tracked in MLflow."""

__version__ = "0.1.0"
