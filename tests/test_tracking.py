"""MLflow tracking against a real sqlite store in tmp, read back with MlflowClient.

The checkpoints are real, untrained models measured on the built-in digits (no training: tracking is
what is under test); a narrower model stands in for a pruned one (fewer channels per layer).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tasks.env import apply_env_defaults

apply_env_defaults()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import FLOAT32  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from compression.checkpoint import save_checkpoint  # noqa: E402
from compression.config import load_config  # noqa: E402
from compression.data.digits import write_digits_voc  # noqa: E402
from compression.jobs import initial_checkpoint  # noqa: E402
from compression.measure import measure  # noqa: E402
from tasks.tracking import RunTracker, TrackingError, check_tracking, tracking_uri  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    devkit = write_digits_voc(root / "data", image_size=64, num_images={"train": 8, "val": 4, "test": 4})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config("default", [f"data.root={devkit}", "data.builtin=null", "model.width_mult=0.0625",
                                  "model.image_size=64", *FLOAT32, f"tracking.mlflow_uri={uri}", f"workdir={root}",
                                  "name=tracking-test", "tracking.log_checkpoints=all"])
    checkpoints = {}
    base = None
    for stage, width in (("pretrain", 0.0625), ("sparsity", 0.0625), ("prune", 0.03125)):
        stage_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"width_mult": width})})
        ckpt = initial_checkpoint(stage_cfg)
        ckpt.stage = stage
        path = save_checkpoint(ckpt, root / f"{stage}.safetensors")
        metrics = measure(ckpt, stage_cfg, latency=False, base=base)
        # As the stages do: the measurements go into the checkpoint's metadata (timings left out so
        # the file is the same on every run).
        ckpt.metrics = {k: v for k, v in metrics.items() if not k.endswith("_seconds")}
        save_checkpoint(ckpt, path)
        base = base or metrics
        checkpoints[stage] = (path, metrics)
    selection = root / "selection.json"
    selection.write_text(json.dumps({"layers": {"backbone.conv1_1": {"remove": [0, 1]}}}))
    return cfg, uri, checkpoints, selection


@pytest.fixture(scope="module")
def tracked(setup):
    cfg, uri, checkpoints, selection = setup
    check_tracking(uri)
    tracker = RunTracker.start(cfg, flow_run_id="flow-run-123")
    history = [{"epoch": 1, "train_loss": 2.0, "lr": 0.01}, {"epoch": 2, "train_loss": 1.5, "lr": 0.005}]
    runs = {}
    for stage, (path, metrics) in checkpoints.items():
        runs[stage] = tracker.log_checkpoint(
            stage=stage, phase=None if stage == "pretrain" else "p1", checkpoint=path, metrics=metrics,
            params={"epochs": 2, "lr": 0.01}, history=history if stage != "prune" else (),
            selection=selection if stage == "prune" else None,
        )
    rows = [{"checkpoint": stage, **metrics} for stage, (_, metrics) in checkpoints.items()]
    tracker.log_summary(rows, "map_voc07")
    example = np.zeros((1, 3, 64, 64), dtype=np.float32)
    registered = tracker.register_model(cfg, checkpoints["prune"][0], runs["prune"], input_example=example)
    tracker.finish()
    return tracker, runs, registered


def test_parent_run_carries_the_flow_run_and_config(setup, tracked):
    cfg, uri, _, _ = setup
    tracker, runs, _ = tracked
    parent = MlflowClient(uri).get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == "flow-run-123"
    assert parent.data.tags["prunepipe.config_hash"] == cfg.config_hash()
    assert parent.data.tags["prunepipe.preset"] == "tracking-test"
    assert parent.data.params["stages.retrain.epochs"] == str(cfg.stages.retrain.epochs)
    assert "final_flops" in parent.data.metrics
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(tracker.parent_run_id)}
    assert "checkpoints.json" in artifacts
    assert [a.path for a in MlflowClient(uri).list_artifacts(tracker.parent_run_id, "plots")] == [
        "plots/map_voc07_vs_flops.png"]


def test_one_child_run_per_checkpoint_with_metrics_curves_and_artifacts(setup, tracked):
    _, uri, checkpoints, _ = setup
    tracker, runs, _ = tracked
    client = MlflowClient(uri)
    children = client.search_runs([tracker.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert sorted(r.info.run_name for r in children) == ["pretrain", "prune-p1", "sparsity-p1"]
    for stage, run_id in runs.items():
        run = client.get_run(run_id)
        path, metrics = checkpoints[stage]
        assert run.info.status == "FINISHED"
        for key in ("params", "nonzero_params", "size_bytes", "flops", "map_voc07", "map_voc", "map_coco"):
            assert run.data.metrics[key] == pytest.approx(metrics[key]), (stage, key)
        assert run.data.params["stage"] == stage and run.data.params["lr"] == "0.01"
        artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
        assert artifacts == [f"checkpoint/{path.name}"]
        local = Path(client.download_artifacts(run_id, f"checkpoint/{path.name}"))
        assert local.read_bytes() == path.read_bytes()
    loss = client.get_metric_history(runs["sparsity"], "train/train_loss")
    assert [(m.step, m.value) for m in loss] == [(1, 2.0), (2, 1.5)]
    assert client.get_run(runs["prune"]).data.metrics["params_ratio"] > 1  # narrower than the base
    plots = {stage: [a.path for a in client.list_artifacts(run_id, "plots")] for stage, run_id in runs.items()}
    assert plots == {"pretrain": [], "sparsity": ["plots/weight_sparsity_histogram.png"],
                     "prune": ["plots/channels_per_layer.png"]}
    assert [a.path for a in client.list_artifacts(runs["prune"], "selection")] == ["selection/selection.json"]


def test_final_model_is_registered_with_its_alias_and_loads(setup, tracked):
    import mlflow

    cfg, uri, checkpoints, _ = setup
    tracker, runs, registered = tracked
    client = MlflowClient(uri)
    name = "prunepipe-tracking-test"  # the run's (preset's) name, not the model's
    version = client.get_model_version_by_alias(name, "champion")
    assert registered == {"name": name, "version": str(version.version), "alias": "champion", "alias_moved": "true",
                          "uri": f"models:/{name}@champion", "new_version": "true",
                          "note": f"champion moved to version {version.version} (the first)"}
    assert version.run_id == runs["prune"]
    mlflow.set_tracking_uri(uri)
    detections = mlflow.pyfunc.load_model(registered["uri"]).predict(np.zeros((2, 3, 64, 64), dtype=np.float32))
    assert list(detections.columns) == ["image", "label", "score", "x1", "y1", "x2", "y2"]
    # Registering the same checkpoint again (a cached re-run) only moves the alias.
    again = tracker.register_model(cfg, checkpoints["prune"][0], runs["prune"])
    assert (again["version"], again["new_version"]) == (str(version.version), "false")


def test_the_champion_moves_only_to_a_better_model_within_the_drop(setup, tracked):
    """Real registry (sqlite store): a worse model on validation, or one too far below its base, gets a version
    with its metrics and lineage but leaves the alias; a better one takes it."""
    cfg, uri, checkpoints, _ = setup
    tracker, runs, _ = tracked
    client = MlflowClient(uri)
    gated = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"registered_model": "gate-{name}"})})
    name = "gate-tracking-test"

    def register(stage: str, value: float, drop: float) -> dict:
        return tracker.register_model(gated, checkpoints[stage][0], runs[stage],
                                      metrics={"val_map_voc07": value, "val_map_voc07_drop": drop, "map_voc07": 0.2})

    first = register("prune", 0.50, 0.005)
    assert first["alias_moved"] == "true"
    worse = register("sparsity", 0.40, 0.001)
    assert (worse["alias_moved"], worse["uri"]) == ("false", f"models:/{name}/{worse['version']}")
    assert "not above its 0.5000" in worse["note"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]
    too_far = register("pretrain", 0.70, 0.02)  # better than the champion, but 2 points below its base
    assert too_far["alias_moved"] == "false" and "champion_max_drop" in too_far["note"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]
    # The same checkpoint, now within the drop and better: no new version, the alias moves to it.
    better = register("pretrain", 0.70, 0.0)
    assert (better["version"], better["new_version"], better["alias_moved"]) == (too_far["version"], "false", "true")
    assert str(client.get_model_version_by_alias(name, "champion").version) == better["version"]
    # Every version carries its metrics and lineage.
    tags = client.get_model_version(name, worse["version"]).tags
    assert tags["metric.val_map_voc07"] == "0.4" and tags["prunepipe.preset"] == "tracking-test"
    assert tags["prunepipe.run_id"] == runs["sparsity"] and tags["prunepipe.pipeline_run_id"] == tracker.parent_run_id
    assert tags["prunepipe.stage"] == "sparsity"


def test_checkpoint_uploads_follow_tracking_log_checkpoints(setup):
    cfg, uri, checkpoints, _ = setup
    client = MlflowClient(uri)
    path, metrics = checkpoints["pretrain"]
    for mode, logged, final in (("final", [], True), ("none", [], False)):
        tracker = RunTracker.start(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"log_checkpoints": mode})}))
        run_id = tracker.log_checkpoint(stage="pretrain", phase=None, checkpoint=path, metrics=metrics)
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == logged
        assert tracker.log_final_checkpoint(path, run_id) is final
        uploaded = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
        assert uploaded == ([f"checkpoint/{path.name}"] if final else []), mode
        tracker.finish()


def test_a_failed_stage_marks_the_runs_failed(setup):
    cfg, uri, _, _ = setup
    tracker = RunTracker.start(cfg)
    failed_child = tracker.log_failed_stage("retrain", "p1", RuntimeError("worker lost\nsecond line"))
    tracker.finish("FAILED")
    client = MlflowClient(uri)
    assert client.get_run(tracker.parent_run_id).info.status == "FAILED"
    child = client.get_run(failed_child)
    assert child.info.status == "FAILED"
    assert child.data.tags["prunepipe.error"] == "RuntimeError: worker lost"


def test_an_http_tracking_uri_that_does_not_answer_is_one_clear_error(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} does not answer") as err:
        check_tracking(uri)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri(load_config("default").tracking) == uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(load_config("default").tracking) == "sqlite:///mlflow.db"


def test_the_onnx_export_goes_to_the_checkpoints_run(setup, tmp_path):
    import onnx

    from compression.export import onnx_flops

    cfg, uri, checkpoints, _ = setup
    path, metrics = checkpoints["prune"]
    tracker = RunTracker.start(cfg)
    run_id = tracker.log_checkpoint(stage="prune", phase="p1", checkpoint=path, metrics=metrics)
    exported = tracker.log_onnx_export(path, run_id, cfg)
    tracker.finish()
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(run_id, "onnx")) == [
        "onnx/model.anchors.npy", "onnx/model.json", "onnx/model.onnx"]
    assert sorted(exported["files"].values()) == ["onnx/model.anchors.npy", "onnx/model.json", "onnx/model.onnx"]
    local = Path(client.download_artifacts(run_id, "onnx", dst_path=str(tmp_path)))
    onnx.checker.check_model(str(local / "model.onnx"))
    # The same graph as an MLflow ONNX model.
    import mlflow

    mlflow.set_tracking_uri(uri)
    graphs = [mlflow.onnx.load_model(exported["model_uri"]).graph, onnx.load(str(local / "model.onnx")).graph]
    assert [node.op_type for node in graphs[0].node] == [node.op_type for node in graphs[1].node]
    assert [[i.name for i in graph.input] for graph in graphs] == [["images"], ["images"]]
    logged = client.get_run(run_id).data.metrics
    assert logged["onnx_size_bytes"] == (local / "model.onnx").stat().st_size == exported["onnx_size_bytes"]
    assert logged["onnx_flops"] == onnx_flops(local / "model.onnx") == exported["onnx_flops"]
    # The exported graph costs what the checkpoint's own count says (both count Conv/Gemm only).
    assert logged["onnx_flops"] == logged["flops"] == metrics["flops"]
    assert json.loads((local / "model.json").read_text())["input"]["height"] == 64

    # tracking.log_onnx off: nothing is exported or logged.
    quiet = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"log_onnx": False})})
    other = tracker.log_checkpoint(stage="prune", phase="p1", checkpoint=path, metrics=metrics)
    assert tracker.log_onnx_export(path, other, quiet) is None
    assert client.list_artifacts(other, "onnx") == [] and "onnx_flops" not in client.get_run(other).data.metrics


def test_the_experiment_is_marked_as_model_training(setup, tmp_path):
    """The MLflow UI opens a model-training experiment on its runs, not on the GenAI overview. An experiment
    made before without the tag gets it; one whose kind was changed in the UI keeps that choice."""
    cfg, _, _, _ = setup
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    fresh = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow_uri": uri})})
    tracker = RunTracker.start(fresh)
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    older = client.create_experiment("made-before")
    chosen = client.create_experiment("chosen-in-the-ui", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("made-before", "chosen-in-the-ui"):
        tracking = fresh.tracking.model_copy(update={"experiment": name})
        RunTracker.start(fresh.model_copy(update={"tracking": tracking})).finish("FINISHED")
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    assert RunTracker(uri="http://127.0.0.1:5000", experiment_id="1", parent_run_id="abc").run_link().endswith(
        "/#/experiments/1/runs/abc?workflowType=machine_learning")
    tracker.finish("FINISHED")


def test_an_unknown_placeholder_in_the_registered_name_is_one_line():
    from compression.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking.registered_model.*unknown placeholder 'preset'") as err:
        load_config("default", ["tracking.registered_model=prunepipe-{preset}"])
    assert "\n" not in str(err.value)
    assert load_config("default", ["name=nightly"]).tracking.registered_model.format(name="nightly", model="m") == \
        "prunepipe-nightly"
