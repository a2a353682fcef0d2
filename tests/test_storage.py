"""Storage and data locations that may be URIs: ``prunepipe data stage`` copies a prepared dataset to shared
storage with pyarrow.fs (a ``file://`` URI and a plain folder here; no object store is reachable), the
stages read ``data.root`` from there, and ``compute.storage_path`` stays the string it was given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compression.checks import check_inputs
from compression.config import load_config
from compression.data.loaders import build_dataset
from compression.errors import DataError
from tasks.ray_trainer import absolute_config, registered_epochs, with_local_data
from tasks.stages import storage_path
from tasks.storage import local_data_root

ROOT = Path(__file__).resolve().parent.parent


def prunepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("uri", [True, False], ids=["file-uri", "folder"])
def test_data_stage_copies_the_devkit_and_the_stages_read_it_there(digits_devkit, tmp_path, uri):
    target = tmp_path / "shared" / "VOCdevkit"
    to = target.as_uri() if uri else str(target)
    done = prunepipe("data", "stage", "--config", "default", "--set", f"data.root={digits_devkit}",
                     "--set", "data.builtin=null", "--to", to, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"run with --set data.root={to}" in done.stdout
    assert files_under(target) == files_under(digits_devkit) and files_under(target)
    # A config pointing at the staged copy reads the same images, checked and loaded where stages run.
    cfg = load_config("default", [f"data.root={to}", "data.builtin=null", "model.image_size=64"])
    assert cfg.data.root == to  # kept as given
    check_inputs(cfg)
    local = with_local_data(cfg.model_dump(mode="json"))["data"]["root"]
    assert Path(local) == target
    original = load_config("default", [f"data.root={digits_devkit}", "data.builtin=null"])
    assert len(build_dataset(cfg.data, "train", train=False, image_size=64)) == \
        len(build_dataset(original.data, "train", train=False, image_size=64))
    # Staging again onto what is there refuses, in one line, and leaves it alone.
    again = prunepipe("data", "stage", "--config", "default", "--set", f"data.root={digits_devkit}",
                      "--set", "data.builtin=null", "--to", to, cwd=tmp_path)
    assert again.returncode == 2 and "already exists and is not empty; refusing to overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert files_under(target) == files_under(digits_devkit)


def test_uris_stay_strings_and_paths_resolve_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    remote = load_config("default", ["compute.storage_path=s3://bucket/ray", "data.root=gs://bucket/voc/VOCdevkit"])
    assert storage_path(remote) == "s3://bucket/ray"  # not ./s3:/bucket/ray
    nodes = absolute_config(remote)
    assert (nodes.compute.storage_path, nodes.data.root) == ("s3://bucket/ray", "gs://bucket/voc/VOCdevkit")
    local = load_config("default", ["compute.storage_path=shared/ray"])
    assert storage_path(local) == str(tmp_path / "shared" / "ray")
    assert absolute_config(local).data.root == str(tmp_path / "data" / "digits-voc" / "VOCdevkit")
    assert storage_path(load_config("default", ["workdir=out"])) == str(tmp_path / "out" / "ray")
    assert local_data_root("relative/VOCdevkit") == "relative/VOCdevkit"
    assert local_data_root((tmp_path / "x").as_uri()) == str(tmp_path / "x")


def test_a_remote_data_root_outside_a_run_and_a_missing_file_uri_are_one_line(tmp_path):
    from compression.checks import check_inputs as check

    with pytest.raises(DataError, match=r"data.root s3://bucket/VOCdevkit: a remote URI is read by `prunepipe run`"):
        check(load_config("default", ["data.root=s3://bucket/VOCdevkit", "data.builtin=null"]))
    missing = (tmp_path / "nothing" / "VOCdevkit").as_uri()
    with pytest.raises(DataError, match="does not exist"):
        check(load_config("default", [f"data.root={missing}", "data.builtin=null"]))


def test_ray_train_resume_reads_its_snapshot_through_a_uri(tmp_path):
    run = tmp_path / "ray" / "pretrain-abc"
    run.mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text(
        '{"latest_checkpoint_result": {"metrics": {"epoch": 3}}}')
    assert registered_epochs(run.as_uri()) == registered_epochs(run) == 3
    assert registered_epochs((tmp_path / "ray" / "other").as_uri()) == 0


def test_a_run_folder_uri_is_copied_per_machine_and_written_back_whole(tmp_path, monkeypatch):
    """Two machines (two caches) share only the store: what one publishes the other fetches, a changed
    stored file is fetched again, and a plain path is used in place."""
    from tasks.storage import fetch, join, local_mirror, location_of, parent, publish, run_folder

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("PRUNEPIPE_RUN_CACHE", str(tmp_path / "node-a"))
    run_a = run_folder(store, "tiny")
    assert run_a == tmp_path / "node-a" / run_a.relative_to(tmp_path / "node-a")  # a copy under node a's cache
    (run_a).mkdir(parents=True)
    (run_a / "pretrain.safetensors").write_bytes(b"weights v1")
    location = location_of(run_a / "pretrain.safetensors", store)
    assert location == join(store, "tiny", "pretrain.safetensors")
    publish(run_a / "pretrain.safetensors", location)
    assert (tmp_path / "store" / "tiny" / "pretrain.safetensors").read_bytes() == b"weights v1"
    assert not list((tmp_path / "store" / "tiny").glob("*.part"))

    monkeypatch.setenv("PRUNEPIPE_RUN_CACHE", str(tmp_path / "node-b"))
    copy = fetch(location)
    assert copy.is_relative_to(tmp_path / "node-b") and copy.read_bytes() == b"weights v1"
    # Another machine replaces the stored file: this machine's copy is stale and is fetched again.
    stored = tmp_path / "store" / "tiny" / "pretrain.safetensors"
    stored.write_bytes(b"weights v2, longer")
    assert fetch(location).read_bytes() == b"weights v2, longer"
    with pytest.raises(FileNotFoundError):
        fetch(join(store, "tiny", "missing.safetensors"))
    # Paths are used in place; files outside a URI run folder keep their absolute path.
    assert fetch(str(stored)) == stored and location_of(stored, str(tmp_path)) == str(stored)
    assert run_folder(str(tmp_path / "runs"), "tiny") == tmp_path / "runs" / "tiny"
    # A URI's query stays at its end, and '..' cannot leave the cache.
    s3 = "s3://bucket/runs?endpoint_override=127.0.0.1:9000"
    assert join(s3, "tiny", "a.json") == "s3://bucket/runs/tiny/a.json?endpoint_override=127.0.0.1:9000"
    assert parent(join(s3, "tiny")) == s3
    assert local_mirror(join(s3, "tiny")) == local_mirror(s3) / "tiny"
    with pytest.raises(DataError, match=r"'\.\.' in a storage location"):
        local_mirror("s3://bucket/runs/../../etc")


def test_commands_that_write_one_local_folder_refuse_a_uri_workdir_in_one_line(tmp_path):
    done = prunepipe("pretrain", "--config", "default", "--set", "workdir=s3://bucket/runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("error: workdir s3://bucket/runs: this command writes to a local folder; "
                                   "pass --out")
    assert not list(tmp_path.iterdir())
