"""Alternative filter criteria on the same prune machinery: l1_norm, bn_scale, random, group_norm and taylor.

Every criterion gives per-filter scores (higher = more important); ``select_by_ratio`` and
``select_by_flops`` turn scores into explicit ``{layer: {"remove": [...]}}`` selections for
``pruning.prune_filters``; ``taylor_prune`` is Molchanov et al.'s iterative loop.

Definitions (layer-local, as METHOD.md states them) and where they come from:

- ``l1_norm`` (Li et al. 2017): ‖W_l[f]‖₁ — torch-pruning's ``GroupMagnitudeImportance(p=1,
  group_reduction="first", normalizer=None)``, i.e. the root layer's weights only (the group-wide
  default would add the next layer's input weights, which is another criterion).
- ``bn_scale`` (Network Slimming): |γ_f| of the BatchNorm right after the layer — torch-pruning's
  ``BNScaleImportance`` with ``group_reduction="first"`` and no normaliser. A layer without a
  BatchNorm after it is refused.
- ``random``: uniform scores from a ``torch.Generator`` seeded with ``seed`` **(ours; not
  torch-pruning's ``RandomImportance``, which draws from the global RNG and so is not reproducible
  without reseeding the whole process)**.
- ``group_norm`` (DepGraph, Fang et al. CVPR 2023): the L2 norm of the filter's whole group (its weights,
  its BatchNorm's γ and β, and every consumer's input weights for that channel), divided by the mean over
  the layer's filters so that layers compare — torch-pruning's ``GroupMagnitudeImportance(p=2)`` with its
  defaults, the importance its ``GroupNormPruner`` ranks by. The sparsity stage trains with that pruner's
  regulariser first (``tp_pruners.regularising``), which pushes the weak groups toward zero.
- ``taylor`` (Molchanov et al. 2017): |mean over batch and positions of ∂C/∂z_f · z_f| per batch,
  averaged over ``taylor_batches`` batches, then divided by the layer's L2 norm so that layers compare.
  z is the activation the consumers read: the layer's output, or its BatchNorm's output when one
  follows **(ours)**; through a ReLU (in-place or not) ∂C/∂z·z is the same before and after it. This is
  the activation-based criterion; torch-pruning's ``TaylorImportance`` is the weight-based 2019 variant
  (Σ|w·∂C/∂w| over the group), so it is not used.

Scope of ranking **(ours)**: ``l1_norm``/``bn_scale``/``random`` scores are not comparable across
layers, so ratios apply per layer (``scope="layer"``); the L2-normalised ``taylor`` scores are ranked
globally (``scope="global"``), as in Molchanov et al., and so are the mean-normalised ``group_norm`` ones, as
torch-pruning's global pruning ranks them. At a FLOPs target ``group_norm`` selects what torch-pruning's
pruner itself removes, re-ranking after each small step (``tp_pruners.select_by_pruner``); **(ours)** with a
ratio or a latency target it ranks once here, on the sparse-trained model.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compression.config import SelectionConfig
from compression.errors import ConfigError, StageError
from compression.pruning import (
    LayerRef,
    _as_layers,
    _channel_group,
    build_dependency_graph,
    consumers_of,
    count_flops,
    input_size_of,
    layer_channels,
    prune_filters,
    resolve_layers,
)
from compression.selection import layer_floor, rounded_keep

log = logging.getLogger(__name__)

__all__ = [
    "CRITERIA",
    "FlopsModel",
    "rank_filters",
    "select_by_flops",
    "select_by_latency",
    "select_by_ratio",
    "taylor_prune",
    "taylor_scores",
]

CRITERIA = ("l1_norm", "bn_scale", "random", "group_norm", "taylor")
DEFAULT_SCOPE = {"l1_norm": "layer", "bn_scale": "layer", "random": "layer", "group_norm": "global", "taylor": "global"}
# taylor_prune's last step may overshoot its FLOPs target by at most this fraction (ours).
FLOPS_TOLERANCE = 0.05

LossFn = Callable[[nn.Module, Any], Any]


# --------------------------------------------------------------------------------------------
# Scores


def _tp_scores(importance: tp.importance.Importance, dg: tp.DependencyGraph, layer: nn.Module) -> torch.Tensor | None:
    return importance(_channel_group(dg, layer))


def _activation_module(dg: tp.DependencyGraph, layer: nn.Module) -> nn.Module:
    """The module whose output carries the layer's channels as its consumers read them (BN if one follows)."""
    for _, module, kind in consumers_of(dg, layer):
        if kind == "bn":
            return module
    return layer


def _total_loss(value: Any) -> torch.Tensor:
    if isinstance(value, Mapping):
        return sum(value.values())  # type: ignore[return-value]
    return value


def taylor_scores(
    model: nn.Module,
    dg: tp.DependencyGraph,
    layers: Iterable[LayerRef],
    loss_fn: LossFn,
    batches: Iterable[Any],
    n_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Molchanov's first-order Taylor scores, L2-normalised per layer: ``{layer: (n,) tensor}``.

    ``loss_fn(model, batch)`` returns the loss C (a tensor, or a dict of tensors that is summed); it runs
    with the model in train mode (restored afterwards). Parameter gradients are cleared before and after.
    """
    pairs = _as_layers(model, layers)
    sums = {name: torch.zeros(layer_channels(layer)) for name, layer in pairs}
    hooks = []

    def make_hook(name: str):
        def forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            activation = output

            def grad_hook(grad: torch.Tensor) -> None:
                # `activation` may have been rectified in place by now: ∂C/∂z·z is unchanged by a ReLU.
                dims = [d for d in range(grad.dim()) if d != 1]
                product = (grad.detach() * activation.detach()).float().mean(dim=dims).abs()
                sums[name] += product.cpu()

            output.register_hook(grad_hook)

        return forward_hook

    for name, layer in pairs:
        hooks.append(_activation_module(dg, layer).register_forward_hook(make_hook(name)))
    was_training = model.training
    model.train()
    count = 0
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            source = batches if n_batches is None else itertools.islice(batches, n_batches)
            for batch in source:
                loss = _total_loss(loss_fn(model, batch))
                loss.backward()
                model.zero_grad(set_to_none=True)
                count += 1
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if count == 0:
        raise StageError("taylor: no batches to score the filters on (the data loader is empty or exhausted)")
    scores: dict[str, torch.Tensor] = {}
    for name, total in sums.items():
        mean = total / count
        norm = mean.norm(p=2)
        scores[name] = mean / norm if norm > 0 else mean
    return scores


def rank_filters(
    criterion: str,
    model: nn.Module,
    dg: tp.DependencyGraph,
    layers: Iterable[LayerRef],
    *,
    loss_fn: LossFn | None = None,
    batches: Iterable[Any] | None = None,
    n_batches: int | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-filter importance ``{layer: [score]}`` (higher = keep) for ``criterion`` in ``CRITERIA``."""
    pairs = _as_layers(model, layers)
    if criterion == "taylor":
        if loss_fn is None or batches is None:
            raise ConfigError("criterion 'taylor' needs a loss function and batches")
        result = taylor_scores(model, dg, pairs, loss_fn, batches, n_batches)
        return {name: [float(v) for v in scores] for name, scores in result.items()}
    out: dict[str, list[float]] = {}
    if criterion == "random":
        generator = torch.Generator().manual_seed(int(seed))
        for name, layer in pairs:
            out[name] = [float(v) for v in torch.rand(layer_channels(layer), generator=generator)]
        return out
    if criterion == "l1_norm":
        importance = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    elif criterion == "bn_scale":
        importance = tp.importance.BNScaleImportance(group_reduction="first", normalizer=None)
    elif criterion == "group_norm":
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise ConfigError(
            f"selection.criterion: unknown ranking criterion {criterion!r} (valid: {', '.join(CRITERIA)}; "
            "'seed' uses selection.select_filters)"
        )
    for name, layer in pairs:
        has_bn = any(kind == "bn" for _, _, kind in consumers_of(dg, layer))
        scores = _tp_scores(importance, dg, layer) if has_bn or criterion != "bn_scale" else None
        if scores is None:
            raise ConfigError(f"criterion {criterion!r}: layer {name!r} has no BatchNorm after it")
        out[name] = [float(v) for v in scores]
    return out


# --------------------------------------------------------------------------------------------
# Selection at a ratio


def _entry(order: list[int], n: int, keep: int, scores: list[float]) -> dict[str, Any]:
    return {"remove": sorted(order[: n - keep]), "keep": keep, "scores": list(scores)}


def _ascending(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda f: (scores[f], f))


def select_by_ratio(
    scores: Mapping[str, Sequence[float]],
    ratio: float,
    min_channels: int = 1,
    round_to: int = 1,
    scope: str = "layer",
    max_layer_ratio: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Remove the lowest-scored ``ratio`` of the filters: ``{layer: {"remove", "keep", "scores"}}``.

    ``scope="layer"``: round(ratio·n) per layer; ``"global"``: round(ratio·Σn) overall, lowest scores first
    across layers (scores must be comparable). Each layer keeps at least
    ``selection.layer_floor(n, min_channels, max_layer_ratio)`` and its kept count is then rounded to a
    multiple of ``round_to`` (as ``selection.rounded_keep``).
    """
    if not 0 <= ratio <= 1:
        raise ConfigError(f"selection.prune_ratio must be in [0, 1], got {ratio}")
    sizes = {name: len(s) for name, s in scores.items()}
    if scope == "layer":
        keeps = {name: n - int(round(ratio * n)) for name, n in sizes.items()}
    elif scope == "global":
        floors = {name: layer_floor(n, min_channels, max_layer_ratio) for name, n in sizes.items()}
        keeps = dict(sizes)
        budget = int(round(ratio * sum(sizes.values())))
        ranked = sorted((float(s), name, f) for name, values in scores.items() for f, s in enumerate(values))
        for _, name, _ in ranked:
            if budget <= 0:
                break
            if keeps[name] > floors[name]:
                keeps[name] -= 1
                budget -= 1
    else:
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    selection = {}
    for name, values in scores.items():
        n = sizes[name]
        keep = rounded_keep(keeps[name], n, min_channels, round_to, max_layer_ratio)
        selection[name] = _entry(_ascending(values), n, keep, list(values))
    return selection


# --------------------------------------------------------------------------------------------
# FLOPs


class FlopsModel:
    """Conv/Linear FLOPs of a model as a function of the filters removed per layer (no re-tracing).

    Counts what ``metrics.count_flops`` counts (2 per multiply-add of convs and linears) from each
    layer's output size recorded in one forward pass; removing r filters of layer l lowers l's output
    channels and the input channels (or flattened columns) of every conv/linear consumer of l.
    """

    def __init__(self, model: nn.Module, dg: tp.DependencyGraph, layers: Iterable[LayerRef],
                 input_size: tuple[int, int] | None = None):
        from compression.pruning import _traced_network

        self.units: dict[nn.Module, tuple[float, int, int, int]] = {}  # module -> (flops/(cin·cout), cin, cout, groups)
        network, _ = _traced_network(model)
        height, width = input_size or input_size_of(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                cin, cout, groups = module.in_channels, module.out_channels, module.groups
                per = 2.0 * output.shape[-2] * output.shape[-1] * module.kernel_size[0] * module.kernel_size[1] / groups
            else:
                cin, cout, groups = module.in_features, module.out_features, 1
                per = 2.0 * output.numel() / output.shape[-1] / output.shape[0]
            self.units[module] = (per, cin, cout, groups)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                network(torch.zeros(1, 3, height, width, device=device))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        self.base = sum(per * cin * cout for per, cin, cout, _ in self.units.values())
        # Per layer: [(consumer, input positions per removed channel)].
        self.readers: dict[str, list[tuple[nn.Module, float]]] = {}
        self.layers = dict(_as_layers(model, layers))
        for name, layer in self.layers.items():
            readers = []
            for index, item in enumerate(_channel_group(dg, layer)):
                consumer = item.dep.target.module
                if index == 0 or consumer is layer or not isinstance(consumer, nn.Conv2d | nn.Linear):
                    continue
                if dg.is_in_channel_pruning_fn(item.dep.handler) and consumer in self.units:
                    readers.append((consumer, len(item.idxs) / max(1, len(set(item.root_idxs)))))
            self.readers[name] = readers

    def flops(self, removed: Mapping[str, int]) -> float:
        """FLOPs after removing ``removed[layer]`` filters from each layer."""
        rin: dict[nn.Module, float] = {}
        rout: dict[nn.Module, float] = {}
        for name, count in removed.items():
            layer = self.layers[name]
            rout[layer] = rout.get(layer, 0) + count
            for consumer, per_channel in self.readers[name]:
                rin[consumer] = rin.get(consumer, 0) + count * per_channel
        total = 0.0
        for module, (per, cin, cout, groups) in self.units.items():
            cin_left, cout_left = cin - rin.get(module, 0), cout - rout.get(module, 0)
            if groups > 1 and groups == cin:  # depthwise: losing an input channel loses its output too
                cout_left = min(cout_left, cin_left * cout // cin)
            total += per * cin_left * cout_left
        return total


def select_by_flops(
    model: nn.Module,
    scores: Mapping[str, Sequence[float]],
    target_flops_ratio: float,
    *,
    min_channels: int = 1,
    round_to: int = 1,
    scope: str = "layer",
    max_layer_ratio: float = 1.0,
    dg: tp.DependencyGraph | None = None,
    input_size: tuple[int, int] | None = None,
    closest: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The smallest ratio (``select_by_ratio``) whose pruned model has FLOPs ≤ base / ``target_flops_ratio``.

    Returns (selection, {"flops_before", "flops_after", "flops_ratio", "prune_ratio"}) with the FLOPs
    estimated by ``FlopsModel``. When even the floors (``min_channels``, ``max_layer_ratio``) cannot reach
    it: ``StageError``, or with ``closest`` the selection down to the floors, with ``flops_short_of_target``
    (the target over the reached ratio).
    """
    if not target_flops_ratio > 1:
        raise ConfigError(f"selection.target_flops_ratio must be > 1, got {target_flops_ratio}")
    dg = dg or build_dependency_graph(model, input_size)
    estimate = FlopsModel(model, dg, list(scores), input_size)
    goal = estimate.base / target_flops_ratio

    def after(ratio: float) -> tuple[dict[str, dict[str, Any]], float]:
        chosen = select_by_ratio(scores, ratio, min_channels, round_to, scope, max_layer_ratio)
        return chosen, estimate.flops({name: len(entry["remove"]) for name, entry in chosen.items()})

    best, lowest = after(1.0)
    if lowest > goal and closest:
        return best, {"flops_before": estimate.base, "flops_after": lowest, "flops_ratio": estimate.base / lowest,
                      "prune_ratio": 1.0, "flops_short_of_target": lowest / goal}
    if lowest > goal:
        raise StageError(
            f"target_flops_ratio {target_flops_ratio:g} is out of reach: pruning these layers down to "
            f"min_channels={min_channels}, max_layer_ratio={max_layer_ratio:g} gives at most {estimate.base / lowest:.2f}x"
        )
    low, high = 0.0, 1.0
    for _ in range(40):
        if high - low < 1e-4:
            break
        middle = (low + high) / 2
        chosen, flops = after(middle)
        if flops <= goal:
            high, best, lowest = middle, chosen, flops
        else:
            low = middle
    info = {"flops_before": estimate.base, "flops_after": lowest, "flops_ratio": estimate.base / lowest,
            "prune_ratio": high}
    return best, info


# --------------------------------------------------------------------------------------------
# Latency


def select_by_latency(
    model: nn.Module,
    scores: Mapping[str, Sequence[float]],
    target_latency_ratio: float,
    table: Any,
    *,
    model_name: str,
    min_channels: int = 1,
    scope: str = "layer",
    max_layer_ratio: float = 1.0,
    closest: bool = False,
    baseline_ms: float | None = None,
    layer_weights: Mapping[str, float] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Remove the filters with the least importance per millisecond saved until the network's predicted
    latency (``table``, a ``latency.LatencyTable`` of this device) is at most the input model's /
    ``target_latency_ratio`` (HALP's latency-saliency trade, solved greedily as NetAdapt does). The input
    model's time is ``baseline_ms`` when given (its time in another layout, when it runs faster there).

    Each layer of ``scores`` may only be cut to one of the widths the table shows the device runs fastest
    (``LatencyTable.fast_widths``, so a layer's ``round_to`` comes from the table) and never below
    ``selection.layer_floor(n, min_channels, max_layer_ratio)``. A move cuts one layer from its width to a
    lower allowed width, removing its lowest-scored filters; the move with the least importance removed per
    millisecond saved (the layer's own site and its readers', at the other layers' current widths) goes
    first, until the target is reached. ``scope="layer"`` scores (not comparable across layers) are divided
    by their layer's mean first, so a move's cost is the share of its layer's importance it removes.
    ``layer_weights`` (``layer_sensitivity``) multiply each layer's scores: a layer the model needs more
    costs more to cut.

    Returns (selection, {"latency_before_ms", "latency_after_ms", "latency_ratio", "round_to",
    "latency_device", "latency_layout", "importance_removed"}) with predicted network times (ms per batch)
    and the removed filters' summed (per-layer normalised) scores. When even the floors cannot reach the
    target: ``StageError``, or with ``closest`` the cut down to the floors, with ``latency_short_of_target``.
    """
    from compression.latency import model_widths

    if not target_latency_ratio > 1:
        raise ConfigError(f"selection.target_latency_ratio must be > 1, got {target_latency_ratio}")
    widths = model_widths(model, model_name)
    missing = [name for name in scores if name not in table.sites]
    if missing:
        raise StageError(f"the latency table has no layer {missing[0]!r}; measure it for this model")
    orders, cumulative, allowed = {}, {}, {}
    for name, values in scores.items():
        n = len(values)
        mean = sum(values) / n if scope == "layer" and n and sum(values) > 0 else 1.0
        weight = layer_weights[name] if layer_weights is not None else 1.0
        orders[name] = _ascending(values)
        sums = [0.0]
        for f in orders[name]:
            sums.append(sums[-1] + float(values[f]) / mean * weight)
        cumulative[name] = sums
        floor = layer_floor(n, min_channels, max_layer_ratio)
        allowed[name] = sorted({w for w in table.fast_widths(name) if floor <= w < n})
    before = table.network_ms(widths) if baseline_ms is None else baseline_ms
    goal = before / target_latency_ratio
    current = dict(widths)
    predicted = table.network_ms(widths)
    while predicted > goal:
        best: tuple[float, float, str, int] | None = None
        for name in scores:
            n, width = len(scores[name]), current[name]
            now = table.layer_ms(current, name, width)
            for candidate in allowed[name]:
                if candidate >= width:
                    continue
                saved = now - table.layer_ms(current, name, candidate)
                if saved <= 0:
                    continue
                lost = cumulative[name][n - candidate] - cumulative[name][n - width]
                key = (lost / saved, -saved, name, candidate)
                if best is None or key < best:
                    best = key
        if best is None and closest:
            break
        if best is None:
            raise StageError(
                f"target_latency_ratio {target_latency_ratio:g} is out of reach: cutting these layers to the "
                f"widths the device runs fastest, down to min_channels={min_channels}, max_layer_ratio="
                f"{max_layer_ratio:g}, gives at most {before / predicted:.2f}x"
            )
        _, _, name, candidate = best
        current[name] = candidate
        predicted = table.network_ms(current)
    selection = {name: _entry(orders[name], len(values), current[name], list(values)) for name, values in scores.items()}
    info = {"latency_before_ms": before, "latency_after_ms": predicted, "latency_ratio": before / predicted,
            "round_to": {name: table.round_to(name) for name in scores},
            "latency_device": table.fingerprint, "latency_layout": table.fingerprint.get("layout"), "scope": scope,
            "importance_removed": sum(cumulative[name][len(scores[name]) - current[name]] for name in scores)}
    if predicted > goal:
        info["latency_short_of_target"] = predicted / goal
    return selection, info


SENSITIVITY_FLOOR = 0.05  # the least weight a layer gets: one whose cut costs nothing still keeps its ranking


def layer_sensitivity(model: nn.Module, scores: Mapping[str, Sequence[float]], loss_fn: LossFn,
                      batches: Iterable[Any], *, model_name: str, fraction: float = 0.5) -> dict[str, float]:
    """How much the model needs each layer of ``scores``, relative to the others (Li et al. 2017's
    sensitivity analysis, on the loss rather than the accuracy, which a detector loses entirely after any
    large cut): the rise of the mean ``loss_fn`` over ``batches`` when that layer alone loses its
    ``fraction`` lowest-scored filters (at least one kept), divided by the mean rise over the layers, at
    least ``SENSITIVITY_FLOOR``. 1 is an average layer. ``model`` is unchanged."""
    import copy

    batches = list(batches)
    if not batches:
        raise StageError("layer sensitivity needs at least one batch")

    @torch.no_grad()
    def mean_loss(net: nn.Module) -> float:
        net.eval()
        return sum(float(_total_loss(loss_fn(net, batch))) for batch in batches) / len(batches)

    base = mean_loss(model)
    rises = {}
    for name, values in scores.items():
        n = len(values)
        cut = min(n - 1, round(n * fraction))
        if cut < 1:
            rises[name] = 0.0
            continue
        pruned = copy.deepcopy(model)
        prune_filters(pruned, {name: {"remove": sorted(_ascending(values)[:cut]), "keep": n - cut}},
                      model_name=model_name)
        rises[name] = max(mean_loss(pruned) - base, 0.0)
    mean = sum(rises.values()) / len(rises) if rises else 0.0
    return {name: max(rise / mean if mean > 0 else 1.0, SENSITIVITY_FLOOR) for name, rise in rises.items()}


# --------------------------------------------------------------------------------------------
# Molchanov's iterative loop


def _cycle_batches(batches: Iterable[Any]):
    """Endless batches: re-iterates a re-iterable (a DataLoader), stops when a pass yields nothing."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def _taylor_step(
    ranked: list[tuple[float, str, int]],
    room: dict[str, int],
    want: int,
    estimate: FlopsModel | None,
    keep_fraction: float | None,
) -> dict[str, list[int]]:
    """Up to ``want`` filters, lowest score first, within each layer's ``room``: ``{layer: [index]}``.

    With a FLOPs goal (``keep_fraction``: the share of the current FLOPs to keep, priced by ``estimate``)
    the step stops as soon as the goal is reached, and passes over a filter whose removal would leave
    less than ``keep_fraction / (1 + FLOPS_TOLERANCE)``: the last step removes fewer (or cheaper) filters.
    """
    chosen: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    floor = keep_fraction / (1 + FLOPS_TOLERANCE) if keep_fraction is not None else None
    closest: tuple[float, str, int] | None = None  # the passed-over filter that overshoots least
    for _, name, f in ranked:
        if want <= 0:
            break
        if room[name] <= 0:
            continue
        if estimate is not None:
            fraction = estimate.flops({**counts, name: counts.get(name, 0) + 1}) / estimate.base
            if fraction < floor:
                if not chosen and (closest is None or fraction > closest[0]):
                    closest = (fraction, name, f)
                continue
        chosen.setdefault(name, []).append(f)
        counts[name] = counts.get(name, 0) + 1
        room[name] -= 1
        want -= 1
        if estimate is not None and fraction <= keep_fraction:
            break
    if not chosen and closest is not None:  # every filter with room overshoots: take the smallest overshoot
        _, name, f = closest
        chosen[name] = [f]
    return chosen


def taylor_prune(
    model: nn.Module,
    layers: Iterable[LayerRef],
    loss_fn: LossFn,
    batches: Iterable[Any],
    finetune_fn: Callable[[nn.Module, int], Any] | None,
    cfg: SelectionConfig,
    *,
    model_name: str | None = None,
    dg: tp.DependencyGraph | None = None,
    input_size: tuple[int, int] | None = None,
    max_steps: int = 10_000,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Molchanov et al. 2017: score, remove the globally lowest ``cfg.taylor_step_filters``, fine-tune, repeat.

    Stops when ``cfg.prune_ratio`` of the phase's filters are gone or the FLOPs shrank by
    ``cfg.target_flops_ratio`` (whichever is set; with both, the first reached). Each step scores over
    ``cfg.taylor_batches`` batches of ``batches`` (a DataLoader is re-iterated as needed), then calls
    ``finetune_fn(model, cfg.taylor_finetune_batches)`` unless it was the last step (the model changed
    shape: the callee builds its optimizer anew). Each layer keeps at least
    ``selection.layer_floor`` of its width when the loop started (``cfg.min_channels``,
    ``cfg.max_layer_ratio``); ``cfg.round_to`` is not applied (a step removes single filters) **(ours)**.
    The step that reaches the FLOPs target takes filters in rank order but passes over any whose removal
    would overshoot it by more than ``FLOPS_TOLERANCE`` (``FlopsModel`` prices each removal), so the
    result lands in [target, (1 + FLOPS_TOLERANCE)·target] unless no single filter fits (then the one that
    overshoots least is removed) **(ours)**.
    Prunes ``model`` in place.

    ``history``: one entry per step, ``{"step", "removed": {layer: [original filter indices]},
    "filters", "flops", "flops_ratio", "removed_fraction"}`` (JSON-able).
    """
    if cfg.prune_ratio is None and cfg.target_flops_ratio is None:
        raise ConfigError("criterion 'taylor' needs stages.selection.prune_ratio or target_flops_ratio")
    names = [item if isinstance(item, str) else item[0] for item in layers]
    dg = dg or build_dependency_graph(model, input_size)
    pairs = resolve_layers(model, model_name, names, dg=dg)
    size = input_size or input_size_of(model)
    original = {name: list(range(layer_channels(layer))) for name, layer in pairs}
    floors = {name: layer_floor(len(ids), cfg.min_channels, cfg.max_layer_ratio) for name, ids in original.items()}
    total = sum(len(ids) for ids in original.values())
    target_removed = math.ceil(cfg.prune_ratio * total) if cfg.prune_ratio is not None else None
    base_flops = count_flops(model, size)
    flops_goal = base_flops / cfg.target_flops_ratio if cfg.target_flops_ratio is not None else None
    stream = _cycle_batches(batches)
    history: list[dict[str, Any]] = []
    removed_total = 0
    flops = base_flops

    def done() -> bool:
        return (target_removed is not None and removed_total >= target_removed) or (
            flops_goal is not None and flops <= flops_goal
        )

    for step in range(1, max_steps + 1):
        if done():
            break
        scores = taylor_scores(model, dg, pairs, loss_fn, stream, cfg.taylor_batches)
        room = {name: layer_channels(layer) - floors[name] for name, layer in pairs}
        want = cfg.taylor_step_filters
        if target_removed is not None:
            want = min(want, target_removed - removed_total)
        ranked = sorted((float(s), name, f) for name, values in scores.items() for f, s in enumerate(values))
        chosen = _taylor_step(ranked, room, want, FlopsModel(model, dg, pairs, size) if flops_goal else None,
                              flops_goal / flops if flops_goal else None)
        if not chosen:
            log.warning("taylor: every layer is at its floor (min_channels=%d, max_layer_ratio=%g); stopping "
                        "before the target", cfg.min_channels, cfg.max_layer_ratio)
            history.append({"step": step, "stopped": "all layers at their floor"})
            break
        prune_filters(model, chosen, dg=dg)
        removed_ids = {}
        for name, idxs in chosen.items():
            drop = set(idxs)
            removed_ids[name] = sorted(original[name][i] for i in idxs)
            original[name] = [orig for i, orig in enumerate(original[name]) if i not in drop]
        removed_total += sum(len(idxs) for idxs in chosen.values())
        flops = count_flops(model, size)
        history.append({
            "step": step,
            "removed": removed_ids,
            "filters": total - removed_total,
            "removed_fraction": removed_total / total,
            "flops": flops,
            "flops_ratio": base_flops / max(flops, 1),
        })
        log.info("taylor step %d: removed %d filters (%.1f%%), FLOPs %.3g (%.2fx)", step, removed_total,
                 100 * removed_total / total, flops, base_flops / max(flops, 1))
        if not done() and finetune_fn is not None and cfg.taylor_finetune_batches > 0:
            finetune_fn(model, cfg.taylor_finetune_batches)
    return model, history
