"""Classification datasets: CIFAR-10 (torchvision's reader, never downloaded) or an ImageFolder tree.

Items are ``(image, label)``: a float32 tensor (C, H, W) in [0, 1] (normalisation belongs to the model) and an
int class index into :func:`classification_class_names`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.transforms import v2

from compression.errors import ConfigError, DataError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_VAL_SIZE = 5000
_CIFAR_FOLDER = "cifar-10-batches-py"

DatasetKind = Literal["cifar10", "imagefolder"]
Split = Literal["train", "val", "test"]


def _check_kind_and_split(kind: str, split: str | None = None) -> None:
    if kind not in ("cifar10", "imagefolder"):
        raise ConfigError(f"dataset kind {kind!r}: expected 'cifar10' or 'imagefolder'")
    if split is not None and split not in ("train", "val", "test"):
        raise ConfigError(f"split {split!r}: expected 'train', 'val' or 'test'")


def _imagefolder_classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder}: ImageFolder split folder not found")
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder}: no class folders inside") from None
    return classes


def classification_class_names(kind: DatasetKind, root: Path) -> list[str]:
    """Class names in label order: CIFAR-10's ten classes, or the sorted class folders of ``root/train``."""
    _check_kind_and_split(kind)
    root = Path(root)
    if kind == "cifar10":
        if not (root / _CIFAR_FOLDER).is_dir():
            raise DataError(f"{root / _CIFAR_FOLDER}: CIFAR-10 folder not found (it is never downloaded)")
        return list(CIFAR10_CLASSES)
    return _imagefolder_classes(root / "train")


def _image_transforms(train_aug: bool, hflip: bool, image_size: int, resize: bool) -> v2.Compose:
    steps: list = [v2.ToImage()]
    if resize:
        steps.append(v2.Resize((image_size, image_size)))
    if train_aug:
        steps.append(v2.RandomCrop(image_size, padding=4))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    return v2.Compose(steps)


def build_classification_dataset(
    kind: DatasetKind,
    root: Path,
    split: Split,
    train_aug: bool,
    *,
    hflip: bool | None = None,
    image_size: int = 32,
) -> Dataset:
    """A (float [0,1] CxHxW tensor, int label) dataset.

    * ``cifar10``: ``root/cifar-10-batches-py`` via ``torchvision.datasets.CIFAR10(download=False)``. CIFAR has
      no val split: val is the last 5000 images of the training batches (deterministic), train the rest.
    * ``imagefolder``: ``root/{split}/{class}/*``, resized to ``image_size`` square; every split must have the
      same class folders as ``root/train`` (otherwise labels would silently shift).

    ``train_aug`` adds RandomCrop(image_size, padding=4) and, if ``hflip``, a horizontal flip. ``hflip``
    defaults to True for CIFAR-10 and False for ImageFolder (the built-in ImageFolder set is digits, which must
    not be mirrored).
    """
    _check_kind_and_split(kind, split)
    root = Path(root)
    if hflip is None:
        hflip = kind == "cifar10"

    if kind == "cifar10":
        folder = root / _CIFAR_FOLDER
        if not folder.is_dir():
            raise DataError(f"{folder}: CIFAR-10 folder not found (it is never downloaded)")
        transform = _image_transforms(train_aug, hflip, image_size, resize=False)
        try:
            cifar = datasets.CIFAR10(str(root), train=split != "test", transform=transform, download=False)
        except RuntimeError as err:  # torchvision's integrity (md5) check failed
            raise DataError(f"{folder}: CIFAR-10 files missing or corrupted ({err})") from None
        if split == "test":
            return cifar
        num_train = len(cifar) - CIFAR10_VAL_SIZE
        indices = range(num_train, len(cifar)) if split == "val" else range(num_train)
        return Subset(cifar, indices)

    classes = classification_class_names(kind, root)
    folder = root / split
    split_classes = _imagefolder_classes(folder)
    if split_classes != classes:
        raise DataError(f"{folder}: class folders {split_classes} differ from {root / 'train'}'s {classes}")
    transform = _image_transforms(train_aug, hflip, image_size, resize=True)
    inside = folder.resolve()

    def image_inside_root(path: str) -> bool:
        # torchvision walks class folders following links: a link out of the split folder is refused, not read.
        if not Path(path).resolve().is_relative_to(inside):
            raise DataError(f"{path}: leads outside {folder} (a link to {Path(path).resolve()}); images must lie inside it")
        return has_file_allowed_extension(path, IMG_EXTENSIONS)

    try:
        return datasets.ImageFolder(str(folder), transform=transform, is_valid_file=image_inside_root)
    except FileNotFoundError as err:  # a class folder without any image
        raise DataError(f"{folder}: {' '.join(str(err).split())}") from None
