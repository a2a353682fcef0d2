"""Structural filter pruning: the dependency graph, layer lookup, consumers, and explicit-index removal.

The graph is kept apart from any importance criterion (torch-pruning's own design): criteria and the
seed's sparsity selection produce plain ``{layer: [filter indices]}`` data, and ``prune_filters`` removes
exactly those output channels together with the matching input channels of every consumer (next conv,
BatchNorm, L2Norm scale, SSD loc/conf head convs) through ``torch_pruning.DependencyGraph``. The result
is a dense, smaller model, not a mask.

Layer names: everything here is keyed by *module paths* of the model (``backbone.features.21``,
``features.conv4_3``); ``resolve_layers`` also accepts the paper's names (``conv4_3``, ``fc7``) through
the model registry's ``layer_names``. Detectors are traced through ``SSDNetwork`` (backbone + head on an
already normalised input of the model's size), whose module paths equal the SSD's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.detection.ssd import SSD

from compression.errors import ConfigError, StageError

__all__ = [
    "LayerRef",
    "build_dependency_graph",
    "consumer_input_means",
    "consumers_of",
    "count_flops",
    "count_parameters",
    "layer_channels",
    "input_size_of",
    "prune_filters",
    "removal_indices",
    "resolve_layers",
]

LayerRef = str | tuple[str, nn.Module]

# Layer types whose output channels ("filters") can be removed.
_PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
# Graph nodes a channel passes through unchanged (ReLU, pooling, add, ...): followed when looking for
# the modules that read a layer's output.
_PASS_THROUGH = (tp.ops.OPTYPE.ELEMENTWISE,)


# --------------------------------------------------------------------------------------------
# The graph


def input_size_of(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model runs at: the registry's ``model_input_size``, else an SSD's fixed size."""
    from compression.models import model_input_size

    try:
        return model_input_size(model)
    except Exception:  # noqa: BLE001 - models outside the registry (tests, user nets)
        if isinstance(model, SSD) and model.transform.fixed_size is not None:
            width, height = model.transform.fixed_size
            return int(height), int(width)
        size = getattr(model, "image_size", None) or getattr(model, "input_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, Sequence) and len(size) == 2:
            return int(size[0]), int(size[1])
        raise ConfigError(
            f"cannot tell the input size of a {type(model).__name__}; pass input_size=(height, width)"
        ) from None


def _traced_network(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """What torch-pruning traces, and its build options: an SSD's tensor network or the model itself."""
    if isinstance(model, SSD):
        from compression.models import SSDNetwork, dependency_graph_options

        return SSDNetwork(model), dependency_graph_options(model)
    from compression.models import L2Norm, L2NormPruner

    options: dict[str, Any] = {}
    if any(isinstance(m, L2Norm) for m in model.modules()):
        options["customized_pruners"] = {L2Norm: L2NormPruner()}
    return model, options


def build_dependency_graph(model: nn.Module, input_size: tuple[int, int] | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` (traced once on a zero input of the model's size).

    Detectors are traced through ``SSDNetwork`` with the registry's ``dependency_graph_options`` (the
    ``L2Norm`` pruner and torchvision's raw conv4_3 ``scale_weight`` parameter, pruned along dim 0). The
    graph stays valid while pruning it in place; it must be rebuilt for a copy of the model. The
    model's train/eval flags are restored (tracing runs in eval mode, so BatchNorm statistics stay put).
    """
    height, width = input_size or input_size_of(model)
    network, options = _traced_network(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                network, example_inputs=torch.zeros(1, 3, height, width, device=device), verbose=False, **options
            )
    finally:
        for module, mode in modes.items():
            module.training = mode
    # Names relative to the model itself (the traced wrapper may add a prefix); unwrapped parameters
    # (torchvision's scale_weight) are named by their parameter path.
    names: dict[Any, str] = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    dg.prunepipe_model = model
    dg.prunepipe_names = names
    dg.prunepipe_input_size = (height, width)
    return dg


def _graph_name(dg: tp.DependencyGraph, module: Any) -> str:
    name = getattr(dg, "prunepipe_names", {}).get(module)
    if name is None:
        model = getattr(dg, "prunepipe_model", None)
        if model is not None and isinstance(module, nn.Parameter):
            name = next((n for n, p in model.named_parameters() if p is module), None)
    return name if name is not None else dg._module2name.get(module, repr(module))


def _out_pruning_fn(layer: nn.Module):
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def layer_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# --------------------------------------------------------------------------------------------
# Layers


def _is_detector_head(model: nn.Module, path: str) -> bool:
    return isinstance(model, SSD) and (path == "head" or path.startswith("head."))


def _reaches_output(dg: tp.DependencyGraph, layer: nn.Module) -> bool:
    """True when the layer's channels reach the network output without any module reading them."""
    start = dg.module2node.get(layer)
    if start is None:
        return False
    if not start.outputs:
        return True  # the traced output itself (e.g. a classifier's last Linear)
    stack, seen = list(start.outputs), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return True
        if node.type in _PASS_THROUGH:
            stack.extend(node.outputs)
    return False


def resolve_layers(
    model: nn.Module,
    model_name: str | None,
    names: Iterable[str],
    dg: tp.DependencyGraph | None = None,
) -> list[tuple[str, nn.Module]]:
    """``[(module_path, layer)]`` for paper names (``conv4_3``) or module paths, in the order given.

    Refuses (``ConfigError``, one line) a name that is no module of the model, a module that is not a
    Conv2d/Linear, an SSD head conv (a consumer, never pruned on its outputs) and a layer whose outputs
    are the network's outputs (a classifier's last Linear). ``dg`` (optional) saves a graph build.
    """
    paper: dict[str, str] = {}
    if model_name is not None:
        from compression.models import layer_names

        paper = layer_names(model_name)
    modules = dict(model.named_modules())
    where = model_name or type(model).__name__
    resolved: list[tuple[str, nn.Module]] = []
    for name in names:
        path = paper.get(name, name)
        module = modules.get(path) if path else None
        if module is None:
            known = ", ".join(list(paper)[:3]) + ", ..." if paper else "module paths of the model"
            raise ConfigError(f"{where}: unknown layer {name!r} (expected a paper name such as {known} or a module path)")
        label = name if path == name else f"{name!r} ({path})"
        if not isinstance(module, _PRUNABLE_TYPES):
            raise ConfigError(f"{where}: layer {label} is a {type(module).__name__}, not a prunable Conv2d/Linear")
        if _is_detector_head(model, path):
            raise ConfigError(f"{where}: layer {label} is an SSD head conv (its outputs are predictions; it is only a consumer)")
        resolved.append((path, module))
    if len({p for p, _ in resolved}) != len(resolved):
        raise ConfigError(f"{where}: a layer is listed twice in {list(names)}")
    if resolved:
        dg = dg or build_dependency_graph(model)
        for path, module in resolved:
            if module not in dg.module2node:
                raise ConfigError(f"{where}: layer {path!r} is not used in the forward pass, cannot prune it")
            if _reaches_output(dg, module):
                raise ConfigError(f"{where}: layer {path!r} produces the network's outputs, its channels cannot be removed")
    return resolved


def _as_layers(model: nn.Module, layers: Iterable[LayerRef]) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs from module paths or already-resolved pairs (no prunability checks)."""
    out: list[tuple[str, nn.Module]] = []
    for item in layers:
        if isinstance(item, tuple):
            out.append((item[0], item[1]))
        else:
            try:
                out.append((item, model.get_submodule(item)))
            except AttributeError:
                raise ConfigError(f"{type(model).__name__}: no module {item!r}") from None
    return out


# --------------------------------------------------------------------------------------------
# Consumers


def _consumer_kind(model: nn.Module | None, name: str, module: Any) -> str:
    if isinstance(module, nn.Parameter):
        return "scale"  # torchvision's conv4_3 L2Norm scale (a raw parameter)
    if isinstance(module, nn.Conv2d):
        if model is not None and _is_detector_head(model, name):
            return "head"
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if type(module).__name__ == "L2Norm":
        return "l2norm"
    return type(module).__name__.lower()


def _channel_group(dg: tp.DependencyGraph, layer: nn.Module, idxs: Sequence[int] | None = None):
    if idxs is None:
        idxs = list(range(layer_channels(layer)))
    return dg.get_pruning_group(layer, _out_pruning_fn(layer), idxs=list(idxs))


def consumers_of(dg: tp.DependencyGraph, layer: nn.Module) -> list[tuple[str, Any, str]]:
    """Every module that reads ``layer``'s output channels: ``[(name, module, kind)]`` in graph order.

    ``kind`` is one of conv, head (an SSD loc/conf conv), depthwise, linear, bn, l2norm, scale
    (torchvision's raw conv4_3 scale parameter). These are exactly the non-root members of the layer's
    torch-pruning group, i.e. what ``prune_filters`` changes besides the layer itself.
    """
    model = getattr(dg, "prunepipe_model", None)
    found: list[tuple[str, Any, str]] = []
    seen: set[int] = set()
    for index, item in enumerate(_channel_group(dg, layer, [0])):
        target = item.dep.target
        if index == 0 or target.type in _PASS_THROUGH or target.type == tp.ops.OPTYPE.OUTPUT:
            continue
        module = target.module
        if type(module).__module__.startswith("torch_pruning"):
            continue  # reshape / concat / split bookkeeping nodes
        if id(module) in seen or module is layer:
            continue
        seen.add(id(module))
        name = _graph_name(dg, module)
        found.append((name, module, _consumer_kind(model, name, module)))
    return found


# --------------------------------------------------------------------------------------------
# Pruning


def removal_indices(selection: Mapping[str, Any]) -> dict[str, list[int]]:
    """``{layer: [idx]}`` from either that or ``select_filters``/criteria output (``{layer: {"remove": [...]}}``)."""
    out: dict[str, list[int]] = {}
    for name, value in selection.items():
        idxs = value.get("remove", []) if isinstance(value, Mapping) else value
        out[name] = [int(i) for i in idxs]
    return out


def _compensable(module: Any, channels: int) -> bool:
    """A consumer whose bias can absorb removed input channels: a dense conv or linear reading all of them."""
    if getattr(module, "bias", None) is None:
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.in_channels == channels
    return isinstance(module, nn.Linear) and module.in_features == channels


def consumer_input_means(
    model: nn.Module,
    selection: Mapping[str, Any],
    forward: Callable[[nn.Module], None],
    *,
    model_name: str | None = None,
    dg: tp.DependencyGraph | None = None,
) -> dict[str, torch.Tensor]:
    """Per-channel mean input of every conv/linear consumer of the selected layers: ``{consumer: (C,)}``.

    ``forward(model)`` runs a few batches through the model (eval mode and no_grad are set here). The
    means feed ``prune_filters(compensate=...)``.
    """
    wanted = removal_indices(selection)
    dg = dg or build_dependency_graph(model)
    targets: dict[str, nn.Module] = {}
    for _path, layer in resolve_layers(model, model_name, [n for n, i in wanted.items() if i], dg=dg):
        for name, module, _kind in consumers_of(dg, layer):
            if _compensable(module, layer_channels(layer)):
                targets[name] = module
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(targets, 0)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().float()
            dims = [0, *range(2, x.dim())]
            total = x.sum(dim=dims).cpu()
            sums[name] = sums[name] + total if name in sums else total
            counts[name] += x.numel() // x.shape[1]

        return hook

    hooks = [module.register_forward_pre_hook(make_hook(name)) for name, module in targets.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sums if counts[name]}


def _fold_into_consumers(dg: tp.DependencyGraph, layer: nn.Module, idxs: list[int],
                         means: Mapping[str, torch.Tensor]) -> None:
    """Add what the removed channels fed each consumer on average to its bias (a removed filter whose
    weights are near zero still outputs ReLU(bias), a constant that the next layer has learnt to expect)."""
    channels = layer_channels(layer)
    for name, module, _kind in consumers_of(dg, layer):
        mean = means.get(name)
        if mean is None or not _compensable(module, channels) or mean.numel() != channels:
            continue
        index = torch.tensor(idxs, dtype=torch.long)
        with torch.no_grad():
            weight = module.weight.detach()
            per_input = weight.flatten(2).sum(dim=2) if weight.dim() > 2 else weight  # (out, in)
            shift = per_input[:, index].float() @ mean[index].to(per_input.device)
            module.bias.add_(shift.to(module.bias.dtype))


def prune_filters(
    model: nn.Module,
    selection: Mapping[str, Any],
    *,
    model_name: str | None = None,
    dg: tp.DependencyGraph | None = None,
    compensate: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Remove exactly the selected output channels of each layer, with every consumer's inputs. In place.

    ``selection``: ``{layer: [filter indices]}`` (or the ``{layer: {"remove": [...]}}`` that selection
    returns); layers are module paths, or paper names when ``model_name`` is given. Indices refer to the
    layer as it is now. Refuses an unknown/non-prunable layer (``ConfigError``), an index out of range and
    a selection that would remove every filter of a layer or every input of a consumer (``StageError``).
    Returns ``model`` (now smaller); optimizers built on its old parameters must be rebuilt.
    ``dg`` (a graph of this very model) is reused and stays valid. ``compensate`` (the
    ``consumer_input_means`` of this model) folds the removed channels' mean contribution into the
    consumers' biases first (exact for a constant channel, up to the zero padding at the borders).
    """
    wanted = removal_indices(selection)
    dg = dg or build_dependency_graph(model)
    layers = resolve_layers(model, model_name, list(wanted), dg=dg)
    plan: list[tuple[str, nn.Module, list[int]]] = []
    for (path, layer), (name, idxs) in zip(layers, wanted.items(), strict=True):
        n = layer_channels(layer)
        unique = sorted(set(idxs))
        bad = [i for i in unique if not 0 <= i < n]
        if bad:
            raise StageError(f"prune: layer {name!r} has {n} filters, cannot remove index {bad[0]}")
        if len(unique) >= n:
            raise StageError(f"prune: the selection removes all {n} filters of layer {name!r}; keep at least one")
        if unique:
            plan.append((path, layer, unique))
    for path, layer, idxs in plan:
        group = _channel_group(dg, layer, idxs)
        if not dg.check_pruning_group(group):
            raise StageError(f"prune: removing {len(idxs)} filters of {path!r} would empty one of its consumers")
        if compensate:
            _fold_into_consumers(dg, layer, idxs, compensate)
        group.prune()
    return model


# --------------------------------------------------------------------------------------------
# Size


def count_parameters(model: nn.Module) -> int:
    """Parameter elements (the project's ``metrics.count_parameters``)."""
    from compression import metrics

    return metrics.count_parameters(model)


def count_flops(model: nn.Module, input_size: tuple[int, int] | None = None) -> int:
    """FLOPs of one forward at batch 1 (the project's ``metrics.count_flops``: 2 per multiply-add)."""
    from compression import metrics

    return metrics.count_flops(model, input_size or input_size_of(model))
