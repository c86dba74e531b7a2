"""Ignite/MONAI engines: one module per training method; the trainers share :mod:`ffcl_monai.engines.base`."""
