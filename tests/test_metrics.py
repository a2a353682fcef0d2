"""Hand-computed checks of compression.metrics (sizes, FLOPs, latency, VOC/COCO mAP, accuracy)."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from compression.errors import CheckpointError
from compression.metrics import (
    coco_map,
    count_flops,
    count_nonzero_parameters,
    count_parameters,
    evaluate_detections,
    file_size_bytes,
    measure_latency,
    top1_accuracy,
    voc_ap,
    voc_detection_ap,
)

# Boxes far apart from each other (IoU 0 between any two of them).
BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [20.0, 20.0, 30.0, 30.0]
BOX_C = [40.0, 0.0, 50.0, 10.0]
BOX_D = [0.0, 40.0, 10.0, 50.0]
NOWHERE = [100.0, 100.0, 110.0, 110.0]


def prediction(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def target(boxes, labels, difficult=None):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult if difficult is not None else [False] * len(labels)),
    }


@pytest.fixture(scope="module")
def ssd300():
    return torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)


# ---------------------------------------------------------------------------------------------------------
# AP from precision/recall
# ---------------------------------------------------------------------------------------------------------


def test_voc_ap_11_point_counts_a_recall_of_exactly_point_three():
    # 3 of 10 GT found at precision 1: recall 3/10 reaches t = 0, .1, .2, .3 -> AP07 = 4/11.
    assert voc_ap(np.array([3 / 10]), np.array([1.0]), use_07_metric=True) == pytest.approx(4 / 11)
    # All-point: 0.3 of recall at precision 1.
    assert voc_ap(np.array([3 / 10]), np.array([1.0]), use_07_metric=False) == pytest.approx(0.3)


def test_voc_ap_of_empty_curve_is_zero():
    assert voc_ap(np.array([]), np.array([]), use_07_metric=True) == 0.0
    assert voc_ap(np.array([]), np.array([]), use_07_metric=False) == 0.0


# ---------------------------------------------------------------------------------------------------------
# VOC / COCO detection mAP
# ---------------------------------------------------------------------------------------------------------


def test_perfect_detections_score_one_everywhere():
    targets = [target([BOX_A, BOX_B], [1, 2]), target([BOX_C], [2])]
    predictions = [prediction([BOX_A, BOX_B], [0.9, 0.8], [1, 2]), prediction([BOX_C], [0.7], [2])]
    result = evaluate_detections(predictions, targets, num_classes=2)
    assert result["map_voc07"] == pytest.approx(1.0)
    assert result["map_voc"] == pytest.approx(1.0)
    assert result["ap_voc07_per_class"] == pytest.approx([1.0, 1.0])
    assert result["ap_voc_per_class"] == pytest.approx([1.0, 1.0])
    assert result["map_coco"] == pytest.approx(1.0)
    assert result["map_coco_50"] == pytest.approx(1.0)
    assert result["map_coco_75"] == pytest.approx(1.0)


def test_interleaved_true_and_false_positives_by_hand():
    # One class, 4 GT (A, B in image 0; C, D in image 1; D is never found). Detections by score:
    #   0.9 A  TP   tp=1 fp=0   recall 1/4  precision 1
    #   0.8 -  FP   tp=1 fp=1   recall 1/4  precision 1/2
    #   0.7 C  TP   tp=2 fp=1   recall 2/4  precision 2/3
    #   0.6 -  FP   tp=2 fp=2   recall 2/4  precision 1/2
    #   0.5 B  TP   tp=3 fp=2   recall 3/4  precision 3/5
    # 11-point: t=0,.1,.2 -> 1; t=.3,.4,.5 -> 2/3; t=.6,.7 -> 3/5; t=.8,.9,1 -> 0
    #   AP07 = (3*1 + 3*2/3 + 2*3/5) / 11 = 6.2 / 11 = 31/55
    # All-point (precision envelope 1, 2/3, 3/5 over recall steps of 1/4 each, then 0 up to recall 1):
    #   AP = 1/4 * (1 + 2/3 + 3/5) = 17/30
    targets = [target([BOX_A, BOX_B], [1, 1]), target([BOX_C, BOX_D], [1, 1])]
    predictions = [
        prediction([BOX_A, NOWHERE, BOX_B], [0.9, 0.6, 0.5], [1, 1, 1]),
        prediction([NOWHERE, BOX_C], [0.8, 0.7], [1, 1]),
    ]
    result = voc_detection_ap(predictions, targets, num_classes=1)
    assert result["map_voc07"] == pytest.approx(31 / 55)
    assert result["map_voc"] == pytest.approx(17 / 30)
    assert result["ap_voc07_per_class"] == pytest.approx([31 / 55])
    assert result["ap_voc_per_class"] == pytest.approx([17 / 30])


def test_duplicate_detection_counts_as_false_positive():
    # GT A, B. Detections: 0.9 A (TP), 0.8 A again (duplicate -> FP), 0.7 B (TP).
    # recall .5 .5 1, precision 1 1/2 2/3.
    # All-point: .5*1 + .5*2/3 = 5/6. 11-point: t=0..0.5 -> 1 (6 points), t=.6..1 -> 2/3 (5): 28/33.
    targets = [target([BOX_A, BOX_B], [1, 1])]
    predictions = [prediction([BOX_A, BOX_A, BOX_B], [0.9, 0.8, 0.7], [1, 1, 1])]
    result = voc_detection_ap(predictions, targets, num_classes=1)
    assert result["map_voc"] == pytest.approx(5 / 6)
    assert result["map_voc07"] == pytest.approx(28 / 33)


def test_detection_on_difficult_gt_is_ignored_and_difficult_gt_is_no_miss():
    # A is normal, B difficult. The 0.9 detection on B is ignored (not FP) and B is never a miss: npos = 1,
    # so finding A gives AP 1 in VOC, and COCO (B passed as crowd) agrees.
    targets = [target([BOX_A, BOX_B], [1, 1], difficult=[False, True])]
    predictions = [prediction([BOX_B, BOX_A], [0.9, 0.8], [1, 1])]
    result = evaluate_detections(predictions, targets, num_classes=1)
    assert result["map_voc07"] == pytest.approx(1.0)
    assert result["map_voc"] == pytest.approx(1.0)
    assert result["map_coco"] == pytest.approx(1.0)
    # Undetected difficult GT costs nothing either (without iscrowd COCO would see recall 1/2 here).
    only_a = evaluate_detections([prediction([BOX_A], [0.8], [1])], targets, num_classes=1)
    assert only_a["map_voc"] == pytest.approx(1.0)
    assert only_a["map_voc07"] == pytest.approx(1.0)
    assert only_a["map_coco"] == pytest.approx(1.0)


def test_class_without_gt_is_left_out_of_the_mean():
    # Class 2 has no GT (only a false positive) -> None, mean over classes 1 and 3 only. A class whose only
    # GT is difficult is undefined as well (class 3 in the second call).
    targets = [target([BOX_A, BOX_B], [1, 3])]
    predictions = [prediction([BOX_A, BOX_C, BOX_B], [0.9, 0.8, 0.7], [1, 2, 3])]
    result = voc_detection_ap(predictions, targets, num_classes=3)
    assert result["ap_voc_per_class"] == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert result["ap_voc07_per_class"] == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert result["map_voc"] == pytest.approx(1.0)
    assert result["map_voc07"] == pytest.approx(1.0)

    difficult_only = voc_detection_ap(
        predictions, [target([BOX_A, BOX_B], [1, 3], difficult=[False, True])], num_classes=3
    )
    assert difficult_only["ap_voc_per_class"] == [pytest.approx(1.0), None, None]


def test_no_gt_at_all_gives_nan_means():
    result = evaluate_detections([prediction([BOX_A], [0.9], [1])], [target([], [])], num_classes=2)
    assert result["ap_voc_per_class"] == [None, None]
    assert math.isnan(result["map_voc"]) and math.isnan(result["map_voc07"])
    assert math.isnan(result["map_coco"])


def test_images_without_gt_and_images_without_predictions():
    # Image 0: GT A, found at 0.9. Image 1: no GT, a 0.95 detection (FP). Image 2: GT B, no prediction.
    # By score: FP (recall 0, precision 0), TP (recall 1/2, precision 1/2); npos = 2.
    # All-point: 1/2 * 1/2 = 1/4. 11-point: t=0..0.5 -> 1/2 (6 points) -> 3/11.
    # COCO (101 recall points, same at every IoU since boxes are exact): 51 points at 1/2 -> 25.5/101.
    targets = [target([BOX_A], [1]), target([], []), target([BOX_B], [1])]
    predictions = [prediction([BOX_A], [0.9], [1]), prediction([BOX_C], [0.95], [1]), prediction([], [], [])]
    result = evaluate_detections(predictions, targets, num_classes=1)
    assert result["map_voc"] == pytest.approx(1 / 4)
    assert result["map_voc07"] == pytest.approx(3 / 11)
    assert result["map_coco_50"] == pytest.approx(25.5 / 101)
    assert result["map_coco"] == pytest.approx(25.5 / 101)


@pytest.mark.parametrize(
    ("y2", "expected_ap"),
    [(4.9, 0.0), (5.0, 1.0), (5.1, 1.0)],  # IoU with A = 10*y2/100: 0.49, exactly 0.5, 0.51
)
def test_iou_threshold_boundary(y2, expected_ap):
    targets = [target([BOX_A], [1])]
    predictions = [prediction([[0.0, 0.0, 10.0, y2]], [0.9], [1])]
    result = voc_detection_ap(predictions, targets, num_classes=1)
    assert result["map_voc"] == pytest.approx(expected_ap)
    assert result["map_voc07"] == pytest.approx(expected_ap)


def test_per_class_ap_uses_index_class_minus_one():
    # Class 1: perfect. Class 2: FP at 0.9 then TP at 0.8 -> recall 0, 1; precision 0, 1/2 -> AP 1/2 both ways.
    # Class 3: no GT.
    targets = [target([BOX_A, BOX_B], [1, 2])]
    predictions = [prediction([BOX_A, BOX_C, BOX_B], [0.7, 0.9, 0.8], [1, 2, 2])]
    result = voc_detection_ap(predictions, targets, num_classes=3)
    assert result["ap_voc_per_class"] == [pytest.approx(1.0), pytest.approx(0.5), None]
    assert result["ap_voc07_per_class"] == [pytest.approx(1.0), pytest.approx(0.5), None]
    assert result["map_voc"] == pytest.approx(0.75)


def test_coco_map_at_75_tells_loose_from_tight_boxes():
    # IoU 0.6 with the GT: a TP at 0.5, a miss at 0.75 and above.
    targets = [target([BOX_A], [1])]
    predictions = [prediction([[0.0, 0.0, 10.0, 6.0]], [0.9], [1])]
    result = coco_map(predictions, targets)
    assert result["map_coco_50"] == pytest.approx(1.0)
    assert result["map_coco_75"] == pytest.approx(0.0)
    assert result["map_coco"] == pytest.approx(0.2)  # 2 of the 10 IoU thresholds (.5, .55) pass


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------


def test_count_flops_of_conv2d_is_twice_the_macs():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
    # Hout = (17 - 3) // 2 + 1 = 8, Wout = (21 - 3) // 2 + 1 = 10
    assert count_flops(conv, (17, 21)) == 2 * 3 * 8 * 3 * 3 * 8 * 10
    padded = nn.Conv2d(4, 6, kernel_size=5, padding=2)
    assert count_flops(padded, (12, 16), in_channels=4) == 2 * 4 * 6 * 5 * 5 * 12 * 16


def test_count_flops_of_linear_is_twice_the_macs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 7))
    # k = Hout = Wout = 1, Cin = 3*4*5
    assert count_flops(model, (4, 5)) == 2 * (3 * 4 * 5) * 7


def test_count_flops_runs_in_eval_mode_and_restores_training_flag():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    count_flops(model, (8, 8))
    assert model.training and model[1].training
    assert int(model[1].num_batches_tracked) == 0  # eval mode: running statistics untouched


def test_count_flops_of_ssd300_vgg16_is_about_twice_31_gmacs(ssd300, one_thread):
    ssd300.train()
    flops = count_flops(ssd300, (300, 300))
    assert 55e9 < flops < 70e9  # measured 62.7e9 = 2 x 31.4 GMACs (network only)
    assert ssd300.training


# ---------------------------------------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------------------------------------


def test_count_parameters_and_nonzero():
    linear = nn.Linear(4, 3)  # 12 weights + 3 biases
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.fill_(1.0)
        linear.weight[0].zero_()
        linear.bias[0] = 0.0
    assert count_parameters(linear) == 15
    assert count_nonzero_parameters(linear) == 15 - 4 - 1
    shared = nn.Sequential(linear, nn.ReLU(), linear)  # the same module twice: parameters counted once
    assert count_parameters(shared) == 15
    assert count_nonzero_parameters(shared) == 10


def test_file_size_bytes_of_file_and_directory(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 5)
    assert file_size_bytes(tmp_path / "a.bin") == 10
    assert file_size_bytes(tmp_path) == 15
    with pytest.raises(CheckpointError, match="missing"):
        file_size_bytes(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------


def test_measure_latency_returns_positive_times_and_restores_threads():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    model.train()
    previous = torch.get_num_threads()
    other = 1 if previous != 1 else 2
    result = measure_latency(model, (32, 32), batch_size=2, threads=other, warmup=1, runs=5)
    assert set(result) == {"median_ms", "p90_ms", "batch_size", "threads", "clock"}
    # one thread computes in the calling thread: its CPU time is what a busy machine does not inflate
    assert result["clock"] == ("thread_cpu" if other == 1 else "wall")
    assert result["median_ms"] > 0
    assert result["p90_ms"] >= result["median_ms"]
    assert result["batch_size"] == 2
    assert result["threads"] == other
    assert torch.get_num_threads() == previous
    assert model.training


def test_measure_latency_times_the_images_given_cycled_to_the_batch():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.seen: list[torch.Tensor] = []

        def forward(self, x):
            self.seen.append(x.clone())
            return x * self.scale

    images = torch.rand(3, 3, 8, 8)
    model = Recorder()
    measure_latency(model, (8, 8), batch_size=5, threads=1, warmup=0, runs=1, images=images)
    assert torch.equal(model.seen[-1], torch.cat([images, images[:2]]))


def test_measure_latency_of_ssd_end_to_end_and_network_only(ssd300, one_thread):
    end_to_end = measure_latency(ssd300, (300, 300), batch_size=1, threads=1, warmup=0, runs=1)
    network = measure_latency(
        ssd300, (300, 300), batch_size=1, threads=1, warmup=0, runs=1, network_only=True
    )
    assert end_to_end["median_ms"] > 0 and network["median_ms"] > 0
    assert end_to_end["threads"] == 1
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------


def test_top1_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 1])  # arg-max 0, 2, 0, 1 -> 3 of 4 right
    assert top1_accuracy(logits, labels) == pytest.approx(0.75)
