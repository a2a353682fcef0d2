"""Stage 2 of the seed method: L1 sparsity induction, per-layer thresholds and the choice of α (docs/method.md).

Stage 2 works on the phase's layers *and* every conv / linear that reads their channels (the next
conv, the SSD loc/conf head convs, a classifier's Linear): METHOD.md counts those as consumers in the
phase, and s_in (stage 3) is only meaningful on consumers that were L1-trained and thresholded too.
``sparsity_targets`` lists them, each with the BatchNorm that directly follows it, if any.

Where a BatchNorm follows a conv, BN undoes any rescaling of the conv's weights, so the raw weights say
nothing about the filter's output. Every statistic then uses the *effective* filter
W[f] · γ_f / sqrt(running_var_f + ε) (``effective_weight``), and the penalty is its L1 norm
**(ours; chosen by measurement over Network Slimming's ‖W‖₁ + |γ|)**: shrinking W is compensated by the
running variance, so only γ (the output's real scale) or the filter's shape can lower it.

- ``sparsity_penalty``: λ · Σ_targets Σ_f |γ_f| / sqrt(var_f + ε) · ‖W[f]‖₁ (plain ‖W‖₁ where no BN
  follows; no biases); the callable a training job adds to its loss.
- ``threshold_weights``: τ_l = α · mean(|W_eff,l|) per layer, one global α; weights whose effective value
  is below τ_l become 0.
- ``choose_alpha``: the largest α on the grid whose thresholded model keeps the validation metric within
  ``max_drop`` of the L1-trained model's **(ours: grid and tolerance)**.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compression.errors import ConfigError
from compression.pruning import LayerRef, _as_layers, build_dependency_graph, consumers_of

log = logging.getLogger(__name__)

__all__ = [
    "SparsityTarget",
    "choose_alpha",
    "effective_scale",
    "effective_weight",
    "l1_penalty",
    "sparsity_penalty",
    "sparsity_targets",
    "threshold_weights",
    "weight_sparsity",
]


@dataclass(frozen=True)
class SparsityTarget:
    """A weight layer stage 2 penalises and thresholds, by module path, with the BatchNorm right after it."""

    layer: str
    batchnorm: str | None


def sparsity_targets(
    model: nn.Module, layers: Iterable[LayerRef], dg: tp.DependencyGraph | None = None
) -> list[SparsityTarget]:
    """The phase's ``layers`` followed by every conv / linear consumer of theirs not already listed, in that
    order, each with the BatchNorm that reads its output channels (if any). ``dg``: this model's graph."""
    pairs = _as_layers(model, layers)
    if not pairs:
        raise ConfigError("sparsity: the phase has no layers")
    dg = dg or build_dependency_graph(model)
    names = {module: name for name, module in model.named_modules()}
    convs = [layer for _, layer in pairs]  # where a BatchNorm may follow (never after a head conv or a Linear)
    ordered = [name for name, _ in pairs]
    for _, layer in pairs:
        for name, module, kind in consumers_of(dg, layer):
            if kind in ("conv", "head", "depthwise", "linear") and name not in ordered:
                ordered.append(name)
                if kind in ("conv", "depthwise"):
                    convs.append(module)
    targets = []
    for name in ordered:
        layer = model.get_submodule(name)
        batchnorms = [module for _, module, kind in consumers_of(dg, layer) if kind == "bn"] if layer in convs else []
        targets.append(SparsityTarget(name, names[batchnorms[0]] if batchnorms else None))
    return targets


def effective_scale(batchnorm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """γ / sqrt(running_var + ε) per channel: what BN multiplies each incoming channel by (at inference).

    Differentiable in γ; the running variance is a statistic, not a parameter.
    """
    scale = torch.rsqrt(batchnorm.running_var.detach() + batchnorm.eps)
    return scale * batchnorm.weight if batchnorm.weight is not None else scale


def effective_weight(model: nn.Module, target: SparsityTarget) -> torch.Tensor:
    """The layer's weight with each output filter multiplied by its BatchNorm's ``effective_scale``."""
    weight = model.get_submodule(target.layer).weight
    if target.batchnorm is None:
        return weight
    scale = effective_scale(model.get_submodule(target.batchnorm))
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


def l1_penalty(model: nn.Module, targets: Sequence[SparsityTarget]) -> torch.Tensor:
    """Σ over ``targets`` of ‖W_eff‖₁ (differentiable in W and γ; λ is applied by the caller)."""
    if not targets:
        raise ConfigError("l1_penalty: the phase has no layers")
    return torch.stack([effective_weight(model, target).abs().sum() for target in targets]).sum()


def sparsity_penalty(model: nn.Module, layers: Iterable[LayerRef], l1_lambda: float) -> Callable[[], torch.Tensor]:
    """λ · ``l1_penalty`` over the phase's ``sparsity_targets`` (found once), as a training job's extra loss."""
    targets = sparsity_targets(model, layers)
    return lambda: l1_lambda * l1_penalty(model, targets)


@torch.no_grad()
def _threshold_in_place(model: nn.Module, targets: Sequence[SparsityTarget], alpha: float) -> dict[str, float]:
    taus: dict[str, float] = {}
    for target in targets:
        magnitude = effective_weight(model, target).abs()
        tau = float(alpha * magnitude.mean())
        # A filter whose BN scale is 0 has an effective value of exactly 0 even without thresholding.
        model.get_submodule(target.layer).weight.masked_fill_((magnitude < tau) | (magnitude == 0), 0.0)
        taus[target.layer] = tau
    return taus


def threshold_weights(
    model: nn.Module, layers: Iterable[LayerRef], alpha: float, dg: tp.DependencyGraph | None = None
) -> tuple[nn.Module, dict[str, float]]:
    """A deep copy of ``model`` with |W_eff| < τ_l = α·mean(|W_eff,l|) zeroed in each of the phase's
    ``sparsity_targets``; returns (copy, {layer: τ_l}) for the layers and their consumers.

    ``layers`` are module paths (or ``resolve_layers`` pairs); ``dg`` is ``model``'s graph.
    """
    if not alpha >= 0:
        raise ConfigError(f"threshold: α must be >= 0, got {alpha}")
    targets = sparsity_targets(model, layers, dg)
    thresholded = copy.deepcopy(model)
    return thresholded, _threshold_in_place(thresholded, targets, alpha)


@torch.no_grad()
def weight_sparsity(model: nn.Module, layers: Iterable[LayerRef]) -> dict[str, float]:
    """``{layer: fraction of exactly-zero weights}``."""
    return {name: float((layer.weight == 0).float().mean()) for name, layer in _as_layers(model, layers)}


def _overall(model: nn.Module, layers: list[str]) -> float:
    zeros = total = 0
    for _, layer in _as_layers(model, layers):
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    return zeros / max(1, total)


def choose_alpha(
    model: nn.Module,
    layers: Iterable[LayerRef],
    alpha_grid: Sequence[float],
    max_drop: float,
    evaluate_fn: Callable[[nn.Module], float],
) -> dict[str, Any]:
    """Pick the global threshold multiplier α for the L1-trained ``model`` (higher metric = better).

    Evaluates ``evaluate_fn(model)`` once, then thresholded copies from the largest α down and stops at
    the first one within ``max_drop`` (that is the largest passing α; larger ones were tried and failed).
    Returns plain data::

        {"alpha", "layers": [the phase's layers, then their consumers], "taus": {layer: τ},
         "sparsity_before": {layer: frac}, "sparsity_after": {layer: frac}, "val_metric_l1",
         "val_metric_thresholded", "max_drop",
         "tried": [{"alpha", "val_metric", "drop", "sparsity", "ok"}, ...]}

    When no α passes **(ours)**: ``alpha`` is None, τ are 0 (no thresholding), and the selection then
    sees only the weights whose effective value is exactly zero. A NaN metric counts as a failure.
    τ and the sparsities cover the phase's ``sparsity_targets`` (its layers and their consumers).
    Re-create the model with ``threshold_weights(model, layers, result["alpha"])`` (cheap, no evaluation).
    """
    grid = sorted({float(a) for a in alpha_grid}, reverse=True)
    if not grid or any(a <= 0 for a in grid):
        raise ConfigError(f"stages.sparsity.alpha_grid: every α must be > 0, got {list(alpha_grid)}")
    targets = sparsity_targets(model, layers)
    names = [target.layer for target in targets]
    base = float(evaluate_fn(model))
    before = weight_sparsity(model, names)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for alpha in grid:
        candidate = copy.deepcopy(model)
        taus = _threshold_in_place(candidate, targets, alpha)
        metric = float(evaluate_fn(candidate))
        drop = base - metric
        ok = not math.isnan(metric) and drop <= max_drop + 1e-12
        tried.append({"alpha": alpha, "val_metric": metric, "drop": drop, "sparsity": _overall(candidate, names), "ok": ok})
        log.info("α=%.3g: metric %.4f (drop %.4f) sparsity %.3f %s", alpha, metric, drop, tried[-1]["sparsity"],
                 "ok" if ok else "too much")
        if ok:
            chosen = {"alpha": alpha, "taus": taus, "after": weight_sparsity(candidate, names), "metric": metric}
            break
        del candidate
    if chosen is None:
        log.warning("no α in %s keeps the metric within %.4g of %.4f; not thresholding", grid, max_drop, base)
        chosen = {"alpha": None, "taus": dict.fromkeys(names, 0.0), "after": before, "metric": base}
    return {
        "alpha": chosen["alpha"],
        "layers": names,
        "taus": chosen["taus"],
        "sparsity_before": before,
        "sparsity_after": chosen["after"],
        "val_metric_l1": base,
        "val_metric_thresholded": chosen["metric"],
        "max_drop": max_drop,
        "tried": tried,
    }
