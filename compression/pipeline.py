"""The whole method in this process, without Prefect, Ray or MLflow: the steps of ``compression.plan``.

Each phase starts from the previous phase's retrained model. Outputs go to ``run_dir`` under the plan's
names (``NN_<stage>[_<phase>].safetensors``, the selection as ``NN_selection_<phase>.json``) plus
``config.json``, which records the settings that identify each output (``plan.stage_settings``). A run
directory that already holds checkpoints is refused unless ``resume=True``; then the stages whose output
exists are skipped, up to the first missing one (every stage after it runs again, so the lineage stays one
chain), and an existing output made with other settings is refused. Nothing here prints: the function
returns one row per checkpoint, and the row of the pipeline's answer (``plan.choose_final``) has ``final``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compression import plan as P
from compression.config import PipelineConfig
from compression.errors import StageError
from compression.files import read_selection, write_json_atomic
from compression.jobs import LocalTrainer, Trainer
from compression.measure import stored_metrics
from compression.stages import selection_metrics

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

Row = dict[str, Any]


def existing_checkpoints(run_dir: Path) -> list[str]:
    """Names of the finished checkpoints in ``run_dir`` (hidden scratch files are not counted)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.glob("*.safetensors") if not p.name.startswith("."))


def output_settings(cfg: PipelineConfig, steps: list[P.Step]) -> dict[str, Any]:
    """What ``config.json`` records: each output's identifying settings, by file name."""
    return {step.output: P.stage_settings(cfg, step.stage.name, step.phase) for step in steps}


def claim_run_dir(cfg: PipelineConfig, run_dir: Path, resume: bool, steps: list[P.Step]) -> None:
    """Refuse a run directory with checkpoints (unless resuming), or whose existing outputs were made with
    other settings; record the settings of every output."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StageError(f"{run_dir}: exists and is not a folder; pass another --run-dir")
    found = existing_checkpoints(run_dir)
    recorded_file = run_dir / CONFIG_FILE
    if found and not resume:
        raise StageError(
            f"{run_dir}: already holds {len(found)} checkpoint(s) ({found[0]}, ...); pass --resume to continue "
            "that run or another --run-dir (nothing was overwritten)"
        )
    wanted = output_settings(cfg, steps)
    if resume and recorded_file.is_file():
        try:
            recorded = json.loads(recorded_file.read_text())
        except json.JSONDecodeError:
            raise StageError(f"{recorded_file}: not valid JSON; cannot tell which settings made this run") from None
        for output, settings in wanted.items():
            before = recorded.get(output) if isinstance(recorded, dict) else None
            if (run_dir / output).exists() and before != settings:
                changed = sorted(k for k in set(before or {}) | set(settings)
                                 if (before or {}).get(k) != settings.get(k))
                raise StageError(
                    f"{run_dir}: {output} was made with other settings (differing: {', '.join(changed)}); "
                    "resume it with the same config, or use another --run-dir"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recorded_file, wanted)


def run_pipeline_in_process(cfg: PipelineConfig, run_dir: Path | str, trainer: Trainer | None = None, *,
                            resume: bool = False, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run the whole method in this process; returns ``[{stage, phase, path, metrics, resumed, final, ...}]``.

    Every check that needs no training (phases and their layers, the criterion's target, the run
    directory) happens before the first stage. ``on_row`` is called with each row as its stage finishes
    (progress for a caller that prints). A row of a checkpoint made from a selection carries the
    selection's path (``selection``), and its metrics include the selection's.
    """
    run_dir = Path(run_dir)
    steps = P.build_plan(cfg)
    claim_run_dir(cfg, run_dir, resume, steps)
    trainer = trainer or LocalTrainer()
    task = P.model_task_of(cfg)
    produced: dict[str, Path] = {}
    measured: dict[str, dict[str, Any]] = {}
    selections: dict[str, tuple[dict[str, Any], float]] = {}  # selection step -> (its metrics, seconds)
    rows: list[Row] = []
    skipping = resume
    base: dict[str, Any] | None = None

    for step in steps:
        out = run_dir / step.output
        if skipping and out.exists():
            log.info("resume: %s exists, skipping its stage", out.name)
            resumed = True
            if step.stage.kind == "selection":
                metrics = selection_metrics(read_selection(out))
            else:
                metrics = stored_metrics(out, base)
            seconds = 0.0
        else:
            skipping, resumed = False, False
            started = time.perf_counter()
            _, metrics = P.run_step(step, cfg, out, P.input_paths(step, produced), trainer=trainer,
                                    base_metrics=base)
            seconds = time.perf_counter() - started
        produced[step.name] = out
        if step.stage.name == "pretrain":
            base = metrics
        if step.stage.kind == "selection":
            selections[step.name] = (metrics, seconds)
            continue
        row: Row = {"stage": step.stage.name, "phase": step.phase.name if step.phase else None, "path": str(out),
                    "metrics": metrics, "resumed": resumed, "final": False}
        extra_seconds = 0.0
        for source in step.inputs.values():
            if source in selections:
                selected, extra_seconds = selections[source]
                row["selection"] = str(produced[source])
                row["metrics"] = {**selected, **metrics}
        if not resumed:
            # The stage's whole wall time, measurement included (bench/overhead.py compares it with the flow's).
            row["metrics"]["wall_seconds"] = seconds + extra_seconds
        measured[step.name] = row["metrics"]
        rows.append(row)
        if on_row is not None:
            on_row(row)

    final = P.choose_final(steps, measured, task)
    for row in rows:
        row["final"] = row["path"] == str(run_dir / final.output)
    return rows


__all__ = ["claim_run_dir", "existing_checkpoints", "run_pipeline_in_process"]
