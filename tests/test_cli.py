"""The ``prunepipe`` command line as a person and a script see it: help, --version, --json, where log
lines go during a run, and which stack a run uses. ``prunepipe run`` on the stack of ``prunepipe up``
end to end is ``test_run_uses_the_stack_of_prunepipe_up`` (slow)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from compression.checkpoint import save_checkpoint
from compression.config import load_config
from compression.jobs import initial_checkpoint
from flows.cli import _route_logs, service_lines
from infra.local.process import ProcessRecord, StackError
from infra.local.stack import stack_env_for_run

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console entry point in its own process."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def test_help_groups_the_commands_and_keeps_train_as_a_hidden_alias(tmp_path):
    shown = cli("--help", cwd=tmp_path, env={"COLUMNS": "120"})
    assert shown.returncode == 0, shown.stderr
    for panel in ("Run the pipeline", "Inspect checkpoints", "Data", "Stack", "--version"):
        assert panel in shown.stdout
    assert "pretrain" in shown.stdout and " train " not in shown.stdout
    bare = cli(cwd=tmp_path, env={"COLUMNS": "120"})
    assert bare.returncode == 0 and "Run the pipeline" in bare.stdout  # plain `prunepipe`: the help
    alias = cli("train", "--help", cwd=tmp_path, env={"COLUMNS": "120"})
    assert alias.returncode == 0 and "KEY.PATH=VALUE" in alias.stdout and "PRESET|FILE" in alias.stdout
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("prunepipe ")


def test_json_output_is_json_alone(tmp_path):
    cfg = load_config("default", ["model.width_mult=0.0625", "model.image_size=64"])
    path = save_checkpoint(initial_checkpoint(cfg), tmp_path / "model.safetensors")
    info = cli("info", str(path), "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    details = json.loads(info.stdout)
    assert details["model_name"] == "ssd_vgg_lite" and details["module_shapes"]
    status = cli("status", "--home", str(tmp_path / "home"), "--json", cwd=tmp_path)
    assert status.returncode == 0 and json.loads(status.stdout) == []


def test_a_run_keeps_library_noise_in_its_log_file(tmp_path, capsys):
    """What reaches the terminal: our modules' progress and real warnings, not Python warnings from
    libraries or Prefect's per-task "Finished in state Completed()"; the log file gets everything."""
    log_file = tmp_path / "run" / "prunepipe-run.log"
    root_handlers = list(logging.getLogger().handlers)
    with _route_logs(log_file):
        assert not log_file.exists()  # created at its first line: a run refused up front leaves no file
        logging.getLogger("flows.compress").info("stage retrain p1: started")
        logging.getLogger("prefect.task_runs").info("Finished in state Completed()")
        logging.getLogger("prefect.flow_runs").info("Beginning flow run 'sepia-mule' for flow 'compress'")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("ray.train").warning("a worker died; restarting from the last checkpoint")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Hint: Inferred schema contains integer column(s).", UserWarning, stacklevel=1)
    terminal = capsys.readouterr().err
    written = log_file.read_text()
    assert "stage retrain p1: started" in terminal and "Beginning flow run" in terminal
    assert "a worker died" in terminal
    for quiet in ("Finished in state Completed()", "Creating initial MLflow database tables", "Inferred schema"):
        assert quiet not in terminal and quiet in written
    assert logging.getLogger().handlers == root_handlers  # restored for whatever runs next in this process


def test_no_stack_leaves_the_environment_alone_and_a_dead_one_is_an_error(tmp_path):
    assert stack_env_for_run(tmp_path / "nothing-here") == {}
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    record = ProcessRecord("prefect", finished.pid, None, str(tmp_path / "prefect.log"), ("prefect",))
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.json").write_text(json.dumps({
        "home": str(home), "host": "127.0.0.1", "ray_auth_token": str(home / "token"),
        "env": {"PREFECT_API_URL": "http://127.0.0.1:4200/api"},
        "services": [{"name": "prefect", "url": "http://127.0.0.1:4200", "port": 4200, "process": record.to_json()}],
    }))
    with pytest.raises(StackError, match="prefect no longer runs; restart it"):
        stack_env_for_run(home)


def test_the_first_lines_name_each_service_and_where_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = load_config("default", ["compute.ray_address=10.0.0.5:6379"])
    lines = service_lines(cfg, tmp_path, from_stack=set())
    assert lines[0].startswith("Prefect API: a temporary server for this run only")
    assert lines[1] == "MLflow tracking: http://mlflow.example:5000 ($MLFLOW_TRACKING_URI)"
    assert lines[2] == "Ray: 10.0.0.5:6379 (compute.ray_address)"


# --------------------------------------------------------------------------------------------
# End to end: `prunepipe up`, then `prunepipe run` on it


TINY = ["name=tiny", "data.builtin=null", "data.batch_size=8", "data.eval_batch_size=8",
        "model.width_mult=0.0625", "model.image_size=64", "compute.amp_bf16=false", "compute.channels_last=false",
        "stages.pretrain.epochs=1", "stages.pretrain.warmup_epochs=0", "stages.sparsity.epochs=1",
        "stages.sparsity.alpha_grid=[3.0]", "stages.selection.min_channels=2", "stages.retrain.epochs=1",
        "stages.distill.enabled=false", "stages.selection.criterion=seed",
        "stages.phases=[{name: p1, layers: [conv3_1, conv3_2]}]",
        "compute.max_failures=0", "tracking.log_onnx=false"]


@pytest.mark.slow
def test_run_uses_the_stack_of_prunepipe_up(tmp_path):
    """`prunepipe run` in the folder where `prunepipe up` ran logs to that stack's MLflow server and runs
    its flow on that stack's Prefect server and Ray head, and says so in its first lines."""
    from mlflow import MlflowClient

    from compression.data.digits import write_digits_voc
    from infra.local.process import free_ports
    from infra.local.stack import stack_down, stack_env, stack_up

    devkit = write_digits_voc(tmp_path / "data", image_size=64, num_images={"train": 16, "val": 8, "test": 8})
    home = Path(tempfile.mkdtemp(prefix="pp-"))  # short: Ray's socket paths must fit in 107 bytes
    ports = free_ports(4)
    stack_up(home, prefect_port=ports[0], mlflow_port=ports[1], ray_port=ports[2], ray_dashboard_port=ports[3],
             ray_num_cpus=2)
    try:
        env = stack_env(home)
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        args = [f"--set={s}" for s in [*TINY, f"data.root={devkit}", f"workdir={tmp_path / 'runs'}"]]
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--home", str(home), "--json", *args],
                                cwd=tmp_path, env={**environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                text=True, timeout=1500)
        print(f"\nprunepipe run on the stack: {time.perf_counter() - started:.0f}s")
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout)  # --json: stdout is the summary alone
        said = result.stderr.splitlines()
        assert f"Prefect API: {env['PREFECT_API_URL']} (the stack under {home})" in said
        assert f"MLflow tracking: {env['MLFLOW_TRACKING_URI']} (the stack under {home})" in said
        assert f"Ray: {env['RAY_ADDRESS']} (the stack under {home})" in said
        assert summary["mlflow"]["uri"] == env["MLFLOW_TRACKING_URI"]
        assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        parent = client.get_run(summary["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] == summary["flow_run_id"]
        experiment = client.get_experiment(parent.info.experiment_id)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

        with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{summary['flow_run_id']}") as answer:
            assert json.load(answer)["state"]["type"] == "COMPLETED"  # the stack's Prefect ran the flow
        assert summary["ray"]["started_here"] is False  # it joined the stack's Ray head
        table = (tmp_path / "runs" / "tiny" / "checkpoints.csv").read_text().splitlines()
        assert table[0].startswith("checkpoint,") and len(table) == 1 + len(summary["checkpoints"])
        assert "Finished in state Completed()" in (tmp_path / "runs" / "tiny" / "prunepipe-run.log").read_text()
    finally:
        stack_down(home)
