"""Model registry: build models by name and name their layers as the paper does.

``layer_names(model)`` maps paper names (conv1_1 ... conv5_3, fc6, fc7 (= the paper's conv7),
conv8_1 ... conv11_2) to module paths; ``DEFAULT_PHASES`` groups paper names into pruning phases.
Module paths are valid both in the model and in ``SSDNetwork(model)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD

from compression.errors import ModelError
from compression.models.ssd import (
    LITE_LAYER_PATHS,
    SSD300_LAYER_PATHS,
    L2Norm,
    L2NormPruner,
    SSDNetwork,
    apply_postprocess_settings,
    dependency_graph_options,
    load_state_dict_strict,
    load_weights,
    postprocess_settings,
    read_state_dict,
    remove_lite_layers,
    ssd300_vgg16,
    ssd_default_boxes,
    ssd_feature_sizes,
    ssd_input_size,
    ssd_vgg_lite,
)
from compression.models.vgg_cifar import VGG_CIFAR_LAYER_PATHS, VGGCifar, vgg16_cifar

__all__ = [
    "DEFAULT_PHASES",
    "MODEL_NAMES",
    "L2Norm",
    "L2NormPruner",
    "SSDNetwork",
    "apply_postprocess_settings",
    "build_model",
    "dependency_graph_options",
    "layer_names",
    "load_state_dict_strict",
    "load_weights",
    "model_input_size",
    "model_task",
    "postprocess_settings",
    "present_layers",
    "prunable_layers",
    "prune_to_match",
    "read_state_dict",
    "remove_layers",
    "ssd_default_boxes",
    "ssd_feature_sizes",
]

MODEL_NAMES: tuple[str, ...] = ("ssd300_vgg16", "ssd_vgg_lite", "vgg16_cifar")

_TASKS = {"ssd300_vgg16": "detection", "ssd_vgg_lite": "detection", "vgg16_cifar": "classification"}
_LAYER_PATHS = {
    "ssd300_vgg16": SSD300_LAYER_PATHS,
    "ssd_vgg_lite": LITE_LAYER_PATHS,
    "vgg16_cifar": VGG_CIFAR_LAYER_PATHS,
}
# Options each builder accepts besides num_classes.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ssd300_vgg16": ("weights_path",),
    "ssd_vgg_lite": ("width_mult", "image_size", "weights_path", "batch_norm", "removed_layers"),
    "vgg16_cifar": ("width_mult", "image_size", "weights_path"),
}

# The paper's four SSD300 phases (conv1_1..conv4_3, conv4_3..fc7, fc7..conv8_2, conv8_2..conv11_2): each
# phase after the first starts with the previous one's last layer, so that layer is pruned again once
# its consumers (L1-trained and thresholded in that phase) give it a real s_in. The classifier is pruned
# in one phase (ours).
_SSD_PHASES: list[list[str]] = [
    ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
     "conv4_1", "conv4_2", "conv4_3"],
    ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7"],
    ["fc7", "conv8_1", "conv8_2"],
    ["conv8_2", "conv9_1", "conv9_2", "conv10_1", "conv10_2", "conv11_1", "conv11_2"],
]  # fmt: skip
DEFAULT_PHASES: dict[str, list[list[str]]] = {
    "ssd300_vgg16": [list(phase) for phase in _SSD_PHASES],
    "ssd_vgg_lite": [list(phase) for phase in _SSD_PHASES],
    "vgg16_cifar": [list(VGG_CIFAR_LAYER_PATHS)],
}


def _check_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    return name


def model_task(name: str) -> str:
    """The model's task: "detection" or "classification"."""
    return _TASKS[_check_name(name)]


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build model ``name`` with random weights (or ``weights_path``); detectors count background in num_classes."""
    _check_name(name)
    valid = _OPTIONS[name]
    for option in options:
        if option not in valid:
            raise ModelError(
                f"unknown option {option!r} for model {name!r}; valid options: {', '.join(valid)}"
            )
    builders: dict[str, Callable[..., nn.Module]] = {
        "ssd300_vgg16": ssd300_vgg16,
        "ssd_vgg_lite": ssd_vgg_lite,
        "vgg16_cifar": vgg16_cifar,
    }
    weights_path: str | Path | None = options.pop("weights_path", None)
    model = builders[name](num_classes=num_classes, **options)
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model works at: an SSD's fixed resize size, a classifier's image size."""
    if isinstance(model, SSD):
        return ssd_input_size(model)
    if isinstance(model, VGGCifar):
        return model.image_size
    raise ModelError(f"model_input_size: unsupported model type {type(model).__name__}")


def layer_names(model_name: str) -> dict[str, str]:
    """Paper layer name -> module path, in forward order."""
    return dict(_LAYER_PATHS[_check_name(model_name)])


def prunable_layers(model_name: str, model: nn.Module | None = None) -> list[str]:
    """Module paths of the convs whose output channels may be removed (never the SSD head's), in forward order;
    with ``model``, those it still has (a conv removed whole is an identity: ``remove_layers``)."""
    paths = list(_LAYER_PATHS[_check_name(model_name)].values())
    return paths if model is None else present_layers(model_name, model, paths)


def present_layers(model_name: str, model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (paper names or module paths) less the convs ``model`` has lost whole (identities:
    ``remove_layers``), in the order given."""
    paper, modules = layer_names(model_name), dict(model.named_modules())
    return [name for name in names if not isinstance(modules.get(paper.get(name, name)), nn.Identity)]


def remove_layers(model_name: str, model: nn.Module, names: list[str]) -> nn.Module:
    """Remove the convs ``names`` (paper names) from ``model`` whole, in place (layer pruning; one-line
    ModelError for a model or a layer that does not allow it)."""
    if _check_name(model_name) != "ssd_vgg_lite":
        raise ModelError(f"{model_name}: layer removal is implemented for ssd_vgg_lite only")
    return remove_lite_layers(model, names)


def removed_from(model_name: str, reference: nn.Module, model: nn.Module) -> list[str]:
    """Paper names of the convs ``reference`` has and ``model`` has lost whole (``remove_layers``), in forward
    order."""
    names = list(layer_names(model_name))
    kept = set(present_layers(model_name, model, names))
    return [name for name in present_layers(model_name, reference, names) if name not in kept]


def prune_to_match(model_name: str, model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Shrink a freshly built ``model`` in place so a pruned model's ``state`` fits it.

    For every prunable conv whose saved weight has fewer output channels, the trailing channels are
    removed with torch-pruning (with all their consumers); ``load_state_dict_strict`` then fills in the
    values. So a pruned checkpoint needs only the model's name and build options besides its weights.
    """
    network, options = (
        (SSDNetwork(model), dependency_graph_options(model)) if isinstance(model, SSD) else (model, {})
    )
    height, width = model_input_size(model)
    was_training = model.training
    model.eval()  # trace without touching BatchNorm running statistics
    try:
        graph = tp.DependencyGraph().build_dependency(
            network, example_inputs=torch.zeros(1, 3, height, width), verbose=False, **options
        )
        for path in prunable_layers(model_name, model):
            saved = state.get(f"{path}.weight")
            conv = model.get_submodule(path)
            if saved is None or saved.ndim != 4 or not 0 < saved.shape[0] < conv.out_channels:
                continue  # missing or wrong keys are reported by load_state_dict_strict
            surplus = list(range(saved.shape[0], conv.out_channels))
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=surplus).prune()
    finally:
        model.train(was_training)
    return model
