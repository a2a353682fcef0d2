"""Measuring a checkpoint: size, FLOPs, task metrics on the test split (reported) and the validation split
(what every choice reads), latency, and ratios to the pretrained base.

A stage measures its output once, before writing it, and the measurements travel in the checkpoint's
metadata (``stored_metrics`` reads them back). The file's own size is the one figure known only after the
write: it is read from the file (``size_bytes``), never stored inside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from compression import metrics as M
from compression.checkpoint import Checkpoint, load_checkpoint, read_metadata
from compression.config import PipelineConfig
from compression.errors import ConfigError, DataError
from compression.train import default_device, evaluate, primary_metric

# Metrics compared against the pretrained base (lower is better for all but task metrics).
RATIO_KEYS = ("params", "nonzero_params", "size_bytes", "flops", "latency_b1_ms", "latency_b32_ms",
              "latency_ort_b32_ms", "latency_ort_net_b32_ms")


def val_key(task: str) -> str:
    """The key of the task's primary metric on the validation split (``val_map_voc07``, ``val_top1``)."""
    return f"val_{primary_metric(task)}"


def task_metrics(model, cfg: PipelineConfig, task: str, num_classes: int, split: str) -> dict[str, float]:
    """mAP (VOC07, VOC, COCO) or top-1 of ``model`` on ``split`` of the config's data."""
    from compression.data.loaders import build_loader
    from compression.models import model_input_size

    loader = build_loader(cfg.data, split, train=False, image_size=model_input_size(model)[0], seed=cfg.seed)
    return evaluate(model, loader, task, num_classes, device=default_device(cfg.compute.use_gpu),
                    fast_ssd=cfg.compute.fast_ssd)


# The score thresholds a detector's post-processing may be given when it is chosen on validation
# (export.score_threshold_max_val_drop), from the configured one up.
SCORE_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)


def above_score(predictions: list[dict], threshold: float) -> list[dict]:
    """``predictions`` with only the detections scoring above ``threshold``. For an SSD that is exactly what its
    post-processing gives with ``threshold`` when it ran with a lower one: NMS only ever suppresses a box for
    a higher-scoring one, and the per-class top-k and per-image cap keep the highest scores."""
    return [{key: value[prediction["scores"] > threshold] for key, value in prediction.items()}
            for prediction in predictions]


def choose_score_threshold(model, cfg: PipelineConfig, num_classes: int) -> dict[str, Any]:
    """The highest ``SCORE_THRESHOLDS`` entry at or above ``export.score_threshold`` whose validation mAP
    (VOC07) is at most ``export.score_threshold_max_val_drop`` below the mAP at ``export.score_threshold``.
    A weaker detector sends more low-scoring boxes through NMS: a 3x-pruned SSD spent 12 ms of 32 end to
    end (batch 32) in post-processing at 0.01 and 4.4 ms less at 0.02, for 0.2 points of validation mAP.
    One pass over the validation split, at the configured threshold, serves every candidate
    (``above_score``). Returns
    ``{"score_threshold", "val_map_voc07", "val_map_voc07_by_score_threshold": {threshold: mAP}}``."""
    from compression.data.loaders import build_loader
    from compression.metrics import voc_detection_ap
    from compression.models import apply_postprocess_settings, model_input_size
    from compression.train import predict_detections

    floor, max_drop = cfg.export.score_threshold, cfg.export.score_threshold_max_val_drop
    candidates = sorted({floor, *(t for t in SCORE_THRESHOLDS if t > floor)})
    apply_postprocess_settings(model, {"score_threshold": floor, "pre_nms_top_k": cfg.export.pre_nms_top_k})
    loader = build_loader(cfg.data, "val", train=False, image_size=model_input_size(model)[0], seed=cfg.seed)
    with torch.inference_mode():
        predictions, targets = predict_detections(model, loader, default_device(cfg.compute.use_gpu),
                                                  fast_ssd=cfg.compute.fast_ssd, progress=False)
    maps = {t: float(voc_detection_ap(above_score(predictions, t), targets, num_classes)["map_voc07"])
            for t in candidates}
    chosen = max(t for t in candidates if maps[t] >= maps[floor] - max_drop)
    return {"score_threshold": chosen, "val_map_voc07": maps[chosen], "val_map_voc07_by_score_threshold": maps}


def split_images(cfg: PipelineConfig, count: int, size: tuple[int, int], split: str = "test") -> torch.Tensor:
    """The first ``count`` images of ``split`` of the config's data at the model's input size ``size`` (height,
    width), (count, C, H, W) in [0, 1]; the split is cycled when it has fewer. Latency is timed on them rather
    than on noise. A detection split's images keep their own sizes (real VOC's vary), so each is resized to
    ``size`` as a deployment does first (bilinear, as the SSD's own resize)."""
    from compression.data.loaders import build_loader
    from compression.export import resize_to_input

    # The dataset, not the loader: no worker processes to start for a few images (measure runs per checkpoint).
    dataset = build_loader(cfg.data, split, train=False, image_size=size[0], seed=cfg.seed).dataset
    if len(dataset) == 0:
        raise DataError(f"{cfg.data.name}: the {split} split has no images to time")
    return resize_to_input([dataset[index % len(dataset)][0] for index in range(count)], size)


def measure(ckpt: Checkpoint, cfg: PipelineConfig, split: str = "test", *, latency: bool = True,
            base: dict[str, Any] | None = None, with_val: bool = False,
            val_metric: float | None = None) -> dict[str, Any]:
    """Params, FLOPs, task metrics on ``split`` (and latency) of ``ckpt``, plus ratios to ``base``.

    ``with_val``: also the primary metric on the validation split as ``val_<metric>`` (``val_metric`` when
    the caller measured that model already). ``size_bytes`` only when ``ckpt.path`` is set (a saved file).
    Latency, end to end on the split's first images at the deployment's ``export.threads``: in PyTorch eager
    at batch 1 and 32 (``latency_b{1,32}_ms``, where a user starts from), and in the CPU deployment, ONNX
    Runtime, at batch 32 (``latency_ort_b32_ms``, ``export.deployment_latency``), with its network part alone
    (``latency_ort_net_b32_ms``: what pruning fixes and what the latency table predicts) and the layout it
    ran in (``latency_ort_layout``, ``export.onnxruntime_layout``).
    """
    from compression.export import deployment_latency
    from compression.models import model_input_size

    model = ckpt.model.cpu().eval()
    size = model_input_size(model)
    result: dict[str, Any] = {
        "params": M.count_parameters(model),
        "nonzero_params": M.count_nonzero_parameters(model),
        "flops": M.count_flops(model, size),
    }
    if ckpt.path is not None:
        result["size_bytes"] = M.file_size_bytes(ckpt.path)
    started = time.perf_counter()
    result.update(task_metrics(model, cfg, ckpt.task, len(ckpt.class_names), split))
    if with_val:
        if val_metric is None:
            val_metric = task_metrics(model, cfg, ckpt.task, len(ckpt.class_names), "val")[primary_metric(ckpt.task)]
        result[val_key(ckpt.task)] = val_metric
    result["eval_seconds"] = time.perf_counter() - started
    if latency:
        images = split_images(cfg, 32, size, split)  # what post-processing costs depends on the images
        for batch in (1, 32):
            timing = M.measure_latency(model, size, batch_size=batch, runs=5 if batch == 1 else 3, warmup=2,
                                       images=images, threads=cfg.export.threads)
            result[f"latency_b{batch}_ms"] = timing["median_ms"]
        # The deployment at batch 32 only: one ONNX export per checkpoint (batch 1 is bench/speedup.py's).
        deployed = deployment_latency(model, images, 32, threads=cfg.export.threads, runs=3, warmup=1,
                                      layout=cfg.export.onnxruntime_layout)
        result["latency_ort_b32_ms"] = deployed["median_ms"]
        result["latency_ort_net_b32_ms"] = deployed["network_ms"]
        result["latency_ort_layout"] = deployed["layout"]
    if base:
        add_ratios(result, base, ckpt.task)
    return result


def add_ratios(result: dict[str, Any], base: dict[str, Any], task: str) -> None:
    """``<key>_ratio`` = base / this for costs (so 4.0 means 4x smaller); task-metric drops (test and
    validation) as fractions: ``<metric>_drop``, ``val_<metric>_drop``."""
    for key in RATIO_KEYS:
        if key in result and base.get(key):
            result[f"{key}_ratio"] = base[key] / max(result[key], 1e-12)
    for key in (primary_metric(task), val_key(task)):
        if result.get(key) is not None and base.get(key) is not None:
            result[f"{key}_drop"] = base[key] - result[key]


def stored_metrics(path: Path, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The measurements a stage stored in its checkpoint, with the file's size (and its ratio to ``base``)."""
    meta = read_metadata(path)
    metrics = dict(meta.get("metrics") or {})
    metrics["size_bytes"] = M.file_size_bytes(path)
    if base and base.get("size_bytes"):
        metrics["size_bytes_ratio"] = base["size_bytes"] / max(metrics["size_bytes"], 1)
    return metrics


def evaluate_checkpoint(path: Path, cfg: PipelineConfig, split: str = "test",
                        base: dict[str, Any] | None = None, latency: bool = True) -> dict[str, Any]:
    """Measure an existing checkpoint on ``split`` (CLI ``eval``)."""
    ckpt = load_checkpoint(path)
    needs = "voc" if ckpt.task == "detection" else "cifar10 or imagefolder"
    if (ckpt.task == "detection") != (cfg.data.kind == "voc"):  # the model is the checkpoint's, the data the config's
        raise ConfigError(
            f"{path}: holds a {ckpt.task} model ({ckpt.model_name!r}) that needs data.kind {needs}, "
            f"but the config's data.kind is {cfg.data.kind!r}"
        )
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
