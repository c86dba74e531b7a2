"""Benchmarks: `python -m ffcl_monai.bench [all|ntxent|ffcl|ff|pipeline|simclr_epoch]`."""
