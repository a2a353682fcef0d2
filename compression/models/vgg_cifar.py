"""VGG16 with BatchNorm for 32x32 images (the CIFAR variant used by Singh et al. and Network Slimming)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from compression.errors import ModelError

# (paper name, VGG16 width) per conv; "M" is a 2x2 max-pool.
VGG16_CFG: list[tuple[str, int] | str] = [
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "M",
]  # fmt: skip
VGG16_CONV_NAMES: list[str] = [item[0] for item in VGG16_CFG if isinstance(item, tuple)]
VGG_CIFAR_LAYER_PATHS: dict[str, str] = {name: f"features.{name}" for name in VGG16_CONV_NAMES}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel, so data pipelines can feed [0, 1] images."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class VGGCifar(nn.Module):
    """``normalize`` -> ``features`` (conv_i_j, bn_i_j, relu_i_j, pool_i) -> global pool -> ``classifier`` (one Linear).

    Each conv's BatchNorm is the next module in ``features`` (``features.conv4_3`` -> ``features.bn4_3``).
    The global average pool is a no-op at 32 px (the map is 1x1) and lets larger inputs work too.
    """

    def __init__(self, num_classes: int, width_mult: float, image_size: int):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels, block = 3, 1
        for item in VGG16_CFG:
            if item == "M":
                layers[f"pool{block}"] = nn.MaxPool2d(2, 2)
                block += 1
                continue
            name, width = item
            out_channels = max(8, round(width * width_mult))
            suffix = name.removeprefix("conv")
            layers[name] = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
            layers[f"bn{suffix}"] = nn.BatchNorm2d(out_channels)
            layers[f"relu{suffix}"] = nn.ReLU(inplace=True)
            in_channels = out_channels
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # One Linear, as Network Slimming's CIFAR VGG: a hidden FC + ReLU without BatchNorm died within 40
        # AdamW steps on the digits (every hidden unit negative for every input, loss stuck at ln 10).
        self.classifier = nn.Sequential(nn.Linear(in_channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(x, 1))


def vgg16_cifar(num_classes: int = 10, width_mult: float = 1.0, image_size: int = 32) -> VGGCifar:
    """VGG16-BN for ``image_size`` x ``image_size`` inputs in [0, 1]; widths are VGG16's x ``width_mult``."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ModelError(f"vgg16_cifar: num_classes must be an integer >= 2, got {num_classes!r}")
    if not (isinstance(width_mult, int | float) and 0 < width_mult <= 4):
        raise ModelError(f"vgg16_cifar: width_mult must be in (0, 4], got {width_mult!r}")
    if not (isinstance(image_size, int) and 32 <= image_size <= 1024):
        raise ModelError(f"vgg16_cifar: image_size must be an integer in [32, 1024], got {image_size!r}")
    return VGGCifar(num_classes, float(width_mult), image_size)
