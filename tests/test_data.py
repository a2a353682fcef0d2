"""compression.data: the digits generators, the VOC loader, detection transforms, classification datasets."""

from __future__ import annotations

import json
import pickle
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from compression.config import DataConfig, load_config
from compression.data import (
    DIGIT_CLASSES,
    VOC_CLASSES,
    VOCDetection,
    build_classification_dataset,
    classification_class_names,
    collate_detection,
    eval_transforms,
    ssd_train_transforms,
    write_digits_cls,
    write_digits_voc,
)
from compression.data.digits import MANIFEST_NAME, SPLITS
from compression.data.loaders import build_dataset
from compression.errors import ConfigError, DataError

SMALL = {"train": 24, "val": 6, "test": 12}
SMALL_CLS = {"train": 30, "val": 10, "test": 20}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_devkit(tmp_path_factory) -> Path:
    return write_digits_voc(tmp_path_factory.mktemp("voc"), seed=0, num_images=SMALL)


@pytest.fixture(scope="module")
def larger_devkit(tmp_path_factory) -> Path:
    return write_digits_voc(
        tmp_path_factory.mktemp("voc_large"), seed=1, num_images={"train": 120, "val": 2, "test": 2}
    )


@pytest.fixture(scope="module")
def small_cls(tmp_path_factory) -> Path:
    return write_digits_cls(tmp_path_factory.mktemp("cls"), seed=0, num_images=SMALL_CLS)


@pytest.fixture
def devkit_copy(small_devkit, tmp_path) -> Path:
    """A private copy of the small devkit that a test may break."""
    return Path(shutil.copytree(small_devkit, tmp_path / "VOCdevkit"))


def load_small(devkit: Path, split: str = "train", **kwargs) -> VOCDetection:
    return VOCDetection(devkit, [f"2007:{split}"], DIGIT_CLASSES, **kwargs)


# ---------------------------------------------------------------------------------------------- generation


def test_voc_generation_is_deterministic_in_seed(tmp_path, small_devkit):
    again = write_digits_voc(tmp_path / "again", seed=0, num_images=SMALL)
    other = write_digits_voc(tmp_path / "other", seed=1, num_images=SMALL)
    reference = tree_bytes(small_devkit)
    assert len(reference) == 2 * sum(SMALL.values()) + 4 + 1  # xml + jpg per image, 4 lists, manifest
    assert tree_bytes(again) == reference
    other_bytes = tree_bytes(other)
    assert other_bytes.keys() == reference.keys()
    changed_jpegs = [k for k in reference if k.endswith(".jpg") and other_bytes[k] != reference[k]]
    assert len(changed_jpegs) == sum(SMALL.values())


def test_voc_tree_layout_and_xml_format(small_devkit):
    year = small_devkit / "VOC2007"
    lists = {s: (year / "ImageSets/Main" / f"{s}.txt").read_text().split() for s in (*SPLITS, "trainval")}
    assert {s: len(lists[s]) for s in SPLITS} == SMALL
    assert lists["trainval"] == lists["train"] + lists["val"]
    all_ids = lists["train"] + lists["val"] + lists["test"]
    assert len(set(all_ids)) == len(all_ids)

    root = ET.parse(year / "Annotations" / f"{all_ids[0]}.xml").getroot()
    assert root.tag == "annotation"
    assert root.findtext("folder") == "VOC2007"
    assert root.findtext("filename") == f"{all_ids[0]}.jpg"
    assert [root.findtext(f"size/{t}") for t in ("width", "height", "depth")] == ["128", "128", "3"]
    objects = root.findall("object")
    assert 1 <= len(objects) <= 4
    for obj in objects:
        assert obj.findtext("name") in DIGIT_CLASSES
        assert obj.findtext("pose") == "Unspecified"
        assert obj.findtext("truncated") == "0"
        assert obj.findtext("difficult") in ("0", "1")
        xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
        assert 1 <= xmin < xmax <= 128 and 1 <= ymin < ymax <= 128


def test_source_pools_are_disjoint_and_stratified(small_devkit):
    manifest = json.loads((small_devkit / "VOC2007" / MANIFEST_NAME).read_text())
    pools = {s: set(manifest["pools"][s]) for s in SPLITS}
    used = {s: set(manifest["source_indices"][s]) for s in SPLITS}
    assert pools["train"].isdisjoint(pools["val"]) and pools["train"].isdisjoint(pools["test"])
    assert pools["val"].isdisjoint(pools["test"])
    assert len(pools["train"] | pools["val"] | pools["test"]) == 1797
    for split in SPLITS:
        assert used[split] and used[split] <= pools[split]
    assert used["train"].isdisjoint(used["test"]) and used["val"].isdisjoint(used["test"])

    from sklearn.datasets import load_digits

    targets = load_digits().target
    for split in SPLITS:  # stratified: every class in every pool
        assert set(targets[sorted(pools[split])]) == set(range(10))


def test_refuses_to_write_into_non_empty_folder(tmp_path):
    devkit = write_digits_voc(tmp_path, seed=0, num_images={"train": 3, "val": 2, "test": 2})
    before = tree_bytes(tmp_path)
    with pytest.raises(DataError, match="VOC2007.*not empty") as err:
        write_digits_voc(tmp_path, seed=5, num_images={"train": 3, "val": 2, "test": 2})
    assert str(devkit / "VOC2007") in str(err.value)
    assert tree_bytes(tmp_path) == before
    assert [p.name for p in devkit.iterdir()] == ["VOC2007"]  # no temporary folder left behind


def test_an_existing_empty_voc_folder_is_filled(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    devkit = write_digits_voc(tmp_path, num_images={"train": 2, "val": 1, "test": 1})
    assert len(load_small(devkit, "trainval")) == 3


def test_bad_generator_arguments(tmp_path):
    with pytest.raises(ConfigError, match="num_images"):
        write_digits_voc(tmp_path, num_images={"training": 5})
    with pytest.raises(ConfigError, match="image_size"):
        write_digits_voc(tmp_path, image_size=8)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- VOC loader


def test_loader_reads_generated_tree(small_devkit):
    dataset = load_small(small_devkit, "trainval")
    assert len(dataset) == SMALL["train"] + SMALL["val"] == len(dataset.ids)
    assert dataset.ids[0] == "2007/000001"
    assert dataset.class_names == DIGIT_CLASSES
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert isinstance(image, tv_tensors.Image)
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 128, 128)
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (128, 128)
        assert len(boxes) == len(target["labels"]) == len(target["difficult"]) >= 1
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
        assert ((target["labels"] >= 1) & (target["labels"] <= 10)).all()
        assert target["image_id"] == index


def test_loader_box_coordinates_follow_voc_convention(small_devkit):
    dataset = load_small(small_devkit)
    root = ET.parse(small_devkit / "VOC2007" / "Annotations" / "000001.xml").getroot()
    obj = root.findall("object")[0]
    xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
    _, target = dataset[0]
    assert target["boxes"][0].tolist() == [xmin - 1, ymin - 1, xmax, ymax]
    assert DIGIT_CLASSES[int(target["labels"][0]) - 1] == obj.findtext("name")


def test_difficult_objects_exist_and_can_be_dropped(larger_devkit):
    manifest = json.loads((larger_devkit / "VOC2007" / MANIFEST_NAME).read_text())
    kept = load_small(larger_devkit)
    difficult = torch.cat([a.difficult for a in kept.annotations])
    assert difficult.sum() == manifest["num_difficult"]["train"]
    assert 0.01 < difficult.float().mean() < 0.15  # a few percent
    dropped = load_small(larger_devkit, keep_difficult=False)
    assert not torch.cat([a.difficult for a in dropped.annotations]).any()
    assert sum(len(a.labels) for a in dropped.annotations) == len(difficult) - int(difficult.sum())


def test_combined_image_sets(small_devkit):
    combined = VOCDetection(small_devkit, ["2007:train", "2007:test"], DIGIT_CLASSES)
    assert len(combined) == SMALL["train"] + SMALL["test"]
    assert combined[len(combined) - 1][1]["image_id"] == len(combined) - 1


def set_box(xml_path: Path, **coords: str) -> None:
    tree = ET.parse(xml_path)
    bndbox = tree.getroot().find("object/bndbox")
    for tag, value in coords.items():
        bndbox.find(tag).text = value
    tree.write(xml_path)


def set_first_name(xml_path: Path, name: str) -> None:
    tree = ET.parse(xml_path)
    tree.getroot().find("object/name").text = name
    tree.write(xml_path)


def xml_of(devkit: Path, image_id: str = "000001") -> Path:
    return devkit / "VOC2007" / "Annotations" / f"{image_id}.xml"


def jpg_of(devkit: Path, image_id: str = "000001") -> Path:
    return devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"


@pytest.mark.parametrize(
    ("break_it", "named_file", "problem"),
    [
        (lambda d: jpg_of(d).unlink(), jpg_of, "image missing"),
        (lambda d: xml_of(d).unlink(), xml_of, "annotation missing"),
        (lambda d: xml_of(d).write_text("<annotation><size><width>128</width>"), xml_of, "malformed XML"),
        (lambda d: set_box(xml_of(d), xmax="129"), xml_of, "object 1 box .* lies outside the 128x128 image"),
        (lambda d: set_box(xml_of(d), xmin="0"), xml_of, "lies outside"),
        (
            lambda d: set_box(xml_of(d), xmin="10", xmax="10"),
            xml_of,
            r"object 1 box \(x1=10, x2=10\) has zero area",
        ),
        (lambda d: set_box(xml_of(d), ymin="30", ymax="20"), xml_of, "inverted"),
        (lambda d: set_box(xml_of(d), ymin="abc"), xml_of, "'abc', not a number"),
        (lambda d: set_first_name(xml_of(d), "cat"), xml_of, "object 1 has unknown class 'cat'"),
    ],
)
def test_bad_devkit_is_rejected_at_construction(devkit_copy, break_it, named_file, problem):
    break_it(devkit_copy)
    with pytest.raises(DataError, match=problem) as err:
        load_small(devkit_copy)
    message = str(err.value)
    assert message.startswith(str(named_file(devkit_copy)) + ": ")
    assert "\n" not in message


def test_image_size_must_match_its_annotation(devkit_copy):
    tree = ET.parse(xml_of(devkit_copy))
    tree.getroot().find("size/width").text = "256"
    tree.write(xml_of(devkit_copy))
    with pytest.raises(DataError, match="image is 128x128 but 000001.xml says 256x128") as err:
        load_small(devkit_copy)
    assert str(err.value).startswith(str(jpg_of(devkit_copy)))


def test_split_list_naming_a_missing_image(devkit_copy):
    split_file = devkit_copy / "VOC2007" / "ImageSets" / "Main" / "train.txt"
    split_file.write_text(split_file.read_text() + "123456\n")
    with pytest.raises(DataError, match=r"123456.xml: annotation missing .*listed in .*train.txt"):
        load_small(devkit_copy)


def test_missing_devkit_year_and_split_list(tmp_path, small_devkit):
    with pytest.raises(DataError, match="VOC devkit folder not found") as err:
        load_small(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DataError, match="VOC2012: folder for image set '2012:trainval' not found"):
        VOCDetection(small_devkit, ["2007:train", "2012:trainval"], DIGIT_CLASSES)
    with pytest.raises(DataError, match=r"Main/nosuch.txt: split list"):
        load_small(small_devkit, "nosuch")
    with pytest.raises(ConfigError, match="expected 'YEAR:SPLIT'"):
        VOCDetection(small_devkit, ["2007-train"], DIGIT_CLASSES)


def test_real_voc_class_names_reject_digits(small_devkit):
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    with pytest.raises(DataError, match="unknown class"):
        VOCDetection(small_devkit, ["2007:val"], VOC_CLASSES)


# ---------------------------------------------------------------------------------------------- transforms


def test_ssd_train_transforms_keep_boxes_valid(small_devkit):
    torch.manual_seed(0)
    dataset = load_small(small_devkit, transforms=ssd_train_transforms(96, hflip=False))
    raw = load_small(small_devkit)
    lost_boxes = 0
    for index in range(16):  # RandomIoUCrop is slow-ish (many small tensor ops per trial): keep it short
        image, target = dataset[index]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 96, 96)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes = target["boxes"]
        assert tuple(boxes.canvas_size) == (96, 96)
        assert len(boxes) == len(target["labels"]) == len(target["difficult"])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 96).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
        assert target["image_id"] == index
        lost_boxes += len(raw.annotations[index].labels) - len(boxes)
    assert lost_boxes > 0  # RandomIoUCrop did cut boxes away, and sanitising removed them consistently


def test_sanitize_step_drops_labels_and_difficult_together():
    sanitize = next(t for t in ssd_train_transforms(64).transforms if isinstance(t, v2.SanitizeBoundingBoxes))
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        [[0, 0, 10, 10], [0, 0, 0, 0], [5, 5, 30, 40]], format="XYXY", canvas_size=(64, 64)
    )
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3]),
        "difficult": torch.tensor([False, True, True]),
    }
    _, out = sanitize(image, target)
    assert out["labels"].tolist() == [1, 3]
    assert out["difficult"].tolist() == [False, True]


def test_transforms_pickle_for_dataloader_workers():
    restored = pickle.loads(pickle.dumps(ssd_train_transforms(64)))
    assert sum(isinstance(t, v2.RandomHorizontalFlip) for t in restored.transforms) == 1
    assert not any(
        isinstance(t, v2.RandomHorizontalFlip) for t in ssd_train_transforms(64, hflip=False).transforms
    )


def test_eval_transforms_only_convert(small_devkit):
    raw_image, raw_target = load_small(small_devkit)[0]
    image, target = load_small(small_devkit, transforms=eval_transforms())[0]
    assert image.dtype == torch.float32 and image.shape == raw_image.shape
    assert torch.allclose(image, raw_image.float() / 255)
    assert torch.equal(target["boxes"], raw_target["boxes"])


def test_collate_detection(small_devkit):
    dataset = load_small(small_devkit, transforms=eval_transforms())
    images, targets = collate_detection([dataset[0], dataset[1], dataset[2]])
    assert len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == [0, 1, 2]
    assert all(torch.equal(images[i], dataset[i][0]) for i in range(3))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == 4 and isinstance(targets[3]["boxes"], tv_tensors.BoundingBoxes)


# ---------------------------------------------------------------------------------------------- classification


def test_digits_cls_tree_and_imagefolder_dataset(small_cls):
    assert classification_class_names("imagefolder", small_cls) == list(DIGIT_CLASSES)
    manifest = json.loads((small_cls / MANIFEST_NAME).read_text())
    used = {s: set(manifest["source_indices"][s]) for s in SPLITS}
    assert used["train"].isdisjoint(used["test"]) and used["val"].isdisjoint(used["test"])
    assert used["train"].isdisjoint(used["val"])
    for split in SPLITS:
        dataset = build_classification_dataset("imagefolder", small_cls, split, train_aug=split == "train")
        assert len(dataset) == SMALL_CLS[split]
        labels = [dataset[i][1] for i in range(len(dataset))]
        assert sorted(set(labels)) == list(range(10))
    image, label = build_classification_dataset("imagefolder", small_cls, "test", train_aug=False)[0]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and tuple(image.shape) == (3, 32, 32)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and isinstance(label, int)


def test_digits_cls_is_deterministic_and_refuses_overwrite(tmp_path, small_cls):
    again = write_digits_cls(tmp_path / "again", seed=0, num_images=SMALL_CLS)
    assert tree_bytes(again) == tree_bytes(small_cls)
    before = tree_bytes(again)
    with pytest.raises(DataError, match="not empty") as err:
        write_digits_cls(again, seed=3, num_images=SMALL_CLS)
    assert str(again / "train") in str(err.value)
    assert tree_bytes(again) == before


def test_imagefolder_split_with_missing_class_is_rejected(tmp_path, small_cls):
    root = Path(shutil.copytree(small_cls, tmp_path / "cls"))
    shutil.rmtree(root / "val" / "7")
    with pytest.raises(DataError, match="class folders .* differ") as err:
        build_classification_dataset("imagefolder", root, "val", train_aug=False)
    assert str(root / "val") in str(err.value)
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="split folder not found"):
        build_classification_dataset("imagefolder", root, "test", train_aug=False)


def test_cifar_missing_folder(tmp_path):
    expected = str(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match="CIFAR-10 folder not found") as err:
        build_classification_dataset("cifar10", tmp_path, "train", train_aug=True)
    assert str(err.value).startswith(expected)
    with pytest.raises(DataError, match="CIFAR-10 folder not found"):
        classification_class_names("cifar10", tmp_path)
    with pytest.raises(ConfigError, match="split 'dev'"):
        build_classification_dataset("cifar10", tmp_path, "dev", train_aug=False)


# ---------------------------------------------------------------------------------------------- validation split


def split_ids(cfg: DataConfig, split: str) -> list[str]:
    dataset = build_dataset(cfg, split, train=False, image_size=64)
    if isinstance(dataset, Subset):
        return [dataset.dataset.ids[i] for i in dataset.indices]
    return list(dataset.ids)


def holdout_config(devkit: Path, **changes) -> DataConfig:
    settings = {"root": devkit, "builtin": None, "train_sets": ["2007:trainval"], "val_sets": [], "val_holdout": 0.2}
    return DataConfig(**{**settings, **changes})


def test_held_out_validation_images_are_disjoint_from_training_and_cover_it(small_devkit):
    cfg = holdout_config(small_devkit)
    train, val = split_ids(cfg, "train"), split_ids(cfg, "val")
    trainval = split_ids(cfg.model_copy(update={"val_holdout": None, "val_sets": ["2007:val"]}), "train")
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(trainval) and len(trainval) == SMALL["train"] + SMALL["val"]
    assert len(val) == round(0.2 * len(trainval))


def test_held_out_validation_images_are_fixed_by_the_seed(small_devkit):
    val = split_ids(holdout_config(small_devkit, seed=3), "val")
    assert split_ids(holdout_config(small_devkit, seed=3), "val") == val
    assert split_ids(holdout_config(small_devkit, seed=4), "val") != val


def test_an_image_listed_twice_for_training_is_held_out_whole(small_devkit):
    cfg = holdout_config(small_devkit, train_sets=["2007:train", "2007:trainval"])
    train, val = split_ids(cfg, "train"), split_ids(cfg, "val")
    assert val and not set(train) & set(val)


def test_a_holdout_that_leaves_nothing_to_train_on_is_refused(tmp_path):
    devkit = write_digits_voc(tmp_path, seed=0, num_images={"train": 1, "val": 1, "test": 1})
    with pytest.raises(DataError, match="leaves none to train on"):
        build_dataset(holdout_config(devkit, train_sets=["2007:train"]), "train", train=False, image_size=64)


def test_the_built_in_presets_validate_on_images_they_do_not_train_on(small_devkit):
    for preset in ("default", "digits_voc_thorough"):
        data = load_config(preset).data.model_copy(update={"root": small_devkit, "builtin": None})
        assert not set(split_ids(data, "train")) & set(split_ids(data, "val")), preset
