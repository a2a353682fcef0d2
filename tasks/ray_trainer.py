"""Ray Train binding of ``compression.jobs``: every training stage runs as a ``TorchTrainer`` fit.

``RayTrainer.fit(job)`` runs the very same ``run_train_job`` as ``LocalTrainer`` inside each Ray Train
worker, with the objective wrapped in DDP (gloo on CPU, NCCL on GPU) and the loader sharded. Each epoch
every rank calls ``ray.train.report``; rank 0 attaches a checkpoint directory holding the objective's
weights and the ``TrainState`` (safetensors + JSON, nothing pickled). A restarted worker group (a lost
worker, or a new fit with the same run name after the driver died) resumes from the last reported epoch,
and rank 0 writes the final prunepipe checkpoint after the loop.

The workers may sit on other nodes than the process that calls ``fit``, so the job's checkpoints travel
through the fit's folder in Ray Train's storage (``storage_path``, which every node reaches by Ray Train's
own contract): ``fit`` stores the input (and teacher) there, each worker reads its node's copy, rank 0
stores the trained checkpoint there and ``fit`` copies it to ``job.output_checkpoint``.

Workers print nothing to the driver (``log_to_driver=False``); rank 0 sends its progress records through a
Ray queue instead, and a driver thread logs each as one line (to the Prefect task's log when the fit runs
in a Prefect task) and hands it to ``RayTrainer.on_progress``.

This module is imported by every Ray worker (the loop function is pickled by reference), so it keeps its
top-level imports to Ray and the pure-PyTorch ``compression`` package: no Prefect, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compression.checkpoint import file_digest, read_metadata, save_checkpoint
from compression.config import ComputeConfig, PhaseConfig, PipelineConfig
from compression.errors import PrunepipeError
from compression.jobs import TrainJob, TrainResult, run_train_job
from compression.train import ProgressCallback, TrainState, format_progress
from tasks.cluster import Capacity, ComputeError, check_offers, cluster_capacity, node_identity
from tasks.storage import (
    absolute,
    fetch,
    forget,
    is_uri,
    join,
    local_data_root,
    local_mirror,
    parent,
    publish,
    read_text,
    remove,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "objective.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_JSON_FILE = "state.json"
# Ray Train V2 keeps the registered checkpoints of a run here (storage_path/name/).
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"

# Ray Train V2 (the default since Ray 2.5x) extras that cost a process each per fit and do nothing for a
# one-node run we own: the preemption watcher actor and the metrics callbacks. Set only if unset, so a
# cluster operator can turn them back on.
_RAY_TRAIN_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


# --------------------------------------------------------------------------------------------
# One Ray connection per process (flow run)


@dataclass
class RayInfo:
    address: str
    started_here: bool
    cpus: float
    gpus: float
    init_seconds: float
    # The alive nodes and the autoscaler's node groups (None: one node with ``cpus`` and ``gpus``).
    capacity: Capacity | None = None


_ray_info: RayInfo | None = None


def check_gpu(compute: ComputeConfig) -> None:
    """``compute.use_gpu`` needs a visible CUDA GPU on this machine (checked before a local Ray starts)."""
    if compute.use_gpu and not torch.cuda.is_available():
        raise ComputeError("compute.use_gpu is true but no CUDA GPU is visible here; set compute.use_gpu=false")


def ray_address(compute: ComputeConfig) -> str | None:
    return compute.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail with one line when nothing listens at a ``host:port`` Ray address (``auto`` is Ray's to find)."""
    if address in ("auto", "local"):
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ComputeError(f"compute.ray_address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ComputeError(
            f"Ray address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            "`ray start --head` or leave compute.ray_address and $RAY_ADDRESS empty for a local Ray"
        ) from None


def ensure_ray(compute: ComputeConfig) -> RayInfo:
    """Connect to ``compute.ray_address`` / ``$RAY_ADDRESS``, else start a local Ray sized to this machine.

    Called once per flow run and reused by every stage; a second call returns the same connection. A
    local Ray makes this machine the cluster, so its GPU is checked here; a joined cluster is checked for
    what its nodes and its autoscaler can offer (the driver itself needs no GPU).
    """
    global _ray_info
    import ray

    address = ray_address(compute)
    if _ray_info is not None and ray.is_initialized():
        if _ray_info.started_here:
            check_gpu(compute)
        _check_resources(compute, _ray_info)
        return _ray_info
    if not address and not ray.is_initialized():
        check_gpu(compute)
    for key, value in _RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    if ray.is_initialized():  # someone (a test, a notebook) connected already: use it
        started_here = False
    elif address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            raise ComputeError(f"Ray address {address}: cannot connect ({_first_line(exc)})") from None
        started_here = False
    else:
        # address="local": never join another Ray found on this machine (other users' clusters).
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            num_gpus=torch.cuda.device_count() if compute.use_gpu else 0,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        started_here = True
    resources = ray.cluster_resources()
    info = RayInfo(
        address=ray.get_runtime_context().gcs_address,
        started_here=started_here,
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
        init_seconds=time.perf_counter() - started,
        capacity=cluster_capacity(),
    )
    _ray_info = info
    log.info("Ray at %s (%g CPUs, %g GPUs) ready in %.1fs", info.address, info.cpus, info.gpus, info.init_seconds)
    _check_resources(compute, info)
    return info


def _check_resources(compute: ComputeConfig, info: RayInfo) -> None:
    """A fit that asks for more than the cluster can ever offer would wait forever: refuse it with one line."""
    capacity = info.capacity or Capacity(nodes=[{"CPU": info.cpus, "GPU": info.gpus}])
    check_offers(compute, capacity, info.address)


def ray_summary() -> dict[str, Any] | None:
    """How this process reached Ray (None when no fit needed it)."""
    if _ray_info is None:
        return None
    return {"address": _ray_info.address, "started_here": _ray_info.started_here, "cpus": _ray_info.cpus,
            "gpus": _ray_info.gpus, "init_seconds": _ray_info.init_seconds}


def shutdown_ray() -> None:
    """Stop the local Ray this process started (a joined cluster is only disconnected)."""
    global _ray_info
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _ray_info = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Run names: stable per (stage, phase, input, settings), so a re-run resumes the same Ray run


def run_name(job: TrainJob) -> str:
    """``<stage>[-<phase>]-<digest>``: the digest covers the input checkpoint's bytes and the settings that
    identify the stage's output (``compression.plan.stage_settings``) except the epoch count, so asking for
    more epochs continues a run."""
    from compression.plan import stage_settings

    payload = job.to_dict()
    payload.pop("output_checkpoint")
    payload["optim"] = {k: v for k, v in payload["optim"].items() if k != "epochs"}
    settings = stage_settings(job.pipeline, job.stage)
    settings["stages"] = {name: {k: v for k, v in section.items() if k != "epochs"}
                          for name, section in settings["stages"].items()}
    payload["config"] = settings
    for key in ("input_checkpoint", "teacher_checkpoint"):
        if payload.get(key):
            payload[key] = file_digest(payload[key])
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    parts = [job.stage] + ([_slug(job.phase)] if job.phase else []) + [digest]
    return "-".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)[:40]


# --------------------------------------------------------------------------------------------
# Training state <-> files (tensors in safetensors, the rest in JSON; nothing is unpickled)


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if any(not isinstance(k, str | int) for k in obj):
            raise TypeError(f"cannot store a dict with key types {sorted({type(k).__name__ for k in obj})}")
        return {
            "__dict__": [[k, _split_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()]
        }
    if isinstance(obj, list | tuple):
        items = [_split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_train_state(directory: Path, weights: dict[str, torch.Tensor], state: TrainState) -> None:
    """Write the objective's weights and the optimiser/scheduler state as safetensors + JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {
        "epoch": state.epoch,
        "optimizer": _split_tensors(state.optimizer, tensors, "optimizer"),
        "scheduler": _split_tensors(state.scheduler, tensors, "scheduler"),
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_metric": state.best_metric,
        "best_weights": _split_tensors(state.best_weights, tensors, "best_weights"),
        "stopped": state.stopped,
    }
    save_file(tensors, str(directory / STATE_TENSORS_FILE))
    (directory / STATE_JSON_FILE).write_text(json.dumps(skeleton))


def load_train_state(directory: Path) -> tuple[dict[str, torch.Tensor], TrainState]:
    weights = load_file(str(directory / WEIGHTS_FILE))
    tensors = load_file(str(directory / STATE_TENSORS_FILE))
    skeleton = json.loads((directory / STATE_JSON_FILE).read_text())
    state = TrainState(
        epoch=int(skeleton["epoch"]),
        optimizer=_join_tensors(skeleton["optimizer"], tensors),
        scheduler=_join_tensors(skeleton["scheduler"], tensors),
        history=list(skeleton["history"]),
        best_epoch=int(skeleton.get("best_epoch", 0)),
        best_metric=skeleton.get("best_metric"),
        best_weights=_join_tensors(skeleton.get("best_weights"), tensors),
        stopped=bool(skeleton.get("stopped", False)),
    )
    return weights, state


# --------------------------------------------------------------------------------------------
# The worker loop


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, int]:
    """Runs in every Ray Train worker: ``run_train_job`` with DDP, per-epoch reports, resume.

    Returns the epoch this attempt resumed after (0: from scratch); Ray hands rank 0's value to the
    driver, which tells from it whether Ray restarted the worker group during the fit."""
    import ray.train
    import ray.train.torch

    config = dict(config)
    progress_queue = config.pop(PROGRESS_QUEUE_KEY, None)
    given_input = config.pop(GIVEN_INPUT_KEY, None)
    config["config"] = with_local_data(config["config"])
    stored = {key: config[key] for key in ("input_checkpoint", "teacher_checkpoint") if config.get(key)}
    for key, location in stored.items():
        config[key] = str(fetch(location))
    stored_output = config["output_checkpoint"]
    config["output_checkpoint"] = str(local_mirror(stored_output))
    job = TrainJob(**config)
    compute = job.pipeline.compute
    torch.set_num_threads(compute.threads_per_worker or max(1, int(compute.cpus_per_worker)))
    context = ray.train.get_context()
    rank = context.get_world_rank()

    resume_weights: dict[str, torch.Tensor] | None = None
    state: TrainState | None = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            resume_weights, state = load_train_state(Path(directory))
        log.info("%s: resuming after epoch %d", job.stage, state.epoch)
    resumed_from_epoch = state.epoch if state is not None else 0  # run_train_job advances ``state``

    prepared: dict[str, torch.nn.Module] = {}

    def prepare_objective(objective: torch.nn.Module) -> torch.nn.Module:
        if resume_weights is not None:
            objective.load_state_dict(resume_weights)
        prepared["objective"] = objective
        return ray.train.torch.prepare_model(objective)

    def prepare_loader(loader: Any) -> Any:
        # train_model moves (detection) batches itself; Ray only adds the DistributedSampler.
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def report(epoch: int, metrics: dict[str, float], train_state: TrainState) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="prunepipe-epoch-") as directory:
            save_train_state(Path(directory), prepared["objective"].state_dict(), train_state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trained, final_state = run_train_job(
        job,
        device=ray.train.torch.get_device(),
        prepare_objective=prepare_objective,
        prepare_loader=prepare_loader,
        callbacks=[report],
        state=state,
        progress=False,
        on_progress=_send_to(progress_queue) if rank == 0 and progress_queue is not None else None,
    )
    if rank == 0:
        trained.model.to("cpu")
        trained.parent = given_input  # the lineage names the checkpoint the stage gave, not this node's copy
        save_checkpoint(trained, Path(job.output_checkpoint))
        publish(job.output_checkpoint, stored_output)
        forget(stored_output)
    for location in stored.values():  # loaded at the start; a restarted attempt fetches again
        forget(location)
    return {"resumed_from_epoch": resumed_from_epoch}


def _send_to(progress_queue: Any) -> ProgressCallback:
    """Rank 0's progress callback: put each record on the driver's queue (training goes on if it is gone)."""
    failed: list[bool] = []

    def send(record: dict[str, Any]) -> None:
        if failed:
            return
        try:
            progress_queue.put(record, block=False)
        except Exception as exc:  # noqa: BLE001 - progress lines must never stop training
            failed.append(True)
            log.warning("progress records no longer reach the driver: %s", _first_line(exc))

    return send


# --------------------------------------------------------------------------------------------
# Progress: rank 0 -> a Ray queue -> a driver thread -> the log (Prefect's when in a task) and a hook

PROGRESS_QUEUE_KEY = "progress_queue"  # the train loop config entry that carries the queue to the workers
GIVEN_INPUT_KEY = "given_input_checkpoint"  # the input checkpoint as the stage named it (for the lineage)


class ProgressRelay:
    """A Ray queue for one fit's progress records and the driver thread that hands each to ``emit``."""

    def __init__(self, emit: ProgressCallback) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})  # holds no CPU the workers need
        self._emit = emit
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="prunepipe-progress", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                # After close(): what is left, without waiting.
                record = self.queue.get(timeout=0.5) if not self._closing.is_set() else self.queue.get_nowait()
            except Empty:
                if self._closing.is_set():
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - the queue actor died: the fit itself reports that
                log.warning("progress relay stopped: %s", _first_line(exc))
                return
            try:
                self._emit(record)
            except Exception as exc:  # noqa: BLE001 - a failing hook must not lose the other lines
                log.warning("progress hook failed: %s", _first_line(exc))

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=30)
        self.queue.shutdown(force=True)


def _driver_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (its lines reach the terminal and the UI), else ours."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger
    except ImportError:
        return log
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def relay_emitter(hook: ProgressCallback | None = None) -> ProgressCallback:
    """What the driver does with each relayed record: a log line (to the Prefect run's log inside a flow or
    task run), then ``hook`` for training progress. Taken in the driver's thread: the Prefect run context does
    not follow into the relay thread."""
    logger = _driver_logger()

    def emit(record: dict[str, Any]) -> None:
        if record.get("kind") == "log":  # a line a stage logged on its node
            logger.log(int(record.get("level", logging.INFO)), record["message"])
            return
        logger.info(format_progress(record))
        if hook is not None:
            hook(record)

    return emit


class QueueLogHandler(logging.Handler):
    """Sends a node's log records to the driver's relay queue (the node's own output is not shown)."""

    def __init__(self, queue: Any) -> None:
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put({"kind": "log", "level": record.levelno, "message": record.getMessage()}, block=False)
        except Exception:  # noqa: BLE001 - a lost line must never stop a stage
            self.handleError(record)


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class FitTiming:
    """Where a fit's wall time went (the driver's view)."""

    run_name: str
    seconds: float
    epochs_trained: int
    resumed_from_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    # What compute.amp_bf16 / channels_last became on the workers (ResolvedCompute.as_dict()).
    precision: dict[str, Any] | None = None
    # Set when Ray restarted the worker group during this fit (a lost worker or node) and the last
    # attempt resumed from a checkpoint this fit had reported: the epoch that attempt started after.
    restarted_from_epoch: int | None = None


class RayTrainer:
    """``compression.jobs.Trainer`` on Ray Train: one ``TorchTrainer`` fit per job."""

    def __init__(self, compute: ComputeConfig, storage_path: Path | str,
                 on_progress: ProgressCallback | None = None, progress_queue: Any = None,
                 data_root: str | None = None) -> None:
        self.compute = compute
        self.storage_path = absolute(storage_path)  # a URI (s3://, gs://, file://) or a folder every node sees
        self.fits: list[FitTiming] = []
        # Every progress record of rank 0 (compression.train.train_model), called from a driver thread
        # after the line is logged: e.g. per-epoch MLflow metrics.
        self.on_progress = on_progress
        # A relay the caller runs (a stage task on a node relays to the flow's process): rank 0 sends there.
        self.progress_queue = progress_queue
        # data.root as configured (a URI stays one): each worker makes its own node's local copy.
        self.data_root = data_root

    def fit(self, job: TrainJob) -> TrainResult:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
        from ray.train.torch import TorchTrainer

        if not ray.is_initialized():
            ensure_ray(self.compute)
        compute = self.compute
        name = run_name(job)
        resources: dict[str, float] = {"CPU": compute.cpus_per_worker}
        if compute.use_gpu:
            resources["GPU"] = compute.gpus_per_worker  # Ray packs fractional workers onto one GPU
        config = absolute_paths(job.to_dict())
        # The job's pipeline config must carry this trainer's compute settings (threads per worker).
        config["config"] = {**config["config"], "compute": compute.model_dump(mode="json")}
        config["config"]["data"] = per_worker_batch(config["config"]["data"], compute.num_workers)
        if self.data_root is not None:
            config["config"]["data"]["root"] = self.data_root
        # The checkpoints travel through the fit's folder in Ray Train's storage (see the module's note).
        exchange = join(self.storage_path, name, ".prunepipe-exchange")
        config[GIVEN_INPUT_KEY] = config["input_checkpoint"]
        for key in ("input_checkpoint", "teacher_checkpoint"):
            if config.get(key):
                publish(config[key], join(exchange, f"{key}.safetensors"))
                config[key] = join(exchange, f"{key}.safetensors")
        config["output_checkpoint"] = join(exchange, "output_checkpoint.safetensors")
        remove(config["output_checkpoint"])  # an earlier fit's, which must not pass for this one's
        before = registered_epochs(join(self.storage_path, name))
        started = time.perf_counter()
        relay = ProgressRelay(relay_emitter(self.on_progress)) if self.progress_queue is None else None
        try:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={**config, PROGRESS_QUEUE_KEY: relay.queue if relay else self.progress_queue},
                scaling_config=ScalingConfig(
                    num_workers=compute.num_workers, use_gpu=compute.use_gpu, resources_per_worker=resources
                ),
                run_config=RunConfig(
                    storage_path=self.storage_path,
                    name=name,
                    failure_config=FailureConfig(max_failures=compute.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                ),
            )
            result = trainer.fit()
        except TrainingFailedError as err:
            user_error = worker_user_error(err)
            if user_error is not None:
                raise user_error from None
            raise
        finally:
            if relay is not None:
                relay.close()
        seconds = time.perf_counter() - started
        output = Path(job.output_checkpoint)
        try:
            publish(fetch(config["output_checkpoint"]), str(output.resolve()))
        except FileNotFoundError:
            raise RuntimeError(f"Ray Train run {name} finished without writing {config['output_checkpoint']}") from None
        # The copies served their purpose (a later fit of this run stores its own): keep storage to Ray's.
        for key in ("input_checkpoint", "teacher_checkpoint", "output_checkpoint"):
            if config.get(key):
                remove(config[key])
                forget(config[key])
        extra = read_metadata(output).get("extra", {})
        history = list(extra.get("history", []))
        precision = extra.get("precision")
        returned = getattr(result, "return_value", None) or {}  # rank 0's, from the last attempt
        last_attempt_from = int(returned.get("resumed_from_epoch", before))
        restarted_from = last_attempt_from if last_attempt_from > before else None
        if restarted_from is not None:
            log.warning(
                "%s: Ray Train fit %s: a worker failed (a lost node or process) and Ray restarted the worker "
                "group (compute.max_failures=%d); it resumed after epoch %d of %d, none of those was retrained",
                job.stage, name, compute.max_failures, restarted_from, len(history),
            )
        self.fits.append(FitTiming(name, seconds, len(history) - before, before, history, precision, restarted_from))
        log.info("%s: Ray Train fit %s took %.1fs (%d epochs)", job.stage, name, seconds, len(history) - before)
        return TrainResult(output_checkpoint=str(output), history=history, precision=precision)


def per_worker_batch(data: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """``data`` with ``batch_size`` split over the workers: the config's batch size is the global batch.

    DDP averages the workers' gradients, so N workers at the config's batch each would train with an
    N-times larger batch and N times fewer steps per epoch than the same preset in one process (measured:
    5 pretrain epochs on 2 workers reached 0.355 VOC07 mAP against 0.659 in-process).
    """
    return {**data, "batch_size": max(1, math.ceil(int(data["batch_size"]) / max(1, num_workers)))}


def absolute_paths(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with every path resolved against the driver's working directory.

    Ray Train workers do not run in the driver's working directory, so a relative path in a config
    (``data.root: data/digits-voc/VOCdevkit`` in the presets) must be made absolute before it travels.
    """
    job = dict(job)
    for key in ("input_checkpoint", "output_checkpoint", "teacher_checkpoint"):
        if job.get(key):
            job[key] = str(Path(job[key]).resolve())
    job["config"] = absolute_config_dict(job["config"])
    return job


def absolute_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a pipeline config (as JSON) with its paths resolved against this working directory (a URI in
    ``data.root`` or ``compute.storage_path`` stays as it is)."""
    cfg = json.loads(json.dumps(config))  # a deep copy of plain JSON
    for section, key in (("data", "root"), ("compute", "storage_path")):
        if cfg.get(section, {}).get(key):
            cfg[section][key] = absolute(cfg[section][key])
    if cfg.get("model", {}).get("weights"):
        cfg["model"]["weights"] = str(Path(cfg["model"]["weights"]).resolve())
    if cfg.get("workdir"):
        cfg["workdir"] = absolute(cfg["workdir"])
    pretrain = cfg.get("stages", {}).get("pretrain", {})
    if pretrain.get("checkpoint"):
        pretrain["checkpoint"] = str(Path(pretrain["checkpoint"]).resolve())
    return cfg


def with_local_data(config: dict[str, Any]) -> dict[str, Any]:
    """A pipeline config (as JSON) whose ``data.root`` is a folder on this node (``tasks.storage``)."""
    return {**config, "data": {**config["data"], "root": local_data_root(str(config["data"]["root"]))}}


def absolute_config(config: PipelineConfig) -> PipelineConfig:
    """``config`` with absolute paths, for a process on a node whose working directory is not the driver's."""
    return PipelineConfig.model_validate(absolute_config_dict(config.model_dump(mode="json")))


def registered_epochs(run_dir: str | Path) -> int:
    """Epochs of the checkpoint Ray Train would resume a run from (0 when there is none); ``run_dir`` is
    ``<storage path>/<run name>``, a folder or a URI.

    Ray restores the latest checkpoint its controller *registered* (``checkpoint_manager_snapshot.json``);
    a checkpoint folder written just before a crash, but never registered, is not resumed from.
    """
    try:
        snapshot = json.loads(read_text(join(str(run_dir), RAY_CHECKPOINT_SNAPSHOT)))
        return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def worker_user_error(err: BaseException) -> PrunepipeError | None:
    """The ``PrunepipeError`` a worker raised (a user error: bad data, diverged loss), if any."""
    for failure in getattr(err, "worker_failures", {}).values():
        base = getattr(failure, "_base_exc", failure)  # UserExceptionWithTraceback wraps the original
        if isinstance(base, PrunepipeError):
            return base
    return None


def is_lost_worker(err: BaseException) -> bool:
    """True when a training failure came from Ray losing a worker/actor/node (worth a retry)."""
    import ray.exceptions

    lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    failures = getattr(err, "worker_failures", None)
    if failures is None:
        cause = getattr(err, "controller_failure", None)
        return cause is not None and not isinstance(cause, PrunepipeError)
    # A worker on a dead node fails Ray Train's health check: WorkerHealthCheckFailedError wrapping the
    # ActorUnavailableError / ActorDiedError (the other ranks fail with collective errors meanwhile).
    causes = [getattr(f, "health_check_failure", getattr(f, "_base_exc", f)) for f in failures.values()]
    return any(isinstance(cause, lost) for cause in causes)


# --------------------------------------------------------------------------------------------
# One plan step on a node (``tasks.cluster.on_worker_node`` runs this as a Ray task)


def run_stage_on_node(config: PipelineConfig, stage: str, phase: PhaseConfig | None, inputs: dict[str, str],
                      out: str, base_metrics: dict[str, Any] | None, storage: str,
                      progress_queue: Any) -> dict[str, Any]:
    """Run one step of ``compression.plan`` here: its training as Ray Train fits, its evaluation and
    measurement in this process. Log lines and rank 0's progress go to ``progress_queue`` (the driver's
    relay). Returns the output path, the metrics, the fits and the node it ran on (``node_identity``)."""
    from compression import plan as P
    from compression.stages import LATENCY_TABLE

    node = node_identity()
    compute = config.compute
    data_root = config.data.root
    # Locations (URIs under a remote run folder) become files on this node, and what the step writes there
    # goes back to the run folder (``tasks.storage``).
    local_inputs = {arg: str(fetch(location)) for arg, location in inputs.items()}
    local_out = local_mirror(out)
    if is_uri(out):
        _fetch_if_stored(join(parent(out), LATENCY_TABLE))  # this run's latency table, when a node measured it
    started = time.time()
    config = PipelineConfig.model_validate(with_local_data(config.model_dump(mode="json")))
    if compute.use_gpu and not torch.cuda.is_available():
        raise ComputeError(
            f"compute.use_gpu: Ray node {node['node_id']} ({node['hostname']}) offers GPUs to Ray but torch sees no "
            "CUDA device there; check the node's NVIDIA driver and torch's CUDA build, or set compute.use_gpu=false"
        )
    # A task that reserves no CPU gets one thread from Ray: evaluate with a worker's share instead.
    torch.set_num_threads(compute.threads_per_worker or max(1, int(compute.cpus_per_worker)))
    logger = logging.getLogger(f"{__name__}.stage")
    logger.setLevel(logging.INFO)  # a Ray worker's root logger passes warnings only
    handler = QueueLogHandler(progress_queue)
    logger.addHandler(handler)
    try:
        step = P.Step(P.STAGES[stage], local_out.stem, phase)
        logger.info("stage %s runs on Ray node %s (%s)", step.label, node["node_id"], node["hostname"])
        trainer = (RayTrainer(compute, storage, progress_queue=progress_queue, data_root=data_root)
                   if step.stage.trains else None)
        path, metrics = P.run_step(step, config, local_out, local_inputs, trainer=trainer,
                                   base_metrics=base_metrics, logger=logger)
        written = [out]
        if is_uri(out):
            written = [join(parent(out), file.name) for file in sorted(local_out.parent.iterdir())
                       if file.is_file() and not file.name.startswith(".") and file.stat().st_mtime >= started]
            for location in written:
                publish(local_mirror(location), location)
    finally:
        logger.removeHandler(handler)  # Ray reuses this worker process for later tasks
    fits = [{"run_name": f.run_name, "seconds": f.seconds, "epochs_trained": f.epochs_trained,
             "resumed_from_epoch": f.resumed_from_epoch, "restarted_from_epoch": f.restarted_from_epoch}
            for f in (trainer.fits if trainer else [])]
    return {"path": out if is_uri(out) else str(path), "metrics": metrics,
            "fits": fits, "node": node, "written": written}


def _fetch_if_stored(location: str) -> None:
    try:
        fetch(location)
    except FileNotFoundError:
        pass


def check_inputs_on_node(config: PipelineConfig) -> None:
    """``compression.checks.check_inputs`` where the stages will read the data (a Ray task on a node)."""
    from compression.checks import check_inputs

    check_inputs(PipelineConfig.model_validate(with_local_data(config.model_dump(mode="json"))))
