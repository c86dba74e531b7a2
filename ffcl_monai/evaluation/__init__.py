"""Evaluation of pretrained backbones: label-efficiency curves (``python -m ffcl_monai.evaluation``)."""
