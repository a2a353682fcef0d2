"""bench/latency_controls.py: the units prune the model the base is, whatever the preset's width."""

from __future__ import annotations

from bench.latency_controls import base_model_overrides, unit_config
from compression.checkpoint import Checkpoint, save_checkpoint
from compression.models import build_model

DIGITS = [str(i) for i in range(10)]


def _spec(base, method="latency"):
    return {"seed": 1, "method": method, "base": str(base), "retrain_epochs": 2, "table": "table.json",
            "target": 3.0, "flops_target": None, "max_val_drop": 0.005, "quick": False,
            "max_layer_ratio": 0.6}


def test_a_base_at_another_width_sets_the_units_model_to_it(tmp_path):
    args = {"num_classes": 11, "width_mult": 0.25, "image_size": 96}
    base = save_checkpoint(Checkpoint(model=build_model("ssd_vgg_lite", **args), model_name="ssd_vgg_lite",
                                      model_args=args, class_names=DIGITS), tmp_path / "wide.safetensors")
    assert base_model_overrides(base) == ["model.width_mult=0.25", "model.image_size=96"]
    cfg = unit_config(_spec(base))
    assert (cfg.model.width_mult, cfg.model.image_size) == (0.25, 96)  # the preset says 0.125 and 128
    assert (cfg.stages.phases[0].target_latency_ratio, cfg.stages.phases[0].max_layer_ratio) == (3.0, 0.6)
    assert str(cfg.stages.pretrain.checkpoint) == str(base)


def test_remove_layers_reach_the_pruned_units_phase_not_the_dense_control(tmp_path):
    args = {"num_classes": 11}
    base = save_checkpoint(Checkpoint(model=build_model("ssd_vgg_lite", **args), model_name="ssd_vgg_lite",
                                      model_args=args, class_names=DIGITS), tmp_path / "base.safetensors")
    spec = {**_spec(base), "remove_layers": ["conv1_2", "conv3_3"]}
    assert unit_config(spec).stages.phases[0].remove_layers == ["conv1_2", "conv3_3"]
    assert unit_config(_spec(base)).stages.phases[0].remove_layers == []
