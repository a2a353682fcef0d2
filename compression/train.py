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
from compression.errors import StageError

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float], "TrainState"], None]


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


def default_device(use_gpu: bool = False) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise StageError("compute.use_gpu is true but no CUDA GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


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
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    seed_everything(seed + 1009 * (epoch + 1) + rank)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed + 1009 * (epoch + 1))


@dataclass
class TrainState:
    """What a resumed run needs besides the weights, and the history so far."""

    epoch: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


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
) -> TrainState:
    """Train ``objective`` for ``cfg.epochs`` epochs (resuming after ``state.epoch`` if given).

    ``extra_loss()`` is added to every step's loss (the sparsity stage's λ·Σ‖W‖₁). A loss that turns
    NaN or infinite stops training with a ``StageError`` naming the epoch and ``context``; the weights
    of the last finished epoch were already handed to the callbacks.
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
    if amp_bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("compute.amp_bf16: this CPU has no oneDNN bf16 support, bf16 runs emulated and slower than "
                    "float32; set compute.amp_bf16=false")
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp_bf16 else nullcontext()
    )

    for epoch in range(state.epoch, cfg.epochs):
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
        metrics = {f"train_{k}": v / max(1, count) for k, v in sums.items()}
        metrics["epoch"] = epoch + 1
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_seconds"] = time.perf_counter() - started
        state.epoch = epoch + 1
        state.optimizer = optimizer.state_dict()
        state.scheduler = scheduler.state_dict()
        state.history.append(metrics)
        log.info("%s epoch %d/%d loss %.4f (%.1fs)", context or "train", epoch + 1, cfg.epochs,
                 metrics.get("train_loss", float("nan")), metrics["epoch_seconds"])
        for callback in callbacks:
            callback(epoch + 1, metrics, state)
    return state


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
                       fast_ssd: bool = True, progress: bool | None = None) -> tuple[list[dict], list[dict]]:
    """Run a detector over ``loader``; returns (predictions, targets) on the CPU."""
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

                outputs = ssd_detect(model, images)
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
             device: torch.device | str = "cpu", fast_ssd: bool = True, progress: bool | None = None) -> dict[str, float]:
    """Task metrics of ``model`` on ``loader``: detection mAPs (VOC07, VOC all-point, COCO) or top-1.

    ``num_classes`` counts the classes without background.
    """
    from compression import metrics

    if task == "detection":
        predictions, targets = predict_detections(model, loader, device, fast_ssd=fast_ssd, progress=progress)
        result = metrics.evaluate_detections(predictions, targets, num_classes)
        return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    correct = total = 0
    try:
        for images, labels in loader:
            logits = model(images.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return {"top1": correct / max(1, total)}


def primary_metric(task: str) -> str:
    """The metric the pipeline optimises and reports first."""
    return "map_voc07" if task == "detection" else "top1"
