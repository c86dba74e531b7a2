"""Datasets, datalists, transforms and two-view pairs."""
