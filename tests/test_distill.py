"""compression.distill: KD terms, the teacher-bounded regression loss and the distillation objective."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from compression.config import DistillConfig
from compression.data.classification import build_classification_dataset
from compression.data.digits import DIGIT_CLASSES, write_digits_cls, write_digits_voc
from compression.data.transforms import eval_transforms
from compression.data.voc import VOCDetection
from compression.distill import (
    DistillationObjective,
    classifier_kd_loss,
    hint_loss,
    kd_kl,
    ssd_logit_kd,
    teacher_bounded_regression,
)
from compression.errors import ConfigError, ModelError
from compression.models import build_model
from compression.pruning import prune_filters
from compression.train import train_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detection_batch(tmp_path_factory):
    devkit = write_digits_voc(tmp_path_factory.mktemp("digits_voc"), num_images={"train": 3, "val": 1, "test": 1})
    dataset = VOCDetection(devkit, ["2007:train"], DIGIT_CLASSES, transforms=eval_transforms())
    images, targets = [], []
    for index in range(3):
        image, target = dataset[index]
        images.append(image.float() / 255)
        targets.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]})
    return images, targets


@pytest.fixture(scope="module")
def classification_loader(tmp_path_factory):
    root = write_digits_cls(tmp_path_factory.mktemp("digits_cls"), num_images={"train": 32, "val": 10, "test": 10})
    dataset = build_classification_dataset("imagefolder", root, "train", train_aug=False)
    return DataLoader(dataset, batch_size=16, shuffle=False)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)
    assert ssd_logit_kd(logits, logits.clone(), T=4.0).item() == pytest.approx(0.0, abs=1e-7)
    other = logits + torch.randn_like(logits)
    assert ssd_logit_kd(other, logits, T=4.0).item() > 0
    # T² scaling of the per-box mean KL.
    assert ssd_logit_kd(other, logits, T=2.0).item() == pytest.approx(4 * kd_kl(other, logits, 2.0).mean().item(), rel=1e-5)
    labels = torch.randint(0, 11, (4,))
    student, teacher = other[:, 0], logits[:, 0]
    assert classifier_kd_loss(student, teacher, labels, T=3.0, a=0.0).item() == pytest.approx(
        F.cross_entropy(student, labels).item(), rel=1e-6)
    assert classifier_kd_loss(teacher, teacher, labels, T=3.0, a=1.0).item() == pytest.approx(0.0, abs=1e-6)
    expected = 0.7 * F.cross_entropy(student, labels) + 0.3 * 9 * F.kl_div(
        F.log_softmax(student / 3, 1), F.log_softmax(teacher / 3, 1), reduction="batchmean", log_target=True)
    assert classifier_kd_loss(student, teacher, labels, T=3.0, a=0.3).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bounded_regression_is_zero_exactly_where_the_student_beats_the_teacher_by_the_margin():
    target = torch.zeros(1, 5, 4)
    teacher = torch.tensor([[[1.0, 0, 0, 0]] * 5])  # teacher error 1 on every box
    student = torch.tensor([[[0.5, 0, 0, 0],  # error 0.25: beats 1 by 0.75 >= m = 0.5 -> 0
                             [0.8, 0, 0, 0],  # error 0.64: beats by 0.36 < m -> counts 0.64
                             [2.0, 0, 0, 0],  # error 4: worse -> counts
                             [0.0, 0, 0, 0],  # error 0 -> 0
                             [3.0, 0, 0, 0]]])  # error 9, but a negative box: never counts
    positive = torch.tensor([[True, True, True, True, False]])
    loss = teacher_bounded_regression(student, teacher, target, positive, margin=0.5)
    assert loss.item() == pytest.approx((0.64 + 4.0) / 4)
    assert teacher_bounded_regression(student, teacher, target, positive, margin=0.0).item() == pytest.approx(4.0 / 4)
    # Exactly at the boundary (e_s + m == e_t) the student counts as beating the teacher.
    at = torch.tensor([[[0.5, 0, 0, 0]]])
    assert teacher_bounded_regression(at, torch.tensor([[[1.0, 0, 0, 0]]]), torch.zeros(1, 1, 4),
                                      torch.tensor([[True]]), margin=0.75).item() == 0.0
    student.requires_grad_(True)
    teacher_bounded_regression(student, teacher, target, positive, margin=0.5).backward()
    assert student.grad[0, 0].abs().sum() == 0 and student.grad[0, 2].abs().sum() > 0


def _pruned_lite(teacher):
    student = copy.deepcopy(teacher)
    prune_filters(student, {"conv4_3": list(range(0, 64, 2)), "fc7": list(range(0, 128, 3))}, model_name="ssd_vgg_lite")
    return student


def test_ssd_objective_terms_gradients_and_frozen_teacher(detection_batch):
    images, targets = detection_batch
    torch.manual_seed(0)
    teacher = build_model("ssd_vgg_lite", 11)
    student = _pruned_lite(teacher)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    results = {}
    for fast in (True, False):
        torch.manual_seed(1)  # the same adapter init for both paths
        objective = DistillationObjective(student, teacher, temperature=2.0, kd_weight=0.5, box_weight=0.5,
                                          margin=0.1, hint_weight=1.0, hint_layer="conv4_3",
                                          model_name="ssd_vgg_lite", fast_ssd=fast)
        objective.train()
        assert student.training and not teacher.training
        losses = objective(images, targets)
        assert set(losses) == {"bbox_regression", "classification", "kd", "bounded_regression", "hint"}
        assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
        results[fast] = {k: v.item() for k, v in losses.items()}
        sum(losses.values()).backward()
        assert student.backbone.conv1_1.weight.grad is not None and objective.adapter.conv.weight.grad is not None
        assert all(p.grad is None for p in teacher.parameters())
        student.zero_grad(set_to_none=True)
        objective.remove_hooks()
    for key, value in results[True].items():  # ssd_fast and torchvision's matching agree
        assert results[False][key] == pytest.approx(value, rel=1e-4), key
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_state.items())  # BN stats too


def test_ssd_objective_against_an_identical_student(detection_batch):
    images, targets = detection_batch
    torch.manual_seed(0)
    teacher = build_model("ssd_vgg_lite", 11).eval()
    student = copy.deepcopy(teacher)
    objective = DistillationObjective(student, teacher, kd_weight=0.5, box_weight=1.0, margin=0.0)
    objective.eval()  # same BN mode in both, so the outputs are identical
    losses = objective(images, targets)
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["bounded_regression"].item() == 0.0  # e_s + 0 > e_t never holds when e_s == e_t
    with_margin = DistillationObjective(student, teacher, kd_weight=0.0, box_weight=1.0, margin=0.01).eval()
    assert "kd" not in (losses := with_margin(images, targets)) and losses["bounded_regression"].item() > 0
    no_teacher = DistillationObjective(student, teacher, kd_weight=0.0, box_weight=0.0)
    assert set(no_teacher(images, targets)) == {"bbox_regression", "classification"}


def test_teachers_with_other_classes_or_boxes_are_refused():
    student = build_model("ssd_vgg_lite", 11)
    with pytest.raises(ModelError, match="teacher predicts 21 classes, the student 11") as info:
        DistillationObjective(student, build_model("ssd_vgg_lite", 21))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="resizes or normalises"):
        DistillationObjective(student, build_model("ssd_vgg_lite", 11, image_size=96))
    with pytest.raises(ModelError, match="both be detectors or both classifiers"):
        DistillationObjective(student, build_model("vgg16_cifar", 11, width_mult=0.125))
    with pytest.raises(ModelError, match="teacher predicts 10 classes, the student 5"):
        DistillationObjective(build_model("vgg16_cifar", 5, width_mult=0.125), build_model("vgg16_cifar", 10, width_mult=0.125))
    with pytest.raises(ConfigError, match="hint_layer"):
        DistillationObjective(student, copy.deepcopy(student), hint_weight=1.0)


def test_classifier_objective_trains_the_student_only(classification_loader):
    torch.manual_seed(0)
    teacher = build_model("vgg16_cifar", 10, width_mult=0.125)
    student = copy.deepcopy(teacher)
    prune_filters(student, {"conv4_3": list(range(0, 64, 2)), "conv5_1": [0, 1]}, model_name="vgg16_cifar")
    cfg = DistillConfig(epochs=1, lr=0.01, temperature=3.0, kd_weight=0.4, hint_weight=0.5, hint_layer="conv4_3")
    objective = DistillationObjective.from_config(student, teacher, cfg, model_name="vgg16_cifar")
    assert objective.adapter.conv.in_channels == 32 and objective.adapter.conv.out_channels == 64
    images, labels = next(iter(classification_loader))
    losses = objective(images, labels)
    assert set(losses) == {"ce", "kd", "hint"}
    assert losses["ce"].item() == pytest.approx(0.6 * F.cross_entropy(student(images), labels).item(), rel=1e-4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = student.features.conv1_1.weight.detach().clone()
    state = train_model(objective, classification_loader, cfg, progress=False)
    assert {"train_ce", "train_kd", "train_hint"} <= set(state.history[0])
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert not torch.equal(student.features.conv1_1.weight.detach(), student_before)
    assert not teacher.training
    # hint_loss itself: zero for equal maps through no adapter.
    feature = torch.randn(2, 4, 3, 3)
    assert hint_loss(feature, feature).item() == 0.0
