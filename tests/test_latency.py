"""compression.latency: per-layer latency tables measured with ONNX Runtime, and what they predict.

The machine these tests run on is shared (other work and a long benchmark run beside them): every timing
is a median after warm-up, and predictions are compared with measurements taken in the same process.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compression.criteria import rank_filters, select_by_ratio
from compression.errors import ConfigError
from compression.latency import (
    LatencyTable,
    device_fingerprint,
    load_or_measure,
    measure_latency_table,
    measure_network_ms,
    model_widths,
)
from compression.models import build_model, prunable_layers
from compression.pruning import build_dependency_graph, prune_filters, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")
PREDICTION_TOLERANCE = 0.15


def _pruned(model, ratio, layers=None):
    pruned = copy.deepcopy(model)
    dg = build_dependency_graph(pruned)
    pairs = resolve_layers(pruned, "ssd_vgg_lite", layers or prunable_layers("ssd_vgg_lite"), dg=dg)
    return prune_filters(pruned, select_by_ratio(rank_filters("l1_norm", pruned, dg, pairs), ratio), dg=dg)


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    return build_model("ssd_vgg_lite", num_classes=11).eval()  # width 1/8, 128 px: the default preset's model


@pytest.fixture(scope="module")
def table(lite):
    return measure_latency_table(lite, "ssd_vgg_lite", batch_size=8, threads=1, grid_step=8, warmup=2, runs=5)


def test_table_covers_every_conv_and_is_quick(lite, table):
    convs = [name for name, m in lite.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(table.sites) == sorted(convs)
    assert table.data["measured_seconds"] < 180  # "a few minutes" at most, on a loaded 2-core machine
    conv1_2 = table.sites["backbone.conv1_2"]
    assert conv1_2["ops"] == ["Conv", "Relu", "MaxPool"] and conv1_2["producer"] == "backbone.conv1_1"
    head = table.sites["head.classification_head.module_list.0"]
    assert not head["prunable"] and head["producer"] == "backbone.conv4_3"
    assert table.fingerprint == device_fingerprint("onnxruntime", 8, 1)


@pytest.mark.parametrize("ratio,layers", [
    (0.5, None),
    (0.75, None),
    (0.6, ["backbone.conv1_1", "backbone.conv1_2", "backbone.conv2_2", "backbone.conv4_3", "backbone.fc7"]),
])
def test_table_predicts_the_pruned_network_time(lite, table, ratio, layers):
    pruned = _pruned(lite, ratio, layers)
    predicted = table.network_ms(model_widths(pruned, "ssd_vgg_lite"))
    measured = measure_network_ms(pruned, batch_size=8, threads=1, warmup=3, runs=15)
    dense = measure_network_ms(lite, batch_size=8, threads=1, warmup=3, runs=15)
    assert measured < dense  # pruning these layers does save time
    assert abs(predicted / measured - 1) <= PREDICTION_TOLERANCE, (predicted, measured)


def test_fast_widths_and_round_to_come_from_the_table():
    site = {"in_channels": 4, "out_channels": 32, "producer": None, "prunable": True, "cin_grid": [4],
            "cout_grid": [8, 16, 24, 32], "ms": [[2.0, 2.0, 3.0, 3.0]],
            # a staircase: 24 costs what 32 does, 8 what 16 does
            "fine_widths": [4, 8, 16, 24, 32], "fine_ms": [2.0, 2.0, 2.0, 3.0, 3.0]}
    table = LatencyTable({"sites": {"conv": site}, "fixed_ms": 1.0})
    assert table.fast_widths("conv") == [16, 32]
    assert table.round_to("conv") == 16
    assert table.network_ms({"conv": 32}) == pytest.approx(4.0)
    assert table.network_ms({"conv": 20}) == pytest.approx(1.0 + 2.5 * (2.5 / 2.5))


def test_load_or_measure_reuses_a_matching_table(tmp_path):
    torch.manual_seed(0)
    small = build_model("ssd_vgg_lite", num_classes=3, width_mult=0.0625, image_size=64).eval()
    path = tmp_path / "latency.json"
    first = load_or_measure(path, small, "ssd_vgg_lite", batch_size=2, threads=1, warmup=1, runs=2)
    again = load_or_measure(path, _pruned(small, 0.5), "ssd_vgg_lite", batch_size=2, threads=1, warmup=1, runs=2)
    assert again.data == first.data  # a narrower model of the same family: the table covers it
    other = load_or_measure(path, small, "ssd_vgg_lite", batch_size=4, threads=1, warmup=1, runs=2)
    assert other.fingerprint["batch_size"] == 4
    stored = json.loads(path.read_text())
    assert sorted(len(tables) for tables in stored["tables"].values()) == [1, 1]

    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a latency table file"):
        load_or_measure(path, small, "ssd_vgg_lite", batch_size=2)


def test_torch_runtime_is_the_gpus():
    with pytest.raises(ConfigError, match="torch runtime is the GPU's"):
        measure_latency_table(build_model("ssd_vgg_lite", num_classes=3), "ssd_vgg_lite", runtime="torch")
