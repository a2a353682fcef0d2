"""The pipeline's stages as plain functions: (checkpoint path, config) -> (checkpoint path, metrics).

Stages pass checkpoint *paths*, not models, so an orchestrator (Prefect tasks in ``tasks/``) can
cache, retry and distribute them; training is delegated to a ``Trainer`` (in-process by default,
Ray Train in the flow). Every stage's output checkpoint carries its own measurements.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from compression import metrics as M
from compression.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from compression.config import PipelineConfig, class_names
from compression.errors import StageError
from compression.jobs import LocalTrainer, Trainer, TrainJob
from compression.train import default_device, evaluate, primary_metric

log = logging.getLogger(__name__)

# Metrics compared against the pretrained base (lower is better for all but task metrics).
RATIO_KEYS = ("params", "nonzero_params", "size_bytes", "flops", "latency_b1_ms", "latency_b32_ms")


def measure(ckpt: Checkpoint, cfg: PipelineConfig, split: str = "test", latency: bool = True,
            base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, FLOPs, task metrics (and latency) of a saved checkpoint, plus ratios to ``base``."""
    from compression.data.loaders import build_loader
    from compression.models import model_input_size

    if ckpt.path is None:
        raise StageError("measure() needs a saved checkpoint (its size on disk is a metric)")
    model = ckpt.model.cpu().eval()
    size = model_input_size(model)
    result: dict[str, Any] = {
        "params": M.count_parameters(model),
        "nonzero_params": M.count_nonzero_parameters(model),
        "size_bytes": M.file_size_bytes(ckpt.path),
        "flops": M.count_flops(model, size),
    }
    loader = build_loader(cfg.data, split, train=False, image_size=size[0], seed=cfg.seed)
    names = ckpt.class_names
    started = time.perf_counter()
    task_metrics = evaluate(model, loader, ckpt.task, len(names), device=default_device(cfg.compute.use_gpu),
                            fast_ssd=cfg.compute.fast_ssd)
    result.update(task_metrics)
    result["eval_seconds"] = time.perf_counter() - started
    if latency:
        for batch in (1, 32):
            timing = M.measure_latency(model, size, batch_size=batch, runs=5 if batch == 1 else 3, warmup=2)
            result[f"latency_b{batch}_ms"] = timing["median_ms"]
    if base:
        add_ratios(result, base, ckpt.task)
    return result


def add_ratios(result: dict[str, Any], base: dict[str, Any], task: str) -> None:
    """``<key>_ratio`` = base / this for costs (so 4.0 means 4x smaller); task-metric drop in points."""
    for key in RATIO_KEYS:
        if key in result and base.get(key):
            result[f"{key}_ratio"] = base[key] / max(result[key], 1e-12)
    key = primary_metric(task)
    if key in result and key in base:
        result[f"{key}_drop"] = base[key] - result[key]


def stage_output(cfg: PipelineConfig, run_dir: Path, index: int, stage: str, phase: str | None = None) -> Path:
    name = f"{index:02d}_{stage}" + (f"_{phase}" if phase else "")
    return Path(run_dir) / f"{name}.safetensors"


def _finish(ckpt: Checkpoint, cfg: PipelineConfig, out: Path, base: dict[str, Any] | None,
            stage_seconds: float, extra_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Save, measure, and save again with the measurements inside the checkpoint's metadata."""
    save_checkpoint(ckpt, out)
    result = measure(ckpt, cfg, base=base)
    result["stage_seconds"] = stage_seconds
    if extra_metrics:
        result.update(extra_metrics)
    ckpt.metrics = result
    save_checkpoint(ckpt, out)
    result["size_bytes"] = M.file_size_bytes(out)
    return out, result


# --------------------------------------------------------------------------------------------
# Stage 1: pretrain


def pretrain(cfg: PipelineConfig, out: Path, trainer: Trainer | None = None) -> tuple[Path, dict[str, Any]]:
    """Train the base model with its original loss, or adopt ``stages.pretrain.checkpoint``."""
    from compression.data.loaders import ensure_builtin_data

    started = time.perf_counter()
    ensure_builtin_data(cfg.data)
    given = cfg.stages.pretrain.checkpoint
    if given is not None:
        base = load_checkpoint(given, expect_model=cfg.model.name)
        if base.class_names != class_names(cfg.data) and cfg.data.kind == "voc":
            raise StageError(
                f"{given}: its classes {base.class_names[:5]}... differ from the dataset's {class_names(cfg.data)[:5]}..."
            )
        ckpt = base.derive(base.model, stage="pretrain")
        ckpt.parent = str(given)
    else:
        job = TrainJob(stage="pretrain", config=cfg.model_dump(mode="json"),
                       optim=cfg.stages.pretrain.model_dump(mode="json", exclude={"checkpoint"}),
                       input_checkpoint=None, output_checkpoint=str(out))
        result = (trainer or LocalTrainer()).fit(job)
        ckpt = load_checkpoint(result.output_checkpoint)
    return _finish(ckpt, cfg, out, base=None, stage_seconds=time.perf_counter() - started)


def evaluate_checkpoint(path: Path, cfg: PipelineConfig, split: str = "test",
                        base: dict[str, Any] | None = None, latency: bool = True) -> dict[str, Any]:
    """Measure an existing checkpoint (CLI ``eval``, the flow's ``evaluate`` task)."""
    ckpt = load_checkpoint(path)
    if ckpt.model_name != cfg.model.name:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": ckpt.model_name})})
    return measure(ckpt, cfg, split=split, latency=latency, base=base)


def checkpoint_info(path: Path) -> dict[str, Any]:
    """What ``prunepipe info`` prints: metadata plus params/FLOPs/per-layer channels."""
    from compression.models import model_input_size

    meta = read_metadata(path)
    ckpt = load_checkpoint(path)
    size = model_input_size(ckpt.model)
    return {
        "path": str(path),
        "model_name": meta["model_name"],
        "model_args": meta["model_args"],
        "stage": meta.get("stage"),
        "phase": meta.get("phase"),
        "parent": meta.get("parent"),
        "classes": len(meta["class_names"]),
        "params": M.count_parameters(ckpt.model),
        "nonzero_params": M.count_nonzero_parameters(ckpt.model),
        "size_bytes": M.file_size_bytes(path),
        "flops": M.count_flops(ckpt.model, size),
        "input_size": list(size),
        "module_shapes": meta.get("module_shapes", {}),
        "metrics": meta.get("metrics", {}),
    }
