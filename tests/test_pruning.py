"""compression.pruning: graph, layer lookup, consumers and explicit-index filter removal.

Pruning must remove exactly the selected output channels and the matching inputs of every consumer
(next conv, BatchNorm, L2Norm / torchvision's scale_weight, SSD loc/conf head convs), keep every other
weight bit for bit, and leave a model whose training loss and inference still run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compression.data.digits import DIGIT_CLASSES, write_digits_voc
from compression.data.transforms import eval_transforms
from compression.data.voc import VOCDetection
from compression.errors import ConfigError, PrunepipeError, StageError
from compression.models import DEFAULT_PHASES, build_model, layer_names
from compression.pruning import (
    build_dependency_graph,
    consumer_input_means,
    consumers_of,
    count_flops,
    count_parameters,
    prune_filters,
    resolve_layers,
)

NUM_CLASSES = len(DIGIT_CLASSES) + 1  # digits + background


pytestmark = pytest.mark.usefixtures("one_thread")  # the machine's cores are shared


@pytest.fixture(scope="module")
def digits_batch(tmp_path_factory):
    """Two real images of the built-in digits-voc set with their boxes, as float [0, 1] tensors."""
    devkit = write_digits_voc(tmp_path_factory.mktemp("digits"), num_images={"train": 2, "val": 1, "test": 1})
    dataset = VOCDetection(devkit, ["2007:train"], DIGIT_CLASSES, transforms=eval_transforms())
    images, targets = [], []
    for index in range(2):
        image, target = dataset[index]
        images.append(image.float() / 255)
        targets.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]})
    return images, targets


def _every_other(n: int, offset: int = 0) -> list[int]:
    return list(range(offset, n, 2))[: n - 1]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _keep(n: int, removed: list[int]) -> torch.Tensor:
    drop = set(removed)
    return torch.tensor([i for i in range(n) if i not in drop])


def check_exact_removal(model: nn.Module, before: dict[str, torch.Tensor], plan: dict[str, list[int]],
                        consumers: dict[str, list[tuple[str, str]]]) -> None:
    """Every selected filter and its consumers' inputs are gone; every kept weight equals the original."""
    kept_out = {path: _keep(before[f"{path}.weight"].shape[0], idxs) for path, idxs in plan.items()}
    after = model.state_dict()
    for path, keep in kept_out.items():
        layer = model.get_submodule(path)
        assert layer.weight.shape[0] == len(keep)
        expected = before[f"{path}.weight"][keep]
        producer = next((p for p, cons in consumers.items() if any(name == path for name, _ in cons)), None)
        if producer is not None:
            expected = expected[:, kept_out[producer]]
        assert torch.equal(layer.weight.detach(), expected), path
        if layer.bias is not None:
            assert torch.equal(layer.bias.detach(), before[f"{path}.bias"][keep]), path
    for path, readers in consumers.items():
        keep = kept_out[path]
        for name, kind in readers:
            if name in plan:
                continue  # checked above, both dims
            if kind in ("conv", "head", "linear"):
                module = model.get_submodule(name)
                assert module.weight.shape[1] == len(keep), name
                assert getattr(module, "in_channels", len(keep)) == len(keep)
                assert torch.equal(module.weight.detach(), before[f"{name}.weight"][:, keep]), name
            elif kind == "bn":
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    assert torch.equal(after[f"{name}.{attr}"], before[f"{name}.{attr}"][keep]), (name, attr)
            elif kind == "l2norm":
                assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"][keep])
                assert model.get_submodule(name).num_channels == len(keep)
            elif kind == "scale":
                assert torch.equal(after[name], before[name][keep])


def run_detector(model: nn.Module, batch) -> None:
    images, targets = batch
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images) and set(detections[0]) == {"boxes", "scores", "labels"}


def _phase_plan(model: nn.Module, model_name: str, phase: list[str], dg, offset: int) -> dict[str, list[int]]:
    layers = resolve_layers(model, model_name, phase, dg=dg)
    return {path: _every_other(layer.out_channels, offset) for path, layer in layers}


# --------------------------------------------------------------------------------------------


def test_ssd_vgg_lite_phase_by_phase_removes_exactly_the_selection(digits_batch):
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", NUM_CLASSES)
    params0, flops0 = count_parameters(model), count_flops(model)
    dg = build_dependency_graph(model)
    for index, phase in enumerate(DEFAULT_PHASES["ssd_vgg_lite"]):
        plan = _phase_plan(model, "ssd_vgg_lite", phase, dg, offset=index % 2)
        consumers = {path: [(n, k) for n, _, k in consumers_of(dg, model.get_submodule(path))] for path in plan}
        before = _snapshot(model)
        params, flops = count_parameters(model), count_flops(model)
        prune_filters(model, plan, dg=dg)  # the same graph stays valid across phases
        check_exact_removal(model, before, plan, consumers)
        assert count_parameters(model) < params and count_flops(model) < flops
        run_detector(model, digits_batch)
    # conv4_3's channels reach L2Norm and both head convs of feature map 0; fc7's reach map 1's heads.
    conv4_3 = model.backbone.conv4_3.out_channels
    assert model.backbone.l2norm.weight.shape == (conv4_3,)
    assert model.head.classification_head.module_list[0].in_channels == conv4_3
    assert model.head.regression_head.module_list[0].in_channels == conv4_3
    assert model.head.regression_head.module_list[1].in_channels == model.backbone.fc7.out_channels
    assert model.backbone.out_channels[-1] == model.head.classification_head.module_list[5].in_channels
    # Half the filters of every layer: about 4x fewer FLOPs and parameters in the backbone.
    assert count_parameters(model) < 0.4 * params0
    assert count_flops(model) < 0.35 * flops0


def test_ssd300_vgg16_four_phases_keep_it_runnable(digits_batch):
    torch.manual_seed(0)
    model = build_model("ssd300_vgg16", NUM_CLASSES)
    params0, flops0 = count_parameters(model), count_flops(model)
    dg = build_dependency_graph(model)
    conv4_3 = model.get_submodule(layer_names("ssd300_vgg16")["conv4_3"])
    kinds = {name: kind for name, _, kind in consumers_of(dg, conv4_3)}
    assert kinds == {
        "backbone.extra.0.1": "conv",  # conv5_1 (after pool4)
        "backbone.scale_weight": "scale",  # torchvision's L2Norm scale, an unwrapped parameter
        "head.classification_head.module_list.0": "head",
        "head.regression_head.module_list.0": "head",
    }
    for index, phase in enumerate(DEFAULT_PHASES["ssd300_vgg16"]):
        # Shrink each layer to a quarter in phase 1 (keeps the test fast), half in the others.
        plan = _phase_plan(model, "ssd300_vgg16", phase, dg, offset=index % 2)
        if index == 0:
            plan = {path: [i for i in range(model.get_submodule(path).out_channels) if i % 4] for path in plan}
        consumers = {path: [(n, k) for n, _, k in consumers_of(dg, model.get_submodule(path))] for path in plan}
        before = _snapshot(model)
        prune_filters(model, plan, dg=dg)
        check_exact_removal(model, before, plan, consumers)
    assert model.backbone.scale_weight.shape == (conv4_3.out_channels,)
    run_detector(model, ([digits_batch[0][0]], [digits_batch[1][0]]))
    assert count_parameters(model) < 0.3 * params0
    assert count_flops(model) < 0.2 * flops0


def test_vgg_cifar_prunes_batchnorm_and_linear_consumers():
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10, width_mult=0.25)
    model.eval()
    for module in model.modules():  # non-trivial statistics, so a wrong BN slice would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    dg = build_dependency_graph(model)
    plan = {"features.conv4_3": [0, 3, 5], "features.conv5_3": list(range(0, 128, 3))[:40]}
    consumers = {path: [(n, k) for n, _, k in consumers_of(dg, model.get_submodule(path))] for path in plan}
    assert consumers["features.conv5_3"] == [("features.bn5_3", "bn"), ("classifier.0", "linear")]
    before = _snapshot(model)
    x = torch.rand(2, 3, 32, 32)
    prune_filters(model, plan, dg=dg)
    check_exact_removal(model, before, plan, consumers)
    assert model.classifier[0].in_features == 128 - 40
    assert model(x).shape == (2, 10)


def test_zeroed_filters_do_not_change_the_output_when_removed():
    """Removing filters whose outputs are zero leaves the network function unchanged (ssd_vgg_lite)."""
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", NUM_CLASSES).eval()
    conv = model.backbone.conv9_1
    with torch.no_grad():
        conv.weight[[1, 4]] = 0
        conv.bias[[1, 4]] = 0
    from compression.models import SSDNetwork

    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        reference = SSDNetwork(model)(x)
        prune_filters(model, {"conv9_1": [1, 4]}, model_name="ssd_vgg_lite")
        pruned = SSDNetwork(model)(x)
    assert conv.out_channels == 16 - 2
    for a, b in zip(reference, pruned, strict=True):
        torch.testing.assert_close(a, b)


def test_compensation_folds_a_constant_filter_into_the_next_bias_exactly():
    """A removed filter with zero weights still outputs ReLU(bias); folding that constant into the consumer's
    bias keeps the function exact (no padding here), while plain removal shifts the output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight[[2, 5]] = 0
        net[0].bias[[2, 5]] = torch.tensor([0.7, 1.3])
    x = torch.rand(4, 3, 12, 12)
    with torch.no_grad():
        reference = net(x)
    plain = copy.deepcopy(net)
    means = consumer_input_means(net, {"0": [2, 5]}, lambda m: m(x), dg=build_dependency_graph(net, (12, 12)))
    assert set(means) == {"2"}
    torch.testing.assert_close(means["2"][[2, 5]], torch.tensor([0.7, 1.3]))
    prune_filters(net, {"0": [2, 5]}, compensate=means, dg=build_dependency_graph(net, (12, 12)))
    prune_filters(plain, {"0": [2, 5]}, dg=build_dependency_graph(plain, (12, 12)))
    assert net[0].out_channels == plain[0].out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference)
        assert (plain(x) - reference).abs().max() > 0.05


def test_compensation_shrinks_the_error_of_removing_near_constant_filters_in_ssd():
    """ssd_vgg_lite, conv3_1 (3x3 consumers with zero padding, so exact only away from the borders)."""
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", NUM_CLASSES).eval()
    conv = model.backbone.conv3_1
    with torch.no_grad():
        conv.weight[[0, 3, 6]] *= 0.01
        conv.bias[[0, 3, 6]] = 0.5
    from compression.models import SSDNetwork

    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        reference = SSDNetwork(model)(x)
    plain = copy.deepcopy(model)
    means = consumer_input_means(model, {"conv3_1": [0, 3, 6]}, lambda m: SSDNetwork(m)(x), model_name="ssd_vgg_lite")
    prune_filters(model, {"conv3_1": [0, 3, 6]}, model_name="ssd_vgg_lite", compensate=means)
    prune_filters(plain, {"conv3_1": [0, 3, 6]}, model_name="ssd_vgg_lite")
    with torch.no_grad():
        folded, removed = SSDNetwork(model)(x), SSDNetwork(plain)(x)
    error = lambda out: sum((a - b).abs().mean().item() for a, b in zip(out, reference, strict=True))  # noqa: E731
    assert error(folded) < 0.2 * error(removed), (error(folded), error(removed))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("conv99_1", "unknown layer 'conv99_1'"),
        ("backbone.l2norm", "is a L2Norm, not a prunable"),
        ("head.classification_head.module_list.0", "SSD head conv"),
    ],
)
def test_resolve_layers_refuses_unknown_and_unprunable_layers(name, message):
    model = build_model("ssd_vgg_lite", NUM_CLASSES)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_layers(model, "ssd_vgg_lite", [name])
    assert "\n" not in str(info.value)


def test_resolve_layers_accepts_paper_names_and_paths_and_refuses_outputs():
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    assert resolve_layers(model, "vgg16_cifar", ["conv1_1", "features.conv1_2"]) == [
        ("features.conv1_1", model.features.conv1_1),
        ("features.conv1_2", model.features.conv1_2),
    ]
    with pytest.raises(ConfigError, match="BatchNorm2d, not a prunable"):
        resolve_layers(model, "vgg16_cifar", ["features.bn1_1"])
    with pytest.raises(ConfigError, match="produces the network's outputs"):
        resolve_layers(model, "vgg16_cifar", ["classifier.0"])  # the one Linear: its outputs are the classes


def test_prune_refuses_emptying_and_out_of_range_selections():
    model = build_model("ssd_vgg_lite", NUM_CLASSES)
    before = _snapshot(model)
    dg = build_dependency_graph(model)
    n = model.backbone.conv8_1.out_channels
    with pytest.raises(StageError, match="removes all 32 filters of layer 'conv8_1'") as info:
        prune_filters(model, {"conv8_1": list(range(n))}, model_name="ssd_vgg_lite", dg=dg)
    assert "\n" not in str(info.value)
    with pytest.raises(StageError, match="cannot remove index 32"):
        prune_filters(model, {"backbone.conv8_1": [0, 32]}, dg=dg)
    with pytest.raises(PrunepipeError, match="SSD head conv"):
        prune_filters(model, {"head.regression_head.module_list.0": [0]}, dg=dg)
    # Nothing was touched by the refused calls.
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_prune_accepts_selection_records_and_copies_are_independent():
    model = build_model("ssd_vgg_lite", NUM_CLASSES)
    twin = copy.deepcopy(model)
    prune_filters(model, {"conv5_1": {"remove": [2, 3], "keep": 62}}, model_name="ssd_vgg_lite")
    assert model.backbone.conv5_1.out_channels == 62 and model.backbone.conv5_2.in_channels == 62
    assert twin.backbone.conv5_1.out_channels == 64


def test_a_layer_pruned_again_after_a_checkpoint_round_trip_keeps_l2norm_in_step(tmp_path):
    # The default SSD phases share their boundary layers: conv4_3 (which feeds the L2Norm) is pruned in
    # phase 1, saved, loaded, and pruned again in phase 2.
    from compression.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    model = build_model("ssd_vgg_lite", num_classes=11, width_mult=0.125, image_size=128).eval()
    prune_filters(model, {"conv4_3": [0, 1, 2]}, model_name="ssd_vgg_lite")
    ckpt = Checkpoint(model=model, model_name="ssd_vgg_lite",
                      model_args={"num_classes": 11, "width_mult": 0.125, "image_size": 128},
                      class_names=list(DIGIT_CLASSES),
                      stage="prune")
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "phase1.safetensors")).model.eval()
    width = loaded.get_submodule(layer_names("ssd_vgg_lite")["conv4_3"]).out_channels
    prune_filters(loaded, {"conv4_3": [width - 1, width - 2]}, model_name="ssd_vgg_lite")
    norms = [m for m in loaded.modules() if type(m).__name__ == "L2Norm"]
    assert norms and all(norm.num_channels == width - 2 for norm in norms)
    with torch.no_grad():
        loaded(torch.rand(1, 3, 128, 128))
