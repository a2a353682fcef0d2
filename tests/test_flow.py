"""The ``compress`` flow end to end: real Prefect (test server), Ray Train (2 workers), MLflow (sqlite).

A tiny config (32 digit images, 1 epoch per stage, ssd_vgg_lite at width 1/16, one phase of two layers,
a threshold that zeroes most of their weights) runs once; the tests read it back through MlflowClient
and the Prefect API, re-run it (everything cached: no training), kill a ``prunepipe run`` subprocess
mid-stage and show the re-run skips the finished stages, and fail a stage to see the runs marked FAILED.
The Taylor criterion runs through ``prunepipe run`` as well, and the flow and the in-process pipeline
write the same outputs, in the order ``compression.plan`` gives. Durations are printed with ``-s``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.env import apply_env_defaults

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))  # before Prefect loads
apply_env_defaults()

import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import FLOAT32  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterName,
)

from compression.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from compression.config import PipelineConfig, load_config  # noqa: E402
from compression.data.digits import write_digits_voc  # noqa: E402
from compression.errors import StageError  # noqa: E402
from compression.jobs import initial_checkpoint  # noqa: E402
from compression.pipeline import run_pipeline_in_process  # noqa: E402
from compression.plan import build_plan  # noqa: E402
from flows.compress import run_pipeline  # noqa: E402
from tasks.ray_trainer import ensure_ray  # noqa: E402
from tasks.stages import storage_path  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_METRICS = ("params", "size_bytes", "flops", "map_voc07")


def expected_stages(distill: bool = True) -> list[str]:
    return ["pretrain", "sparsity", "prune", "retrain"] + (["distill"] if distill else [])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    devkit = write_digits_voc(root / "data", image_size=64, num_images={"train": 32, "val": 8, "test": 8})
    return load_config("default", [
        "name=tiny", f"workdir={root / 'runs'}", f"tracking.mlflow_uri=sqlite:///{root / 'mlflow.db'}",
        f"data.root={devkit}", "data.builtin=null", "data.batch_size=8", "data.eval_batch_size=8",
        "model.width_mult=0.0625", "model.image_size=64", *FLOAT32,
        "stages.pretrain.epochs=1", "stages.pretrain.warmup_epochs=0", "stages.sparsity.epochs=1",
        "stages.sparsity.alpha_grid=[3.0]",
        "stages.selection.min_channels=2", "stages.retrain.epochs=1", "stages.distill.epochs=1",
        "stages.selection.criterion=seed", "stages.phases=[{name: p1, layers: [conv3_1, conv3_2]}]",
        "compute.max_failures=0",
    ])


@pytest.fixture(scope="module")
def ray_session(cfg):
    started = time.perf_counter()
    info = ensure_ray(cfg.compute)
    print(f"\nRay: {time.perf_counter() - started:.1f}s")
    return info


def ray_runs(cfg) -> dict[str, float]:
    """Ray Train run folders under the storage path, with their latest modification time."""
    base = Path(storage_path(cfg))
    if not base.is_dir():
        return {}
    return {d.name: max(p.stat().st_mtime for p in [d, *d.rglob("*")]) for d in base.iterdir() if d.is_dir()}


def run_timed(cfg, label: str) -> dict:
    started = time.perf_counter()
    summary = run_pipeline(cfg)
    print(f"\n{label}: {time.perf_counter() - started:.1f}s; timings {summary['timings']}; fits "
          f"{[(r['checkpoint'], round(r['fit_seconds'], 1)) for r in summary['checkpoints']]}")
    return summary


@pytest.fixture(scope="module")
def first_run(cfg, prefect_server, ray_session):
    return run_timed(cfg, "first run")


def children(cfg, summary) -> dict[str, object]:
    client = MlflowClient(cfg.tracking.mlflow_uri)
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow']['run_id']}'")
    return {run.data.tags["prunepipe.stage"]: run for run in runs}


def test_every_stage_checkpoint_is_tracked_with_size_flops_and_map(cfg, first_run):
    client = MlflowClient(cfg.tracking.mlflow_uri)
    assert [row["stage"] for row in first_run["checkpoints"]] == expected_stages()
    tracked = children(cfg, first_run)
    assert sorted(tracked) == sorted(expected_stages())
    for stage, run in tracked.items():
        for key in CHECKPOINT_METRICS:
            assert key in run.data.metrics, (stage, key)
        assert run.data.metrics["size_bytes"] > 0 and run.data.metrics["flops"] > 0
        assert 0 <= run.data.metrics["map_voc07"] <= 1
        checkpoint = Path(run.data.tags["prunepipe.checkpoint"])
        assert checkpoint.is_file() and checkpoint.parent == Path(first_run["run_dir"])
        # tracking.log_checkpoints defaults to "final": only the answer's checkpoint file is uploaded.
        final = next(row["final"] for row in first_run["checkpoints"] if row["mlflow_run_id"] == run.info.run_id)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == (
            [f"checkpoint/{checkpoint.name}"] if final else [])
        if stage != "prune":  # every training stage logs its per-epoch curve
            assert client.get_metric_history(run.info.run_id, "train/train_loss"), stage
    parent = client.get_run(first_run["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == first_run["flow_run_id"]
    version = client.get_model_version_by_alias("prunepipe-tiny", "champion")  # prunepipe-<name>
    assert str(version.version) == first_run["registered_model"]["version"]
    # The answer is the better of the distilled and the retrained model on the validation split.
    rows = {row["stage"]: row for row in first_run["checkpoints"]}
    final = [row for row in first_run["checkpoints"] if row["final"]]
    assert len(final) == 1 and final[0]["stage"] in ("retrain", "distill")
    other = rows["retrain" if final[0]["stage"] == "distill" else "distill"]
    if final[0]["stage"] == "distill":
        assert final[0]["val_map_voc07"] >= other["val_map_voc07"]
    else:
        assert final[0]["val_map_voc07"] > other["val_map_voc07"]
    assert version.run_id == final[0]["mlflow_run_id"] == tracked[final[0]["stage"]].info.run_id
    assert first_run["final_checkpoint"] == final[0]["path"]
    assert tracked["prune"].data.metrics["params_ratio"] > 1  # the prune stage removed filters


def test_the_flow_run_has_a_checkpoint_table_artifact(cfg, first_run):
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["compress-tiny"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[first_run["flow_run_id"]])))
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    assert first_run["mlflow"]["run_id"] in artifacts[0].description
    assert str(artifacts[0].flow_run_id) == first_run["flow_run_id"]
    assert '"flops"' in str(artifacts[0].data) and '"checkpoint"' in str(artifacts[0].data)


def test_a_second_run_trains_nothing(cfg, first_run):
    before = ray_runs(cfg)
    again = run_timed(cfg, "cached re-run")
    assert [row["cached"] for row in again["checkpoints"]] == [True] * len(expected_stages())
    assert all(row["fit_seconds"] == 0 for row in again["checkpoints"])
    assert ray_runs(cfg) == before  # no new Ray Train run, no checkpoint written
    assert again["final_checkpoint"] == first_run["final_checkpoint"]
    assert again["registered_model"]["version"] == first_run["registered_model"]["version"]
    assert again["mlflow"]["run_id"] != first_run["mlflow"]["run_id"]  # a new parent run with all children
    assert sorted(children(cfg, again)) == sorted(expected_stages())


@pytest.mark.fault  # long: make test-faults (CI)
def test_a_killed_run_resumes_without_redoing_finished_stages(cfg, first_run, prefect_server, ray_session,
                                                              tmp_path):
    # New settings for the stage to interrupt (retrain): the stages before it stay cached, it must run.
    overrides = ["stages.retrain.lr=0.004", "stages.distill.enabled=false"]
    interrupted = "retrain"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runs_before = ray_runs(cfg)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_ADDRESS": ray_session.address}
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config_file)]
    command += [arg for item in overrides for arg in ("--set", item)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def interrupted_stage_started() -> bool:  # its Ray Train run folder appeared: the retrain fit is under way
        return any(name.startswith("retrain") for name in set(ray_runs(cfg)) - set(runs_before))

    try:
        while not interrupted_stage_started():
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.perf_counter() - started < 600, "the subprocess never reached the stage"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    print(f"\nkilled `prunepipe run` during {interrupted} after {time.perf_counter() - started:.1f}s")

    resumed_cfg = load_config(config_file, overrides)
    resumed = run_timed(resumed_cfg, "re-run after the kill")
    rows = {row["stage"]: row for row in resumed["checkpoints"]}
    finished_before = expected_stages()[:expected_stages().index(interrupted)]
    assert all(rows[stage]["cached"] and rows[stage]["fit_seconds"] == 0 for stage in finished_before)
    assert not rows["retrain"]["cached"]
    # No finished stage trained again: their Ray runs are untouched.
    after = ray_runs(resumed_cfg)
    assert {k: v for k, v in after.items() if k in runs_before} == runs_before
    assert resumed["final_checkpoint"]


def test_a_failing_stage_marks_the_mlflow_runs_failed_and_is_not_retried(cfg, prefect_server, tmp_path):
    # A base checkpoint whose classes are not the dataset's: the pretrain stage refuses it (StageError,
    # a user error: never retried), after preflight passed.
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"classes": ["a", "b"]})})
    given = save_checkpoint(initial_checkpoint(other), tmp_path / "other.safetensors")
    failing = PipelineConfig.model_validate({
        **cfg.model_dump(mode="json"), "name": "failing", "workdir": str(tmp_path / "runs"),
        "stages": {**cfg.stages.model_dump(mode="json"), "pretrain": {"checkpoint": str(given)}},
    })
    with pytest.raises(StageError, match="differ from the dataset's"):
        run_pipeline(failing)

    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`prunepipe.preset` = 'failing'")[0]
    assert parent.info.status == "FAILED"
    failed = client.search_runs([experiment.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [(r.info.run_name, r.info.status) for r in failed] == [("pretrain", "FAILED")]
    assert failed[0].data.tags["prunepipe.error"].startswith("StageError: ")
    with get_client(sync_client=True) as prefect:
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    pretrain = [t for t in task_runs if t.name == "pretrain"]
    assert len(pretrain) == 1 and pretrain[0].state.is_failed() and pretrain[0].run_count == 1


def test_cli_refuses_a_bad_config_in_one_line_before_anything_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--set", "stages.retrain.epochs=-1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "stages.retrain.epochs" in result.stderr
    assert "temporary server" not in result.stderr + result.stdout  # Prefect never started
    assert not (tmp_path / "mlflow.db").exists()


def outputs(run_dir: Path) -> list[str]:
    """The stage outputs in a run folder, in name (= plan) order."""
    return sorted(p.name for p in Path(run_dir).iterdir()
                  if p.suffix in (".safetensors", ".json") and not p.name.startswith(".") and p.name != "config.json")


def test_taylor_runs_through_prunepipe_run(cfg, first_run, prefect_server, ray_session, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    overrides = ["stages.selection.criterion=taylor", "stages.selection.target_flops_ratio=2",
                 "stages.selection.taylor_batches=2", "stages.selection.taylor_finetune_batches=2", "name=tiny-taylor"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_ADDRESS": ray_session.address,
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config_file)]
    command += [arg for item in overrides for arg in ("--set", item)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(f"\nprunepipe run (taylor): {time.perf_counter() - started:.1f}s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    taylor_cfg = load_config(config_file, overrides)
    run_dir = Path(taylor_cfg.workdir) / taylor_cfg.name
    written = outputs(run_dir)
    assert written == ["00_pretrain.safetensors", "01_taylor_p1.safetensors", "01_taylor_p1.selection.json",
                       "02_retrain_p1.safetensors", "03_distill.safetensors"]
    taylor = load_checkpoint(run_dir / "01_taylor_p1.safetensors")
    assert taylor.stage == "taylor" and taylor.metrics["taylor_steps"] >= 1 and taylor.metrics["params_ratio"] > 1
    # The stage's start and end lines reach the task run's log in Prefect.
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["taylor-p1"])))
                if r.state.is_completed() and not r.state.name == "Cached"]
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in runs])))
    messages = [log.message for log in logs]
    assert any(m.startswith("stage taylor-p1 started") for m in messages), messages
    assert any(m.startswith("stage taylor-p1 done in") and "FLOPs" in m and "val map_voc07" in m for m in messages)


@pytest.mark.parametrize("criterion", ["seed", "taylor"])
def test_the_flow_and_the_in_process_pipeline_write_the_plans_outputs(cfg, first_run, criterion, tmp_path):
    """One stage plan: both runners write exactly its outputs, in its order (the flow's runs are the ones above)."""
    overrides = {"seed": [], "taylor": ["stages.selection.criterion=taylor", "stages.selection.target_flops_ratio=2",
                                        "stages.selection.taylor_batches=2", "stages.selection.taylor_finetune_batches=2"]}
    variant = cfg
    for item in overrides[criterion]:
        key, _, value = item.partition("=")
        variant = _with(variant, key, yaml.safe_load(value))
    flow_dir = Path(first_run["run_dir"]) if criterion == "seed" else Path(cfg.workdir) / "tiny-taylor"
    if not flow_dir.is_dir():
        pytest.skip("the taylor flow run did not happen (its test failed or was deselected)")
    planned = [step.output for step in build_plan(variant)]
    rows = run_pipeline_in_process(variant, tmp_path / "in-process")
    in_process = [Path(row["path"]).name for row in rows]
    assert in_process == [name for name in planned if name.endswith(".safetensors")]
    assert outputs(tmp_path / "in-process") == outputs(flow_dir)
    assert [name for name in outputs(flow_dir) if not name.endswith(".selection.json")] == sorted(planned)
    assert sum(row["final"] for row in rows) == 1


def _with(config: PipelineConfig, dotted: str, value) -> PipelineConfig:
    raw = config.model_dump(mode="json")
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return PipelineConfig.model_validate(raw)


@pytest.mark.parametrize(("args", "says"), [
    (["--set", "stages.phases=[{name: p1, layers: [conv3_1]}]", "--set", "stages.selection.criterion=taylor"],
     "criterion 'taylor' needs prune_ratio or target_flops_ratio"),
    (["--set", "stages.phases=[{name: p1, layers: [conv3_1]}, {name: p2, layers: [conv4_1], prune_ratio: 0.2}]",
      "--set", "stages.selection.criterion=l1_norm"], "criterion 'l1_norm' needs prune_ratio"),
    (["--budget", "flops=2x", "--search",
      "knobs={stages.selection.criterion: [seed, taylor], stages.selection.target_latency_ratio: [2]}"],
     "criterion 'taylor' takes prune_ratio or target_flops_ratio, not target_latency_ratio"),
])
def test_cli_refuses_a_method_setting_in_one_line_before_anything_starts(tmp_path, args, says):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr
    assert "temporary server" not in result.stderr + result.stdout  # Prefect never started
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
