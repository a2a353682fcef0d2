"""Model registry, the two SSDs, VGG16-CIFAR, weight loading and pruning through L2Norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

from compression.errors import ModelError
from compression.models import (
    DEFAULT_PHASES,
    MODEL_NAMES,
    L2Norm,
    SSDNetwork,
    build_model,
    dependency_graph_options,
    layer_names,
    load_state_dict_strict,
    model_input_size,
    model_task,
    prunable_layers,
    prune_to_match,
    read_state_dict,
    ssd_default_boxes,
    ssd_feature_sizes,
)
from compression.models.ssd import LITE_ANCHOR_SCALES, SSD_VGG_WIDTHS

SSD_LAYERS = list(SSD_VGG_WIDTHS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def digit_canvas(digits, seed: int, size: int = 128, count: int = 2):
    """A black canvas with `count` real handwritten digits (sklearn's 8x8 set, upscaled to 14-56 px)."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, size, size)
    boxes, labels = [], []
    for _ in range(count):
        index = int(torch.randint(len(digits.images), (1,), generator=gen))
        side = int(torch.randint(14, 57, (1,), generator=gen))
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=gen))
        glyph = torch.tensor(digits.images[index], dtype=torch.float32)[None, None] / 16.0
        glyph = F.interpolate(glyph, size=(side, side), mode="bilinear", align_corners=False)[0]
        image[:, y : y + side, x : x + side] = torch.maximum(image[:, y : y + side, x : x + side], glyph)
        boxes.append([x, y, x + side, y + side])
        labels.append(int(digits.target[index]) + 1)  # 0 is background
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def conv_at(model: nn.Module, path: str) -> nn.Conv2d:
    module = model.get_submodule(path)
    assert isinstance(module, nn.Conv2d), f"{path} is {type(module).__name__}"
    return module


# ---------------------------------------------------------------- registry


def test_registry_names_tasks_and_phases():
    assert MODEL_NAMES == ("ssd300_vgg16", "ssd_vgg_lite", "vgg16_cifar")
    assert [model_task(n) for n in MODEL_NAMES] == ["detection", "detection", "classification"]
    for name in ("ssd300_vgg16", "ssd_vgg_lite"):
        assert list(layer_names(name)) == SSD_LAYERS
        assert prunable_layers(name) == list(layer_names(name).values())
        phases = DEFAULT_PHASES[name]
        assert len(phases) == 4
        # Consecutive and complete, and each phase after the first starts with the previous one's last layer.
        assert phases[0] + [layer for phase in phases[1:] for layer in phase[1:]] == SSD_LAYERS
        assert all(phases[i + 1][0] == phases[i][-1] for i in range(3))
        assert phases[1] == ["conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7"]
        assert phases[2] == ["fc7", "conv8_1", "conv8_2"]
        assert not any(path.startswith("head") for path in prunable_layers(name))
    cifar_names = layer_names("vgg16_cifar")
    blocks = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}  # convs per VGG16 block
    assert list(cifar_names) == [f"conv{b}_{i}" for b, n in blocks.items() for i in range(1, n + 1)]
    assert DEFAULT_PHASES["vgg16_cifar"] == [list(cifar_names)]


def test_unknown_model_and_option_raise_one_line_model_error():
    with pytest.raises(ModelError) as excinfo:
        build_model("resnet50", 10)
    message = str(excinfo.value)
    assert "\n" not in message and "resnet50" in message and all(n in message for n in MODEL_NAMES)
    with pytest.raises(ModelError, match="unknown option 'depth'.*width_mult, image_size, weights_path"):
        build_model("ssd_vgg_lite", 11, depth=3)
    with pytest.raises(ModelError, match="unknown option 'width_mult'"):
        build_model("ssd300_vgg16", 21, width_mult=0.5)
    with pytest.raises(ModelError, match="unknown model"):
        layer_names("yolo")
    with pytest.raises(ModelError, match="num_classes"):
        build_model("ssd_vgg_lite", 1)
    with pytest.raises(ModelError, match="width_mult"):
        build_model("vgg16_cifar", 10, width_mult=0)


# ---------------------------------------------------------------- ssd_vgg_lite


def test_lite_layers_feature_sizes_and_anchors():
    model = build_model("ssd_vgg_lite", 11)
    assert model_input_size(model) == (128, 128)
    for name, path in layer_names("ssd_vgg_lite").items():
        assert conv_at(model, path).out_channels == max(8, round(SSD_VGG_WIDTHS[name] * 0.125))
    assert isinstance(model.backbone.l2norm, L2Norm)
    assert torch.equal(model.backbone.l2norm.weight, torch.full((64,), 20.0))
    assert model.backbone.fc6.dilation == (3, 3)

    assert ssd_feature_sizes(model) == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert model.anchor_generator.scales == LITE_ANCHOR_SCALES
    boxes = ssd_default_boxes(model)
    expected_anchors = 16 * 16 * 4 + 8 * 8 * 6 + 4 * 4 * 6 + 2 * 2 * 6 + 1 * 4 + 1 * 4
    assert boxes.shape == (expected_anchors, 4)
    # the smallest and largest square default boxes span the digits' 14-56 px
    sides = boxes[:, 2] - boxes[:, 0]
    assert sides.min() < 14 and sides.max() > 56

    images = torch.rand(2, 3, 128, 128)
    regression, logits = SSDNetwork(model)(images)
    assert regression.shape == (2, expected_anchors, 4) and logits.shape == (2, expected_anchors, 11)
    # the ONNX-friendly variant normalises [0, 1] input itself
    mean, std = torch.tensor(model.transform.image_mean), torch.tensor(model.transform.image_std)
    normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    regression_raw, _ = SSDNetwork(model, normalize_input=True)(images)
    torch.testing.assert_close(regression_raw, SSDNetwork(model)(normalised)[0])

    larger = build_model("ssd_vgg_lite", 11, image_size=256)
    assert model_input_size(larger) == (256, 256)
    assert ssd_feature_sizes(larger) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (2, 2)]


@pytest.mark.parametrize("batch_norm", [True, False])
def test_lite_train_step_on_digits_lowers_loss(digits, batch_norm):
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11, batch_norm=batch_norm)
    model.train()
    batch = [digit_canvas(digits, seed) for seed in (1, 2)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(12):
        losses = model(images, targets)
        assert set(losses) == {"bbox_regression", "classification"}
        assert all(torch.isfinite(v) and v > 0 for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        assert model.backbone.conv1_1.weight.grad.abs().sum() > 0
        assert model.backbone.l2norm.weight.grad.abs().sum() > 0
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.5 * totals[0]


def test_lite_without_batch_norm_is_plain_conv_relu_and_the_config_selects_it():
    from compression.config import load_config
    from compression.jobs import initial_checkpoint
    from compression.sparsity import sparsity_targets

    ckpt = initial_checkpoint(load_config("default", ["model.batch_norm=false"]))
    assert ckpt.model_args["batch_norm"] is False  # kept with the checkpoint, so it loads as it was built
    plain, with_bn = ckpt.model, build_model("ssd_vgg_lite", 11)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == len(SSD_LAYERS)
    # The same layers and widths (phases and selections carry over); only the BN parameters are gone.
    widths = [conv_at(plain, path).out_channels for path in layer_names("ssd_vgg_lite").values()]
    assert widths == [conv_at(with_bn, path).out_channels for path in layer_names("ssd_vgg_lite").values()]
    parameters = [sum(p.numel() for p in m.parameters()) for m in (with_bn, plain)]
    assert parameters[0] - parameters[1] == 2 * sum(widths)
    assert all(target.batchnorm is None for target in sparsity_targets(plain, ["backbone.conv8_1"]))


def test_lite_eval_boxes_are_in_original_image_coordinates(digits):
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11).eval()
    wide = torch.rand(3, 64, 256)  # resized to 128x128 inside the model
    # the same pixels the model sees, already at its input size
    square = F.interpolate(wide[None], size=(128, 128), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        wide_det, square_det = model([wide, square])
    assert len(wide_det["boxes"]) > 0
    assert torch.equal(wide_det["labels"], square_det["labels"])
    scale = torch.tensor([2.0, 0.5, 2.0, 0.5])  # 128 -> 256 wide, 128 -> 64 high
    torch.testing.assert_close(wide_det["boxes"], square_det["boxes"] * scale, atol=1e-3, rtol=1e-4)
    assert wide_det["boxes"][:, 2].max() > 128 and wide_det["boxes"][:, 3].max() <= 64
    assert len(wide_det["boxes"]) <= 200 and wide_det["scores"].min() > 0.01


def test_width_mult_scales_parameters():
    def backbone_params(model):
        return sum(p.numel() for p in model.backbone.parameters())

    narrow, wide = build_model("ssd_vgg_lite", 11), build_model("ssd_vgg_lite", 11, width_mult=0.25)
    for name, path in layer_names("ssd_vgg_lite").items():
        assert conv_at(wide, path).out_channels == round(SSD_VGG_WIDTHS[name] * 0.25)
    # conv weights grow with width^2 (only conv1_1's 3 input channels and the 8-channel floor break it)
    assert 3.5 < backbone_params(wide) / backbone_params(narrow) < 4.0

    full, half = build_model("vgg16_cifar", 10), build_model("vgg16_cifar", 10, width_mult=0.5)
    paths = layer_names("vgg16_cifar")
    conv_weights = sum(conv_at(half, p).weight.numel() for p in paths.values())
    widths = [3] + [conv_at(full, p).out_channels // 2 for p in paths.values()]
    assert conv_weights == sum(9 * cin * cout for cin, cout in zip(widths[:-1], widths[1:], strict=True))
    ratio = sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.24 < ratio < 0.26


# ---------------------------------------------------------------- ssd300_vgg16


@pytest.fixture(scope="module")
def ssd300():
    # torchvision builds (and drops) VGG16's 100M-parameter classifier each time: build once per file.
    torch.manual_seed(0)
    return build_model("ssd300_vgg16", 21)


def test_ssd300_train_step_and_eval(ssd300, digits):
    model = copy.deepcopy(ssd300)
    assert model_input_size(model) == (300, 300)
    for name, path in layer_names("ssd300_vgg16").items():
        assert conv_at(model, path).out_channels == SSD_VGG_WIDTHS[name]
    assert conv_at(model, layer_names("ssd300_vgg16")["fc6"]).dilation == (6, 6)

    image, target = digit_canvas(digits, seed=3, size=150)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    before = model.backbone.features[0].weight.detach().clone()
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone.features[0].weight)

    model.eval()
    with torch.no_grad():
        (detections,) = model([image])
    assert detections["boxes"].shape[1] == 4 and len(detections["boxes"]) > 0
    assert detections["boxes"].max() <= 150 and detections["labels"].max() <= 20


def test_ssd300_prunes_conv4_3_through_its_scale_weight(ssd300):
    model = copy.deepcopy(ssd300)
    network = SSDNetwork(model)
    # torchvision's raw scale parameter is found without help (dependency_graph_options only silences this)
    with pytest.warns(UserWarning, match=r"Unwrapped parameters detected: \['backbone\.scale_weight'\]"):
        graph = tp.DependencyGraph().build_dependency(network, example_inputs=torch.randn(1, 3, 300, 300))
    conv4_3 = conv_at(model, layer_names("ssd300_vgg16")["conv4_3"])
    with torch.no_grad():
        model.backbone.scale_weight.copy_(torch.arange(512.0))
    group = graph.get_pruning_group(conv4_3, tp.prune_conv_out_channels, idxs=[0, 7, 100])
    group.prune()
    assert conv4_3.out_channels == 509
    kept = [i for i in range(512) if i not in (0, 7, 100)]
    assert torch.equal(model.backbone.scale_weight.detach(), torch.tensor(kept, dtype=torch.float32))
    assert model.head.regression_head.module_list[0].in_channels == 509
    assert model.head.classification_head.module_list[0].in_channels == 509
    assert conv_at(model, layer_names("ssd300_vgg16")["conv5_1"]).in_channels == 509
    regression, logits = network(torch.randn(1, 3, 300, 300))
    assert regression.shape == (1, 8732, 4) and logits.shape == (1, 8732, 21)


# ---------------------------------------------------------------- pruning the lite SSD


def test_lite_prunes_conv4_3_with_l2norm_pruner(digits, recwarn):
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11)
    network = SSDNetwork(model)
    graph = tp.DependencyGraph().build_dependency(
        network, example_inputs=torch.randn(1, 3, 128, 128), **dependency_graph_options(network)
    )
    assert not [w for w in recwarn if "Unwrapped" in str(w.message)]  # L2Norm is handled by L2NormPruner
    with torch.no_grad():
        model.backbone.l2norm.weight.copy_(torch.arange(64.0))
    removed = [0, 3, 5, 63]
    group = graph.get_pruning_group(model.backbone.conv4_3, tp.prune_conv_out_channels, idxs=removed)
    assert model.backbone.l2norm in {dep.target.module for dep, _ in group}
    group.prune()

    kept = [i for i in range(64) if i not in removed]
    assert model.backbone.conv4_3.out_channels == 60
    assert model.backbone.l2norm.num_channels == 60
    assert torch.equal(model.backbone.l2norm.weight.detach(), torch.tensor(kept, dtype=torch.float32))
    assert isinstance(model.backbone.l2norm.weight, nn.Parameter)
    assert model.backbone.conv5_1.in_channels == 60
    assert model.head.regression_head.module_list[0].in_channels == 60
    assert model.head.classification_head.module_list[0].in_channels == 60
    assert model.backbone.out_channels == [60, 128, 64, 32, 32, 32]

    # the pruned SSD still trains and detects (batch 2: BatchNorm on the 1x1 maps needs > 1 value)
    image, target = digit_canvas(digits, seed=4)
    image2, target2 = digit_canvas(digits, seed=5)
    model.train()
    losses = model([image, image2], [target, target2])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (detections,) = model([image])
    assert len(detections["boxes"]) > 0


# ---------------------------------------------------------------- layer removal (ssd_vgg_lite)


def test_lite_layer_removal_skips_the_conv_and_rebuilds_from_its_options():
    from compression.export import network_onnx
    from compression.models import remove_layers

    torch.manual_seed(0)
    dense = build_model("ssd_vgg_lite", 11).eval()
    removed = remove_layers("ssd_vgg_lite", copy.deepcopy(dense), ["conv1_2", "conv4_3"]).eval()
    backbone = removed.backbone
    assert backbone.removed == ("conv1_2", "conv4_3")
    assert isinstance(backbone.conv1_2, nn.Identity) and isinstance(backbone.conv1_2_bn, nn.Identity)
    # conv2_1 now reads conv1_1 directly; the first feature map is conv4_2's
    assert backbone.out_channels == dense.backbone.out_channels
    paths = prunable_layers("ssd_vgg_lite", removed)
    assert paths == [p for p in prunable_layers("ssd_vgg_lite") if p not in ("backbone.conv1_2", "backbone.conv4_3")]
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        features = backbone(x)
        assert [f.shape for f in features.values()] == [f.shape for f in dense.backbone(x).values()]
        assert len(removed(list(x))) == 2
    # the removed convs leave nothing in the deployment graph: two convs and two ReLUs fewer
    ops = {name: [n.op_type for n in network_onnx(m, 1).graph.node] for name, m in (("dense", dense), ("removed", removed))}
    assert ops["dense"].count("Conv") - ops["removed"].count("Conv") == 2
    assert ops["dense"].count("Relu") - ops["removed"].count("Relu") == 2
    # the builder option rebuilds the same architecture: the state fits strictly
    rebuilt = build_model("ssd_vgg_lite", 11, removed_layers=["conv1_2", "conv4_3"])
    rebuilt.load_state_dict(removed.state_dict(), strict=True)
    assert not any(key.startswith(("backbone.conv1_2", "backbone.conv4_3.")) for key in removed.state_dict())


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (["conv2_1"], "cannot remove 'conv2_1'"),  # a stage's first conv changes the width
        (["fc7"], "cannot remove 'fc7'"),
        (["conv3_2", "conv3_2"], "removed already"),
        ("conv1_2", "must be a list"),
    ],
)
def test_lite_layer_removal_refuses_what_it_cannot_remove(names, needle):
    with pytest.raises(ModelError, match=needle) as info:
        build_model("ssd_vgg_lite", 11, removed_layers=names)
    assert "\n" not in str(info.value)


def test_layer_removal_refuses_a_pruned_width_and_other_models():
    from compression.models import remove_layers

    model = build_model("ssd_vgg_lite", 11)
    network = SSDNetwork(model)
    graph = tp.DependencyGraph().build_dependency(
        network, example_inputs=torch.randn(1, 3, 128, 128), **dependency_graph_options(network))
    graph.get_pruning_group(model.backbone.conv1_2, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    with pytest.raises(ModelError, match="maps 8 channels to 6"):
        remove_layers("ssd_vgg_lite", model, ["conv1_2"])
    assert isinstance(model.backbone.conv1_2, nn.Conv2d)  # nothing changed
    with pytest.raises(ModelError, match="ssd_vgg_lite only"):
        remove_layers("vgg16_cifar", build_model("vgg16_cifar", 10, width_mult=0.0625), ["conv1_2"])


# ---------------------------------------------------------------- vgg16_cifar


def test_vgg16_cifar_forward_train_step_and_bn_order():
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10)
    assert model_input_size(model) == (32, 32)
    children = list(model.features.named_children())
    for name, path in layer_names("vgg16_cifar").items():
        position = [child_name for child_name, _ in children].index(path.removeprefix("features."))
        conv, bn = children[position][1], children[position + 1][1]
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels, name
    images = torch.rand(4, 3, 32, 32)  # [0, 1]: the model normalises
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    loss = F.cross_entropy(model(images), labels)
    assert math.isclose(loss.item(), math.log(10), rel_tol=0.1)  # near-uniform at init
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    model.eval()
    assert model(images).shape == (4, 10)
    assert torch.isfinite(loss)

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=images[:1])
    group = graph.get_pruning_group(model.features.conv5_3, tp.prune_conv_out_channels, idxs=[1, 2])
    group.prune()
    assert model.features.bn5_3.num_features == 510 and model.classifier[0].in_features == 510
    assert model(images).shape == (4, 10)


def test_vgg16_cifar_head_cannot_die():
    """The old head (Linear -> ReLU -> Linear, no BatchNorm) died within 40 AdamW steps at the digits preset's
    lr 3e-3: every hidden unit negative for every input, no gradient to the convs, loss stuck at ln 10.
    A single Linear passes the gradient to the features whatever its weights have become."""
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10, width_mult=0.125).train()
    with torch.no_grad():
        for module in model.classifier:
            if isinstance(module, nn.Linear):
                module.bias.fill_(-100.0)  # the state a drifted head ends in
    F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.arange(8)).backward()
    assert model.features.conv1_1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- weights_path


def test_weights_path_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    source = build_model("ssd_vgg_lite", 11)
    safetensors_file = tmp_path / "lite.safetensors"
    save_file(source.state_dict(), str(safetensors_file))
    torch_file = tmp_path / "lite.pt"
    torch.save(source.state_dict(), torch_file)
    for path in (safetensors_file, torch_file):
        torch.manual_seed(1)
        loaded = build_model("ssd_vgg_lite", 11, weights_path=path)
        for key, tensor in source.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[key]), key

    wider = tmp_path / "wider.safetensors"
    save_file(build_model("ssd_vgg_lite", 11, width_mult=0.25).state_dict(), str(wider))
    with pytest.raises(ModelError, match=r"wider\.safetensors: key 'backbone\.conv1_1\.weight' has shape"):
        build_model("ssd_vgg_lite", 11, weights_path=wider)

    classifier_file = tmp_path / "vgg.safetensors"
    save_file(build_model("vgg16_cifar", 10, width_mult=0.125).state_dict(), str(classifier_file))
    with pytest.raises(ModelError, match=r"vgg\.safetensors: key 'backbone\.conv1_1\.weight' is missing"):
        build_model("ssd_vgg_lite", 11, weights_path=classifier_file)

    not_weights = tmp_path / "config.pt"
    torch.save({"epochs": 3}, not_weights)
    with pytest.raises(ModelError, match=r"config\.pt: not a state dict"):
        build_model("vgg16_cifar", 10, weights_path=not_weights)
    with pytest.raises(ModelError, match=r"absent\.pt: weights file not found"):
        build_model("vgg16_cifar", 10, weights_path=tmp_path / "absent.pt")


@pytest.mark.parametrize("model_name", ["ssd_vgg_lite", "vgg16_cifar"])
def test_pruned_weights_load_into_a_fresh_model_after_prune_to_match(model_name, tmp_path):
    torch.manual_seed(0)
    num_classes = 11 if model_task(model_name) == "detection" else 10
    pruned = build_model(model_name, num_classes, width_mult=0.125)
    network = SSDNetwork(pruned) if model_task(model_name) == "detection" else pruned
    size = model_input_size(pruned)
    graph = tp.DependencyGraph().build_dependency(
        network, example_inputs=torch.rand(1, 3, *size), **dependency_graph_options(pruned)
    )
    names = layer_names(model_name)
    for layer, idxs in (("conv1_2", [1, 4]), ("conv4_3", [0, 2, 9]), ("conv5_3", [5])):
        graph.get_pruning_group(
            pruned.get_submodule(names[layer]), tp.prune_conv_out_channels, idxs=idxs
        ).prune()
    weights_file = tmp_path / "pruned.safetensors"
    save_file(pruned.state_dict(), str(weights_file))

    with pytest.raises(
        ModelError, match=r"pruned\.safetensors: key '.*conv1_2\.weight' has shape \(6, 8, 3, 3\)"
    ):
        build_model(model_name, num_classes, width_mult=0.125, weights_path=weights_file)
    fresh = build_model(model_name, num_classes, width_mult=0.125)
    prune_to_match(model_name, fresh, read_state_dict(weights_file))
    load_state_dict_strict(fresh, read_state_dict(weights_file), weights_file)
    images = torch.rand(2, 3, *size)
    pruned.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            network(images), (SSDNetwork(fresh) if network is not pruned else fresh)(images)
        )
