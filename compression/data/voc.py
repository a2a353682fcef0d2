"""PASCAL VOC devkit loader (real VOC07/VOC12 and the generated digits tree alike).

Everything is validated when the dataset is built, before any training starts: a bad devkit fails in
seconds with one line naming the file, not hours later inside a DataLoader worker.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from pyexpat import ExpatError, ParserCreate
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from compression.errors import ConfigError, DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

_IMAGE_SET = re.compile(r"^(?P<year>[^:/\\\s]+):(?P<split>[^:/\\\s]+)$")
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# An image id names files inside Annotations/ and JPEGImages/: no folder separators, no NUL, not "." or "..".
_PLAIN_ID = re.compile(r"[^/\\\x00]+")


@dataclass(frozen=True)
class VOCAnnotation:
    """One image's parsed annotation. ``boxes`` are 0-based continuous XYXY: (xmin-1, ymin-1, xmax, ymax)."""

    image_path: Path
    xml_path: Path
    width: int
    height: int
    boxes: torch.Tensor  # float32 (N, 4)
    labels: torch.Tensor  # int64 (N,), 1-based: 0 is the background
    difficult: torch.Tensor  # bool (N,)


def _parse_image_set(spec: str) -> tuple[str, str]:
    match = _IMAGE_SET.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(f"image set {spec!r}: expected 'YEAR:SPLIT', e.g. '2007:trainval'")
    return match["year"], match["split"]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_number(xml_path: Path, element: ET.Element, tag: str, where: str) -> float:
    text = element.findtext(tag)
    try:
        value = float(text)  # some VOC annotations write coordinates as floats ("273.0")
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: {where} <{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):  # "nan" would pass every comparison below
        raise DataError(f"{xml_path}: {where} <{tag}> is {text!r}, not a finite number")
    return value


class _DocumentTypeFound(Exception):
    pass


def _read_xml(xml_path: Path) -> ET.Element:
    """The annotation's root element; a file that declares a DTD or entities is refused, not expanded.

    VOC annotations never have a <!DOCTYPE>; refusing it rules out entity tricks (billion laughs, external
    entities) whatever the expat version. The first pass is pyexpat itself, so it sees a DOCTYPE in any
    encoding the file declares.
    """

    def refuse(*_: Any) -> None:
        raise _DocumentTypeFound

    try:
        data = xml_path.read_bytes()
        checker = ParserCreate()
        checker.StartDoctypeDeclHandler = refuse
        checker.EntityDeclHandler = refuse
        checker.Parse(data, True)
        return ET.fromstring(data)
    except _DocumentTypeFound:
        raise DataError(f"{xml_path}: declares a DTD or entities (<!DOCTYPE>); VOC annotations have none") from None
    except (ExpatError, ET.ParseError, LookupError, ValueError) as err:  # LookupError: an unknown encoding
        raise DataError(f"{xml_path}: malformed XML ({_one_line(err)})") from None
    except OSError as err:
        raise DataError(f"{xml_path}: cannot read the annotation ({err.strerror or _one_line(err)})") from None


def _parse_annotation(
    xml_path: Path, image_path: Path, class_index: dict[str, int], keep_difficult: bool
) -> VOCAnnotation:
    root = _read_xml(xml_path)
    if root.tag != "annotation":
        raise DataError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise DataError(f"{xml_path}: missing <size>")
    width, height = (_read_number(xml_path, size, tag, "<size>") for tag in ("width", "height"))
    if width < 1 or height < 1 or not width.is_integer() or not height.is_integer():
        raise DataError(f"{xml_path}: <size> is {width:g}x{height:g}, expected positive whole pixels")
    width, height = int(width), int(height)

    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    for number, obj in enumerate(root.findall("object"), start=1):
        where = f"object {number}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{xml_path}: {where} has no <name>")
        if name not in class_index:
            raise DataError(
                f"{xml_path}: {where} has unknown class {name!r} (known: {', '.join(class_index)})"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{xml_path}: {where} ({name}) has no <bndbox>")
        x1, y1, x2, y2 = (_read_number(xml_path, bndbox, tag, f"{where} <bndbox>") for tag in _BOX_TAGS)
        # VOC boxes are 1-based inclusive pixels; a box needs xmax > xmin and ymax > ymin.
        if x2 <= x1:
            problem = "has zero area" if x2 == x1 else "is inverted"
            raise DataError(f"{xml_path}: {where} box (x1={x1:g}, x2={x2:g}) {problem}")
        if y2 <= y1:
            problem = "has zero area" if y2 == y1 else "is inverted"
            raise DataError(f"{xml_path}: {where} box (y1={y1:g}, y2={y2:g}) {problem}")
        if x1 < 1 or y1 < 1 or x2 > width or y2 > height:
            raise DataError(
                f"{xml_path}: {where} box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) lies outside the "
                f"{width}x{height} image (VOC pixels run 1..width, 1..height)"
            )
        # <difficult> is optional (absent in some VOC2012 files): absent means not difficult.
        is_difficult = (
            obj.find("difficult") is not None and _read_number(xml_path, obj, "difficult", where) != 0
        )
        if is_difficult and not keep_difficult:
            continue
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        labels.append(class_index[name])
        difficult.append(is_difficult)

    return VOCAnnotation(
        image_path=image_path,
        xml_path=xml_path,
        width=width,
        height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
    )


def _check_image_header(image_path: Path, annotation: VOCAnnotation) -> None:
    """Reads only the image header (cheap): the file must be an image of the size its XML states."""
    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{image_path}: not a readable image ({_one_line(err)})") from None
    if (width, height) != (annotation.width, annotation.height):
        raise DataError(
            f"{image_path}: image is {width}x{height} but {annotation.xml_path.name} says "
            f"{annotation.width}x{annotation.height}"
        )


class VOCDetection(Dataset):
    """A PASCAL VOC devkit as a detection dataset.

    ``image_sets`` are ``"YEAR:SPLIT"`` strings; several combine (VOC07+12 is
    ``["2007:trainval", "2012:trainval"]``). ``class_names`` fixes the label order: label ``i + 1`` is
    ``class_names[i]`` (0 is the background). With ``keep_difficult=False`` difficult objects are dropped.

    Items are ``(image, target)``: image a uint8 RGB ``tv_tensors.Image`` (C, H, W) decoded with PIL; target a dict with
    ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, float32, 0-based continuous pixels), ``labels`` (int64),
    ``difficult`` (bool) and ``image_id`` (the item's index, unique across combined image sets).
    ``transforms(image, target)`` is applied last when given.

    Attributes: ``class_names`` (tuple), ``ids`` (``"YEAR/ID"`` strings, e.g. ``"2007/000005"``, in item
    order), ``annotations`` (parsed :class:`VOCAnnotation` per item, for evaluation without decoding images).
    """

    def __init__(
        self,
        devkit_root: Path | str,
        image_sets: Sequence[str],
        class_names: Sequence[str],
        transforms: Any = None,
        keep_difficult: bool = True,
    ) -> None:
        if isinstance(image_sets, str) or not image_sets:
            raise ConfigError(
                f"image_sets: expected a non-empty list like ['2007:trainval'], got {image_sets!r}"
            )
        self.class_names: tuple[str, ...] = tuple(class_names)
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class_names: expected distinct, non-empty names, got {list(class_names)!r}")
        self.devkit_root = Path(devkit_root)
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        class_index = {name: i + 1 for i, name in enumerate(self.class_names)}

        if not self.devkit_root.is_dir():
            raise DataError(f"{self.devkit_root}: VOC devkit folder not found")
        self.ids: list[str] = []
        self.annotations: list[VOCAnnotation] = []
        for spec in image_sets:
            year, split = _parse_image_set(spec)
            year_dir = self.devkit_root / f"VOC{year}"
            if not year_dir.is_dir():
                raise DataError(f"{year_dir}: folder for image set {spec!r} not found")
            split_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
            if not split_file.is_file():
                raise DataError(f"{split_file}: split list for image set {spec!r} not found")
            try:
                image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
            except UnicodeDecodeError as err:
                raise DataError(f"{split_file}: split list is not UTF-8 text ({_one_line(err)})") from None
            if not image_ids:
                raise DataError(f"{split_file}: split list is empty")
            # Image files must lie inside these folders (resolved: the folders themselves may be symlinks).
            inside = {sub: (year_dir / sub).resolve() for sub in ("Annotations", "JPEGImages")}
            for image_id in image_ids:
                if not _PLAIN_ID.fullmatch(image_id) or image_id in (".", ".."):
                    raise DataError(
                        f"{split_file}: image id {image_id!r} is not a plain file name "
                        "(ids name files inside Annotations/ and JPEGImages/)"
                    )
                xml_path = year_dir / "Annotations" / f"{image_id}.xml"
                image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
                if not xml_path.is_file():
                    raise DataError(
                        f"{xml_path}: annotation missing (image {image_id!r} is listed in {split_file})"
                    )
                if not image_path.is_file():
                    raise DataError(
                        f"{image_path}: image missing (image {image_id!r} is listed in {split_file})"
                    )
                for path, sub in ((xml_path, "Annotations"), (image_path, "JPEGImages")):
                    if not path.resolve().is_relative_to(inside[sub]):
                        raise DataError(
                            f"{path}: leads outside {year_dir / sub} (a link to {path.resolve()}); "
                            "the devkit's files must lie inside it"
                        )
                annotation = _parse_annotation(xml_path, image_path, class_index, keep_difficult)
                _check_image_header(image_path, annotation)
                self.ids.append(f"{year}/{image_id}")
                self.annotations.append(annotation)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        annotation = self.annotations[index]
        # PIL rather than torchvision.io: torchvision 0.29 deprecates its image decoders (to be removed).
        try:
            with Image.open(annotation.image_path) as decoded:
                pixels = F.pil_to_tensor(decoded.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError(f"{annotation.image_path}: cannot decode image ({_one_line(err)})") from None
        if tuple(pixels.shape[1:]) != (annotation.height, annotation.width):
            raise DataError(
                f"{annotation.image_path}: decoded as {pixels.shape[2]}x{pixels.shape[1]}, "
                f"but its annotation says {annotation.width}x{annotation.height}"
            )
        image = tv_tensors.Image(pixels)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                annotation.boxes.clone(), format="XYXY", canvas_size=(annotation.height, annotation.width)
            ),
            "labels": annotation.labels.clone(),
            "difficult": annotation.difficult.clone(),
            "image_id": index,
        }
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[Any, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection images differ in size and box count: keep them as lists (what torchvision's models take)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
