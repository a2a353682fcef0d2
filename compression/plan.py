"""The pipeline as data: which stages run, in which order, what each reads and writes, what identifies it.

    pretrain
    for each phase (criterion seed / l1_norm / bn_scale / random / group_norm):
        [remove_layers ->] sparsity -> selection -> prune -> retrain
    for each phase (criterion taylor):
        [remove_layers ->] taylor -> retrain
    distill (if enabled; the teacher is the pretrained model)

``build_plan(cfg)`` returns that sequence as ``Step`` s: the stage (its function in ``compression.stages``,
its output kind, the config sections its output depends on), the phase, the output's name
(``NN_<stage>[_<phase>]``) and the earlier outputs it reads. Every runner executes the same steps with
``run_step``: the in-process pipeline (``compression.pipeline``), the Prefect flow (``flows/compress.py``)
and the budget trials (``flows/budget.py``), so a stage or criterion added here runs everywhere.
``stage_settings`` says which settings identify a stage's output (cache keys, Ray run names, resume), and
``choose_final`` which checkpoint is the pipeline's answer (on the validation split).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from compression import stages as S
from compression.checks import check_method_config
from compression.config import PhaseConfig, PipelineConfig
from compression.jobs import Trainer
from compression.measure import val_key
from compression.train import primary_metric

log = logging.getLogger(__name__)

# Top-level settings that never change what a stage computes.
NEUTRAL_SETTINGS = ("name", "workdir", "tracking")
# compute.* keys that say where a stage runs, not what it computes.
INFRA_COMPUTE_KEYS = ("ray_address", "storage_path", "max_failures", "gpus_per_worker")
# The latency table's settings: only a selection (with a latency target) reads them. The post-processing
# settings (export.score_threshold, export.pre_nms_top_k) reach every measured checkpoint and stay.
LATENCY_TABLE_KEYS = ("batch_size", "threads", "grid_step", "latency_table")


@dataclass(frozen=True)
class Stage:
    """One kind of stage: its function, what it writes, the ``stages.<section>`` s its output depends on."""

    name: str
    function: Callable[..., tuple[Path, dict[str, Any]]]
    kind: Literal["checkpoint", "selection"]
    sections: tuple[str, ...]
    trains: bool  # hands its training to a Trainer (the flow's is Ray Train)
    against_base: bool = True  # its measurements carry ratios to the pretrained base

    @property
    def suffix(self) -> str:
        return ".safetensors" if self.kind == "checkpoint" else ".json"


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", S.pretrain, "checkpoint", ("pretrain",), trains=True, against_base=False),
    # Layer pruning: the phase's remove_layers (its identity) name its output; no stage section does.
    Stage("remove_layers", S.remove_layers, "checkpoint", (), trains=False),
    Stage("sparsity", S.induce_sparsity, "checkpoint", ("sparsity",), trains=True),
    Stage("selection", S.select_filters, "selection", ("selection",), trains=False, against_base=False),
    Stage("prune", S.prune, "checkpoint", ("selection",), trains=False),
    # Taylor fine-tunes between its steps with the stages.retrain optimiser settings.
    Stage("taylor", S.taylor_prune_stage, "checkpoint", ("selection", "retrain"), trains=False),
    Stage("retrain", S.retrain, "checkpoint", ("retrain",), trains=True),
    Stage("distill", S.distill, "checkpoint", ("distill",), trains=True),
)}


@dataclass(frozen=True)
class Step:
    """One stage of one run: ``inputs`` maps the stage function's path arguments to earlier steps' names."""

    stage: Stage
    name: str  # the output's file name without suffix, NN_<stage>[_<phase>]
    phase: PhaseConfig | None = None
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.name + self.stage.suffix

    @property
    def label(self) -> str:
        """``<stage>[-<phase>]``: task run names, log lines."""
        return self.stage.name + (f"-{self.phase.name}" if self.phase else "")


def build_plan(cfg: PipelineConfig) -> list[Step]:
    """The steps of ``cfg``'s pipeline in order; the method's settings are checked first (one-line errors)."""
    phases = check_method_config(cfg)
    steps: list[Step] = []

    def add(stage: str, phase: PhaseConfig | None = None, **inputs: str) -> str:
        name = f"{len(steps):02d}_{stage}" + (f"_{phase.name}" if phase else "")
        steps.append(Step(STAGES[stage], name, phase, dict(inputs)))
        return name

    pretrained = current = add("pretrain")
    for phase in phases:
        if phase.remove_layers:
            current = add("remove_layers", phase, input_path=current)
        if cfg.for_phase(phase).stages.selection.criterion == "taylor":
            pruned = add("taylor", phase, input_path=current)
        else:
            sparse = add("sparsity", phase, input_path=current)
            selection = add("selection", phase, input_path=sparse)
            pruned = add("prune", phase, input_path=sparse, selection_path=selection)
        current = add("retrain", phase, input_path=pruned)
    if cfg.stages.distill.enabled:
        add("distill", student_path=current, teacher_path=pretrained)
    return steps


def stage_settings(cfg: PipelineConfig, stage: str, phase: PhaseConfig | None = None) -> dict[str, Any]:
    """The settings that identify ``stage``'s output, besides its input files.

    The config (with ``phase``'s own λ / γ / ratios applied) minus what cannot change the output: the
    run's name, workdir and tracking, where it runs (``INFRA_COMPUTE_KEYS``), the phase list, every
    stage section but the stage's own (an earlier stage's settings reach it through its input files), and
    outside the selection the latency table's settings (``LATENCY_TABLE_KEYS``).
    Used by the flow's cache keys, the Ray Train run names and the in-process pipeline's resume.
    """
    data = cfg.for_phase(phase).model_dump(mode="json")
    for key in NEUTRAL_SETTINGS:
        data.pop(key, None)
    for key in INFRA_COMPUTE_KEYS:
        data["compute"].pop(key, None)
    if stage != "selection":
        for key in LATENCY_TABLE_KEYS:
            data["export"].pop(key, None)
    sections = STAGES[stage].sections if stage in STAGES else ()
    data["stages"] = {name: section for name, section in data["stages"].items() if name in sections}
    # The phase's own λ / γ / ratios reached the stage sections above (for_phase); what else of it names the
    # output is which layers it prunes. (Its whole dump made a budget trial's selection knob on a phase
    # redo the sparsity stage that the trials of one λ share.)
    data["phase"] = phase.identity() if phase is not None else None
    if stage == "sparsity":  # it trains with GroupNormPruner's regulariser for group_norm, with L1 otherwise
        criterion = cfg.for_phase(phase).stages.selection.criterion
        data["regulariser"] = "group_norm" if criterion == "group_norm" else "l1"
    return data


def run_step(step: Step, cfg: PipelineConfig, out: Path, inputs: Mapping[str, Path | str], *,
             trainer: Trainer | None = None, base_metrics: dict[str, Any] | None = None,
             logger: logging.Logger | logging.LoggerAdapter | None = None) -> tuple[Path, dict[str, Any]]:
    """Run one step: ``inputs`` holds the paths of the earlier outputs it reads (``input_paths``).

    Logs a line when the stage starts and one when it ends, with its key figures (``logger``: the
    flow passes Prefect's run logger).
    """
    logger = logger or log
    stage = step.stage
    kwargs: dict[str, Any] = {arg: Path(path) for arg, path in inputs.items()}
    if step.phase is not None:
        kwargs["phase"] = step.phase
    if stage.trains:
        kwargs["trainer"] = trainer
    if stage.against_base:
        kwargs["base_metrics"] = base_metrics
    logger.info("stage %s started -> %s", step.label, Path(out).name)
    started = time.perf_counter()
    path, metrics = stage.function(cfg=cfg, out=Path(out), **kwargs)
    logger.info("stage %s done in %.1fs: %s", step.label, time.perf_counter() - started,
                key_figures(metrics, model_task_of(cfg)))
    return path, metrics


def input_paths(step: Step, produced: Mapping[str, Path | str]) -> dict[str, str]:
    """The paths ``step`` reads, by argument name, from the outputs so far (``produced``: by step name)."""
    return {arg: str(produced[source]) for arg, source in step.inputs.items()}


def key_figures(metrics: Mapping[str, Any], task: str) -> str:
    """``params 1.2M (3.10x), FLOPs 4.50x, val map_voc07 0.812, test map_voc07 0.805`` from what is there."""
    parts = []
    if metrics.get("params") is not None:
        ratio = metrics.get("params_ratio")
        parts.append(f"params {metrics['params']:,}" + (f" ({ratio:.2f}x)" if ratio else ""))
    if metrics.get("flops_ratio") is not None:
        parts.append(f"FLOPs {metrics['flops_ratio']:.2f}x")
    if metrics.get("filters_removed_total") is not None:
        parts.append(f"{metrics['filters_removed_total']} filters removed ({metrics.get('removed_fraction', 0):.1%})")
    key = primary_metric(task)
    for shown, value in ((f"val {key}", metrics.get(val_key(task))), (f"test {key}", metrics.get(key))):
        if value is not None:
            parts.append(f"{shown} {value:.4f}")
    return ", ".join(parts) or "no measurements"


def model_task_of(cfg: PipelineConfig) -> str:
    from compression.models import model_task

    return model_task(cfg.model.name)


def choose_final(steps: Sequence[Step], metrics: Mapping[str, Mapping[str, Any]], task: str) -> Step:
    """The pipeline's answer: the distilled model, unless the model it was distilled from scores higher on
    the validation split (``val_<metric>``; the test split is only reported). ``metrics``: by step name."""
    last = steps[-1]
    if last.stage.name != "distill":
        return last
    student = next(step for step in steps if step.name == last.inputs["student_path"])
    key = val_key(task)
    distilled, retrained = metrics[last.name].get(key), metrics[student.name].get(key)
    if distilled is None or (retrained is not None and retrained > distilled):
        return student
    return last
