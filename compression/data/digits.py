"""The built-in real dataset: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, no download).

Two trees are generated from it, both deterministic in ``seed``:

* ``write_digits_voc``: a PASCAL VOC devkit (``VOCdevkit/VOC2007``) of RGB canvases holding 1-4 digits each,
  read by :class:`compression.data.voc.VOCDetection` exactly like real VOC.
* ``write_digits_cls``: an ImageFolder tree (``{train,val,test}/{0..9}/*.png``) of single digits.

The *source* scans are first split into disjoint, class-stratified train/val/test pools, so no test scan ever
appears in a training image; ``digits_manifest.json`` records, per split, the source indices actually used.
Generators never overwrite: they refuse a non-empty target and write into a temporary sibling folder that is
renamed into place only when complete, so an interrupted run leaves no half-written tree behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from compression.errors import ConfigError, DataError

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST_NAME = "digits_manifest.json"

DEFAULT_DETECTION_IMAGES: dict[str, int] = {"train": 2000, "val": 300, "test": 500}
DEFAULT_CLASSIFICATION_IMAGES: dict[str, int] = {"train": 5000, "val": 1000, "test": 2000}

# Fractions of the 1797 source scans in each pool (train 60 %, val 15 %, test 25 %).
_VAL_FRACTION = 0.15
_TEST_FRACTION = 0.25

_JPEG_QUALITY = 92
# A pixel of an upscaled glyph counts as ink (inside the tight box) at >= 25 % of full ink intensity.
_INK_THRESHOLD = 0.25
# Detection canvases: digit heights as fractions of the canvas side (14..56 px at 128).
_NORMAL_HEIGHT = (0.14, 0.44)
_SMALL_HEIGHT = (0.085, 0.115)
_SMALL_PROBABILITY = 0.025
_FAINT_OPACITY = (0.12, 0.2)
_NORMAL_OPACITY = (0.6, 1.0)
_FAINT_PROBABILITY = 0.025
# VOC "difficult": tight box's longer side below 12.5 % of the canvas, or visible contrast below 0.2.
_DIFFICULT_MAX_SIDE = 0.125
_DIFFICULT_CONTRAST = 0.2
# Two digits may share at most this fraction of the smaller one's tight box.
_MAX_OVERLAP = 0.1
_PLACEMENT_TRIES = 30
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _check_arguments(seed: int, image_size: int, min_size: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or image_size < min_size:
        raise ConfigError(f"image_size: must be an integer >= {min_size}, got {image_size!r}")


def _resolve_counts(num_images: Mapping[str, int] | None, defaults: Mapping[str, int]) -> dict[str, int]:
    counts = dict(defaults)
    if num_images is not None:
        unknown = sorted(set(num_images) - set(SPLITS))
        if unknown:
            raise ConfigError(f"num_images: unknown split(s) {unknown}; expected keys among {list(SPLITS)}")
        counts.update(num_images)
    for split, count in counts.items():
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"num_images.{split}: must be a positive integer, got {count!r}")
    return counts


def split_source_pools(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified pools of source-scan indices (into ``load_digits()``), one per split."""
    targets = load_digits().target
    indices = np.arange(len(targets))
    train_idx, rest = train_test_split(
        indices, test_size=_VAL_FRACTION + _TEST_FRACTION, stratify=targets, random_state=seed
    )
    val_idx, test_idx = train_test_split(
        rest,
        test_size=_TEST_FRACTION / (_VAL_FRACTION + _TEST_FRACTION),
        stratify=targets[rest],
        random_state=seed,
    )
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def _pools_by_class(pool: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
    return [pool[targets[pool] == digit] for digit in range(len(DIGIT_CLASSES))]


def _refuse_non_empty(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DataError(f"{path}: exists and is not a folder; refusing to overwrite it")
    if path.is_dir() and any(path.iterdir()):
        raise DataError(
            f"{path}: folder exists and is not empty; refusing to overwrite it (choose another folder)"
        )


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a file of that name, or no permission
        raise DataError(f"{path}: cannot create the folder ({err.strerror})") from None


def _move_into_place(source: Path, target: Path) -> None:
    """Rename a finished folder into place; never replaces a non-empty folder or an existing file."""
    _refuse_non_empty(target)
    if source.is_dir():
        if target.is_dir():
            target.rmdir()  # empty (checked above); rename onto it then fails if someone filled it meanwhile
        try:
            os.rename(source, target)
        except OSError as err:
            raise DataError(
                f"{target}: could not move the generated folder into place ({err.strerror})"
            ) from err
    else:
        try:
            os.link(source, target)  # unlike rename, link fails instead of replacing an existing file
        except FileExistsError as err:
            raise DataError(f"{target}: file exists; refusing to overwrite it") from err
        source.unlink()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A mildly textured, noisy RGB background (float32 HxWx3, 0..255)."""
    base = (rng.uniform(40.0, 215.0) + rng.uniform(-25.0, 25.0, size=3) - 128.0).astype(np.float32)
    low_frequency = rng.normal(0.0, 16.0, size=(4, 4, 3))
    texture = Image.fromarray(np.clip(128.0 + low_frequency, 0, 255).astype(np.uint8), "RGB")
    background = np.asarray(texture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    background += base
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)  # float32: half the cost of float64
    noise *= np.float32(rng.uniform(2.0, 8.0))
    background += noise
    return np.clip(background, 0.0, 255.0, out=background)


def _glyph_mask(glyph: np.ndarray, height: int, width: int) -> np.ndarray:
    """The 8x8 scan (0..16) upscaled bilinearly to height x width, as ink coverage in [0, 1]."""
    scan = Image.fromarray(np.round(glyph * (255.0 / 16.0)).astype(np.uint8), "L")
    return np.asarray(scan.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """0-based inclusive (x0, y0, x1, y1) of the ink pixels, or None if the glyph has no visible ink."""
    ink = mask >= _INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _ink_colour(rng: np.random.Generator, local_luminance: float) -> np.ndarray:
    """A colour whose luminance differs from the local background by at least 110 (dark on light or vice versa)."""
    if local_luminance >= 128.0:
        luminance = rng.uniform(0.0, max(local_luminance - 110.0, 1.0))
    else:
        luminance = rng.uniform(min(local_luminance + 110.0, 254.0), 255.0)
    return np.clip(luminance + rng.uniform(-35.0, 35.0, size=3), 0.0, 255.0).astype(np.float32)


def _paint(canvas: np.ndarray, mask: np.ndarray, x: int, y: int, colour: np.ndarray, opacity: float) -> float:
    """Alpha-blend a glyph onto the canvas; returns its visible contrast (0..1) against the covered background."""
    height, width = mask.shape
    region = canvas[y : y + height, x : x + width]
    ink = mask >= _INK_THRESHOLD
    local_luminance = float(region[ink].mean()) if ink.any() else float(region.mean())
    alpha = (opacity * mask)[..., None]
    canvas[y : y + height, x : x + width] = region * (1.0 - alpha) + colour * alpha
    return opacity * abs(float(colour.mean()) - local_luminance) / 255.0


def _overlap_fraction(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (so a small digit inside a big one also counts as overlap)."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return ix * iy / min(area_a, area_b)


def _detection_canvas(
    rng: np.random.Generator, size: int, scans: np.ndarray, class_pools: list[np.ndarray]
) -> tuple[np.ndarray, list[dict]]:
    """One canvas with 1-4 digits; objects carry the source index, class, 0-based inclusive box, difficult."""
    canvas = _background(rng, size)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, 5))):
        digit = int(rng.integers(len(class_pools)))
        source = int(rng.choice(class_pools[digit]))
        height_range = _SMALL_HEIGHT if rng.random() < _SMALL_PROBABILITY else _NORMAL_HEIGHT
        height = max(6, round(size * rng.uniform(*height_range)))
        width = max(4, round(height * rng.uniform(0.8, 1.1)))
        mask = _glyph_mask(scans[source], height, width)
        glyph_box = _tight_box(mask)
        if glyph_box is None:
            continue
        for _try in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, size - width + 1))
            y = int(rng.integers(0, size - height + 1))
            box = (x + glyph_box[0], y + glyph_box[1], x + glyph_box[2], y + glyph_box[3])
            if all(_overlap_fraction(box, other["box"]) <= _MAX_OVERLAP for other in objects):
                break
        else:
            continue  # no room left for this digit
        local = canvas[y : y + height, x : x + width]
        colour = _ink_colour(rng, float(local[mask >= _INK_THRESHOLD].mean()))
        faint = rng.random() < _FAINT_PROBABILITY
        opacity = float(rng.uniform(*(_FAINT_OPACITY if faint else _NORMAL_OPACITY)))
        contrast = _paint(canvas, mask, x, y, colour, opacity)
        longer_side = max(box[2] - box[0], box[3] - box[1]) + 1
        difficult = longer_side < _DIFFICULT_MAX_SIDE * size or contrast < _DIFFICULT_CONTRAST
        objects.append({"source": source, "digit": digit, "box": box, "difficult": difficult})
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), objects


def _voc_xml(image_id: str, size: int, objects: list[dict]) -> bytes:
    """VOC's annotation format; boxes as VOC's 1-based inclusive integer pixel coordinates."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "prunepipe digits (scikit-learn load_digits)"
    size_element = ET.SubElement(root, "size")
    ET.SubElement(size_element, "width").text = str(size)
    ET.SubElement(size_element, "height").text = str(size)
    ET.SubElement(size_element, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = DIGIT_CLASSES[obj["digit"]]
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = "0"
        ET.SubElement(element, "difficult").text = "1" if obj["difficult"] else "0"
        bndbox = ET.SubElement(element, "bndbox")
        x0, y0, x1, y1 = obj["box"]
        for tag, value in zip(
            ("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1 + 1, y1 + 1), strict=True
        ):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: changing one split's count never changes another split's images.
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _manifest(kind: str, seed: int, image_size: int, counts: dict[str, int], pools, used, extra) -> bytes:
    manifest = {
        "kind": kind,
        "source": "sklearn.datasets.load_digits",
        "seed": seed,
        "image_size": image_size,
        "num_images": counts,
        "pools": {split: [int(i) for i in pools[split]] for split in SPLITS},
        "source_indices": {split: sorted(used[split]) for split in SPLITS},
        **extra,
    }
    return (json.dumps(manifest, indent=1) + "\n").encode()


def write_digits_voc(
    out_dir: Path, seed: int = 0, image_size: int = 128, num_images: dict[str, int] | None = None
) -> Path:
    """Write ``out_dir/VOCdevkit/VOC2007`` (Annotations, JPEGImages, ImageSets/Main/{train,val,test,trainval}.txt
    and ``digits_manifest.json``) and return ``out_dir/VOCdevkit``.

    Defaults: 2000 train / 300 val / 500 test canvases of 128x128 (a few seconds on one core).
    Raises DataError if ``VOC2007`` already exists and is not empty.
    """
    _check_arguments(seed, image_size, min_size=32)
    counts = _resolve_counts(num_images, DEFAULT_DETECTION_IMAGES)
    devkit = Path(out_dir) / "VOCdevkit"
    target = devkit / "VOC2007"
    _refuse_non_empty(target)
    _make_folder(devkit)

    digits = load_digits()
    pools = split_source_pools(seed)
    partial = Path(tempfile.mkdtemp(prefix=".VOC2007.partial-", dir=devkit))
    try:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (partial / sub).mkdir(parents=True)
        used: dict[str, set[int]] = {}
        num_objects: dict[str, int] = {}
        num_difficult: dict[str, int] = {}
        split_ids: dict[str, list[str]] = {}
        next_id = 1
        for split in SPLITS:
            class_pools = _pools_by_class(pools[split], digits.target)
            used[split], split_ids[split] = set(), []
            num_objects[split] = num_difficult[split] = 0
            for index in range(counts[split]):
                image_id = f"{next_id:06d}"
                next_id += 1
                pixels, objects = _detection_canvas(
                    _image_rng(seed, split, index), image_size, digits.images, class_pools
                )
                Image.fromarray(pixels, "RGB").save(
                    partial / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=_JPEG_QUALITY
                )
                (partial / "Annotations" / f"{image_id}.xml").write_bytes(
                    _voc_xml(image_id, image_size, objects)
                )
                split_ids[split].append(image_id)
                used[split].update(obj["source"] for obj in objects)
                num_objects[split] += len(objects)
                num_difficult[split] += sum(obj["difficult"] for obj in objects)
        split_ids["trainval"] = split_ids["train"] + split_ids["val"]
        for split, ids in split_ids.items():
            (partial / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        extra = {"classes": list(DIGIT_CLASSES), "num_objects": num_objects, "num_difficult": num_difficult}
        manifest = _manifest("detection", seed, image_size, counts, pools, used, extra)
        (partial / MANIFEST_NAME).write_bytes(manifest)
        _move_into_place(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial)  # only our own temporary folder
    return devkit


def _classification_image(rng: np.random.Generator, size: int, scan: np.ndarray) -> np.ndarray:
    canvas = _background(rng, size)
    height = max(6, round(size * rng.uniform(0.5, 0.9)))
    width = min(size, max(4, round(height * rng.uniform(0.8, 1.1))))
    mask = _glyph_mask(scan, height, width)
    x = int(rng.integers(0, size - width + 1))
    y = int(rng.integers(0, size - height + 1))
    region = canvas[y : y + height, x : x + width]
    ink = mask >= _INK_THRESHOLD
    colour = _ink_colour(rng, float(region[ink].mean()) if ink.any() else float(region.mean()))
    _paint(canvas, mask, x, y, colour, float(rng.uniform(*_NORMAL_OPACITY)))
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def write_digits_cls(
    out_dir: Path, seed: int = 0, image_size: int = 32, num_images: dict[str, int] | None = None
) -> Path:
    """Write an ImageFolder tree ``out_dir/{train,val,test}/{0..9}/*.png`` plus ``out_dir/digits_manifest.json``
    and return ``out_dir``.

    Each image is one digit upscaled into an image_size x image_size RGB canvas with random colour, position and
    scale. Classes are balanced (image i of a split shows digit i mod 10). Defaults: 5000 train / 1000 val /
    2000 test. Raises DataError if any of the split folders or the manifest already exists and is not empty.
    """
    _check_arguments(seed, image_size, min_size=16)
    counts = _resolve_counts(num_images, DEFAULT_CLASSIFICATION_IMAGES)
    out_dir = Path(out_dir)
    targets = [out_dir / split for split in SPLITS] + [out_dir / MANIFEST_NAME]
    for target in targets:
        _refuse_non_empty(target)
    _make_folder(out_dir)

    digits = load_digits()
    pools = split_source_pools(seed)
    partial = Path(tempfile.mkdtemp(prefix=".digits-cls.partial-", dir=out_dir))
    try:
        used: dict[str, set[int]] = {}
        for split in SPLITS:
            class_pools = _pools_by_class(pools[split], digits.target)
            for name in DIGIT_CLASSES:
                (partial / split / name).mkdir(parents=True)
            used[split] = set()
            for index in range(counts[split]):
                rng = _image_rng(seed, split, index)
                digit = index % len(DIGIT_CLASSES)
                source = int(rng.choice(class_pools[digit]))
                pixels = _classification_image(rng, image_size, digits.images[source])
                Image.fromarray(pixels, "RGB").save(
                    partial / split / DIGIT_CLASSES[digit] / f"{index:06d}.png"
                )
                used[split].add(source)
        manifest = _manifest(
            "classification", seed, image_size, counts, pools, used, {"classes": list(DIGIT_CLASSES)}
        )
        (partial / MANIFEST_NAME).write_bytes(manifest)
        for target in targets:
            _move_into_place(partial / target.name, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial)  # only our own temporary folder
    return out_dir
