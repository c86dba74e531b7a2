"""Entry file of the logged MLflow model ("models from code"): MLflow runs it when the model is loaded.

Nothing in the model is unpickled: this file names the class, ``preprocessing.json`` (plain data) rebuilds the
network and the transforms, and the weights are loaded with ``torch.load(..., weights_only=True)``.
"""

import mlflow

from ffcl_monai.serving.mlflow_pyfunc import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
