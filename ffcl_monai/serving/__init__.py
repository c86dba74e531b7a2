"""Serving the trained classifier outside MONAI: the MLflow pyfunc model (:mod:`ffcl_monai.serving.mlflow_pyfunc`)."""
