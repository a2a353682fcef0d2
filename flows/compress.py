"""The ``compress`` Prefect flow: the whole pipeline, stage by stage, as one DAG.

    preflight (config, data, phases, GPU, Ray address, MLflow)       nothing started yet
    MLflow parent run (Ray starts at the first training fit, once, and serves every stage)
    pretrain -> evaluate (the base every ratio refers to)
    for each phase: induce_sparsity -> select_filters -> prune -> retrain
    distill (if enabled; teacher = the pretrained model)
    evaluate the final model -> register it in MLflow -> checkpoint table artifact

Every stage is a cached Prefect task (``tasks/stages.py``): a re-run after a failure or a kill redoes only
what did not finish. Each checkpoint becomes a nested MLflow run as soon as its stage is done.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from compression.config import PhaseConfig, PipelineConfig
from compression.errors import DataError, PrunepipeError
from compression.train import primary_metric
from tasks import stages as T
from tasks.env import apply_env_defaults
from tasks.ray_trainer import check_gpu, check_ray_address, ray_address, ray_summary
from tasks.tracking import RunTracker, TrackingError, check_tracking, open_results_hint, tracking_uri

log = logging.getLogger(__name__)


TABLE_COLUMNS = ("checkpoint", "stage", "phase", "params", "nonzero_params", "size_bytes", "flops",
                 "map_voc07", "map_voc", "map_coco", "top1", "latency_b1_ms", "params_ratio", "size_bytes_ratio",
                 "flops_ratio", "map_voc07_drop", "top1_drop", "cached")


# --------------------------------------------------------------------------------------------
# Preflight: everything that can be checked before Ray starts


@dataclass
class Plan:
    run_dir: Path
    phases: list[PhaseConfig]
    tracking_uri: str
    checks_seconds: float = 0.0


def check_data(cfg: PipelineConfig) -> None:
    """The dataset exists (the built-in one is generated) and every split has images."""
    from compression.data.loaders import build_dataset, ensure_builtin_data

    root = ensure_builtin_data(cfg.data)
    if not Path(root).exists():
        raise DataError(f"data.root {root}: does not exist (and data.builtin is empty)")
    size = cfg.model.image_size or 300
    for split in ("train", "val", "test"):
        if len(build_dataset(cfg.data, split, train=False, image_size=size)) == 0:  # type: ignore[arg-type]
            raise DataError(f"data.root {root}: the {split} split has no images")


def preflight(cfg: PipelineConfig) -> Plan:
    """Validate data, phases, GPU, Ray address and MLflow before anything is started; one line on error."""
    started = time.perf_counter()
    check_gpu(cfg.compute)
    address = ray_address(cfg.compute)
    if address:
        check_ray_address(address)
    uri = tracking_uri(cfg.tracking)
    check_tracking(uri)
    if cfg.stages.pretrain.checkpoint is not None:
        from compression.checkpoint import read_metadata

        read_metadata(cfg.stages.pretrain.checkpoint)
    check_data(cfg)
    phases = T.S.phases_for(cfg)  # every layer of every phase exists and is prunable
    plan = Plan(run_dir=(Path(cfg.workdir) / cfg.name).resolve(), phases=phases, tracking_uri=uri)
    plan.checks_seconds = time.perf_counter() - started
    return plan


# --------------------------------------------------------------------------------------------
# Running one stage task: cache location, refresh when the output is gone, MLflow child run


class StageRunner:
    """Calls stage tasks with the run's result storage and records one table row per checkpoint."""

    def __init__(self, cfg: PipelineConfig, plan: Plan, tracker: RunTracker) -> None:
        self.cfg = cfg
        self.plan = plan
        self.tracker = tracker
        # A Path means a LocalFileSystem (an unsaved block is refused as result storage).
        self.storage = plan.run_dir / ".prefect-results"
        self.rows: list[dict[str, Any]] = []
        self.index = 0
        self.current: tuple[str, str | None] = ("preflight", None)

    def output(self, stage: str, phase: PhaseConfig | None = None, suffix: str = ".safetensors") -> Path:
        name = f"{self.index:02d}_{stage}" + (f"_{phase.name}" if phase else "")
        self.index += 1
        return self.plan.run_dir / f"{name}{suffix}"

    def call(self, task: Any, *, stage: str, phase: PhaseConfig | None = None, out: Path | None = None,
             **inputs: Any) -> dict[str, Any]:
        """Run ``task`` (cached), returning its result dict plus ``cached``."""
        self.current = (stage, phase.name if phase else None)
        kwargs = dict(inputs, config=self.cfg)
        if out is not None:
            kwargs["out"] = str(out)
        if phase is not None:
            kwargs["phase"] = phase
        refresh = out is not None and not out.exists()
        started = time.perf_counter()
        while True:
            configured = task.with_options(result_storage=self.storage, refresh_cache=refresh)
            state = configured(**kwargs, return_state=True)
            result = dict(state.result())  # raises the task's exception when it failed
            result["cached"] = state.name == "Cached"
            # A cache hit must still find its own output (a later run with other settings may have
            # written another file at the same path): otherwise compute it again.
            if refresh or not result["cached"] or T.file_matches(result["path"], result.get("sha256")):
                # Wall time of the task as the flow saw it: Prefect's orchestration and cache lookup included.
                result["call_seconds"] = time.perf_counter() - started
                return result
            get_run_logger().warning("%s: cached output %s changed on disk; recomputing", stage, result["path"])
            refresh = True

    def record(self, result: dict[str, Any], *, stage: str, phase: PhaseConfig | None = None,
               params: dict[str, Any] | None = None, selection: str | None = None,
               metrics: dict[str, Any] | None = None, extra_seconds: float = 0.0) -> dict[str, Any]:
        """One MLflow child run and one table row for a checkpoint."""
        from compression.checkpoint import read_metadata

        path = Path(result["path"])
        metrics = metrics or result["metrics"]
        logging_started = time.perf_counter()
        history = read_metadata(path).get("extra", {}).get("history", [])
        # > 0: this stage's training continued a Ray Train run that an earlier (killed) flow run began.
        resumed_from = 0 if result["cached"] else max((f["resumed_from_epoch"] for f in result.get("fits", [])),
                                                      default=0)
        try:
            run_id = T.log_checkpoint(
                self.tracker, path.stem, stage=stage, phase=phase.name if phase else None, checkpoint=str(path),
                metrics={**metrics, **({"resumed_from_epoch": resumed_from} if resumed_from else {})},
                params={**(params or {}), **({"layers": phase.layers} if phase else {})},
                history=history, selection=selection, cached=result["cached"],
            )
        except Exception as exc:
            lost = tracking_lost(self.tracker, exc, f"checkpoint {path.name}", self.plan.run_dir)
            if lost is None:
                raise
            raise lost from exc
        row = {"checkpoint": path.stem, "stage": stage, "phase": phase.name if phase else None, "path": str(path),
               **{k: v for k, v in metrics.items() if not isinstance(v, dict | list)},
               "cached": result["cached"], "mlflow_run_id": run_id,
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
    """Compress ``config.model``: pretrain, prune phase by phase (sparsity, selection, prune, retrain),
    distill, evaluate; every checkpoint tracked in MLflow and summarised in a table artifact."""
    from prefect.runtime import flow_run

    cfg = config
    logger = get_run_logger()
    timings: dict[str, float] = {}

    plan = preflight(cfg)
    timings["preflight"] = plan.checks_seconds
    # Ray starts (or is joined) at the first training fit and serves every later one: a fully cached
    # re-run never starts it. Everything that could stop it was checked by preflight.
    tracker = RunTracker.start(cfg, flow_run_id=flow_run.get_id(), uri=plan.tracking_uri)
    run = StageRunner(cfg, plan, tracker)
    stage_params = cfg.stages.model_dump(mode="json")

    try:
        # Stage 1: the base model, and its measurements every ratio refers to.
        pretrained = run.call(T.pretrain, stage="pretrain", out=run.output("pretrain"))
        base = run.call(T.evaluate, stage="evaluate", checkpoint=pretrained["path"], label="base")
        base_metrics = base["metrics"]
        timings["evaluate_base"] = base["call_seconds"]
        run.record(pretrained, stage="pretrain", params=stage_params["pretrain"],
                   metrics={**pretrained["metrics"], **base_metrics})
        current = pretrained["path"]

        # Stages 2-5, phase by phase.
        for phase in plan.phases:
            sparse = run.call(T.induce_sparsity, stage="sparsity", phase=phase, out=run.output("sparsity", phase),
                              input_path=current, base_metrics=base_metrics)
            run.record(sparse, stage="sparsity", phase=phase, params=stage_params["sparsity"])
            selection = run.call(T.select_filters, stage="selection", phase=phase,
                                 out=run.output("selection", phase, suffix=".json"), input_path=sparse["path"])
            pruned = run.call(T.prune, stage="prune", phase=phase, out=run.output("prune", phase),
                              input_path=sparse["path"], selection_path=selection["path"], base_metrics=base_metrics)
            run.record(pruned, stage="prune", phase=phase, params=stage_params["selection"],
                       selection=selection["path"], metrics={**selection["metrics"], **pruned["metrics"]},
                       extra_seconds=selection["call_seconds"])
            retrained = run.call(T.retrain, stage="retrain", phase=phase, out=run.output("retrain", phase),
                                 input_path=pruned["path"], base_metrics=base_metrics)
            run.record(retrained, stage="retrain", phase=phase, params=stage_params["retrain"])
            current = retrained["path"]

        # Stage 6: distillation from the pretrained teacher.
        if cfg.stages.distill.enabled:
            distilled = run.call(T.distill, stage="distill", out=run.output("distill"), student_path=current,
                                 teacher_path=pretrained["path"], base_metrics=base_metrics)
            run.record(distilled, stage="distill", params=stage_params["distill"])
            current = distilled["path"]

        # The final model: measured against the base, registered, summarised.
        final = run.call(T.evaluate, stage="evaluate", checkpoint=current, label="final", base_metrics=base_metrics)
        timings["evaluate_final"] = final["call_seconds"]
        run.current = ("export", None)
        T.log_export(tracker, cfg, current, run.rows[-1]["mlflow_run_id"])
        run.current = ("register", None)
        final_row = run.rows[-1]
        final_row.update({k: v for k, v in final["metrics"].items() if not isinstance(v, dict | list)})
        tracker.log_summary(run.rows, primary_metric(_task_of(cfg)))
        registered = None
        if cfg.tracking.registered_model:
            registered = T.register_model(tracker, cfg, current, final_row["mlflow_run_id"],
                                          input_example=_input_example(current))
    except BaseException as exc:
        stage, phase = run.current
        try:
            tracker.log_failed_stage(stage, phase, exc)
            tracker.finish("FAILED")
        except Exception as logging_error:  # noqa: BLE001 - the original error matters more
            # The next run on this host closes the parent as KILLED (its process will be gone).
            logger.warning("could not mark the MLflow runs FAILED: %s", str(logging_error).splitlines()[0][:200])
        if isinstance(exc, Exception) and not isinstance(exc, PrunepipeError):
            lost = tracking_lost(tracker, exc, f"{stage} results", plan.run_dir)
            if lost is not None:
                raise lost from exc
        raise
    tracker.finish("FINISHED")
    timings.update({f"mlflow_{k}": v for k, v in tracker.timings.items()})

    create_table_artifact(
        table=[{k: _cell(row.get(k)) for k in TABLE_COLUMNS if any(k in r for r in run.rows)} for row in run.rows],
        key=_artifact_key(cfg.name),
        description=(f"Checkpoints of pipeline **{cfg.name}** ({cfg.model.name}); ratios are base / checkpoint. "
                     f"MLflow: {tracker.run_link()}"),
    )
    return {
        "name": cfg.name,
        "flow_run_id": str(flow_run.get_id()),
        "run_dir": str(plan.run_dir),
        "final_checkpoint": current,
        "checkpoints": run.rows,
        "final_metrics": final["metrics"],
        "registered_model": registered,
        "mlflow": {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.parent_run_id,
                   "link": tracker.run_link()},
        "ray": ray_summary(),
        "timings": timings,
    }


def _task_of(cfg: PipelineConfig) -> str:
    from compression.models import model_task

    return model_task(cfg.model.name)


def _input_example(checkpoint: str) -> Any:
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


def _artifact_key(name: str) -> str:
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
