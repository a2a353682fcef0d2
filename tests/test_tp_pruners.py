"""compression.tp_pruners: torch-pruning's MagnitudePruner / BNScalePruner / GroupNormPruner on our models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from compression import metrics
from compression.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from compression.config import OptimConfig
from compression.criteria import FLOPS_TOLERANCE
from compression.data.classification import build_classification_dataset
from compression.data.digits import write_digits_cls
from compression.errors import StageError
from compression.models import SSDNetwork, build_model, layer_names
from compression.pruning import layer_channels
from compression.tp_pruners import TP_METHODS, build_pruner, prune_to_flops, sparse_train
from compression.train import ClassificationObjective

VGG_LAYERS = [f"features.{name}" for name in layer_names("vgg16_cifar")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_loader(tmp_path_factory):
    root = write_digits_cls(tmp_path_factory.mktemp("digits_cls"), num_images={"train": 64, "val": 10, "test": 10})
    dataset = build_classification_dataset("imagefolder", root, "train", train_aug=False)
    return DataLoader(dataset, batch_size=16, shuffle=False)


def _vgg(seed: int = 0) -> nn.Module:
    """A narrow vgg16_cifar whose BatchNorm scales differ (at initialisation they are all 1: no ranking)."""
    torch.manual_seed(seed)
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.05, 1.0)
    return model.eval()


@pytest.mark.parametrize("method", TP_METHODS)
def test_each_pruner_reaches_the_flops_target_and_round_trips(method, tmp_path):
    model = _vgg()
    before = metrics.count_flops(model, (32, 32))
    pruner = build_pruner(method, model, VGG_LAYERS, model_name="vgg16_cifar")
    info = prune_to_flops(pruner, model, 3.0, min_channels=4)
    after = metrics.count_flops(model, (32, 32))
    assert info["flops_before"] == before and info["flops_after"] == after
    # The last step stops at the target: "equal FLOPs" between methods means within FLOPS_TOLERANCE (5%).
    assert 3.0 <= before / after < 3.0 * (1 + FLOPS_TOLERANCE)
    widths = [layer_channels(model.get_submodule(name)) for name in VGG_LAYERS]
    assert min(widths) >= 4 and sum(widths) < sum(b for b, _ in info["channels"].values())
    assert model.classifier[-1].out_features == 10  # the output layer is ignored, only a consumer
    images = torch.rand(2, 3, 32, 32)
    expected = model(images)
    ckpt = Checkpoint(model=model, model_name="vgg16_cifar", model_args={"num_classes": 10, "width_mult": 0.125},
                      class_names=[str(d) for d in range(10)], stage="prune")
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / f"{method}.safetensors")).model.eval()
    assert torch.allclose(loaded(images), expected, atol=1e-5)
    assert metrics.count_flops(loaded, (32, 32)) == after


def test_ssd_heads_stay_and_the_pruned_detector_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11, width_mult=0.0625, image_size=64).eval()
    heads = {name: m.out_channels for name, m in model.named_modules() if name.startswith("head.") and
             isinstance(m, nn.Conv2d)}
    pruner = build_pruner("tp_group_l1", model, list(layer_names("ssd_vgg_lite")), model_name="ssd_vgg_lite")
    info = prune_to_flops(pruner, model, 2.0, min_channels=2)
    assert info["flops_ratio"] >= 2.0 and model.backbone.conv4_3.out_channels < 32
    assert model.backbone.l2norm.weight.shape[0] == model.backbone.conv4_3.out_channels
    assert {name: m.out_channels for name, m in model.named_modules() if name in heads} == heads
    x = torch.rand(1, 3, 64, 64)
    boxes, logits = SSDNetwork(model)(x)
    ckpt = Checkpoint(model=model, model_name="ssd_vgg_lite",
                      model_args={"num_classes": 11, "width_mult": 0.0625, "image_size": 64},
                      class_names=[str(d) for d in range(10)], stage="prune")
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "ssd.safetensors")).model.eval()
    boxes2, logits2 = SSDNetwork(loaded)(x)
    assert torch.allclose(boxes, boxes2, atol=1e-5) and torch.allclose(logits, logits2, atol=1e-5)
    assert len(loaded([torch.rand(3, 64, 64)])) == 1


def test_prune_to_flops_keeps_the_max_layer_ratio_floor():
    model = _vgg()
    original = {name: layer_channels(model.get_submodule(name)) for name in VGG_LAYERS}
    pruner = build_pruner("tp_group_l1", model, VGG_LAYERS, model_name="vgg16_cifar")
    info = prune_to_flops(pruner, model, 2.5, min_channels=1, max_layer_ratio=0.6)
    assert info["flops_ratio"] >= 2.5
    for name in VGG_LAYERS:  # at most 60% of each layer's filters gone
        assert layer_channels(model.get_submodule(name)) >= 0.4 * original[name]


def test_an_unreachable_target_is_refused():
    model = _vgg()
    pruner = build_pruner("tp_group_l1", model, ["features.conv5_3"], model_name="vgg16_cifar", iterative_steps=20)
    with pytest.raises(StageError, match="out of reach"):
        prune_to_flops(pruner, model, 50.0, min_channels=4)


def test_an_unreachable_target_prunes_as_far_as_the_pruner_goes_when_asked():
    model = _vgg()
    before = layer_channels(model.get_submodule("features.conv5_3"))
    pruner = build_pruner("tp_group_l1", model, ["features.conv5_3"], model_name="vgg16_cifar", iterative_steps=20)
    info = prune_to_flops(pruner, model, 50.0, min_channels=4, nearest=True)
    assert info["reached"] is False and 1 < info["flops_ratio"] < 50
    assert layer_channels(model.get_submodule("features.conv5_3")) == 4 < before  # down to its floor


@pytest.mark.parametrize("method", ["tp_bn_scale", "tp_group_norm"])
def test_sparse_training_adds_the_regulariser_between_backward_and_step(method, digits_loader):
    optim = OptimConfig(epochs=1, lr=0.01, optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant")

    def trained(reg: float) -> tuple[nn.Module, object]:
        model = _vgg(seed=1)
        pruner = build_pruner(method, model, VGG_LAYERS, model_name="vgg16_cifar", reg=reg)
        torch.manual_seed(0)
        history = sparse_train(pruner, model, ClassificationObjective(model), digits_loader, optim)
        assert len(history) == 1
        return model, pruner

    plain, _ = trained(0.0)
    sparse, pruner = trained(1.0 if method == "tp_bn_scale" else 0.5)
    if method == "tp_bn_scale":  # L1 on the BatchNorm scales: Σ|γ| shrinks
        def measure(m):
            return sum(float(b.weight.detach().abs().sum()) for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    else:  # group-norm penalty on every conv of a group: the weights shrink
        def measure(m):
            return sum(float(m.get_submodule(n).weight.detach().pow(2).sum()) for n in VGG_LAYERS)
        assert pruner.cnt == len(digits_loader)  # once per optimizer step
    assert measure(sparse) < 0.95 * measure(plain)
    # The hook is gone after training: a later optimizer step over the model leaves the gradients alone.
    sparse.zero_grad()
    sparse(torch.rand(2, 3, 32, 32)).sum().backward()
    grads = [q.grad.clone() for q in sparse.parameters()]
    torch.optim.SGD(sparse.parameters(), lr=0.0).step()
    assert all(torch.equal(g, q.grad) for g, q in zip(grads, sparse.parameters(), strict=True))
