"""Model-size, cost and accuracy metrics: parameters, FLOPs, latency, VOC/COCO mAP, top-1 accuracy.

Detection inputs follow torchvision's conventions. ``predictions`` is a list with one dict per image,
``{"boxes": (N, 4) float xyxy, "scores": (N,), "labels": (N,) int64}``, and ``targets`` a list with one
dict per image, ``{"boxes": (M, 4), "labels": (M,), "difficult": (M,) bool}`` ("difficult" may be left
out: no box is difficult). Labels are 1-based (0 is the background), so class ``c`` is reported at
index ``c - 1`` of the per-class lists.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.functional.classification import multiclass_accuracy
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from compression.errors import CheckpointError, DataError

K = TypeVar("K")

__all__ = [
    "count_flops",
    "count_nonzero_parameters",
    "count_parameters",
    "coco_map",
    "evaluate_detections",
    "file_size_bytes",
    "measure_latency",
    "timed_runs_ms",
    "top1_accuracy",
    "voc_ap",
    "voc_detection_ap",
]


# ---------------------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero (e.g. after unstructured pruning)."""
    return sum(int(torch.count_nonzero(parameter.detach())) for parameter in model.parameters())


def file_size_bytes(path: str | Path) -> int:
    """Size of a file, or the summed size of all files below a directory (recursively)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    raise CheckpointError(f"{path}: no such file or directory, cannot measure its size")


# ---------------------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------------------


def _is_ssd(model: nn.Module) -> bool:
    return isinstance(model, SSD)


def _ssd_network(model: SSD, normalised_images: torch.Tensor):
    """Backbone + head of an SSD on an already resized and normalised batch (what SSD.forward runs)."""
    features = model.backbone(normalised_images)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    return model.head(list(features.values()))


def _parameter_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return parameter.device, parameter.dtype


def count_flops(model: nn.Module, input_size: tuple[int, int], in_channels: int = 3) -> int:
    """FLOPs of one forward pass at batch size 1 on an input of ``input_size`` = (height, width).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add
    (e.g. a convolution costs ``2 * Cin/groups * Cout * kH * kW * Hout * Wout``), so the result is FLOPs,
    not MACs: halve it to compare with MAC figures such as torchvision's "GFLOPS" column. Only ops with a
    registered formula count (convolutions, matmuls, attention); biases, normalisation, activations and
    pooling are free.

    For a torchvision SSD (``torchvision.models.detection.ssd.SSD``, SSDlite included) only the network
    is counted, ``model.head(list(model.backbone(x).values()))`` on a dummy already-normalised tensor of
    ``input_size`` (``ssd300_vgg16`` at 300x300: about 62.7 GFLOPs, i.e. 31.4 GMACs): the transform's
    resize/normalisation and the post-processing (box decoding, score filtering, NMS) are excluded.
    Other models are called as ``model(x)``. The model runs in eval mode under ``torch.no_grad()``; its
    training flag is restored.
    """
    device, dtype = _parameter_device_dtype(model)
    dummy = torch.zeros(1, in_channels, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if _is_ssd(model):
                _ssd_network(model, dummy)
            else:
                model(dummy)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def timing_clock(threads: int, device: str = "cpu") -> str:
    """``thread_cpu`` where the runtime computes in the calling thread (one thread on the CPU), else ``wall``."""
    return "thread_cpu" if threads == 1 and not device.startswith("cuda") else "wall"


CLOCKS: dict[str, Callable[[], float]] = {"thread_cpu": time.thread_time, "wall": time.perf_counter}


def timed_runs_ms(run: Callable[[], object], *, warmup: int, runs: int, clock: str,
                  sync: Callable[[], None] | None = None) -> list[float]:
    """``runs`` timings (ms) of ``run()`` on ``clock`` after ``warmup`` untimed calls; ``sync`` (a CUDA
    synchronise) before and after each, so that asynchronous kernels are timed, not their launch."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        if sync:
            sync()
        started = now()
        run()
        if sync:
            sync()
        times.append((now() - started) * 1000.0)
    return times


def fastest_in_alternation(calls: Mapping[K, Callable[[], object]], *, threads: int, rounds: int, runs: int,
                           warmup: int = 1) -> dict[K, float]:
    """Each call's fastest time (ms), the calls timed in alternation: ``rounds`` passes over all of them,
    ``runs`` timed runs each (after ``warmup`` untimed ones in the first pass), on ``timing_clock(threads)``
    with torch at ``threads`` threads. Load that comes and goes then weighs on every call alike, which is what
    a ratio of two of these times needs."""
    clock = timing_clock(threads)
    fastest = dict.fromkeys(calls, math.inf)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for index in range(rounds):
                for key, call in calls.items():
                    times = timed_runs_ms(call, warmup=warmup if index == 0 else 0, runs=runs, clock=clock)
                    fastest[key] = min(fastest[key], *times)
    finally:
        torch.set_num_threads(previous)
    return fastest


def fastest_in_passes(open_calls: Callable[[], Mapping[K, Callable[[], object]]], *, passes: int, threads: int,
                      rounds: int, runs: int, warmup: int = 1) -> dict[K, list[float]]:
    """``fastest_in_alternation`` repeated over ``passes`` fresh sets of calls (``open_calls()`` opens one,
    e.g. new ONNX Runtime sessions): each key's fastest time in every pass. Load that lasts a whole pass (a
    second or so) does not weigh on a large network as on a small one, so a ratio of two networks read in
    one pass can be off by a fifth; the fastest over passes is not (interference only adds time)."""
    if passes < 1:
        raise ValueError(f"timing needs at least one pass, got {passes}")
    times: dict[K, list[float]] = {}
    for _ in range(passes):
        fastest = fastest_in_alternation(open_calls(), threads=threads, rounds=rounds, runs=runs, warmup=warmup)
        for key, ms in fastest.items():
            times.setdefault(key, []).append(ms)
    return times


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int],
    batch_size: int,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    network_only: bool = False,
    in_channels: int = 3,
    images: torch.Tensor | None = None,
) -> dict:
    """Time of one forward pass of a batch, in eval mode under ``torch.inference_mode()``.

    ``images``: (N, C, H, W) in [0, 1] to time on (the first ``batch_size``, cycled when N is smaller); the
    default is uniform noise. A detector's post-processing costs what the boxes above its score threshold
    cost, and a weak detector fed noise sends several times more of them to NMS than on real images, so
    pass the data's own images where there are any. With one thread on the CPU the time is the calling
    thread's CPU time (``time.thread_time``: torch computes in that thread then), so a busy machine does not
    inflate it; otherwise the wall clock.

    For a torchvision ``SSD`` the default is end-to-end: ``model(list_of_images)`` on ``batch_size``
    images of ``input_size`` with values in [0, 1], including the model's resize, normalisation and
    post-processing (NMS); ``network_only=True`` times backbone + head on that batch fed directly (no
    resize or normalisation: the part ``count_flops`` counts). Other models are timed as ``model(x)`` and
    ``network_only`` has no effect.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (None: keep the current count); the
    previous count and the model's training flag are restored afterwards. ``warmup`` untimed runs come
    first. Returns ``{"median_ms", "p90_ms", "batch_size", "threads", "clock"}`` over ``runs`` timed runs.
    """
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"batch_size={batch_size} and runs={runs} must be >= 1, warmup={warmup} >= 0")
    device, dtype = _parameter_device_dtype(model)
    if images is not None:
        repeats = -(-batch_size // len(images))
        batch = images.repeat(repeats, 1, 1, 1)[:batch_size].to(device=device, dtype=dtype)
    else:
        generator = torch.Generator().manual_seed(0)
        batch = torch.rand(batch_size, in_channels, *input_size, generator=generator, dtype=dtype).to(device)
    if _is_ssd(model) and not network_only:
        inputs = list(batch)

        def forward():
            return model(inputs)
    elif _is_ssd(model):

        def forward():
            return _ssd_network(model, batch)
    else:

        def forward():
            return model(batch)

    previous_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        clock = timing_clock(used_threads, device.type)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        with torch.inference_mode():
            times_ms = timed_runs_ms(forward, warmup=warmup, runs=runs, clock=clock, sync=sync)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return {
        "median_ms": float(statistics.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "batch_size": batch_size,
        "threads": used_threads,
        "clock": clock,
    }


# ---------------------------------------------------------------------------------------------------------
# Detection accuracy
# ---------------------------------------------------------------------------------------------------------


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from a precision/recall curve (points in detection-score order), as in the devkit.

    ``use_07_metric=True``: VOC2007 11-point interpolation, the mean over t in {0, 0.1, ..., 1} of the
    maximum precision at recall >= t (0 where no point reaches t). The thresholds are computed as
    ``k / 10`` so that a recall of exactly 0.3 counts at t = 0.3 (``np.arange(0, 1.1, 0.1)`` in the
    Python port gives 0.30000000000000004 there and misses it).
    ``use_07_metric=False``: VOC2010+ all-point AP, the area under the curve after making precision
    monotonically non-increasing (each precision replaced by the maximum at any higher recall).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for threshold in np.arange(11) / 10:
            reached = recall >= threshold
            ap += (precision[reached].max() if reached.any() else 0.0) / 11
        return float(ap)
    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(padded_recall[1:] != padded_recall[:-1])
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def _as_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _check_detection_inputs(predictions: Sequence[dict], targets: Sequence[dict]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(
            f"{len(predictions)} predictions for {len(targets)} targets: need one of each per image"
        )


def _difficult_flags(target: dict) -> torch.Tensor:
    difficult = target.get("difficult")
    if difficult is None:
        return torch.zeros(len(target["labels"]), dtype=torch.bool)
    return torch.as_tensor(difficult, dtype=torch.bool).cpu()


def voc_detection_ap(
    predictions: Sequence[dict], targets: Sequence[dict], num_classes: int, iou_threshold: float = 0.5
) -> dict:
    """PASCAL VOC detection AP per class and its mean, following the devkit's VOCevaldet.

    For each class c in 1..num_classes: the class's detections over all images are sorted by score
    (descending, stable) and each is compared with the class's GT boxes in its image; with ``j`` the GT
    of maximum IoU (used or not, as in the devkit): IoU >= ``iou_threshold`` and ``j`` not difficult and
    not yet used -> TP (``j`` becomes used); ``j`` difficult -> ignored (neither TP nor FP); ``j`` already
    used (a duplicate) -> FP; IoU below the threshold -> FP. Recall divides by the number of
    non-difficult GT boxes, so missed difficult boxes cost nothing.

    IoU uses continuous coordinates, ``area = (x2 - x1) * (y2 - y1)``, not the devkit's integer-pixel
    ``+ 1`` convention: boxes here are float xyxy as torchvision produces them, and COCO does the same.

    Classes without any non-difficult GT have no defined AP: they are ``None`` in the per-class lists and
    left out of the means (a mean over no class is NaN).

    ``num_classes`` counts the foreground classes (labels 1..num_classes). Passing torchvision's count
    with background (one more) only appends a ``None`` for a class no GT can have.

    Returns ``{"map_voc07", "map_voc", "ap_voc07_per_class", "ap_voc_per_class"}``: 11-point (VOC2007)
    and all-point (VOC2010+) means, and per-class lists where index ``c - 1`` holds class ``c``.
    """
    _check_detection_inputs(predictions, targets)
    gt_boxes, gt_labels, gt_difficult = [], [], []
    for index, target in enumerate(targets):
        labels = torch.as_tensor(target["labels"]).cpu().long()
        boxes = torch.as_tensor(target["boxes"]).cpu().double().reshape(-1, 4)
        difficult = _difficult_flags(target)
        if not (len(labels) == len(boxes) == len(difficult)):
            raise DataError(
                f"targets[{index}]: {len(boxes)} boxes, {len(labels)} labels and {len(difficult)} difficult flags"
            )
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise DataError(f"targets[{index}]: labels {labels.tolist()} are not all in 1..{num_classes}")
        gt_boxes.append(boxes)
        gt_labels.append(labels)
        gt_difficult.append(difficult)

    # Detections of every image, flattened, with the image they came from.
    det_image = np.concatenate(
        [np.full(len(p["scores"]), i, dtype=np.int64) for i, p in enumerate(predictions)]
        + [np.zeros(0, np.int64)]
    )
    det_scores = np.concatenate([_as_numpy(p["scores"], np.float64) for p in predictions] + [np.zeros(0)])
    det_labels = np.concatenate(
        [_as_numpy(p["labels"], np.int64) for p in predictions] + [np.zeros(0, np.int64)]
    )
    det_boxes = torch.cat(
        [torch.as_tensor(p["boxes"]).cpu().double().reshape(-1, 4) for p in predictions]
        + [torch.zeros(0, 4, dtype=torch.float64)]
    )

    ap_voc07: list[float | None] = []
    ap_voc: list[float | None] = []
    for class_id in range(1, num_classes + 1):
        class_gt = [labels == class_id for labels in gt_labels]
        npos = sum(
            int((mask & ~difficult).sum()) for mask, difficult in zip(class_gt, gt_difficult, strict=True)
        )
        if npos == 0:
            ap_voc07.append(None)
            ap_voc.append(None)
            continue
        used = [torch.zeros(int(mask.sum()), dtype=torch.bool) for mask in class_gt]
        (class_dets,) = np.nonzero(det_labels == class_id)
        class_dets = class_dets[np.argsort(-det_scores[class_dets], kind="stable")]
        is_tp = []  # one entry per detection that is not ignored, in score order
        for det in class_dets:
            image = det_image[det]
            boxes = gt_boxes[image][class_gt[image]]
            if len(boxes) == 0:
                is_tp.append(False)
                continue
            ious = box_iou(det_boxes[det : det + 1], boxes)[0]
            best = int(torch.argmax(ious))
            if ious[best] < iou_threshold:
                is_tp.append(False)
            elif gt_difficult[image][class_gt[image]][best]:
                continue
            elif used[image][best]:
                is_tp.append(False)
            else:
                used[image][best] = True
                is_tp.append(True)
        tp = np.cumsum(np.asarray(is_tp, dtype=np.float64))
        fp = np.cumsum(1.0 - np.asarray(is_tp, dtype=np.float64))
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap_voc07.append(voc_ap(recall, precision, use_07_metric=True))
        ap_voc.append(voc_ap(recall, precision, use_07_metric=False))

    def mean(values: list[float | None]) -> float:
        defined = [value for value in values if value is not None]
        return float(np.mean(defined)) if defined else math.nan

    return {
        "map_voc07": mean(ap_voc07),
        "map_voc": mean(ap_voc),
        "ap_voc07_per_class": ap_voc07,
        "ap_voc_per_class": ap_voc,
    }


def coco_map(predictions: Sequence[dict], targets: Sequence[dict]) -> dict:
    """COCO-style mAP by torchmetrics' ``MeanAveragePrecision`` (pycocotools backend).

    Difficult GT boxes are passed as ``iscrowd=1``, so COCO ignores them as VOC does: they are not
    counted as misses and detections matched to them are neither TP nor FP (COCO matches a crowd box with
    IoU = intersection / detection area, and one crowd box can absorb several detections).
    Returns ``{"map_coco": mAP@[.5:.95], "map_coco_50": mAP@.5, "map_coco_75": mAP@.75}``; a value is NaN
    when no class has a non-difficult GT box (pycocotools reports -1 there).
    """
    _check_detection_inputs(predictions, targets)
    # sync_on_compute=False: the inputs are the whole split; inside DDP training (early stopping evaluates
    # on rank 0 only) torchmetrics would otherwise wait for the other ranks to gather theirs.
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False)
    metric.update(
        [
            {
                "boxes": torch.as_tensor(p["boxes"]).detach().cpu().float().reshape(-1, 4),
                "scores": torch.as_tensor(p["scores"]).detach().cpu().float(),
                "labels": torch.as_tensor(p["labels"]).detach().cpu().long(),
            }
            for p in predictions
        ],
        [
            {
                "boxes": torch.as_tensor(t["boxes"]).detach().cpu().float().reshape(-1, 4),
                "labels": torch.as_tensor(t["labels"]).detach().cpu().long(),
                "iscrowd": _difficult_flags(t).long(),
            }
            for t in targets
        ],
    )
    result = metric.compute()

    def value(key: str) -> float:
        number = float(result[key])
        return math.nan if number < 0 else number

    return {"map_coco": value("map"), "map_coco_50": value("map_50"), "map_coco_75": value("map_75")}


def evaluate_detections(predictions: Sequence[dict], targets: Sequence[dict], num_classes: int) -> dict:
    """``voc_detection_ap`` (IoU 0.5) and ``coco_map`` merged into one dict."""
    return {**voc_detection_ap(predictions, targets, num_classes), **coco_map(predictions, targets)}


# ---------------------------------------------------------------------------------------------------------
# Classification accuracy
# ---------------------------------------------------------------------------------------------------------


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` (N, num_classes) whose arg-max equals ``labels`` (N,)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"need logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    accuracy = multiclass_accuracy(
        logits.detach(), labels.detach().to(logits.device), num_classes=logits.shape[1], average="micro"
    )
    return float(accuracy)
