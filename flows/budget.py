"""The ``budget`` Prefect flow: the most compressed model within a budget, and the Pareto front of the trials.

    preflight (config, data, every trial's knobs)                     nothing started yet
    MLflow parent run; pretrain -> evaluate (the same cached tasks and files as the ``compress`` flow)
    trials, ``search.trials_in_parallel`` at once, each a ``budget-trial`` subflow and an MLflow child run:
        for each phase: induce_sparsity -> select_filters -> prune (-> retrain, phases before the last)
        cheap signals: validation metric of the thresholded and of the pruned, not retrained, model
    rank the trials (compression.search.retrain_order); retrain them in that order, a wave of
        ``trials_in_parallel`` at a time, stopping early once none left can beat a trial within the budget
    choose (compression.search.choose) -> distill it from the pretrained model -> register it with the alias
    Pareto table + plot on the parent run, a Prefect table artifact

Trials differing only in selection/retrain/distill knobs share one sparsity stage: its output path is named
by the settings it depends on, and a lock per path lets the second trial find the first one's result in
the Prefect cache. Subflows run in threads (each with a copy of the flow run's context, as Prefect's
``ThreadPoolTaskRunner`` runs tasks); their Ray Train fits share the flow's one Ray instance, each asking
for ``search.trial_workers`` workers of ``compute.cpus_per_worker`` CPUs, so on 2 cores two 1-worker trials
train at once. The budget is checked on the test split, where the pipeline measures every checkpoint; the
cheap signals are measured on the validation split.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from compression import search as CS
from compression.config import PhaseConfig, PipelineConfig
from compression.errors import PrunepipeError
from compression.train import primary_metric
from flows.compress import (
    Plan,
    StageRunner,
    _artifact_key,
    _input_example,
    _task_of,
    preflight,
    tracking_lost,
)
from tasks import search as TS
from tasks import stages as T
from tasks.env import apply_env_defaults
from tasks.ray_trainer import ensure_ray, ray_summary
from tasks.tracking import RunTracker

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path), threading.Lock())


def run_concurrently(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(item) ...]`` on ``workers`` threads, each call in a copy of this thread's context (the Prefect
    flow run), results in order; the first exception is raised once every call has ended."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="trial") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
        return [future.result() for future in futures]


def shared_sparsity_path(folder: Path, cfg: PipelineConfig, phase: PhaseConfig, input_path: str) -> Path:
    """The sparsity stage's output, named by everything it depends on (trials with equal settings share it)."""
    payload = json.dumps({"config": T.stage_config(cfg, "induce_sparsity"), "phase": phase.model_dump(mode="json"),
                          "input": str(input_path)}, sort_keys=True, default=str)
    return folder / f"sparsity_{phase.name}_{hashlib.sha256(payload.encode()).hexdigest()[:12]}.safetensors"


# --------------------------------------------------------------------------------------------
# One trial: the cheap part (no retraining of its last phase)


@flow(name="budget-trial", flow_run_name="{trial_name}", persist_result=False, validate_parameters=False)
def budget_trial(config: PipelineConfig, trial_name: str, trial_dir: str, shared_dir: str, storage: str,
                 tracker: RunTracker, trial_run_id: str, base_path: str, base_metrics: dict[str, Any]) -> dict[str, Any]:
    """Sparsity -> selection -> prune for every phase of ``config`` (the trial's settings), phases before the
    last retrained; returns the pruned model's ratios and the cheap signals."""
    metric = primary_metric(_task_of(config))
    phases = T.S.phases_for(config)
    plan = Plan(run_dir=Path(trial_dir), phases=phases, tracking_uri=tracker.uri)
    run = StageRunner(config, plan, TS.trial_tracker(tracker, trial_run_id))
    run.storage = Path(storage)  # one result storage for the whole search: shared stages are found in it
    stage_params = config.stages.model_dump(mode="json")
    current, sparse, pruned = base_path, None, None
    for number, phase in enumerate(phases):
        out = shared_sparsity_path(Path(shared_dir), config, phase, current)
        with _lock(out):
            sparse = run.call(T.induce_sparsity, stage="sparsity", phase=phase, out=out, input_path=current,
                              base_metrics=base_metrics)
        run.record(sparse, stage="sparsity", phase=phase, params=stage_params["sparsity"])
        selection = run.call(T.select_filters, stage="selection", phase=phase,
                             out=run.output("selection", phase, suffix=".json"), input_path=sparse["path"])
        pruned = run.call(T.prune, stage="prune", phase=phase, out=run.output("prune", phase),
                          input_path=sparse["path"], selection_path=selection["path"], base_metrics=base_metrics)
        run.record(pruned, stage="prune", phase=phase, params=stage_params["selection"], selection=selection["path"],
                   metrics={**selection["metrics"], **pruned["metrics"]}, extra_seconds=selection["call_seconds"])
        if number < len(phases) - 1:  # the next phase starts from a retrained model (METHOD.md)
            retrained = run.call(T.retrain, stage="retrain", phase=phase, out=run.output("retrain", phase),
                                 input_path=pruned["path"], base_metrics=base_metrics)
            run.record(retrained, stage="retrain", phase=phase, params=stage_params["retrain"])
            current = retrained["path"]
    pruned_val = run.call(T.evaluate, stage="evaluate", checkpoint=pruned["path"], label=f"{trial_name}-pruned-val",
                          split="val")
    measured = pruned["metrics"]
    return {
        "pruned_path": pruned["path"], "sparsity_path": sparse["path"], "sparsity_cached": sparse["cached"],
        "flops_ratio": measured.get("flops_ratio"), "params_ratio": measured.get("params_ratio"),
        "size_bytes_ratio": measured.get("size_bytes_ratio"), "map_pruned": measured.get(metric),
        "drop_pruned": measured.get(f"{metric}_drop"), "alpha": sparse["metrics"].get("alpha"),
        "val_l1": sparse["metrics"].get("val_metric_l1"),
        "val_thresholded": sparse["metrics"].get("val_metric_thresholded"),
        "val_pruned": pruned_val["metrics"].get(metric),
        "removed_fraction": measured.get("removed_fraction"),
        "fit_seconds": sum(row["fit_seconds"] or 0.0 for row in run.rows),
    }


# --------------------------------------------------------------------------------------------
# The search


TABLE_COLUMNS = ("trial", "knobs", "status", "flops_ratio", "params_ratio", "size_bytes_ratio", "val_thresholded",
                 "val_pruned", "map_pruned", "map", "drop_points", "final_map", "final_drop_points",
                 "front_flops_ratio", "front_params_ratio", "mlflow_run_id")


@flow(name="budget", persist_result=False, validate_parameters=False)
def budget_search(config: PipelineConfig, budget: str, search: CS.SearchConfig | None = None) -> dict[str, Any]:
    """The most compressed model of ``config``'s method within ``budget`` (``map_drop=1.0``, ``flops=4x``,
    ``params=6x``), from trials over ``search.knobs``; every trial tracked, the Pareto front logged."""
    from prefect.runtime import flow_run

    cfg, search = config, search or CS.SearchConfig()
    wanted = CS.parse_budget(budget)
    logger = get_run_logger()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    plan = preflight(cfg)
    trials = CS.plan_trials(cfg, search)
    for trial in trials:
        T.S.check_method_config(trial.config)
    metric = primary_metric(_task_of(cfg))
    tracker = RunTracker.start(cfg, flow_run_id=flow_run.get_id(), uri=plan.tracking_uri,
                               run_name=f"{cfg.name}-{cfg.model.name}-budget")
    run = StageRunner(cfg, plan, tracker)
    search_dir = plan.run_dir / "budget"
    records: dict[str, dict[str, Any]] = {}

    try:
        tracker.client.set_tag(tracker.parent_run_id, "prunepipe.budget", wanted.text)
        # The base: the very tasks (and files) of the compress flow, so either flow finds the other's results.
        pretrained = run.call(T.pretrain, stage="pretrain", out=run.output("pretrain"))
        base = run.call(T.evaluate, stage="evaluate", checkpoint=pretrained["path"], label="base")
        base_metrics = base["metrics"]
        run.record(pretrained, stage="pretrain", params=cfg.stages.model_dump(mode="json")["pretrain"],
                   metrics={**pretrained["metrics"], **base_metrics})
        base_val = run.call(T.evaluate, stage="evaluate", checkpoint=pretrained["path"], label="base-val",
                            split="val")["metrics"].get(metric)
        timings["base_seconds"] = time.perf_counter() - started

        # Screening: every trial's cheap part, several at once on the flow's one Ray instance.
        run.current = ("trials", None)
        ensure_ray(cfg.compute)
        for trial in trials:
            records[trial.name] = {"trial": trial.name, "knobs": trial.label(), "knob_values": trial.knobs,
                                   "folder": trial.folder, "status": "screening",
                                   "mlflow_run_id": TS.start_trial_run(tracker, trial.name, trial.knobs, trial.label())}

        def screen(trial: CS.Trial) -> None:
            record = records[trial.name]
            try:
                record.update(budget_trial(
                    trial.config, trial.name, str(search_dir / trial.folder), str(search_dir / "shared"),
                    str(run.storage), tracker, record["mlflow_run_id"], pretrained["path"], base_metrics))
                record["status"] = "screened"
                TS.log_trial(tracker, trial.name, record["mlflow_run_id"], _trial_metrics(record), "screened")
            except PrunepipeError as exc:  # this trial's settings do not work (e.g. a diverged loss): the others go on
                record.update(status="failed", error=_first_line(exc))
                TS.log_trial(tracker, trial.name, record["mlflow_run_id"], {}, "failed", terminate="FAILED",
                             error=record["error"])
                logger.warning("trial %s (%s) failed: %s", trial.name, trial.label(), record["error"])

        screening_started = time.perf_counter()
        run_concurrently(screen, trials, search.trials_in_parallel)
        timings["screening_seconds"] = time.perf_counter() - screening_started
        screened = [records[t.name] for t in trials if records[t.name]["status"] == "screened"]
        for record in screened:
            logger.info("trial %s (%s): %.2fx FLOPs, %.2fx params, val %s pruned %.4f", record["trial"],
                        record["knobs"], record["flops_ratio"] or 0, record["params_ratio"] or 0, metric,
                        record["val_pruned"] or 0)

        # Retraining, in the order the cheap signals give, with early stop.
        run.current = ("retrain", None)
        order = CS.retrain_order(screened, wanted, search.retrain_top_k, base_val=base_val,
                                 max_pruned_drop=search.max_pruned_drop)
        by_name = {t.name: t for t in trials}

        def retrain(record: dict[str, Any]) -> None:
            trial = by_name[record["trial"]]
            phase = T.S.phases_for(trial.config)[-1]
            trial_run = _trial_runner(trial, search_dir, run.storage, tracker, record["mlflow_run_id"], index=50)
            retrained = trial_run.call(T.retrain, stage="retrain", phase=phase, out=trial_run.output("retrain", phase),
                                       input_path=record["pruned_path"], base_metrics=base_metrics)
            row = trial_run.record(retrained, stage="retrain", phase=phase,
                                   params=trial.config.stages.model_dump(mode="json")["retrain"])
            record.update(status="retrained", retrained_path=retrained["path"], retrained_run_id=row["mlflow_run_id"],
                          _retrained_metrics=retrained["metrics"],
                          map=retrained["metrics"].get(metric), drop=retrained["metrics"].get(f"{metric}_drop"))
            TS.log_trial(tracker, trial.name, record["mlflow_run_id"], _trial_metrics(record), "retrained")

        retrain_started = time.perf_counter()
        retrained: list[dict[str, Any]] = []
        pending = list(order)
        while pending:
            if search.early_stop and CS.should_stop(retrained, pending, wanted):
                for record in pending:
                    record["status"] = "skipped"  # early stop: cannot beat the trial already within the budget
                    TS.log_trial(tracker, record["trial"], record["mlflow_run_id"], {}, "skipped (early stop)")
                break
            wave, pending = pending[:search.trials_in_parallel], pending[search.trials_in_parallel:]
            run_concurrently(retrain, wave, search.trials_in_parallel)
            retrained += wave
        timings["retrain_seconds"] = time.perf_counter() - retrain_started

        # The answer: distilled from the pretrained model, registered with the search's alias.
        chosen = CS.choose(retrained, wanted)
        final_path, registered = None, None
        if chosen is not None:
            run.current = ("distill", None)
            trial = by_name[chosen["trial"]]
            final_cfg = trial.config.model_copy(update={"compute": cfg.compute})  # alone now: the flow's workers
            trial_run = _trial_runner(trial, search_dir, run.storage, tracker, chosen["mlflow_run_id"], index=60,
                                      config=final_cfg)
            final_path, final_run_id = chosen["retrained_path"], chosen["retrained_run_id"]
            final_metrics = chosen["_retrained_metrics"]
            if cfg.stages.distill.enabled:
                distilled = trial_run.call(T.distill, stage="distill", out=trial_run.output("distill"),
                                           student_path=chosen["retrained_path"], teacher_path=pretrained["path"],
                                           base_metrics=base_metrics)
                row = trial_run.record(distilled, stage="distill",
                                       params=final_cfg.stages.model_dump(mode="json")["distill"])
                chosen["distilled_drop"] = distilled["metrics"].get(f"{metric}_drop")
                # Distillation normally helps; should it not here, the retrained model is the answer.
                if (chosen["distilled_drop"] or 0.0) <= (chosen["drop"] or 0.0):
                    final_path, final_metrics, final_run_id = distilled["path"], distilled["metrics"], row["mlflow_run_id"]
            chosen.update(status="chosen", final_path=final_path, final_map=final_metrics.get(metric),
                          final_drop=final_metrics.get(f"{metric}_drop"),
                          final_stage="distill" if final_path != chosen["retrained_path"] else "retrain")
            TS.log_trial(tracker, trial.name, chosen["mlflow_run_id"], _trial_metrics(chosen), "chosen")
            run.current = ("register", None)
            T.log_export(tracker, final_cfg, final_path, final_run_id)
            if cfg.tracking.registered_model:
                alias_cfg = final_cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
                    update={"alias": search.alias})})
                registered = T.register_model(tracker, alias_cfg, final_path, final_run_id,
                                              input_example=_input_example(final_path))
        else:
            logger.warning("no trial within the budget %s (%s)", wanted.text, wanted.describe())

        # The fronts, the rank correlation of the cheap signals, the summary.
        run.current = ("pareto", None)
        done = [r for r in retrained if r.get("map") is not None]
        fronts = {}
        for ratio in ("flops_ratio", "params_ratio"):
            fronts[ratio] = [p["trial"] for p in CS.pareto_front(done, x=ratio, y="map")]
            for record in records.values():
                record[f"front_{ratio}"] = record["trial"] in fronts[ratio]
        correlation = {
            "spearman_val_pruned": CS.spearman([r["val_pruned"] for r in done], [r["map"] for r in done]),
            "spearman_val_thresholded": CS.spearman([r["val_thresholded"] for r in done], [r["map"] for r in done]),
        }
        for record in records.values():
            for key in ("drop", "final_drop"):
                if record.get(key) is not None:
                    record[f"{key}_points"] = 100 * record[key]
        table = [{k: records[t.name].get(k) for k in TABLE_COLUMNS} for t in sorted(trials, key=lambda t: t.index)]
        timings["total_seconds"] = time.perf_counter() - started
        summary_metrics = {"budget_value": wanted.value, "trials": len(trials), "trials_screened": len(screened),
                           "trials_retrained": len(done),
                           "trials_failed": sum(r["status"] == "failed" for r in records.values()),
                           **{k: v for k, v in correlation.items() if v is not None},
                           **{f"chosen_{k}": chosen.get(k) for k in ("flops_ratio", "params_ratio", "final_map",
                                                                      "final_drop") if chosen},
                           **{f"search_{k}": v for k, v in timings.items()}}
        artifacts = TS.log_pareto(tracker, table, base_metrics, metric, wanted.text, summary_metrics)
    except BaseException as exc:
        stage, phase = run.current
        try:
            tracker.log_failed_stage(stage, phase, exc)
            tracker.finish("FAILED")
        except Exception as logging_error:  # noqa: BLE001 - the original error matters more
            logger.warning("could not mark the MLflow runs FAILED: %s", str(logging_error).splitlines()[0][:200])
        if isinstance(exc, Exception) and not isinstance(exc, PrunepipeError):
            lost = tracking_lost(tracker, exc, f"{stage} results", plan.run_dir)
            if lost is not None:
                raise lost from exc
        raise
    for record in records.values():
        if record["status"] != "failed":
            TS.log_trial(tracker, record["trial"], record["mlflow_run_id"], {}, record["status"], terminate="FINISHED")
    tracker.finish("FINISHED")

    create_table_artifact(
        table=[{k: _cell(v) for k, v in row.items()} for row in table],
        key="budget-" + _artifact_key(cfg.name).removeprefix("compress-"),
        description=(f"Trials of the budgeted search **{wanted.text}** ({wanted.describe()}) on {cfg.name} "
                     f"({cfg.model.name}); ratios are base / model, drops in points. Chosen: "
                     f"{chosen['trial'] if chosen else 'none within the budget'}. MLflow: {tracker.run_link()}"),
    )
    return {
        "name": cfg.name,
        "budget": {"kind": wanted.kind, "value": wanted.value, "text": wanted.text},
        "flow_run_id": str(flow_run.get_id()),
        "run_dir": str(plan.run_dir),
        "metric": metric,
        "base_checkpoint": pretrained["path"],
        "base_metrics": base_metrics,
        "base_val": base_val,
        "chosen": _public(chosen) if chosen else None,
        "final_checkpoint": final_path,
        "trials": [_public(records[t.name]) for t in sorted(trials, key=lambda t: t.index)],
        "table": table,
        "pareto": fronts,
        "spearman": correlation,
        "registered_model": registered,
        "artifacts": artifacts,
        "mlflow": {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.parent_run_id,
                   "link": tracker.run_link()},
        "ray": ray_summary(),
        "timings": timings,
    }


def _trial_runner(trial: CS.Trial, search_dir: Path, storage: Path, tracker: RunTracker, trial_run_id: str,
                  index: int, config: PipelineConfig | None = None) -> StageRunner:
    config = config or trial.config
    plan = Plan(run_dir=search_dir / trial.folder, phases=T.S.phases_for(config), tracking_uri=tracker.uri)
    runner = StageRunner(config, plan, TS.trial_tracker(tracker, trial_run_id))
    runner.storage = storage
    runner.index = index  # after the trial subflow's own outputs
    return runner


def _trial_metrics(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("flops_ratio", "params_ratio", "size_bytes_ratio", "val_l1", "val_thresholded", "val_pruned",
            "map_pruned", "drop_pruned", "alpha", "removed_fraction", "map", "drop", "distilled_drop", "final_map",
            "final_drop")
    return {k: record[k] for k in keys if isinstance(record.get(k), int | float) and not isinstance(record[k], bool)}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:500]


# --------------------------------------------------------------------------------------------
# Entry point for the CLI


def run_budget(cfg: PipelineConfig, budget: str, search: CS.SearchConfig | None = None) -> dict[str, Any]:
    """Run the ``budget`` flow (the budget, the knobs and the setup checked first, before Prefect/Ray start)."""
    apply_env_defaults()
    CS.parse_budget(budget)
    search = search or CS.SearchConfig()
    for trial in CS.plan_trials(cfg, search):
        T.S.check_method_config(trial.config)
    preflight(cfg)
    return budget_search(cfg, budget, search)


__all__ = ["budget_search", "budget_trial", "run_budget", "run_concurrently"]
