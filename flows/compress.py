"""The ``compress`` Prefect flow: the steps of ``compression.plan``, one cached task each, as one DAG.

    preflight (config, the method's settings, Ray address, MLflow, what the cluster can offer, data)
    MLflow parent run (a local Ray starts at the first stage, once, and serves every stage)
    pretrain (its measurements are the base every ratio refers to)
    for each phase: [remove_layers ->] sparsity -> selection -> prune -> retrain   (criterion taylor: taylor -> retrain)
    distill (if enabled; teacher = the pretrained model)
    the answer: the distilled or the retrained model, whichever scores higher on the validation split
    -> registered in MLflow -> checkpoint table artifact

Every stage is a cached Prefect task (``tasks/stages.py``) that runs its step as a Ray task on a node
that can host a training worker: this process orchestrates and needs neither a GPU nor the dataset. A
re-run after a failure or a kill redoes only what did not finish. Each checkpoint becomes a nested MLflow run as soon as its stage is done; a stage
measures its checkpoint once, and those measurements are what is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from compression import plan as P
from compression.checks import check_inputs
from compression.config import PipelineConfig
from compression.errors import PrunepipeError
from compression.train import primary_metric
from tasks import stages as T
from tasks.cluster import on_worker_node
from tasks.env import apply_env_defaults
from tasks.ray_trainer import (
    absolute_config,
    check_gpu,
    check_inputs_on_node,
    check_ray_address,
    ensure_ray,
    ray_address,
    ray_summary,
)
from tasks.storage import run_folder
from tasks.tracking import RunTracker, TrackingError, check_tracking, open_results_hint, tracking_uri

log = logging.getLogger(__name__)


TABLE_COLUMNS = ("checkpoint", "stage", "phase", "params", "nonzero_params", "size_bytes", "flops",
                 "map_voc07", "map_voc", "map_coco", "top1", "val_map_voc07", "val_top1", "latency_b1_ms",
                 "latency_ort_b32_ms", "params_ratio", "size_bytes_ratio", "flops_ratio", "map_voc07_drop", "top1_drop", "final", "cached")

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path), threading.Lock())


# --------------------------------------------------------------------------------------------
# Preflight: everything that can be checked before Ray starts


@dataclass
class Checked:
    """What preflight found: where the run goes, its steps, the tracking server."""

    run_dir: Path
    steps: list[P.Step]
    tracking_uri: str
    checks_seconds: float = 0.0


def preflight(cfg: PipelineConfig) -> Checked:
    """Validate the method's settings (every phase's layers and criterion target), the Ray address, MLflow,
    what the compute can offer and the inputs before any stage starts; one line on error.

    Without a Ray address this machine is the cluster: its GPU and the inputs are checked here, before Ray
    starts. With one, the flow's process may be a CPU-only head without the dataset: the cluster is asked
    whether its nodes, or those its autoscaler may add, can hold the workers, and a node that can host one
    checks the inputs.
    """
    started = time.perf_counter()
    steps = P.build_plan(cfg)
    address = ray_address(cfg.compute)
    if address:
        check_ray_address(address)
    else:
        check_gpu(cfg.compute)
    uri = tracking_uri(cfg.tracking)
    check_tracking(uri)
    if address:
        ensure_ray(cfg.compute)
        on_worker_node(cfg.compute, check_inputs_on_node, absolute_config(cfg))
    else:
        check_inputs(cfg)
    checked = Checked(run_dir=run_folder(cfg.workdir, cfg.name), steps=steps, tracking_uri=uri)
    checked.checks_seconds = time.perf_counter() - started
    return checked


# --------------------------------------------------------------------------------------------
# One flow run per run folder at a time


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this flow run: a second run of the same preset (same folder) waits here until the
    first ends, then finds the stages it finished in the cache, instead of both writing the same
    checkpoints, cache entries and Ray Train runs. An OS file lock (``flock``): it is released when the
    process ends, however it ends, so a killed run never leaves the folder locked."""
    import fcntl

    from tasks.tracking import process_id

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".run.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another run"
            get_run_logger().warning("%s is in use by %s; waiting for that run to end (the stages it finished are "
                                     "then reused from the cache)", run_dir, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {process_id()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Running the plan's steps as tasks: cache location, refresh when the output is gone, MLflow child runs


class StageRunner:
    """Runs plan steps as the cached stage task with the run's result storage; one table row per checkpoint.

    ``output_for(step, inputs)`` may place an output elsewhere than ``run_dir / step.output`` (the budget
    trials share a sparsity stage that way); a lock per output path makes a second caller wait for the
    first and then find its result in the cache.
    """

    def __init__(self, cfg: PipelineConfig, run_dir: Path, tracker: RunTracker, storage: Path | None = None,
                 output_for: Callable[[P.Step, dict[str, str]], Path] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.tracker = tracker
        # A Path means a LocalFileSystem (an unsaved block is refused as result storage).
        self.storage = storage or run_dir / ".prefect-results"
        self.output_for = output_for
        self.rows: list[dict[str, Any]] = []
        self.current: tuple[str, str | None] = ("preflight", None)

    def run(self, steps: list[P.Step], produced: dict[str, str],
            base_metrics: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Run ``steps`` in order, each reading earlier outputs from ``produced`` (by step name, updated);
        every checkpoint is logged as it is done. Returns the task results by step name (a checkpoint's
        with its table row as ``row``)."""
        results: dict[str, dict[str, Any]] = {}
        for step in steps:
            inputs = P.input_paths(step, produced)
            out = self.output_for(step, inputs) if self.output_for else self.run_dir / step.output
            result = self.call(step, out, inputs, base_metrics)
            produced[step.name] = result["path"]
            results[step.name] = result
            if step.stage.name == "pretrain":
                base_metrics = result["metrics"]
            if step.stage.kind == "checkpoint":
                selections = [results[source] for source in step.inputs.values()
                              if source in results and results[source].get("kind") == "selection"]
                result["row"] = self.record(result, step, selection=selections[0] if selections else None)
        return results

    def call(self, step: P.Step, out: Path, inputs: dict[str, str],
             base_metrics: dict[str, Any] | None) -> dict[str, Any]:
        """Run ``step`` through the cached stage task, returning its result dict plus ``cached``."""
        self.current = (step.stage.name, step.phase.name if step.phase else None)
        kwargs = {"config": self.cfg, "stage": step.stage.name, "phase": step.phase, "inputs": inputs,
                  "out": str(out), "base_metrics": base_metrics}
        started = time.perf_counter()
        with _lock(out):
            refresh = not out.exists()
            while True:
                configured = T.run_stage.with_options(result_storage=self.storage, refresh_cache=refresh)
                state = configured(**kwargs, return_state=True)
                result = dict(state.result())  # raises the task's exception when it failed
                result["cached"] = state.name == "Cached"
                result["kind"] = step.stage.kind
                # A cache hit must still find its own output (a later run with other settings may have
                # written another file at the same path): otherwise compute it again.
                if refresh or not result["cached"] or T.file_matches(result["path"], result.get("sha256")):
                    # Wall time of the task as the flow saw it: Prefect's orchestration and cache lookup included.
                    result["call_seconds"] = time.perf_counter() - started
                    return result
                get_run_logger().warning("%s: cached output %s changed on disk; recomputing", step.label,
                                         result["path"])
                refresh = True

    def record(self, result: dict[str, Any], step: P.Step, selection: dict[str, Any] | None = None) -> dict[str, Any]:
        """One MLflow child run and one table row for a checkpoint (with the selection it was made from)."""
        from compression.checkpoint import read_metadata

        path = Path(result["path"])
        phase = step.phase
        metrics = {**selection["metrics"], **result["metrics"]} if selection else result["metrics"]
        extra_seconds = selection["call_seconds"] if selection else 0.0
        settings = self.cfg.stages.model_dump(mode="json")
        sections = step.stage.sections
        params = settings[sections[0]] if len(sections) == 1 else {
            f"{section}.{key}": value for section in sections for key, value in settings[section].items()}
        # Where the stage (and the selection it was made from) ran: the Ray node that computed it.
        nodes = {f"{prefix}ray_{key}": value for prefix, done in (("", result), ("selection_", selection or {}))
                 for key, value in (done.get("node") or {}).items()}
        logging_started = time.perf_counter()
        history = read_metadata(path).get("extra", {}).get("history", [])
        # > 0: this stage's training continued a Ray Train run that an earlier (killed) flow run began.
        resumed_from = 0 if result["cached"] else max((f["resumed_from_epoch"] for f in result.get("fits", [])),
                                                      default=0)
        try:
            run_id = T.log_checkpoint(
                self.tracker, path.stem, stage=step.stage.name, phase=phase.name if phase else None,
                checkpoint=str(path), metrics={**metrics, **({"resumed_from_epoch": resumed_from} if resumed_from else {})},
                params={**params, **({k: v for k, v in phase.identity().items() if k != "name"} if phase else {}), **nodes},
                history=history, selection=selection["path"] if selection else None, cached=result["cached"],
            )
        except Exception as exc:
            lost = tracking_lost(self.tracker, exc, f"checkpoint {path.name}", self.run_dir)
            if lost is None:
                raise
            raise lost from exc
        row = {"checkpoint": path.stem, "stage": step.stage.name, "phase": phase.name if phase else None,
               "path": str(path), **{k: v for k, v in metrics.items() if not isinstance(v, dict | list)},
               "cached": result["cached"], "mlflow_run_id": run_id, "final": False, **nodes,
               # Time spent in this flow run (a cached stage took none).
               "fit_seconds": 0.0 if result["cached"] else sum(f["seconds"] for f in result.get("fits", [])),
               "task_seconds": 0.0 if result["cached"] else result.get("task_seconds"),
               "resumed_from_epoch": resumed_from,
               # Set when Ray restarted the stage's workers (a lost worker or node) after this epoch.
               "restarted_from_epoch": None if result["cached"] else max(
                   (f.get("restarted_from_epoch") or 0 for f in result.get("fits", [])), default=0) or None,
               # The stage as the flow ran it (task, orchestration, MLflow logging), for bench/overhead.py.
               "call_seconds": result["call_seconds"] + extra_seconds + time.perf_counter() - logging_started}
        self.rows.append(row)
        return row


def tracking_lost(tracker: RunTracker, exc: BaseException, what: str, run_dir: Path) -> TrackingError | None:
    """A one-line error for a tracking server that stopped answering (after the task's retries)."""
    import requests
    from mlflow.exceptions import MlflowException

    # Only MLflow's own failures: a lost Ray worker is transient too, but not a tracking outage.
    if not isinstance(exc, MlflowException | requests.RequestException) or not T.is_transient(exc):
        return None
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return TrackingError(
        f"MLflow at {tracker.uri} stopped answering while logging {what} ({reason}); the checkpoints are kept "
        f"in {run_dir}: run the same command again once it is back (finished stages are not recomputed, "
        "they are logged then)"
    )


# --------------------------------------------------------------------------------------------
# The flow


@flow(name="compress", persist_result=False, validate_parameters=True)
def compress(config: PipelineConfig) -> dict[str, Any]:
    """Compress ``config.model``: pretrain, prune phase by phase, distill, keep the better of the distilled
    and the retrained model on the validation split; every checkpoint tracked in MLflow and summarised in a
    table artifact."""
    cfg = config
    checked = preflight(cfg)
    with run_folder_lock(checked.run_dir):
        return _compress(cfg, checked)


def _compress(cfg: PipelineConfig, checked: Checked) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    timings: dict[str, float] = {"preflight": checked.checks_seconds}
    # A local Ray starts at the first stage that runs and serves every later one: a fully cached re-run
    # never starts it (a cluster was joined by preflight). Everything that could stop it was checked there.
    tracker = RunTracker.start(cfg, flow_run_id=flow_run.get_id(), uri=checked.tracking_uri)
    run = StageRunner(cfg, checked.run_dir, tracker)
    task = P.model_task_of(cfg)

    try:
        results = run.run(checked.steps, produced={})
        final_step = P.choose_final(checked.steps, {name: r["metrics"] for name, r in results.items()}, task)
        final = results[final_step.name]
        final["row"]["final"] = True
        current = final["path"]
        if final_step is not checked.steps[-1]:
            logger.info("the %s model scores higher on the validation split than the distilled one: it is the "
                        "answer", final_step.label)
        run.current = ("export", None)
        T.log_final_checkpoint(tracker, current, final["row"]["mlflow_run_id"])
        T.log_export(tracker, cfg, current, final["row"]["mlflow_run_id"])
        run.current = ("register", None)
        # log_summary reads the answer from the last row.
        tracker.log_summary([row for row in run.rows if not row["final"]] + [final["row"]], primary_metric(task))
        registered = None
        if cfg.tracking.registered_model:
            registered = T.register_model(tracker, cfg, current, final["row"]["mlflow_run_id"],
                                          input_example=input_example(current), metrics=final["metrics"])
            logger.info("registered %s version %s: %s", registered["name"], registered["version"], registered["note"])
    except BaseException as exc:
        stage, phase = run.current
        try:
            tracker.log_failed_stage(stage, phase, exc)
            tracker.finish("FAILED")
        except Exception as logging_error:  # noqa: BLE001 - the original error matters more
            # The next run on this host closes the parent as KILLED (its process will be gone).
            logger.warning("could not mark the MLflow runs FAILED: %s", str(logging_error).splitlines()[0][:200])
        if isinstance(exc, Exception) and not isinstance(exc, PrunepipeError):
            lost = tracking_lost(tracker, exc, f"{stage} results", checked.run_dir)
            if lost is not None:
                raise lost from exc
        raise
    tracker.finish("FINISHED")
    timings.update({f"mlflow_{k}": v for k, v in tracker.timings.items()})

    create_table_artifact(
        table=[{k: _cell(row.get(k)) for k in TABLE_COLUMNS if any(k in r for r in run.rows)} for row in run.rows],
        key=artifact_key(cfg.name),
        description=(f"Checkpoints of pipeline **{cfg.name}** ({cfg.model.name}); ratios are base / checkpoint; "
                     f"final: the answer (validation split). MLflow: {tracker.run_link()}"),
    )
    return {
        "name": cfg.name,
        "flow_run_id": str(flow_run.get_id()),
        "run_dir": str(checked.run_dir),
        "final_checkpoint": current,
        "checkpoints": run.rows,
        # Where each step ran (a cached one: where it ran when it was computed).
        "stage_nodes": {name: r.get("node") for name, r in results.items()},
        "final_metrics": final["metrics"],
        "registered_model": registered,
        "mlflow": {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.parent_run_id,
                   "link": tracker.run_link()},
        "ray": ray_summary(),
        "timings": timings,
    }


def input_example(checkpoint: str) -> Any:
    """One blank image at the model's input size (MLflow infers the signature from it)."""
    import numpy as np

    from compression.checkpoint import read_metadata

    args = read_metadata(checkpoint)["model_args"]
    size = int(args.get("image_size") or 300)
    return np.zeros((1, 3, size, size), dtype=np.float32)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    return value


def artifact_key(name: str) -> str:
    return "compress-" + (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run")


# --------------------------------------------------------------------------------------------
# Entry point for the CLI


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the flow for ``cfg`` (preflight first, so a bad setup fails before Prefect/Ray start)."""
    apply_env_defaults()  # effective for Prefect only when it was not imported yet (the CLI calls it first)
    preflight(cfg)
    return compress(cfg)


def results_hint(summary: dict[str, Any]) -> list[str]:
    lines = [f"MLflow: {open_results_hint(summary['mlflow']['uri'])}  (run {summary['mlflow']['run_id']})"]
    api = os.environ.get("PREFECT_API_URL")
    lines.append(f"Prefect: {api}" if api else "Prefect: `prefect server start`, then open http://127.0.0.1:4200")
    return lines


__all__ = ["PrunepipeError", "compress", "preflight", "results_hint", "run_pipeline"]
