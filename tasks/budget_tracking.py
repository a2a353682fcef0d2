"""MLflow side of a budgeted search (``flows/budget.py``): one child run per trial, the Pareto front on the parent.

A trial's run is a child of the pipeline's parent run, named after the trial, with its knobs as params
(``knob.<config key>``) and its measurements as metrics: the compression ratios, the cheap signals
(``val_thresholded``: validation metric of the thresholded model; ``val_pruned``: of the pruned model
before retraining), and once retrained ``val`` / ``val_drop`` (validation split: what the choice reads) and
``map`` / ``drop`` (test split, reported). The trial's checkpoints are runs
nested under it (``RunTracker`` with the trial's run as parent). The parent holds ``pareto_front.json``
(every trial, with its place on the fronts; MLflow's table artifact) and ``plots/pareto_front.png``
(metric vs FLOPs ratio and vs parameter ratio). Every call is a Prefect task retried when the tracking
server does not answer, like ``tasks.stages.log_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task

from tasks.stages import LOG_OPTIONS
from tasks.tracking import RunTracker, _metric_rows, _pyplot, param_value, process_id

TRIAL_STATUS_TAG = "prunepipe.trial_status"


def trial_tracker(tracker: RunTracker, trial_run_id: str) -> RunTracker:
    """The same tracker with the trial's run as the parent of the checkpoints it logs."""
    return dataclasses.replace(tracker, parent_run_id=trial_run_id, timings={})


@task(name="start_trial_run", task_run_name="start_trial_run-{name}", **LOG_OPTIONS)
def start_trial_run(tracker: RunTracker, name: str, knobs: Mapping[str, Any], label: str) -> str:
    """A RUNNING child run of the parent for trial ``name``, its knobs as params; returns its id."""
    from mlflow.entities import Param

    client = tracker.client
    run = client.create_run(tracker.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": tracker.parent_run_id, "prunepipe.stage": "trial", "prunepipe.trial": name,
        "prunepipe.trial_knobs": label, TRIAL_STATUS_TAG: "screening", "prunepipe.process": process_id()})
    params = [Param(f"knob.{key}", param_value(value)) for key, value in knobs.items()]
    client.log_batch(run.info.run_id, params=[Param("trial", name), *params][:100])
    return run.info.run_id


@task(name="log_trial", task_run_name="log_trial-{name}", **LOG_OPTIONS)
def log_trial(tracker: RunTracker, name: str, run_id: str, metrics: Mapping[str, Any], status: str,
              terminate: str | None = None, error: str | None = None) -> None:
    """Metrics and status of a trial's run (``terminate``: FINISHED / FAILED closes it)."""
    client = tracker.client
    rows = _metric_rows(metrics)
    if rows:
        client.log_batch(run_id, metrics=rows)
    client.set_tag(run_id, TRIAL_STATUS_TAG, status)
    if error:
        client.set_tag(run_id, "prunepipe.error", error[:4000])
    if terminate:
        client.set_terminated(run_id, terminate)


@task(name="log_pareto", **LOG_OPTIONS)
def log_pareto(tracker: RunTracker, table: list[dict[str, Any]], base: Mapping[str, Any], metric: str,
               budget_text: str, summary: Mapping[str, Any]) -> dict[str, str]:
    """The Pareto table (``pareto_front.json``) and plot (``plots/pareto_front.png``) on the parent run,
    with the search's numbers (``summary``) as metrics. Returns the artifact paths."""
    client = tracker.client
    started = time.perf_counter()
    client.log_table(tracker.parent_run_id, data=_columns(table), artifact_file="pareto_front.json")
    figure = pareto_figure(table, base, metric, budget_text)
    try:
        client.log_figure(tracker.parent_run_id, figure, "plots/pareto_front.png")
    finally:
        _pyplot().close(figure)
    client.log_batch(tracker.parent_run_id, metrics=_metric_rows(summary))
    tracker.timings["log_pareto"] = time.perf_counter() - started
    return {"table": "pareto_front.json", "plot": "plots/pareto_front.png"}


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts -> MLflow's column layout (every column as long as the table, None where absent)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [_cell(row.get(key)) for row in rows] for key in keys}


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict | list):
        return str(value)
    return value


def pareto_figure(table: Sequence[Mapping[str, Any]], base: Mapping[str, Any], metric: str, budget_text: str):
    """Two panels, metric vs FLOPs ratio and vs parameter ratio: screened trials (pruned, not retrained;
    hollow), retrained trials (filled), their Pareto front (dashed), the chosen one (star), the base."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, ratio, title in ((axes[0], "flops_ratio", "FLOPs"), (axes[1], "params_ratio", "parameters")):
        screened = [r for r in table if r.get(ratio) is not None and r.get("map_pruned") is not None]
        ax.scatter([r[ratio] for r in screened], [r["map_pruned"] for r in screened], facecolors="none",
                   edgecolors="#999999", label="pruned, not retrained")
        final = [r for r in table if r.get(ratio) is not None and r.get("map") is not None]
        ax.scatter([r[ratio] for r in final], [r["map"] for r in final], color="#1f77b4", label="retrained")
        for r in table:
            y = r.get("map") if r.get("map") is not None else r.get("map_pruned")
            if r.get(ratio) is not None and y is not None:
                ax.annotate(str(r["trial"]), (r[ratio], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in table if r.get(f"front_{ratio}")), key=lambda r: r[ratio])
        if front:
            ax.plot([1.0] + [r[ratio] for r in front], [base.get(metric)] + [r["map"] for r in front], "--",
                    color="black", linewidth=1, label="Pareto front")
        chosen = [r for r in table if r.get("status") == "chosen" and r.get(ratio) is not None]
        ax.scatter([r[ratio] for r in chosen], [r.get("final_map", r.get("map")) for r in chosen], marker="*",
                   s=250, color="#d62728", zorder=4, label="chosen")
        if base.get(metric) is not None:
            ax.scatter([1.0], [base[metric]], marker="s", color="black", label="pretrained")
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} ratio (base / model, bigger is smaller)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"{metric} (test split)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"budget {budget_text}: trials and their Pareto front")
    fig.tight_layout()
    return fig
