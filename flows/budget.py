"""The ``budget`` Prefect flow: the most compressed model within a budget, and the Pareto front of the trials.

    preflight (config, data, every trial's method settings)            nothing started yet
    MLflow parent run; pretrain (the same cached task and file as the ``compress`` flow)
    screen: every trial runs its plan (``compression.plan``) up to the last phase's pruned model,
        ``search.trials_in_parallel`` at once, each a ``budget-trial`` subflow and an MLflow child run;
        cheap signals: validation metric of the thresholded and of the pruned, not retrained, model
    rank the trials (compression.budget.retrain_order); retrain: the last retrain step, in that order, a
        wave of ``trials_in_parallel`` at a time, stopping early once none left can beat a trial within
        the budget
    choose (compression.budget.choose) -> its distill step -> the better of distilled and retrained ->
        registered with the alias
    summarise: Pareto table + plot on the parent run, a Prefect table artifact

Every choice (ranking, early stop, the chosen trial, distilled or retrained) reads the validation split;
the test split is only reported. Trials differing only in selection/retrain/distill knobs share one
sparsity stage: its output path is named by the settings it depends on, and the runner's lock per path
lets the second trial find the first one's result in the Prefect cache. Subflows run in threads (each with
a copy of the flow run's context, as Prefect's ``ThreadPoolTaskRunner`` runs tasks); their Ray Train fits
share the flow's one Ray instance, each asking for ``search.trial_workers`` workers of
``compute.cpus_per_worker`` CPUs, so on 2 cores two 1-worker trials train at once.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Failed

from compression import budget as CB
from compression import plan as P
from compression.checks import check_method_config
from compression.config import PhaseConfig, PipelineConfig
from compression.errors import PrunepipeError
from compression.measure import val_key
from compression.stages import LATENCY_TABLE
from compression.train import primary_metric
from flows.compress import (
    Checked,
    StageRunner,
    artifact_key,
    input_example,
    preflight,
    run_folder_lock,
    tracking_lost,
)
from tasks import budget_tracking as TB
from tasks import stages as T
from tasks.env import apply_env_defaults
from tasks.ray_trainer import ensure_ray, ray_summary
from tasks.tracking import RunTracker

TABLE_COLUMNS = ("trial", "knobs", "status", "flops_ratio", "params_ratio", "latency_ratio", "predicted_latency_ratio",
                 "latency_layout", "size_bytes_ratio",
                 "val_thresholded", "val_pruned", "val", "val_drop_points", "map_pruned", "map", "drop_points", "final_map",
                 "final_drop_points", "front_flops_ratio", "front_params_ratio", "mlflow_run_id")


def run_concurrently(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(item) ...]`` on ``workers`` threads, each call in a copy of this thread's context (the Prefect
    flow run), results in order; the first exception is raised once every call has ended."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="trial") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, item) for item in items]
        return [future.result() for future in futures]


def trial_steps(steps: list[P.Step]) -> tuple[list[P.Step], P.Step, P.Step | None]:
    """A trial's plan in three parts: the screening (after pretrain, up to the last phase's pruned model),
    the last phase's retrain, and the distillation (None when off)."""
    last_retrain = max(index for index, step in enumerate(steps) if step.stage.name == "retrain")
    distill = steps[last_retrain + 1] if last_retrain + 1 < len(steps) else None
    return steps[1:last_retrain], steps[last_retrain], distill


def shared_sparsity_path(folder: Path, cfg: PipelineConfig, phase: PhaseConfig, input_path: str) -> Path:
    """The sparsity stage's output, named by everything it depends on (trials with equal settings share it)."""
    payload = json.dumps({"settings": P.stage_settings(cfg, "sparsity", phase), "input": str(input_path)},
                         sort_keys=True, default=str)
    return folder / f"sparsity_{phase.name}_{hashlib.sha256(payload.encode()).hexdigest()[:12]}.safetensors"


def _trial_runner(config: PipelineConfig, trial_dir: Path, storage: Path, tracker: RunTracker,
                  trial_run_id: str, shared_dir: Path | None = None) -> StageRunner:
    """A runner writing to the trial's folder (sparsity stages to ``shared_dir``), logging under its run,
    with the search's one result storage (shared stages are found in it)."""

    def output_for(step: P.Step, inputs: dict[str, str]) -> Path:
        if shared_dir is not None and step.stage.name == "sparsity":
            return shared_sparsity_path(shared_dir, config, step.phase, inputs["input_path"])
        return trial_dir / step.output

    return StageRunner(config, trial_dir, TB.trial_tracker(tracker, trial_run_id), storage=storage,
                       output_for=output_for)


# --------------------------------------------------------------------------------------------
# One trial: the cheap part (no retraining of its last phase)


@flow(name="budget-trial", flow_run_name="{trial_name}", persist_result=False, validate_parameters=False)
def budget_trial(config: PipelineConfig, trial_name: str, trial_dir: str, shared_dir: str, storage: str,
                 tracker: RunTracker, trial_run_id: str, base_path: str, base_metrics: dict[str, Any]) -> dict[str, Any]:
    """The trial's plan up to the last phase's pruned model (earlier phases retrained); returns the pruned
    model's ratios, the cheap signals (validation split) and the outputs so far by step name."""
    task = P.model_task_of(config)
    metric = primary_metric(task)
    steps = P.build_plan(config)
    screening, _, _ = trial_steps(steps)
    run = _trial_runner(config, Path(trial_dir), Path(storage), tracker, trial_run_id, Path(shared_dir))
    produced = {steps[0].name: base_path}
    try:
        results = run.run(screening, produced, base_metrics)
    except PrunepipeError as exc:
        # An expected way for a trial to end (a target out of reach, a diverged loss): the run is Failed with
        # the reason, in one line, instead of Prefect logging the traceback of a raised exception.
        return Failed(message=_first_line(exc), data={"trial_error": _first_line(exc)})
    pruned = results[screening[-1].name]
    sparsities = [results[s.name] for s in screening if s.stage.name == "sparsity"]
    sparse = sparsities[-1] if sparsities else None
    sparse_metrics = sparse["metrics"] if sparse else {}
    measured = pruned["metrics"]
    return {
        "produced": produced,
        "pruned_path": pruned["path"],
        "sparsity_path": sparse["path"] if sparse else None, "sparsity_cached": sparse["cached"] if sparse else None,
        "flops_ratio": measured.get("flops_ratio"), "params_ratio": measured.get("params_ratio"),
        "size_bytes_ratio": measured.get("size_bytes_ratio"), "map_pruned": measured.get(metric),
        "drop_pruned": measured.get(f"{metric}_drop"), "alpha": sparse_metrics.get("alpha"),
        "val_l1": sparse_metrics.get("val_metric_l1"),
        "val_thresholded": sparse_metrics.get("val_metric_thresholded"),
        "val_pruned": measured.get(val_key(task)),
        "removed_fraction": measured.get("removed_fraction"),
        "fit_seconds": sum(row["fit_seconds"] or 0.0 for row in run.rows),
    }


# --------------------------------------------------------------------------------------------
# The search, in its parts


class TrialFailed(Exception):
    """A budget trial ended Failed with this one-line reason (``budget_trial`` returned that state)."""


@dataclass
class Search:
    """One budgeted search under way: its settings, the base, the trials' records."""

    cfg: PipelineConfig
    search: CB.SearchConfig
    wanted: CB.Budget
    trials: list[CB.Trial]
    run: StageRunner
    tracker: RunTracker
    folder: Path
    base_path: str = ""
    base_metrics: dict[str, Any] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return P.model_task_of(self.cfg)

    def trial(self, record: dict[str, Any]) -> CB.Trial:
        return next(t for t in self.trials if t.name == record["trial"])

    def runner(self, record: dict[str, Any], config: PipelineConfig | None = None) -> StageRunner:
        trial = self.trial(record)
        return _trial_runner(config or trial.config, self.folder / trial.folder, self.run.storage, self.tracker,
                             record["mlflow_run_id"])


def pretrain_base(s: Search) -> None:
    """The base: the very task (and file) of the compress flow, so either flow finds the other's result."""
    steps = P.build_plan(s.cfg)
    pretrained = s.run.run(steps[:1], produced={})[steps[0].name]
    s.base_path, s.base_metrics = pretrained["path"], pretrained["metrics"]


def share_latency_table(s: Search) -> None:
    """Trials that cut by latency read one table of the base, measured before any of them trains. Measured
    in each trial beside the others' training, the tables disagreed: one put a 3x target out of reach
    (2.91x at most) where another's reached it."""
    if not any(_cuts_by_latency(trial.config) for trial in s.trials):
        return
    path = s.cfg.export.latency_table or str(s.folder / "shared" / LATENCY_TABLE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    T.latency_table(s.cfg, s.base_path, path)
    for trial in s.trials:
        trial.config = trial.config.model_copy(
            update={"export": trial.config.export.model_copy(update={"latency_table": path})})


def _cuts_by_latency(cfg: PipelineConfig) -> bool:
    return cfg.stages.selection.target_latency_ratio is not None or any(
        phase.target_latency_ratio is not None for phase in cfg.stages.phases or [])


def screen(s: Search) -> list[dict[str, Any]]:
    """Every trial's cheap part, several at once on the flow's one Ray instance; returns the screened."""
    logger = get_run_logger()
    ensure_ray(s.cfg.compute)
    for trial in s.trials:
        s.records[trial.name] = {"trial": trial.name, "knobs": trial.label(), "knob_values": trial.knobs,
                                 "folder": trial.folder, "status": "screening",
                                 "mlflow_run_id": TB.start_trial_run(s.tracker, trial.name, trial.knobs, trial.label())}

    def screen_one(trial: CB.Trial) -> None:
        record = s.records[trial.name]
        try:
            state = budget_trial(
                trial.config, trial.name, str(s.folder / trial.folder), str(s.folder / "shared"),
                str(s.run.storage), s.tracker, record["mlflow_run_id"], s.base_path, s.base_metrics,
                return_state=True)
            outcome = state.result(raise_on_failure=False)
            if state.is_failed() and isinstance(outcome, dict) and "trial_error" in outcome:
                raise TrialFailed(outcome["trial_error"])
            record.update(state.result())  # re-raises what went wrong otherwise (a bug: the run stops)
            record["_produced"] = record.pop("produced")
            record["status"] = "screened"
            TB.log_trial(s.tracker, trial.name, record["mlflow_run_id"], _trial_metrics(record), "screened")
        except (PrunepipeError, TrialFailed) as exc:  # this trial's settings do not work: the others go on
            record.update(status="failed", error=_first_line(exc))
            TB.log_trial(s.tracker, trial.name, record["mlflow_run_id"], {}, "failed", terminate="FAILED",
                         error=record["error"])
            logger.warning("trial %s (%s) failed: %s", trial.name, trial.label(), record["error"])

    started = time.perf_counter()
    run_concurrently(screen_one, s.trials, s.search.trials_in_parallel)
    screened = [s.records[t.name] for t in s.trials if s.records[t.name]["status"] == "screened"]
    time_networks(s, screened)
    s.timings["screening_seconds"] = time.perf_counter() - started
    for record in screened:
        logger.info("trial %s (%s): %.2fx FLOPs, %.2fx params, val pruned %.4f", record["trial"], record["knobs"],
                    record["flops_ratio"] or 0, record["params_ratio"] or 0, record["val_pruned"] or 0)
    return screened


def time_networks(s: Search, screened: list[dict[str, Any]]) -> None:
    """Every screened network against the base's, one at a time once no trial trains (``latency_ratio``;
    with latency targets also the table's prediction). Timed by each trial right after its screening, beside
    another trial's training, one network measured 2.87-3.45x across four trials."""
    for record in screened:
        trial = s.trial(record)
        record.update(T.network_speedup(trial.config, record["trial"], s.base_path, record["pruned_path"],
                                        str(s.folder / trial.folder), _cuts_by_latency(trial.config)))
        TB.log_trial(s.tracker, record["trial"], record["mlflow_run_id"], _trial_metrics(record), "screened")


def rank(s: Search, screened: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials worth retraining, in order, from the cheap signals (validation split) and compression."""
    return list(CB.retrain_order(screened, s.wanted, s.search.retrain_top_k,
                                 base_val=s.base_metrics.get(val_key(s.task)),
                                 max_pruned_drop=s.search.max_pruned_drop))


def retrain(s: Search, order: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retrain the ranked trials a wave at a time, stopping early once none left can beat the best within
    the budget (on the validation split); returns the retrained."""
    metric, val = primary_metric(s.task), val_key(s.task)

    def retrain_one(record: dict[str, Any]) -> None:
        _, step, _ = trial_steps(P.build_plan(s.trial(record).config))
        result = s.runner(record).run([step], record["_produced"], s.base_metrics)[step.name]
        measured = result["metrics"]
        record.update(status="retrained", retrained_path=result["path"], retrained_run_id=result["row"]["mlflow_run_id"],
                      _retrained_metrics=measured, val=measured.get(val), val_drop=measured.get(f"{val}_drop"),
                      map=measured.get(metric), drop=measured.get(f"{metric}_drop"))
        TB.log_trial(s.tracker, record["trial"], record["mlflow_run_id"], _trial_metrics(record), "retrained")

    started = time.perf_counter()
    retrained: list[dict[str, Any]] = []
    pending = list(order)
    while pending:
        if s.search.early_stop and CB.should_stop(retrained, pending, s.wanted):
            for record in pending:
                record["status"] = "skipped"  # early stop: cannot beat the trial already within the budget
                TB.log_trial(s.tracker, record["trial"], record["mlflow_run_id"], {}, "skipped (early stop)")
            break
        wave, pending = pending[:s.search.trials_in_parallel], pending[s.search.trials_in_parallel:]
        run_concurrently(retrain_one, wave, s.search.trials_in_parallel)
        retrained += wave
    s.timings["retrain_seconds"] = time.perf_counter() - started
    return retrained


def choose(s: Search, retrained: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None, Any]:
    """The trial within the budget (validation split), distilled from the pretrained model and kept if that
    scores higher on the validation split, registered with the search's alias.
    Returns (the chosen record, its final checkpoint, the registered model)."""
    chosen = CB.choose(retrained, s.wanted)
    if chosen is None:
        get_run_logger().warning("no trial within the budget %s (%s)", s.wanted.text, s.wanted.describe())
        return None, None, None
    s.run.current = ("distill", None)
    trial = s.trial(chosen)
    final_cfg = trial.config.model_copy(update={"compute": s.cfg.compute})  # alone now: the flow's workers
    _, retrain_step, distill_step = trial_steps(P.build_plan(final_cfg))
    final_path, final_run_id = chosen["retrained_path"], chosen["retrained_run_id"]
    final_metrics = chosen["_retrained_metrics"]
    if distill_step is not None:
        produced = {**chosen["_produced"], retrain_step.name: chosen["retrained_path"]}
        distilled = s.runner(chosen, final_cfg).run([distill_step], produced, s.base_metrics)[distill_step.name]
        chosen["distilled_val_drop"] = distilled["metrics"].get(f"{val_key(s.task)}_drop")
        better = P.choose_final([retrain_step, distill_step], {retrain_step.name: final_metrics,
                                                               distill_step.name: distilled["metrics"]}, s.task)
        if better is distill_step:
            final_path, final_metrics = distilled["path"], distilled["metrics"]
            final_run_id = distilled["row"]["mlflow_run_id"]
    metric, val = primary_metric(s.task), val_key(s.task)
    # End to end against the base, the two timed in alternation now that nothing trains: the checkpoints' own
    # timings, minutes apart beside other trials, read 36.8 and 46.5 ms for one network.
    e2e = T.deployment_speedup(final_cfg, s.base_path, final_path)
    chosen.update(status="chosen", final_path=final_path, final_map=final_metrics.get(metric),
                  final_drop=final_metrics.get(f"{metric}_drop"), final_val_drop=final_metrics.get(f"{val}_drop"),
                  final_stage="distill" if final_path != chosen["retrained_path"] else "retrain",
                  final_latency_e2e_ratio=e2e["ratio"])
    TB.log_trial(s.tracker, trial.name, chosen["mlflow_run_id"], _trial_metrics(chosen), "chosen")
    s.run.current = ("register", None)
    T.log_final_checkpoint(s.tracker, final_path, final_run_id)
    T.log_export(s.tracker, final_cfg, final_path, final_run_id)
    registered = None
    if s.cfg.tracking.registered_model:
        alias_cfg = final_cfg.model_copy(update={"tracking": s.cfg.tracking.model_copy(
            update={"alias": s.search.alias})})
        # The search's answer always takes its own alias; the champion gate is the compress flow's.
        registered = T.register_model(s.tracker, alias_cfg, final_path, final_run_id,
                                      input_example=input_example(final_path), metrics=final_metrics, gated=False)
    return chosen, final_path, registered


def summarise(s: Search, screened: list[dict[str, Any]], retrained: list[dict[str, Any]],
              chosen: dict[str, Any] | None) -> dict[str, Any]:
    """The Pareto fronts (test metric vs ratios, reported), the rank correlation of the cheap signals with the
    retrained metric, the trials' table; logged on the parent run."""
    s.run.current = ("pareto", None)
    done = [r for r in retrained if r.get("map") is not None]
    fronts = {}
    for ratio in ("flops_ratio", "params_ratio"):
        fronts[ratio] = [p["trial"] for p in CB.pareto_front(done, x=ratio, y="map")]
        for record in s.records.values():
            record[f"front_{ratio}"] = record["trial"] in fronts[ratio]
    correlation = {
        "spearman_val_pruned": CB.spearman([r["val_pruned"] for r in done], [r["map"] for r in done]),
        "spearman_val_thresholded": CB.spearman([r["val_thresholded"] for r in done], [r["map"] for r in done]),
    }
    for record in s.records.values():
        for key in ("drop", "val_drop", "final_drop"):
            if record.get(key) is not None:
                record[f"{key}_points"] = 100 * record[key]
    table = [{k: s.records[t.name].get(k) for k in TABLE_COLUMNS} for t in sorted(s.trials, key=lambda t: t.index)]
    summary_metrics = {"budget_value": s.wanted.value, "trials": len(s.trials), "trials_screened": len(screened),
                       "trials_retrained": len(done),
                       "trials_failed": sum(r["status"] == "failed" for r in s.records.values()),
                       **{k: v for k, v in correlation.items() if v is not None},
                       **{f"chosen_{k}": chosen.get(k) for k in ("flops_ratio", "params_ratio", "latency_ratio",
                                                                  "final_latency_e2e_ratio", "final_map",
                                                                  "final_drop", "final_val_drop")
                          if chosen and chosen.get(k) is not None},
                       **{f"search_{k}": v for k, v in s.timings.items()}}
    metric = primary_metric(s.task)
    artifacts = TB.log_pareto(s.tracker, table, s.base_metrics, metric, s.wanted.text, summary_metrics)
    return {"table": table, "pareto": fronts, "spearman": correlation, "artifacts": artifacts}


@flow(name="budget", persist_result=False, validate_parameters=False)
def budget_search(config: PipelineConfig, budget: str, search: CB.SearchConfig | None = None) -> dict[str, Any]:
    """The most compressed model of ``config``'s method within ``budget`` (``map_drop=1.0``, ``flops=4x``,
    ``params=6x``), from trials over ``search.knobs``; every trial tracked, the Pareto front logged."""
    cfg, search = config, search or CB.SearchConfig()
    wanted = CB.parse_budget(budget)
    started = time.perf_counter()
    checked = preflight(cfg)
    with run_folder_lock(checked.run_dir):
        return _budget_search(cfg, search, wanted, checked, started)


def _budget_search(cfg: PipelineConfig, search: CB.SearchConfig, wanted: CB.Budget, checked: Checked,
                   started: float) -> dict[str, Any]:
    from prefect.runtime import flow_run

    logger = get_run_logger()
    trials = CB.plan_trials(cfg, search)
    for trial in trials:
        check_method_config(trial.config)  # every trial's method settings, before anything starts
    tracker = RunTracker.start(cfg, flow_run_id=flow_run.get_id(), uri=checked.tracking_uri,
                               run_name=f"{cfg.name}-{cfg.model.name}-budget")
    s = Search(cfg, search, wanted, trials, StageRunner(cfg, checked.run_dir, tracker), tracker,
               checked.run_dir / "budget")
    try:
        tracker.client.set_tag(tracker.parent_run_id, "prunepipe.budget", wanted.text)
        pretrain_base(s)
        share_latency_table(s)
        s.timings["base_seconds"] = time.perf_counter() - started
        s.run.current = ("trials", None)
        screened = screen(s)
        s.run.current = ("retrain", None)
        retrained = retrain(s, rank(s, screened))
        chosen, final_path, registered = choose(s, retrained)
        s.timings["total_seconds"] = time.perf_counter() - started
        summary = summarise(s, screened, retrained, chosen)
    except BaseException as exc:
        stage, phase = s.run.current
        try:
            tracker.log_failed_stage(stage, phase, exc)
            tracker.finish("FAILED")
        except Exception as logging_error:  # noqa: BLE001 - the original error matters more
            logger.warning("could not mark the MLflow runs FAILED: %s", str(logging_error).splitlines()[0][:200])
        if isinstance(exc, Exception) and not isinstance(exc, PrunepipeError):
            lost = tracking_lost(tracker, exc, f"{stage} results", checked.run_dir)
            if lost is not None:
                raise lost from exc
        raise
    for record in s.records.values():
        if record["status"] != "failed":
            TB.log_trial(tracker, record["trial"], record["mlflow_run_id"], {}, record["status"], terminate="FINISHED")
    tracker.finish("FINISHED")

    create_table_artifact(
        table=[{k: _cell(v) for k, v in row.items()} for row in summary["table"]],
        key="budget-" + artifact_key(cfg.name).removeprefix("compress-"),
        description=(f"Trials of the budgeted search **{wanted.text}** ({wanted.describe()}, validation split) on "
                     f"{cfg.name} ({cfg.model.name}); ratios are base / model, drops in points. Chosen: "
                     f"{chosen['trial'] if chosen else 'none within the budget'}. MLflow: {tracker.run_link()}"),
    )
    return {
        "name": cfg.name,
        "budget": {"kind": wanted.kind, "value": wanted.value, "text": wanted.text},
        "flow_run_id": str(flow_run.get_id()),
        "run_dir": str(checked.run_dir),
        "metric": primary_metric(s.task),
        "base_checkpoint": s.base_path,
        "base_metrics": s.base_metrics,
        "base_val": s.base_metrics.get(val_key(s.task)),
        "chosen": _public(chosen) if chosen else None,
        "final_checkpoint": final_path,
        "trials": [_public(s.records[t.name]) for t in sorted(trials, key=lambda t: t.index)],
        **summary,
        "registered_model": registered,
        "mlflow": {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": tracker.parent_run_id,
                   "link": tracker.run_link()},
        "ray": ray_summary(),
        "timings": s.timings,
    }


def _trial_metrics(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("flops_ratio", "params_ratio", "latency_ratio", "predicted_latency_ratio", "size_bytes_ratio", "val_l1", "val_thresholded", "val_pruned",
            "map_pruned", "drop_pruned", "alpha", "removed_fraction", "val", "val_drop", "map", "drop",
            "distilled_val_drop", "final_map", "final_drop", "final_val_drop", "final_latency_e2e_ratio")
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


def run_budget(cfg: PipelineConfig, budget: str, search: CB.SearchConfig | None = None) -> dict[str, Any]:
    """Run the ``budget`` flow (the budget, the knobs, every trial's method settings and the setup checked
    first, before Prefect/Ray start)."""
    apply_env_defaults()
    CB.parse_budget(budget)
    search = search or CB.SearchConfig()
    for trial in CB.plan_trials(cfg, search):
        check_method_config(trial.config)
    preflight(cfg)
    return budget_search(cfg, budget, search)


__all__ = ["budget_search", "budget_trial", "run_budget", "run_concurrently"]
