"""Stage 3 of the seed method: choose the filters to remove from their zero fractions (docs/method.md).

On the thresholded model Θ_L1^th (thresholded on effective weights, through any BatchNorm: see
``compression.sparsity``), for each layer l of the phase and each filter f:

- ``s_out(f)``: fraction of zero weights in W_l[f, :, :, :] (the filter itself; bias not counted).
- ``s_in(f)``: fraction of zero weights among *all* weights that read channel f in the layer's
  consumers, pooled (each weight counts once, so a consumer weighs by its size) over every conv / linear
  in the channel's torch-pruning group: the next conv(s), the SSD loc/conf head convs fed by the map, a
  classifier's Linear (all the flattened columns of channel f). **(ours)** A grouped or depthwise consumer
  contributes the kernels of its group that read f. Per-channel scales (BatchNorm γ/β, the L2Norm /
  torchvision ``scale_weight``) are not kernels and do not count. A layer with no weighted consumer
  (its output feeds nothing prunable) gets ``s_in = 0``.
- f is flagged when ``s_out(f) >= γ`` or ``s_in(f) >= γ``.

``select_filters`` turns flags into removal lists with two safety rules **(ours)**: at least
``min_channels`` filters stay (the least sparse ones), and the kept count may be rounded to a multiple
of ``round_to``. The result is plain JSON-able data, ready for ``pruning.prune_filters``.

With a FLOPs budget instead of γ **(ours)**, ``sparsity_importance`` turns the same scores into one
global ranking (higher sparsity = less important) for ``criteria.select_by_flops``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compression.errors import ConfigError
from compression.pruning import LayerRef, _as_layers, _channel_group
from compression.sparsity import effective_weight, sparsity_targets

__all__ = ["filter_sparsity_scores", "layer_floor", "relative_l1_norms", "rounded_keep", "select_filters", "sparsity_importance",
           "sparsity_rank"]


@torch.no_grad()
def _input_zero_counts(consumer: nn.Module, idxs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero weights and all weights reading each of the consumer's input positions ``idxs``."""
    zero = consumer.weight.detach() == 0
    position = torch.as_tensor(idxs, dtype=torch.long)
    if isinstance(consumer, nn.Linear):
        zeros = zero.sum(0)[position]
        totals = torch.full_like(zeros, zero.shape[0])
        return zeros.float(), totals.float()
    # Conv: input channel c of a conv with g groups is read by output block c // (in/g), column c % (in/g).
    groups = consumer.groups
    in_per_group = consumer.in_channels // groups
    out_per_group = consumer.out_channels // groups
    per_block = zero.view(groups, out_per_group, in_per_group, -1).sum(dim=(1, 3))  # (groups, in/g)
    zeros = per_block[position // in_per_group, position % in_per_group]
    kernel = zero.shape[2] * zero.shape[3] if zero.dim() == 4 else 1
    totals = torch.full_like(zeros, out_per_group * kernel)
    return zeros.float(), totals.float()


@torch.no_grad()
def filter_sparsity_scores(
    model: nn.Module, dg: tp.DependencyGraph, layers: Iterable[LayerRef]
) -> dict[str, dict[str, list[float]]]:
    """``{layer: {"s_out": [...], "s_in": [...]}}`` per filter, on the (thresholded) ``model``.

    ``dg`` must be this model's graph (``pruning.build_dependency_graph``); ``layers`` are module paths
    or ``resolve_layers`` pairs.
    """
    scores: dict[str, dict[str, list[float]]] = {}
    for name, layer in _as_layers(model, layers):
        weight = layer.weight.detach()
        n = weight.shape[0]
        s_out = (weight.reshape(n, -1) == 0).float().mean(1)
        zeros = torch.zeros(n)
        totals = torch.zeros(n)
        for index, item in enumerate(_channel_group(dg, layer)):
            consumer = item.dep.target.module
            if index == 0 or consumer is layer or not isinstance(consumer, nn.Conv2d | nn.Linear):
                continue
            if not dg.is_in_channel_pruning_fn(item.dep.handler):
                continue
            z, t = _input_zero_counts(consumer, list(item.idxs))
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            zeros.index_add_(0, roots, z)
            totals.index_add_(0, roots, t)
        s_in = torch.where(totals > 0, zeros / totals.clamp(min=1), torch.zeros(n))
        scores[name] = {"s_out": [float(v) for v in s_out], "s_in": [float(v) for v in s_in]}
    return scores


def sparsity_rank(s_out: list[float], s_in: list[float]) -> list[int]:
    """Filter indices from most to least sparse: by max(s_out, s_in), then s_out + s_in, then index."""
    keys = [(-max(o, i), -(o + i), f) for f, (o, i) in enumerate(zip(s_out, s_in, strict=True))]
    return [f for _, _, f in sorted(keys)]


@torch.no_grad()
def relative_l1_norms(
    model: nn.Module, layers: Iterable[LayerRef], dg: tp.DependencyGraph | None = None
) -> dict[str, list[float]]:
    """``{layer: [‖W_eff[f]‖₁ / mean_f ‖W_eff[f]‖₁]}``: each effective filter's L1 norm (through the BatchNorm
    after it, ``sparsity.effective_weight``) relative to its layer's mean."""
    names = {name for name, _ in _as_layers(model, layers)}
    out: dict[str, list[float]] = {}
    for target in sparsity_targets(model, layers, dg):
        if target.layer not in names:
            continue
        weight = effective_weight(model, target)
        norms = weight.abs().reshape(weight.shape[0], -1).sum(1).float()
        mean = float(norms.mean())
        out[target.layer] = [float(v) / mean if mean > 0 else 0.0 for v in norms]
    return out


def sparsity_importance(
    scores: Mapping[str, Mapping[str, list[float]]],
    relative_l1: Mapping[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per-filter importance (higher = keep) from the seed's scores, comparable across layers.

    One global order, most removable first: by max(s_out, s_in) (as γ flags), then s_out + s_in, then the
    filter's ``relative_l1`` norm in the L1-trained model (smaller first; the ties left when few weights
    were thresholded), then layer order and index. A filter's importance is its position in that order
    divided by the number of filters, so ``criteria.select_by_flops(..., scope="global")`` removes the
    sparsest filters first, whatever their layer.
    """
    keys = []
    for position, (name, score) in enumerate(scores.items()):
        tie = relative_l1.get(name) if relative_l1 is not None else None
        for f, (o, i) in enumerate(zip(score["s_out"], score["s_in"], strict=True)):
            keys.append((-max(o, i), -(o + i), tie[f] if tie is not None else 0.0, position, f, name))
    keys.sort()
    importance = {name: [0.0] * len(score["s_out"]) for name, score in scores.items()}
    for rank, (*_, f, name) in enumerate(keys):
        importance[name][f] = (rank + 1) / len(keys)
    return importance


def layer_floor(n: int, min_channels: int, max_layer_ratio: float = 1.0) -> int:
    """The fewest filters a layer of ``n`` may keep: ``min(min_channels, n)`` (at least 1), and at least
    ``(1 - max_layer_ratio)·n`` rounded up."""
    if not 0 < max_layer_ratio <= 1:
        raise ConfigError(f"selection.max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    share = math.ceil(round((1 - max_layer_ratio) * n, 9))  # round: 0.75 of 64 is 16, not 16.000000000000004
    return min(n, max(1, min(min_channels, n), share))


def rounded_keep(keep: int, n: int, min_channels: int, round_to: int, max_layer_ratio: float = 1.0) -> int:
    """The kept count after the floor (``layer_floor``) and the rounding rules (see ``select_filters``)."""
    floor = layer_floor(n, min_channels, max_layer_ratio)
    keep = min(n, max(keep, floor))
    if keep == n or round_to <= 1 or keep % round_to == 0:  # a layer with nothing to remove stays whole
        return keep
    down = keep // round_to * round_to
    up = down + round_to
    # Nearest multiple; on a tie keep more (the conservative side). Never below the floor, never above n.
    choices = [c for c in (up, down) if floor <= c <= n]
    if not choices:
        return keep
    return min(choices, key=lambda c: (abs(c - keep), -c))


def select_filters(
    scores: Mapping[str, Mapping[str, list[float]]],
    gamma: float = 0.9,
    min_channels: int = 4,
    round_to: int = 1,
    max_layer_ratio: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """``{layer: {"remove": [idx...], "keep": n_kept, "flagged": n_flagged, "s_out": [...], "s_in": [...]}}``.

    A filter is flagged when ``s_out >= gamma`` or ``s_in >= gamma``. Filters are ranked from most to
    least sparse (``sparsity_rank``); the layer keeps ``n - flagged`` filters, raised to
    ``layer_floor(n, min_channels, max_layer_ratio)`` by keeping the least sparse flagged ones, then rounded to the
    nearest multiple of ``round_to`` (ties: keep more; never below the floor or above n; a layer with
    nothing to remove is left whole) by removing
    the next-ranked unflagged filters or keeping the last-ranked flagged ones. ``remove`` is sorted.
    """
    if not 0 < gamma <= 1:
        raise ConfigError(f"selection.gamma must be in (0, 1], got {gamma}")
    if min_channels < 1 or round_to < 1:
        raise ConfigError(f"selection.min_channels and round_to must be >= 1, got {min_channels}, {round_to}")
    selection: dict[str, dict[str, Any]] = {}
    for name, score in scores.items():
        s_out, s_in = list(score["s_out"]), list(score["s_in"])
        n = len(s_out)
        flagged = sum(1 for o, i in zip(s_out, s_in, strict=True) if o >= gamma or i >= gamma)
        keep = rounded_keep(n - flagged, n, min_channels, round_to, max_layer_ratio)
        order = sparsity_rank(s_out, s_in)
        selection[name] = {
            "remove": sorted(order[: n - keep]),
            "keep": keep,
            "flagged": flagged,
            "s_out": s_out,
            "s_in": s_in,
        }
    return selection


