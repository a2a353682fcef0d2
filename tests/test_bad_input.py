"""Bad input through the ``prunepipe`` CLI: one table of cases, each ending the same way.

Every case breaks one thing in a private sandbox (a tiny digits devkit, a checkpoint, a config file, a run
folder), runs a CLI command through ``flows.cli.main`` (the real entry point: argument parsing, the
``PrunepipeError`` handler and its exit code) in this process, and checks: exit code 2, exactly one line on
stderr, no traceback, the line names what is wrong and where, and no file that existed before changed.
The functions behind the messages have their own unit tests (test_config, test_data, test_checkpoint,
test_selection, test_distill, test_ray_trainer, ...); this file checks what a user sees. The console entry
point in its own process (warnings, logging set-up, the interpreter's exit) is checked by
``test_security.py::test_a_planted_pickle_is_refused_by_the_real_cli``.

docs/bad-input.md's table is this table's messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from compression.checkpoint import Checkpoint, save_checkpoint
from compression.config import load_config
from compression.data.digits import write_digits_voc
from compression.jobs import initial_checkpoint
from compression.models import build_model

CONFIG = """\
name: bad
workdir: runs
data:
  kind: voc
  root: VOCdevkit
  builtin: null
  classes: digits
  batch_size: 2
  eval_batch_size: 4
  num_workers: 0
  max_images: 2
model: {name: ssd_vgg_lite, width_mult: 0.125, image_size: 128}
stages:
  pretrain: {epochs: 1}
  sparsity: {epochs: 1, optimizer: adamw, lr: 0.001}
  retrain: {epochs: 1}
  distill: {epochs: 1}
  phases:
    - {name: p1, layers: [conv1_1, conv1_2]}
tracking: {mlflow_uri: "sqlite:///mlflow.db"}
compute: {use_gpu: false, num_workers: 1, amp_bf16: false, channels_last: false}  # tiny models train in float32 (conftest.py)
"""


@dataclass(frozen=True)
class Sandbox:
    """A private folder that a case may break; the CLI runs with it as the working directory."""

    root: Path

    @property
    def voc(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2007"

    @property
    def ckpt(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / "bad-local"

    def test_ids(self) -> list[str]:
        return (self.voc / "ImageSets" / "Main" / "test.txt").read_text().split()

    def xml(self, index: int = 0) -> Path:
        return self.voc / "Annotations" / f"{self.test_ids()[index]}.xml"

    def jpg(self, index: int = 0) -> Path:
        return self.voc / "JPEGImages" / f"{self.test_ids()[index]}.jpg"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Devkit (4/2/4 images), config.yaml, model.safetensors and a previous run's output, built once."""
    root = tmp_path_factory.mktemp("bad-input-template")
    write_digits_voc(root, seed=0, num_images={"train": 4, "val": 2, "test": 4})
    (root / "config.yaml").write_text(CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(root / "config.yaml")
    finally:
        os.chdir(cwd)
    torch.manual_seed(0)
    save_checkpoint(initial_checkpoint(cfg), root / "model.safetensors")
    # Output of an earlier command, where the commands here would write: it must survive every case.
    (root / "runs" / "bad-local").mkdir(parents=True)
    (root / "runs" / "bad-local" / "notes.txt").write_text("an earlier run's notes\n")
    return root


@pytest.fixture
def sandbox(template, tmp_path, monkeypatch) -> Sandbox:
    root = Path(shutil.copytree(template, tmp_path / "sandbox"))
    monkeypatch.chdir(root)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    return Sandbox(root)


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- breakers


def nothing(box: Sandbox) -> dict:
    return {}


def write(relative: str, text: str) -> Callable[[Sandbox], dict]:
    def make(box: Sandbox) -> dict:
        (box.root / relative).write_text(text)
        return {}

    return make


def occupied_folder(box: Sandbox) -> dict:
    (box.root / "staged").mkdir()
    (box.root / "staged" / "notes.txt").write_text("someone else's file\n")
    return {}


def edit_xml(old: str, new: str, index: int = 0) -> Callable[[Sandbox], dict]:
    def make(box: Sandbox) -> dict:
        xml = box.xml(index)
        text = xml.read_text()
        assert old in text, f"{old!r} not in {xml}"
        xml.write_text(text.replace(old, new, 1))
        return {"xml": xml.relative_to(box.root)}

    return make


def xml_text(box: Sandbox, tag: str, index: int = 0) -> str:
    text = box.xml(index).read_text()
    return text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]


def box_outside_image(box: Sandbox) -> dict:
    old = f"<xmax>{xml_text(box, 'xmax')}</xmax>"
    return {**edit_xml(old, "<xmax>500</xmax>")(box)}


def nan_coordinate(box: Sandbox) -> dict:
    return edit_xml(f"<xmin>{xml_text(box, 'xmin')}</xmin>", "<xmin>nan</xmin>")(box)


def unknown_class(box: Sandbox) -> dict:
    return edit_xml(f"<name>{xml_text(box, 'name')}</name>", "<name>eleven</name>")(box)


def remove_devkit(box: Sandbox) -> dict:
    shutil.rmtree(box.root / "VOCdevkit")
    return {}


def remove_image(box: Sandbox) -> dict:
    jpg = box.jpg(1)
    jpg.unlink()
    return {"jpg": jpg.relative_to(box.root)}


def resize_image(box: Sandbox) -> dict:
    jpg = box.jpg(0)
    Image.new("RGB", (64, 96)).save(jpg)
    return {"jpg": jpg.relative_to(box.root), "xml_name": box.xml(0).name}


def empty_split(box: Sandbox) -> dict:
    (box.voc / "ImageSets" / "Main" / "test.txt").write_text("\n")
    return {}


def split_lists(name: str) -> Callable[[Sandbox], dict]:
    def make(box: Sandbox) -> dict:
        (box.voc / "ImageSets" / "Main" / "test.txt").write_text(f"{box.test_ids()[0]}\n{name}\n")
        return {}

    return make


def symlink_out_of_images(box: Sandbox) -> dict:
    outside = box.root / "outside.jpg"
    shutil.copy(box.jpg(1), outside)
    box.jpg(1).unlink()
    box.jpg(1).symlink_to(outside)
    return {"jpg": box.jpg(1).relative_to(box.root)}


def torch_save_pickle(box: Sandbox) -> dict:
    box.ckpt.unlink()
    torch.save({"weight": torch.zeros(2)}, box.ckpt)
    return {}


def truncate_checkpoint(box: Sandbox) -> dict:
    data = box.ckpt.read_bytes()
    box.ckpt.write_bytes(data[: len(data) // 2])
    return {}


def header_only(metadata: dict[str, str]) -> Callable[[Sandbox], dict]:
    def make(box: Sandbox) -> dict:
        save_file({"weight": torch.zeros(2)}, box.ckpt, metadata=metadata)
        return {}

    return make


def metadata_of(box: Sandbox, **changes) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(box.ckpt), framework="pt") as handle:
        meta = json.loads(handle.metadata()["prunepipe"])
    meta.update(changes)
    return {"prunepipe": json.dumps(meta)}


def metadata_changed(**changes) -> Callable[[Sandbox], dict]:
    def make(box: Sandbox) -> dict:
        from safetensors.torch import load_file

        tensors = load_file(box.ckpt)
        save_file(tensors, box.ckpt, metadata=metadata_of(box, **changes))
        return {}

    return make


def without_model_name(box: Sandbox) -> dict:
    meta = json.loads(metadata_of(box)["prunepipe"])
    del meta["model_name"]
    from safetensors.torch import load_file

    save_file(load_file(box.ckpt), box.ckpt, metadata={"prunepipe": json.dumps(meta)})
    return {}


def other_architecture_weights(box: Sandbox) -> dict:
    """ssd_vgg_lite metadata over the weights of a vgg16_cifar: a file stitched from two models."""
    weights = {k: v.contiguous() for k, v in build_model("vgg16_cifar", num_classes=10, width_mult=0.0625).state_dict().items()}
    save_file(weights, box.ckpt, metadata=metadata_of(box))
    return {}


def classifier_checkpoint(box: Sandbox) -> dict:
    model = build_model("vgg16_cifar", num_classes=10, width_mult=0.0625)
    save_checkpoint(Checkpoint(model=model, model_name="vgg16_cifar", model_args={"num_classes": 10, "width_mult": 0.0625},
                               class_names=[str(i) for i in range(10)]), box.root / "classifier.safetensors")
    return {}


def other_classes_checkpoint(box: Sandbox) -> dict:
    from compression.checkpoint import load_checkpoint

    ckpt = load_checkpoint(box.ckpt)
    ckpt.class_names = [chr(ord("a") + i) for i in range(10)]
    save_checkpoint(ckpt, box.root / "letters.safetensors")
    return {}


def _plant(box: Sandbox, index: int, stage: str, phase: str | None = None, **changes) -> Path:
    from compression.checkpoint import load_checkpoint

    ckpt = load_checkpoint(box.ckpt)
    ckpt.stage, ckpt.phase = stage, phase
    for key, value in changes.items():
        setattr(ckpt, key, value)
    name = f"{index:02d}_{stage}" + (f"_{phase}" if phase else "")
    return save_checkpoint(ckpt, box.run_dir / f"{name}.safetensors")


def _selection(box: Sandbox, remove: int, keep: int) -> Path:
    path = box.run_dir / "02_selection_p1.json"
    path.write_text(json.dumps({"criterion": "seed", "phase": "p1", "layers": {
        "backbone.conv1_1": {"remove": list(range(remove)), "keep": keep}}}))
    return path


def selection_emptying_a_layer(box: Sandbox) -> dict:
    """A resumable run whose selection (edited by hand) removes every filter of conv1_1."""
    _plant(box, 0, "pretrain")
    _plant(box, 1, "sparsity", "p1", extra={"alpha": 1.0})
    channels = initial_checkpoint(load_config(box.root / "config.yaml")).model.get_submodule("backbone.conv1_1").out_channels
    return {"selection": _selection(box, channels, 0).relative_to(box.root), "channels": channels}


def student_of_other_classes(box: Sandbox) -> dict:
    """A resumable run whose retrained student (04) has other class names than its teacher (00)."""
    _plant(box, 0, "pretrain")
    _plant(box, 1, "sparsity", "p1", extra={"alpha": 1.0})
    _selection(box, 0, 8)
    _plant(box, 3, "prune", "p1")
    _plant(box, 4, "retrain", "p1", class_names=[chr(ord("a") + i) for i in range(10)])
    return {"teacher": (box.run_dir / "00_pretrain.safetensors").relative_to(box.root)}


def pretrained_only(box: Sandbox) -> dict:
    _plant(box, 0, "pretrain")
    return {}


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    where: str  # where it is caught (docs/bad-input.md's column)
    make: Callable[[Sandbox], dict]
    args: list[str]
    expect: list[str]  # substrings of the one line; {placeholders} from the sandbox and make()'s dict
    new_files_ok: bool = False  # the command may add files (a resumed run records its config), never change one
    marks: list = field(default_factory=list)


COMPRESS = ["compress", "--config", "config.yaml"]
EVAL = ["eval", "model.safetensors", "--config", "config.yaml"]
RUN = ["run", "--config", "config.yaml"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")

CASES = [
    # --- config: caught by compression.config when the CLI loads it, before anything else
    Case("config-unknown-key", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.retrain.epoch=3"],
         ["config.yaml", "unknown key 'stages.retrain.epoch'", "epochs"]),
    Case("config-wrong-type", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.retrain.epochs=three"],
         ["config.yaml", "key 'stages.retrain.epochs'", "integer", "'three'"]),
    Case("config-gamma-out-of-range", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.selection.gamma=1.5"],
         ["key 'stages.selection.gamma'", "less than or equal to 1", "1.5"]),
    Case("config-ratio-out-of-range", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.selection.prune_ratio=0"],
         ["key 'stages.selection.prune_ratio'", "greater than 0"]),
    Case("config-negative-lambda", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.sparsity.l1_lambda=-0.01"],
         ["key 'stages.sparsity.l1_lambda'", "greater than or equal to 0", "-0.01"]),
    Case("config-bad-choice", "config load (pydantic schema)", nothing,
         [*COMPRESS, "--set", "stages.selection.criterion=magnitude"],
         ["key 'stages.selection.criterion'", "'seed'", "'taylor'", "'magnitude'"]),
    Case("config-model-data-mismatch", "config load (cross-field check)", nothing,
         [*COMPRESS, "--set", "model.name=vgg16_cifar"],
         ["config.yaml: model 'vgg16_cifar' is a classifier", "data.kind"]),
    Case("config-bad-yaml", "config load (YAML parser)", write("config.yaml", "name: bad\nstages: [1, 2\n"),
         COMPRESS, ["config.yaml", "line 3", "not valid YAML"]),
    Case("config-not-a-mapping", "config load", write("config.yaml", "- name\n- bad\n"),
         COMPRESS, ["config.yaml", "top level must be a mapping", "list"]),
    Case("config-missing-preset", "config load (preset lookup)", nothing,
         ["compress", "--config", "no_such_preset"], ["no_such_preset", "config file not found", "default"]),
    Case("config-set-without-value", "--set parsing", nothing,
         [*COMPRESS, "--set", "stages.retrain.epochs"], ["--set 'stages.retrain.epochs'", "KEY.PATH=VALUE"]),
    Case("config-set-into-a-value", "--set parsing", nothing,
         [*COMPRESS, "--set", "name.first=x"], ["--set 'name.first=x'", "'name' is a value, not a section"]),
    Case("config-bad-image-set", "config load (pydantic schema)", nothing,
         [*EVAL, "--set", "data.test_sets=[2007-test]"],
         ["config.yaml: key 'data.test_sets': image set '2007-test'", "YEAR:SPLIT"]),
    # --- stages, checked before any training
    Case("phase-unknown-layer", "method check before the first stage", nothing,
         [*COMPRESS, "--set", "stages.phases=[{{name: p1, layers: [conv1_1, conv99_9]}}]"],
         ["stages.phases.0 (p1)", "unknown layer 'conv99_9'"]),
    Case("phase-head-layer", "method check before the first stage", nothing,
         [*COMPRESS, "--set", "stages.phases=[{{name: p1, layers: [head.classification_head.module_list.0]}}]"],
         ["stages.phases.0 (p1)", "head.classification_head.module_list.0", "SSD head conv"]),
    Case("phase-not-a-conv", "method check before the first stage", nothing,
         [*COMPRESS, "--set", "stages.phases=[{{name: p1, layers: [backbone]}}]"],
         ["stages.phases.0 (p1)", "layer backbone is a LiteVGGFeatureExtractor", "not a prunable Conv2d/Linear"]),
    Case("phase-name-twice", "method check before the first stage", nothing,
         [*COMPRESS, "--set", "stages.phases=[{{name: p1, layers: [conv1_1]}}, {{name: p1, layers: [conv2_1]}}]"],
         ["stages.phases.1.name", "'p1' is used twice"]),
    Case("ranking-criterion-without-target", "method check before the first stage", nothing,
         [*COMPRESS, "--set", "stages.selection.criterion=l1_norm"],
         ["stages.selection", "'l1_norm' needs prune_ratio or target_flops_ratio"]),
    # --- data: caught when the dataset is built (eval builds the test split before evaluating)
    Case("data-missing-devkit", "VOC dataset construction", remove_devkit, EVAL,
         ["VOCdevkit", "VOC devkit folder not found"]),
    Case("data-missing-split-list", "VOC dataset construction", nothing,
         [*EVAL, "--set", "data.test_sets=[2007:minival]"],
         ["VOCdevkit/VOC2007/ImageSets/Main/minival.txt", "split list for image set '2007:minival' not found"]),
    Case("data-empty-split", "VOC dataset construction", empty_split, EVAL,
         ["VOCdevkit/VOC2007/ImageSets/Main/test.txt", "split list is empty"]),
    Case("data-image-missing", "VOC dataset construction", remove_image, EVAL,
         ["{jpg}", "image missing", "listed in VOCdevkit/VOC2007/ImageSets/Main/test.txt"]),
    Case("data-annotation-missing", "VOC dataset construction", split_lists("009999"), EVAL,
         ["VOCdevkit/VOC2007/Annotations/009999.xml", "annotation missing", "'009999'"]),
    Case("data-xml-malformed", "VOC annotation parsing", edit_xml("</annotation>", "</annotatio>"), EVAL,
         ["{xml}", "malformed XML", "mismatched tag"]),
    Case("data-xml-number-garbage", "VOC annotation parsing", edit_xml("<width>128</width>", "<width>12B</width>"),
         EVAL, ["{xml}", "<size> <width> is '12B', not a number"]),
    Case("data-xml-nan-coordinate", "VOC annotation parsing", nan_coordinate, EVAL,
         ["{xml}", "object 1 <bndbox> <xmin> is 'nan', not a finite number"]),
    Case("data-xml-entities", "VOC annotation parsing (DTD check)",
         edit_xml("<annotation>", '<!DOCTYPE annotation [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n<annotation>'),
         EVAL, ["{xml}", "declares a DTD or entities (<!DOCTYPE>)"]),
    Case("data-box-outside-image", "VOC annotation parsing", box_outside_image, EVAL,
         ["{xml}", "object 1 box", "x2=500", "lies outside the 128x128 image"]),
    Case("data-unknown-class", "VOC annotation parsing", unknown_class, EVAL,
         ["{xml}", "object 1 has unknown class 'eleven'", "known: 0, 1"]),
    Case("data-image-size-mismatch", "VOC dataset construction (image header)", resize_image, EVAL,
         ["{jpg}", "image is 64x96 but {xml_name} says 128x128"]),
    Case("data-image-name-leaves-root", "VOC dataset construction (path check)", split_lists("../../../../etc/passwd"),
         EVAL, ["VOCdevkit/VOC2007/ImageSets/Main/test.txt", "'../../../../etc/passwd'", "not a plain file name"]),
    Case("data-image-symlink-out-of-root", "VOC dataset construction (path check)", symlink_out_of_images, EVAL,
         ["{jpg}", "leads outside", "JPEGImages"]),
    Case("data-unknown-split", "CLI eval --split", nothing, [*EVAL, "--split", "testing"],
         ["Invalid value for '--split': 'testing' is not one of 'train', 'val', 'test'", "eval --help"]),
    Case("data-unknown-builtin", "CLI data", nothing, ["data", "digits-xyz", "--out", "out"],
         ["Invalid value for 'dataset': 'digits-xyz' is not one of 'digits-voc', 'digits-cls', 'stage'",
          "data --help"]),
    Case("data-output-not-empty", "built-in dataset writer", nothing, ["data", "digits-voc", "--out", "."],
         ["VOCdevkit/VOC2007", "folder exists and is not empty", "refusing to overwrite"]),
    # --- checkpoints: caught by compression.checkpoint before any model or data is built
    Case("ckpt-missing", "checkpoint reader", nothing, ["info", "nowhere.safetensors"],
         ["nowhere.safetensors: checkpoint not found"]),
    Case("ckpt-folder", "checkpoint reader", nothing, ["info", "runs"], ["runs: is a folder"]),
    Case("ckpt-pickle", "checkpoint reader (magic bytes)", torch_save_pickle, ["info", "model.safetensors"],
         ["model.safetensors", "looks like a pickle/torch.save file", "never unpickles"]),
    Case("ckpt-truncated", "checkpoint reader (safetensors)", truncate_checkpoint, ["info", "model.safetensors"],
         ["model.safetensors", "not a readable safetensors checkpoint"]),
    Case("ckpt-metadata-not-json", "checkpoint reader (metadata)", header_only({"prunepipe": "{model_name: ssd"}),
         ["info", "model.safetensors"], ["model.safetensors", "checkpoint metadata is not valid JSON"]),
    Case("ckpt-no-prunepipe-metadata", "checkpoint reader (metadata)", header_only({"format": "pt"}),
         ["info", "model.safetensors"], ["model.safetensors", "without prunepipe metadata"]),
    Case("ckpt-metadata-incomplete", "checkpoint reader (metadata)", without_model_name,
         ["info", "model.safetensors"], ["model.safetensors", "checkpoint metadata 'model_name' is None, expected a str"]),
    Case("ckpt-metadata-unknown-model", "checkpoint reader (metadata)", metadata_changed(model_name="resnet9"),
         ["info", "model.safetensors"], ["model.safetensors", "cannot rebuild its model", "unknown model 'resnet9'"]),
    Case("ckpt-other-architecture-weights", "checkpoint loader (weights vs model)", other_architecture_weights,
         EVAL, ["model.safetensors", "is it a checkpoint of another architecture?"]),
    Case("ckpt-wrong-architecture-base", "pretrain stage (adopting a base checkpoint)", classifier_checkpoint,
         [*COMPRESS, "--set", "stages.pretrain.checkpoint=classifier.safetensors"],
         ["classifier.safetensors", "holds a 'vgg16_cifar' model, but 'ssd_vgg_lite' was expected"],
         new_files_ok=True),
    Case("ckpt-classifier-on-detection-data", "CLI eval (checkpoint vs data)", classifier_checkpoint,
         ["eval", "classifier.safetensors", "--config", "config.yaml"],
         ["classifier.safetensors", "'vgg16_cifar'", "data.kind"]),
    Case("ckpt-base-of-other-classes", "pretrain stage (adopting a base checkpoint)", other_classes_checkpoint,
         [*COMPRESS, "--set", "stages.pretrain.checkpoint=letters.safetensors"],
         ["letters.safetensors", "its classes", "differ from the dataset's"], new_files_ok=True),
    # --- stages that run: a resumed run whose planted files are wrong, a diverging loss
    Case("stage-selection-empties-layer", "prune stage", selection_emptying_a_layer, [*COMPRESS, "--resume"],
         ["{selection}", "removes all {channels} filters of layer 'backbone.conv1_1'"], new_files_ok=True),
    Case("stage-teacher-other-classes", "distill stage", student_of_other_classes, [*COMPRESS, "--resume"],
         ["{teacher}", "the teacher's 10 classes", "differ from the student's 10 (a, b, c", "same classes"],
         new_files_ok=True),
    Case("stage-loss-not-finite", "training loop (every step)", pretrained_only,
         [*COMPRESS, "--resume", "--set", "stages.sparsity.l1_lambda=1e308"],
         ["training loss became inf at epoch 1, step 1", "last finished epoch's checkpoint is kept"],
         new_files_ok=True),
    Case("run-existing-run-dir", "in-process pipeline (run folder)", pretrained_only, COMPRESS,
         ["runs/bad-local: already holds 1 checkpoint(s)", "--resume", "nothing was overwritten"]),
    # --- services: `prunepipe run` checks them in its preflight, before Prefect, Ray or MLflow start
    Case("service-mlflow-unreachable", "run preflight (tracking)", nothing,
         [*RUN, "--set", "tracking.mlflow_uri=http://127.0.0.1:{port}"],
         ["MLflow tracking server http://127.0.0.1:{port} does not answer", "Connection refused"]),
    Case("service-mlflow-sqlite-folder-missing", "run preflight (tracking)", nothing,
         [*RUN, "--set", "tracking.mlflow_uri=sqlite:///no/such/folder/mlflow.db"],
         ["tracking.mlflow_uri sqlite:///no/such/folder/mlflow.db", "does not exist"]),
    Case("service-ray-not-answering", "run preflight (Ray address)", nothing,
         [*RUN, "--set", "compute.ray_address=127.0.0.1:{port}"],
         ["Ray address 127.0.0.1:{port}: no Ray cluster answers there"]),
    Case("service-ray-address-malformed", "run preflight (Ray address)", nothing,
         [*RUN, "--set", "compute.ray_address=headnode"], ["compute.ray_address 'headnode'", "HOST:PORT"]),
    Case("service-gpu-missing", "run preflight (GPU)", nothing, [*RUN, "--set", "compute.use_gpu=true"],
         ["compute.use_gpu is true but no CUDA GPU is visible"], marks=[NO_GPU]),
    # --- staging a dataset for a cluster: the target is checked before anything is generated or copied
    Case("staging-target-not-empty", "data stage (target)", occupied_folder,
         ["data", "stage", "--config", "config.yaml", "--to", "staged"],
         ["staged: already exists and is not empty; refusing to overwrite"]),
    Case("staging-unknown-uri", "data stage (target)", nothing,
         ["data", "stage", "--config", "config.yaml", "--to", "nosuch://bucket/voc"],
         ["nosuch://bucket/voc: cannot open this URI", "Unrecognized filesystem type"]),
]


# What each case printed, paths relative to its sandbox (docs/bad-input.md's table quotes these lines).
PRINTED: dict[str, str] = {}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``prunepipe ARGS`` through flows.cli.main in this process; (exit code, stdout, stderr)."""
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["prunepipe", *args])
    capsys.readouterr()
    environ = dict(os.environ)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:  # `run` sets Prefect/Ray defaults in the environment; keep them out of later tests
        os.environ.clear()
        os.environ.update(environ)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_ends_in_one_line(case: Case, sandbox: Sandbox, capsys, monkeypatch, one_thread):
    values = {"port": free_port(), **case.make(sandbox)}
    args = [arg.format(**values) for arg in case.args]
    before = snapshot(sandbox.root)
    code, out, err = run_cli(args, capsys, monkeypatch)
    lines = err.splitlines()
    assert "Traceback" not in err + out
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err}"
    line = lines[0]
    assert line.startswith("error: ")
    PRINTED[case.id] = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line.replace(f"{sandbox.root}/", ""))
    for expected in case.expect:
        assert expected.format(**values) in line, f"{expected.format(**values)!r} not in {line!r}"
    after = snapshot(sandbox.root)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"files changed or removed: {changed}"
    if not case.new_files_ok:
        assert sorted(set(after) - set(before)) == []


def test_the_documented_table_quotes_what_the_cli_prints():
    """Every message in docs/bad-input.md's table is a line one of the cases above printed, verbatim."""
    expected = {case.id for case in CASES if not any(m.name == "skipif" and m.args[0] for m in case.marks)}
    if not expected <= set(PRINTED):
        pytest.skip("needs the whole table run first (in this module, before this test)")
    section = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text()
    quoted = [re.sub(r"^`+ ?| ?`+$", "", row.rsplit("|", 2)[1].strip())
              for row in section.splitlines() if row.startswith("| ") and "error: " in row]
    assert len(quoted) >= 20
    printed = set(PRINTED.values())
    assert [line for line in quoted if line not in printed] == []


def test_every_kind_of_bad_input_is_covered():
    """The documented table promises at least 20 cases across config, data, checkpoints, stages, services."""
    kinds = {case.id.split("-")[0] for case in CASES}
    assert {"config", "data", "ckpt", "stage", "phase", "service"} <= kinds
    assert len(CASES) >= 24
    assert len({case.id for case in CASES}) == len(CASES)

