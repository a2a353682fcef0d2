"""One device-agnostic training loop and the evaluation every stage uses.

Training works on an *objective*: an ``nn.Module`` whose ``forward(inputs, targets)`` returns a dict
of named loss tensors (summed into the total). Putting the loss inside a module lets a distributed
runner wrap the objective in DistributedDataParallel as it is (DDP must see the forward), and lets
distillation carry its frozen teacher and trainable adapter along. The loop knows nothing of
Ray: per-epoch results go to callbacks, and the Ray Train binding is one such callback.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.config import OptimConfig
from compression.device import default_device  # noqa: F401 - callers import it from here too
from compression.errors import StageError

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float], "TrainState"], None]
# A progress record (see ``train_model``): plain JSON-able data, so a Ray worker can send it to the driver.
ProgressCallback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# Objectives


class DetectionObjective(nn.Module):
    """SSD multibox loss of ``model`` (torchvision's, or the batched one of ``ssd_fast``)."""

    def __init__(self, model: nn.Module, fast_ssd: bool = True, amp_bf16: bool = False,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fast_ssd = fast_ssd
        self.amp_bf16 = amp_bf16
        self.channels_last = channels_last

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.fast_ssd:
            from compression.ssd_fast import ssd_forward_train

            return ssd_forward_train(self.model, images, targets, amp_bf16=self.amp_bf16,
                                     channels_last=self.channels_last)
        return self.model(images, targets)


class ClassificationObjective(nn.Module):
    """Cross-entropy of a classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cross_entropy": F.cross_entropy(self.model(images), labels)}


def make_objective(model: nn.Module, task: str, fast_ssd: bool = True, amp_bf16: bool = False,
                   channels_last: bool = False) -> nn.Module:
    if task == "detection":
        return DetectionObjective(model, fast_ssd=fast_ssd, amp_bf16=amp_bf16, channels_last=channels_last)
    return ClassificationObjective(model)


# --------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine / step (x0.1 at 2/3 and 8/9) / constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return 0.01 if progress >= 8 / 9 else 0.1 if progress >= 2 / 3 else 1.0
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_batch(batch: Any, device: torch.device, channels_last: bool = False) -> tuple[Any, Any]:
    inputs, targets = batch
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
    else:
        inputs = [img.to(device, non_blocking=True) for img in inputs]
    if isinstance(targets, torch.Tensor):
        targets = targets.to(device, non_blocking=True)
    else:
        targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
    return inputs, targets


# --------------------------------------------------------------------------------------------
# The loop


def seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Reseed the global RNGs and the loader's shuffle generator for ``epoch`` (and this DDP rank)."""
    seed_everything(seed + 1009 * (epoch + 1) + _rank())
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + 1009 * (epoch + 1))


@dataclass
class TrainState:
    """What a resumed run needs besides the weights, and the history so far.

    With validation, ``best_*`` hold the best epoch so far (its weights on the CPU) and ``stopped`` says
    early stopping ended the run (a resumed run does not train on after it).
    """

    epoch: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    stopped: bool = False


@dataclass
class Validation:
    """Early stopping: ``evaluate()`` measures the current weights on the validation split.

    ``evaluate`` runs on rank 0 only (its ``metric`` is sent to the other ranks, so every rank takes the
    same decision); it runs every ``every`` epochs and after the last one. Training stops when ``patience``
    epochs have passed since the best value (None: never stop early); the best epoch's weights are
    restored at the end either way.
    """

    evaluate: Callable[[], dict[str, float]]
    metric: str
    every: int = 1
    patience: int | None = None


def train_model(
    objective: nn.Module,
    loader: Iterable,
    cfg: OptimConfig,
    *,
    device: torch.device | str = "cpu",
    extra_loss: Callable[[], torch.Tensor] | None = None,
    callbacks: Sequence[EpochCallback] = (),
    state: TrainState | None = None,
    amp_bf16: bool = False,
    channels_last: bool = False,
    context: str = "",
    progress: bool | None = None,
    seed: int | None = None,
    validation: Validation | None = None,
    on_progress: ProgressCallback | None = None,
    log_every_steps: int = 0,
) -> TrainState:
    """Train ``objective`` for ``cfg.epochs`` epochs (resuming after ``state.epoch`` if given).

    ``extra_loss()`` is added to every step's loss (the sparsity stage's λ·Σ‖W‖₁). A loss that turns
    NaN or infinite stops training with a ``StageError`` naming the epoch and ``context``; the weights
    of the last finished epoch were already handed to the callbacks. ``validation`` adds early stopping.

    ``on_progress`` gets a record every ``log_every_steps`` steps (``kind`` "step") and after every epoch
    ("epoch": with the validation metric and the best epoch when validating): ``stage`` (``context``),
    ``epoch``/``epochs``, ``step``/``steps``, ``loss`` (the epoch's mean so far), ``images_per_s`` (all ranks),
    ``elapsed_s`` and ``eta_s`` (to the last epoch: an upper bound when early stopping may end sooner).
    """
    device = torch.device(device)
    objective.to(device)
    if channels_last:
        objective.to(memory_format=torch.channels_last)
    state = state or TrainState()
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    optimizer = make_optimizer(objective.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    show = sys.stderr.isatty() if progress is None else progress
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp_bf16 else nullcontext()
    )
    clock = _Clock(steps_per_epoch, cfg.epochs, _world_size(), validation.every if validation else 0)

    def report(record: dict[str, Any]) -> None:
        record = {"stage": context or "train", **record}
        log.info(format_progress(record))
        if on_progress is not None:
            on_progress(record)

    for epoch in range(state.epoch, cfg.epochs):
        if state.stopped:
            break
        if seed is not None:
            seed_epoch(loader, seed, epoch)
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)  # DistributedSampler: a new shuffle each epoch
        objective.train()
        sums: dict[str, float] = {}
        count = 0
        started = time.perf_counter()
        for step, batch in enumerate(_progress(loader, f"epoch {epoch + 1}/{cfg.epochs}", show)):
            inputs, targets = move_batch(batch, device, channels_last)
            with autocast:
                losses = objective(inputs, targets)
            loss = sum(losses.values())
            if extra_loss is not None:
                penalty = extra_loss()
                losses = {**losses, "penalty": penalty}
                loss = loss + penalty
            if not torch.isfinite(loss):
                where = f" ({context})" if context else ""
                # bf16 autocast with channels-last tensors on CPU has produced NaN within two steps for
                # small models (tests/conftest.py FLOAT32); each switch alone trains them fine.
                hint = ("; bf16 with channels_last on CPU can do this for small models: try "
                        "compute.channels_last=false" if amp_bf16 and channels_last and device.type == "cpu" else "")
                raise StageError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}{where}; "
                    f"the last finished epoch's checkpoint is kept{hint}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            count += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            clock.step(len(inputs))
            if log_every_steps and (step + 1) % log_every_steps == 0 and step + 1 < steps_per_epoch:
                report({"kind": "step", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1,
                        "steps": steps_per_epoch, "loss": sums["loss"] / count, **clock.rates(epoch, step + 1)})
        metrics = {f"train_{k}": v / max(1, count) for k, v in sums.items()}
        metrics["epoch"] = epoch + 1
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_seconds"] = time.perf_counter() - started
        if validation is not None and ((epoch + 1) % validation.every == 0 or epoch + 1 == cfg.epochs):
            eval_started = time.perf_counter()
            metrics.update(_validate(objective, validation, state, epoch + 1, device))
            clock.evaluated(time.perf_counter() - eval_started)
        state.epoch = epoch + 1
        state.optimizer = optimizer.state_dict()
        state.scheduler = scheduler.state_dict()
        state.history.append(metrics)
        record = {"kind": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs, "step": count, "steps": steps_per_epoch,
                  "loss": metrics.get("train_loss", float("nan")), "lr": metrics["lr"],
                  "epoch_seconds": metrics["epoch_seconds"], **clock.rates(epoch, steps_per_epoch)}
        if validation is not None and state.best_epoch and f"val_{validation.metric}" in metrics:
            record.update({"metric": validation.metric, "value": metrics.get(f"val_{validation.metric}"),
                           "best_epoch": state.best_epoch, "best": state.best_metric, "stopped": state.stopped})
        report(record)
        for callback in callbacks:
            callback(epoch + 1, metrics, state)
    if state.best_weights is not None:
        _unwrap(objective).load_state_dict(state.best_weights)
    return state


def _validate(objective: nn.Module, validation: Validation, state: TrainState, epoch: int,
              device: torch.device) -> dict[str, float]:
    """Evaluate (rank 0), agree on the value across ranks, and update the best epoch / stop flag."""
    scores = validation.evaluate() if _rank() == 0 else {}
    value = _from_rank0(scores.get(validation.metric, float("nan")), device)
    result = {f"val_{k}": float(v) for k, v in scores.items()}
    result[f"val_{validation.metric}"] = value
    if math.isfinite(value) and (state.best_metric is None or value > state.best_metric):
        state.best_metric, state.best_epoch = value, epoch
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(objective).state_dict().items()}
    elif validation.patience is not None and epoch - state.best_epoch >= validation.patience:
        state.stopped = True
    return result


def _unwrap(objective: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (its state dict has no ``module.`` prefix)."""
    return objective.module if isinstance(objective, nn.parallel.DistributedDataParallel) else objective


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (gloo sends CPU tensors, NCCL the device's)."""
    if not _distributed():
        return float(value)
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return float(tensor.item())


class _Clock:
    """Throughput and time left of a training run, for the progress records."""

    def __init__(self, steps_per_epoch: int, epochs: int, world_size: int, eval_every: int) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.world_size, self.eval_every = world_size, eval_every
        self.started = time.perf_counter()
        self.steps = self.images = 0
        self.eval_seconds = 0.0
        self.evaluations = 0

    def step(self, images: int) -> None:
        self.steps += 1
        self.images += images * self.world_size

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds += seconds
        self.evaluations += 1

    def rates(self, epoch: int, steps_done: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        training = max(1e-9, elapsed - self.eval_seconds)
        steps_left = (self.epochs - epoch - 1) * self.steps_per_epoch + self.steps_per_epoch - steps_done
        next_epoch = epoch + (2 if steps_done >= self.steps_per_epoch else 1)  # 1-based, not yet evaluated
        evals_left = sum(1 for e in range(next_epoch, self.epochs + 1)
                         if self.eval_every and (e % self.eval_every == 0 or e == self.epochs))
        eval_each = self.eval_seconds / self.evaluations if self.evaluations else 0.0
        eta = steps_left * training / max(1, self.steps) + evals_left * eval_each
        return {"images_per_s": self.images / training, "elapsed_s": elapsed, "eta_s": eta}


def format_progress(record: dict[str, Any]) -> str:
    """One line for a progress record: ``stage pretrain epoch 3/10 step 20/62: loss 2.3451, 140 img/s, ETA 2m10s``."""
    if record.get("kind") == "start":
        return f"{record.get('stage', 'train')} on {record['device']}: precision: {record['precision']['reason']}"
    where = f"{record.get('stage', 'train')} epoch {record['epoch']}/{record['epochs']}"
    if record.get("kind") == "step":
        where += f" step {record['step']}/{record['steps']}"
    parts = [f"loss {record['loss']:.4f}"]
    if record.get("metric"):
        value = record.get("value")
        shown = f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"
        parts.append(f"val {record['metric']} {shown} (best {record['best']:.4f} at epoch {record['best_epoch']})")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    if record.get("kind") == "epoch":
        parts.append(f"{record['epoch_seconds']:.1f}s")
    if record.get("stopped"):
        parts.append(f"early stop: no better validation value since epoch {record['best_epoch']}")
    else:
        parts.append(f"ETA {_duration(record['eta_s'])}")
    return f"{where}: {', '.join(parts)}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _progress(iterable: Iterable, description: str, show: bool) -> Iterable:
    if not show:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict_detections(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                       fast_ssd: bool = True, progress: bool | None = None, amp_bf16: bool = False,
                       channels_last: bool = False) -> tuple[list[dict], list[dict]]:
    """Run a detector over ``loader``; returns (predictions, targets) on the CPU.

    ``amp_bf16`` / ``channels_last`` apply to the batched path (``fast_ssd``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    show = sys.stderr.isatty() if progress is None else progress
    predictions: list[dict] = []
    targets_out: list[dict] = []
    try:
        for images, targets in _progress(loader, "evaluate", show):
            images = [img.to(device) for img in images]
            if fast_ssd:
                from compression.ssd_fast import ssd_detect

                outputs = ssd_detect(model, images, amp_bf16=amp_bf16, channels_last=channels_last)
            else:
                outputs = model(images)
            predictions.extend({k: v.detach().cpu() for k, v in out.items()} for out in outputs)
            targets_out.extend(
                {"boxes": t["boxes"].as_subclass(torch.Tensor).cpu(), "labels": t["labels"].cpu(),
                 "difficult": t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool)).cpu()}
                for t in targets
            )
    finally:
        model.train(was_training)
    return predictions, targets_out


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, task: str, num_classes: int,
             device: torch.device | str = "cpu", fast_ssd: bool = True, progress: bool | None = None,
             amp_bf16: bool = False, channels_last: bool = False) -> dict[str, float]:
    """Task metrics of ``model`` on ``loader``: detection mAPs (VOC07, VOC all-point, COCO) or top-1.

    ``num_classes`` counts the classes without background. ``amp_bf16`` / ``channels_last``: as resolved
    for training (``compression.device``); the default float32 gives numbers comparable across machines.
    """
    from compression import metrics

    if task == "detection":
        predictions, targets = predict_detections(model, loader, device, fast_ssd=fast_ssd, progress=progress,
                                                  amp_bf16=amp_bf16, channels_last=channels_last)
        result = metrics.evaluate_detections(predictions, targets, num_classes)
        return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    correct = total = 0
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_bf16)
    try:
        for images, labels in loader:
            images = images.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(images)
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return {"top1": correct / max(1, total)}


def primary_metric(task: str) -> str:
    """The metric the pipeline optimises and reports first."""
    return "map_voc07" if task == "detection" else "top1"
