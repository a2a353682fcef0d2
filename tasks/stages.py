"""Prefect tasks for the pipeline's stages: thin adapters over ``compression.stages``.

Each task passes checkpoint *paths* and small JSON-able dicts (never tensors or models) and returns
``{"path": ..., "metrics": {...}, "fits": [...]}``. Results are persisted as JSON (nothing pickled) in a
result storage under the run's folder, keyed by ``STAGE_CACHE``:

* the task's source code,
* the task (stage) name and its phase,
* the config, minus what cannot change the stage's output: ``tracking``, the infrastructure-only
  ``compute`` keys (Ray address, storage path, retry budget), the phase list, and the sections of the
  stages that come *after* this one (so changing ``stages.retrain.epochs`` does not redo sparsity),
* the SHA-256 of every input checkpoint/selection file (so a recomputed upstream output invalidates
  everything downstream), the output path and the base metrics.

So re-running a flow after a failure redoes only what did not finish. Each result records its output
file's SHA-256; the flow recomputes (``refresh_cache=True``) when a task's output file is gone or was
replaced since, so a cache hit never points at a deleted or foreign file.
Transient failures (a lost Ray worker, an unreachable tracking server) are retried; a ``PrunepipeError``
(bad config or data, a diverged loss) never is.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from compression import stages as S
from compression.checkpoint import file_digest
from compression.config import PhaseConfig, PipelineConfig
from compression.errors import PrunepipeError
from tasks.ray_trainer import RayTrainer, is_lost_worker

log = logging.getLogger(__name__)

# Config sections of the stages, in pipeline order; a task's key ignores the sections after its own.
STAGE_SECTIONS = ("pretrain", "sparsity", "selection", "retrain", "distill")
TASK_SECTION = {
    "pretrain": "pretrain",
    "induce_sparsity": "sparsity",
    "select_filters": "selection",
    "prune": "selection",
    "retrain": "retrain",
    "distill": "distill",
    "evaluate": None,  # measuring a checkpoint depends on no stage's settings
}
_PATH_INPUTS = ("input_path", "selection_path", "student_path", "teacher_path", "checkpoint")
_INFRA_COMPUTE_KEYS = ("ray_address", "storage_path", "max_failures", "gpus_per_worker")


# --------------------------------------------------------------------------------------------
# Cache keys


def stage_config(config: PipelineConfig, task_name: str) -> dict[str, Any]:
    """The part of the config a stage's output can depend on (see the module docstring)."""
    data = config.model_dump(mode="json")
    data.pop("tracking", None)
    for key in _INFRA_COMPUTE_KEYS:
        data["compute"].pop(key, None)
    stages = data["stages"]
    stages.pop("phases", None)
    own = TASK_SECTION.get(task_name)
    last = STAGE_SECTIONS.index(own) if own else -1
    for later in STAGE_SECTIONS[last + 1:]:
        stages.pop(later, None)
    return data


def _digest(path: Any) -> str | None:
    if path is None:
        return None
    file = Path(path)
    return file_digest(file) if file.is_file() else f"missing:{file}"


class StageInputs(CachePolicy):
    """Key over the stage name, the stage-relevant config, input file digests and the other inputs."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        name = task_ctx.task.name
        payload: dict[str, Any] = {"task": name}
        for key, value in sorted(inputs.items()):
            if key == "config":
                payload[key] = stage_config(value, name)
            elif key in _PATH_INPUTS:
                payload[key] = {"path": str(value) if value is not None else None, "sha256": _digest(value)}
            elif isinstance(value, PhaseConfig):
                payload[key] = value.model_dump(mode="json")
            else:
                payload[key] = value
        return hash_objects(json.dumps(payload, sort_keys=True, default=str), raise_on_failure=True)


STAGE_CACHE = TASK_SOURCE + StageInputs()


# --------------------------------------------------------------------------------------------
# Retries


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: Ray lost a worker/actor/node, or a server (Ray, MLflow) did not answer."""
    if exc is None or isinstance(exc, PrunepipeError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if "ray" in sys.modules:
        import ray.exceptions
        from ray.train import TrainingFailedError

        if isinstance(exc, TrainingFailedError):
            return is_lost_worker(exc)
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError)
        if isinstance(exc, lost):
            return True
    if "requests" in sys.modules:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            text = str(exc)
            return any(s in text for s in ("Max retries exceeded", "Connection refused", "TEMPORARILY_UNAVAILABLE",
                                           "timed out", "503", "502"))
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    retry = is_transient(exc)
    if exc is not None:
        log.warning("%s failed with %s: %s", task.name, type(exc).__name__,
                    "retrying (transient)" if retry else "not retrying")
    return retry


# --------------------------------------------------------------------------------------------
# Helpers


def file_matches(path: str | Path, sha256: str | None) -> bool:
    """True when ``path`` still holds the file a cached result recorded."""
    return sha256 is not None and _digest(path) == sha256


def storage_path(config: PipelineConfig) -> Path:
    """Ray Train storage: ``compute.storage_path``, else ``<workdir>/ray``."""
    return Path(config.compute.storage_path or Path(config.workdir) / "ray").resolve()


def make_trainer(config: PipelineConfig) -> RayTrainer:
    return RayTrainer(config.compute, storage_path(config))


def plain(value: Any) -> Any:
    """JSON-able copy of a metrics dict (numpy scalars, tensors, paths; non-finite floats -> None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if hasattr(value, "item"):
        return plain(value.item())
    return str(value)


def _result(path: Any, metrics: dict[str, Any], trainer: RayTrainer | None, started: float) -> dict[str, Any]:
    fits = [{"run_name": f.run_name, "seconds": f.seconds, "epochs_trained": f.epochs_trained,
             "resumed_from_epoch": f.resumed_from_epoch, "restarted_from_epoch": f.restarted_from_epoch}
            for f in (trainer.fits if trainer else [])]
    return {"path": str(path), "sha256": _digest(path), "metrics": plain(metrics), "fits": fits,
            "task_seconds": time.perf_counter() - started}


_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": STAGE_CACHE,
    "persist_result": True,
    "result_serializer": "json",
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_transient,
}


# --------------------------------------------------------------------------------------------
# The tasks


@task(name="pretrain", task_run_name="pretrain", **_TASK_OPTIONS)
def pretrain(config: PipelineConfig, out: str) -> dict[str, Any]:
    started = time.perf_counter()
    trainer = make_trainer(config)
    path, metrics = S.pretrain(config, Path(out), trainer=trainer)
    return _result(path, metrics, trainer, started)


@task(name="induce_sparsity", task_run_name="induce_sparsity-{phase.name}", **_TASK_OPTIONS)
def induce_sparsity(config: PipelineConfig, input_path: str, out: str, phase: PhaseConfig,
                    base_metrics: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    trainer = make_trainer(config)
    path, metrics = S.induce_sparsity(Path(input_path), config, Path(out), phase=phase, trainer=trainer,
                                      base_metrics=base_metrics)
    return _result(path, metrics, trainer, started)


@task(name="select_filters", task_run_name="select_filters-{phase.name}", **_TASK_OPTIONS)
def select_filters(config: PipelineConfig, input_path: str, out: str, phase: PhaseConfig) -> dict[str, Any]:
    started = time.perf_counter()
    # Only the Taylor criterion trains (fine-tuning between pruning steps).
    trainer = make_trainer(config) if config.stages.selection.criterion == "taylor" else None
    path, metrics = S.select_filters(Path(input_path), config, Path(out), phase=phase, trainer=trainer)
    return _result(path, metrics, trainer, started)


@task(name="prune", task_run_name="prune-{phase.name}", **_TASK_OPTIONS)
def prune(config: PipelineConfig, input_path: str, selection_path: str, out: str, phase: PhaseConfig,
          base_metrics: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    path, metrics = S.prune(Path(input_path), Path(selection_path), config, Path(out), phase=phase,
                            base_metrics=base_metrics)
    return _result(path, metrics, None, started)


@task(name="retrain", task_run_name="retrain-{phase.name}", **_TASK_OPTIONS)
def retrain(config: PipelineConfig, input_path: str, out: str, phase: PhaseConfig,
            base_metrics: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    trainer = make_trainer(config)
    path, metrics = S.retrain(Path(input_path), config, Path(out), phase=phase, trainer=trainer,
                              base_metrics=base_metrics)
    return _result(path, metrics, trainer, started)


@task(name="distill", task_run_name="distill", **_TASK_OPTIONS)
def distill(config: PipelineConfig, student_path: str, teacher_path: str, out: str,
            base_metrics: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    trainer = make_trainer(config)
    path, metrics = S.distill(Path(student_path), Path(teacher_path), config, Path(out), trainer=trainer,
                              base_metrics=base_metrics)
    return _result(path, metrics, trainer, started)


@task(name="evaluate", task_run_name="evaluate-{label}", **_TASK_OPTIONS)
def evaluate(config: PipelineConfig, checkpoint: str, label: str, base_metrics: dict[str, Any] | None = None,
             split: str = "test") -> dict[str, Any]:
    """Measure a checkpoint (size, FLOPs, mAP/top-1, latency; ratios to ``base_metrics``)."""
    started = time.perf_counter()
    metrics = S.evaluate_checkpoint(Path(checkpoint), config, split=split, base=base_metrics)
    return _result(checkpoint, metrics, None, started)


# --------------------------------------------------------------------------------------------
# MLflow logging as tasks (retried when the tracking server does not answer; never cached)

_LOG_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_transient,
}


@task(name="log_checkpoint", task_run_name="log_checkpoint-{name}", **_LOG_OPTIONS)
def log_checkpoint(tracker: Any, name: str, stage: str, phase: str | None, checkpoint: str,
                   metrics: dict[str, Any], params: dict[str, Any], history: list[dict[str, Any]],
                   selection: str | None, cached: bool) -> str:
    """One MLflow child run for checkpoint ``name``; returns its run id."""
    return tracker.log_checkpoint(stage=stage, phase=phase, checkpoint=checkpoint, metrics=metrics, params=params,
                                  history=history, selection=selection, cached=cached)


@task(name="register_model", **_LOG_OPTIONS)
def register_model(tracker: Any, config: PipelineConfig, checkpoint: str, run_id: str, input_example: Any) -> Any:
    return tracker.register_model(config, checkpoint, run_id, input_example=input_example)


@task(name="log_export", **_LOG_OPTIONS)
def log_export(tracker: Any, config: PipelineConfig, checkpoint: str, run_id: str) -> dict[str, Any] | None:
    """The final checkpoint's ONNX export (files, size, FLOPs) on its MLflow child run; None when
    ``tracking.log_onnx`` is off."""
    exported = tracker.log_onnx_export(checkpoint, run_id, config)
    return plain(exported) if exported is not None else None
