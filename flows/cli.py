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
    Path | None, typer.Option("--config", "-c", help="YAML preset: a path or a name in configs/ (default: default)")
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
