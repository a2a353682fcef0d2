"""DataLoaders from the pipeline config: the one place that maps config to datasets."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from compression.config import DataConfig, class_names
from compression.errors import DataError

SPLITS = ("train", "val", "test")


def data_root(cfg: DataConfig) -> Path:
    """``data.root`` as a local folder: a path, or a ``file://`` URI's path. Another URI is copied to a node's
    disk by ``prunepipe run`` before the stages read it; anywhere else it is refused in one line."""
    root = str(cfg.root)
    if root.startswith("file://"):
        return Path(root.removeprefix("file://"))
    if "://" in root:
        raise DataError(f"data.root {root}: a remote URI is read by `prunepipe run` on its Ray nodes; here give a "
                        "local folder (or a file:// URI)")
    return Path(root)


def ensure_builtin_data(cfg: DataConfig) -> Path:
    """Generate the built-in dataset at ``cfg.root`` if it is configured and not there yet."""
    root = data_root(cfg)
    if cfg.builtin is None or root.exists():
        return root
    if cfg.builtin == "digits-voc":
        from compression.data.digits import write_digits_voc

        if root.name != "VOCdevkit":
            raise DataError(f"data.root {root}: the built-in digits-voc set is a VOCdevkit folder, name it .../VOCdevkit")
        return write_digits_voc(root.parent, seed=cfg.seed)
    from compression.data.digits import write_digits_cls

    return write_digits_cls(root, seed=cfg.seed)


def build_dataset(cfg: DataConfig, split: str, train: bool, image_size: int) -> Dataset:
    """The dataset of ``split`` ('train', 'val' or 'test'); ``train`` switches augmentation on.

    With ``cfg.val_holdout`` the 'val' images are a seeded share of the 'train' ones, and 'train' is the rest.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    if cfg.val_holdout is not None and split in ("train", "val"):
        dataset: Dataset = _source_dataset(cfg, "train", train, image_size)
        held_out, kept = holdout_indices(len(dataset), cfg.val_holdout, cfg.seed)  # type: ignore[arg-type]
        ids = getattr(dataset, "ids", None)
        if ids is not None:  # an image listed twice in train_sets stays out of training once held out
            held_out_ids = {ids[i] for i in held_out}
            kept = [i for i in kept if ids[i] not in held_out_ids]
        if not kept:
            raise DataError(f"data.val_holdout={cfg.val_holdout} of {len(dataset)} training images "  # type: ignore[arg-type]
                            "leaves none to train on")
        dataset = Subset(dataset, held_out if split == "val" else kept)
    else:
        dataset = _source_dataset(cfg, split, train, image_size)
    if cfg.max_images is not None and len(dataset) > cfg.max_images:  # type: ignore[arg-type]
        dataset = Subset(dataset, range(cfg.max_images))
    return dataset


def holdout_indices(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(held_out, kept)``: a seeded draw of ``fraction`` of ``range(count)`` (at least one), and the rest."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    size = max(1, round(count * fraction)) if count else 0
    return sorted(order[:size]), sorted(order[size:])


def _source_dataset(cfg: DataConfig, split: str, train: bool, image_size: int) -> Dataset:
    """``split`` as the data source names it (VOC image sets, CIFAR's or the ImageFolder's splits)."""
    if cfg.kind == "voc":
        from compression.data.transforms import eval_transforms, ssd_train_transforms
        from compression.data.voc import VOCDetection

        sets = {"train": cfg.train_sets, "val": cfg.val_sets, "test": cfg.test_sets}[split]
        transforms = (
            ssd_train_transforms(image_size, hflip=cfg.hflip, geometric=cfg.augment == "ssd")
            if train
            else eval_transforms()
        )
        return VOCDetection(data_root(cfg), sets, class_names(cfg), transforms=transforms)
    from compression.data.classification import build_classification_dataset

    return build_classification_dataset(cfg.kind, data_root(cfg), split, train_aug=train, hflip=cfg.hflip)


def build_loader(cfg: DataConfig, split: str, train: bool, image_size: int, seed: int = 0,
                 batch_size: int | None = None) -> DataLoader:
    from compression.data.voc import collate_detection

    dataset = build_dataset(cfg, split, train, image_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
        shuffle=train,
        drop_last=train and len(dataset) > (batch_size or cfg.batch_size),  # type: ignore[arg-type]
        num_workers=cfg.num_workers,
        collate_fn=collate_detection if cfg.kind == "voc" else None,
        generator=generator,
        # Workers start afresh each epoch, seeded from ``generator``: a training run resumed after epoch k
        # draws the same augmentations as one that never stopped (persistent workers would carry their
        # RNG state across epochs).
        persistent_workers=False,
    )
