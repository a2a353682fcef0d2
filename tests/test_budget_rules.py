"""compression.budget: budgets, the knob grid, the retrain order, early stop, the choice, Pareto, Spearman."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from compression.budget import (
    SEED_KNOBS,
    Budget,
    SearchConfig,
    choose,
    default_knobs,
    load_search,
    pareto_front,
    parse_budget,
    plan_trials,
    retrain_order,
    should_stop,
    spearman,
)
from compression.config import load_config
from compression.errors import ConfigError
from compression.models import layer_names


@pytest.mark.parametrize(("text", "kind", "value", "max_drop"), [
    ("map_drop=1.0", "map_drop", 1.0, 0.01),
    (" map_drop = 0.5 ", "map_drop", 0.5, 0.005),
    ("map_drop=0", "map_drop", 0.0, 0.0),
    ("flops=4x", "flops", 4.0, None),
    ("flops=2.5", "flops", 2.5, None),
    ("params=6x", "params", 6.0, None),
    ("latency=3x", "latency", 3.0, None),
])
def test_budget_strings_parse(text, kind, value, max_drop):
    budget = parse_budget(text)
    assert (budget.kind, budget.value) == (kind, value)
    assert budget.max_drop == pytest.approx(max_drop) if max_drop is not None else budget.max_drop is None
    assert budget.ratio_key == {"params": "params_ratio", "latency": "latency_ratio"}.get(kind, "flops_ratio")


@pytest.mark.parametrize(("text", "says"), [
    ("map_drop", "expected map_drop=POINTS"),
    ("mAP<1", "expected map_drop=POINTS"),
    ("speed=2x", "expected map_drop=POINTS"),
    ("latency=1x", "must be above 1"),
    ("flops=4x;rm -rf /", "expected map_drop=POINTS"),
    ("map_drop=2x", "in mAP points, not a ratio"),
    ("map_drop=150", "between 0 and 100"),
    ("flops=0.5x", "must be above 1"),
    ("params=1", "must be above 1"),
])
def test_bad_budget_strings_are_one_line_config_errors_naming_the_text(text, says):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    message = str(info.value)
    assert says in message and repr(text) in message and "\n" not in message


def test_budget_meets():
    drop = parse_budget("map_drop=1.0")
    assert drop.meets({"val_drop": 0.01}) and drop.meets({"val_drop": -0.2})
    assert not drop.meets({"val_drop": 0.0101}) and not drop.meets({"val_drop": None}) and not drop.meets({})
    assert not drop.meets({"drop": 0.0, "val_drop": 0.5})  # the test split's drop is never read
    flops = parse_budget("flops=4x")
    assert flops.meets({"flops_ratio": 4.0, "val_drop": 0.5}) and not flops.meets({"flops_ratio": 3.99})
    assert parse_budget("params=6x").meets({"params_ratio": 7, "flops_ratio": 1})
    latency = parse_budget("latency=3x")
    assert latency.meets({"latency_ratio": 3.2, "flops_ratio": 1}) and not latency.meets({"latency_ratio": 2.9, "flops_ratio": 9})
    assert latency.describe() == "at least 3x lower latency (batch 32)"


def test_latency_budget_ranks_and_chooses_by_measured_latency():
    latency = parse_budget("latency=3x")
    trials = [
        {"trial": "fast", "latency_ratio": 3.5, "flops_ratio": 2.0, "params_ratio": 2.0, "val_pruned": 0.5, "val_drop": 0.02},
        {"trial": "flops", "latency_ratio": 2.0, "flops_ratio": 6.0, "params_ratio": 6.0, "val_pruned": 0.9, "val_drop": 0.0},
        {"trial": "faster", "latency_ratio": 4.0, "flops_ratio": 3.0, "params_ratio": 3.0, "val_pruned": 0.6, "val_drop": 0.03},
    ]
    # Only the trials reaching 3x lower latency are retrained, whatever their FLOPs; the smaller drop wins.
    assert [t["trial"] for t in retrain_order(trials, latency, 3)] == ["faster", "fast"]
    assert choose(trials, latency)["trial"] == "fast"


def test_search_overrides():
    search = load_search(["max_trials=3", "knobs.stages.selection.gamma=[0.6, 0.8]", "knobs.stages.sparsity.l1_lambda=null",
                          "early_stop=false"])
    assert search.max_trials == 3 and not search.early_stop
    assert search.knobs == {"stages.selection.gamma": [0.6, 0.8]}
    assert load_search(["knobs.stages.selection.gamma=0.7"]).knobs["stages.selection.gamma"] == [0.7]
    for bad, says in (("max_trials=0", "max_trials"), ("trials=3", "unknown key 'trials'"), ("nokey", "KEY=VALUE"),
                      ("knobs.tracking.alias=[x]", "only method settings"), ("knobs={}", "at least one knob")):
        with pytest.raises(ConfigError, match=says) as info:
            load_search([bad])
        assert "\n" not in str(info.value)


def test_default_knobs_vary_what_decides_how_much_the_config_prunes():
    default = load_config("default")  # l1_norm, one phase cut at a FLOPs target: γ would change nothing
    lam = {"stages.sparsity.l1_lambda": [0.01, 0.03]}
    assert default_knobs(default, parse_budget("flops=4x")) == {
        **lam, "stages.phases.phase1.target_flops_ratio": [4.0, 5.0, 6.0]}
    assert default_knobs(default, parse_budget("map_drop=1.0")) == {
        **lam, "stages.phases.phase1.target_flops_ratio": [2.0, 3.0, 4.0]}
    # A latency budget cuts by latency targets, and the preset's FLOPs target, which would stop the cut
    # first, is lifted; the one phase reaches every prunable layer, each cut to an eighth at most.
    latency = default_knobs(default, parse_budget("latency=3x"))
    every_layer = list(layer_names("ssd_vgg_lite"))
    assert latency == {**lam, "stages.phases.phase1.target_latency_ratio": [3.0, 3.3, 3.75],
                       "stages.selection.out_of_reach": ["closest"], "stages.phases.phase1.target_flops_ratio": [None],
                       "stages.phases.phase1.layers": [every_layer], "stages.phases.phase1.max_layer_ratio": [0.875]}
    assert default.stages.phases[0].layers != every_layer and default.stages.selection.max_layer_ratio == 0.75
    trials = plan_trials(default, load_search(["max_trials=6"], knobs=latency))
    assert sorted({(t.config.stages.phases[0].target_latency_ratio, t.config.stages.phases[0].target_flops_ratio)
                   for t in trials}) == [(3.0, None), (3.3, None), (3.75, None)]
    assert all(t.config.stages.phases[0].layers == every_layer and t.config.stages.phases[0].max_layer_ratio == 0.875
               for t in trials)
    assert len({t.group for t in trials}) == 2  # the targets act at selection: trials of one λ share sparsity
    # One global cut: the knobs go to stages.selection; the seed rule, or several phases cut their own way: γ.
    global_cut = load_config("default", ["stages.phases=[{name: p1, layers: [conv3_1]}]",
                                         "stages.selection.target_flops_ratio=2"])
    assert "stages.selection.target_flops_ratio" in default_knobs(global_cut, parse_budget("flops=3x"))
    assert default_knobs(load_config("digits_voc_thorough"), parse_budget("flops=4x")) == SEED_KNOBS
    seed = load_config("default", ["stages.selection.criterion=seed", "stages.phases=[{name: p1, layers: [conv3_1]}]"])
    assert default_knobs(seed, parse_budget("params=6x")) == SEED_KNOBS
    # --search adds to them or removes one.
    assert load_search(["knobs.stages.sparsity.l1_lambda=null"], knobs=latency).knobs == {
        k: v for k, v in latency.items() if k != "stages.sparsity.l1_lambda"}


def test_a_phase_setting_is_addressed_by_the_phases_name():
    cfg = load_config("default", ["stages.phases.phase1.target_flops_ratio=3", "stages.phases.phase1.gamma=0.7"])
    assert (cfg.stages.phases[0].target_flops_ratio, cfg.stages.phases[0].gamma) == (3.0, 0.7)
    for bad, says in (("stages.phases.phase9.gamma=0.7", "no phase 'phase9' (the phases are phase1)"),
                      ("stages.phases.gamma=0.7", "name a phase and its setting"),
                      ("stages.phases.phase1.layers.x=1", "'layers' is a value, not a section")):
        with pytest.raises(ConfigError, match=re.escape(says)) as info:
            load_config("default", [bad])
        assert "\n" not in str(info.value)


def test_plan_trials_is_the_knob_grid_validated_and_ordered_to_share_sparsity():
    cfg = load_config("default")
    search = SearchConfig(knobs={"stages.sparsity.l1_lambda": [0.01, 0.03], "stages.selection.gamma": [0.5, 0.7, 0.9]},
                          trial_workers=1)
    trials = plan_trials(cfg, search)
    assert len(trials) == 6
    assert sorted((t.knobs["stages.sparsity.l1_lambda"], t.knobs["stages.selection.gamma"]) for t in trials) == [
        (a, g) for a in (0.01, 0.03) for g in (0.5, 0.7, 0.9)]
    # The first two trials differ in λ (their sparsity stages can run at once); then the others alternate.
    assert [t.knobs["stages.sparsity.l1_lambda"] for t in trials] == [0.01, 0.03] * 3
    for trial in trials:
        assert trial.config.stages.sparsity.l1_lambda == trial.knobs["stages.sparsity.l1_lambda"]
        assert trial.config.stages.selection.gamma == trial.knobs["stages.selection.gamma"]
        assert trial.config.compute.num_workers == 1 and trial.config.name == cfg.name
    assert len({t.folder for t in trials}) == 6 and len({t.name for t in trials}) == 6
    assert len({t.group for t in trials}) == 2

    sampled = plan_trials(cfg, search.model_copy(update={"max_trials": 4, "seed": 1}))
    assert len(sampled) == 4 and sampled == plan_trials(cfg, search.model_copy(update={"max_trials": 4, "seed": 1}))


def test_trials_share_a_gpu_in_fractions_on_a_gpu_run():
    from tasks.ray_trainer import ComputeError, RayInfo, _check_resources

    cpu = plan_trials(load_config("default"), SearchConfig(trials_in_parallel=4))
    assert {t.config.compute.gpus_per_worker for t in cpu} == {1.0}  # CPU runs reserve no GPU at all
    gpu_cfg = load_config("default", ["compute.use_gpu=true"])
    shared = plan_trials(gpu_cfg, SearchConfig(trials_in_parallel=4, trial_workers=1))
    assert {t.config.compute.gpus_per_worker for t in shared} == {0.25}
    assert {t.config.compute.gpus_per_worker for t in plan_trials(gpu_cfg, SearchConfig(trial_gpus=0.5))} == {0.5}
    # Four 1-worker trials at 0.25 GPU fit a 1-GPU cluster; whole-GPU workers would not.
    one_gpu = RayInfo(address="local", started_here=True, cpus=16, gpus=1, init_seconds=0)
    for trial in shared:
        _check_resources(trial.config.compute, one_gpu)
    with pytest.raises(ComputeError, match="need 2 GPUs"):
        _check_resources(gpu_cfg.compute, one_gpu)


@pytest.mark.parametrize(("knobs", "says"), [
    ({"stages.selection.gama": [0.5]}, "unknown key 'stages.selection.gama'"),
    ({"stages.selection.gamma": [1.5]}, "stages.selection.gamma"),
    ({"stages.retrain.epochs.x": [1]}, "is a value, not a section"),
])
def test_bad_knobs_fail_in_one_line_naming_the_knob(knobs, says):
    with pytest.raises(ConfigError, match=says) as info:
        plan_trials(load_config("default"), SearchConfig(knobs=knobs))
    assert "\n" not in str(info.value)


def test_a_taylor_trial_runs_the_taylor_steps_of_the_plan():
    from compression.plan import build_plan

    cfg = load_config("default", ["stages.phases=[{name: p1, layers: [conv3_1]}]",
                                  "stages.selection.target_flops_ratio=2"])
    trials = plan_trials(cfg, SearchConfig(knobs={"stages.selection.criterion": ["seed", "taylor"]}))
    plans = {t.knobs["stages.selection.criterion"]: [s.name for s in build_plan(t.config)] for t in trials}
    assert plans == {"seed": ["00_pretrain", "01_sparsity_p1", "02_selection_p1", "03_prune_p1", "04_retrain_p1",
                              "05_distill"],
                     "taylor": ["00_pretrain", "01_taylor_p1", "02_retrain_p1", "03_distill"]}


def trial(name, flops, params, drop=None, val_pruned=None, val_thresholded=None, **extra):
    """A trial record; ``drop`` is the retrained model's drop on the validation split."""
    return {"trial": name, "flops_ratio": flops, "params_ratio": params, "val_drop": drop, "val_pruned": val_pruned,
            "val_thresholded": val_thresholded, **extra}


def test_choose_the_most_compressed_within_a_drop_budget():
    trials = [trial("a", 3.0, 5.0, drop=0.012), trial("b", 2.0, 4.0, drop=0.004), trial("c", 2.0, 6.0, drop=0.009),
              trial("d", 1.2, 2.0, drop=-0.01)]
    assert choose(trials, parse_budget("map_drop=1.0"))["trial"] == "c"  # a is over; c beats b on params
    assert choose(trials, parse_budget("map_drop=1.5"))["trial"] == "a"
    assert choose(trials, parse_budget("map_drop=0"))["trial"] == "d"
    assert choose([trial("a", 3.0, 5.0, drop=0.2)], parse_budget("map_drop=1.0")) is None
    assert choose([trial("a", 3.0, 5.0)], parse_budget("map_drop=1.0")) is None  # not retrained: no drop


def test_choose_the_smallest_drop_reaching_a_ratio_budget():
    trials = [trial("a", 5.0, 5.0, drop=0.03), trial("b", 4.0, 9.0, drop=0.01), trial("c", 3.0, 12.0, drop=0.0)]
    assert choose(trials, parse_budget("flops=4x"))["trial"] == "b"
    assert choose(trials, parse_budget("params=6x"))["trial"] == "c"
    assert choose(trials, parse_budget("flops=6x")) is None


def test_retrain_order_for_a_drop_budget_is_the_cheap_front_most_compressed_first():
    screened = [trial("a", 4.0, 8.0, val_pruned=0.10), trial("b", 3.0, 6.0, val_pruned=0.40),
                trial("c", 2.0, 3.0, val_pruned=0.30),  # beaten by b on both: retrained last
                trial("d", 1.5, 2.0, val_pruned=0.60), trial("e", 5.0, 9.0, status="failed")]
    budget = parse_budget("map_drop=1.0")
    assert [t["trial"] for t in retrain_order(screened, budget, top_k=10)] == ["a", "b", "d", "c"]
    assert [t["trial"] for t in retrain_order(screened, budget, top_k=2)] == ["a", "b"]
    # Trials whose pruned validation mAP is more than 30 points below the base's (0.5) are not retrained.
    assert [t["trial"] for t in retrain_order(screened, budget, 10, base_val=0.5, max_pruned_drop=30)] == ["b", "d", "c"]


def test_retrain_order_for_a_ratio_budget_keeps_only_trials_reaching_it_best_signal_first():
    screened = [trial("a", 4.0, 8.0, val_pruned=0.10), trial("b", 4.5, 6.0, val_pruned=0.40),
                trial("c", 2.0, 3.0, val_pruned=0.90), trial("d", 6.0, 2.0, val_pruned=0.40, val_thresholded=0.5)]
    assert [t["trial"] for t in retrain_order(screened, parse_budget("flops=4x"), 10)] == ["d", "b", "a"]
    assert [t["trial"] for t in retrain_order(screened, parse_budget("params=5x"), 1)] == ["b"]


def test_early_stop():
    budget = parse_budget("map_drop=1.0")
    done = [trial("a", 4.0, 8.0, drop=0.005)]
    assert should_stop(done, [trial("b", 3.0, 6.0), trial("c", 4.0, 7.0)], budget)
    assert not should_stop(done, [trial("b", 5.0, 6.0)], budget)  # a more compressed one could still make it
    assert not should_stop([trial("a", 4.0, 8.0, drop=0.05)], [trial("b", 3.0, 6.0)], budget)  # none within yet
    flops = parse_budget("flops=2x")
    assert not should_stop([trial("a", 4.0, 8.0, drop=0.005)], [trial("b", 3.0, 6.0)], flops)
    assert should_stop([trial("a", 4.0, 8.0, drop=-0.001)], [trial("b", 3.0, 6.0)], flops)


def test_pareto_front():
    points = [{"n": "base", "flops_ratio": 1.0, "map": 0.70}, {"n": "a", "flops_ratio": 2.0, "map": 0.69},
              {"n": "b", "flops_ratio": 2.0, "map": 0.60}, {"n": "c", "flops_ratio": 4.0, "map": 0.50},
              {"n": "d", "flops_ratio": 3.0, "map": 0.40}, {"n": "e", "flops_ratio": 4.0, "map": 0.50},
              {"n": "f", "flops_ratio": None, "map": 0.9}]
    assert [p["n"] for p in pareto_front(points)] == ["base", "a", "c"]
    assert [p["n"] for p in pareto_front(points, x="map", y="flops_ratio")] == ["c", "a", "base"]
    assert pareto_front([]) == []


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None  # too few pairs
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant: undefined
    assert spearman([1, None, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)  # missing values are dropped


def test_budget_describe():
    assert "1 points" in Budget("map_drop", 1.0).describe()
    assert "4x fewer FLOPs" in parse_budget("flops=4x").describe()


# --------------------------------------------------------------------------------------------
# Every choice reads the validation split only


class ReadKeys(dict):
    """A real dict that records every key read from it."""

    def __init__(self, *args, seen: set, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)


# What the flows put beside the validation figures: the test split's, only reported.
TEST_SPLIT_KEYS = {"map", "drop", "map_pruned", "drop_pruned", "final_map", "final_drop", "map_voc07",
                   "map_voc07_drop", "top1", "top1_drop"}


@pytest.mark.parametrize("budget", ["map_drop=1.0", "flops=2x", "params=2x"])
def test_the_budget_choices_read_no_test_split_figure(budget):
    seen: set = set()
    wanted = parse_budget(budget)
    # On the test split b would win everything (better pruned, smaller drop); on validation a does.
    a = ReadKeys({**trial("a", 3.0, 3.0, drop=0.0, val_pruned=0.5, val_thresholded=0.5),
                  "map": 0.1, "drop": 0.9, "map_pruned": 0.1, "drop_pruned": 0.9}, seen=seen)
    b = ReadKeys({**trial("b", 3.0, 3.0, drop=0.5, val_pruned=0.1, val_thresholded=0.1),
                  "map": 0.9, "drop": 0.0, "map_pruned": 0.9, "drop_pruned": 0.0}, seen=seen)
    assert [t["trial"] for t in retrain_order([b, a], wanted, 2, base_val=0.6, max_pruned_drop=90)] == ["a", "b"]
    assert choose([b, a], wanted)["trial"] == "a"
    should_stop([a], [b], wanted)
    assert seen and not seen & TEST_SPLIT_KEYS, seen & TEST_SPLIT_KEYS


def test_the_final_model_is_the_better_on_the_validation_split_whatever_the_test_split_says():
    from compression.config import load_config
    from compression.plan import build_plan, choose_final

    cfg = load_config("default", ["stages.selection.criterion=seed", "stages.phases=[{name: p1, layers: [conv3_1]}]"])
    steps = build_plan(cfg)
    retrain, distill = steps[-2], steps[-1]
    assert (retrain.stage.name, distill.stage.name) == ("retrain", "distill")
    seen: set = set()
    better_on_test = ReadKeys({"val_map_voc07": 0.50, "map_voc07": 0.90}, seen=seen)
    better_on_val = ReadKeys({"val_map_voc07": 0.60, "map_voc07": 0.10}, seen=seen)
    assert choose_final(steps, {retrain.name: better_on_val, distill.name: better_on_test}, "detection") is retrain
    assert choose_final(steps, {retrain.name: better_on_test, distill.name: better_on_val}, "detection") is distill
    assert seen == {"val_map_voc07"}


def test_trials_that_differ_in_a_phases_cut_share_its_sparsity_stage():
    from compression.plan import stage_settings

    cfg = load_config("default")
    knobs = default_knobs(cfg, parse_budget("latency=3x"))
    trials = [t for t in plan_trials(cfg, load_search([], knobs=knobs))
              if t.knobs["stages.sparsity.l1_lambda"] == 0.01]
    assert len(trials) == 3
    settings = [{stage: stage_settings(t.config, stage, t.config.stages.phases[0]) for stage in ("sparsity", "selection")}
                for t in trials]
    assert all(s["sparsity"] == settings[0]["sparsity"] for s in settings)  # one sparsity run, from the cache
    assert len({json.dumps(s["selection"], sort_keys=True) for s in settings}) == 3
    # The flow's cache key itself (Prefect's cache policy of the stage task), over the task's real inputs.
    from tasks.stages import StageInputs

    def key(trial, stage):
        inputs = {"config": trial.config, "stage": stage, "phase": trial.config.stages.phases[0],
                  "inputs": {"input_path": "base.safetensors"}, "out": "shared.safetensors", "base_metrics": None}
        return StageInputs().compute_key(SimpleNamespace(task=SimpleNamespace(name="stage")), inputs, {})

    assert len({key(t, "sparsity") for t in trials}) == 1
    assert len({key(t, "selection") for t in trials}) == 3


def test_group_norm_trains_its_own_sparsity_stage_and_searches_only_the_cut():
    """group_norm's sparsity stage trains with another regulariser, so it never reuses an L1 one from the
    cache; its budget trials vary the cut alone (it has no λ)."""
    from compression.plan import stage_settings

    l1 = load_config("default")
    group = load_config("default", ["stages.selection.criterion=group_norm"])
    phase = l1.stages.phases[0]
    assert stage_settings(l1, "sparsity", phase)["regulariser"] == "l1"
    assert stage_settings(group, "sparsity", phase)["regulariser"] == "group_norm"
    assert stage_settings(group, "sparsity", phase) != stage_settings(l1, "sparsity", phase)
    assert default_knobs(group, parse_budget("flops=3x")) == {"stages.phases.phase1.target_flops_ratio": [3.0, 3.75, 4.5]}
