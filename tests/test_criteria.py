"""compression.criteria: l1_norm, bn_scale, random and Taylor scores, ratio/FLOPs selection, Taylor pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compression import metrics
from compression.config import SelectionConfig
from compression.criteria import rank_filters, select_by_flops, select_by_ratio, taylor_prune
from compression.data.classification import build_classification_dataset
from compression.data.digits import DIGIT_CLASSES, write_digits_cls, write_digits_voc
from compression.data.transforms import eval_transforms
from compression.data.voc import VOCDetection
from compression.errors import ConfigError, StageError
from compression.models import build_model
from compression.pruning import build_dependency_graph, prune_filters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_loader(tmp_path_factory):
    root = write_digits_cls(tmp_path_factory.mktemp("digits_cls"), num_images={"train": 48, "val": 10, "test": 10})
    dataset = build_classification_dataset("imagefolder", root, "train", train_aug=False)
    return DataLoader(dataset, batch_size=16, shuffle=False)


def plain_net(seed: int = 0) -> nn.Sequential:
    """conv(8) -> relu -> conv(16) -> relu -> pool -> linear: no BatchNorm, so a dead filter outputs zeros."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def test_l1_norm_is_the_filters_own_l1_norm():
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    dg = build_dependency_graph(model)
    scores = rank_filters("l1_norm", model, dg, ["features.conv3_1", "features.conv5_3"])
    for name, values in scores.items():
        weight = model.get_submodule(name).weight.detach()
        assert values == pytest.approx(weight.abs().sum(dim=(1, 2, 3)).tolist(), rel=1e-6)


def test_bn_scale_picks_the_smallest_abs_gamma_and_needs_a_batchnorm():
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    with torch.no_grad():
        gamma = model.features.bn2_1.weight
        gamma.copy_(torch.linspace(0.5, 1.5, gamma.numel()))
        gamma[4] = -0.01  # smallest magnitude
        gamma[6] = -2.0  # negative but large: important
    dg = build_dependency_graph(model)
    scores = rank_filters("bn_scale", model, dg, ["features.conv2_1"])["features.conv2_1"]
    assert scores == pytest.approx(gamma.detach().abs().tolist())
    assert min(range(len(scores)), key=scores.__getitem__) == 4
    assert select_by_ratio({"l": scores}, ratio=1 / len(scores))["l"]["remove"] == [4]
    ssd = build_model("ssd_vgg_lite", 11, batch_norm=False)
    with pytest.raises(ConfigError, match="layer 'backbone.conv1_1' has no BatchNorm after it"):
        rank_filters("bn_scale", ssd, build_dependency_graph(ssd), ["backbone.conv1_1"])


def test_random_is_seeded():
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    dg = build_dependency_graph(model)
    layers = ["features.conv1_1", "features.conv1_2"]
    first = rank_filters("random", model, dg, layers, seed=3)
    assert first == rank_filters("random", model, dg, layers, seed=3)
    assert first != rank_filters("random", model, dg, layers, seed=4)
    assert first["features.conv1_1"] != first["features.conv1_2"]  # not the same draw per layer
    with pytest.raises(ConfigError, match="unknown ranking criterion 'seed'"):
        rank_filters("seed", model, dg, layers)


def _dead(conv: nn.Conv2d, index: int) -> None:
    with torch.no_grad():
        conv.weight[index] = 0
        if conv.bias is not None:
            conv.bias[index] = 0


def test_taylor_scores_a_dead_filter_lowest(digits_loader):
    net = plain_net()
    _dead(net[0], 5)
    dg = build_dependency_graph(net, input_size=(32, 32))
    scores = rank_filters("taylor", net, dg, [("0", net[0]), ("2", net[2])],
                          loss_fn=classification_loss, batches=digits_loader, n_batches=2)
    first = scores["0"]
    assert first[5] == 0.0 and all(v > 0 for i, v in enumerate(first) if i != 5)
    assert sum(v * v for v in first) == pytest.approx(1.0)  # L2-normalised per layer
    assert all(p.grad is None for p in net.parameters())  # gradients were cleared

    # With BatchNorm after the conv (hooked on the BN output): β = 0 keeps the dead channel at zero.
    vgg = build_model("vgg16_cifar", 10, width_mult=0.125)
    _dead(vgg.features.conv3_2, 7)
    dg = build_dependency_graph(vgg)
    scores = rank_filters("taylor", vgg, dg, ["features.conv3_2"], loss_fn=classification_loss,
                          batches=digits_loader, n_batches=1)["features.conv3_2"]
    assert min(range(len(scores)), key=scores.__getitem__) == 7 and scores[7] == 0.0


def test_taylor_on_ssd_with_the_multibox_loss(tmp_path):
    devkit = write_digits_voc(tmp_path, num_images={"train": 2, "val": 1, "test": 1})
    dataset = VOCDetection(devkit, ["2007:train"], DIGIT_CLASSES, transforms=eval_transforms())
    batch = []
    for index in range(2):
        image, target = dataset[index]
        batch.append((image.float() / 255, {"boxes": target["boxes"].as_subclass(torch.Tensor),
                                            "labels": target["labels"]}))
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11)
    _dead(model.backbone.conv8_1, 3)
    dg = build_dependency_graph(model)
    scores = rank_filters("taylor", model, dg, ["backbone.conv8_1", "backbone.conv4_3"],
                          loss_fn=lambda m, b: m(*b), batches=[(images, targets)])
    assert scores["backbone.conv8_1"][3] == 0.0
    assert sorted(scores["backbone.conv8_1"])[1] > 0
    assert model.training  # the mode it was in


def test_select_by_ratio_per_layer_and_global():
    scores = {"a": [0.5, 0.1, 0.9, 0.3], "b": [0.05, 0.2, 0.6, 0.7, 0.8, 0.95]}
    per_layer = select_by_ratio(scores, 0.5)
    assert per_layer["a"]["remove"] == [1, 3] and per_layer["b"]["remove"] == [0, 1, 2]
    global_ = select_by_ratio(scores, 0.3, scope="global")  # 3 of 10 lowest overall: b0, a1, b1
    assert global_["a"]["remove"] == [1] and global_["b"]["remove"] == [0, 1]
    floored = select_by_ratio(scores, 1.0, min_channels=3)
    assert floored["a"]["keep"] == 3 and floored["b"]["keep"] == 3
    assert select_by_ratio(scores, 0.5, round_to=4)["b"]["keep"] == 4  # 3 kept -> 4
    # max_layer_ratio 0.5: the global cut takes at most half of each layer and goes on to the next lowest.
    capped = select_by_ratio(scores, 0.6, scope="global", max_layer_ratio=0.5)  # 6 filters, b's floor is 3
    assert capped["b"]["remove"] == [0, 1, 2] and capped["a"]["remove"] == [1, 3]


def test_a_global_flops_budget_with_max_layer_ratio_spreads_the_cut():
    model = build_model("vgg16_cifar", 10, width_mult=0.25)
    dg = build_dependency_graph(model)
    layers = [f"features.conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
    # Scores that rank every filter of the deep layers below any of the early ones.
    scores = {name: [float(-i) for _ in range(model.get_submodule(name).out_channels)] for i, name in enumerate(layers)}
    free, _ = select_by_flops(model, scores, 2.0, min_channels=2, scope="global", dg=dg)
    capped, info = select_by_flops(model, scores, 2.0, min_channels=2, scope="global", max_layer_ratio=0.5, dg=dg)
    assert free["features.conv5_3"]["keep"] == 2  # uncapped: the deep layers go down to min_channels
    for name in layers:
        n = model.get_submodule(name).out_channels
        assert capped[name]["keep"] >= n / 2
    assert info["flops_ratio"] >= 2.0


def test_select_by_flops_reaches_the_target_and_estimates_exactly():
    model = build_model("vgg16_cifar", 10, width_mult=0.25)
    dg = build_dependency_graph(model)
    layers = [f"features.conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
    scores = rank_filters("l1_norm", model, dg, layers)
    flops0 = metrics.count_flops(model, (32, 32))
    selection, info = select_by_flops(model, scores, 3.0, min_channels=4, dg=dg)
    assert info["flops_before"] == flops0
    prune_filters(model, selection, dg=dg)
    flops1 = metrics.count_flops(model, (32, 32))
    assert flops1 == info["flops_after"]  # the analytic estimate is exact for convs + linears
    assert 3.0 <= flops0 / flops1 < 3.3
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(StageError, match="out of reach"):
        select_by_flops(build_model("vgg16_cifar", 10, width_mult=0.25), scores, 1e4, min_channels=4)
    # closest: down to the floors instead, saying how far short of the target that stops.
    floors, short = select_by_flops(build_model("vgg16_cifar", 10, width_mult=0.25), scores, 1e4, min_channels=4,
                                    closest=True)
    assert all(entry["keep"] == 4 for entry in floors.values())
    assert short["flops_short_of_target"] == pytest.approx(1e4 / short["flops_ratio"]) and short["flops_ratio"] > 3.3


def test_taylor_prune_steps_finetunes_between_and_tracks_original_indices(digits_loader):
    net = plain_net()
    _dead(net[2], 11)
    calls = []

    def finetune(model: nn.Module, n_batches: int) -> None:
        calls.append((n_batches, model[2].out_channels))

    cfg = SelectionConfig(criterion="taylor", prune_ratio=0.25, taylor_step_filters=4, taylor_batches=1,
                          taylor_finetune_batches=3, min_channels=2)
    layers = [("0", net[0]), ("2", net[2])]
    _, history = taylor_prune(net, layers, classification_loss, digits_loader, finetune, cfg, input_size=(32, 32))
    assert [h["filters"] for h in history] == [24 - 4, 24 - 6]  # ceil(0.25 * 24) = 6, four then two
    assert len(calls) == 1 and calls[0][0] == 3  # between the steps only
    removed = [(name, i) for h in history for name, ids in h["removed"].items() for i in ids]
    assert len(set(removed)) == 6  # original indices: never the same filter twice
    assert 11 in history[0]["removed"]["2"]  # the dead filter goes first
    assert net[0].out_channels + net[2].out_channels == 18 and net[6].in_features == net[2].out_channels
    assert history[-1]["flops_ratio"] > 1
    net(torch.rand(2, 3, 32, 32))

    flops_cfg = SelectionConfig(criterion="taylor", target_flops_ratio=1.5, taylor_step_filters=2,
                                taylor_batches=1, taylor_finetune_batches=0)
    small = plain_net(1)
    base = metrics.count_flops(small, (32, 32))
    _, history = taylor_prune(small, [("0", small[0]), ("2", small[2])], classification_loss, digits_loader,
                              None, flops_cfg, input_size=(32, 32))
    assert base / metrics.count_flops(small, (32, 32)) >= 1.5
    assert len(history) >= 2 and history[-2]["flops_ratio"] < 1.5  # stopped at the first step that got there
    with pytest.raises(ConfigError, match="prune_ratio or target_flops_ratio"):
        taylor_prune(small, ["0"], classification_loss, digits_loader, None, SelectionConfig(criterion="taylor"))


def test_taylor_prune_floors_each_layer_at_a_share_of_its_original_width(digits_loader):
    # Step after step the floor stays (1 - max_layer_ratio) of the width the loop started from; it must not
    # be recomputed from the shrunk width (which lets every layer collapse to min_channels).
    net = plain_net()
    cfg = SelectionConfig(criterion="taylor", prune_ratio=1.0, max_layer_ratio=0.5, min_channels=1,
                          taylor_step_filters=2, taylor_batches=1, taylor_finetune_batches=0)
    _, history = taylor_prune(net, [("0", net[0]), ("2", net[2])], classification_loss, digits_loader, None, cfg,
                              input_size=(32, 32))
    assert (net[0].out_channels, net[2].out_channels) == (4, 8)
    assert history[-1] == {"step": len(history), "stopped": "all layers at their floor"}


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_taylor_prune_stops_within_five_percent_of_the_flops_target(digits_loader, target):
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    layers = [f"features.conv{block}_{i}" for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
              for i in range(1, count + 1)]
    widths = {name: model.get_submodule(name).out_channels for name in layers}
    base = metrics.count_flops(model, (32, 32))
    cfg = SelectionConfig(criterion="taylor", target_flops_ratio=target, min_channels=2, max_layer_ratio=0.9,
                          taylor_step_filters=24, taylor_batches=1, taylor_finetune_batches=0)
    _, history = taylor_prune(model, layers, classification_loss, digits_loader, None, cfg)
    ratio = base / metrics.count_flops(model, (32, 32))
    assert target <= ratio <= 1.05 * target, history[-1]
    assert history[-1]["flops_ratio"] == pytest.approx(ratio)
    for name in layers:  # the floor is 10 % of the original width (at least min_channels)
        assert model.get_submodule(name).out_channels >= max(2, -(-widths[name] // 10))
