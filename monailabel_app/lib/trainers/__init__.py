from .classifier import ClassifierTrainTask, read_class_label

__all__ = ["ClassifierTrainTask", "read_class_label"]
