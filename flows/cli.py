"""The ``prunepipe`` command line.

User errors (``PrunepipeError``) end with one line on stderr and exit code 2, no traceback.
Heavy imports (torch, Prefect, Ray, MLflow) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from compression.errors import PrunepipeError

app = typer.Typer(
    help="Compress SSD detectors and VGG classifiers: multi-layer pruning, Taylor pruning, distillation.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML preset: a path or a name in compression/configs/ (default: default)")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a setting, e.g. --set stages.retrain.epochs=3")
]

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)


def _load(config: Path | None, overrides: list[str] | None):
    from compression.config import load_config

    return load_config(config or "default", overrides or [])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_metrics(title: str, metrics: dict) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, int | float | str):
            table.add_row(key, _fmt(value))
    console.print(table)


# --------------------------------------------------------------------------------------------
# data / train / eval / info


@app.command()
def data(
    dataset: Annotated[str, typer.Argument(help="built-in dataset: digits-voc or digits-cls")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
) -> None:
    """Write a built-in real dataset (handwritten digit scans from scikit-learn) in VOC or ImageFolder format."""
    from compression.data.digits import write_digits_cls, write_digits_voc

    if dataset == "digits-voc":
        root = write_digits_voc(out, seed=seed)
    elif dataset == "digits-cls":
        root = write_digits_cls(out, seed=seed)
    else:
        raise PrunepipeError(f"unknown dataset {dataset!r} (valid: digits-voc, digits-cls)")
    console.print(f"wrote {dataset} to {root}")


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="checkpoint path (default: <workdir>/<name>/pretrain.safetensors)")] = None,
) -> None:
    """Pretrain the configured model in this process and evaluate it on the test split."""
    from compression.stages import pretrain

    cfg = _load(config, overrides)
    out = out or Path(cfg.workdir) / cfg.name / "pretrain.safetensors"
    if out.exists():
        raise PrunepipeError(f"{out}: already exists; pass another --out (nothing was overwritten)")
    path, metrics = pretrain(cfg, out)
    print_metrics(f"pretrained {cfg.model.name}: {path}", metrics)


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
) -> None:
    """Evaluate a checkpoint: size, FLOPs, mAP (VOC07, VOC, COCO) or top-1, latency."""
    from compression.checkpoint import read_metadata
    from compression.stages import evaluate_checkpoint

    read_metadata(checkpoint)  # refuse a bad file before building any data
    cfg = _load(config, overrides)
    metrics = evaluate_checkpoint(checkpoint, cfg, split=split)
    print_metrics(f"{checkpoint} on {split}", metrics)


@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a checkpoint's lineage, params, size, FLOPs and per-layer channels."""
    from compression.stages import checkpoint_info

    details = checkpoint_info(checkpoint)
    if as_json:
        console.print_json(json.dumps(details))
        return
    summary = {k: v for k, v in details.items() if k not in ("module_shapes", "metrics", "model_args")}
    print_metrics(str(checkpoint), summary)
    table = Table(title="channels per layer")
    table.add_column("module")
    table.add_column("shape")
    for name, shape in details["module_shapes"].items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in shape.items()))
    console.print(table)


def _si(value: object) -> str:
    """1234567 -> 1.23M (parameter counts, bytes, FLOPs)."""
    number = float(value)  # type: ignore[arg-type]
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= factor:
            return f"{number / factor:.3g}{suffix}"
    return f"{number:.3g}"


# --------------------------------------------------------------------------------------------
# run: the whole pipeline as a Prefect flow (Ray Train for training, MLflow for tracking)


@app.command()
def run(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", help="search for the most compressed model within map_drop=POINTS, or the best one reaching "
        "flops=RATIOx / params=RATIOx (see README: Budgeted compression)")] = None,
    search: Annotated[list[str] | None, typer.Option(
        "--search", help="with --budget: a search setting, e.g. --search max_trials=4 or "
        "--search knobs.stages.selection.gamma=[0.6,0.8]")] = None,
) -> None:
    """Run the whole pipeline (Prefect flow, Ray Train, MLflow) and print the checkpoint table."""
    if budget is not None:
        from compression.search import load_search, parse_budget

        parse_budget(budget)  # a bad budget, search setting or config stops here, before Prefect or Ray start
        _run_budget(_load(config, overrides), budget, load_search(search or []))
        return
    if search:
        raise PrunepipeError("--search needs --budget (e.g. --budget map_drop=1.0)")
    cfg = _load(config, overrides)  # a bad config stops here, before Prefect or Ray start
    from tasks.env import apply_env_defaults

    apply_env_defaults()  # before Prefect is imported: it reads its settings once
    from flows.compress import results_hint, run_pipeline

    summary = run_pipeline(cfg)
    metric = "top1" if any("top1" in row for row in summary["checkpoints"]) else "map_voc07"
    columns = [("checkpoint", "checkpoint", str), ("params", "params", _si), ("size", "size_bytes", _si),
               ("FLOPs", "flops", _si), (metric, metric, _fmt), ("params x", "params_ratio", _fmt),
               ("FLOPs x", "flops_ratio", _fmt), (f"{metric} drop", f"{metric}_drop", _fmt),
               ("cached", "cached", str)]
    table = Table(title=f"{cfg.name}: checkpoints of {cfg.model.name} (x = base / checkpoint)")
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title == "checkpoint" else "right")
    for row in summary["checkpoints"]:
        table.add_row(*("" if row.get(key) is None else show(row[key]) for _, key, show in columns))
    console.print(table)
    console.print(f"final checkpoint: {summary['final_checkpoint']}")
    if summary.get("registered_model"):
        console.print(f"registered model: {summary['registered_model']['uri']}")
    fits = sum(row.get("fit_seconds") or 0 for row in summary["checkpoints"])
    console.print(f"Ray Train fits: {fits:.0f}s in all; " + ", ".join(
        f"{key} {value:.1f}s" for key, value in summary["timings"].items() if not key.startswith("mlflow_log_")))
    for line in results_hint(summary):
        console.print(line, markup=False, highlight=False)


def _run_budget(cfg, budget: str, search) -> None:
    """``run --budget``: the budget flow, then the chosen trial, its ratios and the trials' table."""
    from tasks.env import apply_env_defaults

    apply_env_defaults()  # before Prefect is imported: it reads its settings once
    from flows.budget import run_budget
    from flows.compress import results_hint

    summary = run_budget(cfg, budget, search)
    metric = summary["metric"]
    table = Table(title=f"{cfg.name}: budget {summary['budget']['text']}, trials of {cfg.model.name} "
                  "(x = base / model; drops in points, test split; val = validation split)")
    columns = [("trial", "trial", str), ("knobs", "knobs", str), ("status", "status", str),
               ("FLOPs x", "flops_ratio", _fmt), ("params x", "params_ratio", _fmt),
               ("val thresholded", "val_thresholded", _fmt), ("val pruned", "val_pruned", _fmt),
               ("pruned", "map_pruned", _fmt), ("retrained", "map", _fmt), ("drop", "drop_points", _fmt),
               ("final drop", "final_drop_points", _fmt)]
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title in ("trial", "knobs", "status") else "right")
    for row in summary["table"]:
        front = " *" if row.get("front_flops_ratio") or row.get("front_params_ratio") else ""
        table.add_row(*("" if row.get(key) is None else show(row[key]) + (front if key == "trial" else "")
                        for _, key, show in columns))
    console.print(table, width=max(console.width, 160))
    console.print(f"base {metric}: {_fmt(summary['base_metrics'].get(metric))} (test); * = on a Pareto front "
                  "(retrained trials, mAP vs FLOPs or vs params)", markup=False, highlight=False)
    chosen = summary["chosen"]
    if chosen is None:
        console.print(f"no trial is within the budget {summary['budget']['text']}: retrain longer, add knobs "
                      "(--search) or relax the budget", markup=False, highlight=False)
    else:
        console.print(
            f"chosen: trial {chosen['trial']} ({chosen['knobs']}): {_fmt(chosen['flops_ratio'])}x fewer FLOPs, "
            f"{_fmt(chosen['params_ratio'])}x fewer params, {metric} {_fmt(chosen['final_map'])} "
            f"({100 * chosen['final_drop']:+.2f} points drop, after {chosen['final_stage']})",
            markup=False, highlight=False, soft_wrap=True)
        console.print(f"final checkpoint: {summary['final_checkpoint']}", markup=False, highlight=False)
    rho = summary["spearman"]
    shown = {k: v for k, v in rho.items() if v is not None}
    console.print("cheap signals vs retrained " + metric + ": " + (", ".join(
        f"Spearman {k.removeprefix('spearman_')} {v:+.2f}" for k, v in shown.items()) if shown else
        "too few retrained trials for a rank correlation"), markup=False, highlight=False)
    if summary.get("registered_model"):
        console.print(f"registered model: {summary['registered_model']['uri']}", markup=False, highlight=False)
    console.print(f"search: {summary['timings']['total_seconds']:.0f}s", markup=False, highlight=False)
    for line in results_hint(summary):
        console.print(line, markup=False, highlight=False)
    if chosen is None:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# compress: the whole method in this process (no Prefect, Ray or MLflow)


def compression_table(title: str, rows: list[dict], task: str) -> Table:
    """One line per checkpoint: size, cost, task metrics, ratios to the first row (the pretrained base)."""
    from compression.stages import add_ratios

    detection = task == "detection"
    metric = "map_voc07" if detection else "top1"
    headers = ["stage", "phase", "params", "size", "FLOPs"]
    headers += ["mAP VOC07", "mAP VOC", "mAP COCO"] if detection else ["top-1"]
    headers += ["params x", "size x", "FLOPs x", "Δ " + ("mAP07" if detection else "top-1") + " (pts)", "seconds"]
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header in ("stage", "phase") else "right")
    base = rows[0]["metrics"] if rows else {}

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}"

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    for row in rows:
        m = dict(row["metrics"])
        add_ratios(m, base, task)
        seconds = (m.get("stage_seconds") or 0.0) + (m.get("selection_seconds") or 0.0)
        cells = [row["stage"] + (" (found)" if row.get("resumed") else ""), row.get("phase") or "",
                 *("" if m.get(k) is None else _si(m[k]) + unit
                   for k, unit in (("params", ""), ("size_bytes", "B"), ("flops", "")))]
        cells += [pct(m.get(k)) for k in (("map_voc07", "map_voc", "map_coco") if detection else ("top1",))]
        drop = m.get(f"{metric}_drop")
        cells += [ratio(m.get("params_ratio")), ratio(m.get("size_bytes_ratio")), ratio(m.get("flops_ratio")),
                  "" if drop is None else f"{100 * drop:+.2f}", f"{seconds:.0f}"]
        table.add_row(*cells)
    return table


@app.command()
def compress(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="output folder (default: <workdir>/<name>-local)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a run: skip stages whose output exists")] = False,
) -> None:
    """Run the whole method in this process (no Prefect/Ray/MLflow) and print the checkpoint table."""
    cfg = _load(config, overrides)
    from compression.models import model_task
    from compression.pipeline import run_pipeline_in_process

    run_dir = run_dir or Path(cfg.workdir) / f"{cfg.name}-local"

    def report(row: dict) -> None:
        m = row["metrics"]
        what = f"{row['stage']}" + (f" {row['phase']}" if row.get("phase") else "")
        done = "found (resume)" if row.get("resumed") else f"done in {m.get('stage_seconds', 0.0):.0f}s"
        console.print(f"{what}: {done} -> {row['path']}", markup=False, highlight=False)

    rows = run_pipeline_in_process(cfg, run_dir, resume=resume, on_row=report)
    task = model_task(cfg.model.name)
    table = compression_table(f"{cfg.name}: {cfg.model.name} in {run_dir} (x: base / checkpoint)", rows, task)
    console.print(table, width=max(console.width, 160))  # a log file gets the whole table, not 80 columns
    console.print(f"final checkpoint: {rows[-1]['path']}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------
# export: the compressed network for deployment


@app.command("export")
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="export format (only onnx for now)")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output file (default: CHECKPOINT with .onnx)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    dynamic_batch: Annotated[bool, typer.Option(help="dynamic batch axis (else batch 1)")] = True,
) -> None:
    """Export a checkpoint's network (backbone + head) with its post-processing sidecar (.json, .anchors.npy)."""
    from compression.export import EXPORT_FORMATS

    if fmt not in EXPORT_FORMATS:
        raise PrunepipeError(f"unknown export format {fmt!r} (valid: {', '.join(EXPORT_FORMATS)})")
    from compression.export import export_onnx

    metrics = export_onnx(checkpoint, out or checkpoint.with_suffix(".onnx"), opset=opset, dynamic_batch=dynamic_batch)
    files = metrics.pop("files")
    shown = {k: v if isinstance(v, int | float | str) else json.dumps(v) for k, v in metrics.items()}
    print_metrics(f"exported {checkpoint}", {**shown, **{f"file_{k}": v for k, v in files.items()}})


# --------------------------------------------------------------------------------------------
# local stack


HomeOpt = Annotated[Path, typer.Option("--home", help="folder for the stack's data, logs and pid files")]
DEFAULT_HOME = Path(".prunepipe")


@app.command()
def up(
    home: HomeOpt = DEFAULT_HOME,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port")] = 5000,
    ray_port: Annotated[int, typer.Option(help="Ray head (GCS) port")] = 6379,
) -> None:
    """Start a local stack: Prefect server, MLflow tracking server and a Ray head, on 127.0.0.1."""
    from infra.local.stack import stack_up

    services = stack_up(home, prefect_port=prefect_port, mlflow_port=mlflow_port, ray_port=ray_port)
    for service in services:
        console.print(f"{service.name:8s} {service.url}  (pid {service.pid}, log {service.log})")
    console.print(f"flow runs started with `prunepipe run` pick this stack up (home {home})")


@app.command()
def down(home: HomeOpt = DEFAULT_HOME) -> None:
    """Stop what `prunepipe up` started (and nothing else)."""
    from infra.local.stack import stack_down

    for name in stack_down(home):
        console.print(f"stopped {name}")


@app.command()
def status(home: HomeOpt = DEFAULT_HOME) -> None:
    """Say what of the local stack runs where."""
    from infra.local.stack import stack_status

    services = stack_status(home)
    if not services:
        console.print(f"no stack recorded under {home} (start one with `prunepipe up`)")
        return
    table = Table(title=f"stack under {home}")
    for column in ("service", "url", "pid", "alive", "healthy"):
        table.add_column(column)
    for s in services:
        table.add_row(s.name, s.url, str(s.pid), str(s.alive), str(s.healthy))
    console.print(table)


# --------------------------------------------------------------------------------------------
# serve: the flow as Prefect deployments; compare: pipeline runs side by side from MLflow


@app.command()
def serve(
    home: HomeOpt = DEFAULT_HOME,
    presets: Annotated[
        list[str] | None,
        typer.Option("--preset", "-p", help="a name in compression/configs/ or a YAML path (repeatable; default: every preset)"),
    ] = None,
    overrides: SetOpt = None,
    cron: Annotated[str, typer.Option(help="schedule of every deployment, UTC (inactive for GPU presets)")] = "0 2 * * *",
    limit: Annotated[int, typer.Option(min=1, help="flow runs this process executes at once")] = 1,
) -> None:
    """Register deployments compress/<preset> and execute their runs (from the Prefect UI or schedules) until Ctrl-C."""
    from flows.serve import check_server, plan_deployments, serve_presets, server_env, ui_url

    os.environ.update(server_env(home))  # before Prefect is imported: it reads its settings once
    from tasks.env import apply_env_defaults

    apply_env_defaults()
    planned = plan_deployments(presets, overrides, cron)  # a bad preset or value stops here
    api = os.environ["PREFECT_API_URL"]
    check_server(api)
    for plan in planned:
        schedule = f"cron '{plan.cron}' UTC, " + ("active" if plan.schedule_active else "inactive (GPU preset)")
        console.print(f"{plan.full_name}: {plan.config.model.name} from {plan.source}; {schedule}",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"Prefect UI: {ui_url(api)}/deployments; runs execute in this process until Ctrl-C",
                  markup=False, highlight=False, soft_wrap=True)
    serve_presets(planned, limit=limit)


@app.command()
def compare(
    runs: Annotated[
        list[str] | None,
        typer.Argument(help="pipeline runs: MLflow run ids or Prefect flow run ids (default: the --last latest)"),
    ] = None,
    experiment: Annotated[str, typer.Option("--experiment", "-e", help="MLflow experiment")] = "prunepipe",
    out: Annotated[Path, typer.Option("--out", "-o", help="Pareto plot (mAP vs FLOPs), PNG")] = Path("pareto.png"),
    mlflow_uri: Annotated[
        str | None,
        typer.Option("--mlflow-uri", help="default: $MLFLOW_TRACKING_URI, else the stack under --home, else sqlite:///mlflow.db"),
    ] = None,
    last: Annotated[int, typer.Option(min=1, help="without RUN: how many of the latest runs")] = 5,
    home: HomeOpt = DEFAULT_HOME,
) -> None:
    """Print the checkpoints of pipeline runs side by side (size, FLOPs, mAP, ratios) and plot mAP vs FLOPs."""
    from flows.compare import compare_runs, compare_table, pareto_plot, resolve_uri, task_metric

    uri = resolve_uri(mlflow_uri, home)
    rows = compare_runs(uri, experiment, runs or [], last=last)
    metric = task_metric(rows)
    console.print(compare_table(rows, metric))
    plot = pareto_plot(rows, out, metric)
    message = f"Pareto plot ({metric} vs FLOPs): {plot}" if plot else f"no checkpoint has both FLOPs and {metric}: no plot"
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    logging.basicConfig(level=os.environ.get("PRUNEPIPE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except PrunepipeError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
