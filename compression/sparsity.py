"""Stage 2 of the seed method: L1 sparsity induction, per-layer thresholds and the choice of α (docs/method.md).

- ``l1_penalty``: Σ_{l∈L} ‖W_l‖₁ over the conv/linear *weights* of the phase's layers (no biases, no
  BatchNorm); the caller multiplies by λ and adds it to the task loss (``train_model(extra_loss=...)``).
- ``threshold_weights``: τ_l = α · mean(|W_l|) per layer, one global α; weights with |w| < τ_l become 0.
- ``choose_alpha``: the largest α on the grid whose thresholded model keeps the validation metric within
  ``max_drop`` of the L1-trained model's **(ours: grid and tolerance)**.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from compression.errors import ConfigError
from compression.pruning import LayerRef, _as_layers

log = logging.getLogger(__name__)

__all__ = ["choose_alpha", "l1_penalty", "threshold_weights", "weight_sparsity"]


def l1_penalty(model: nn.Module, layers: Iterable[LayerRef]) -> torch.Tensor:
    """Σ ‖W_l‖₁ over the weights of ``layers`` (differentiable; λ is applied by the caller)."""
    terms = [layer.weight.abs().sum() for _, layer in _as_layers(model, layers)]
    if not terms:
        raise ConfigError("l1_penalty: the phase has no layers")
    return torch.stack(terms).sum()


@torch.no_grad()
def _threshold_in_place(model: nn.Module, layers: Iterable[LayerRef], alpha: float) -> dict[str, float]:
    taus: dict[str, float] = {}
    for name, layer in _as_layers(model, layers):
        weight = layer.weight
        tau = float(alpha * weight.abs().mean())
        weight.masked_fill_(weight.abs() < tau, 0.0)
        taus[name] = tau
    return taus


def threshold_weights(
    model: nn.Module, layers: Iterable[LayerRef], alpha: float
) -> tuple[nn.Module, dict[str, float]]:
    """A deep copy of ``model`` with |w| < τ_l = α·mean(|W_l|) zeroed in each layer; returns (copy, {layer: τ_l}).

    ``layers`` are module paths (or ``resolve_layers`` pairs, looked up by path in the copy).
    """
    if not alpha >= 0:
        raise ConfigError(f"threshold: α must be >= 0, got {alpha}")
    names = [name for name, _ in _as_layers(model, layers)]
    thresholded = copy.deepcopy(model)
    return thresholded, _threshold_in_place(thresholded, names, alpha)


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

        {"alpha", "taus": {layer: τ}, "sparsity_before": {layer: frac}, "sparsity_after": {layer: frac},
         "val_metric_l1", "val_metric_thresholded", "max_drop",
         "tried": [{"alpha", "val_metric", "drop", "sparsity", "ok"}, ...]}

    When no α passes **(ours)**: ``alpha`` is None, τ are 0 (no thresholding), and the selection then
    sees only the weights the L1 training drove to exactly zero. A NaN metric counts as a failure.
    Re-create the model with ``threshold_weights(model, layers, result["alpha"])`` (cheap, no evaluation).
    """
    names = [name for name, _ in _as_layers(model, layers)]
    grid = sorted({float(a) for a in alpha_grid}, reverse=True)
    if not grid or any(a <= 0 for a in grid):
        raise ConfigError(f"stages.sparsity.alpha_grid: every α must be > 0, got {list(alpha_grid)}")
    base = float(evaluate_fn(model))
    before = weight_sparsity(model, names)
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for alpha in grid:
        candidate, taus = threshold_weights(model, names, alpha)
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
        "taus": chosen["taus"],
        "sparsity_before": before,
        "sparsity_after": chosen["after"],
        "val_metric_l1": base,
        "val_metric_thresholded": chosen["metric"],
        "max_drop": max_drop,
        "tried": tried,
    }
