"""Prefect tasks for the pipeline: one task runs any step of ``compression.plan``; MLflow logging tasks.

``run_stage`` passes checkpoint *paths* and small JSON-able dicts (never tensors or models) to a Ray task on
a node that can host a training worker (``tasks.cluster.on_worker_node``), which runs the step there, and
returns ``{"path": ..., "metrics": {...}, "fits": [...], "node": {"node_id", "hostname"}}``. Its task run is
named after the step (``prune-p1``).
Results are persisted as JSON (nothing pickled) in a result storage under the run's folder, keyed by
``STAGE_CACHE``:

* the task's source code,
* the stage and its phase,
* the settings that identify the stage's output (``compression.plan.stage_settings``: not the tracking,
  not where it runs, not the other stages' sections, so changing ``stages.retrain.epochs`` does not redo
  sparsity),
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

from compression import plan as P
from compression.checkpoint import file_digest
from compression.config import PhaseConfig, PipelineConfig
from compression.errors import PrunepipeError
from tasks.cluster import on_worker_node
from tasks.ray_trainer import (
    ProgressRelay,
    absolute_config,
    ensure_ray,
    is_lost_worker,
    relay_emitter,
    run_stage_on_node,
)
from tasks.storage import absolute, fetch, is_uri, join, local_mirror, location_of

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Cache keys


def _digest(path: Any) -> str | None:
    if path is None:
        return None
    file = Path(path)
    return file_digest(file) if file.is_file() else f"missing:{file}"


class StageInputs(CachePolicy):
    """Key over the stage, the settings identifying its output, input file digests and the other inputs."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        payload: dict[str, Any] = {"task": task_ctx.task.name}
        for key, value in sorted(inputs.items()):
            if key == "config":
                payload[key] = P.stage_settings(value, inputs["stage"], inputs.get("phase"))
            elif key == "inputs":
                payload[key] = {arg: {"path": str(path), "sha256": _digest(path)} for arg, path in sorted(value.items())}
            elif isinstance(value, PhaseConfig):
                # Which layers; its λ / γ / cuts reach the key through the stage's settings above, where they
                # matter. (Its whole dump here made trials differing only in a phase's cut each retrain the
                # sparsity stage they share.)
                payload[key] = value.identity()
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
        # TaskUnschedulableError: the node a stage task was pinned to left before it started.
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError,
                ray.exceptions.TaskUnschedulableError)
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
        log.warning("%s failed with %s: %s", task_run.name, type(exc).__name__,
                    "retrying (transient)" if retry else "not retrying")
    return retry


# --------------------------------------------------------------------------------------------
# Helpers


def file_matches(path: str | Path, sha256: str | None) -> bool:
    """True when ``path`` still holds the file a cached result recorded."""
    return sha256 is not None and _digest(path) == sha256


def storage_path(config: PipelineConfig) -> str:
    """Ray Train storage: ``compute.storage_path`` (a URI, or a path resolved here), else ``<workdir>/ray``."""
    return absolute(config.compute.storage_path or join(str(config.workdir), "ray"))


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


def _result(done: dict[str, Any], started: float) -> dict[str, Any]:
    """The task's result from what ``run_stage_on_node`` returned; ``node``: where the stage ran."""
    return {"path": done["path"], "sha256": _digest(done["path"]), "metrics": plain(done["metrics"]),
            "fits": plain(done["fits"]), "node": done["node"], "task_seconds": time.perf_counter() - started}


_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": STAGE_CACHE,
    "persist_result": True,
    "result_serializer": "json",
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_transient,
}


# --------------------------------------------------------------------------------------------
# The stage task


def _stage_run_name(parameters: dict[str, Any]) -> str:
    phase = parameters.get("phase")
    return parameters["stage"] + (f"-{phase.name}" if phase is not None else "")


@task(name="stage", task_run_name=_stage_run_name, **_TASK_OPTIONS)
def run_stage(config: PipelineConfig, stage: str, phase: PhaseConfig | None, inputs: dict[str, str], out: str,
              base_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Run ``stage`` (a ``compression.plan.STAGES`` name) of ``phase``: ``inputs`` are the earlier outputs it
    reads (by argument name), ``out`` its output. It runs as a Ray task on a node that can host a training
    worker (``tasks.cluster``), its training as Ray Train fits from there; this process only waits and logs
    the lines the node relays."""
    started = time.perf_counter()
    ensure_ray(config.compute)
    relay = ProgressRelay(relay_emitter())
    # Files of a run folder that is a URI travel as their locations there (``tasks.storage``).
    where = {arg: location_of(path, config.workdir) for arg, path in inputs.items()}
    try:
        done = on_worker_node(
            config.compute, run_stage_on_node, absolute_config(config), stage, phase, where,
            location_of(out, config.workdir), base_metrics, storage_path(config), relay.queue,
        )
    finally:
        relay.close()
    if is_uri(config.workdir):  # this process's copy of what the step wrote, for the digests and MLflow
        for location in done["written"]:
            fetch(location)
        done = {**done, "path": str(local_mirror(done["path"]))}
    return _result(done, started)


# --------------------------------------------------------------------------------------------
# MLflow logging as tasks (retried when the tracking server does not answer; never cached)

LOG_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_transient,
}


@task(name="latency_table", **LOG_OPTIONS)
def latency_table(config: PipelineConfig, checkpoint: str, path: str) -> str:
    """This device's latency tables of ``checkpoint``'s model in ``path`` (measured unless those there cover it)."""
    from compression.checkpoint import load_checkpoint
    from compression.stages import latency_tables_for

    settings = config.model_copy(update={"export": config.export.model_copy(update={"latency_table": path})})
    latency_tables_for(load_checkpoint(checkpoint), settings, Path(path).parent)
    return path


@task(name="network_speedup", task_run_name="network_speedup-{name}", cache_policy=NO_CACHE, persist_result=False)
def network_speedup(config: PipelineConfig, name: str, base: str, checkpoint: str, run_dir: str,
                    predict: bool) -> dict[str, Any]:
    """How much faster ``checkpoint``'s network runs than ``base``'s on this device, the two timed in
    alternation (``latency_ratio``), and with ``predict`` what the latency table said it would
    (``predicted_latency_ratio``)."""
    from compression.checkpoint import load_checkpoint
    from compression.latency import network_speedup as timed_speedup
    from compression.stages import predicted_speedup

    base_ckpt, ckpt = load_checkpoint(base), load_checkpoint(checkpoint)
    layout = config.export.onnxruntime_layout
    measured = timed_speedup(base_ckpt.model, ckpt.model, batch_size=config.export.batch_size,
                             threads=config.export.threads, layouts=None if layout == "auto" else (layout,))
    predicted = predicted_speedup(base_ckpt, ckpt, config, Path(run_dir)) if predict else None
    return {"latency_ratio": measured["ratio"], "predicted_latency_ratio": predicted,
            "latency_layout": measured["model_layout"]}


@task(name="deployment_speedup", cache_policy=NO_CACHE, persist_result=False)
def deployment_speedup(config: PipelineConfig, base: str, checkpoint: str) -> dict[str, Any]:
    """How much faster ``checkpoint`` runs end to end than ``base`` in the CPU deployment (ONNX Runtime and
    the post-processing, batch 32, the test split's first images), the two timed in alternation."""
    from compression.checkpoint import load_checkpoint
    from compression.export import deployment_speedup as timed_speedup
    from compression.measure import split_images
    from compression.models import model_input_size

    base_ckpt, ckpt = load_checkpoint(base), load_checkpoint(checkpoint)
    images = split_images(config, 32, model_input_size(ckpt.model))
    return timed_speedup(base_ckpt.model, ckpt.model, images, 32, threads=config.export.threads,
                         layout=config.export.onnxruntime_layout)


@task(name="log_checkpoint", task_run_name="log_checkpoint-{name}", **LOG_OPTIONS)
def log_checkpoint(tracker: Any, name: str, stage: str, phase: str | None, checkpoint: str,
                   metrics: dict[str, Any], params: dict[str, Any], history: list[dict[str, Any]],
                   selection: str | None, cached: bool) -> str:
    """One MLflow child run for checkpoint ``name``; returns its run id."""
    return tracker.log_checkpoint(stage=stage, phase=phase, checkpoint=checkpoint, metrics=metrics, params=params,
                                  history=history, selection=selection, cached=cached)


@task(name="register_model", **LOG_OPTIONS)
def register_model(tracker: Any, config: PipelineConfig, checkpoint: str, run_id: str, input_example: Any,
                   metrics: dict[str, Any], gated: bool = True) -> Any:
    """Register the final checkpoint; ``tracking.alias`` moves only past the champion gate when ``gated``."""
    return tracker.register_model(config, checkpoint, run_id, input_example=input_example, metrics=metrics,
                                  gated=gated)


@task(name="log_final_checkpoint", **LOG_OPTIONS)
def log_final_checkpoint(tracker: Any, checkpoint: str, run_id: str) -> bool:
    return tracker.log_final_checkpoint(checkpoint, run_id)


@task(name="log_export", **LOG_OPTIONS)
def log_export(tracker: Any, config: PipelineConfig, checkpoint: str, run_id: str) -> dict[str, Any] | None:
    """The final checkpoint's ONNX export (files, size, FLOPs) on its MLflow child run; None when
    ``tracking.log_onnx`` is off."""
    exported = tracker.log_onnx_export(checkpoint, run_id, config)
    return plain(exported) if exported is not None else None
