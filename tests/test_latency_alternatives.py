"""bench/latency_alternatives.py: layer removal keeps the detector whole, and every gap is against its own seed's
control."""

from __future__ import annotations

import pytest
import torch

from bench.latency_alternatives import summarise, without_layers
from compression.models import SSDNetwork, build_model


def _lite():
    torch.manual_seed(0)
    return build_model("ssd_vgg_lite", num_classes=11, width_mult=0.0625, image_size=64).eval()


def test_a_removed_conv_leaves_a_detector_with_the_same_outputs_and_fewer_parameters():
    dense = _lite()
    thinner = without_layers(_lite(), ["conv1_2", "conv2_2"])
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = [t.shape for t in SSDNetwork(dense)(images)]
        got = [t.shape for t in SSDNetwork(thinner)(images)]
    assert got == want
    removed = sum(p.numel() for name in ("conv1_2", "conv2_2", "conv1_2_bn", "conv2_2_bn")
                  for p in getattr(dense.backbone, name).parameters())
    assert sum(p.numel() for p in thinner.parameters()) == sum(p.numel() for p in dense.parameters()) - removed


@pytest.mark.parametrize(("name", "why"), [("conv3_1", "channels in"), ("l2norm", "not a conv"), ("conv99", "not a conv")])
def test_only_a_conv_that_keeps_its_width_can_be_removed(name, why):
    with pytest.raises(SystemExit, match=why):
        without_layers(_lite(), [name])


def test_each_model_is_compared_with_its_own_seeds_dense_control():
    rows = [
        {"method": "dense", "seed": 0, "metric": 0.90, "val_metric": 0.90, "input_size": 128},
        {"method": "dense", "seed": 1, "metric": 0.80, "val_metric": 0.80, "input_size": 128},
        {"method": "input_96", "seed": 0, "metric": 0.85, "input_size": 96, "network_speedup": 1.8},
        {"method": "input_96", "seed": 1, "metric": 0.75, "input_size": 96, "network_speedup": 1.7},
    ]
    text = summarise(rows, ["dense", "input_96"], 3)
    # Paired by seed, the gap is 5 points both times (unpaired it would be 5 +- 7).
    assert "input_96: test mAP 0.800 ± 0.071, network 1.75 ± 0.07x" in text
    assert "same seed: 5.00 ± 0.00 points" in text
    assert "trained 3 epochs" in text


def test_a_pruned_base_is_compared_with_itself_trained_as_long_and_timed_against_the_reference():
    rows = [
        {"method": "unchanged", "seed": 0, "metric": 0.91, "network_speedup": 1.8},
        {"method": "without_conv1_2", "seed": 0, "metric": 0.90, "network_speedup": 2.1},
    ]
    text = summarise(rows, ["unchanged", "without_conv1_2"], 3)
    assert "unchanged control: test mAP 0.910 ± 0.000, network 1.80 ± 0.00x faster than the reference" in text
    assert "2.10 ± 0.00x faster than the reference; unchanged control minus it, same seed: 1.00 ± 0.00" in text
