"""Export a checkpoint's network to ONNX for deployment, with what is needed to post-process it.

``export_onnx(checkpoint, "model.onnx")`` writes three files (detectors) or two (classifiers):

- ``model.onnx``: one input ``images``, float32 (B, 3, H, W), RGB in [0, 1] at the model's input size
  (the mean/std normalisation is inside the graph). Detectors: ``SSDNetwork(normalize_input=True)``,
  i.e. backbone + head, outputs ``bbox_regression`` (B, A, 4) and ``cls_logits`` (B, A, C) for the A
  default boxes, C counting background as class 0. Classifiers: the model itself, output ``logits``
  (B, num_classes). The batch axis is dynamic unless ``dynamic_batch=False`` (then B = 1).
- ``model.json``: class names, input size, output names and, for detectors, the box coder's weights,
  the score / NMS thresholds and the post-processing recipe in words (``POSTPROCESS_RECIPE``).
- ``model.anchors.npy`` (detectors): the (A, 4) float32 default boxes, xyxy pixels of the model's input.

The exported network is the deployment graph: every BatchNorm that reads one conv's output alone is folded
into that conv (``fold_batchnorm``, torch's ``fuse_conv_bn_eval``), and the ONNX model's metadata
(``metadata_props``) and the sidecar carry the post-processing settings the checkpoint was measured
with (``export.score_threshold``, ``export.pre_nms_top_k``). ``deployment_network`` is the same graph for
PyTorch (channels-last on the CPU). ONNX Runtime is a first-class runtime: ``onnx_session`` opens the
file in the layout its sidecar names (``ORT_LAYOUTS``: blocked NCHWc or plain NCHW, whichever ran the
network faster; a pruned network narrower than the vector block runs faster plain), ``onnx_detect`` runs it with the batched post-processing of
``ssd_fast`` (the same code PyTorch's path runs), and ``onnx_parity`` compares it with PyTorch's
``ssd_detect`` image by image over a data split.

Box decoding, scoring and NMS stay outside the graph (they are cheap, data-dependent and every runtime
has its own NMS); ``postprocess_onnx_outputs`` is the reference implementation of the recipe (numpy, and
torchvision's ``batched_nms``), checked against ``compression.ssd_fast.ssd_detect`` in tests/test_export.py.

Exporter: torch 2.14's default ``torch.onnx.export(dynamo=True)`` needs the extra package onnxscript,
cannot go below opset 18 and takes ~30x longer on these models, so the TorchScript exporter
(``dynamo=False``, opsets 11-20, deprecated but still shipped) is the default; ``exporter="dynamo"``
uses the new one where onnxscript is installed. Both give the same outputs to ~2e-5 here.
Every file is written under a temporary name and renamed into place, the ``.onnx`` last, and nothing
is overwritten: an existing output refuses the export.

``onnx_flops("model.onnx")`` counts the exported graph's FLOPs from the graph alone (ONNX shape
inference), the figure a deployment sees; for this project's models it equals ``metrics.count_flops``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.ssd import SSD

from compression.checkpoint import load_checkpoint
from compression.errors import ConfigError, ModelError
from compression.metrics import count_flops, count_parameters, file_size_bytes

__all__ = ["EXPORT_FORMATS", "ORT_LAYOUTS", "POSTPROCESS_RECIPE", "deployment_forward", "deployment_latency", "deployment_network", "deployment_speedup", "export_onnx",
           "export_paths", "exported_layout", "fastest_layout", "fold_batchnorm", "network_onnx", "onnx_detect", "onnx_flops", "onnx_parity", "onnx_session", "postprocess_onnx_outputs",
           "read_sidecar"]

EXPORT_FORMATS: tuple[str, ...] = ("onnx",)
SIDECAR_FORMAT = "prunepipe-onnx/1"
_OPSETS = {"torchscript": (11, 20), "dynamo": (18, 23)}

POSTPROCESS_RECIPE: list[str] = [
    "1. Resize each RGB image to input.height x input.width (bilinear), scale to [0, 1], NCHW float32; "
    "normalisation happens inside the graph.",
    "2. Decode bbox_regression[i] (A, 4) = (dx, dy, dw, dh) against anchors (A, 4) xyxy: with the anchor's "
    "width w, height h and centre (cx, cy) and box_coder_weights (wx, wy, ww, wh): "
    "x = cx + dx / wx * w, y = cy + dy / wy * h, W = exp(min(dw / ww, bbox_xform_clip)) * w, "
    "H = exp(min(dh / wh, bbox_xform_clip)) * h; box = (x - W/2, y - H/2, x + W/2, y + H/2), "
    "clipped to [0, width] x [0, height].",
    "3. scores = softmax(cls_logits[i], axis=-1); column 0 is background, column k is class_names[k - 1].",
    "4. For each class k >= 1: keep anchors with score > score_thresh, then the topk_candidates highest.",
    "5. NMS per class (IoU > nms_thresh suppresses the lower score) over all classes' candidates, "
    "sorted by score; keep the first detections_per_img.",
    "6. Scale boxes by (original_width / width, original_height / height) to the original image's pixels.",
]


def export_paths(out_path: Path | str) -> dict[str, Path]:
    """The files ``export_onnx`` writes for ``out_path`` (``anchors`` only for detectors)."""
    out = Path(out_path)
    return {"onnx": out, "json": out.with_suffix(".json"), "anchors": out.with_suffix(".anchors.npy")}


def _check_out(out: Path, is_detector: bool, opset: int, exporter: str) -> None:
    if out.suffix != ".onnx":
        raise ConfigError(f"{out}: ONNX exports must end in .onnx")
    if exporter not in _OPSETS:
        raise ConfigError(f"unknown exporter {exporter!r} (valid: {', '.join(_OPSETS)})")
    low, high = _OPSETS[exporter]
    if not low <= opset <= high:
        raise ConfigError(f"opset {opset} is not supported by the {exporter} exporter (valid: {low}-{high})")
    paths = export_paths(out)
    for kind, path in paths.items():
        if (kind != "anchors" or is_detector) and path.exists():
            raise ConfigError(f"{path}: already exists; pass another output path (nothing was overwritten)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: output folder does not exist")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm2d that reads one conv's output, and that nothing
    else reads, folded into that conv (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the BatchNorm becomes
    ``nn.Identity``. The outputs are the same to float rounding; FLOPs and module paths are unchanged."""
    from compression.pruning import build_dependency_graph

    folded = copy.deepcopy(model).eval()
    dg = build_dependency_graph(folded)
    names = {module: name for name, module in folded.named_modules()}
    for conv in [m for m in folded.modules() if isinstance(m, nn.Conv2d)]:
        node = dg.module2node.get(conv)
        if node is None or len(node.outputs) != 1:
            continue
        bn = node.outputs[0].module
        if not isinstance(bn, nn.BatchNorm2d) or len(dg.module2node[bn].inputs) != 1 or not bn.track_running_stats:
            continue
        _set_module(folded, names[conv], fuse_conv_bn_eval(conv, bn))
        _set_module(folded, names[bn], nn.Identity())
    return folded


def deployment_network(model: nn.Module, channels_last: bool | None = None) -> nn.Module:
    """What the deployment runs, as a PyTorch module: BatchNorm folded (``fold_batchnorm``), eval mode,
    for a detector ``SSDNetwork(normalize_input=True)`` ([0, 1] images in, (bbox_regression, cls_logits)
    out). ``channels_last`` (default: on for a CPU model) stores its weights in NHWC, oneDNN's fast layout;
    feed it channels-last batches."""
    network, _ = _network(fold_batchnorm(model))
    device = next(network.parameters()).device
    if channels_last if channels_last is not None else device.type == "cpu":
        network = network.to(memory_format=torch.channels_last)
    return network


def network_onnx(model: nn.Module, batch_size: int) -> Any:
    """The deployment network of ``model`` (``deployment_network``, NCHW) as an in-memory ONNX model at a
    fixed batch, shapes inferred: what the latency table cuts into sites and what ``deployment_latency``
    times, without writing a file."""
    import io

    import onnx

    from compression.models import model_input_size

    network = deployment_network(copy.deepcopy(model).cpu().float().eval(), channels_last=False)
    height, width = model_input_size(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.rand(batch_size, 3, height, width),), buffer, dynamo=False,
                          input_names=["images"], opset_version=17, do_constant_folding=True)
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))


def _network(model: nn.Module) -> tuple[nn.Module, list[str]]:
    if isinstance(model, SSD):
        from compression.models import SSDNetwork

        return SSDNetwork(model, normalize_input=True).eval(), ["bbox_regression", "cls_logits"]
    return model.eval(), ["logits"]


def _export(network: nn.Module, example: torch.Tensor, path: str, output_names: list[str], opset: int,
            dynamic_batch: bool, exporter: str) -> None:
    names = {"input_names": ["images"], "output_names": output_names, "opset_version": opset}
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401 - the dynamo exporter's dependency
        except ImportError:
            raise ModelError("exporter 'dynamo' needs the onnxscript package (pip install onnxscript)") from None
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        program = torch.onnx.export(network, (example,), dynamo=True, dynamic_shapes=shapes, external_data=False,
                                    verbose=False, **names)
        program.save(path)
        return
    axes = {name: {0: "batch"} for name in ["images", *output_names]} if dynamic_batch else None
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (see the module docstring): silence its notices.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        torch.onnx.export(network, (example,), path, dynamo=False, dynamic_axes=axes, do_constant_folding=True,
                          **names)


def _write_atomic(path: Path, write) -> str:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``; returns the temporary name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    write(tmp)
    return tmp


@torch.no_grad()
def export_onnx(
    checkpoint_path: Path | str,
    out_path: Path | str,
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: str = "torchscript",
    layout: str = "auto",
    threads: int = 1,
) -> dict[str, Any]:
    """Export ``checkpoint_path``'s network to ``out_path`` (.onnx) plus sidecars; returns its metrics.

    The sidecar names the ONNX Runtime layout (``ORT_LAYOUTS``) that ``onnx_session`` opens the file in:
    ``layout``, or with ``auto`` the one the checkpoint's own measurement found fastest
    (``latency_ort_layout``), else the faster of the two timed now at batch 32 and ``threads``.

    Metrics: ``onnx_size_bytes`` (the .onnx file), ``flops`` (``metrics.count_flops`` of the exported
    network at batch 1), ``onnx_flops`` (``onnx_flops`` of the written graph, batch 1), ``params``, ``checkpoint_size_bytes``, ``input_name``, ``input_shape``
    (``["batch", 3, H, W]``), ``output_names``, ``opset``, ``exporter`` and the written ``files``.
    Raises ``CheckpointError`` for a bad checkpoint (a pickle included) and ``ConfigError`` for an
    existing output or an unsupported opset; nothing is written then.
    """
    import onnx

    out = Path(out_path)
    ckpt = load_checkpoint(checkpoint_path)
    model = ckpt.model.cpu().float().eval()
    is_detector = isinstance(model, SSD)
    _check_out(out, is_detector, opset, exporter)

    from compression.models import model_input_size, ssd_default_boxes

    height, width = model_input_size(model)
    runtime = {"layout": layout, "chosen_by": "export argument"}
    if layout == "auto" and ckpt.metrics.get("latency_ort_layout") in ORT_LAYOUTS:
        runtime = {"layout": ckpt.metrics["latency_ort_layout"], "chosen_by": "the checkpoint's latency measurement"}
    elif layout == "auto":
        batch = torch.rand(32, 3, height, width, generator=torch.Generator().manual_seed(0))
        fastest, times = fastest_layout(network_onnx(model, 32).SerializeToString(), {"images": batch.numpy()},
                                        threads)
        runtime = {"layout": fastest, "chosen_by": "timed at export", "batch_size": 32, "threads": threads,
                   "network_ms": times}
    _check_layout(runtime["layout"])
    network, output_names = _network(fold_batchnorm(model))
    example = torch.rand(2 if dynamic_batch else 1, 3, height, width, generator=torch.Generator().manual_seed(0))
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "task": ckpt.task,
        "model_name": ckpt.model_name,
        "checkpoint": str(checkpoint_path),
        "class_names": list(ckpt.class_names),
        "input": {"name": "images", "shape": ["batch" if dynamic_batch else 1, 3, height, width],
                  "dtype": "float32", "height": height, "width": width,
                  "values": "RGB in [0, 1]; mean/std normalisation is inside the graph"},
        "outputs": output_names,
        "opset": opset,
        "onnxruntime": runtime,
    }
    paths = export_paths(out)
    written = {"onnx": paths["onnx"], "json": paths["json"]}
    if is_detector:
        anchors = ssd_default_boxes(model).to(torch.float32).numpy()
        written["anchors"] = paths["anchors"]
        sidecar["detection"] = {
            "anchors_file": paths["anchors"].name,
            "num_anchors": int(anchors.shape[0]),
            "num_classes_with_background": len(ckpt.class_names) + 1,
            "box_coder_weights": [float(w) for w in model.box_coder.weights],
            "bbox_xform_clip": float(model.box_coder.bbox_xform_clip),
            # What the checkpoint was measured with (export.score_threshold / export.pre_nms_top_k).
            "score_thresh": float(model.score_thresh),
            "nms_thresh": float(model.nms_thresh),
            "topk_candidates": int(model.topk_candidates),
            "detections_per_img": int(model.detections_per_img),
            "postprocess": POSTPROCESS_RECIPE,
        }
    else:
        sidecar["classification"] = {"postprocess": "softmax(logits); class k is class_names[k]"}

    temporaries: dict[str, str] = {}
    try:
        temporaries["onnx"] = _write_atomic(
            out, lambda tmp: _export(network, example, tmp, output_names, opset, dynamic_batch, exporter)
        )
        _add_metadata(temporaries["onnx"], sidecar)
        onnx.checker.check_model(temporaries["onnx"], full_check=True)
        if is_detector:
            temporaries["anchors"] = _write_atomic(paths["anchors"], lambda tmp: _save_npy(tmp, anchors))
        temporaries["json"] = _write_atomic(
            paths["json"], lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n")
        )
        # The .onnx last: where it exists, its sidecars are complete.
        for kind in ("anchors", "json", "onnx"):
            if kind in temporaries:
                os.replace(temporaries.pop(kind), written[kind])
    finally:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.unlink(tmp)

    return {
        "format": "onnx",
        "onnx_size_bytes": file_size_bytes(out),
        "flops": count_flops(network, (height, width)),
        "onnx_flops": onnx_flops(out),
        "params": count_parameters(network),
        "checkpoint_size_bytes": file_size_bytes(checkpoint_path),
        "input_name": "images",
        "input_shape": sidecar["input"]["shape"],
        "output_names": output_names,
        "opset": opset,
        "exporter": exporter,
        "onnxruntime_layout": runtime["layout"],
        "files": {kind: str(path) for kind, path in written.items()},
    }


# Ops with a cost, as in ``metrics.count_flops`` (torch's FlopCounterMode): convolutions and matrix
# products. Normalisation (the input's Sub/Div, SSD's L2Norm as ReduceL2/Div/Mul), activations, pooling
# and bias additions are free in both counts, so the two agree exactly on these graphs.
_COUNTED_OPS = ("Conv", "Gemm", "MatMul")


def onnx_flops(onnx_path: Path | str) -> int:
    """FLOPs of one forward pass at batch 1 of the ONNX graph in ``onnx_path``, 2 per multiply-add.

    Counted from the graph alone: the input's symbolic (batch) dimensions are set to 1, shapes come from
    ``onnx.shape_inference.infer_shapes`` and each ``Conv`` costs ``2 * prod(output) * Cin/groups * kH *
    kW``, each ``Gemm`` ``2 * M * N * K`` and each ``MatMul`` ``2 * prod(output) * K``; every other op is
    free, as in ``metrics.count_flops``. Raises ``ModelError`` when a counted op's shape stays unknown.
    """
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        for dim in graph_input.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1  # the dynamic batch axis: count one sample, as count_flops does
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes: dict[str, list[int | None]] = {tensor.name: list(tensor.dims) for tensor in inferred.initializer}
    for info in [*inferred.input, *inferred.value_info, *inferred.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [dim.dim_value if dim.HasField("dim_value") else None
                                 for dim in info.type.tensor_type.shape.dim]

    def shape(node: onnx.NodeProto, name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise ModelError(f"{path}: {node.op_type} node {node.name or '?'} has no static shape for {name!r}, "
                             "so its FLOPs cannot be counted")
        return dims  # type: ignore[return-value]

    macs = 0
    for node in inferred.node:
        if node.op_type not in _COUNTED_OPS:
            continue
        out = math.prod(shape(node, node.output[0]))
        if node.op_type == "Conv":
            # weight (Cout, Cin/groups, kH, kW): each output element is Cin/groups * kH * kW multiply-adds.
            macs += out * math.prod(shape(node, node.input[1])[1:])
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = shape(node, node.input[0])
            macs += out * a[0 if trans_a else 1]
        else:  # MatMul, numpy semantics: K is A's last axis (broadcast batch axes are in the output)
            macs += out * shape(node, node.input[0])[-1]
    return 2 * macs


def _add_metadata(path: str, sidecar: dict[str, Any]) -> None:
    """The post-processing settings as the ONNX model's own metadata (``metadata_props``), so a runtime that
    sees the .onnx alone still finds them."""
    import onnx

    model = onnx.load(path)
    props = {"prunepipe.format": SIDECAR_FORMAT, "prunepipe.model_name": str(sidecar["model_name"]),
             "prunepipe.class_names": json.dumps(sidecar["class_names"]),
             "prunepipe.onnxruntime_layout": sidecar["onnxruntime"]["layout"]}
    if "detection" in sidecar:
        det = sidecar["detection"]
        props.update({"prunepipe.score_threshold": repr(det["score_thresh"]),
                      "prunepipe.pre_nms_top_k": str(det["topk_candidates"]),
                      "prunepipe.nms_threshold": repr(det["nms_thresh"]),
                      "prunepipe.detections_per_img": str(det["detections_per_img"])})
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    # Through a file object: given a name without ".npy", np.save would append one.
    with open(path, "wb") as handle:
        np.save(handle, array)


def postprocess_onnx_outputs(
    bbox_regression: np.ndarray,
    cls_logits: np.ndarray,
    anchors: np.ndarray,
    sidecar: dict[str, Any],
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """The sidecar's recipe (``POSTPROCESS_RECIPE``): detections per image from the ONNX outputs.

    ``bbox_regression`` (B, A, 4), ``cls_logits`` (B, A, C), ``anchors`` (A, 4) from the .anchors.npy,
    ``sidecar`` the parsed .json; ``original_sizes`` each image's (height, width) (default: the model's
    input size). Returns per image ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,) int64}``, best
    first, as torchvision's ``SSD`` in eval mode returns them.
    """
    from torchvision.ops import batched_nms

    det = sidecar["detection"]
    height, width = sidecar["input"]["height"], sidecar["input"]["width"]
    wx, wy, ww, wh = det["box_coder_weights"]
    clip = np.float32(det["bbox_xform_clip"])
    anchors = anchors.astype(np.float32)
    anchor_w = anchors[:, 2] - anchors[:, 0]
    anchor_h = anchors[:, 3] - anchors[:, 1]
    anchor_cx = anchors[:, 0] + np.float32(0.5) * anchor_w
    anchor_cy = anchors[:, 1] + np.float32(0.5) * anchor_h
    original_sizes = list(original_sizes or [(height, width)] * len(bbox_regression))
    results = []
    for codes, logits, (orig_h, orig_w) in zip(bbox_regression, cls_logits, original_sizes, strict=True):
        codes = codes.astype(np.float32)
        cx = codes[:, 0] / np.float32(wx) * anchor_w + anchor_cx
        cy = codes[:, 1] / np.float32(wy) * anchor_h + anchor_cy
        half_w = np.float32(0.5) * np.exp(np.minimum(codes[:, 2] / np.float32(ww), clip)) * anchor_w
        half_h = np.float32(0.5) * np.exp(np.minimum(codes[:, 3] / np.float32(wh), clip)) * anchor_h
        boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
        boxes = np.clip(boxes, 0, np.array([width, height, width, height], dtype=np.float32))

        shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
        scores = np.exp(shifted)
        scores /= scores.sum(axis=1, keepdims=True)

        cand_boxes, cand_scores, cand_labels = [], [], []
        for label in range(1, scores.shape[1]):
            (above,) = np.nonzero(scores[:, label] > det["score_thresh"])
            top = above[np.argsort(-scores[above, label], kind="stable")[: det["topk_candidates"]]]
            cand_boxes.append(boxes[top])
            cand_scores.append(scores[top, label])
            cand_labels.append(np.full(len(top), label, dtype=np.int64))
        all_boxes, all_scores = np.concatenate(cand_boxes), np.concatenate(cand_scores)
        all_labels = np.concatenate(cand_labels)
        keep = batched_nms(torch.from_numpy(all_boxes), torch.from_numpy(all_scores),
                           torch.from_numpy(all_labels), det["nms_thresh"]).numpy()
        keep = keep[: det["detections_per_img"]]
        scale = np.array([orig_w / width, orig_h / height] * 2, dtype=np.float32)
        results.append({"boxes": all_boxes[keep] * scale, "scores": all_scores[keep], "labels": all_labels[keep]})
    return results



# --------------------------------------------------------------------------------------------
# ONNX Runtime


def read_sidecar(onnx_path: Path | str) -> tuple[dict[str, Any], np.ndarray | None]:
    """The parsed ``model.json`` next to ``onnx_path`` and, for a detector, its default boxes."""
    paths = export_paths(onnx_path)
    sidecar = json.loads(paths["json"].read_text())
    anchors = np.load(paths["anchors"]) if "detection" in sidecar else None
    return sidecar, anchors


# ONNX Runtime's CPU layouts: ``nchwc`` is its top optimisation level, whose layout pass reorders convs into
# blocked NCHWc (channels padded to the vector block: 16 floats with AVX-512); ``nchw`` is the level below,
# every fusion but that pass. Wide layers run faster blocked; layers narrower than a block pay for the
# padding, so a network pruned far enough runs faster plain (BENCHMARKS.md, the latency budget).
ORT_LAYOUTS: tuple[str, ...] = ("nchwc", "nchw")


def layouts_of(setting: str) -> tuple[str, ...]:
    """The layouts ``export.onnxruntime_layout`` may deploy in: ``auto``, every one; otherwise the one named."""
    return ORT_LAYOUTS if setting == "auto" else (setting,)


def _check_layout(layout: str) -> str:
    if layout not in ORT_LAYOUTS:
        raise ConfigError(f"ONNX Runtime layout {layout!r} is not one of {', '.join(ORT_LAYOUTS)}")
    return layout


def exported_layout(onnx_path: Path | str) -> str:
    """The layout an export recorded as fastest (its sidecar's ``onnxruntime.layout``); ``nchwc`` when none."""
    json_path = export_paths(onnx_path)["json"]
    if json_path.is_file():
        layout = json.loads(json_path.read_text()).get("onnxruntime", {}).get("layout", ORT_LAYOUTS[0])
        return _check_layout(layout)
    return ORT_LAYOUTS[0]


def onnx_session(onnx_path: Path | str | bytes, threads: int = 1, layout: str | None = None):
    """An ONNX Runtime CPU session of ``onnx_path`` (or a serialised model) in ``layout`` (``ORT_LAYOUTS``;
    default: what the export's sidecar recorded, else ``nchwc``), ``threads`` intra-op threads and one
    inter-op thread."""
    import onnxruntime as ort

    if layout is None:
        layout = ORT_LAYOUTS[0] if isinstance(onnx_path, bytes) else exported_layout(onnx_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if _check_layout(layout) == "nchwc"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@dataclass
class _SidecarPostprocess:
    """The attributes of an SSD that ``ssd_fast.postprocess_batched`` reads, from an export's sidecar."""

    box_coder: BoxCoder
    score_thresh: float
    topk_candidates: int
    nms_thresh: float
    detections_per_img: int

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> _SidecarPostprocess:
        det = sidecar["detection"]
        return cls(BoxCoder(tuple(det["box_coder_weights"]), det["bbox_xform_clip"]), det["score_thresh"],
                   det["topk_candidates"], det["nms_thresh"], det["detections_per_img"])


def resize_to_input(images: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """A deployment's first step: each (3, H, W) image in [0, 1], whatever its size, resized to the network's
    input ``size`` (height, width) as the SSD resizes (bilinear), stacked into one float batch."""
    import torch.nn.functional as F

    return torch.stack([image.float() if tuple(image.shape[-2:]) == tuple(size) else
                        F.interpolate(image.float()[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
                        for image in images])


def onnx_detect(session, sidecar: dict[str, Any], anchors: np.ndarray, images: torch.Tensor,
                original_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Detections of an exported SSD in ONNX Runtime: ``images`` (B, 3, H, W) in [0, 1] at the model's input
    size; the post-processing is ``ssd_fast.postprocess_batched`` with the sidecar's settings (the code
    PyTorch's ``ssd_detect`` runs). Boxes in ``original_sizes`` pixels (default: the input size)."""
    from compression.ssd_fast import postprocess_batched

    size = (sidecar["input"]["height"], sidecar["input"]["width"])
    boxes, logits = session.run(None, {"images": np.ascontiguousarray(images.numpy(), dtype=np.float32)})
    outputs = {"bbox_regression": torch.from_numpy(boxes), "cls_logits": torch.from_numpy(logits)}
    return postprocess_batched(_SidecarPostprocess.from_sidecar(sidecar), outputs, torch.from_numpy(anchors), size,
                               list(original_sizes or [size] * images.shape[0]))


def fastest_layout(model_bytes: bytes, feed: dict[str, np.ndarray], threads: int = 1, *, rounds: int = 3,
                   runs: int = 2) -> tuple[str, dict[str, float]]:
    """The ``ORT_LAYOUTS`` entry that runs the serialised model fastest on ``feed`` here, and each layout's
    fastest time (ms). The layouts are timed in alternation (``rounds`` x ``runs`` runs each, after one warm
    run) on the clock ``metrics.timing_clock`` gives for ``threads``, so that load which comes and goes
    weighs on both alike."""
    from compression.metrics import fastest_in_alternation

    sessions = {layout: onnx_session(model_bytes, threads, layout) for layout in ORT_LAYOUTS}
    fastest = fastest_in_alternation({layout: (lambda s=session: s.run(None, feed)) for layout, session in sessions.items()},
                                     threads=threads, rounds=rounds, runs=runs)
    return min(fastest, key=fastest.__getitem__), fastest


def deployment_forward(model: nn.Module, batch: torch.Tensor, threads: int = 1,
                       layout: str = "auto") -> Callable[[], Any]:
    """One call of the CPU deployment path on ``batch`` ((B, 3, H, W) in [0, 1] at the model's input size):
    the deployment network in ONNX Runtime (``network_onnx`` at batch B, a session as ``onnx_session`` opens
    it) and, for a detector, ``ssd_fast``'s batched post-processing with the model's own settings, so that it
    returns what ``ssd_detect`` does (a classifier: the logits, as a numpy array). What ``onnx_detect`` runs
    on an exported file, built in memory. ``layout``: one of ``ORT_LAYOUTS``, or ``auto``, the one that runs
    this network fastest on ``batch`` (``fastest_layout``). Its ``network`` attribute runs the network part
    alone, its ``layout`` attribute names the layout."""
    from compression.ssd_fast import postprocess_batched, run_network

    model = copy.deepcopy(model).cpu().float().eval()
    batch = batch.float().contiguous()
    model_bytes = network_onnx(model, len(batch)).SerializeToString()
    feed = {"images": batch.numpy()}
    if layout == "auto":
        layout, _ = fastest_layout(model_bytes, feed, threads)
    session = onnx_session(model_bytes, threads, layout)

    def network() -> list[np.ndarray]:
        return session.run(None, feed)

    if not isinstance(model, SSD):

        def forward() -> Any:
            return network()[0]
    else:
        size = (int(batch.shape[-2]), int(batch.shape[-1]))
        sizes = [size] * len(batch)
        with torch.inference_mode():
            # The anchors depend on the input and feature map sizes alone: one image gives them.
            _, anchors = run_network(model, model.transform.normalize(batch[:1]))

        def forward() -> Any:
            boxes, logits = network()
            outputs = {"bbox_regression": torch.from_numpy(boxes), "cls_logits": torch.from_numpy(logits)}
            return postprocess_batched(model, outputs, anchors, size, sizes)

    forward.network = network  # type: ignore[attr-defined]
    forward.layout = layout  # type: ignore[attr-defined]
    return forward


def deployment_latency(model: nn.Module, images: torch.Tensor, batch_size: int, *, threads: int = 1,
                       warmup: int = 2, runs: int = 5, layout: str = "auto") -> dict[str, Any]:
    """End-to-end time of one batch in the CPU deployment runtime (``deployment_forward``).

    ``images``: (N, 3, H, W) in [0, 1] at the model's input size, the first ``batch_size`` timed (cycled when
    N is smaller): a detector's post-processing costs what its boxes above the score threshold cost, so give
    the data's own images. Clock and return as ``metrics.measure_latency``: ``{"median_ms", "p90_ms",
    "batch_size", "threads", "clock"}``, plus ``network_ms``, the network's part alone (median): what pruning
    fixes, and what the latency table predicts, and ``layout``, the ONNX Runtime layout it ran in (``auto``:
    the fastest for this network, ``fastest_layout``).
    """
    from compression.metrics import timed_runs_ms, timing_clock

    batch = images.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size]
    forward = deployment_forward(model, batch, threads, layout)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the post-processing's torch ops run at the deployment's threads too
    clock = timing_clock(threads)
    try:
        with torch.inference_mode():
            times = timed_runs_ms(forward, warmup=warmup, runs=runs, clock=clock)
            network = timed_runs_ms(forward.network, warmup=1, runs=runs, clock=clock)
    finally:
        torch.set_num_threads(previous)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "network_ms": float(np.median(network)), "batch_size": batch_size, "threads": threads, "clock": clock,
            "layout": forward.layout}


def deployment_speedup(base: nn.Module, model: nn.Module, images: torch.Tensor, batch_size: int = 32, *,
                       threads: int = 1, layout: str = "auto", rounds: int = 5, runs: int = 2,
                       passes: int = 3) -> dict[str, Any]:
    """``base``'s end-to-end deployment time over ``model``'s (``deployment_forward``: ONNX Runtime, each in
    ``layout``, ``auto`` its faster one, plus the post-processing) on the same batch of ``images``, the two
    timed in alternation (``rounds`` x ``runs`` runs each, the fastest kept) so that load which comes and goes
    weighs on both alike: two checkpoints of one network, measured minutes apart beside other work, read
    36.8 and 46.5 ms. As ``latency.network_speedup`` does, the alternation is repeated in ``passes`` fresh
    sessions and each model's fastest pass kept (some sessions run slow for their whole life). Returns ``{"ratio", "base_ms", "model_ms", "base_layout",
    "model_layout"}``."""
    from compression.metrics import fastest_in_passes

    batch = images.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size]
    models = (base, model)
    layouts = [layout, layout]

    def open_forwards() -> dict[int, Callable[[], Any]]:
        forwards = [deployment_forward(m, batch, threads, chosen) for m, chosen in zip(models, layouts, strict=True)]
        layouts[:] = [forward.layout for forward in forwards]  # chosen once, in the first pass
        return dict(enumerate(forwards))

    times = fastest_in_passes(open_forwards, passes=passes, threads=threads, rounds=rounds, runs=runs)
    base_ms, model_ms = (float(min(times[index])) for index in (0, 1))
    return {"ratio": base_ms / model_ms, "base_ms": base_ms, "model_ms": model_ms, "base_layout": layouts[0],
            "model_layout": layouts[1]}


def _match_detections(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[int, float, float]:
    """Pairs each reference detection with the same-label detection of ``ours`` nearest in (box, score):
    (unpaired count, max |box difference| px, max |score difference|) over the pairs. Nearest, not same
    position: scores within 1e-6 of each other may swap neighbours between runtimes."""
    unpaired, box_diff, score_diff = abs(len(ours["scores"]) - len(reference["scores"])), 0.0, 0.0
    boxes, scores, labels = (ours[k].numpy() for k in ("boxes", "scores", "labels"))
    for box, score, label in zip(*(reference[k].numpy() for k in ("boxes", "scores", "labels")), strict=True):
        (same,) = np.nonzero(labels == label)
        if not len(same):
            unpaired += 1
            continue
        distance = np.abs(boxes[same] - box).max(axis=1) + np.abs(scores[same] - score) * 1000
        nearest = same[int(np.argmin(distance))]
        box_diff = max(box_diff, float(np.abs(boxes[nearest] - box).max()))
        score_diff = max(score_diff, float(abs(scores[nearest] - score)))
    return unpaired, box_diff, score_diff


@torch.no_grad()
def onnx_parity(checkpoint_path: Path | str, onnx_path: Path | str, batches: Iterable[Any],
                threads: int = 1) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on real images, for a detector export of ``checkpoint_path``.

    ``batches``: (images, targets) as a detection data loader yields them (each image (3, h, w) in [0, 1]).
    PyTorch runs ``ssd_fast.ssd_detect`` on the checkpoint's model; ONNX Runtime runs ``onnx_detect`` on the
    images resized to the input size (the recipe's step 1). Returns ``images``, ``detections`` (PyTorch's),
    ``max_abs_diff_outputs`` (the raw network outputs), ``max_abs_diff_boxes`` (pixels),
    ``max_abs_diff_scores`` over paired detections, ``unpaired`` detections and ``label_mismatches`` (a
    detection whose label has no counterpart), as plain floats/ints.
    """
    from compression.models import SSDNetwork
    from compression.ssd_fast import preprocess_batch, ssd_detect

    model = load_checkpoint(checkpoint_path).model.cpu().float().eval()
    if not isinstance(model, SSD):
        raise ModelError(f"{checkpoint_path}: onnx_parity compares detectors; this is a classifier")
    sidecar, anchors = read_sidecar(onnx_path)
    session = onnx_session(onnx_path, threads)
    size = (sidecar["input"]["height"], sidecar["input"]["width"])
    result = {"images": 0, "detections": 0, "max_abs_diff_outputs": 0.0, "max_abs_diff_boxes": 0.0,
              "max_abs_diff_scores": 0.0, "unpaired": 0, "label_mismatches": 0}
    for images, _targets in batches:
        images = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
        images = [image.float() for image in images]
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        reference = ssd_detect(model, images)
        resized = resize_to_input(images, size)
        ours = onnx_detect(session, sidecar, anchors, resized, original_sizes)
        onnx_outputs = session.run(None, {"images": resized.numpy()})
        prepared, _ = preprocess_batch(model, images)
        torch_outputs = SSDNetwork(model)(prepared)
        result["max_abs_diff_outputs"] = max(result["max_abs_diff_outputs"], *(
            float(np.abs(a - b.numpy()).max()) for a, b in zip(onnx_outputs, torch_outputs, strict=True)))
        for mine, theirs in zip(ours, reference, strict=True):
            unpaired, box_diff, score_diff = _match_detections(mine, theirs)
            result["unpaired"] += unpaired
            result["label_mismatches"] += int(set(mine["labels"].tolist()) != set(theirs["labels"].tolist()))
            result["max_abs_diff_boxes"] = max(result["max_abs_diff_boxes"], box_diff)
            result["max_abs_diff_scores"] = max(result["max_abs_diff_scores"], score_diff)
            result["detections"] += len(theirs["scores"])
        result["images"] += len(images)
    return result
