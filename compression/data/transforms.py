"""Detection transforms (torchvision.transforms.v2) for items of :class:`compression.data.voc.VOCDetection`.

Images stay un-normalised floats in [0, 1]: mean/std normalisation belongs to the model (torchvision's SSD
does it in its internal ``GeneralizedRCNNTransform``), so the same tensors feed any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# Per-object entries of a target that must be dropped together with their boxes.
_PER_BOX_KEYS = ("labels", "difficult")


def detection_labels_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    """For ``SanitizeBoundingBoxes``: every per-box tensor of the target, so that removing a degenerate box also
    removes its label *and* its difficult flag (the default getter would find only ``labels``).

    A module-level function (not a lambda) so that the transforms pickle into DataLoader workers.
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[key] for key in _PER_BOX_KEYS if key in target)


def ssd_train_transforms(
    size: int, hflip: bool = True, fill: Sequence[int] = (123, 117, 104), geometric: bool = True
) -> v2.Compose:
    """SSD training augmentation (Liu et al. 2016, as torchvision's references/detection "ssd" preset).

    Photometric distortion, zoom-out onto a ``fill``-coloured (uint8 RGB, ImageNet mean) canvas, IoU crop,
    optional horizontal flip (switch it off for digits, whose mirror images are not digits), resize to
    ``size`` x ``size``, then ``SanitizeBoundingBoxes`` and conversion to float32 in [0, 1].

    ``RandomIoUCrop`` zeroes the boxes whose centres fall outside the crop instead of removing them; as in
    torchvision's references, the following ``SanitizeBoundingBoxes`` removes those (and boxes shrunk below
    one pixel by the resize) together with their ``labels`` and ``difficult`` entries. An image can end up with
    no boxes; torchvision's SSD accepts such targets (all anchors become background).

    ``geometric=False`` drops zoom-out and IoU crop (the costliest steps on a CPU: ~80% of the time), for
    data that already varies object scale and position, like the built-in digits canvases.
    """
    steps: list[Any] = [v2.RandomPhotometricDistort()]
    if geometric:
        # Only the image is filled; anything else (e.g. masks) is padded with 0.
        steps += [v2.RandomZoomOut(fill={tv_tensors.Image: tuple(fill), "others": 0}), v2.RandomIoUCrop()]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.Resize((size, size)),
        v2.SanitizeBoundingBoxes(labels_getter=detection_labels_getter),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation: only uint8 -> float32 in [0, 1]; no resize.

    Resizing for evaluation is the model's job: torchvision's SSD resizes inside its ``transform`` and maps
    the predicted boxes back to the original image size, so predictions and ground truth (original-size VOC
    boxes) are compared in the same coordinates.
    """
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
