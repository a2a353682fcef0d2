"""Config schema: presets load, overrides apply, bad keys and values fail at load time."""

import pytest

from compression.config import CONFIG_DIR, PipelineConfig, load_config
from compression.errors import ConfigError

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)


def test_override_sets_nested_value_with_yaml_types():
    cfg = load_config("default", ["stages.retrain.epochs=3", "stages.sparsity.alpha_grid=[2, 0.5]"])
    assert cfg.stages.retrain.epochs == 3
    assert cfg.stages.sparsity.alpha_grid == [0.5, 2.0]  # sorted


def test_config_hash_changes_with_any_setting():
    assert load_config("default").config_hash() != load_config("default", ["seed=1"]).config_hash()
    assert load_config("default").config_hash() == load_config("default").config_hash()


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("default", ["stages.retrain.epoch=3"])
    message = str(err.value)
    assert "stages.retrain.epoch" in message and "epochs" in message and "\n" not in message


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"stages\.retrain\.epochs.*'three'"):
        load_config("default", ["stages.retrain.epochs=three"])


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError, match="ssd_vgg_lite"):
        load_config("default", ["model.name=resnet"])


@pytest.mark.parametrize(
    "override",
    ["stages.selection.gamma=0", "stages.selection.gamma=1.5", "stages.sparsity.l1_lambda=-1",
     "stages.selection.prune_ratio=2", "stages.sparsity.alpha_grid=[0, 1]"],
)
def test_out_of_range_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[-1]):
        load_config("default", [override])


def test_detector_with_classification_data_is_refused():
    with pytest.raises(ConfigError, match="detector"):
        load_config("default", ["data.kind=cifar10"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_json_schema_carries_bounds_for_the_ui_form():
    schema = PipelineConfig.model_json_schema()
    gamma = schema["$defs"]["SelectionConfig"]["properties"]["gamma"]
    assert gamma["exclusiveMinimum"] == 0 and gamma["maximum"] == 1


def test_a_phase_overrides_lambda_gamma_and_targets_of_its_own_stages_only():
    from compression.checks import check_method_config

    cfg = load_config("default", [
        "stages.selection.criterion=l1_norm",
        "stages.phases=[{name: p1, layers: [conv1_1], target_flops_ratio: 2.0, l1_lambda: 0.05},"
        " {name: p2, layers: [conv5_1], prune_ratio: 0.3, gamma: 0.5}]",
    ])
    first, second = check_method_config(cfg)  # each phase has a target though the stage has none
    one, two = cfg.for_phase(first), cfg.for_phase(second)
    assert one.stages.sparsity.l1_lambda == 0.05 and one.stages.selection.target_flops_ratio == 2.0
    assert one.stages.selection.gamma == cfg.stages.selection.gamma and one.stages.selection.prune_ratio is None
    assert two.stages.sparsity.l1_lambda == cfg.stages.sparsity.l1_lambda
    assert (two.stages.selection.gamma, two.stages.selection.prune_ratio) == (0.5, 0.3)
    assert cfg.stages.selection.target_flops_ratio is None  # the config itself is untouched
    with pytest.raises(ConfigError, match="needs prune_ratio or target_flops_ratio"):
        check_method_config(load_config("default", [
            "stages.selection.criterion=l1_norm",
            "stages.phases=[{name: p1, layers: [conv1_1], prune_ratio: 0.5}, {name: p2, layers: [conv5_1]}]"]))
    with pytest.raises(ConfigError, match="gamma"):
        load_config("default", ["stages.phases=[{name: p1, layers: [conv1_1], gamma: 1.5}]"])


@pytest.mark.parametrize("val", ["2007:train", "2007:val", "2007:trainval"])
def test_a_validation_set_inside_the_training_sets_is_refused(val):
    with pytest.raises(ConfigError) as err:
        load_config("default", ["data.train_sets=['2007:trainval', '2012:trainval']", f"data.val_sets=['{val}']"])
    message = str(err.value)
    assert f"data.val_sets '{val}' overlaps data.train_sets '2007:trainval'" in message and "\n" not in message
    assert "data.val_holdout" in message


def test_a_holdout_replaces_the_validation_sets():
    cfg = load_config("default", ["data.val_sets=[]", "data.val_holdout=0.1"])
    assert cfg.data.val_holdout == 0.1
    with pytest.raises(ConfigError, match=r"set data.val_sets to \[\]"):
        load_config("default", ["data.val_holdout=0.1"])
    with pytest.raises(ConfigError, match="val_holdout"):
        load_config("default", ["data.val_sets=[]", "data.val_holdout=1"])


def test_the_voc_preset_validates_on_held_out_training_images():
    data = load_config("ssd300_voc").data
    assert data.val_sets == [] and 0 < data.val_holdout < 1
