"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # git-ignored: inputs of the later benchmarks


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def portable(value: Any, roots: tuple[Path | str, ...] = (ROOT,)) -> Any:
    """``value`` (a result, nested) with no machine's paths in it: paths in a checkout (``roots``) become
    relative to it, paths in a scratch folder under the temp dir relative to that folder."""
    if isinstance(value, dict):
        return {key: portable(item, roots) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable(item, roots) for item in value]
    if not isinstance(value, str):
        return value
    for root in roots:
        value = value.replace(f"{str(root).rstrip('/')}/", "")
    return re.sub(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[^/\s`'\"]+/", "", value)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    payload = portable(payload)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    """"mean ± sample standard deviation" of the values given (``None`` skipped), each times ``scale``."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    mean, spread = mean_and_sd(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def markdown_rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    """A markdown table of ``rows`` (dicts) in ``columns``: floats to 4 significant digits, missing cells empty."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows)]


@contextmanager
def plot(path: Path, *, xlabel: str, ylabel: str, title: str, size: tuple[float, float] = (6.4, 4.2),
         dpi: int = 90) -> Iterator[Any]:
    """One set of axes, drawn headless: the caller plots on it, and it is labelled, gridded, given a legend
    and saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
