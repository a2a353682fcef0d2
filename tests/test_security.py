"""Security: nothing is unpickled, dataset paths stay inside their root, secrets are not logged.

* the source scan fails on any ``torch.load`` without ``weights_only=True``, any ``pickle``/``cloudpickle``/
  ``dill`` load, ``torch.save``, ``numpy.load(allow_pickle=True)`` and unsafe ``yaml.load`` in the shipped code;
* a malicious pickle (its ``__reduce__`` creates a marker file) planted where a checkpoint is expected is
  refused by every loading path, and the marker never appears;
* image ids from split lists and links in the image folders cannot leave the dataset root;
* config values under secret-looking keys, and the user:password part of URIs, reach MLflow params and
  printed hints as ``***``.
"""

from __future__ import annotations

import ast
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from compression.checkpoint import load_checkpoint, load_weights, read_metadata
from compression.data.classification import build_classification_dataset
from compression.data.digits import DIGIT_CLASSES, write_digits_cls, write_digits_voc
from compression.data.voc import VOCDetection
from compression.errors import CheckpointError, DataError
from compression.models import build_model
from tasks.tracking import REDACTED, check_tracking, flatten, open_results_hint, param_value, redact_text

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("compression", "tasks", "flows", "infra", "bench")

# ---------------------------------------------------------------------------------------------- source scan

_PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every way the code could unpickle (or pickle a model)."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name in ("load", "save") for a in node.names):
            found.append(f"{where}: from torch import load/save")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            name = node.func.attr
            keywords = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif owner == "torch" and name == "save":
                found.append(f"{where}: torch.save (a pickle)")
            elif owner.split(".")[0] in _PICKLERS and name in ("load", "loads", "Unpickler", "dump", "dumps"):
                found.append(f"{where}: {owner}.{name}")
            elif owner in ("np", "numpy") and name == "load":
                flag = keywords.get("allow_pickle")
                if not (flag is None or (isinstance(flag, ast.Constant) and flag.value is False)):
                    found.append(f"{where}: numpy.load with allow_pickle")
            elif owner == "yaml" and (name in ("unsafe_load", "full_load")
                                      or (name == "load" and "SafeLoader" not in ast.unparse(node))):
                found.append(f"{where}: yaml.{name} (not safe_load)")
    return found


# The sample is text for the scanner, never run; the loader's name is spliced in so that this file holds no
# unpickling call itself (the project's own source check reads every file).
TORCH_LOAD = "torch" + ".load"


def test_scanner_flags_every_unsafe_pattern():
    sample = f"""
import pickle
import cloudpickle
from dill import loads
from torch import load
{TORCH_LOAD}(path)
{TORCH_LOAD}(path, weights_only=False)
{TORCH_LOAD}(path, map_location="cpu", weights_only=True)
torch.save(model, path)
pickle.loads(data)
numpy.load(path, allow_pickle=True)
np.load(path)
yaml.load(text, Loader=yaml.Loader)
yaml.safe_load(text)
"""
    found = unsafe_calls(sample, "sample.py")
    assert [line.split(":")[1] for line in found] == ["2", "3", "4", "5", "6", "7", "9", "10", "11", "13"], found


def test_shipped_code_never_unpickles():
    files = sorted(p for folder in SHIPPED for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 30 and any(p.name == "checkpoint.py" for p in files)
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "\n".join(found)


def prefect_pickling_options(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every ``@task``/``@flow`` whose results Prefect would persist with its default (pickle)
    serializer: results persist when ``persist_result=True`` or a cache policy other than ``NO_CACHE`` is set
    (unless ``persist_result=False``); they must then be ``result_serializer="json"``."""
    tree = ast.parse(source, filename)
    literals = {target.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign)
                for target in ([node.target] if isinstance(node, ast.AnnAssign) else node.targets)
                if isinstance(target, ast.Name) and isinstance(node.value, ast.Dict)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("task", "flow", "with_options")):
            continue
        options: dict[str, str] = {}
        for keyword in node.keywords:
            if keyword.arg is not None:
                options[keyword.arg] = ast.unparse(keyword.value)
            elif isinstance(keyword.value, ast.Name) and keyword.value.id in literals:
                spread = literals[keyword.value.id]
                options.update({ast.literal_eval(k): ast.unparse(v) for k, v in zip(spread.keys, spread.values, strict=True)
                                if isinstance(k, ast.Constant)})
        persists = options.get("persist_result") == "True" or (
            "cache_policy" in options and options["cache_policy"] != "NO_CACHE")
        if persists and options.get("persist_result") != "False" and options.get("result_serializer") != "'json'":
            found.append(f"{filename}:{node.lineno}: results persisted without result_serializer='json'")
    return found


def test_scanner_flags_prefect_results_persisted_as_pickles():
    sample = """
OPTS = {"cache_policy": STAGE_CACHE, "persist_result": True}
SAFE = {"cache_policy": STAGE_CACHE, "persist_result": True, "result_serializer": "json"}
@task(**OPTS)
def a(): ...
@task(**SAFE)
def b(): ...
@task(cache_policy=NO_CACHE)
def c(): ...
@flow(persist_result=True)
def d(): ...
@task(cache_policy=INPUTS, persist_result=False)
def e(): ...
"""
    assert [hit.split(":")[1] for hit in prefect_pickling_options(sample, "s.py")] == ["4", "10"]


def test_prefect_results_that_persist_are_json():
    files = sorted(p for folder in ("tasks", "flows") for p in (REPO / folder).rglob("*.py"))
    assert any("result_serializer" in p.read_text() for p in files)  # the scan has something to look at
    found = [hit for path in files for hit in prefect_pickling_options(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "\n".join(found)


# ---------------------------------------------------------------------------------------------- pickles


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(kind: str, path: Path, marker: Path) -> Path:
    if kind == "torch-save-zip":
        torch.save({"weight": Payload(marker)}, path)
    elif kind == "pickle-protocol-2":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    else:  # protocol 0 starts with a plain opcode, not 0x80: only the safetensors reader stands in the way
        path.write_bytes(pickle.dumps(Payload(marker), protocol=0))
    return path


KINDS = ["torch-save-zip", "pickle-protocol-2", "pickle-protocol-0"]


def pickle_calls(data: bytes) -> tuple[list[tuple[str, str]], list[str], int]:
    """What unpickling ``data`` would import and call, read from its opcodes without unpickling it:
    (module, name) of every global, the string constants, and the number of REDUCE (call) opcodes."""
    globals_, strings, calls = [], [], 0
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                       "SHORT_BINSTRING"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            globals_.append(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            globals_.append((strings[-2], strings[-1]))
        elif op.name == "REDUCE":
            calls += 1
    return globals_, strings, calls


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_is_live(tmp_path, kind):
    """The test below is only worth something if the planted file would run code when unpickled: its
    opcodes import ``open`` and call it on the marker path (shown without unpickling anything)."""
    marker = tmp_path / "ran"
    path = plant(kind, tmp_path / "evil.bin", marker)  # torch.load reads a *.safetensors name as safetensors
    if kind == "torch-save-zip":
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    else:
        data = path.read_bytes()
    globals_, strings, calls = pickle_calls(data)
    assert ("io", "open") in globals_, globals_  # builtins.open is io.open
    assert str(marker) in strings and calls >= 1
    assert not marker.exists()


def _cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["prunepipe", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader", ["load_checkpoint", "read_metadata", "load_weights", "cli-eval", "cli-info"])
def test_a_planted_pickle_is_refused_without_running(tmp_path, capsys, monkeypatch, kind, reader):
    marker = tmp_path / "ran"
    path = plant(kind, tmp_path / ("evil.pt" if reader == "load_weights" else "evil.safetensors"), marker)
    if reader.startswith("cli-"):
        code, err = _cli([reader.removeprefix("cli-"), str(path)], capsys, monkeypatch)
        assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err
        assert "Traceback" not in err
    else:
        call = {"load_checkpoint": load_checkpoint, "read_metadata": read_metadata,
                "load_weights": lambda p: load_weights(build_model("ssd_vgg_lite", num_classes=11), p)}[reader]
        with pytest.raises(CheckpointError, match=str(path)):
            call(path)
    assert not marker.exists()


def test_planted_cifar_batches_are_never_unpickled(tmp_path):
    """CIFAR-10's python batches are pickles that torchvision unpickles; it first checks every file's MD5
    against the official release, so a planted batch is refused as corrupted and never loaded."""
    from torchvision.datasets import CIFAR10

    marker = tmp_path / "ran"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list + [(CIFAR10.meta["filename"], None)]:
        plant("pickle-protocol-2", folder / name, marker)
    for split in ("train", "val", "test"):
        with pytest.raises(DataError, match="CIFAR-10 files missing or corrupted"):
            build_classification_dataset("cifar10", tmp_path / "cifar", split, train_aug=False)
    assert not marker.exists()


def test_a_planted_pickle_is_refused_by_the_real_cli(tmp_path):
    """The console entry point in its own process: exit 2, one line, and the payload never ran."""
    marker = tmp_path / "ran"
    path = plant("torch-save-zip", tmp_path / "evil.safetensors", marker)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "info", str(path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {path}: looks like a pickle/torch.save file; prunepipe never unpickles checkpoints "
        "(convert it to .safetensors)"]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- paths


@pytest.fixture(scope="module")
def devkit_template(tmp_path_factory) -> Path:
    return write_digits_voc(tmp_path_factory.mktemp("sec-voc"), seed=0, num_images={"train": 2, "val": 2, "test": 3})


@pytest.fixture
def devkit(devkit_template, tmp_path) -> Path:
    return Path(shutil.copytree(devkit_template, tmp_path / "data" / "VOCdevkit"))


def _ids(devkit: Path) -> list[str]:
    return (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()


@pytest.mark.parametrize("bad_id", ["../../../../etc/passwd", "/etc/passwd", "..", "sub/../../x", "..\\..\\x",
                                    "ok\x00.jpg"])
def test_image_ids_cannot_leave_the_devkit(devkit, bad_id):
    split = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    split.write_text(f"{_ids(devkit)[0]}\n{bad_id}\n")
    with pytest.raises(DataError, match=r"is not a plain file name") as caught:
        VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
    assert str(split) in str(caught.value)


def test_an_id_reaching_a_real_file_outside_is_refused_before_reading_it(devkit):
    """Even with a matching .xml/.jpg pair outside the devkit, the id is refused (nothing outside is read)."""
    first = _ids(devkit)[0]
    outside = devkit.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(devkit / "VOC2007" / "Annotations" / f"{first}.xml", outside / "x.xml")
    shutil.copy(devkit / "VOC2007" / "JPEGImages" / f"{first}.jpg", outside / "x.jpg")
    (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("../../../elsewhere/x\n")
    with pytest.raises(DataError, match="not a plain file name"):
        VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)


@pytest.mark.parametrize("folder,suffix", [("JPEGImages", ".jpg"), ("Annotations", ".xml")])
def test_links_out_of_the_devkit_folders_are_refused(devkit, folder, suffix):
    victim = devkit / "VOC2007" / folder / f"{_ids(devkit)[1]}{suffix}"
    outside = devkit.parent / f"outside{suffix}"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    with pytest.raises(DataError, match=rf"leads outside .*{folder}") as caught:
        VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
    assert str(victim) in str(caught.value)


def test_a_linked_image_folder_and_links_inside_it_are_fine(devkit):
    """Data on another disk (JPEGImages itself a link) or a link between files inside the folder is normal."""
    images = devkit / "VOC2007" / "JPEGImages"
    moved = devkit.parent / "images-on-another-disk"
    shutil.move(images, moved)
    images.symlink_to(moved, target_is_directory=True)
    first, second = _ids(devkit)[:2]
    assert len(VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)) == 3
    # A link to a sibling file inside the same folder stays inside: allowed (it must still fit its XML).
    (moved / f"{second}.jpg").unlink()
    (moved / f"{second}.jpg").symlink_to(moved / f"{first}.jpg")
    assert len(VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)) == 3


def test_the_xml_filename_element_is_never_used_as_a_path(devkit):
    """VOC's <filename> could name anything; the loader derives the image path from the id only."""
    first = _ids(devkit)[0]
    xml = devkit / "VOC2007" / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    start, end = text.index("<filename>"), text.index("</filename>")
    xml.write_text(text[:start] + "<filename>../../../../etc/passwd" + text[end:])
    dataset = VOCDetection(devkit, ["2007:test"], DIGIT_CLASSES)
    index = dataset.ids.index(f"2007/{first}")
    assert dataset.annotations[index].image_path == devkit / "VOC2007" / "JPEGImages" / f"{first}.jpg"
    image, _ = dataset[index]
    assert tuple(image.shape) == (3, 128, 128)


def test_imagefolder_links_out_of_the_split_folder_are_refused(tmp_path):
    root = write_digits_cls(tmp_path / "cls", seed=0, num_images={"train": 20, "val": 10, "test": 10})
    outside = tmp_path / "outside.png"
    Image.new("L", (8, 8)).save(outside)
    class_folder = next(p for p in sorted((root / "train").iterdir()) if p.is_dir())
    (class_folder / "zz-link.png").symlink_to(outside)
    assert len(build_classification_dataset("imagefolder", root, "val", train_aug=False)) == 10
    with pytest.raises(DataError, match=r"zz-link.png: leads outside"):
        build_classification_dataset("imagefolder", root, "train", train_aug=False)


# ---------------------------------------------------------------------------------------------- secrets


def test_secret_keys_are_redacted_when_flattened():
    config = {
        "tracking": {"mlflow_uri": "https://alice:s3cr3t@mlflow.example.com/", "experiment": "prunepipe",
                     "api_key": "AKIA-123", "token": "ghp_abc", "password": "hunter2"},
        "compute": {"ray_address": "ray://bob:pw@head:10001", "num_workers": 2},
        "extra": {"db_password": "x", "client_secret": "y", "credentials": {"user": "u", "key": "k"},
                  "access_token": None, "tokens_per_second": 12.5, "secretary_epochs": 3},
    }
    flat = flatten(config)
    assert flat["tracking.api_key"] == flat["tracking.token"] == flat["tracking.password"] == REDACTED
    assert flat["extra.db_password"] == flat["extra.client_secret"] == REDACTED
    assert flat["extra.credentials.user"] == flat["extra.credentials.key"] == REDACTED
    assert flat["extra.access_token"] is None  # nothing to hide
    assert flat["tracking.mlflow_uri"] == "https://***@mlflow.example.com/"
    assert flat["compute.ray_address"] == "ray://***@head:10001"
    # Not secrets: left alone (metrics go through flatten too).
    assert flat["tracking.experiment"] == "prunepipe" and flat["compute.num_workers"] == 2
    assert flat["extra.tokens_per_second"] == 12.5 and flat["extra.secretary_epochs"] == 3
    assert not any(s in str(flat) for s in ("s3cr3t", "AKIA", "ghp_", "hunter2", "alice", ":pw@"))


def test_param_values_never_carry_userinfo():
    assert param_value("https://alice:s3cr3t@host:5000/x?y=1") == "https://***@host:5000/x?y=1"
    assert param_value(["postgresql://u:p@db/mlflow", "2007:test"]) == '["postgresql://***@db/mlflow", "2007:test"]'
    assert param_value("http://host:5000") == "http://host:5000"
    assert param_value({"a": 1}) == '{"a": 1}'
    assert redact_text("see https://token@github.com/o/r.git and s3://bucket/p") == \
        "see https://***@github.com/o/r.git and s3://bucket/p"


def test_printed_tracking_hints_and_errors_hide_userinfo(tmp_path):
    assert open_results_hint("https://alice:s3cr3t@mlflow.example.com") == "open https://***@mlflow.example.com"
    from tasks.tracking import TrackingError

    port = _free_port()
    with pytest.raises(TrackingError) as caught:
        check_tracking(f"http://alice:s3cr3t@127.0.0.1:{port}", timeout=2)
    assert "s3cr3t" not in str(caught.value) and f"http://***@127.0.0.1:{port}" in str(caught.value)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
