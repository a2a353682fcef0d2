"""compression.ssd_fast reproduces torchvision's SSD (pre-processing, matching, loss, post-processing).

A tiny SSD (3 feature maps, 4,416 anchors, non-square 128x96 input) keeps the file fast on CPU; the
full SSD300-VGG16 path is exercised by ``bench/gpu.py --device cpu``. Random images of mixed sizes,
GT boxes from 3 px to the whole image, duplicate GT boxes (a matching tie) and an image without boxes.
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou, nms

from compression.errors import DataError
from compression.ssd_fast import (
    _matrix_nms,
    match_anchors,
    pad_targets,
    preprocess_batch,
    run_network,
    ssd_detect,
    ssd_forward_train,
    ssd_loss_batched,
)

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # the machine's cores are shared


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.out_channels = [16, 16, 16]

    def forward(self, x: torch.Tensor) -> OrderedDict:
        first = self.stem(x)
        second = self.down1(first)
        return OrderedDict([("0", first), ("1", second), ("2", self.down2(second))])


def make_model(seed: int = 0) -> SSD:
    torch.manual_seed(seed)
    anchor_generator = DefaultBoxGenerator([[2], [2, 3], [2]], steps=[4, 8, 16])
    # size is (width, height): the network sees 96x128 (H x W) images.
    return SSD(TinyBackbone(), anchor_generator, (128, 96), NUM_CLASSES)


def make_batch(seed: int = 1) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [(96, 128), (80, 100), (96, 128), (150, 110)]
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    boxes = [
        # tiny, medium, a duplicate of it (ties in matching), the whole image
        [[5.0, 5.0, 8.0, 8.0], [20.0, 30.0, 90.0, 80.0], [20.0, 30.0, 90.0, 80.0], [0.0, 0.0, 128.0, 96.0]],
        [],
        [[50.0, 40.0, 61.0, 52.0], [1.0, 2.0, 3.5, 4.0], [60.0, 10.0, 127.0, 40.0]],
        [[10.0, 100.0, 100.0, 149.0], [33.0, 20.0, 44.0, 70.0]],
    ]
    labels = [[1, 2, 3, 1], [], [3, 1, 2], [2, 2]]
    targets = [
        {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(lab, dtype=torch.int64),
        }
        for b, lab in zip(boxes, labels, strict=True)
    ]
    return images, targets


def torchvision_pieces(model: SSD, images, targets):
    """What torchvision's SSD.forward computes before its loss: batch, resized targets, outputs, anchors."""
    image_list, resized_targets = model.transform(images, [dict(t) for t in targets])
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    return image_list, resized_targets, head_outputs, anchors


def torchvision_matches(model: SSD, resized_targets, anchors) -> list[torch.Tensor]:
    matches = []
    for target, image_anchors in zip(resized_targets, anchors, strict=True):
        if target["boxes"].numel() == 0:
            matches.append(torch.full((image_anchors.shape[0],), -1, dtype=torch.int64))
        else:
            matches.append(model.proposal_matcher(box_iou(target["boxes"], image_anchors)))
    return matches


def test_preprocess_is_bit_identical_to_torchvision_transform():
    model = make_model()
    images, _ = make_batch()
    expected = model.transform(images)[0].tensors
    batch, original_sizes = preprocess_batch(model, images)
    assert torch.equal(batch, expected)
    assert original_sizes == [(96, 128), (80, 100), (96, 128), (150, 110)]

    stacked = torch.stack([images[0], images[2]])
    batch, original_sizes = preprocess_batch(model, stacked, channels_last=True)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, model.transform([images[0], images[2]])[0].tensors)
    assert original_sizes == [(96, 128)] * 2


def test_anchors_and_matches_equal_torchvision():
    model = make_model()
    images, targets = make_batch()
    image_list, resized_targets, _, tv_anchors = torchvision_pieces(model, images, targets)
    _, anchors = run_network(model, image_list.tensors)
    for image_anchors in tv_anchors:
        assert torch.equal(anchors, image_anchors)

    gt_boxes, _, gt_valid = pad_targets(resized_targets, anchors.device)
    matches = match_anchors(model, gt_boxes, gt_valid, anchors)
    expected = torch.stack(torchvision_matches(model, resized_targets, tv_anchors))
    assert torch.equal(matches, expected)
    # The cases this is meant to cover did occur: the image without boxes matches nothing, the tiny box
    # (IoU < 0.5 with every anchor) got its best anchor anyway, and of the duplicate boxes 1 and 2 the
    # later one won the best anchor they share while the earlier one takes the above-threshold anchors.
    assert (matches[1] == -1).all()
    tiny_iou = box_iou(resized_targets[0]["boxes"][:1], anchors)
    assert tiny_iou.max() < 0.5 and (matches[0] == 0).sum() == 1
    assert (matches[0] == 2).sum() == 1 and (matches[0] == 1).sum() > 1


def test_loss_equals_compute_loss_on_the_same_head_outputs():
    model = make_model()
    images, targets = make_batch()
    _, resized_targets, head_outputs, anchors = torchvision_pieces(model, images, targets)
    expected = model.compute_loss(
        resized_targets, head_outputs, anchors, torchvision_matches(model, resized_targets, anchors)
    )
    losses = ssd_loss_batched(model, head_outputs, anchors[0], resized_targets)
    for name in ("bbox_regression", "classification"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-6, atol=0.0)


def test_forward_train_and_gradients_equal_torchvision_forward():
    model = make_model()
    images, targets = make_batch()
    model.train()
    expected = model(images, targets)
    sum(expected.values()).backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    losses = ssd_forward_train(model, images, targets)
    assert expected["bbox_regression"] > 0 and expected["classification"] > 0
    for name in ("bbox_regression", "classification"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0.0)
    sum(losses.values()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_batch_without_any_box_equals_torchvision():
    model = make_model()
    images, _ = make_batch()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    expected = model.train()(images, targets)
    losses = ssd_forward_train(model, images, targets)
    for name in ("bbox_regression", "classification"):
        assert losses[name] == expected[name] == 0.0


def canonical(detections: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order detections by (label, score descending, x1), so that equal-score ties compare equal."""
    order = torch.arange(detections["scores"].numel())
    for key in (detections["boxes"][:, 0], -detections["scores"], detections["labels"]):
        order = order[torch.sort(key[order], stable=True).indices]
    return {name: value[order] for name, value in detections.items()}


@pytest.mark.parametrize("nms_kind", ["matrix", "batched_nms"])
@pytest.mark.parametrize("score_thresh", [0.01, 0.35, 1.0])
def test_detect_equals_torchvision_eval(nms_kind, score_thresh):
    model = make_model().eval()
    model.score_thresh = score_thresh
    images, _ = make_batch()
    with torch.no_grad():
        expected = model(images)
    detections = ssd_detect(model, images, nms=nms_kind)
    assert len(detections) == len(expected)
    counts = [len(d["scores"]) for d in expected]
    if score_thresh == 0.01:
        assert counts == [model.detections_per_img] * len(images)  # the cut after NMS is exercised
    elif score_thresh == 0.35:
        assert 0 < min(counts) and max(counts) < model.detections_per_img
    else:
        assert counts == [0] * len(images)
    for ours, theirs in zip(detections, expected, strict=True):
        assert ours["labels"].dtype == torch.int64 and ours["boxes"].shape[1:] == (4,)
        ours, theirs = canonical(ours), canonical(theirs)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-6, atol=0.0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-6, atol=1e-5)


def test_matrix_nms_equals_greedy_nms_on_long_suppression_chains():
    generator = torch.Generator().manual_seed(3)
    groups, per_group = 6, 80
    # Boxes sliding along x so that each overlaps the next: suppression chains many boxes long.
    x1 = torch.rand(groups, per_group, generator=generator) * 40
    y1 = torch.rand(groups, per_group, generator=generator) * 5
    boxes = torch.stack([x1, y1, x1 + 10, y1 + 10], dim=-1)
    scores = torch.rand(groups, per_group, generator=generator)
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[:, :, None].expand(-1, -1, 4))
    valid = torch.ones(groups, per_group, dtype=torch.bool)
    valid[0, 60:] = False  # a group with fewer candidates (sorted: invalid ones come last)

    keep = _matrix_nms(boxes, valid, 0.3)
    for group in range(groups):
        count = int(valid[group].sum())
        expected = torch.zeros(per_group, dtype=torch.bool)
        expected[nms(boxes[group, :count], torch.linspace(1, 0, count), 0.3)] = True
        assert torch.equal(keep[group], expected)
    assert 1 < keep.sum() < valid.sum()


def test_channels_last_and_bf16_switches_run_and_stay_close():
    model = make_model()
    images, targets = make_batch()
    reference = ssd_forward_train(model, images, targets)
    channels_last = ssd_forward_train(
        model.to(memory_format=torch.channels_last), images, targets, channels_last=True
    )
    bf16 = ssd_forward_train(model, images, targets, amp_bf16=True, channels_last=True)
    for name in ("bbox_regression", "classification"):
        torch.testing.assert_close(channels_last[name], reference[name], rtol=1e-4, atol=1e-5)
        assert bf16[name].dtype == torch.float32
        torch.testing.assert_close(bf16[name], reference[name], rtol=0.1, atol=0.0)
    detections = ssd_detect(model, images, amp_bf16=True, channels_last=True)
    assert all(d["boxes"].dtype == torch.float32 and len(d["boxes"]) > 0 for d in detections)


def test_user_errors_are_one_line_data_errors():
    model = make_model()
    images, targets = make_batch()
    with pytest.raises(DataError, match="floating point"):
        preprocess_batch(model, [(image * 255).to(torch.uint8) for image in images])
    with pytest.raises(DataError, match=r"targets: 3 entries for 4 images"):
        ssd_forward_train(model, images, targets[:3])
    with pytest.raises(DataError, match=r"targets\[1\]\['boxes'\]"):
        pad_targets([targets[0], {"boxes": torch.ones(2, 5), "labels": torch.ones(2)}], torch.device("cpu"))


def test_image_list_anchor_generator_still_takes_image_sizes():
    # default_boxes relies on DefaultBoxGenerator reading only the tensors' and feature maps' shapes.
    model = make_model()
    image_list = ImageList(torch.empty(0, 0, 96, 128), [(96, 128)])
    features = [torch.empty(0, 0, 24, 32), torch.empty(0, 0, 12, 16), torch.empty(0, 0, 6, 8)]
    anchors = model.anchor_generator(image_list, features)
    assert len(anchors) == 1 and anchors[0].shape == (24 * 32 * 4 + 12 * 16 * 6 + 6 * 8 * 4, 4)


def test_tensor_batch_of_one_size_equals_torchvision():
    # A (B, 3, H, W) tensor whose images all need the same rescale (the scalar-ratio path).
    model = make_model()
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 150, 110, generator=generator)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 100.0, 100.0, 149.0], [3.0, 3.0, 9.0, 12.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[33.0, 20.0, 44.0, 70.0]]), "labels": torch.tensor([2])},
    ]
    expected = model.train()(list(images), targets)
    losses = ssd_forward_train(model, images, targets)
    for name in ("bbox_regression", "classification"):
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=0.0)
    model.eval()
    with torch.no_grad():
        expected_detections = model(list(images))
    for ours, theirs in zip(ssd_detect(model, images), expected_detections, strict=True):
        ours, theirs = canonical(ours), canonical(theirs)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-6, atol=1e-5)
