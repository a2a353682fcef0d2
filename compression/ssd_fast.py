"""Batched pre-processing, loss and post-processing for torchvision ``SSD`` models.

torchvision's ``SSD.forward`` normalises and resizes every image separately, matches anchors image by
image and post-processes image by image and class by class; at batch 32 on a GPU those Python loops
cost more than the network. The functions here run the same model's ``backbone`` and ``head`` once per
batch and do everything around them as whole-batch tensor ops, reproducing torchvision's results
(see tests/test_ssd_fast.py for what is checked and to which tolerance).

Call signatures (the training loop wires the ``compute.*`` config switches, resolved for the device by
``compression.device.resolve_compute``, to the keywords)::

    precision = resolve_compute(compute, device)  # "auto" -> True/False for this device
    model = prepare_model(model, channels_last=precision.channels_last, compile=compute.compile)  # once

    losses = ssd_forward_train(model, images, targets,
                               amp_bf16=precision.amp_bf16, channels_last=precision.channels_last)
    loss = losses["bbox_regression"] + losses["classification"]        # as torchvision's SSD returns

    detections = ssd_detect(model, images,
                            amp_bf16=precision.amp_bf16, channels_last=precision.channels_last)
    # -> list of {"boxes" (N, 4) xyxy in original pixels, "scores" (N,), "labels" (N,) int64}

``images``: a float (B, 3, H, W) tensor in [0, 1] or a list of (3, H_i, W_i) tensors, on the model's
device. ``targets``: one dict per image with ``boxes`` (G_i, 4) xyxy in that image's pixels and
``labels`` (G_i,) int64; G_i may be 0. The lower-level pieces are public too: ``preprocess_batch``,
``run_network``, ``default_boxes``, ``pad_targets``, ``match_anchors``, ``ssd_loss_batched``,
``postprocess_batched``.

Deliberate differences from torchvision:
- anchors are always float32 (torchvision builds them in the features' dtype, i.e. bf16 under
  autocast) and are cached per (anchor generator, feature-map sizes, image size, device);
- the loss and the post-processing run in float32 outside autocast;
- degenerate GT boxes (x2 <= x1) are not checked here (that costs a GPU sync per step): the data
  module validates boxes when it loads them;
- when two GT boxes share the same best anchor, the higher GT index gets it (torchvision's CPU
  behaviour; on CUDA torchvision's choice is unspecified);
- NMS: ``nms="matrix"`` (the default on CUDA) runs exact greedy NMS for all (image, class) groups at
  once as a fixed-point iteration on their IoU matrices (Cluster-NMS, Zheng et al. 2021, converges to
  the greedy result); ``nms="batched_nms"`` (the default on CPU) thresholds first (its cost follows the
  boxes above ``score_thresh``, not anchors x classes), takes each (image, class)'s top-k among them as
  torchvision does, and runs torchvision's NMS image by image (one call per class for an image with many
  candidates, on contiguous slices: no per-id search). bench/gpu.py times both.
- The CPU path's softmax runs over a (B, C, A) layout, ~9x faster there than over a last axis of a few
  classes; its scores may differ from torchvision's by one float32 rounding step.
- Equal scores (a saturated softmax gives many exact 1.0s): the matrix path orders them by ``topk`` over
  all anchors, torchvision by ``topk`` over the thresholded ones; NMS may then keep different, equally
  valid boxes.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops import nms as greedy_nms

from compression.errors import DataError

__all__ = [
    "default_boxes",
    "match_anchors",
    "pad_targets",
    "postprocess_batched",
    "prepare_model",
    "preprocess_batch",
    "run_network",
    "ssd_detect",
    "ssd_forward_train",
    "ssd_loss_batched",
]

ImageBatch = Tensor | Sequence[Tensor]

# Keyed weakly by module so that a deleted model frees its cached tensors.
_ANCHORS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Tensor]] = weakref.WeakKeyDictionary()
_NORMALISE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[Tensor, Tensor]]] = (
    weakref.WeakKeyDictionary()
)
# CPU NMS: up to this many candidates in an image, one torchvision call for all its classes (its pairwise IoU
# work stays below the cost of a call per class, ~40 us each); above, one call per class.
_ONE_NMS_CALL_BOXES = 500
# Bound on the (group, k, k) IoU elements per chunk in matrix NMS (box_iou's temporaries peak ~1.2 GiB).
_NMS_CHUNK_ELEMENTS = 1 << 25


def prepare_model(model: SSD, *, channels_last: bool = False, compile: bool = False) -> SSD:
    """One-time set-up for the ``compute.channels_last`` / ``compute.compile`` switches, in place.

    ``compile`` uses ``nn.Module.compile`` on the backbone and the head, which keeps the state_dict
    keys unchanged (checkpoints stay loadable by uncompiled models).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.backbone.compile()
        model.head.compile()
    return model


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy without the stream synchronisation a pageable blocking copy implies."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _output_size(model: SSD) -> tuple[int, int]:
    """(height, width) the SSD resizes to; torchvision's ``fixed_size`` is (width, height)."""
    fixed_size = model.transform.fixed_size
    if fixed_size is None:
        raise ValueError("model.transform.fixed_size is None: not an SSD transform")
    return int(fixed_size[1]), int(fixed_size[0])


def _normalise_constants(model: SSD, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    per_model = _NORMALISE.setdefault(model.transform, {})
    key = (device, dtype)
    if key not in per_model:
        with torch.inference_mode(False):
            mean = torch.as_tensor(model.transform.image_mean, dtype=dtype).view(1, -1, 1, 1)
            std = torch.as_tensor(model.transform.image_std, dtype=dtype).view(1, -1, 1, 1)
            per_model[key] = (mean.to(device), std.to(device))
    return per_model[key]


def _normalise_and_resize(model: SSD, batch: Tensor, size: tuple[int, int]) -> Tensor:
    # Same op order as GeneralizedRCNNTransform (normalise, then resize), so results are bit-identical.
    mean, std = _normalise_constants(model, batch.device, batch.dtype)
    batch = (batch - mean) / std
    if tuple(batch.shape[-2:]) != size:
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return batch


def preprocess_batch(
    model: SSD, images: ImageBatch, *, channels_last: bool = False
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Normalise with ``model.transform``'s mean/std and resize to the SSD's fixed size, batched.

    Returns the (B, 3, H, W) network input and the original (height, width) of every image. A list of
    images of different sizes is processed in one op per distinct size.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise DataError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        image_list: list[Tensor] = []
    else:
        image_list = list(images)
        if not image_list:
            raise DataError("images: empty list")
        for index, image in enumerate(image_list):
            if image.dim() != 3:
                raise DataError(f"images[{index}]: expected a (3, H, W) tensor, got {tuple(image.shape)}")
    first = images if isinstance(images, Tensor) else image_list[0]
    if not first.is_floating_point():
        raise DataError(f"images: expected floating point values in [0, 1], got {first.dtype}")
    size = _output_size(model)

    if isinstance(images, Tensor):
        original_sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        batch = _normalise_and_resize(model, images, size)
    else:
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in image_list]
        positions_by_size: dict[tuple[int, int], list[int]] = {}
        for position, original_size in enumerate(original_sizes):
            positions_by_size.setdefault(original_size, []).append(position)
        if len(positions_by_size) == 1:
            batch = _normalise_and_resize(model, torch.stack(image_list), size)
        else:
            batch = first.new_empty((len(image_list), first.shape[0], *size))
            for positions in positions_by_size.values():
                group = torch.stack([image_list[position] for position in positions])
                index = _to_device(torch.tensor(positions), batch.device)
                batch.index_copy_(0, index, _normalise_and_resize(model, group, size))
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch, original_sizes


def default_boxes(
    model: SSD, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]], device: torch.device
) -> Tensor:
    """The (A, 4) xyxy float32 default boxes torchvision's anchor generator makes for every image."""
    per_model = _ANCHORS.setdefault(model.anchor_generator, {})
    key = (tuple(image_size), tuple(tuple(int(s) for s in fs) for fs in feature_sizes), device)
    if key not in per_model:
        # Outside inference mode so that the cached tensor can also be used where autograd records.
        with torch.inference_mode(False), torch.no_grad():
            image_list = ImageList(torch.empty((0, 0, *key[0]), device=device), [key[0]])
            feature_maps = [torch.empty((0, 0, *fs), device=device) for fs in key[1]]
            per_model[key] = model.anchor_generator(image_list, feature_maps)[0]
    return per_model[key]


def run_network(model: SSD, batch: Tensor, *, amp_bf16: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Backbone + head once for the batch; returns the head outputs and the shared (A, 4) anchors."""
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=amp_bf16):
        features = model.backbone(batch)
        feature_list = [features] if isinstance(features, Tensor) else list(features.values())
        head_outputs = model.head(feature_list)
    anchors = default_boxes(model, batch.shape[-2:], [f.shape[-2:] for f in feature_list], batch.device)
    return head_outputs, anchors


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image targets into (B, G, 4) float32 boxes, (B, G) int64 labels and a (B, G) valid mask.

    G = max(1, most boxes in an image). Padding boxes are (0, 0, 1, 1) so that encoding them stays finite;
    they never match an anchor.
    """
    if not targets:
        raise DataError("targets: empty list")
    counts = []
    for index, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise DataError(f"targets[{index}]: needs 'boxes' and 'labels'")
        boxes = target["boxes"]
        if boxes.numel() and (boxes.dim() != 2 or boxes.shape[-1] != 4):
            raise DataError(f"targets[{index}]['boxes']: expected shape (N, 4), got {tuple(boxes.shape)}")
        counts.append(boxes.numel() // 4)
    num_images, most_boxes = len(targets), max(1, max(counts))
    source = targets[0]["boxes"].device
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(torch.float32)
    labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(torch.int64)
    valid = torch.arange(most_boxes)[None, :] < torch.tensor(counts)[:, None]
    slots = _to_device(valid.flatten().nonzero().squeeze(1), source)
    padded_boxes = boxes.new_tensor([0.0, 0.0, 1.0, 1.0]).repeat(num_images * most_boxes, 1)
    padded_boxes.index_copy_(0, slots, boxes)
    padded_labels = labels.new_zeros(num_images * most_boxes).index_copy_(0, slots, labels)
    return (
        _to_device(padded_boxes.view(num_images, most_boxes, 4), device),
        _to_device(padded_labels.view(num_images, most_boxes), device),
        _to_device(valid, device),
    )


def match_anchors(model: SSD, gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor) -> Tensor:
    """(B, A) index of the matched GT per anchor, -1 for none: torchvision's ``SSDMatcher``, batched.

    An anchor takes its highest-IoU GT (the first on ties, like ``Tensor.max``) when that IoU is at least
    ``model.proposal_matcher.high_threshold``; every GT then takes its best anchor (first on ties)
    regardless of IoU, and a later GT wins an anchor two GTs share (as an index_put on CPU does).
    """
    num_images, most_boxes = gt_valid.shape
    num_anchors = anchors.shape[0]
    iou = box_iou(gt_boxes, anchors.to(gt_boxes.dtype))  # (B, G, A), same arithmetic as torchvision
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    matched_vals, matches = iou.max(dim=1)
    matches = matches.masked_fill(matched_vals < model.proposal_matcher.low_threshold, -1)
    # Between the two thresholds torchvision writes -2; for SSDMatcher they are equal, keep it general.
    between = (matched_vals >= model.proposal_matcher.low_threshold) & (
        matched_vals < model.proposal_matcher.high_threshold
    )
    matches = matches.masked_fill(between, -2)

    best_anchor = iou.max(dim=2).indices  # (B, G)
    best_anchor = torch.where(gt_valid, best_anchor, num_anchors)  # padding writes to a spare column
    gt_index = torch.arange(most_boxes, device=iou.device).expand(num_images, most_boxes)
    forced = torch.full((num_images, num_anchors + 1), -1, dtype=torch.int64, device=iou.device)
    forced.scatter_reduce_(1, best_anchor, gt_index, reduce="amax")
    forced = forced[:, :num_anchors]
    return torch.where(forced >= 0, forced, matches)


def _loss_padded(
    model: SSD,
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
) -> dict[str, Tensor]:
    # float32 whatever autocast produced, as torchvision's loss would under an fp32 model.
    bbox_regression = head_outputs["bbox_regression"].float()
    cls_logits = head_outputs["cls_logits"].float()
    num_images, num_anchors, num_classes = cls_logits.shape

    matches = match_anchors(model, gt_boxes, gt_valid, anchors)
    foreground = matches >= 0
    matched_gt = matches.clamp(min=0)
    num_foreground = foreground.sum()

    matched_boxes = gt_boxes.gather(1, matched_gt[:, :, None].expand(-1, -1, 4))
    target_regression = model.box_coder.encode_single(
        matched_boxes.reshape(-1, 4), anchors.to(gt_boxes.dtype).repeat(num_images, 1)
    ).view(num_images, num_anchors, 4)
    # Unmatched anchors' targets are zeroed: a NaN there (from a bad box) would reach the gradient as 0 * NaN.
    target_regression = torch.where(foreground[:, :, None], target_regression, 0.0)
    bbox_loss = F.smooth_l1_loss(bbox_regression, target_regression, reduction="none")
    bbox_loss = torch.where(foreground[:, :, None], bbox_loss, 0.0).sum()

    cls_targets = torch.where(foreground, gt_labels.gather(1, matched_gt), 0)
    cls_loss = F.cross_entropy(
        cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none"
    ).view(num_images, num_anchors)

    # Hard negative mining, the same expressions as SSD.compute_loss so that ties resolve alike; the
    # rank of each anchor is the inverse permutation of the sort (== torchvision's second argsort).
    cls_foreground = cls_targets > 0
    num_negative = model.neg_to_pos_ratio * cls_foreground.sum(1, keepdim=True)
    negative_loss = cls_loss.detach().masked_fill(cls_foreground, -float("inf"))
    _, order = negative_loss.sort(1, descending=True)
    positions = torch.arange(num_anchors, device=order.device).expand(num_images, num_anchors)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    background = rank < num_negative

    normaliser = num_foreground.clamp(min=1)
    classification = (
        torch.where(cls_foreground, cls_loss, 0.0).sum() + torch.where(background, cls_loss, 0.0).sum()
    )
    return {"bbox_regression": bbox_loss / normaliser, "classification": classification / normaliser}


def ssd_loss_batched(
    model: SSD, head_outputs: dict[str, Tensor], anchors: Tensor, targets: Sequence[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """torchvision's SSD training loss for a batch whose GT ``boxes`` are already in the resized frame.

    ``head_outputs``: ``model.head``'s dict (bbox_regression (B, A, 4), cls_logits (B, A, C));
    ``anchors``: the (A, 4) default boxes shared by the batch (``run_network`` returns them).
    """
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, anchors.device)
    return _loss_padded(model, head_outputs, anchors, gt_boxes, gt_labels, gt_valid)


def _resize_ratios(
    from_sizes: Sequence[tuple[int, int]], to_sizes: Sequence[tuple[int, int]], device: torch.device
) -> Tensor | float:
    """Per-image (x, y, x, y) factors as torchvision's ``resize_boxes`` computes them (float32 division).

    Returns a (B, 1, 4) tensor, or a plain (x == y) factor when all images share it (no copy needed).
    """
    source = torch.tensor(from_sizes, dtype=torch.float32)
    target = torch.tensor(to_sizes, dtype=torch.float32)
    ratio_yx = target / source  # (B, 2): height, width
    ratios = ratio_yx[:, [1, 0, 1, 0]]
    if bool((ratios == ratios[0, 0]).all()):
        return float(ratios[0, 0])  # exactly a float32 value, so x * it is bit-identical
    return _to_device(ratios[:, None, :], device)


def ssd_forward_train(
    model: SSD,
    images: ImageBatch,
    targets: Sequence[dict[str, Tensor]],
    *,
    amp_bf16: bool = False,
    channels_last: bool = False,
) -> dict[str, Tensor]:
    """torchvision ``SSD.forward`` in training mode, batched: returns {bbox_regression, classification}.

    ``targets``' boxes are in the original images' pixels (as torchvision expects); they are rescaled with
    the images.
    """
    batch, original_sizes = preprocess_batch(model, images, channels_last=channels_last)
    if len(targets) != batch.shape[0]:
        raise DataError(f"targets: {len(targets)} entries for {batch.shape[0]} images")
    gt_boxes, gt_labels, gt_valid = pad_targets(targets, batch.device)
    ratios = _resize_ratios(original_sizes, [tuple(batch.shape[-2:])] * batch.shape[0], batch.device)
    gt_boxes = gt_boxes * ratios
    head_outputs, anchors = run_network(model, batch, amp_bf16=amp_bf16)
    return _loss_padded(model, head_outputs, anchors, gt_boxes, gt_labels, gt_valid)


def _matrix_nms(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy NMS for G independent groups of k score-sorted boxes: (G, k, 4), (G, k) -> keep (G, k).

    A box is kept iff no kept higher-scored box of its group overlaps it by IoU > threshold. Iterating
    that rule from "all kept" fixes one more position per pass and stops at its unique fixed point, the
    greedy result; in practice after a few passes (the longest chain of suppressions).
    """
    num_groups, k = valid.shape
    keep = valid.clone()
    if num_groups == 0 or k == 0:
        return keep
    per_chunk = max(1, _NMS_CHUNK_ELEMENTS // (k * k))
    for start in range(0, num_groups, per_chunk):
        chunk = slice(start, start + per_chunk)
        # suppressors[g, j, i]: higher-scored box i < j would suppress box j (IoU is symmetric, so the
        # lower triangle; reducing over the last dim is the fast direction).
        suppressors = (box_iou(boxes[chunk], boxes[chunk]) > iou_threshold).tril_(diagonal=-1)
        chunk_valid = valid[chunk]
        chunk_keep = chunk_valid
        for _ in range(k):
            updated = chunk_valid & ~(suppressors & chunk_keep[:, None, :]).any(dim=-1)
            if torch.equal(updated, chunk_keep):
                break
            chunk_keep = updated
        keep[chunk] = chunk_keep
    return keep


def _select_matrix(model: SSD, bbox_regression: Tensor, logits: Tensor, anchors: Tensor,
                   image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """GPU path: fixed shapes (top-k of every class, then matrix NMS), no host syncs but the last."""
    scores = F.softmax(logits, dim=-1)
    num_images, num_anchors, num_classes = scores.shape
    boxes = model.box_coder.decode_single(
        bbox_regression.reshape(-1, 4), anchors.to(torch.float32).repeat(num_images, 1)
    )
    boxes = clip_boxes_to_image(boxes, image_size).view(num_images, num_anchors, 4)

    # Per (image, class) top-k, classes 1.. (0 is background); the top min(k, #above threshold) of the
    # top-k are exactly torchvision's "threshold, then top-k".
    k = min(model.topk_candidates, num_anchors)
    class_scores, anchor_index = scores[:, :, 1:].transpose(1, 2).topk(k, dim=-1)  # (B, C-1, k)
    valid = class_scores > model.score_thresh
    candidate_boxes = boxes.gather(1, anchor_index.reshape(num_images, -1, 1).expand(-1, -1, 4))
    candidate_boxes = candidate_boxes.view(num_images, num_classes - 1, k, 4)

    most_valid = int(valid.sum(-1).max()) if valid.numel() else 0
    keep = torch.zeros_like(valid)
    if most_valid > 0:
        keep[..., :most_valid] = _matrix_nms(
            candidate_boxes[:, :, :most_valid].reshape(-1, most_valid, 4),
            valid[..., :most_valid].reshape(-1, most_valid),
            model.nms_thresh,
        ).view(num_images, num_classes - 1, most_valid)
    # The detections_per_img best of each image, best first.
    kept_scores = class_scores.masked_fill(~keep, -float("inf")).view(num_images, -1)
    top_scores, top_index = kept_scores.topk(min(model.detections_per_img, kept_scores.shape[1]), dim=1)
    selected = torch.isfinite(top_scores)
    counts = selected.sum(1).tolist()
    image_of, slot = selected.nonzero(as_tuple=True)
    candidate = top_index[image_of, slot]  # index into the (C-1) * k candidates of the image
    final_boxes = candidate_boxes.view(num_images, -1, 4)[image_of, candidate]
    return image_of, final_boxes, top_scores[image_of, slot], candidate // k + 1, counts


def _select_batched_nms(model: SSD, bbox_regression: Tensor, logits: Tensor, anchors: Tensor,
                        image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """CPU path, threshold first: only the (image, class, anchor) scores above ``score_thresh`` go on, so
    the cost follows the candidates, not anchors x classes. Then the ``topk_candidates`` best of each
    (image, class), their boxes decoded, NMS per image (one torchvision call, or one per class when the image
    has many candidates; the groups lie contiguous, so no per-group search), and the ``detections_per_img``
    best of each image."""
    num_images, _num_anchors, num_classes = logits.shape
    # Softmax over the classes laid out as (B, C, A): ~9x faster on the CPU than over a last axis of a few
    # classes, and equal to it within a float32 rounding step.
    foreground = F.softmax(logits.transpose(1, 2).contiguous(), dim=1)[:, 1:]
    image_of, class_of, anchor_of = (foreground > model.score_thresh).nonzero(as_tuple=True)
    flat_scores = foreground[image_of, class_of, anchor_of]
    group = image_of * (num_classes - 1) + class_of  # non-decreasing: nonzero walks image, class, anchor
    group_sizes = torch.bincount(group, minlength=num_images * (num_classes - 1))
    starts = group_sizes.cumsum(0) - group_sizes
    # Best first within each group (a stable sort by group of the score order), then its first k only.
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    rank = torch.arange(order.numel(), device=order.device) - starts[group[order]]
    chosen = order[rank < model.topk_candidates]
    image_of, class_of, anchor_of, flat_scores = (t[chosen] for t in (image_of, class_of, anchor_of, flat_scores))
    flat_boxes = model.box_coder.decode_single(bbox_regression[image_of, anchor_of], anchors.to(torch.float32)[anchor_of])
    flat_boxes = clip_boxes_to_image(flat_boxes, image_size)

    offset, kept = 0, [image_of.new_zeros(0)]
    for sizes in group_sizes.clamp(max=model.topk_candidates).view(num_images, -1).tolist():
        total = sum(sizes)
        if total <= _ONE_NMS_CALL_BOXES:  # one call for the image, its classes kept apart by offsets
            span = slice(offset, offset + total)
            kept.append(batched_nms(flat_boxes[span], flat_scores[span], class_of[span], model.nms_thresh) + offset)
            offset += total
            continue
        for count in sizes:  # many boxes: the pairwise work of one call would outgrow a call per class
            if count:
                kept.append(greedy_nms(flat_boxes[offset:offset + count], flat_scores[offset:offset + count],
                                       model.nms_thresh) + offset)
            offset += count
    kept_index = torch.cat(kept)
    # Each image's detections best first (a stable sort by image of the score order), the first few kept.
    kept_index = kept_index[torch.sort(flat_scores[kept_index], descending=True, stable=True).indices]
    kept_index = kept_index[torch.sort(image_of[kept_index], stable=True).indices]
    per_image = torch.bincount(image_of[kept_index], minlength=num_images)
    first = per_image.cumsum(0) - per_image
    position = torch.arange(kept_index.numel(), device=kept_index.device) - first[image_of[kept_index]]
    kept_index = kept_index[position < model.detections_per_img]
    counts = per_image.clamp(max=model.detections_per_img).tolist()
    return (image_of[kept_index], flat_boxes[kept_index], flat_scores[kept_index], class_of[kept_index] + 1,
            counts)


def postprocess_batched(
    model: SSD,
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    image_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]],
    *,
    nms: str = "auto",
) -> list[dict[str, Tensor]]:
    """torchvision's ``postprocess_detections`` + ``transform.postprocess`` for the whole batch at once.

    ``image_size``: the (height, width) the network saw; ``original_sizes``: each image's (height, width)
    that the boxes are mapped back to. ``nms``: "matrix", "batched_nms" or "auto" (matrix on CUDA,
    batched_nms on CPU, where torchvision's sequential C++ NMS is the faster one; it thresholds first, so
    its cost follows the boxes above ``score_thresh``).
    """
    if nms not in ("auto", "matrix", "batched_nms"):
        raise ValueError(f"nms must be 'auto', 'matrix' or 'batched_nms', got {nms!r}")
    bbox_regression = head_outputs["bbox_regression"].float()
    logits = head_outputs["cls_logits"].float()
    num_images = logits.shape[0]
    device = logits.device
    if nms == "auto":
        nms = "matrix" if device.type == "cuda" else "batched_nms"

    select = _select_matrix if nms == "matrix" else _select_batched_nms
    image_of, final_boxes, final_scores, final_labels, counts = select(model, bbox_regression, logits, anchors,
                                                                       image_size)

    ratios = _resize_ratios([tuple(image_size)] * num_images, original_sizes, device)
    final_boxes = final_boxes * (ratios[image_of, 0] if isinstance(ratios, Tensor) else ratios)
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            final_boxes.split(counts), final_scores.split(counts), final_labels.split(counts), strict=True
        )
    ]


@torch.no_grad()
def ssd_detect(
    model: SSD,
    images: ImageBatch,
    *,
    amp_bf16: bool = False,
    channels_last: bool = False,
    nms: str = "auto",
) -> list[dict[str, Tensor]]:
    """torchvision ``SSD.forward`` in eval mode, batched: one dict of boxes/scores/labels per image.

    Boxes are in each original image's pixels. The model's train/eval mode is left as it is (SSD-VGG has
    no batch norm or dropout; call ``model.eval()`` for backbones that do).
    """
    batch, original_sizes = preprocess_batch(model, images, channels_last=channels_last)
    head_outputs, anchors = run_network(model, batch, amp_bf16=amp_bf16)
    return postprocess_batched(model, head_outputs, anchors, tuple(batch.shape[-2:]), original_sizes, nms=nms)
