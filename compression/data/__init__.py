"""Datasets and transforms: the built-in digits data, a PASCAL VOC loader, classification datasets."""

from compression.data.classification import (
    CIFAR10_CLASSES,
    build_classification_dataset,
    classification_class_names,
)
from compression.data.digits import (
    DIGIT_CLASSES,
    split_source_pools,
    write_digits_cls,
    write_digits_voc,
)
from compression.data.transforms import eval_transforms, ssd_train_transforms
from compression.data.voc import VOC_CLASSES, VOCAnnotation, VOCDetection, collate_detection

__all__ = [
    "CIFAR10_CLASSES",
    "DIGIT_CLASSES",
    "VOC_CLASSES",
    "VOCAnnotation",
    "VOCDetection",
    "build_classification_dataset",
    "classification_class_names",
    "collate_detection",
    "eval_transforms",
    "split_source_pools",
    "ssd_train_transforms",
    "write_digits_cls",
    "write_digits_voc",
]
