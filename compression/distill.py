"""Stage 6: knowledge distillation from the pretrained teacher into the pruned student (docs/method.md).

- Classifier (Hinton et al. 2015): L = (1−a)·CE(y, z_s) + a·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)).
- SSD (Chen et al. 2017, on torchvision's SSD outputs, teacher and student sharing the default boxes):
  L = multibox(student, ground truth) + a·T²·KL over the class logits of every default box
  + b·teacher-bounded regression + c·hint (optional).

``DistillationObjective`` is an objective module for ``train.train_model``: ``forward(images, targets)``
returns the *weighted* terms as a dict, so their sum is the loss. It holds the student, the frozen
teacher (always in eval mode, no gradients) and, with a hint layer, the trainable 1×1 adapter.
Matching for the SSD terms reuses the SSD's own ``proposal_matcher`` thresholds and ``box_coder``:
through ``compression.ssd_fast`` (the batched equivalent of torchvision's code, the default) or
through torchvision's ``SSD.transform`` / ``proposal_matcher`` / ``compute_loss`` (``fast_ssd=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from compression.config import DistillConfig
from compression.errors import ConfigError, ModelError

__all__ = [
    "DistillationObjective",
    "HintAdapter",
    "classifier_kd_loss",
    "hint_loss",
    "kd_kl",
    "ssd_logit_kd",
    "teacher_bounded_regression",
]


# --------------------------------------------------------------------------------------------
# Loss terms


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) per row (last dim = classes), shape = logits.shape[:-1]."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def classifier_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                       T: float, a: float) -> Tensor:
    """(1−a)·CE(labels, z_s) + a·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), KL averaged over the batch."""
    ce = F.cross_entropy(student_logits, labels)
    return (1 - a) * ce + a * T * T * kd_kl(student_logits, teacher_logits, T).mean()


def ssd_logit_kd(student_cls: Tensor, teacher_cls: Tensor, T: float) -> Tensor:
    """T²·KL(teacher ‖ student) of the (B, A, C) class logits, averaged over all B·A default boxes **(ours)**."""
    if student_cls.shape != teacher_cls.shape:
        raise ModelError(
            f"distill: student class logits {tuple(student_cls.shape)} and teacher's {tuple(teacher_cls.shape)} differ"
        )
    return T * T * kd_kl(student_cls, teacher_cls, T).mean()


def teacher_bounded_regression(student_reg: Tensor, teacher_reg: Tensor, target_reg: Tensor,
                               positive_mask: Tensor, margin: float = 0.0) -> Tensor:
    """Chen et al. 2017's teacher-bounded L2 regression loss over the positive default boxes.

    Per positive box, e_s = ‖s − y‖² counts when e_s + m > e_t = ‖t − y‖², and is 0 otherwise, i.e.
    exactly where the student beats the teacher by the margin. Summed over boxes and divided by the
    number of positives (at least 1) **(ours: the multibox loss's normalisation)**. (B, A, 4) encoded
    regressions, (B, A) bool mask.
    """
    student_error = (student_reg.float() - target_reg.float()).pow(2).sum(-1)
    teacher_error = (teacher_reg.detach().float() - target_reg.float()).pow(2).sum(-1)
    counts = positive_mask & (student_error + margin > teacher_error)
    return torch.where(counts, student_error, 0.0).sum() / positive_mask.sum().clamp(min=1)


class HintAdapter(nn.Module):
    """A 1×1 conv from the student's feature channels to the teacher's (FitNets / Chen et al.)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, adapter: nn.Module | None = None) -> Tensor:
    """MSE between the (adapted) student feature map and the teacher's."""
    adapted = adapter(student_feature) if adapter is not None else student_feature
    if adapted.shape != teacher_feature.shape:
        raise ModelError(
            f"distill: hint features differ in shape: student {tuple(adapted.shape)}, teacher {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(adapted.float(), teacher_feature.detach().float())


# --------------------------------------------------------------------------------------------
# The objective


def _num_classes(model: nn.Module) -> int | None:
    if isinstance(model, SSD):
        return int(model.head.classification_head.num_columns)
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last.out_features if last is not None else None


def _feature_channels(module: nn.Module, path: str) -> int:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() == 0:
        raise ConfigError(f"stages.distill.hint_layer: {path!r} has no channels to read (use a conv, BN or L2Norm)")
    return int(weight.shape[0])


class DistillationObjective(nn.Module):
    """Student + frozen teacher (+ hint adapter): ``forward(images, targets) -> {name: weighted loss}``.

    Detection (SSD) terms: ``bbox_regression`` and ``classification`` (the student's multibox loss),
    ``kd`` = a·T²·KL, ``bounded_regression`` = b·L_b, ``hint`` = c·MSE. Classification terms: ``ce`` =
    (1−a)·CE, ``kd`` = a·T²·KL, ``hint``. Terms whose weight is 0 are left out (and the teacher is not
    run when no term needs it). A teacher with other classes (or, for SSDs, another input size,
    normalisation or default boxes) is refused with a ``ModelError``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        kd_weight: float = 0.5,
        box_weight: float = 0.5,
        margin: float = 0.0,
        hint_weight: float = 0.0,
        hint_layer: str | None = None,
        model_name: str | None = None,
        fast_ssd: bool = True,
        amp_bf16: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.detection = isinstance(student, SSD)
        if self.detection != isinstance(teacher, SSD):
            raise ModelError("distill: the teacher and the student must both be detectors or both classifiers")
        student_classes, teacher_classes = _num_classes(student), _num_classes(teacher)
        if student_classes is not None and teacher_classes is not None and student_classes != teacher_classes:
            raise ModelError(
                f"distill: the teacher predicts {teacher_classes} classes, the student {student_classes}; "
                "distillation needs the same classes"
            )
        if self.detection:
            _check_same_ssd_frame(student, teacher)
        if not temperature > 0:
            raise ConfigError(f"stages.distill.temperature must be > 0, got {temperature}")
        self.student = student
        self.teacher = teacher
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.box_weight = float(box_weight) if self.detection else 0.0
        self.margin = float(margin)
        self.hint_weight = float(hint_weight)
        self.fast_ssd = fast_ssd
        self.amp_bf16 = amp_bf16
        self.channels_last = channels_last
        self.adapter: HintAdapter | None = None
        self._hint_handles: list[Any] = []
        self._captured: dict[str, Tensor] = {}
        self._capturing = False
        if self.hint_weight > 0:
            if not hint_layer:
                raise ConfigError("stages.distill.hint_weight > 0 needs stages.distill.hint_layer")
            path = hint_layer
            if model_name is not None:
                from compression.models import layer_names

                path = layer_names(model_name).get(hint_layer, hint_layer)
            try:
                student_module, teacher_module = student.get_submodule(path), teacher.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"stages.distill.hint_layer: no module {hint_layer!r} in the student and teacher") from None
            self.adapter = HintAdapter(_feature_channels(student_module, path), _feature_channels(teacher_module, path))
            self._hint_handles = [
                student_module.register_forward_hook(self._capture("student")),
                teacher_module.register_forward_hook(self._capture("teacher")),
            ]

    @classmethod
    def from_config(cls, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, *,
                    model_name: str | None = None, fast_ssd: bool = True, amp_bf16: bool = False,
                    channels_last: bool = False) -> DistillationObjective:
        return cls(student, teacher, temperature=cfg.temperature, kd_weight=cfg.kd_weight, box_weight=cfg.box_weight,
                   margin=cfg.margin, hint_weight=cfg.hint_weight, hint_layer=cfg.hint_layer,
                   model_name=model_name, fast_ssd=fast_ssd, amp_bf16=amp_bf16, channels_last=channels_last)

    def _capture(self, role: str):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self._capturing:
                self._captured[role] = output

        return hook

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics and dropout stay frozen
        return self

    @property
    def _needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.box_weight > 0 or self.hint_weight > 0

    def _hint_term(self) -> Tensor:
        student_feature = self._captured.pop("student")
        teacher_feature = self._captured.pop("teacher")
        return self.hint_weight * hint_loss(student_feature, teacher_feature, self.adapter)

    def remove_hooks(self) -> None:
        """Detach the hint hooks from the student and the teacher (call when distillation is over)."""
        for handle in self._hint_handles:
            handle.remove()
        self._hint_handles = []

    def forward(self, images: Any, targets: Any) -> dict[str, Tensor]:
        self._captured.clear()
        self._capturing = bool(self._hint_handles)
        try:
            if self.detection:
                return self._forward_ssd(images, targets)
            return self._forward_classifier(images, targets)
        finally:
            self._capturing = False
            if not self._hint_handles:
                self._captured.clear()

    def _forward_classifier(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.student(images)
        losses = {"ce": (1 - self.kd_weight) * F.cross_entropy(logits, labels)}
        if self._needs_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            if teacher_logits.shape != logits.shape:
                raise ModelError(
                    f"distill: teacher logits {tuple(teacher_logits.shape)} differ from the student's {tuple(logits.shape)}"
                )
            if self.kd_weight > 0:
                T = self.temperature
                losses["kd"] = self.kd_weight * T * T * kd_kl(logits, teacher_logits, T).mean()
            if self.hint_weight > 0:
                losses["hint"] = self._hint_term()
        return losses

    def _forward_ssd(self, images: Any, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        teacher = self.teacher if self._needs_teacher else None
        if self.fast_ssd:
            student_out, teacher_out, positive, target_reg, losses = _ssd_run_fast(
                self.student, teacher, images, targets, self.amp_bf16, self.channels_last
            )
        else:
            student_out, teacher_out, positive, target_reg, losses = _ssd_run_torchvision(
                self.student, teacher, images, targets, self.amp_bf16
            )
        losses = dict(losses)
        if teacher_out is not None:
            if self.kd_weight > 0:
                losses["kd"] = self.kd_weight * ssd_logit_kd(
                    student_out["cls_logits"], teacher_out["cls_logits"], self.temperature
                )
            if self.box_weight > 0:
                losses["bounded_regression"] = self.box_weight * teacher_bounded_regression(
                    student_out["bbox_regression"], teacher_out["bbox_regression"], target_reg, positive, self.margin
                )
            if self.hint_weight > 0:
                losses["hint"] = self._hint_term()
        return losses


# --------------------------------------------------------------------------------------------
# SSD plumbing: student and teacher on the same resized batch, matched targets for the student's boxes


def _check_same_ssd_frame(student: SSD, teacher: SSD) -> None:
    st, tt = student.transform, teacher.transform
    if tuple(st.fixed_size or ()) != tuple(tt.fixed_size or ()) or list(st.image_mean) != list(tt.image_mean) \
            or list(st.image_std) != list(tt.image_std):
        raise ModelError("distill: the teacher SSD resizes or normalises its input differently from the student")
    if student.anchor_generator.num_anchors_per_location() != teacher.anchor_generator.num_anchors_per_location():
        raise ModelError("distill: the teacher SSD has other default boxes per location than the student")


def _same_boxes(student_anchors: Tensor, teacher_anchors: Tensor) -> None:
    if student_anchors.shape != teacher_anchors.shape or not torch.equal(student_anchors, teacher_anchors):
        raise ModelError("distill: the teacher and the student SSD use different default boxes")


def _ssd_run_fast(student: SSD, teacher: SSD | None, images: Any, targets: Sequence[dict[str, Tensor]],
                  amp_bf16: bool, channels_last: bool = False):
    from compression import ssd_fast

    batch, original_sizes = ssd_fast.preprocess_batch(student, images, channels_last=channels_last)
    height, width = batch.shape[-2:]
    resized = []
    for target, (h0, w0) in zip(targets, original_sizes, strict=True):
        scale = torch.tensor([width / w0, height / h0, width / w0, height / h0], dtype=torch.float32,
                             device=target["boxes"].device)
        resized.append({"boxes": target["boxes"].float() * scale, "labels": target["labels"]})
    student_out, anchors = ssd_fast.run_network(student, batch, amp_bf16=amp_bf16)
    losses = ssd_fast.ssd_loss_batched(student, student_out, anchors, resized)
    teacher_out = None
    positive = target_reg = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out, teacher_anchors = ssd_fast.run_network(teacher, batch, amp_bf16=amp_bf16)
        _same_boxes(anchors, teacher_anchors)
        gt_boxes, _, gt_valid = ssd_fast.pad_targets(resized, batch.device)
        matches = ssd_fast.match_anchors(student, gt_boxes, gt_valid, anchors)
        positive = matches >= 0
        matched = gt_boxes.gather(1, matches.clamp(min=0)[:, :, None].expand(-1, -1, 4))
        num_images, num_anchors = matches.shape
        target_reg = student.box_coder.encode_single(
            matched.reshape(-1, 4), anchors.to(gt_boxes.dtype).repeat(num_images, 1)
        ).view(num_images, num_anchors, 4)
    return student_out, teacher_out, positive, target_reg, losses


def _ssd_run_torchvision(student: SSD, teacher: SSD | None, images: Any, targets: Sequence[dict[str, Tensor]],
                         amp_bf16: bool):
    images_list = list(images)
    targets_copy = [{k: v for k, v in t.items()} for t in targets]
    image_batch, resized = student.transform(images_list, targets_copy)
    features = list(student.backbone(image_batch.tensors).values())
    student_out = student.head(features)
    anchors = student.anchor_generator(image_batch, features)
    matched_idxs = []
    for anchors_per_image, target in zip(anchors, resized, strict=True):
        if target["boxes"].numel() == 0:
            matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                           device=anchors_per_image.device))
        else:
            matched_idxs.append(student.proposal_matcher(box_iou(target["boxes"], anchors_per_image)))
    losses = student.compute_loss(resized, student_out, anchors, matched_idxs)
    teacher_out = positive = target_reg = None
    if teacher is not None:
        with torch.no_grad():
            teacher_features = list(teacher.backbone(image_batch.tensors).values())
            teacher_out = teacher.head(teacher_features)
            teacher_anchors = teacher.anchor_generator(image_batch, teacher_features)
        _same_boxes(torch.stack(anchors), torch.stack(teacher_anchors))
        positive = torch.stack([m >= 0 for m in matched_idxs])
        target_reg = torch.stack([
            student.box_coder.encode_single(
                t["boxes"][m.clamp(min=0)] if t["boxes"].numel() else a.new_zeros(a.shape), a
            )
            for t, m, a in zip(resized, matched_idxs, anchors, strict=True)
        ])
    return student_out, teacher_out, positive, target_reg, losses
