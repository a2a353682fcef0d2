"""The whole method in this process, without Prefect, Ray or MLflow: pretrain, prune phase by phase, distill.

``run_pipeline_in_process`` chains the stage functions of ``compression.stages``::

    pretrain -> for each phase: induce_sparsity -> select_filters -> prune -> retrain
                (criterion taylor: taylor_prune_stage -> retrain)
             -> distill (if enabled; the teacher is the pretrained model)

Each phase starts from the previous phase's retrained model. Outputs go to ``run_dir`` as
``NN_<stage>[_<phase>].safetensors`` (the selection as ``NN_selection_<phase>.json`` next to them) plus
``config.json``. A run directory that already holds checkpoints is refused unless ``resume=True``; then the
stages whose output exists are skipped, up to the first missing one (every stage after it runs again, so
the lineage stays one chain). Nothing here prints: the function returns one row per checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compression import stages as S
from compression.checkpoint import read_metadata
from compression.config import PhaseConfig, PipelineConfig
from compression.errors import StageError
from compression.jobs import LocalTrainer, Trainer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Settings that do not change what a run computes (a resumed run may differ in these).
_NEUTRAL_KEYS = ("name", "workdir", "tracking")

Row = dict[str, Any]


def _run_settings(cfg: PipelineConfig) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    for key in _NEUTRAL_KEYS:
        data.pop(key, None)
    return data


def existing_checkpoints(run_dir: Path) -> list[str]:
    """Names of the finished checkpoints in ``run_dir`` (hidden scratch files are not counted)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.glob("*.safetensors") if not p.name.startswith("."))


def claim_run_dir(cfg: PipelineConfig, run_dir: Path, resume: bool) -> None:
    """Refuse a run directory with checkpoints (unless resuming the same settings); record the config."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StageError(f"{run_dir}: exists and is not a folder; pass another --run-dir")
    found = existing_checkpoints(run_dir)
    recorded = run_dir / CONFIG_FILE
    if found and not resume:
        raise StageError(
            f"{run_dir}: already holds {len(found)} checkpoint(s) ({found[0]}, ...); pass --resume to continue "
            "that run or another --run-dir (nothing was overwritten)"
        )
    if resume and recorded.is_file():
        try:
            previous = json.loads(recorded.read_text())
        except json.JSONDecodeError:
            raise StageError(f"{recorded}: not valid JSON; cannot tell which settings made this run") from None
        if previous != _run_settings(cfg):
            changed = sorted(k for k in set(previous) | set(_run_settings(cfg))
                             if previous.get(k) != _run_settings(cfg).get(k))
            raise StageError(
                f"{run_dir}: was made with other settings (differing section(s): {', '.join(changed)}); "
                "resume it with the same config, or use another --run-dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    S._write_json_atomic(recorded, _run_settings(cfg))


class _Chain:
    """Runs stages in order, skipping (on resume) those whose output exists until the first that does not."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, resume: bool, on_row: Callable[[Row], None] | None):
        self.cfg, self.run_dir, self.on_row = cfg, run_dir, on_row
        self.skipping = resume
        self.index = 0
        self.rows: list[Row] = []

    def output(self, stage: str, phase: PhaseConfig | None = None, suffix: str = ".safetensors") -> Path:
        path = S.stage_output(self.cfg, self.run_dir, self.index, stage, phase.name if phase else None)
        self.index += 1
        return path.with_suffix(suffix)

    def reuse(self, out: Path) -> bool:
        if self.skipping and out.exists():
            log.info("resume: %s exists, skipping its stage", out.name)
            return True
        self.skipping = False
        return False

    def checkpoint(self, stage: str, phase: PhaseConfig | None, out: Path,
                   produce: Callable[[], tuple[Path, dict[str, Any]]], **row_extra: Any) -> Row:
        if self.reuse(out):
            metrics, resumed = dict(read_metadata(out).get("metrics", {})), True
            metrics.update(row_extra.pop("metrics", {}))
        else:
            started = time.perf_counter()
            _, produced = produce()
            # The stage's whole wall time, measurement included (bench/overhead.py compares it with the flow's).
            produced["wall_seconds"] = time.perf_counter() - started + row_extra.pop("extra_seconds", 0.0)
            metrics, resumed = {**row_extra.pop("metrics", {}), **produced}, False
        row_extra.pop("extra_seconds", None)
        row = {"stage": stage, "phase": phase.name if phase else None, "path": str(out), "metrics": metrics,
               "resumed": resumed, **row_extra}
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        return row

    def selection(self, out: Path, produce: Callable[[], tuple[Path, dict[str, Any]]]) -> tuple[dict[str, Any], float]:
        """The selection's metrics and the seconds it took (0 when reused)."""
        if self.reuse(out):
            return S.selection_metrics(S.read_selection(out)), 0.0
        started = time.perf_counter()
        metrics = produce()[1]
        return metrics, time.perf_counter() - started


def run_pipeline_in_process(cfg: PipelineConfig, run_dir: Path | str, trainer: Trainer | None = None, *,
                            resume: bool = False, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run the whole method in this process; returns ``[{stage, phase, path, metrics, resumed, ...}]``.

    Every check that needs no training (phases and their layers, the criterion's target, the run
    directory) happens before the first stage. ``on_row`` is called with each row as its stage finishes
    (progress for a caller that prints). Prune rows carry the selection path and its metrics as well.
    """
    run_dir = Path(run_dir)
    phases = S.check_method_config(cfg)
    claim_run_dir(cfg, run_dir, resume)
    trainer = trainer or LocalTrainer()
    chain = _Chain(cfg, run_dir, resume, on_row)

    out = chain.output("pretrain")
    pretrained = chain.checkpoint("pretrain", None, out, lambda: S.pretrain(cfg, out, trainer=trainer))
    base = pretrained["metrics"]
    current = Path(pretrained["path"])

    for phase in phases:
        if cfg.stages.selection.criterion == "taylor":
            out = chain.output("taylor", phase)
            pruned = chain.checkpoint(
                "taylor", phase, out,
                lambda src=current, out=out, phase=phase: S.taylor_prune_stage(
                    src, cfg, out, phase=phase, trainer=trainer, base_metrics=base),
            )
        else:
            sparse_out = chain.output("sparsity", phase)
            sparse = chain.checkpoint(
                "sparsity", phase, sparse_out,
                lambda src=current, out=sparse_out, phase=phase: S.induce_sparsity(
                    src, cfg, out, phase=phase, trainer=trainer, base_metrics=base),
            )
            selection_out = chain.output("selection", phase, suffix=".json")
            selected, selection_seconds = chain.selection(
                selection_out,
                lambda src=sparse["path"], out=selection_out, phase=phase: S.select_filters(
                    Path(src), cfg, out, phase=phase, trainer=trainer),
            )
            out = chain.output("prune", phase)
            pruned = chain.checkpoint(
                "prune", phase, out,
                lambda src=sparse["path"], sel=selection_out, out=out, phase=phase: S.prune(
                    Path(src), sel, cfg, out, phase=phase, base_metrics=base),
                selection=str(selection_out), metrics=selected, extra_seconds=selection_seconds,
            )
        out = chain.output("retrain", phase)
        retrained = chain.checkpoint(
            "retrain", phase, out,
            lambda src=pruned["path"], out=out, phase=phase: S.retrain(
                Path(src), cfg, out, phase=phase, trainer=trainer, base_metrics=base),
        )
        current = Path(retrained["path"])

    if cfg.stages.distill.enabled:
        out = chain.output("distill")
        chain.checkpoint(
            "distill", None, out,
            lambda src=current, out=out: S.distill(src, Path(pretrained["path"]), cfg, out, trainer=trainer,
                                                   base_metrics=base),
        )
    return chain.rows


__all__ = ["claim_run_dir", "existing_checkpoints", "run_pipeline_in_process"]
