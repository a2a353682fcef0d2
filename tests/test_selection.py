"""compression.selection: s_out / s_in per filter on hand-set weights, and the removal rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compression.checks import phases_for
from compression.errors import ConfigError
from compression.models import build_model
from compression.pruning import build_dependency_graph, prune_filters, resolve_layers
from compression.selection import filter_sparsity_scores, layer_floor, rounded_keep, select_filters
from compression.sparsity import threshold_weights


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_s_out_and_s_in_over_every_consumer_of_an_ssd_feature_map():
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11)  # width 1/8: conv4_3 has 64 filters
    backbone, head = model.backbone, model.head
    cls0, reg0 = head.classification_head.module_list[0], head.regression_head.module_list[0]
    with torch.no_grad():
        backbone.conv4_3.weight[3] = 0  # a filter of zeros
        backbone.conv4_3.weight[5, :10] = 0  # a partly zero filter
        backbone.conv5_1.weight[:, 7] = 0  # channel 7: zero in the next conv only
        for conv in (backbone.conv5_1, cls0, reg0):  # channel 9: zero in every consumer
            conv.weight[:, 9] = 0
        backbone.l2norm.weight[11] = 0  # a per-channel scale is not a kernel: does not count
    dg = build_dependency_graph(model)
    scores = filter_sparsity_scores(model, dg, resolve_layers(model, "ssd_vgg_lite", ["conv4_3"], dg=dg))
    s_out, s_in = scores["backbone.conv4_3"]["s_out"], scores["backbone.conv4_3"]["s_in"]
    assert len(s_out) == len(s_in) == 64
    assert s_out[3] == 1.0
    assert s_out[5] == pytest.approx(10 / 64)  # 10 input channels x 3x3 = 90 of 576 weights
    per_channel = {"conv5_1": 64 * 9, "cls0": cls0.out_channels * 9, "reg0": reg0.out_channels * 9}
    assert s_in[7] == pytest.approx(per_channel["conv5_1"] / sum(per_channel.values()))
    assert s_in[9] == 1.0  # only when the head convs' kernels are zero too
    assert s_in[11] == 0.0 and s_out[11] == 0.0
    others = [i for i in range(64) if i not in (3, 5, 7, 9)]
    assert max(s_out[i] for i in others) == 0.0 and max(s_in[i] for i in others) == 0.0


def test_s_in_of_linear_and_grouped_consumers():
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10, width_mult=0.125)  # conv5_3 (64) -> bn -> pool -> classifier.0
    with torch.no_grad():
        model.classifier[0].weight[:, 6] = 0
        model.features.bn5_3.weight[8] = 0  # BatchNorm γ is not a kernel
    dg = build_dependency_graph(model)
    scores = filter_sparsity_scores(model, dg, ["features.conv5_3"])["features.conv5_3"]
    assert scores["s_in"][6] == 1.0 and scores["s_in"][8] == 0.0

    # A grouped consumer: channel c of `first` is read by output block c // 2 of `second` only.
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                        nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        net[2].weight[0:3, 1] = 0  # group 0 reads channels 0, 1
        net[2].weight[3:6, 0] = 0  # group 1 reads channels 2, 3 (column 0 = channel 2)
        net[2].weight[3, 1] = 0  # one of the three kernels reading channel 3
    dg = build_dependency_graph(net, input_size=(8, 8))
    s_in = filter_sparsity_scores(net, dg, [("0", net[0])])["0"]["s_in"]
    assert s_in == pytest.approx([0.0, 1.0, 1.0, 1 / 3])


def test_select_filters_flags_by_gamma_and_keeps_the_least_sparse():
    scores = {"a": {"s_out": [1.0, 0.95, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0],
                    "s_in": [0.0, 0.0, 0.92, 0.0, 0.0, 0.0, 0.0, 0.3]}}
    plain = select_filters(scores, gamma=0.9, min_channels=1)["a"]
    assert plain["remove"] == [0, 1, 2] and plain["keep"] == 5 and plain["flagged"] == 3
    assert plain["s_out"] == scores["a"]["s_out"] and plain["s_in"] == scores["a"]["s_in"]
    assert select_filters(scores, gamma=0.95, min_channels=1)["a"]["remove"] == [0, 1]
    assert select_filters(scores, gamma=0.5, min_channels=1)["a"]["remove"] == [0, 1, 2, 4]
    # min_channels: keep 6, so the least sparse flagged filter (2, at 0.92) stays.
    assert select_filters(scores, gamma=0.9, min_channels=6)["a"]["remove"] == [0, 1]
    # round_to: 5 kept -> 4 (nearest), removing the next-ranked filter (4, s_out 0.5).
    rounded = select_filters(scores, gamma=0.9, min_channels=1, round_to=4)["a"]
    assert rounded["remove"] == [0, 1, 2, 4] and rounded["keep"] == 4
    # 6 kept with round_to 4: a tie between 4 and 8 keeps more.
    assert select_filters(scores, gamma=0.95, min_channels=1, round_to=4)["a"]["remove"] == []
    json.dumps(select_filters(scores, 0.9, 1))  # plain data


def test_select_filters_never_empties_a_layer():
    every = {"s_out": [1.0] * 5, "s_in": [1.0] * 5}
    assert select_filters({"x": every}, 0.9, min_channels=1)["x"]["keep"] == 1
    assert select_filters({"x": every}, 0.9, min_channels=8)["x"]["remove"] == []  # fewer than min: keep all
    assert select_filters({"x": every}, 0.9, min_channels=2, round_to=4)["x"]["keep"] == 4
    assert rounded_keep(0, 6, min_channels=1, round_to=4) == 4  # 1 -> up to 4, never 0
    assert rounded_keep(7, 7, min_channels=1, round_to=4) == 7  # nothing removed: no rounding needed
    assert rounded_keep(6, 7, min_channels=1, round_to=4) == 4  # 8 > n, so down
    with pytest.raises(ConfigError, match="gamma"):
        select_filters({"x": every}, gamma=0.0)


def test_max_layer_ratio_caps_the_share_of_a_layer_removed():
    assert [layer_floor(n, 4, 0.75) for n in (64, 16, 10, 3)] == [16, 4, 4, 3]  # ceil(n/4), min_channels, n
    assert layer_floor(64, 4, 1.0) == 4 and layer_floor(64, 1, 0.5) == 32
    every = {"s_out": [1.0] * 64, "s_in": [1.0] * 64}
    assert select_filters({"x": every}, 0.9, min_channels=4, max_layer_ratio=0.75)["x"]["keep"] == 16
    assert select_filters({"x": every}, 0.9, min_channels=4)["x"]["keep"] == 4
    assert rounded_keep(0, 10, min_channels=1, round_to=4, max_layer_ratio=0.5) == 8  # floor 5, rounded up
    with pytest.raises(ConfigError, match="max_layer_ratio"):
        layer_floor(8, 1, 0.0)


def test_threshold_select_prune_on_ssd_vgg_lite():
    """The seed method's stages 2-4 on a phase: threshold a copy, select on it, prune the original."""
    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11)
    phase = ["conv8_1", "conv8_2"]
    dg = build_dependency_graph(model)
    layers = resolve_layers(model, "ssd_vgg_lite", phase, dg=dg)
    with torch.no_grad():
        model.backbone.conv8_1.weight[:5] *= 1e-3  # five nearly dead filters
    thresholded, taus = threshold_weights(model, [p for p, _ in layers], alpha=1.0)
    scores = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), [p for p, _ in layers])
    selection = select_filters(scores, gamma=0.9, min_channels=4)
    assert selection["backbone.conv8_1"]["remove"] == [0, 1, 2, 3, 4]
    # conv8_1's thresholded filters are not zero in the L1-trained model that gets pruned.
    assert model.backbone.conv8_1.weight[0].abs().sum() > 0
    prune_filters(model, selection, dg=dg)
    assert model.backbone.conv8_1.out_channels == 32 - 5 and model.backbone.conv8_2.in_channels == 27
    with torch.no_grad():
        model.eval()(torch.rand(3, 128, 128)[None].unbind(0))


def _seed_stage_input(tmp_path):
    """A vgg16_cifar "sparsity" checkpoint: random weights, conv4_1 with 24 of its 32 filters all zero."""
    from compression.checkpoint import Checkpoint, save_checkpoint
    from compression.config import validate_config
    from compression.models import layer_names

    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    with torch.no_grad():
        model.features.conv4_1.weight[8:] = 0
    ckpt = Checkpoint(model=model, model_name="vgg16_cifar", model_args={"num_classes": 10, "width_mult": 0.125},
                      class_names=[str(d) for d in range(10)], stage="sparsity", phase="all", extra={"alpha": 1.0})
    path = save_checkpoint(ckpt, tmp_path / "sparse.safetensors")
    phase = {"name": "all", "layers": list(layer_names("vgg16_cifar"))}

    def config(**selection):
        return validate_config({
            "data": {"kind": "imagefolder", "root": str(tmp_path / "unused"), "builtin": None},
            "model": {"name": "vgg16_cifar", "width_mult": 0.125},
            "stages": {"selection": {"criterion": "seed", "min_channels": 4, **selection}, "phases": [phase]},
        })

    return path, config


def test_seed_scores_with_a_flops_budget_reach_the_target(tmp_path):
    from compression import metrics
    from compression import stages as S
    from compression.checkpoint import load_checkpoint
    from compression.checks import phases_for

    path, config = _seed_stage_input(tmp_path)
    cfg = config(target_flops_ratio=3.0)
    phase = phases_for(cfg)[0]
    out, summary = S.select_filters(path, cfg, tmp_path / "selection.json", phase=phase)
    record = json.loads(out.read_text())
    assert record["target_flops_ratio"] == 3.0 and "gamma" not in record
    layers = record["layers"]
    # The 24 all-zero filters of conv4_1 (s_out = 1) are the first to go.
    assert set(range(8, 32)) <= set(layers["features.conv4_1"]["remove"])
    assert all(len(entry["s_out"]) == len(entry["remove"]) + entry["keep"] for entry in layers.values())
    model = load_checkpoint(path).model
    before = metrics.count_flops(model, (32, 32))
    prune_filters(model, layers)
    after = metrics.count_flops(model, (32, 32))
    assert after == pytest.approx(record["flops_after"])
    assert 3.0 <= before / after < 3.0 * 1.05  # reached, with little overshoot
    assert summary["filters_removed_total"] == sum(len(e["remove"]) for e in layers.values())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_seed_without_a_flops_budget_still_flags_at_gamma(tmp_path):
    from compression import stages as S
    from compression.checkpoint import load_checkpoint
    from compression.checks import phases_for

    path, config = _seed_stage_input(tmp_path)
    cfg = config(gamma=0.9)
    record = json.loads(S.select_filters(path, cfg, tmp_path / "selection.json", phase=phases_for(cfg)[0])[0].read_text())
    assert record["gamma"] == 0.9 and "target_flops_ratio" not in record
    # Exactly the γ rule on Θ_L1^th (α = 1 from the checkpoint), as before the FLOPs-budget option existed.
    model = load_checkpoint(path).model
    layers = [path for path, _ in resolve_layers(model, "vgg16_cifar", cfg.stages.phases[0].layers)]
    thresholded, _ = threshold_weights(model, layers, alpha=1.0)
    scores = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), layers)
    assert record["layers"] == select_filters(scores, gamma=0.9, min_channels=4)
    assert set(range(8, 32)) <= set(record["layers"]["features.conv4_1"]["remove"])


def test_s_in_of_a_phases_last_layer_is_taken_on_thresholded_consumers():
    """conv4_3 ends the first SSD phase: its consumers (conv5_1 and the two head convs it feeds) are
    thresholded with the phase, so its s_in counts their thresholded zeros, not the raw weights' (none)."""
    from compression.models import DEFAULT_PHASES

    torch.manual_seed(0)
    model = build_model("ssd_vgg_lite", 11)
    assert DEFAULT_PHASES["ssd_vgg_lite"][0][-1] == "conv4_3" == DEFAULT_PHASES["ssd_vgg_lite"][1][0]
    layers = [p for p, _ in resolve_layers(model, "ssd_vgg_lite", ["conv4_2", "conv4_3"])]
    raw = filter_sparsity_scores(model, build_dependency_graph(model), layers)
    assert max(raw["backbone.conv4_3"]["s_in"]) == 0.0
    thresholded, taus = threshold_weights(model, layers, alpha=1.0)
    consumers = ["backbone.conv5_1", "head.classification_head.module_list.0", "head.regression_head.module_list.0"]
    assert set(consumers) <= set(taus)
    zeros = {name: int((thresholded.get_submodule(name).weight == 0).sum()) for name in consumers}
    total = sum(thresholded.get_submodule(name).weight.numel() for name in consumers)
    s_in = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), layers)["backbone.conv4_3"]["s_in"]
    assert sum(s_in) / len(s_in) == pytest.approx(sum(zeros.values()) / total)  # every weight read once
    assert min(s_in) > 0.3


def test_a_layer_shared_by_two_phases_is_selected_and_pruned_in_each(tmp_path):
    """Phases share their boundary layer (as the paper's): the second phase selects and prunes it again at the
    width the first phase left, with the stages' own select_filters / prune."""
    from compression import stages as S
    from compression.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from compression.config import validate_config
    from compression.data.digits import write_digits_cls

    root = write_digits_cls(tmp_path / "digits", num_images={"train": 10, "val": 10, "test": 10})
    phases = [{"name": "a", "layers": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1"]},
              {"name": "b", "layers": ["conv3_1", "conv3_2", "conv3_3", "conv4_1"]}]
    cfg = validate_config({
        "data": {"kind": "imagefolder", "root": str(root), "builtin": None, "eval_batch_size": 10},
        "model": {"name": "vgg16_cifar", "width_mult": 0.125},
        "stages": {"selection": {"criterion": "seed", "gamma": 0.9, "min_channels": 2, "compensate": False},
                   "phases": phases},
    })
    torch.manual_seed(0)
    model = build_model("vgg16_cifar", 10, width_mult=0.125)
    widths = []
    for index, phase in enumerate(phases_for(cfg)):
        with torch.no_grad():  # an L1-trained stand-in: the shared layer's filters 0-5 all zeros, in each phase
            model.features.conv3_1.weight[:6] = 0
        ckpt = Checkpoint(model=model, model_name="vgg16_cifar", model_args={"num_classes": 10, "width_mult": 0.125},
                          class_names=[str(d) for d in range(10)], stage="sparsity", phase=phase.name,
                          extra={"alpha": 1.0})
        sparse = save_checkpoint(ckpt, tmp_path / f"sparse_{index}.safetensors")
        selection, _ = S.select_filters(sparse, cfg, tmp_path / f"selection_{index}.json", phase=phase)
        entry = json.loads(selection.read_text())["layers"]["features.conv3_1"]
        assert set(range(6)) <= set(entry["remove"]), (index, entry)
        assert len(entry["remove"]) + entry["keep"] == model.features.conv3_1.out_channels
        pruned, _ = S.prune(sparse, selection, cfg, tmp_path / f"pruned_{index}.safetensors", phase=phase)
        model = load_checkpoint(pruned).model
        widths.append(model.features.conv3_1.out_channels)
        assert widths[-1] == entry["keep"] and model.features.conv3_2.in_channels == entry["keep"]
    assert widths == [32 - 6, 32 - 12]  # exactly the zero filters, in each phase
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
