"""Ignite handlers: MLflow extras, plots, reports."""
