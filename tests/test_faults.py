"""Faults injected for real: SIGKILLed flow processes, a killed Ray Train worker, a tracking server that
goes away, a full disk.

A tiny config (32 digit images, 2 epochs per training stage so that a stage can die after its first
epoch) runs once uninterrupted (the baseline). The same pipeline in another folder is then SIGKILLed in
every stage (pretrain, sparsity, prune, retrain, distill), relaunched after each kill, and must end with
the baseline's final model. Real Prefect (test server), real Ray (one local instance, 2 workers), MLflow
(sqlite, and a real ``mlflow server`` for the outage). Durations are printed with ``-s``.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from mlflow import MlflowClient

from compression.checkpoint import load_checkpoint, save_checkpoint
from compression.config import OptimConfig, load_config
from compression.errors import CheckpointError
from compression.jobs import TrainJob, initial_checkpoint, run_train_job
from tasks.ray_trainer import ensure_ray, registered_epochs
from tasks.stages import storage_path
from tasks.tracking import PROCESS_TAG, process_id, process_is_gone

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "sparsity", "prune", "retrain", "distill")
# Two runs of the same seed on the same machine train bit for bit alike (per-epoch seeding, gloo's
# fixed reduction order); a resumed stage too. What may differ is the evaluation's floating-point
# summation order with other thread counts: the tolerance RELIABILITY.md states for a resumed run.
MAP_TOLERANCE = 0.01
WEIGHT_TOLERANCE = 1e-4


# The tiny pipeline with 2 epochs per training stage (a stage can die after its first epoch).
FAULTS = ["name=faults", "stages.pretrain.epochs=2", "stages.sparsity.epochs=2", "stages.retrain.epochs=2",
          "stages.distill.epochs=2", "tracking.registered_model=null", "tracking.log_onnx=false"]


# --------------------------------------------------------------------------------------------
# In-process: resumed training, a full disk, the orphaned-run check


def test_a_resumed_training_run_equals_an_uninterrupted_one(tmp_path, digits_devkit):
    cfg = tiny_config(tmp_path, digits_devkit, *FAULTS)
    job = TrainJob(stage="pretrain", config=cfg.model_dump(mode="json"),
                   optim=cfg.stages.pretrain.model_dump(mode="json", include=set(OptimConfig.model_fields)),
                   input_checkpoint=None, output_checkpoint=str(tmp_path / "out.safetensors"))

    class Stop(Exception):
        pass

    def train(stop_after: int | None = None, state=None, weights=None):
        prepared, snapshot = {}, {}

        def prepare(objective):  # what a restarted Ray worker does with the last epoch's checkpoint
            if weights is not None:
                objective.load_state_dict(weights)
            prepared["objective"] = objective
            return objective

        def stop(epoch, metrics, train_state):
            if epoch == stop_after:
                snapshot["weights"] = {k: v.clone() for k, v in prepared["objective"].state_dict().items()}
                snapshot["state"] = copy.deepcopy(train_state)
                raise Stop

        try:
            trained, _ = run_train_job(job, device="cpu", prepare_objective=prepare, callbacks=[stop],
                                       state=state, progress=False)
        except Stop:
            return snapshot
        return trained.model.state_dict()

    torch.set_num_threads(1)
    uninterrupted = train()
    after_first_epoch = train(stop_after=1)
    resumed = train(state=after_first_epoch["state"], weights=after_first_epoch["weights"])
    assert uninterrupted.keys() == resumed.keys()
    different = [k for k in uninterrupted if not torch.equal(uninterrupted[k], resumed[k])]
    assert not different, f"a resumed run trained differently: {different[:5]}"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, small_tmpfs):
    cfg = load_config("default", ["model.width_mult=0.0625", "model.image_size=64"])
    small = initial_checkpoint(cfg)
    target = save_checkpoint(small, small_tmpfs / "model.safetensors")
    before = target.read_bytes()
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # leave less than a checkpoint
    larger = initial_checkpoint(load_config("default", ["model.width_mult=0.125", "model.image_size=64"]))
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(larger, target)
    message = str(caught.value)
    assert "\n" not in message
    assert str(target) in message and "No space left on device" in message and "previous file is kept" in message
    assert target.read_bytes() == before
    assert load_checkpoint(target).model_args == small.model_args
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "model.safetensors"]  # no temporary left


def test_a_run_is_orphaned_only_when_its_process_is_gone():
    assert not process_is_gone(process_id())  # this process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = process_id(child.pid)
    child.wait()
    assert process_is_gone(tag)
    host, pid, start = process_id().split(":")
    assert not process_is_gone(f"{host}:{pid}:{start}")
    assert process_is_gone(f"{host}:{pid}:{int(start) + 1}")  # same pid, another process: a reused pid
    assert not process_is_gone(f"another-host:{pid}:{start}")  # undecidable from here: left alone


# --------------------------------------------------------------------------------------------
# Through the real flow


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, digits_devkit):
    root = tmp_path_factory.mktemp("faults")
    return tiny_config(root, digits_devkit, *FAULTS, f"workdir={root / 'baseline'}")


@pytest.fixture(scope="module")
def ray_session(cfg):
    return ensure_ray(cfg.compute)


def run_flow(cfg, label: str) -> dict:
    from flows.compress import run_pipeline

    started = time.perf_counter()
    summary = run_pipeline(cfg)
    print(f"\n{label}: {time.perf_counter() - started:.1f}s; "
          f"{[(r['checkpoint'], r['cached'], r['resumed_from_epoch']) for r in summary['checkpoints']]}")
    return summary


@pytest.fixture(scope="module")
def baseline(cfg, prefect_server, ray_session):
    return run_flow(cfg, "uninterrupted run")


def launch(config_file: Path, env: dict, overrides: list[str] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config_file)]
    command += [arg for item in overrides for arg in ("--set", item)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def reported_epochs(storage: Path, stage: str) -> int:
    """The highest epoch Ray Train registered for a run of ``stage`` under ``storage`` (what it resumes from)."""
    return max((registered_epochs(run) for run in storage.glob(f"{stage}*") if run.is_dir()), default=0)


def task_running(name_prefix: str, since: float) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
    return any(r.name.startswith(name_prefix) and r.start_time and r.start_time.timestamp() >= since for r in runs)


def kill_when(process: subprocess.Popen, ready, what: str, limit: float = 600) -> float:
    started = time.perf_counter()
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"the run ended before {what}:\n" + process.stdout.read().decode()[-3000:])
            assert time.perf_counter() - started < limit, f"never reached {what}"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return time.perf_counter() - started


def assert_every_checkpoint_whole(run_dir: Path) -> int:
    """Every checkpoint file of the pipeline loads completely; returns how many there are.

    (Ray Train's own epoch checkpoints are registered by Ray only once uploaded; a resumed stage
    loading one is the check on those.)"""
    paths = sorted(run_dir.glob("*.safetensors"))
    for path in paths:
        load_checkpoint(path)
    return len(paths)


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.fault
def test_a_run_killed_in_every_stage_resumes_and_ends_like_an_uninterrupted_one(cfg, baseline, prefect_server,
                                                                                ray_session, tmp_path):
    chained = cfg.model_copy(update={"workdir": tmp_path / "runs"})
    config_file = tmp_path / "faults.yaml"
    config_file.write_text(yaml.safe_dump(chained.model_dump(mode="json")))
    chained = load_config(config_file)
    storage, run_dir = Path(storage_path(chained)), Path(chained.workdir)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_ADDRESS": ray_session.address}

    for stage in STAGES:
        process = launch(config_file, env)
        since = time.time()
        if stage == "prune":
            def ready(since=since):
                return task_running("prune", since)
        else:  # a training stage dies after its first epoch was checkpointed, inside the second
            def ready(stage=stage):
                return reported_epochs(storage, stage) >= 1
        seconds = kill_when(process, ready, f"stage {stage}")
        print(f"\nkilled `prunepipe run` in {stage} after {seconds:.1f}s")
        assert assert_every_checkpoint_whole(run_dir / chained.name) >= STAGES.index(stage)  # those before it

    final = run_flow(chained, "run after five kills")

    rows = {row["stage"]: row for row in final["checkpoints"]}
    assert list(rows) == ["pretrain", "sparsity", "prune", "retrain", "distill"]
    assert all(rows[s]["cached"] for s in STAGES[:-1]) and not rows["distill"]["cached"]
    assert rows["distill"]["resumed_from_epoch"] == 1  # it went on after the epoch the kill interrupted
    for key in ("params", "flops"):
        assert final["final_metrics"][key] == baseline["final_metrics"][key], key
    print(f"\nVOC07 mAP: uninterrupted {baseline['final_metrics']['map_voc07']:.4f}, "
          f"after five kills {final['final_metrics']['map_voc07']:.4f}")
    assert final["final_metrics"]["map_voc07"] == pytest.approx(baseline["final_metrics"]["map_voc07"],
                                                                abs=MAP_TOLERANCE)
    ours = load_checkpoint(final["final_checkpoint"]).model.state_dict()
    theirs = load_checkpoint(baseline["final_checkpoint"]).model.state_dict()
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs)
    print(f"largest weight difference: {worst:.3g}")
    assert worst <= WEIGHT_TOLERANCE

    # MLflow: the five killed runs are closed as KILLED by the next start; each relaunch logged the
    # stage the kill before it interrupted, resumed (training) or redone (prune), and the finished ones cached.
    client = MlflowClient(chained.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(chained.tracking.experiment).experiment_id
    parents = client.search_runs([experiment], order_by=["attributes.start_time ASC"],
                                 filter_string=f"tags.`prunepipe.config_hash` = '{chained.config_hash()}'")
    parents = [p for p in parents if "mlflow.parentRunId" not in p.data.tags]
    assert [p.info.status for p in parents] == ["KILLED"] * 5 + ["FINISHED"]
    for killed, relaunch, stage in zip(STAGES[:-1], parents[1:5], STAGES[1:], strict=True):
        logged = {run.data.tags["prunepipe.stage"]: run for run in child_runs(client, experiment, relaunch.info.run_id)}
        assert killed in logged, f"the relaunch after the kill in {killed} did not finish it"
        assert stage not in logged  # it was killed there
        assert logged[killed].data.tags["prunepipe.cached"] == "false"
        if killed != "prune":
            assert logged[killed].data.metrics.get("resumed_from_epoch") == 1, killed
        assert all(run.data.tags["prunepipe.cached"] == "true" for name, run in logged.items()
                   if STAGES.index(name) < STAGES.index(killed))
    running = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    assert not running


@pytest.mark.fault
def test_a_killed_ray_worker_restarts_from_the_last_epoch_and_the_stage_finishes(cfg, baseline, ray_session):
    import ray
    import ray._private.state as ray_state

    # Only distill is new (another temperature); Ray may restart the worker group once.
    restarting = cfg.model_copy(deep=True)
    restarting.compute.max_failures = 1
    restarting.stages.distill.temperature = cfg.stages.distill.temperature + 1.0
    restarting.stages.distill.epochs = 3  # the kill lands after epoch 1, with epochs still to go
    storage = Path(storage_path(restarting))
    before = {p.name for p in storage.glob("distill*")}
    killed: list[int] = []  # the epochs checkpointed when a worker was killed
    errors: list[BaseException] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 600
        try:
            while time.time() < deadline:
                new = [p for p in storage.glob("distill*") if p.name not in before]
                done = reported_epochs(storage, new[0].name) if new else 0
                if done >= 3:
                    return  # too late: the fit is over
                if done >= 1:
                    # The GCS's actor table (ray.util.state would need the dashboard, which is off).
                    workers = [a["Pid"] for a in ray_state.actors().values()
                               if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
                    if workers:
                        pid = workers[-1]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(done)
                        return
                time.sleep(0.05)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            errors.append(err)

    assert ray.is_initialized()
    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    summary = run_flow(restarting, "distill with a killed worker")
    killer.join(timeout=5)
    assert not errors, errors
    assert killed, "no worker was killed"
    distill = summary["checkpoints"][-1]
    assert distill["stage"] == "distill" and not distill["cached"]
    assert summary["final_metrics"]["params"] == baseline["final_metrics"]["params"]
    # Ray restarted the workers from the last checkpoint: no finished epoch was trained again.
    assert distill["restarted_from_epoch"] is not None and killed[0] <= distill["restarted_from_epoch"] < 3
    assert all(row["restarted_from_epoch"] is None for row in summary["checkpoints"][:-1])
    assert Path(summary["final_checkpoint"]).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(port: int, home: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


@pytest.mark.fault
def test_the_tracking_server_going_away_fails_clearly_and_the_next_run_logs_everything(
        cfg, baseline, prefect_server, ray_session, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(port, tmp_path)
    config_file = tmp_path / "faults.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # Retrain gets new settings: pretrain, sparsity and prune are cached (logged at once), retrain trains.
    overrides = [f"tracking.mlflow_uri={uri}", "stages.retrain.lr=0.004", "stages.distill.enabled=false"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_ADDRESS": ray_session.address,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    client = MlflowClient(uri)
    process = launch(config_file, env, overrides)
    try:
        def prune_logged() -> bool:
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            return experiment is not None and bool(client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.`prunepipe.stage` = 'prune' and attributes.status = 'FINISHED'"))

        started = time.perf_counter()
        while not prune_logged():
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.perf_counter() - started < 600
            time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away while retrain trains
        server.wait()
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow at {uri} stopped answering while logging"), output[-3000:]
    assert "run the same command again" in last
    run_dir = Path(cfg.workdir) / cfg.name
    retrained = sorted(run_dir.glob("*retrain*.safetensors"), key=lambda p: p.stat().st_mtime)[-1]
    assert assert_every_checkpoint_whole(run_dir) >= 4
    trained_at = retrained.stat().st_mtime

    server = start_mlflow_server(port, tmp_path)
    try:
        rerun = run_flow(load_config(config_file, overrides), "re-run once the server is back")
        assert all(row["cached"] for row in rerun["checkpoints"])
        assert retrained.stat().st_mtime == trained_at  # kept, not recomputed
        experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        logged = child_runs(client, experiment, rerun["mlflow"]["run_id"])
        assert sorted(r.data.tags["prunepipe.stage"] for r in logged) == ["pretrain", "prune", "retrain", "sparsity"]
        assert all(r.info.status == "FINISHED" for r in logged)
        earlier = [r for r in client.search_runs([experiment]) if r.info.run_id != rerun["mlflow"]["run_id"]
                   and "mlflow.parentRunId" not in r.data.tags]
        assert [r.info.status for r in earlier] == ["KILLED"]  # the failed run's parent, closed by the re-run
        assert PROCESS_TAG in earlier[0].data.tags
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
