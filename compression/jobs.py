"""Training jobs: what a training stage asks a trainer to do, and the worker code that does it.

A stage never trains a model itself; it describes the work as a small, serialisable ``TrainJob``
(paths and plain dicts) and hands it to a ``Trainer``. ``LocalTrainer`` runs it in this process;
the Ray Train binding in ``tasks/`` runs the very same ``run_train_job`` inside each Ray worker,
with the model wrapped for DDP and the loader sharded. Keeping the job data-only is what lets the
same stage code run in-process, in tests and on a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compression.checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from compression.config import OptimConfig, PipelineConfig
from compression.device import ResolvedCompute, default_device, resolve_compute
from compression.errors import StageError
from compression.train import (
    EpochCallback,
    ProgressCallback,
    TrainState,
    Validation,
    evaluate,
    format_progress,
    make_objective,
    primary_metric,
    seed_everything,
    train_model,
)

log = logging.getLogger(__name__)

@dataclass
class TrainJob:
    """One training run of one stage. Only paths and JSON-able data, so it can travel to workers."""

    stage: str
    config: dict[str, Any]  # PipelineConfig.model_dump(mode="json")
    optim: dict[str, Any]  # the stage's OptimConfig fields
    input_checkpoint: str | None  # None: a freshly initialised model (pretrain)
    output_checkpoint: str
    phase: str | None = None
    sparsity_layers: list[str] = field(default_factory=list)  # sparsity stage: the phase's layers
    l1_lambda: float = 0.0  # λ of the L1 penalty over them (the seed method, l1_norm, bn_scale, random)
    group_norm_reg: float = 0.0  # or torch-pruning's GroupNormPruner regulariser over them (group_norm)
    teacher_checkpoint: str | None = None  # distill stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pipeline(self) -> PipelineConfig:
        return PipelineConfig.model_validate(self.config)

    @property
    def optim_config(self) -> OptimConfig:
        return OptimConfig.model_validate(self.optim)


@dataclass
class TrainResult:
    output_checkpoint: str
    history: list[dict[str, float]]
    # What compute.amp_bf16 / channels_last became on the training device (ResolvedCompute.as_dict()).
    precision: dict[str, Any] | None = None


class Trainer(Protocol):
    """Runs a ``TrainJob`` and returns where the trained checkpoint was written."""

    def fit(self, job: TrainJob) -> TrainResult: ...


def initial_checkpoint(cfg: PipelineConfig) -> Checkpoint:
    """A freshly initialised model of ``cfg.model`` with the dataset's classes."""
    from compression.config import class_names
    from compression.models import build_model, model_task

    names = class_names(cfg.data) if cfg.data.kind == "voc" else _classification_names(cfg)
    args: dict[str, Any] = {"num_classes": len(names) + (1 if model_task(cfg.model.name) == "detection" else 0)}
    for key in ("width_mult", "image_size", "batch_norm"):
        value = getattr(cfg.model, key)
        if value is not None:
            args[key] = value
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, **args)
    if cfg.model.weights is not None:
        load_weights(model, cfg.model.weights)
    return Checkpoint(model=model, model_name=cfg.model.name, model_args=args, class_names=names, stage="init")


def _classification_names(cfg: PipelineConfig) -> list[str]:
    from compression.data.classification import classification_class_names

    if isinstance(cfg.data.classes, list) and cfg.data.classes:
        return list(cfg.data.classes)
    from compression.data.loaders import data_root

    return classification_class_names(cfg.data.kind, data_root(cfg.data))


def build_job_objective(job: TrainJob, ckpt: Checkpoint, precision: ResolvedCompute) -> nn.Module:
    """The loss module a job trains: the task loss, or the distillation objective."""
    cfg = job.pipeline
    if job.stage == "distill":
        from compression.distill import DistillationObjective

        teacher = load_checkpoint(job.teacher_checkpoint, expect_model=ckpt.model_name)
        if teacher.class_names != ckpt.class_names:
            raise StageError(
                f"{job.teacher_checkpoint}: the teacher's classes {teacher.class_names} differ from the student's "
                f"{ckpt.class_names}"
            )
        return DistillationObjective.from_config(
            ckpt.model, teacher.model, cfg.stages.distill, model_name=ckpt.model_name,
            fast_ssd=cfg.compute.fast_ssd, amp_bf16=precision.amp_bf16, channels_last=precision.channels_last,
        )
    return make_objective(ckpt.model, ckpt.task, fast_ssd=cfg.compute.fast_ssd,
                          amp_bf16=precision.amp_bf16, channels_last=precision.channels_last)


def job_validation(job: TrainJob, ckpt: Checkpoint, device: torch.device | str,
                   precision: ResolvedCompute) -> Validation | None:
    """Pretraining's early stopping on the validation split (never the test split), if enabled."""
    pretrain = job.pipeline.stages.pretrain
    if job.stage != "pretrain" or not pretrain.early_stopping:
        return None
    from compression.data.loaders import build_loader
    from compression.models import model_input_size

    cfg = job.pipeline
    loaders: list[Any] = []  # built on the first evaluation: only rank 0 evaluates

    def evaluate_val() -> dict[str, float]:
        if not loaders:
            loaders.append(build_loader(cfg.data, "val", train=False, image_size=model_input_size(ckpt.model)[0],
                                        seed=cfg.seed))
        return evaluate(ckpt.model, loaders[0], ckpt.task, len(ckpt.class_names), device=device,
                        fast_ssd=cfg.compute.fast_ssd, progress=False, amp_bf16=precision.amp_bf16,
                        channels_last=precision.channels_last)

    return Validation(evaluate_val, primary_metric(ckpt.task), every=pretrain.eval_every, patience=pretrain.patience)


def job_extra_loss(job: TrainJob, model: nn.Module) -> Callable[[], torch.Tensor] | None:
    if not job.sparsity_layers or job.l1_lambda == 0:
        return None
    from compression.sparsity import sparsity_penalty

    return sparsity_penalty(model, list(job.sparsity_layers), job.l1_lambda)


def job_regulariser(job: TrainJob, ckpt: Checkpoint) -> AbstractContextManager[Any]:
    """While training: GroupNormPruner's regularisation gradients before every optimizer step (``group_norm``).

    Built on the model where it trains (after the move to its device), so the pruner's groups hold the very
    parameters the optimizer steps; under DDP the gradients are already averaged then, and every worker adds
    the same regularisation to them.
    """
    if not job.sparsity_layers or job.group_norm_reg == 0:
        return nullcontext()
    from compression.tp_pruners import build_pruner, regularising

    pruner = build_pruner("tp_group_norm", ckpt.model, job.sparsity_layers, model_name=ckpt.model_name,
                          reg=job.group_norm_reg)
    return regularising(pruner, ckpt.model)


def run_train_job(
    job: TrainJob,
    *,
    device: torch.device | str = "cpu",
    prepare_objective: Callable[[nn.Module], nn.Module] | None = None,
    prepare_loader: Callable[[Any], Any] | None = None,
    callbacks: Sequence[EpochCallback] = (),
    state: TrainState | None = None,
    initial_weights: dict[str, torch.Tensor] | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[Checkpoint, TrainState]:
    """The body of every training stage, in-process or inside a Ray worker.

    ``prepare_objective`` / ``prepare_loader`` let a distributed runner wrap the objective in DDP and
    shard the loader; ``initial_weights`` (a resumed worker's last epoch) replace the input weights.
    ``compute.amp_bf16`` / ``channels_last`` are resolved here, on the device that trains; the choice
    goes into the checkpoint's ``extra["precision"]`` and a first progress record (``kind`` "start").
    Returns the trained checkpoint (not yet saved) and the training state.
    """
    from compression.data.loaders import build_loader
    from compression.models import model_input_size

    cfg = job.pipeline
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(job.input_checkpoint) if job.input_checkpoint else initial_checkpoint(cfg)
    if initial_weights is not None:
        ckpt.model.load_state_dict(initial_weights)
    precision = resolve_compute(cfg.compute, device)
    context = f"stage {job.stage}" + (f", phase {job.phase}" if job.phase else "")
    start = {"kind": "start", "stage": context, "device": str(device), "precision": precision.as_dict()}
    log.info(format_progress(start))
    if on_progress is not None:
        on_progress(start)
    objective = build_job_objective(job, ckpt, precision)
    loader = build_loader(cfg.data, "train", train=True, image_size=model_input_size(ckpt.model)[0], seed=cfg.seed)
    if prepare_loader is not None:
        loader = prepare_loader(loader)
    trainable = prepare_objective(objective) if prepare_objective is not None else objective.to(device)
    optim = job.optim_config
    if job.l1_lambda:
        context += f", l1_lambda={job.l1_lambda:g}"
    if job.group_norm_reg:
        context += f", group_norm_reg={job.group_norm_reg:g}"
    with job_regulariser(job, ckpt):
        state = train_model(
            trainable, loader, optim, device=device, extra_loss=job_extra_loss(job, ckpt.model),
            callbacks=callbacks, state=state, amp_bf16=precision.amp_bf16,
            channels_last=precision.channels_last, context=context, progress=progress, seed=cfg.seed,
            validation=job_validation(job, ckpt, device, precision), on_progress=on_progress,
            log_every_steps=cfg.compute.log_every_steps,
        )
    trained = ckpt.derive(ckpt.model, stage=job.stage, phase=job.phase)
    trained.parent = job.input_checkpoint
    trained.extra["history"] = state.history
    trained.extra["precision"] = precision.as_dict()
    if state.best_epoch:
        trained.extra["early_stopping"] = {
            "metric": f"val_{primary_metric(ckpt.task)}", "best_epoch": state.best_epoch,
            "best_value": state.best_metric, "epochs_trained": state.epoch, "stopped_early": state.stopped,
        }
    return trained, state


class LocalTrainer:
    """Runs training jobs in this process (CLI ``train``, tests, benchmarks without Ray)."""

    def __init__(self, device: torch.device | str | None = None, progress: bool | None = None,
                 on_progress: ProgressCallback | None = None) -> None:
        self.device = device
        self.progress = progress
        self.on_progress = on_progress  # every progress record (compression.train logs each line at INFO too)

    def fit(self, job: TrainJob) -> TrainResult:
        device = self.device or default_device(job.pipeline.compute.use_gpu)
        trained, state = run_train_job(job, device=device, progress=self.progress, on_progress=self.on_progress)
        trained.model.to("cpu")
        save_checkpoint(trained, Path(job.output_checkpoint))
        return TrainResult(output_checkpoint=job.output_checkpoint, history=state.history,
                           precision=trained.extra["precision"])
