"""`prunepipe compare`: the checkpoints of several pipeline runs side by side, from MLflow, and their Pareto plot.

A pipeline run in MLflow (``tasks/tracking.py``) is a parent run tagged ``prunepipe.preset`` (and
``prefect.flow_run_id`` when a flow ran it) with one child run per checkpoint (tag
``mlflow.parentRunId``; tags ``prunepipe.stage``, ``prunepipe.phase``, ``prunepipe.checkpoint_name``;
metrics ``params``, ``size_bytes``, ``flops``, ``map_voc07`` or ``top1``, ratios to the base
``*_ratio`` and ``*_drop``). A run is named by its MLflow run id, a child's id (its parent is meant), or
its Prefect flow run id.

``pareto_plot(rows, path)`` draws the task metric against FLOPs for any list of checkpoint rows (one
run's table as well as several runs') and marks the Pareto front: the checkpoints no other one beats on
both FLOPs (fewer) and the metric (higher).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from compression.errors import PrunepipeError

METRICS = ("map_voc07", "top1")  # the task metric, detection first
SHOWN = ("params", "size_bytes", "flops")
RATIOS = ("params_ratio", "size_bytes_ratio", "flops_ratio")


class CompareError(PrunepipeError):
    """No such experiment, run, or tracking store."""


# --------------------------------------------------------------------------------------------
# Reading runs


def resolve_uri(uri: str | None, home: Path | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local stack's MLflow under ``home``, else
    ``sqlite:///mlflow.db``; one line when the store does not exist or does not answer (nothing is created)."""
    import os

    from tasks.tracking import DEFAULT_URI, check_tracking

    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and home is not None:
        from infra.local.stack import StackError, stack_env

        try:
            uri = stack_env(home)["MLFLOW_TRACKING_URI"]
        except StackError:
            uri = None
    uri = uri or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).expanduser()
        if not database.is_file():
            raise CompareError(f"MLflow store {uri}: {database} does not exist (no pipeline has run here yet)")
    check_tracking(uri)
    return uri


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_experiment(client: Any, name: str, uri: str) -> Any:
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment {name!r} in {uri} (experiments: {', '.join(names) or 'none'})")
    return experiment


def latest_runs(client: Any, experiment: Any, uri: str, count: int) -> list[Any]:
    """The ``count`` latest pipeline (parent) runs, oldest first."""
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`prunepipe.preset` LIKE '%'",
                              order_by=["attributes.start_time DESC"], max_results=count)
    if not runs:
        raise CompareError(f"experiment {experiment.name!r} in {uri} has no pipeline runs yet "
                           "(start one with `prunepipe run` or from the Prefect UI)")
    return list(reversed(runs))


def find_run(client: Any, experiment: Any, run_id: str, uri: str) -> Any:
    """The parent run named by an MLflow run id (a child's: its parent) or a Prefect flow run id."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        return client.get_run(parent) if parent else run
    by_flow_run = client.search_runs([experiment.experiment_id],
                                     filter_string=f"tags.`prefect.flow_run_id` = '{_quote(run_id)}'")
    if by_flow_run:
        return by_flow_run[0]
    raise CompareError(f"run {run_id!r}: no MLflow run or Prefect flow run with this id in experiment "
                       f"{experiment.name!r} ({uri})")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def run_label(run: Any) -> str:
    return f"{run.info.run_name or run.data.tags.get('prunepipe.preset', 'run')} ({run.info.run_id[:8]})"


def checkpoint_rows(client: Any, parent: Any) -> list[dict[str, Any]]:
    """One row per checkpoint (child run) of a pipeline run, in pipeline order."""
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    label = run_label(parent)
    rows = []
    for child in children:
        tags = child.data.tags
        name = tags.get("prunepipe.checkpoint_name")
        rows.append({
            "run": label,
            "parent_run_id": parent.info.run_id,
            "flow_run_id": parent.data.tags.get("prefect.flow_run_id"),
            "preset": parent.data.tags.get("prunepipe.preset"),
            "checkpoint": Path(name).stem if name else child.info.run_name,
            "stage": tags.get("prunepipe.stage"),
            "phase": tags.get("prunepipe.phase") or None,
            "status": child.info.status,
            "mlflow_run_id": child.info.run_id,
            **child.data.metrics,
        })
    # The checkpoint file names start with the stage index (00_pretrain, 01_sparsity_p1, ...).
    rows.sort(key=lambda row: (row["checkpoint"] is None, row["checkpoint"] or ""))
    return rows


def compare_runs(uri: str, experiment_name: str, run_ids: Iterable[str] = (), last: int = 5) -> list[dict[str, Any]]:
    """The checkpoint rows of the named runs (or the ``last`` latest), run after run."""
    client = _client(uri)
    experiment = find_experiment(client, experiment_name, uri)
    run_ids = list(run_ids)
    parents = [find_run(client, experiment, r, uri) for r in run_ids] if run_ids else \
        latest_runs(client, experiment, uri, last)
    rows: list[dict[str, Any]] = []
    for parent in parents:
        found = checkpoint_rows(client, parent)
        if not found:
            rows.append({"run": run_label(parent), "parent_run_id": parent.info.run_id,
                         "checkpoint": None, "status": parent.info.status})
        rows.extend(found)
    return rows


# --------------------------------------------------------------------------------------------
# Pareto front and plot


def task_metric(rows: Iterable[Mapping[str, Any]]) -> str:
    """``map_voc07`` for detectors, ``top1`` for classifiers (whichever the rows carry)."""
    rows = list(rows)
    return next((m for m in METRICS if any(_number(r.get(m)) is not None for r in rows)), METRICS[0])


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def pareto_front(rows: Iterable[Mapping[str, Any]], metric: str | None = None) -> list[Mapping[str, Any]]:
    """The rows no other row beats (fewer or equal FLOPs and a higher or equal metric, one strictly), by FLOPs
    (of equal points, one)."""
    rows = list(rows)
    metric = metric or task_metric(rows)
    points = [r for r in rows if _number(r.get("flops")) is not None and _number(r.get(metric)) is not None]
    points.sort(key=lambda r: (r["flops"], -r[metric]))
    front: list[Mapping[str, Any]] = []
    for row in points:  # cheapest first: a row is on the front when it beats every cheaper one's metric
        if not front or row[metric] > front[-1][metric]:
            front.append(row)
    return front


def pareto_plot(rows: Iterable[Mapping[str, Any]], path: Path | str, metric: str | None = None,
                title: str | None = None) -> Path | None:
    """PNG of ``metric`` (default: mAP VOC07, else top-1) against FLOPs, one colour per ``row["run"]``,
    the Pareto front drawn as a step line; None when no row has both numbers."""
    rows = list(rows)
    metric = metric or task_metric(rows)
    points = [r for r in rows if _number(r.get("flops")) is not None and _number(r.get(metric)) is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = list(dict.fromkeys(str(r.get("run") or "checkpoints") for r in points))
    for run in runs:
        mine = [r for r in points if str(r.get("run") or "checkpoints") == run]
        ax.plot([r["flops"] for r in mine], [r[metric] for r in mine], "o-", alpha=0.8, label=run)
        for r in mine:
            ax.annotate(str(r.get("checkpoint") or r.get("stage") or ""), (r["flops"], r[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points, metric)
    ax.step([r["flops"] for r in front], [r[metric] for r in front], where="post", color="black",
            linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter([r["flops"] for r in front], [r[metric] for r in front], s=120, facecolors="none",
               edgecolors="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (fewer is better)")
    ax.set_ylabel(f"{metric} (higher is better)")
    ax.set_title(title or f"{metric} vs FLOPs: {len(points)} checkpoints of {len(runs)} run(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The side-by-side table


def format_si(value: Any, unit: str = "") -> str:
    number = _number(value)
    if number is None:
        return ""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= factor:
            return f"{number / factor:.3g}{prefix}{unit}"
    return f"{number:.4g}{unit}"


def format_ratio(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.2f}"


def format_points(value: Any, signed: bool = False) -> str:
    number = _number(value)
    return "" if number is None else (f"{100 * number:+.2f}" if signed else f"{100 * number:.2f}")


def compare_table(rows: list[Mapping[str, Any]], metric: str | None = None):
    """A rich Table: one line per checkpoint, runs one after the other (x = base / checkpoint)."""
    from rich.table import Table

    metric = metric or task_metric(rows)
    name = "mAP VOC07" if metric == "map_voc07" else metric
    front = {id(r) for r in pareto_front(rows, metric)}
    table = Table(title=f"checkpoints side by side (x: base / checkpoint; {name} and its drop in points; "
                        "* on the Pareto front)")
    for header in ("run", "checkpoint", "params", "size", "FLOPs", name, "params x", "size x", "FLOPs x",
                   f"{name} drop", "status"):
        table.add_column(header, justify="left" if header in ("run", "checkpoint", "status") else "right")
    previous = None
    for row in rows:
        run = str(row.get("run"))
        checkpoint = row.get("checkpoint")
        table.add_row(
            run if run != previous else "",
            ("* " if id(row) in front else "") + (str(checkpoint) if checkpoint else "(no checkpoints)"),
            format_si(row.get("params")), format_si(row.get("size_bytes"), "B"), format_si(row.get("flops")),
            format_points(row.get(metric)), *(format_ratio(row.get(k)) for k in RATIOS),
            format_points(row.get(f"{metric}_drop"), signed=True), str(row.get("status") or ""),
        )
        previous = run
    return table
