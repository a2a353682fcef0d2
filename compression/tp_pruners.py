"""torch-pruning's own high-level pruners on our models, driven to a FLOPs target (baselines of bench/quality.py),
and GroupNormPruner's regulariser, which the sparsity stage of the ``group_norm`` criterion trains with.

Each is built the way torch-pruning's README and its CIFAR benchmarks (``benchmarks/main.py``) use it:

- ``tp_group_l1``: ``tp.pruner.MagnitudePruner`` with ``GroupMagnitudeImportance(p=1)`` (group L1 over
  every layer of the group, mean-normalised per group so that groups compare globally).
- ``tp_bn_scale``: ``tp.pruner.BNScalePruner`` with ``BNScaleImportance()`` and ``reg=1e-5`` (Network
  Slimming; the benchmarks' ``slim`` setting), after sparse training.
- ``tp_group_norm``: ``tp.pruner.GroupNormPruner`` with ``GroupMagnitudeImportance(p=2)`` and ``reg=5e-4``
  (DepGraph's group sparsity; the benchmarks' CIFAR setting), after sparse training.

Common settings: ``global_pruning=True``, ``pruning_ratio=1.0`` spread over ``iterative_steps`` (200) small
steps, and ``pruner.step()`` repeated until the model's FLOPs are at most base / target, as the benchmarks'
``prune_to_target_macs`` does (**ours**: the step that crosses the target stops there, filter by filter, so
every method lands on the same FLOPs). ``ignored_layers`` is every Conv2d/Linear outside the phase's layers (the SSD
loc/conf head convs, a classifier's output layer): no group is rooted there, but they still lose the input
channels of the layers that feed them. **(ours)** Every layer keeps at least ``min_channels`` filters, the
floor every other criterion of the project obeys: each step runs interactively (``pruner.step(interactive=
True)``, as the README shows) and a group that would go below the floor keeps its most important filters
(by the pruner's own importance); torch-pruning alone stops a layer only at one channel.

Detectors are traced through ``SSDNetwork`` (``pruning._traced_network``), which shares the SSD's modules,
so pruning it prunes the SSD in place and the result saves and loads as any pruned checkpoint
(``checkpoint.save_checkpoint`` records the shapes). Sparse training (``sparse_train``) runs the project's
training loop with ``pruner.regularize(model)`` between ``loss.backward()`` and ``optimizer.step()``, as the
README's sparse-training loop does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy as copy_module
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from compression.config import OptimConfig
from compression.errors import ConfigError, StageError
from compression.pruning import (
    _traced_network,
    build_dependency_graph,
    count_flops,
    input_size_of,
    layer_channels,
    resolve_layers,
)

__all__ = [
    "SPARSE_TRAINING", "TP_METHODS", "build_pruner", "prune_to_flops", "regularising", "select_by_pruner", "sparse_train",
]

TP_METHODS = ("tp_group_l1", "tp_bn_scale", "tp_group_norm")
# Pruners whose README usage trains with their regulariser before pruning.
SPARSE_TRAINING = ("tp_bn_scale", "tp_group_norm")
DEFAULT_REG = {"tp_bn_scale": 1e-5, "tp_group_norm": 5e-4}


def build_pruner(
    method: str,
    model: nn.Module,
    layers: Iterable[str],
    *,
    model_name: str | None = None,
    iterative_steps: int = 200,
    max_pruning_ratio: float = 1.0,
    reg: float | None = None,
    input_size: tuple[int, int] | None = None,
) -> tp.pruner.BasePruner:
    """torch-pruning's pruner ``method`` (``TP_METHODS``) over ``layers`` (paper names or module paths) of ``model``.

    Only groups rooted at ``layers`` are pruned; the model's train/eval flags are kept (tracing runs in eval
    mode, so BatchNorm statistics do not move).
    """
    if method not in TP_METHODS:
        raise ConfigError(f"torch-pruning method {method!r} is not one of {', '.join(TP_METHODS)}")
    height, width = input_size or input_size_of(model)
    pairs = resolve_layers(model, model_name, list(layers))
    phase = {id(module) for _, module in pairs}
    network, options = _traced_network(model)
    ignored = [m for m in network.modules() if isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in phase]
    if method == "tp_group_l1":
        entry, importance = tp.pruner.MagnitudePruner, tp.importance.GroupMagnitudeImportance(p=1)
        extra: dict[str, Any] = {}
    elif method == "tp_bn_scale":
        entry, importance = tp.pruner.BNScalePruner, tp.importance.BNScaleImportance()
        extra = {"reg": DEFAULT_REG[method] if reg is None else reg}
    else:
        entry, importance = tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2)
        extra = {"reg": DEFAULT_REG[method] if reg is None else reg}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        pruner = entry(
            network,
            torch.zeros(1, 3, height, width, device=device),
            importance=importance,
            global_pruning=True,
            pruning_ratio=1.0,
            iterative_steps=iterative_steps,
            max_pruning_ratio=max_pruning_ratio,
            ignored_layers=ignored,
            **options,
            **extra,
        )
    finally:
        for module, mode in modes.items():
            module.training = mode
    pruner.prunepipe_layers = [path for path, _ in pairs]
    return pruner


def _group_importance(pruner: tp.pruner.BasePruner, root: nn.Module, handler: Any) -> torch.Tensor | None:
    """The pruner's importance of each of ``root``'s filters, over the root's whole group."""
    return pruner.estimate_importance(pruner.DG.get_pruning_group(root, handler, list(range(layer_channels(root)))))


def _ascending(pruner: tp.pruner.BasePruner, root: nn.Module, handler: Any, idxs: Sequence[int]) -> list[int]:
    """``idxs`` from least to most important, by the pruner's importance of the root's whole group."""
    importance = _group_importance(pruner, root, handler)
    if importance is None:
        return list(idxs)
    return sorted(idxs, key=lambda i: (float(importance[i]), i))


def _step(pruner: tp.pruner.BasePruner, floors: dict[nn.Module, int], flops_after: Callable[[nn.Module, int], float],
          goal: float, on_prune: Callable[[nn.Module, list[int]], None] | None = None) -> bool:
    """One ``pruner.step()``; True when the FLOPs reached ``goal`` (then the rest of the step is not pruned).

    Each group comes as torch-pruning chose it; it is trimmed so its root layer keeps ``floors[root]`` filters,
    and the group that crosses ``goal`` gives up only its least important filters needed to reach it.
    ``flops_after(root, k)``: the model's FLOPs once ``k`` more filters of ``root`` are gone. ``on_prune(root,
    idxs)`` hears each group's root and its filters (positions in the root as it is then) before they go.
    """
    for group in pruner.step(interactive=True):  # groups must be pruned one by one, as they come
        dep, idxs = group[0]
        root = dep.target.module
        room = layer_channels(root) - floors.get(root, 1)
        if room <= 0:
            continue
        idxs = list(idxs)
        reached = flops_after(root, min(room, len(idxs))) <= goal
        if len(idxs) > room or reached:
            idxs = _ascending(pruner, root, dep.handler, idxs)[:room]
            if reached:
                idxs = idxs[: next(k for k in range(1, len(idxs) + 1) if flops_after(root, k) <= goal)]
            group = pruner.DG.get_pruning_group(root, dep.handler, sorted(idxs))
        if on_prune is not None:
            on_prune(root, [int(i) for i in group[0][1]])
        group.prune()
        if reached:
            return True
    return False


def prune_to_flops(
    pruner: tp.pruner.BasePruner,
    model: nn.Module,
    target_flops_ratio: float,
    *,
    min_channels: int = 1,
    max_layer_ratio: float = 1.0,
    input_size: tuple[int, int] | None = None,
    nearest: bool = False,
    on_prune: Callable[[nn.Module, list[int]], None] | None = None,
) -> dict[str, Any]:
    """``pruner.step()`` until ``count_flops(model)`` ≤ base / ``target_flops_ratio``. Prunes ``model`` in place.

    Every phase layer keeps at least ``selection.layer_floor(its filters, min_channels, max_layer_ratio)``
    filters; the step that
    crosses the target stops at it, filter by filter (``_step``), so all methods land on the same FLOPs. The
    FLOPs between steps come from ``criteria.FlopsModel`` (exact for convs and linears, no re-tracing); the
    final value is ``count_flops``'s. ``on_prune``: see ``_step``. Returns ``{"flops_before", "flops_after", "flops_ratio", "steps",
    "channels": {layer: [before, after]}, "reached"}``. When the pruner's steps run out first: ``StageError``,
    or with ``nearest`` the model as far as the pruner went, with ``"reached": False`` (a control at equal
    FLOPs then reports the FLOPs it really has rather than no row).
    """
    from compression.criteria import FlopsModel
    from compression.selection import layer_floor

    if not target_flops_ratio > 1:
        raise ConfigError(f"target_flops_ratio must be > 1, got {target_flops_ratio}")
    size = input_size or input_size_of(model)
    layers: Sequence[str] = getattr(pruner, "prunepipe_layers", None) or []
    if not layers:
        raise StageError("prune_to_flops: the pruner was not made by build_pruner (no phase layers recorded)")
    modules = {name: model.get_submodule(name) for name in layers}
    names = {module: name for name, module in modules.items()}
    original = {name: layer_channels(module) for name, module in modules.items()}
    floors = {modules[name]: layer_floor(n, min_channels, max_layer_ratio) for name, n in original.items()}
    before = count_flops(model, size)
    goal = before / target_flops_ratio
    estimate = FlopsModel(model, build_dependency_graph(model, size), list(layers), size)

    def flops_after(root: nn.Module | None = None, more: int = 0) -> float:
        removed = {name: original[name] - layer_channels(m) for name, m in modules.items()}
        if root in names:
            removed[names[root]] += more
        return estimate.flops(removed)

    flops, steps = before, 0
    was_training = model.training
    model.eval()
    try:
        while flops > goal:
            if pruner.current_step >= pruner.iterative_steps:
                if nearest:
                    flops = count_flops(model, size)
                    break
                raise StageError(
                    f"target_flops_ratio {target_flops_ratio:g} is out of reach for {type(pruner).__name__}: "
                    f"after {steps} steps the FLOPs shrank {before / flops:.2f}x"
                )
            _step(pruner, floors, flops_after, goal, on_prune)
            steps += 1
            flops = flops_after()
            if flops <= goal:
                flops = count_flops(model, size)
    finally:
        model.train(was_training)
    return {
        "flops_before": before,
        "flops_after": flops,
        "flops_ratio": before / max(flops, 1),
        "steps": steps,
        "channels": {name: [original[name], layer_channels(m)] for name, m in modules.items()},
        "reached": flops <= goal,
    }


def sparse_train(
    pruner: tp.pruner.BasePruner,
    model: nn.Module,
    objective: nn.Module,
    loader: Iterable,
    optim: OptimConfig,
    *,
    device: torch.device | str = "cpu",
    context: str = "",
) -> list[dict[str, float]]:
    """Train ``objective`` (the task loss of ``model``) with ``pruner.regularize(model)`` before every step.

    The project's loop (``train.train_model``) does backward, gradient clipping and the optimizer step; an
    optimizer step pre-hook, active only for the optimizer over ``model``'s parameters and only during this
    call, adds the pruner's regularisation gradients in between. Returns the per-epoch history.
    """
    from compression.train import train_model

    with regularising(pruner, model):
        state = train_model(objective, loader, optim, device=device, context=context or "sparse training",
                            progress=False)
    return state.history


@contextmanager
def regularising(pruner: tp.pruner.BasePruner, model: nn.Module) -> Iterator[None]:
    """``pruner.regularize(model)`` between ``loss.backward()`` and every ``optimizer.step()`` over ``model``'s
    parameters, while the block runs: an optimizer step pre-hook, so the project's training loop (gradient
    clipping included) runs unchanged, and other optimizers (a teacher's, another job's) are left alone."""
    own = {id(p) for p in model.parameters()}

    def regularize(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            pruner.regularize(model)

    pruner.update_regularizer()
    handle = register_optimizer_step_pre_hook(regularize)
    try:
        yield
    finally:
        handle.remove()


def select_by_pruner(
    model: nn.Module,
    model_name: str | None,
    layers: Sequence[str],
    target_flops_ratio: float,
    *,
    min_channels: int = 1,
    max_layer_ratio: float = 1.0,
    reg: float = DEFAULT_REG["tp_group_norm"],
    closest: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The filters torch-pruning's ``GroupNormPruner`` removes from ``layers`` on its way to the FLOPs target,
    as a selection (criterion ``group_norm`` with ``target_flops_ratio``): ``prune_to_flops`` on a copy of
    ``model``, its small global steps re-ranking the groups after each, with every removal mapped back to the
    filter's index in ``model``. ``model`` is not changed; pruning it by the selection gives the copy's
    architecture and weights.

    Returns ``({layer: {"remove", "keep", "scores"}}, {"flops_before", "flops_after", "flops_ratio", "steps",
    "reached", "ranking"})``; ``scores`` is each filter's group importance on ``model`` (L2, mean-normalised per
    layer). A target the floors or the pruner's steps cannot reach: ``StageError``, or with ``closest`` as
    far as they go (``reached`` False).
    """
    copy = copy_module(model).cpu().eval()
    pruner = build_pruner("tp_group_norm", copy, layers, model_name=model_name, reg=reg)
    pairs = [(name, copy.get_submodule(name)) for name in pruner.prunepipe_layers]
    names = {module: name for name, module in pairs}
    scores = {}
    for name, module in pairs:
        importance = _group_importance(pruner, module, pruner.DG.get_pruner_of_module(module).prune_out_channels)
        scores[name] = [float(v) for v in importance] if importance is not None else []
    alive = {name: list(range(layer_channels(module))) for name, module in pairs}
    removed: dict[str, list[int]] = {name: [] for name, _ in pairs}

    def record(root: nn.Module, idxs: list[int]) -> None:  # every group is rooted in the phase (ignored_layers)
        name, gone = names[root], set(idxs)
        removed[name] += [alive[name][i] for i in gone]
        alive[name] = [index for position, index in enumerate(alive[name]) if position not in gone]

    info = prune_to_flops(pruner, copy, target_flops_ratio, min_channels=min_channels,
                          max_layer_ratio=max_layer_ratio, nearest=closest, on_prune=record)
    selection = {name: {"remove": sorted(removed[name]), "keep": len(alive[name]), "scores": scores[name]}
                 for name, _ in pairs}
    return selection, {key: info[key] for key in ("flops_before", "flops_after", "flops_ratio", "steps", "reached")} | {
        "ranking": "GroupNormPruner, global, re-ranked every step"}
