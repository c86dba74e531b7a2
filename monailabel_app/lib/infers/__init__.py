from .classifier import ClassifierInferTask

__all__ = ["ClassifierInferTask"]
