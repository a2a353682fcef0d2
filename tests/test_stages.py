"""compression.stages + compression.pipeline + ``prunepipe compress``: the whole method on real (small) data.

Digits data is generated small in tmp folders, models are narrow and every stage trains one epoch, so
the numbers are not meaningful accuracies; what is checked is the chain itself: every checkpoint exists
and round-trips, pruning shrinks the model exactly as the selection says, α obeys max_drop, and bad
input ends with one line and exit code 2 without overwriting anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compression import stages as S
from compression.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from compression.checks import phases_for
from compression.config import PhaseConfig, validate_config
from compression.data.digits import write_digits_cls, write_digits_voc
from compression.data.loaders import build_loader
from compression.errors import ConfigError, StageError
from compression.jobs import initial_checkpoint
from compression.measure import SCORE_THRESHOLDS, above_score
from compression.metrics import voc_detection_ap
from compression.models import apply_postprocess_settings, layer_names
from compression.pipeline import run_pipeline_in_process
from compression.pruning import layer_channels
from compression.sparsity import effective_weight, sparsity_targets
from compression.tp_pruners import build_pruner, prune_to_flops
from compression.train import predict_detections

# One SSD phase over every prunable layer (each SSD checkpoint costs seconds to measure); its consumers include
# the L2Norm, the loc/conf head convs of all six maps and the next convs. The classifier runs two phases.
SSD_PHASES = [{"name": "all", "layers": list(layer_names("ssd_vgg_lite"))}]
CLS_PHASES = [
    {"name": "low", "layers": ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"]},
    {"name": "high", "layers": ["conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# conftest.FLOAT32 as config keys: tiny models train in float32 (bf16 + channels-last can diverge for them).
FLOAT32_COMPUTE = {"amp_bf16": False, "channels_last": False}


def _ssd_raw(devkit: Path) -> dict:
    return {
        "name": "ssd-test",
        "data": {"root": str(devkit), "builtin": None, "batch_size": 8, "eval_batch_size": 8},
        "model": {"name": "ssd_vgg_lite", "width_mult": 0.0625, "image_size": 64},
        "stages": {
            "pretrain": {"epochs": 1},
            "sparsity": {"epochs": 1, "alpha_grid": [0.5, 1.0, 2.0], "max_drop": 0.01},
            "selection": {"min_channels": 2},
            "retrain": {"epochs": 1},
            "distill": {"epochs": 1},
            "phases": SSD_PHASES,
        },
        "compute": FLOAT32_COMPUTE,
    }


def _cls_raw(root: Path, **selection) -> dict:
    return {
        "name": "cls-test",
        "data": {"kind": "imagefolder", "root": str(root), "builtin": None, "batch_size": 16, "eval_batch_size": 64},
        "model": {"name": "vgg16_cifar", "width_mult": 0.0625},
        "stages": {
            "pretrain": {"epochs": 3, "lr": 0.003, "optimizer": "adamw", "weight_decay": 0.0},
            "sparsity": {"epochs": 1, "lr": 0.001, "optimizer": "adamw", "alpha_grid": [0.5, 1.0, 2.0, 4.0],
                         "max_drop": 0.05},
            "selection": selection,
            "retrain": {"epochs": 1, "lr": 0.001, "optimizer": "adamw"},
            "distill": {"epochs": 1, "lr": 0.001, "optimizer": "adamw"},
        },
        "compute": FLOAT32_COMPUTE,
    }


def _with(raw: dict, **sections) -> dict:
    """A copy of ``raw`` with ``stages.<section>`` entries updated (``sections``: {section: {key: value}})."""
    out = json.loads(json.dumps(raw))
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(out["stages"].get(section), dict):
            out["stages"][section].update(values)
        else:
            out["stages"][section] = values
    return out


# --------------------------------------------------------------------------------------------
# Shared data, pretrained models and one full SSD run


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return write_digits_voc(tmp_path_factory.mktemp("voc"), image_size=64,
                            num_images={"train": 16, "val": 8, "test": 8})


@pytest.fixture(scope="module")
def ssd_pretrained(devkit, tmp_path_factory) -> Path:
    cfg = validate_config(_ssd_raw(devkit))
    path, _ = S.pretrain(cfg, tmp_path_factory.mktemp("ssd_base") / "base.safetensors")
    return path


@pytest.fixture(scope="module")
def ssd_run(devkit, ssd_pretrained, tmp_path_factory):
    """The full in-process chain on ssd_vgg_lite (pretrained base adopted), config file and rows."""
    folder = tmp_path_factory.mktemp("ssd_run")
    raw = _with(_ssd_raw(devkit), pretrain={"checkpoint": str(ssd_pretrained)})
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    rows = run_pipeline_in_process(validate_config(raw), folder / "run")
    return {"raw": raw, "config": config, "run_dir": folder / "run", "rows": rows}


@pytest.fixture(scope="module")
def cls_root(tmp_path_factory) -> Path:
    return write_digits_cls(tmp_path_factory.mktemp("cls"), num_images={"train": 160, "val": 40, "test": 40})


@pytest.fixture(scope="module")
def cls_pretrained(cls_root, tmp_path_factory) -> Path:
    cfg = validate_config(_cls_raw(cls_root))
    path, _ = S.pretrain(cfg, tmp_path_factory.mktemp("cls_base") / "base.safetensors")
    return path


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """``prunepipe <args>`` in this process through ``main()`` (the real error handling): (exit code, stderr)."""
    from flows import cli

    argv = sys.argv
    sys.argv = ["prunepipe", *[str(a) for a in args]]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# The SSD chain


def test_ssd_chain_has_every_stage_and_each_checkpoint_round_trips(ssd_run, ssd_pretrained):
    rows = ssd_run["rows"]
    expected = [("pretrain", None), ("sparsity", "all"), ("prune", "all"), ("retrain", "all"), ("distill", None)]
    assert [(r["stage"], r["phase"]) for r in rows] == expected
    previous = None
    for row in rows:
        path = Path(row["path"])
        assert path.is_file() and path.parent == ssd_run["run_dir"]
        ckpt = load_checkpoint(path)
        assert (ckpt.stage, ckpt.phase) == (row["stage"], row["phase"])
        assert ckpt.metrics["params"] == row["metrics"]["params"] == sum(p.numel() for p in ckpt.model.parameters())
        assert row["metrics"]["flops"] > 0 and "map_voc07" in row["metrics"] and "stage_seconds" in row["metrics"]
        with torch.no_grad():
            ckpt.model.eval()([torch.rand(3, 64, 64)])  # the rebuilt (pruned) model runs
        if row["stage"] == "pretrain":
            assert ckpt.parent == str(ssd_pretrained)
        elif row["stage"] == "distill":
            assert ckpt.extra["teacher"] == rows[0]["path"]
        else:  # a phase starts from the previous phase's retrained model; prune works on Θ_L1
            assert ckpt.parent == previous
        previous = str(path)
    assert not list(ssd_run["run_dir"].glob(".*")), "scratch files left behind"
    # The answer: the distilled model unless the retrained one scores higher on the validation split.
    retrained, distilled = rows[-2]["metrics"], rows[-1]["metrics"]
    better = rows[-2] if retrained["val_map_voc07"] > distilled["val_map_voc07"] else rows[-1]
    assert [row["final"] for row in rows] == [row is better for row in rows]
    # Measured once, before the one write: the file's size is read back, everything else is in its metadata.
    for row in rows:
        stored = read_metadata(row["path"])["metrics"]
        assert "size_bytes" not in stored and row["metrics"]["size_bytes"] == Path(row["path"]).stat().st_size
        assert stored["flops"] == row["metrics"]["flops"] and "val_map_voc07" in stored


def test_prune_removes_exactly_the_selected_filters_from_the_l1_weights(ssd_run):
    rows = ssd_run["rows"]
    for index, row in enumerate(rows):
        if row["stage"] != "prune":
            continue
        sparse_row, before = rows[index - 1], rows[index - 2]["metrics"]
        selection_path = Path(row["selection"])
        assert selection_path.parent == Path(row["path"]).parent  # the selection lives next to its checkpoint
        selection = json.loads(selection_path.read_text())
        assert selection["criterion"] == "seed" and selection["phase"] == row["phase"]
        assert selection["alpha"] == read_metadata(sparse_row["path"])["extra"]["alpha"]
        assert row["metrics"]["params"] < before["params"]
        assert row["metrics"]["flops"] < before["flops"]
        pruned = load_checkpoint(row["path"])
        assert pruned.extra["selection"] == str(selection_path)
        sparse = load_checkpoint(sparse_row["path"])
        total = 0
        for name, entry in selection["layers"].items():
            assert layer_channels(pruned.model.get_submodule(name)) == entry["keep"]
            assert entry["keep"] >= 2  # min_channels
            total += len(entry["remove"])
        assert total == row["metrics"]["filters_removed_total"] > 0
        # The first layer of the phase keeps its inputs: its surviving filters are Θ_L1's, not thresholded.
        first = next(iter(selection["layers"]))
        removed = set(selection["layers"][first]["remove"])
        kept = [f for f in range(layer_channels(sparse.model.get_submodule(first))) if f not in removed]
        if first == "backbone.conv1_1":
            torch.testing.assert_close(pruned.model.get_submodule(first).weight,
                                       sparse.model.get_submodule(first).weight[kept], rtol=0, atol=0)


def test_alpha_is_the_largest_within_max_drop_and_l1_weights_are_saved_unthresholded(ssd_run):
    max_drop = ssd_run["raw"]["stages"]["sparsity"]["max_drop"]
    for row in ssd_run["rows"]:
        if row["stage"] != "sparsity":
            continue
        extra = read_metadata(row["path"])["extra"]
        metrics = row["metrics"]
        assert extra["alpha"] == metrics["alpha"] and extra["l1_lambda"] == 1e-4
        assert extra["val_metric_l1"] - extra["val_metric_thresholded"] <= max_drop + 1e-12
        # τ and the sparsities cover the phase's layers and their consumers (thresholded with them).
        assert set(extra["layers"]) <= set(extra["taus"]) == set(extra["sparsity_before"]) == set(extra["sparsity_after"])
        tried = {t["alpha"]: t for t in extra["alpha_tried"]}
        if extra["alpha"] is None:  # no α kept the metric: nothing thresholded
            assert not any(t["ok"] for t in tried.values()) and set(extra["taus"].values()) == {0.0}
            continue
        assert tried[extra["alpha"]]["ok"] and all(not t["ok"] for a, t in tried.items() if a > extra["alpha"])
        ckpt = load_checkpoint(row["path"])
        # τ_l = α · mean|W_eff|, on the effective filter W·γ/sqrt(var+ε) where a BatchNorm follows.
        targets = {t.layer: t for t in sparsity_targets(ckpt.model, extra["layers"])}
        for name, tau in extra["taus"].items():
            weight = ckpt.model.get_submodule(name).weight.detach()
            effective = effective_weight(ckpt.model, targets[name]).detach()
            assert tau == pytest.approx(extra["alpha"] * float(effective.abs().mean()), rel=1e-5)
            assert bool(((weight != 0) & (effective.abs() < tau)).any())  # Θ_L1, not Θ_L1^th
            assert extra["sparsity_after"][name] > extra["sparsity_before"][name]


def test_resume_skips_finished_stages_and_a_used_run_dir_is_refused(ssd_run, capsys, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(ssd_run["run_dir"], run_dir)
    digests = {p.name: _digest(p) for p in run_dir.iterdir()}
    cfg = validate_config(ssd_run["raw"])
    rows = run_pipeline_in_process(cfg, run_dir, resume=True)
    assert [r["resumed"] for r in rows] == [True] * len(ssd_run["rows"])
    assert [r["metrics"]["params"] for r in rows] == [r["metrics"]["params"] for r in ssd_run["rows"]]
    code, err = _cli(["compress", "--config", ssd_run["config"], "--run-dir", run_dir], capsys)
    _one_line_error(code, err, str(run_dir), "already holds", "--resume")
    assert {p.name: _digest(p) for p in run_dir.iterdir()} == digests


def test_resume_redoes_only_what_other_settings_change_and_refuses_to_overwrite(ssd_run, tmp_path, caplog):
    run_dir = tmp_path / "copy"
    shutil.copytree(ssd_run["run_dir"], run_dir)
    # Other retrain settings: the existing retrain output was made with the old ones, so resuming is refused.
    retrain = _with(ssd_run["raw"], retrain={"lr": 0.002})
    with pytest.raises(StageError, match=r"04_retrain_all.safetensors was made with other settings .*stages"):
        run_pipeline_in_process(validate_config(retrain), run_dir, resume=True)
    # Other distill settings with the distilled model gone: only distill runs again.
    (run_dir / "05_distill.safetensors").unlink()
    before = {p.name: _digest(p) for p in run_dir.glob("0[0-4]_*")}
    distill = _with(ssd_run["raw"], distill={"temperature": 2.0})
    with caplog.at_level("INFO", logger="compression.plan"):
        rows = run_pipeline_in_process(validate_config(distill), run_dir, resume=True)
    assert [r["resumed"] for r in rows] == [True] * 4 + [False]
    assert {p.name: _digest(p) for p in run_dir.glob("0[0-4]_*")} == before
    lines = [r.getMessage() for r in caplog.records if r.name == "compression.plan"]
    assert lines[0] == "stage distill started -> 05_distill.safetensors", lines
    assert lines[1].startswith("stage distill done in") and "FLOPs" in lines[1] and "val map_voc07" in lines[1]


# --------------------------------------------------------------------------------------------
# The classifier: a ranking criterion and Taylor


def test_vgg_l1_norm_chain_removes_the_configured_share(cls_root, cls_pretrained, tmp_path):
    raw = _with(_cls_raw(cls_root, criterion="l1_norm", prune_ratio=0.25, min_channels=2),
                pretrain={"checkpoint": str(cls_pretrained)}, phases=CLS_PHASES)
    rows = run_pipeline_in_process(validate_config(raw), tmp_path / "run")
    assert [(r["stage"], r["phase"]) for r in rows] == [("pretrain", None)] + [
        (stage, phase) for phase in ("low", "high") for stage in ("sparsity", "prune", "retrain")] + [("distill", None)]
    base = rows[0]["metrics"]
    assert 0 <= base["top1"] <= 1 and "top1" in rows[-1]["metrics"]
    previous = rows[0]
    for index in (1, 4):
        sparse, pruned, retrained = rows[index: index + 3]
        # each phase starts from the previous phase's retrained model, and prunes Θ_L1
        assert read_metadata(sparse["path"])["parent"] == previous["path"]
        assert read_metadata(pruned["path"])["parent"] == sparse["path"]
        assert sparse["metrics"]["val_metric_l1"] - sparse["metrics"]["val_metric_thresholded"] <= 0.05 + 1e-12
        assert pruned["metrics"]["params"] < previous["metrics"]["params"]
        assert pruned["metrics"]["flops"] < previous["metrics"]["flops"]
        assert pruned["metrics"]["params_ratio"] > 1 and pruned["metrics"]["flops_ratio"] > 1
        selection = json.loads(Path(pruned["selection"]).read_text())
        assert set(selection["layers"]) == {f"features.{name}" for name in CLS_PHASES[index // 4]["layers"]}
        model = load_checkpoint(pruned["path"]).model
        for name, entry in selection["layers"].items():
            n = len(entry["remove"]) + entry["keep"]
            assert len(entry["remove"]) == round(0.25 * n)
            assert layer_channels(model.get_submodule(name)) == entry["keep"]
            # l1_norm removes the filters with the smallest ‖W_f‖₁ of Θ_L1
            assert max(entry["scores"][f] for f in entry["remove"]) <= min(
                s for f, s in enumerate(entry["scores"]) if f not in entry["remove"])
        previous = retrained


def test_vgg_group_norm_chain_trains_group_sparse_and_ranks_globally(cls_root, cls_pretrained, tmp_path):
    raw = _with(_cls_raw(cls_root, criterion="group_norm", target_flops_ratio=1.5, min_channels=2),
                pretrain={"checkpoint": str(cls_pretrained)}, distill={"enabled": False},
                sparsity={"group_norm_reg": 0.01})
    rows = run_pipeline_in_process(validate_config(raw), tmp_path / "run")
    assert [(r["stage"], r["phase"]) for r in rows] == [("pretrain", None), ("sparsity", "phase1"),
                                                         ("prune", "phase1"), ("retrain", "phase1")]
    sparse, pruned = rows[1]["metrics"], rows[2]["metrics"]
    # GroupNormPruner's regulariser, not L1: no λ, no α, nothing thresholded
    assert sparse["regulariser"] == "group_norm" and sparse["group_norm_reg"] == 0.01
    assert sparse["l1_lambda"] == 0 and sparse["alpha"] is None and sparse["val_drop"] == 0
    assert 1.5 <= pruned["flops_ratio"] < 1.7  # one filter of this tiny model is several % of its FLOPs
    selection = json.loads(Path(rows[2]["selection"]).read_text())
    assert selection["criterion"] == "group_norm" and selection["reached"] is True
    # The pruned model is the one torch-pruning's GroupNormPruner makes, stepping the sparse model to the target
    # (but for the consumers' biases: the prune stage adds to them what the removed channels fed them)
    sparse = load_checkpoint(rows[1]["path"])
    pruner = build_pruner("tp_group_norm", sparse.model, list(selection["layers"]), model_name=sparse.model_name)
    prune_to_flops(pruner, sparse.model, 1.5, min_channels=2)
    expected, pruned = sparse.model.state_dict(), load_checkpoint(rows[2]["path"]).model.state_dict()
    assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in pruned.items()}
    assert all(torch.equal(expected[key], pruned[key]) for key in expected if not key.endswith(".bias"))
    model = load_checkpoint(rows[2]["path"]).model
    for name, entry in selection["layers"].items():
        assert layer_channels(model.get_submodule(name)) == entry["keep"] >= 2
        assert len(entry["scores"]) == entry["keep"] + len(entry["remove"])
    # one ranking over the phase, not a share per layer
    assert len({len(e["remove"]) / (len(e["remove"]) + e["keep"]) for e in selection["layers"].values()}) > 1


def test_vgg_taylor_chain_prunes_iteratively(cls_root, cls_pretrained, tmp_path):
    raw = _with(_cls_raw(cls_root, criterion="taylor", prune_ratio=0.2, taylor_batches=1, taylor_step_filters=24,
                         taylor_finetune_batches=1, min_channels=2),
                pretrain={"checkpoint": str(cls_pretrained)}, distill={"enabled": False})
    rows = run_pipeline_in_process(validate_config(raw), tmp_path / "run")
    assert [(r["stage"], r["phase"]) for r in rows] == [("pretrain", None), ("taylor", "phase1"), ("retrain", "phase1")]
    assert [r["final"] for r in rows] == [False, False, True]  # no distillation: the retrained model
    taylor = rows[1]["metrics"]
    assert taylor["taylor_steps"] >= 2 and taylor["removed_fraction"] >= 0.2
    assert taylor["params"] < rows[0]["metrics"]["params"]
    selection_path = Path(taylor["selection"])
    assert selection_path.parent == Path(rows[1]["path"]).parent
    selection = json.loads(selection_path.read_text())
    model = load_checkpoint(rows[2]["path"]).model
    for name, entry in selection["layers"].items():
        assert layer_channels(model.get_submodule(name)) == entry["keep"] >= 2


def test_stage_functions_refuse_what_they_cannot_do(cls_root, cls_pretrained, tmp_path):
    phase = PhaseConfig(name="phase1", layers=["conv1_1"])
    cfg = validate_config(_cls_raw(cls_root, criterion="taylor", prune_ratio=0.5))
    with pytest.raises(ConfigError, match="taylor_prune_stage"):
        S.select_filters(cls_pretrained, cfg, tmp_path / "sel.json", phase=phase)
    for criterion in ("l1_norm", "random", "group_norm", "taylor"):
        cfg = validate_config(_cls_raw(cls_root, criterion=criterion))
        with pytest.raises(ConfigError, match="prune_ratio or target_flops_ratio"):
            run_pipeline_in_process(cfg, tmp_path / criterion)
        assert not (tmp_path / criterion).exists()
    cfg = validate_config(_cls_raw(cls_root))
    with pytest.raises(StageError, match="no α"):  # 'seed' needs the output of induce_sparsity
        S.select_filters(cls_pretrained, cfg, tmp_path / "sel.json", phase=phase)
    assert not (tmp_path / "sel.json").exists()
    assert [p.name for p in phases_for(validate_config({"model": {"name": "ssd_vgg_lite"}}))] == [
        "phase1", "phase2", "phase3", "phase4"]


def test_a_phase_removes_layers_whole_before_it_prunes_filters(devkit, ssd_pretrained, tmp_path):
    removed = ["conv1_2", "conv3_3"]
    raw = _with(_ssd_raw(devkit), pretrain={"checkpoint": str(ssd_pretrained)}, distill={"enabled": False},
                phases=[{**SSD_PHASES[0], "remove_layers": removed}])  # the phase lists them too: skipped
    rows = run_pipeline_in_process(validate_config(raw), tmp_path / "run")
    assert [(r["stage"], r["phase"]) for r in rows] == [
        ("pretrain", None), ("remove_layers", "all"), ("sparsity", "all"), ("prune", "all"), ("retrain", "all")]
    base, layered = rows[0]["metrics"], rows[1]["metrics"]
    assert layered["layers_removed"] == 2
    assert layered["flops"] < base["flops"] and layered["params"] < base["params"] and layered["flops_ratio"] > 1
    assert read_metadata(rows[2]["path"])["parent"] == rows[1]["path"]  # sparsity trains the model without them
    selection = json.loads(Path(rows[3]["selection"]).read_text())
    assert not {f"backbone.{name}" for name in removed} & set(selection["layers"])
    assert len(selection["layers"]) == len(SSD_PHASES[0]["layers"]) - 2
    for row in rows[1:]:  # every later checkpoint rebuilds without them
        ckpt = load_checkpoint(row["path"])
        assert ckpt.model_args["removed_layers"] == removed
        assert all(isinstance(getattr(ckpt.model.backbone, name), torch.nn.Identity) for name in removed)
        with torch.no_grad():
            ckpt.model.eval()([torch.rand(3, 64, 64)])


def test_the_plan_removes_layers_first_in_their_phase_and_keys_the_output_by_them(devkit):
    from compression.plan import build_plan, stage_settings

    phases = [{"name": "p1", "layers": ["conv1_1", "conv2_1"], "remove_layers": ["conv1_2"]},
              {"name": "p2", "layers": ["conv3_1"]}]
    cfg = validate_config(_with(_ssd_raw(devkit), phases=phases))
    steps = build_plan(cfg)
    assert [step.name for step in steps] == ["00_pretrain", "01_remove_layers_p1", "02_sparsity_p1", "03_selection_p1",
                                             "04_prune_p1", "05_retrain_p1", "06_sparsity_p2", "07_selection_p2",
                                             "08_prune_p2", "09_retrain_p2", "10_distill"]
    assert steps[1].inputs == {"input_path": "00_pretrain"} and steps[2].inputs == {"input_path": "01_remove_layers_p1"}
    other = PhaseConfig(name="p1", layers=["conv1_1", "conv2_1"], remove_layers=["conv3_2"])
    assert stage_settings(cfg, "remove_layers", cfg.stages.phases[0]) != stage_settings(cfg, "remove_layers", other)
    # a phase that removes nothing is named as before the option existed (earlier runs' cache keys hold)
    assert cfg.stages.phases[1].identity() == {"name": "p2", "layers": ["conv3_1"]}


def test_removing_a_layer_whose_filters_were_pruned_is_refused(ssd_run, tmp_path):
    pruned = next(row for row in ssd_run["rows"] if row["stage"] == "prune")
    backbone = load_checkpoint(pruned["path"]).model.backbone
    narrowed = [name for name in ("conv1_2", "conv2_2", "conv3_2", "conv3_3", "conv4_2", "conv4_3", "conv5_2", "conv5_3")
                if getattr(backbone, name).in_channels != getattr(backbone, name).out_channels]
    assert narrowed, "the pruned model has no removable layer of unequal widths to test with"
    cfg = validate_config(ssd_run["raw"])
    phase = PhaseConfig(name="later", layers=["conv1_1"], remove_layers=narrowed[:1])
    with pytest.raises(StageError, match=rf"stages.phases \(later\).remove_layers: .*cannot remove '{narrowed[0]}'"):
        S.remove_layers(Path(pruned["path"]), cfg, tmp_path / "out.safetensors", phase=phase)
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Bad input through the CLI: one line, exit code 2, nothing written or overwritten


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("stages.phases=[{name: p1, layers: [conv1_1, conv99_9]}]", ["stages.phases.0 (p1)", "unknown layer 'conv99_9'"]),
        ("stages.phases=[{name: p1, layers: [head.classification_head.module_list.0]}]", ["SSD head conv"]),
        ("stages.selection.gamma=0", ["stages.selection.gamma"]),
        ("stages.selection.gamma=1.5", ["stages.selection.gamma"]),
        ("stages.sparsity.l1_lambda=-0.1", ["stages.sparsity.l1_lambda"]),
        ("stages.phases=[{name: p1, layers: [conv1_1], remove_layers: [conv2_1]}]",
         ["stages.phases.0 (p1).remove_layers", "cannot remove 'conv2_1'"]),
        ("stages.phases=[{name: p1, layers: [conv1_1], remove_layers: [conv1_2]}, "
         "{name: p2, layers: [conv2_1], remove_layers: [conv1_2]}]",
         ["stages.phases.1 (p2).remove_layers", "removed already"]),
    ],
)
def test_bad_settings_fail_before_any_work(devkit, tmp_path, capsys, override, needles):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_ssd_raw(devkit)))
    code, err = _cli(["compress", "--config", config, "--set", override, "--run-dir", tmp_path / "run"], capsys)
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_nan_during_l1_training_names_epoch_and_lambda_and_keeps_earlier_outputs(devkit, ssd_pretrained, tmp_path,
                                                                                  capsys):
    raw = _with(_ssd_raw(devkit), pretrain={"checkpoint": str(ssd_pretrained)}, sparsity={"l1_lambda": 1e38})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    source = _digest(ssd_pretrained)
    run_dir = tmp_path / "run"
    code, err = _cli(["compress", "--config", config, "--run-dir", run_dir], capsys)
    _one_line_error(code, err, "at epoch 1", "l1_lambda=1e+38", "phase all")
    assert sorted(p.name for p in run_dir.iterdir()) == ["00_pretrain.safetensors", "config.json"]
    assert load_checkpoint(run_dir / "00_pretrain.safetensors").stage == "pretrain"
    assert _digest(ssd_pretrained) == source


def test_a_selection_that_empties_a_layer_is_refused(ssd_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.json", "00_pretrain.safetensors", "01_sparsity_all.safetensors", "02_selection_all.json"):
        shutil.copy(ssd_run["run_dir"] / name, run_dir / name)
    selection_path = run_dir / "02_selection_all.json"
    selection = json.loads(selection_path.read_text())
    first = next(iter(selection["layers"]))
    entry = selection["layers"][first]
    n = len(entry["remove"]) + entry["keep"]
    entry.update(remove=list(range(n)), keep=0)
    selection_path.write_text(json.dumps(selection))
    digests = {p.name: _digest(p) for p in run_dir.iterdir()}
    code, err = _cli(["compress", "--config", ssd_run["config"], "--run-dir", run_dir, "--resume"], capsys)
    _one_line_error(code, err, str(selection_path), f"removes all {n} filters", first)
    assert {p.name: _digest(p) for p in run_dir.iterdir() if not p.name == "config.json"} == {
        k: v for k, v in digests.items() if k != "config.json"}


def test_a_teacher_with_other_classes_is_refused(ssd_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(ssd_run["run_dir"], run_dir)
    distilled = run_dir / Path(ssd_run["rows"][-1]["path"]).name
    distilled.unlink()
    other = validate_config(_ssd_raw(ssd_run["raw"]["data"]["root"]) | {"data": {
        **ssd_run["raw"]["data"], "classes": ["cat", "dog", "bird"]}})
    teacher = initial_checkpoint(other)
    save_checkpoint(teacher, run_dir / "00_pretrain.safetensors")
    code, err = _cli(["compress", "--config", ssd_run["config"], "--run-dir", run_dir, "--resume"], capsys)
    _one_line_error(code, err, "00_pretrain.safetensors", "3 classes (cat, dog, bird)", "same classes")
    assert not distilled.exists()


def test_a_detectors_score_threshold_is_chosen_on_validation(devkit, ssd_pretrained, tmp_path):
    # With export.score_threshold_max_val_drop, each checkpoint's post-processing gets the highest threshold
    # whose validation mAP stays within the drop of the configured one's (0 here: no loss at all). One pass at
    # the configured threshold serves every candidate: the SSD run at a higher threshold gives exactly the
    # detections above it, which the direct runs below check.
    raw = _with(_ssd_raw(devkit), pretrain={"checkpoint": str(ssd_pretrained)})
    raw["export"] = {"score_threshold_max_val_drop": 0.0}
    cfg = validate_config(raw)
    model = load_checkpoint(ssd_pretrained).model
    loader = build_loader(cfg.data, "val", train=False, image_size=64, seed=cfg.seed)
    runs = {}
    for threshold in SCORE_THRESHOLDS:
        apply_postprocess_settings(model, {"score_threshold": threshold, "pre_nms_top_k": cfg.export.pre_nms_top_k})
        with torch.inference_mode():
            runs[threshold] = predict_detections(model, loader, progress=False)
    lowest, targets = runs[cfg.export.score_threshold]
    counts = [sum(len(p["scores"]) for p in predictions) for predictions, _ in runs.values()]
    assert counts[0] > counts[-1], counts  # the thresholds do remove detections
    for threshold, (predictions, _) in runs.items():
        for filtered, direct in zip(above_score(lowest, threshold), predictions, strict=True):
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(filtered[key], direct[key])
    maps = {t: voc_detection_ap(predictions, targets, 10)["map_voc07"] for t, (predictions, _) in runs.items()}
    expected = max(t for t in SCORE_THRESHOLDS if maps[t] >= maps[cfg.export.score_threshold])
    path, metrics = S.pretrain(cfg, tmp_path / "base.safetensors")
    assert metrics["score_threshold"] == expected and metrics["score_threshold_val_cost"] <= 0
    assert metrics["val_map_voc07"] == pytest.approx(maps[expected])
    assert load_checkpoint(path).model.score_thresh == expected  # what the deployment runs with
