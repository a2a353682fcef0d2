"""SSD detectors: torchvision's SSD300/VGG16 and a narrow SSD on a VGG16 we build ourselves.

Both are ``torchvision.models.detection.SSD`` instances, so the multibox loss, default boxes, box coding
and post-processing are torchvision's code. ``SSDNetwork`` exposes the plain tensor-in/tensors-out
network (backbone + head) that pruning traces and ONNX export uses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead

from compression.errors import ModelError

# SSD300's aspect ratios per feature map (torchvision's ssd300_vgg16 uses the same).
SSD_ASPECT_RATIOS: list[list[int]] = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]

# Default-box scales of ssd_vgg_lite (fractions of the image side), one per feature map plus the one
# after the last (used for the extra sqrt(s_k * s_k+1) box). Chosen by measurement on the built-in digits
# (boxes 12-38 px wide, 19-54 px tall at 128 px): with these, 95 % of ground-truth boxes have a default
# box of IoU > 0.5 (median best IoU 0.64), against 51 % (median 0.50) for a 10 %-64 % geometric ladder,
# because the dense stride-8 and stride-16 maps get the digit-sized boxes (19 and 32 px).
LITE_ANCHOR_SCALES: list[float] = [0.15, 0.25, 0.40, 0.55, 0.70, 0.85, 1.00]

# VGG16 widths of the SSD layers (Liu et al. 2016, Fig. 2); ssd_vgg_lite multiplies them by width_mult.
SSD_VGG_WIDTHS: dict[str, int] = {
    "conv1_1": 64, "conv1_2": 64,
    "conv2_1": 128, "conv2_2": 128,
    "conv3_1": 256, "conv3_2": 256, "conv3_3": 256,
    "conv4_1": 512, "conv4_2": 512, "conv4_3": 512,
    "conv5_1": 512, "conv5_2": 512, "conv5_3": 512,
    "fc6": 1024, "fc7": 1024,
    "conv8_1": 256, "conv8_2": 512,
    "conv9_1": 128, "conv9_2": 256,
    "conv10_1": 128, "conv10_2": 256,
    "conv11_1": 128, "conv11_2": 256,
}  # fmt: skip
SSD_LAYER_ORDER: list[str] = list(SSD_VGG_WIDTHS)

# Paper layer name -> module path inside torchvision's ssd300_vgg16 (its SSDFeatureExtractorVGG keeps
# VGG's `features` up to conv4_3, then extra[0] = pool4, conv5_x, and a `fc` block [pool5, fc6, relu, fc7]).
SSD300_LAYER_PATHS: dict[str, str] = {
    "conv1_1": "backbone.features.0", "conv1_2": "backbone.features.2",
    "conv2_1": "backbone.features.5", "conv2_2": "backbone.features.7",
    "conv3_1": "backbone.features.10", "conv3_2": "backbone.features.12", "conv3_3": "backbone.features.14",
    "conv4_1": "backbone.features.17", "conv4_2": "backbone.features.19", "conv4_3": "backbone.features.21",
    "conv5_1": "backbone.extra.0.1", "conv5_2": "backbone.extra.0.3", "conv5_3": "backbone.extra.0.5",
    "fc6": "backbone.extra.0.7.1", "fc7": "backbone.extra.0.7.3",
    "conv8_1": "backbone.extra.1.0", "conv8_2": "backbone.extra.1.2",
    "conv9_1": "backbone.extra.2.0", "conv9_2": "backbone.extra.2.2",
    "conv10_1": "backbone.extra.3.0", "conv10_2": "backbone.extra.3.2",
    "conv11_1": "backbone.extra.4.0", "conv11_2": "backbone.extra.4.2",
}  # fmt: skip
LITE_LAYER_PATHS: dict[str, str] = {name: f"backbone.{name}" for name in SSD_LAYER_ORDER}
# The VGG stages of the lite backbone: convs that run one after another at one resolution.
LITE_STAGES: tuple[tuple[str, ...], ...] = (
    ("conv1_1", "conv1_2"), ("conv2_1", "conv2_2"), ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"), ("conv5_1", "conv5_2", "conv5_3"),
)  # fmt: skip
# Layer pruning (``remove_lite_layers``): a conv after the first of its VGG stage maps as many channels in
# as out, so it can go whole and its neighbours meet directly.
LITE_REMOVABLE_LAYERS: tuple[str, ...] = tuple(name for stage in LITE_STAGES for name in stage[1:])


class L2Norm(nn.Module):
    """SSD's conv4_3 normalisation: L2-normalise each position across channels, then scale per channel."""

    def __init__(self, num_channels: int, scale: float = 20.0, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((num_channels,), float(scale)))

    @property
    def num_channels(self) -> int:
        # Read from the weight, so a pruned checkpoint (loaded into the shapes it was saved with) and a
        # layer pruned twice agree with it.
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


class L2NormPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning handler for L2Norm: its channels are its input's channels (intra-layer dependency)."""

    TARGET_MODULES = L2Norm

    def prune_out_channels(self, layer: L2Norm, idxs: Sequence[int]) -> L2Norm:
        removed = set(idxs)
        keep_idxs = [i for i in range(layer.num_channels) if i not in removed]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep_idxs, 0)
        return layer

    # Removing an input channel removes the same output channel, so both directions are one function.
    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: L2Norm) -> int:
        return layer.num_channels

    def get_in_channels(self, layer: L2Norm) -> int:
        return layer.num_channels


def dependency_graph_options(model: nn.Module) -> dict:
    """Keyword arguments for ``tp.DependencyGraph().build_dependency`` on (a wrapper of) an SSD here.

    Registers ``L2NormPruner`` for ``L2Norm`` modules and declares torchvision's raw conv4_3 scale
    parameter (``backbone.scale_weight``, used in functional code) as prunable along dim 0, which is what
    torch-pruning would guess anyway, minus its warning.
    """
    unwrapped = [(p, 0) for name, p in model.named_parameters() if name.endswith("scale_weight")]
    return {"customized_pruners": {L2Norm: L2NormPruner()}, "unwrapped_parameters": unwrapped}


class SSDNetwork(nn.Module):
    """The tensor-only part of an SSD: backbone + head, ``x -> (bbox_regression, cls_logits)``.

    It shares (does not copy) the SSD's ``backbone`` and ``head`` under the same attribute names, so
    module paths such as ``backbone.conv4_3`` are valid in both, and pruning this network prunes the SSD.
    ``x`` is the backbone's input: resized to ``model_input_size`` and normalised, unless
    ``normalize_input=True``, in which case it takes [0, 1] images and applies the SSD's mean/std itself
    (convenient for ONNX export). Outputs: (N, A, 4) box regressions and (N, A, num_classes) logits for
    the A default boxes of ``ssd_default_boxes``.
    """

    def __init__(self, ssd: SSD, normalize_input: bool = False):
        super().__init__()
        self.backbone = ssd.backbone
        self.head = ssd.head
        self.normalize_input = normalize_input
        if normalize_input:
            self.register_buffer("image_mean", torch.tensor(ssd.transform.image_mean).view(1, -1, 1, 1))
            self.register_buffer("image_std", torch.tensor(ssd.transform.image_std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalize_input:
            x = (x - self.image_mean) / self.image_std
        outputs = self.head(list(self.backbone(x).values()))
        return outputs["bbox_regression"], outputs["cls_logits"]


def ssd_input_size(ssd: SSD) -> tuple[int, int]:
    """(height, width) every image is resized to (torchvision stores ``fixed_size`` as (width, height))."""
    width, height = ssd.transform.fixed_size
    return int(height), int(width)


@torch.no_grad()
def ssd_feature_sizes(ssd: SSD) -> list[tuple[int, int]]:
    """(height, width) of each feature map the head reads, at the SSD's input size."""
    height, width = ssd_input_size(ssd)
    device = next(ssd.parameters()).device
    was_training = ssd.backbone.training
    ssd.backbone.eval()
    try:
        features = ssd.backbone(torch.zeros(1, 3, height, width, device=device))
    finally:
        ssd.backbone.train(was_training)
    return [tuple(f.shape[-2:]) for f in features.values()]


def ssd_default_boxes(ssd: SSD) -> Tensor:
    """The SSD's default boxes (A, 4) as (x1, y1, x2, y2) pixels of the resized input, in head order."""
    height, width = ssd_input_size(ssd)
    device = next(ssd.parameters()).device
    # The generator only reads the feature maps' shapes and the batch's image size.
    features = [torch.empty(1, 1, h, w, device=device) for h, w in ssd_feature_sizes(ssd)]
    images = ImageList(torch.empty(1, 3, height, width, device=device), [(height, width)])
    return ssd.anchor_generator(images, features)[0]


def postprocess_settings(ssd: SSD) -> dict[str, float | int]:
    """The deployment post-processing an SSD runs with (``export.score_threshold``, ``export.pre_nms_top_k``)."""
    return {"score_threshold": float(ssd.score_thresh), "pre_nms_top_k": int(ssd.topk_candidates)}


def apply_postprocess_settings(ssd: SSD, settings: dict[str, Any]) -> SSD:
    """Set the score threshold and the per-class pre-NMS top-k (``postprocess_settings``' keys), in place."""
    threshold, top_k = settings.get("score_threshold"), settings.get("pre_nms_top_k")
    if not (isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 <= threshold < 1):
        raise ModelError(f"post-processing score_threshold must be a number in [0, 1), got {threshold!r}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise ModelError(f"post-processing pre_nms_top_k must be an integer >= 1, got {top_k!r}")
    ssd.score_thresh = float(threshold)
    ssd.topk_candidates = int(top_k)
    return ssd


def read_state_dict(weights_path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file or a plain torch state dict (``torch.load(weights_only=True)`` only)."""
    path = Path(weights_path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's problem
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot read weights ({first_line})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return state


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> nn.Module:
    """``model.load_state_dict(state)`` after checking every key and shape; ``ModelError`` names
    ``source`` and the first mismatching key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise ModelError(
                f"{source}: key '{key}' is missing ({len(state)} keys in file, {len(expected)} in model)"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{source}: key '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    for key in state:
        if key not in expected:
            raise ModelError(f"{source}: key '{key}' is not in the model")
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, weights_path: str | Path) -> nn.Module:
    """Load a ``.safetensors`` file or a torch state dict into ``model``; every key and shape must match."""
    return load_state_dict_strict(model, read_state_dict(weights_path), weights_path)


def ssd300_vgg16(num_classes: int, weights_path: str | Path | None = None) -> SSD:
    """torchvision's SSD300/VGG16 (random init, never downloads); ``num_classes`` includes background.

    torchvision keeps the conv4_3 L2Norm scale as the raw parameter ``backbone.scale_weight``;
    torch-pruning prunes it as an unwrapped parameter along dim 0 (see ``dependency_graph_options``),
    so the model is used unchanged and its state-dict keys are torchvision's.
    """
    _check_num_classes(num_classes, minimum=2)
    model = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def _width(name: str, width_mult: float) -> int:
    return max(8, round(SSD_VGG_WIDTHS[name] * width_mult))


class LiteVGGFeatureExtractor(nn.Module):
    """SSD's VGG16 feature extractor with scaled widths and every conv a named attribute.

    Layout (as SSD300, Liu et al. 2016): conv1-conv4 with 2x2 max-pools (pool3 ceil_mode), conv4_3 ->
    L2Norm -> feature 0; pool4, conv5_x, pool5 (3x3, stride 1), fc6 (3x3, dilation 3), fc7 (1x1) ->
    feature 1; then four 1x1-reduce / 3x3 extras. SSD300 dilates fc6 by 6 on a 19x19 map; 3 keeps the
    receptive field in proportion on the 8x8 map of a 128 px input. conv8_2, conv9_2 and conv10_2 are
    3x3 / stride 2 / pad 1 and conv11_2 is 3x3 / stride 1 / pad 1, so the six feature maps are
    s/8, s/16, s/32, s/64, s/128, s/128 (ceil) for input side s: at 128 px 16, 8, 4, 2, 1, 1.
    """

    def __init__(self, width_mult: float = 0.125, batch_norm: bool = True):
        super().__init__()
        w = {name: _width(name, width_mult) for name in SSD_LAYER_ORDER}
        self.batch_norm = batch_norm
        self.removed: tuple[str, ...] = ()  # convs removed whole (``remove_lite_layers``): identities, skipped

        def conv(name: str, in_ch: int, kernel: int = 3, **kwargs) -> nn.Conv2d:
            return nn.Conv2d(in_ch, w[name], kernel_size=kernel, **kwargs)

        self.conv1_1 = conv("conv1_1", 3, padding=1)
        self.conv1_2 = conv("conv1_2", w["conv1_1"], padding=1)
        self.conv2_1 = conv("conv2_1", w["conv1_2"], padding=1)
        self.conv2_2 = conv("conv2_2", w["conv2_1"], padding=1)
        self.conv3_1 = conv("conv3_1", w["conv2_2"], padding=1)
        self.conv3_2 = conv("conv3_2", w["conv3_1"], padding=1)
        self.conv3_3 = conv("conv3_3", w["conv3_2"], padding=1)
        self.conv4_1 = conv("conv4_1", w["conv3_3"], padding=1)
        self.conv4_2 = conv("conv4_2", w["conv4_1"], padding=1)
        self.conv4_3 = conv("conv4_3", w["conv4_2"], padding=1)
        self.l2norm = L2Norm(w["conv4_3"])
        self.conv5_1 = conv("conv5_1", w["conv4_3"], padding=1)
        self.conv5_2 = conv("conv5_2", w["conv5_1"], padding=1)
        self.conv5_3 = conv("conv5_3", w["conv5_2"], padding=1)
        self.fc6 = conv("fc6", w["conv5_3"], padding=3, dilation=3)
        self.fc7 = conv("fc7", w["fc6"], kernel=1)
        self.conv8_1 = conv("conv8_1", w["fc7"], kernel=1)
        self.conv8_2 = conv("conv8_2", w["conv8_1"], stride=2, padding=1)
        self.conv9_1 = conv("conv9_1", w["conv8_2"], kernel=1)
        self.conv9_2 = conv("conv9_2", w["conv9_1"], stride=2, padding=1)
        self.conv10_1 = conv("conv10_1", w["conv9_2"], kernel=1)
        self.conv10_2 = conv("conv10_2", w["conv10_1"], stride=2, padding=1)
        self.conv11_1 = conv("conv11_1", w["conv10_2"], kernel=1)
        self.conv11_2 = conv("conv11_2", w["conv11_1"], padding=1)

        # BatchNorm after every conv (ours, not in SSD300) lets the narrow model train from scratch in
        # minutes on a CPU; each `<conv>_bn` directly follows its conv, so pruning and bn_scale see it.
        if batch_norm:
            for name in SSD_LAYER_ORDER:
                self.add_module(f"{name}_bn", nn.BatchNorm2d(w[name]))
        # He init keeps activations from vanishing when training from scratch.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def _conv_relu(self, name: str, x: Tensor) -> Tensor:
        if name in self.removed:  # no op at all in the exported graph, not even a ReLU
            return x
        x = getattr(self, name)(x)
        if self.batch_norm:
            x = getattr(self, f"{name}_bn")(x)
        return F.relu(x)

    @property
    def out_channels(self) -> list[int]:
        """Channels of the six feature maps (read from the convs, so it stays true after pruning)."""
        stage4 = [getattr(self, name) for name in LITE_STAGES[3]]
        return [
            [conv for conv in stage4 if isinstance(conv, nn.Conv2d)][-1].out_channels,  # conv4_3 may be removed
            self.fc7.out_channels,
            self.conv8_2.out_channels,
            self.conv9_2.out_channels,
            self.conv10_2.out_channels,
            self.conv11_2.out_channels,
        ]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        def block(x: Tensor, *names: str) -> Tensor:
            for name in names:
                x = self._conv_relu(name, x)
            return x

        x = F.max_pool2d(block(x, "conv1_1", "conv1_2"), 2, 2)
        x = F.max_pool2d(block(x, "conv2_1", "conv2_2"), 2, 2)
        x = F.max_pool2d(block(x, "conv3_1", "conv3_2", "conv3_3"), 2, 2, ceil_mode=True)
        x = block(x, "conv4_1", "conv4_2", "conv4_3")
        features = [self.l2norm(x)]
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        x = F.max_pool2d(block(x, "conv5_1", "conv5_2", "conv5_3"), 3, 1, padding=1)
        x = block(x, "fc6", "fc7")
        features.append(x)
        for extra in ("8", "9", "10", "11"):
            x = block(x, f"conv{extra}_1", f"conv{extra}_2")
            features.append(x)
        return OrderedDict((str(i), f) for i, f in enumerate(features))


def ssd_vgg_lite(
    num_classes: int,
    width_mult: float = 0.125,
    image_size: int = 128,
    weights_path: str | Path | None = None,
    batch_norm: bool = True,
    removed_layers: Sequence[str] = (),
) -> SSD:
    """A narrow SSD (torchvision's ``SSD`` on ``LiteVGGFeatureExtractor``) for small square images.

    ``num_classes`` includes background. Default boxes: SSD300's aspect ratios and ``LITE_ANCHOR_SCALES``.
    ``removed_layers``: backbone convs removed whole (``remove_lite_layers``; a layer-pruned checkpoint
    records them so that it rebuilds).
    """
    _check_num_classes(num_classes, minimum=2)
    if not (isinstance(width_mult, int | float) and 0 < width_mult <= 4):
        raise ModelError(f"ssd_vgg_lite: width_mult must be in (0, 4], got {width_mult!r}")
    if not (isinstance(image_size, int) and 32 <= image_size <= 1024):
        raise ModelError(f"ssd_vgg_lite: image_size must be an integer in [32, 1024], got {image_size!r}")
    backbone = LiteVGGFeatureExtractor(width_mult, batch_norm=batch_norm)
    _remove_from_backbone(backbone, removed_layers)
    anchor_generator = DefaultBoxGenerator(SSD_ASPECT_RATIOS, scales=LITE_ANCHOR_SCALES)
    head = SSDHead(backbone.out_channels, anchor_generator.num_anchors_per_location(), num_classes)
    model = SSD(
        backbone,
        anchor_generator,
        (image_size, image_size),
        num_classes,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        head=head,
        score_thresh=0.01,
        nms_thresh=0.45,
        detections_per_img=200,
        topk_candidates=400,
    )
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


def _remove_from_backbone(backbone: LiteVGGFeatureExtractor, names: Sequence[str]) -> None:
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ModelError(f"ssd_vgg_lite: removed_layers must be a list of conv names, got {names!r}")
    for name in names:
        if name not in LITE_REMOVABLE_LAYERS:
            raise ModelError(f"ssd_vgg_lite: cannot remove {name!r}; removable convs (each after the first of its "
                             f"VGG stage): {', '.join(LITE_REMOVABLE_LAYERS)}")
        if name in backbone.removed:
            raise ModelError(f"ssd_vgg_lite: {name!r} is removed already")
        conv = getattr(backbone, name)
        if conv.in_channels != conv.out_channels:
            raise ModelError(f"ssd_vgg_lite: cannot remove {name!r}: it maps {conv.in_channels} channels to "
                             f"{conv.out_channels} (filter pruning changed its width); remove layers before "
                             "pruning their filters")
        setattr(backbone, name, nn.Identity())
        if backbone.batch_norm:
            setattr(backbone, f"{name}_bn", nn.Identity())
        backbone.removed = (*backbone.removed, name)


def remove_lite_layers(model: SSD, names: Sequence[str]) -> SSD:
    """Layer pruning of an ``ssd_vgg_lite`` model, in place: the convs ``names`` (each after the first of its
    VGG stage, input width equal to output width) and their BatchNorms go whole; the layers before and after
    meet directly. The conv's time goes with it, where filter pruning stops at a layer's floor (layer
    against filter pruning for latency: Elkerdawy et al., ACCV 2020). One-line ModelError for a name that
    cannot go."""
    _remove_from_backbone(model.backbone, names)
    return model


def _check_num_classes(num_classes: int, minimum: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < minimum:
        raise ModelError(
            f"num_classes must be an integer >= {minimum} (detectors count background), got {num_classes!r}"
        )
