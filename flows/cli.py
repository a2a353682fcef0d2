"""The ``prunepipe`` command line.

User errors (``PrunepipeError``) end with one line on stderr and exit code 2, no traceback.
Heavy imports (torch, Prefect, Ray, MLflow) happen inside the commands, so ``--help`` is instant.
``--json`` prints machine-readable output and nothing else on stdout; what a command says along the way
goes to stderr then.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from compression.errors import ConfigError, PrunepipeError
from tasks.compare import format_points, format_ratio, format_si
from tasks.storage import is_uri, run_folder

PANEL_PIPELINE = "Run the pipeline"
PANEL_INSPECT = "Inspect checkpoints"
PANEL_DATA = "Data"
PANEL_STACK = "Stack"

app = typer.Typer(
    help="Compress SSD detectors and VGG classifiers: multi-layer pruning, Taylor pruning, distillation.",
    pretty_exceptions_enable=False,
    invoke_without_command=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", metavar="PRESET|FILE",
                 help="a preset name (compression/configs/<name>.yaml) or a YAML file; default: default"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE",
                 help="override a setting (repeatable), e.g. --set stages.retrain.epochs=3"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON only (messages go to stderr)")]
HomeOpt = Annotated[Path, typer.Option("--home", help="folder of the local stack (`prunepipe up`)")]
DEFAULT_HOME = Path(".prunepipe")

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)


class Dataset(StrEnum):
    digits_voc = "digits-voc"
    digits_cls = "digits-cls"
    stage = "stage"


class Split(StrEnum):
    train = "train"
    val = "val"
    test = "test"


class ExportFormat(StrEnum):
    onnx = "onnx"


class OrtLayout(StrEnum):
    auto = "auto"
    nchwc = "nchwc"
    nchw = "nchw"


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"prunepipe {version('prunepipe')}", markup=False, highlight=False)
        except PackageNotFoundError:  # run from a source tree that was never installed
            console.print("prunepipe (not installed)", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="print the version and exit")] = False,
) -> None:
    """Compress SSD detectors and VGG classifiers: multi-layer pruning, Taylor pruning, distillation."""
    if ctx.invoked_subcommand is None:  # plain `prunepipe`: the help, not an error
        console.print(ctx.get_help())
        raise typer.Exit()


def _load(config: Path | None, overrides: list[str] | None):
    from compression.config import load_config

    return load_config(config or "default", overrides or [])


def _plain(text: str, *, stderr: bool = False) -> None:
    """One line for a person: no markup, no highlighting, wrapped by the terminal, not by rich."""
    (err_console if stderr else console).print(text, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# --json: the JSON on stdout, everything else on stderr


@contextlib.contextmanager
def _stdout_for(as_json: bool) -> Iterator[None]:
    """With ``--json``, whatever the command prints on its way (ours, Ray's forwarded worker output,
    libraries') goes to stderr, so that stdout carries the JSON alone."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _say(as_json: bool):
    """Where a command's messages go: stdout, or stderr under ``--json``."""
    return err_console if as_json else console


# --------------------------------------------------------------------------------------------
# What a person reads during a run: our progress, warnings and errors; the rest goes to a log file


OUR_LOGGERS = ("compression", "tasks", "flows")
# Prefect logs every task's end as "Finished in state Completed()" (failures are logged as errors).
_PREFECT_STATE_LINE = re.compile(r"^Finished in state (Completed|Cached)\b")
_PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Notices logged as warnings that ask nothing of the user: Ray saying that the local Ray it starts uses
# token authentication (which prunepipe wants).
_NOTICES = ("ray._private.authentication.authentication_token_setup",)


class _TerminalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.name in _NOTICES:  # library warnings (MLflow's schema hints,
            return False  # torchmetrics'), notices: the log file only
        if record.name.split(".")[0] in OUR_LOGGERS:
            return record.levelno >= logging.INFO
        if record.name in _PREFECT_RUN_LOGGERS and record.levelno < logging.WARNING:
            return not _PREFECT_STATE_LINE.match(record.getMessage())
        return record.levelno >= logging.WARNING


class _RunLogFile(logging.FileHandler):
    """The run folder's log, created at its first line: a run stopped by bad input leaves no new file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def _route_logs(log_file: Path) -> Iterator[None]:
    """Everything at INFO and above into ``log_file``; on the terminal (stderr) only what _TerminalFilter
    keeps. MLflow and Ray attach their own terminal handlers at import; they are routed here instead.
    The previous logging set-up is restored afterwards (tests call the CLI repeatedly in one process)."""
    import ray  # noqa: F401 - Ray sets up its logger when first imported; do that before rerouting it

    root = logging.getLogger()
    own = [logging.getLogger(name) for name in ("ray", "mlflow")]
    saved = (root.level, list(root.handlers), [(lg.handlers, lg.propagate) for lg in own])
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    terminal.addFilter(_TerminalFilter())
    file = _RunLogFile(log_file)
    root.handlers = [terminal, file]
    root.setLevel(logging.INFO)
    for logger in own:
        logger.handlers = []
        logger.propagate = True
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        file.close()
        root.setLevel(saved[0])
        root.handlers = saved[1]
        for logger, (handlers, propagate) in zip(own, saved[2], strict=True):
            logger.handlers = handlers
            logger.propagate = propagate


# --------------------------------------------------------------------------------------------
# Which Prefect, MLflow and Ray a run uses


def _connect(home: Path) -> set[str]:
    """Point this process at the stack ``prunepipe up`` started under ``home``, for each service the
    environment does not already name; returns the services taken from the stack. Must run before
    Prefect is imported: it reads its settings once."""
    from infra.local.stack import stack_env_for_run

    taken = stack_env_for_run(home)
    for variables in taken.values():
        os.environ.update(variables)
    return set(taken)


def _source(setting: str | None, variable: str, service: str, from_stack: set[str], home: Path) -> str:
    if setting:
        return setting
    if service in from_stack:
        return f"the stack under {home}"
    return f"${variable}" if os.environ.get(variable) else ""


def service_lines(cfg, home: Path, from_stack: set[str]) -> list[str]:
    """The first lines of a run: which Prefect API, MLflow tracking store and Ray it uses, and why."""
    from compression.device import precision_line
    from tasks.ray_trainer import ray_address
    from tasks.tracking import tracking_uri

    api = os.environ.get("PREFECT_API_URL")
    prefect = (f"{api} ({_source(None, 'PREFECT_API_URL', 'prefect', from_stack, home)})" if api else
               "a temporary server for this run only (`prunepipe up` keeps one, with its UI)")
    uri = tracking_uri(cfg.tracking)
    origin = _source("tracking.mlflow_uri" if cfg.tracking.mlflow_uri else None, "MLFLOW_TRACKING_URI", "mlflow",
                     from_stack, home)
    mlflow = f"{uri} ({origin or 'default: a SQLite file in this folder'})"
    address = ray_address(cfg.compute)
    origin = _source("compute.ray_address" if cfg.compute.ray_address else None, "RAY_ADDRESS", "ray",
                     from_stack, home)
    ray = f"{address} ({origin})" if address else "a local Ray started for this run, sized to this machine"
    return [
        f"Prefect API: {prefect}",
        f"MLflow tracking: {mlflow}",
        f"Ray: {ray}",
        precision_line(cfg.compute),
    ]


# --------------------------------------------------------------------------------------------
# Tables: one that fits the terminal, the whole one written next to the run


def print_metrics(title: str, metrics: Mapping[str, Any]) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    for key, value in metrics.items():
        if isinstance(value, int | float | str):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def write_csv(path: Path, rows: list[Mapping[str, Any]]) -> Path:
    """Every column of ``rows`` (the table on the terminal shows a few); nested values as JSON."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    return path


def _narrow_table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")


def checkpoint_table(title: str, rows: list[Mapping[str, Any]], metric: str) -> Table:
    """``prunepipe run``'s table: the columns a person compares; size, latency and the other mAPs are in
    the CSV. Numbers never wrap; the checkpoint name folds when the terminal is narrow."""
    name = "mAP07" if metric == "map_voc07" else metric
    table = _narrow_table(title)
    table.add_column("checkpoint", overflow="fold", min_width=10)
    for header in ("params", "FLOPs", f"{name} %", "Δ pts", "params x", "FLOPs x"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(str(row.get("checkpoint")) + (" (cached)" if row.get("cached") else ""),
                      format_si(row.get("params")), format_si(row.get("flops")), format_points(row.get(metric)),
                      format_points(row.get(f"{metric}_drop"), signed=True), format_ratio(row.get("params_ratio")),
                      format_ratio(row.get("flops_ratio")))
    return table


# --------------------------------------------------------------------------------------------
# data / pretrain / eval / info / export


@app.command(rich_help_panel=PANEL_DATA)
def data(
    dataset: Annotated[Dataset, typer.Argument(
        help="built-in dataset to write, or `stage`: copy the config's prepared data.root to --to")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (built-in datasets)")] = None,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    to: Annotated[str | None, typer.Option(
        "--to", help="stage: shared storage the nodes read (s3://..., gs://..., file://... or a path)")] = None,
) -> None:
    """Write a built-in real dataset (handwritten digit scans from scikit-learn) in VOC or ImageFolder format,
    or stage a config's dataset on shared storage for a cluster (`data stage --config X --to URI`)."""
    if dataset is Dataset.stage:
        _stage_data(config, overrides, to)
        return
    from compression.data.digits import write_digits_cls, write_digits_voc

    if out is None:
        raise PrunepipeError(f"data {dataset.value}: --out is required (the folder to write)")
    write = write_digits_voc if dataset is Dataset.digits_voc else write_digits_cls
    root = write(out, seed=seed)
    _plain(f"wrote {dataset.value} to {root}")


def _stage_data(config: Path | None, overrides: list[str] | None, to: str | None) -> None:
    """Copy the config's data.root (the built-in set is generated first) to ``to`` with pyarrow.fs."""
    from compression.data.loaders import ensure_builtin_data
    from tasks.storage import check_stage_target, stage_data

    if not to:
        raise PrunepipeError("data stage: --to is required (s3://bucket/path, gs://..., file://... or a folder)")
    cfg = _load(config, overrides)
    check_stage_target(to)  # before the built-in set is generated
    source = ensure_builtin_data(cfg.data)
    count = stage_data(source, to)
    _plain(f"staged {count} files of {source} to {to}; run with --set data.root={to}")


def pretrain(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="checkpoint path (default: <workdir>/<name>/pretrain.safetensors)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain the configured model in this process and evaluate it on the test split."""
    from compression.stages import pretrain as pretrain_model

    cfg = _load(config, overrides)
    if out is None and is_uri(cfg.workdir):
        raise ConfigError(f"workdir {cfg.workdir}: this command writes to a local folder; pass --out")
    out = out or run_folder(cfg.workdir, cfg.name) / "pretrain.safetensors"
    if out.exists():
        raise PrunepipeError(f"{out}: already exists; pass another --out (nothing was overwritten)")
    with _stdout_for(as_json):
        path, metrics = pretrain_model(cfg, out)
    if as_json:
        _print_json({"checkpoint": str(path), "metrics": metrics})
    else:
        print_metrics(f"pretrained {cfg.model.name}: {path}", metrics)


app.command("pretrain", rich_help_panel=PANEL_PIPELINE)(pretrain)
app.command("train", hidden=True, help="Same as `pretrain` (its former name).")(pretrain)


@app.command("eval", rich_help_panel=PANEL_INSPECT)
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    split: Annotated[Split, typer.Option(help="data split")] = Split.test,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint: size, FLOPs, mAP (VOC07, VOC, COCO) or top-1, latency."""
    from compression.checkpoint import read_metadata
    from compression.measure import evaluate_checkpoint

    read_metadata(checkpoint)  # refuse a bad file before building any data
    cfg = _load(config, overrides)
    with _stdout_for(as_json):
        metrics = evaluate_checkpoint(checkpoint, cfg, split=split.value)
    if as_json:
        _print_json(metrics)
    else:
        print_metrics(f"{checkpoint} on {split.value}", metrics)


@app.command(rich_help_panel=PANEL_INSPECT)
def info(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    as_json: JsonOpt = False,
) -> None:
    """Show a checkpoint's lineage, params, size, FLOPs and per-layer channels."""
    from compression.measure import checkpoint_info

    details = checkpoint_info(checkpoint)
    if as_json:
        _print_json(details)
        return
    summary = {k: v for k, v in details.items() if k not in ("module_shapes", "metrics", "model_args")}
    print_metrics(str(checkpoint), summary)
    table = Table(title="channels per layer")
    table.add_column("module", overflow="fold")
    table.add_column("shape", overflow="fold")
    for name, shape in details["module_shapes"].items():
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in shape.items()))
    console.print(table)


@app.command("export", rich_help_panel=PANEL_INSPECT)
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="export format")] = ExportFormat.onnx,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output file (default: CHECKPOINT with .onnx)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    dynamic_batch: Annotated[bool, typer.Option(help="dynamic batch axis (else batch 1)")] = True,
    layout: Annotated[OrtLayout, typer.Option(
        help="ONNX Runtime layout recorded for the file; auto: the faster one for this model (as the checkpoint "
             "measured it, else timed now)")] = OrtLayout.auto,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint's network (backbone + head) with its post-processing sidecar (.json, .anchors.npy)."""
    from compression.export import export_onnx

    with _stdout_for(as_json):
        metrics = export_onnx(checkpoint, out or checkpoint.with_suffix(f".{fmt.value}"), opset=opset,
                              dynamic_batch=dynamic_batch, layout=layout.value)
    if as_json:
        _print_json(metrics)
        return
    files = metrics.pop("files")
    shown = {k: v if isinstance(v, int | float | str) else json.dumps(v) for k, v in metrics.items()}
    print_metrics(f"exported {checkpoint}", {**shown, **{f"file_{k}": v for k, v in files.items()}})


# --------------------------------------------------------------------------------------------
# run: the whole pipeline as a Prefect flow (Ray Train for training, MLflow for tracking)


@app.command(rich_help_panel=PANEL_PIPELINE)
def run(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="map_drop=POINTS|flops=RATIOx|params=RATIOx|latency=RATIOx",
        help="search for the most compressed model within an mAP drop, or the best one reaching a "
        "FLOPs/params/latency reduction (see docs/budget.md)")] = None,
    search: Annotated[list[str] | None, typer.Option(
        "--search", metavar="KEY=VALUE", help="with --budget: a search setting, e.g. --search max_trials=4 or "
        "--search knobs.stages.selection.gamma=[0.6,0.8]")] = None,
    home: HomeOpt = DEFAULT_HOME,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline (Prefect flow, Ray Train, MLflow) and print the checkpoint table.

    Uses the stack `prunepipe up` started under --home for each of Prefect, MLflow and Ray that the
    environment ($PREFECT_API_URL, $MLFLOW_TRACKING_URI, $RAY_ADDRESS) does not name; the first lines
    say which. Library warnings go to prunepipe-run.log in the run folder."""
    # A bad budget, search setting or config stops here, before Prefect or Ray start.
    if budget is None and search:
        raise PrunepipeError("--search needs --budget (e.g. --budget map_drop=1.0)")
    if budget is not None:
        from compression.budget import parse_budget

        parsed_budget = parse_budget(budget)
    cfg = _load(config, overrides)
    if budget is not None:
        from compression.budget import default_knobs, load_search

        search_settings = load_search(search or [], knobs=default_knobs(cfg, parsed_budget))
    from compression.checks import check_method_config

    # A bad method setting (of the run, or of any budget trial) stops here, before any service is named.
    check_method_config(cfg)
    if budget is not None:
        from compression.budget import plan_trials

        for trial in plan_trials(cfg, search_settings):
            check_method_config(trial.config)
    from_stack = _connect(home)
    from tasks.env import apply_env_defaults

    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's lines go where ours go
    apply_env_defaults()  # before Prefect is imported: it reads its settings once
    say = _say(as_json)
    with _stdout_for(as_json):
        for line in service_lines(cfg, home, from_stack):
            _plain(line, stderr=as_json)
        log_file = run_folder(cfg.workdir, cfg.name) / "prunepipe-run.log"
        _plain(f"Log: {log_file} (library warnings and Prefect's per-task state lines)", stderr=as_json)
        from flows.compress import results_hint

        with _route_logs(log_file):
            if budget is not None:
                from flows.budget import run_budget

                summary = run_budget(cfg, budget, search_settings)
            else:
                from flows.compress import run_pipeline

                summary = run_pipeline(cfg)
        if budget is not None:
            _report_budget(cfg, summary, say)
        else:
            _report_run(cfg, summary, say)
        for line in results_hint(summary):
            _plain(line, stderr=as_json)
    if as_json:
        _print_json(summary)
    if budget is not None and summary["chosen"] is None:
        raise typer.Exit(1)


def _report_run(cfg, summary: dict, say: Console) -> None:
    rows = summary["checkpoints"]
    metric = "top1" if any("top1" in row for row in rows) else "map_voc07"
    table = checkpoint_table(f"{cfg.name}: checkpoints of {cfg.model.name} (x = base / checkpoint)", rows, metric)
    say.print(table)
    full = write_csv(Path(summary["run_dir"]) / "checkpoints.csv", rows)
    say.print(f"every column (size, latency, all mAPs): {full}", markup=False, highlight=False, soft_wrap=True)
    say.print(f"final checkpoint: {summary['final_checkpoint']}", markup=False, highlight=False, soft_wrap=True)
    if summary.get("registered_model"):
        registered = summary["registered_model"]
        say.print(f"registered model: {registered['uri']} ({registered['note']})", markup=False, highlight=False)
    fits = sum(row.get("fit_seconds") or 0 for row in rows)
    say.print(f"Ray Train fits: {fits:.0f}s in all; " + ", ".join(
        f"{key} {value:.1f}s" for key, value in summary["timings"].items() if not key.startswith("mlflow_log_")),
        markup=False, highlight=False, soft_wrap=True)


RATIO_HEADERS = {"flops_ratio": "FLOPs", "params_ratio": "params", "latency_ratio": "latency"}


def _report_budget(cfg, summary: dict, say: Console) -> None:
    """``run --budget``: the trials' table, the chosen trial and its ratios."""
    metric = summary["metric"]
    table = _narrow_table(f"{cfg.name}: budget {summary['budget']['text']}, trials of {cfg.model.name} "
                          "(x = base / model; drops in points on the test split; * = on a Pareto front)")
    table.add_column("trial", overflow="fold", min_width=8)
    table.add_column("status", overflow="fold", min_width=9)  # "retrained" whole, never a letter a line
    # The measured latency ratio when a trial has one (a latency budget, or knobs that cut by latency).
    ratios = ("flops_ratio", "params_ratio", *(("latency_ratio",) if any(
        row.get("latency_ratio") is not None for row in summary["table"]) else ()))
    for header in (*(f"{RATIO_HEADERS[k]} x" for k in ratios), "val pruned", "retrained", "final drop"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in summary["table"]:
        front = " *" if row.get("front_flops_ratio") or row.get("front_params_ratio") else ""
        table.add_row(f"{row.get('trial')}{front}", str(row.get("status") or ""),
                      *(format_ratio(row.get(k)) for k in ratios),
                      *("" if row.get(k) is None else f"{row[k]:.4g}" for k in ("val_pruned", "map", "final_drop_points")))
    say.print(table)
    full = write_csv(Path(summary["run_dir"]) / "budget_trials.csv", summary["table"])
    lines = [f"every column (knobs, thresholded and pruned scores, drops): {full}",
             f"base {metric}: {summary['base_metrics'].get(metric):.4g} (test)"]
    chosen = summary["chosen"]
    failed = [trial for trial in summary["trials"] if trial.get("status") == "failed"]
    if chosen is None and failed and len(failed) == len(summary["trials"]):
        lines.append(f"every trial failed; the first, {failed[0]['trial']} ({failed[0].get('knobs')}): "
                     f"{failed[0].get('error')}")
    elif chosen is None:
        lines.append(f"no trial is within the budget {summary['budget']['text']}: retrain longer, add knobs "
                     "(--search) or relax the budget")
    else:
        speed = ""
        if chosen.get("latency_ratio") is not None:
            speed = f"{chosen['latency_ratio']:.3g}x lower measured network latency"
            if chosen.get("final_latency_e2e_ratio") is not None:
                speed += f" ({chosen['final_latency_e2e_ratio']:.3g}x end to end)"
            speed += " (ONNX Runtime, batch 32), "
        lines += [f"chosen: trial {chosen['trial']} ({chosen['knobs']}): {chosen['flops_ratio']:.3g}x fewer FLOPs, "
                  f"{chosen['params_ratio']:.3g}x fewer params, {speed}{metric} {chosen['final_map']:.4g} "
                  f"({100 * chosen['final_drop']:+.2f} points drop, after {chosen['final_stage']})",
                  f"final checkpoint: {summary['final_checkpoint']}"]
    shown = {k: v for k, v in summary["spearman"].items() if v is not None}
    lines.append("cheap signals vs retrained " + metric + ": " + (", ".join(
        f"Spearman {k.removeprefix('spearman_')} {v:+.2f}" for k, v in shown.items()) if shown else
        "too few retrained trials for a rank correlation"))
    if summary.get("registered_model"):
        lines.append(f"registered model: {summary['registered_model']['uri']}")
    lines.append(f"search: {summary['timings']['total_seconds']:.0f}s")
    for line in lines:
        say.print(line, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# compress: the whole method in this process (no Prefect, Ray or MLflow)


def compression_table(title: str, rows: list[dict], task: str) -> Table:
    """One line per checkpoint: size, cost, task metrics, ratios to the first row (the pretrained base)."""
    from compression.measure import add_ratios

    detection = task == "detection"
    metric = "map_voc07" if detection else "top1"
    headers = ["stage", "phase", "params", "size", "FLOPs"]
    headers += ["mAP VOC07", "mAP VOC", "mAP COCO"] if detection else ["top-1"]
    headers += ["params x", "size x", "FLOPs x", "Δ " + ("mAP07" if detection else "top-1") + " (pts)", "seconds"]
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header in ("stage", "phase") else "right")
    base = rows[0]["metrics"] if rows else {}
    for row in rows:
        m = dict(row["metrics"])
        add_ratios(m, base, task)
        seconds = (m.get("stage_seconds") or 0.0) + (m.get("selection_seconds") or 0.0)
        cells = [row["stage"] + (" (found)" if row.get("resumed") else ""), row.get("phase") or "",
                 format_si(m.get("params")), format_si(m.get("size_bytes"), "B"), format_si(m.get("flops"))]
        cells += [format_points(m.get(k)) for k in (("map_voc07", "map_voc", "map_coco") if detection else ("top1",))]
        cells += [format_ratio(m.get(k)) for k in ("params_ratio", "size_bytes_ratio", "flops_ratio")]
        cells += [format_points(m.get(f"{metric}_drop"), signed=True), f"{seconds:.0f}"]
        table.add_row(*cells)
    return table


@app.command(rich_help_panel=PANEL_PIPELINE)
def compress(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="output folder (default: <workdir>/<name>-local)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a run: skip stages whose output exists")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole method in this process (no Prefect/Ray/MLflow) and print the checkpoint table."""
    cfg = _load(config, overrides)
    from compression.models import model_task
    from compression.pipeline import run_pipeline_in_process

    if run_dir is None and is_uri(cfg.workdir):
        raise ConfigError(f"workdir {cfg.workdir}: this command writes to a local folder; pass --run-dir")
    run_dir = run_dir or run_folder(cfg.workdir, f"{cfg.name}-local")
    say = _say(as_json)

    def report(row: dict) -> None:
        m = row["metrics"]
        what = f"{row['stage']}" + (f" {row['phase']}" if row.get("phase") else "")
        done = "found (resume)" if row.get("resumed") else f"done in {m.get('stage_seconds', 0.0):.0f}s"
        say.print(f"{what}: {done} -> {row['path']}", markup=False, highlight=False, soft_wrap=True)

    with _stdout_for(as_json):
        rows = run_pipeline_in_process(cfg, run_dir, resume=resume, on_row=report)
    if as_json:
        _print_json(rows)
        return
    task = model_task(cfg.model.name)
    table = compression_table(f"{cfg.name}: {cfg.model.name} in {run_dir} (x: base / checkpoint)", rows, task)
    console.print(table, width=max(console.width, 160))  # a log file gets the whole table, not 80 columns
    # The better of retrained and distilled on validation (the plan's choice), not simply the last stage.
    final = next((row for row in rows if row.get("final")), rows[-1])
    _plain(f"final checkpoint: {final['path']}")


# --------------------------------------------------------------------------------------------
# local stack


@app.command(rich_help_panel=PANEL_STACK)
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
        _plain(f"{service.name:8s} {service.url}  (pid {service.pid}, log {service.log})")
    _plain(f"`prunepipe run`, `serve` and `compare` started in this folder (or with --home {home}) use this stack")


@app.command(rich_help_panel=PANEL_STACK)
def down(home: HomeOpt = DEFAULT_HOME) -> None:
    """Stop what `prunepipe up` started (and nothing else)."""
    from infra.local.stack import stack_down

    for name in stack_down(home):
        _plain(f"stopped {name}")


@app.command(rich_help_panel=PANEL_STACK)
def status(home: HomeOpt = DEFAULT_HOME, as_json: JsonOpt = False) -> None:
    """Say what of the local stack runs where."""
    from dataclasses import asdict

    from infra.local.stack import stack_status

    services = stack_status(home)
    if as_json:
        _print_json([asdict(s) for s in services])
        return
    if not services:
        _plain(f"no stack recorded under {home} (start one with `prunepipe up`)")
        return
    table = Table(title=f"stack under {home}")
    for column in ("service", "url", "pid", "alive", "healthy"):
        table.add_column(column)
    for s in services:
        table.add_row(s.name, s.url, str(s.pid), str(s.alive), str(s.healthy))
    console.print(table)


# --------------------------------------------------------------------------------------------
# serve: the flow as Prefect deployments; compare: pipeline runs side by side from MLflow


@app.command(rich_help_panel=PANEL_STACK)
def serve(
    home: HomeOpt = DEFAULT_HOME,
    presets: Annotated[
        list[str] | None,
        typer.Option("--preset", "-p", metavar="PRESET|FILE",
                     help="a name in compression/configs/ or a YAML file (repeatable; default: every preset)"),
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
        _plain(f"{plan.full_name}: {plan.config.model.name} from {plan.source}; {schedule}")
    _plain(f"Prefect UI: {ui_url(api)}/deployments; runs execute in this process until Ctrl-C")
    serve_presets(planned, limit=limit)


@app.command(rich_help_panel=PANEL_INSPECT)
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
    as_json: JsonOpt = False,
) -> None:
    """Print the checkpoints of pipeline runs side by side (size, FLOPs, mAP, ratios) and plot mAP vs FLOPs."""
    from tasks.compare import compare_runs, compare_table, pareto_plot, resolve_uri, task_metric

    uri = resolve_uri(mlflow_uri, home)
    rows = compare_runs(uri, experiment, runs or [], last=last)
    _plain(f"MLflow tracking: {uri}", stderr=as_json)
    metric = task_metric(rows)
    plot = pareto_plot(rows, out, metric)
    if as_json:
        _print_json(rows)
    else:
        console.print(compare_table(rows, metric))
    _plain(f"Pareto plot ({metric} vs FLOPs): {plot}" if plot else f"no checkpoint has both FLOPs and {metric}: no plot",
           stderr=as_json)


def main() -> None:
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if "PRUNEPIPE_LOG" not in os.environ:  # PRUNEPIPE_LOG=DEBUG shows every library's lines too
        terminal.addFilter(_TerminalFilter())
    logging.basicConfig(level=os.environ.get("PRUNEPIPE_LOG", "WARNING"), handlers=[terminal])
    try:
        code = app(prog_name="prunepipe", standalone_mode=False)
    except typer.TyperException as exc:  # a bad option or argument value: one line, like every other bad input
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = exc.format_message().replace("Value error, ", "")  # pydantic's prefix on a bad choice
        err_console.print(f"error: {message}{where}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except PrunepipeError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
