"""bench/latency_pareto.py's points: each pruned model against the dense control of its own seed."""

from __future__ import annotations

import pytest

from bench.latency_pareto import control_points, model_width, one_seed_point


def _row(method: str, seed: int, metric: float, speedup: float | None = None) -> dict:
    return {"method": method, "seed": seed, "metric": metric, "e2e_speedup": speedup}


def test_points_pair_each_seed_with_its_dense_control():
    result = {"benchmark": "latency_controls_x", "target": 2.0, "flops_target": 3.0, "retrain_epochs": 12,
              "rows": [_row("dense", 0, 0.90), _row("dense", 1, 0.80),
                       _row("latency", 0, 0.88, 2.0), _row("latency", 1, 0.81, 2.2),
                       _row("flops", 0, 0.91, 1.1), _row("flops", 1, 0.79, 1.1)]}
    points = {p["method"]: p for p in control_points(result)}
    assert set(points) == {"latency", "flops"}
    # Seed 0: 2 points below its control; seed 1: 1 point above its own (not against seed 0's 0.90).
    assert points["latency"]["vs_dense_points"] == pytest.approx(-0.5)
    assert points["latency"]["e2e_speedup"] == pytest.approx(2.1) and points["latency"]["seeds"] == 2
    assert points["flops"]["vs_dense_points"] == pytest.approx(0.0) and points["flops"]["label"] == "3.0x fewer FLOPs"
    # A model that was never timed is not a point.
    result["rows"][-1]["e2e_speedup"] = None
    assert [p["method"] for p in control_points(result)] == ["latency"]


def test_a_one_seed_run_meets_the_dense_control_of_its_schedule():
    run = {"benchmark": "compress_latency_3x", "overrides": ["stages.retrain.epochs=12"],
           "rows": [{"stage": "pretrain"}, {"stage": "distill", "final": True, "map_voc07": 0.58}],
           "speedup": {"end_to_end": {"ratio": 2.7}}}
    point = one_seed_point(run, {(0.125, 12): 0.90})
    assert point["vs_dense_points"] == pytest.approx(-32.0) and point["e2e_speedup"] == 2.7
    assert point["width"] == 0.125  # the default preset's
    assert one_seed_point(run, {(0.125, 24): 0.90}) is None  # no control trained in that schedule
    # A control of a wider model is not this model's control.
    assert one_seed_point(run, {(0.25, 12): 0.95}) is None


def test_a_run_from_a_wider_base_is_its_own_series():
    wide = {"benchmark": "latency_controls_w", "target": 3.0, "retrain_epochs": 12, "model": {"width_mult": 0.25},
            "rows": [_row("dense", 0, 0.93), _row("latency", 0, 0.925, 3.1)]}
    assert model_width(wide) == 0.25
    assert model_width({"overrides": ["model.width_mult=0.5"]}) == 0.5
    assert model_width({"rows": []}) == 0.125  # recorded before results named their model: the preset's
    (point,) = control_points(wide)
    assert point["width"] == 0.25 and point["vs_dense_points"] == pytest.approx(-0.5)


def test_a_run_that_removed_layers_says_so_in_its_label():
    run = {"benchmark": "latency_controls_rm", "target": 3.2, "retrain_epochs": 12, "max_layer_ratio": 0.6,
           "remove_layers": ["conv1_2", "conv2_2"], "rows": [_row("dense", 0, 0.9), _row("latency", 0, 0.9, 3.1)]}
    (point,) = control_points(run)
    assert point["label"] == "3.2x latency, max_layer_ratio 0.6, without conv1_2+conv2_2"
