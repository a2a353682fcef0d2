"""`prunepipe compare` on a real MLflow sqlite store in tmp, filled with ``tasks.tracking.RunTracker``.

Two pipeline runs, logged as the flow logs them (parent run per flow run, child run per checkpoint):
the same untrained base model, pruned to two different widths (real checkpoints measured on the built-in
digits: size, FLOPs, mAP, ratios to the base). No training: comparing runs is what is under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from tasks.env import apply_env_defaults

apply_env_defaults()

import pytest  # noqa: E402
from conftest import FLOAT32  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from compression.checkpoint import save_checkpoint  # noqa: E402
from compression.config import load_config  # noqa: E402
from compression.data.digits import write_digits_voc  # noqa: E402
from compression.jobs import initial_checkpoint  # noqa: E402
from compression.measure import measure  # noqa: E402
from tasks.compare import CompareError, compare_runs, pareto_front, pareto_plot, resolve_uri  # noqa: E402
from tasks.tracking import RunTracker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def checkpoint(cfg, width: float, stage: str, path: Path, base: dict | None) -> tuple[Path, dict]:
    stage_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"width_mult": width})})
    ckpt = initial_checkpoint(stage_cfg)
    ckpt.stage = stage
    save_checkpoint(ckpt, path)
    metrics = measure(ckpt, stage_cfg, latency=False, base=base)
    return path, metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Runs "wide" (base, pruned to 1/2 of its width) and "narrow" (base, pruned to 1/4)."""
    root = tmp_path_factory.mktemp("compare")
    devkit = write_digits_voc(root / "data", image_size=64, num_images={"train": 4, "val": 4, "test": 4})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config("default", [f"data.root={devkit}", "data.builtin=null", "model.width_mult=0.125",
                                  "model.image_size=64", *FLOAT32, f"tracking.mlflow_uri={uri}", f"workdir={root}",
                                  "tracking.experiment=compare-test"])
    base_path, base = checkpoint(cfg, 0.125, "pretrain", root / "00_pretrain.safetensors", None)
    parents = {}
    for name, width, flow_run_id in (("wide", 0.0625, "flow-run-wide"), ("narrow", 0.03125, "flow-run-narrow")):
        run_cfg = cfg.model_copy(update={"name": name})
        tracker = RunTracker.start(run_cfg, flow_run_id=flow_run_id, run_name=f"{name}-ssd_vgg_lite")
        tracker.log_checkpoint(stage="pretrain", phase=None, checkpoint=base_path, metrics=base)
        pruned, metrics = checkpoint(cfg, width, "prune", root / name / "01_prune_p1.safetensors", base)
        tracker.log_checkpoint(stage="prune", phase="p1", checkpoint=pruned, metrics=metrics)
        tracker.finish()
        parents[name] = tracker
    empty = MlflowClient(uri).create_experiment("empty-experiment")
    return uri, parents, empty


def test_compare_reads_both_runs_checkpoints_in_order_with_their_measurements(store):
    uri, parents, _ = store
    rows = compare_runs(uri, "compare-test", [parents["wide"].parent_run_id, "flow-run-narrow"])
    assert [(r["preset"], r["checkpoint"], r["stage"]) for r in rows] == [
        ("wide", "00_pretrain", "pretrain"), ("wide", "01_prune_p1", "prune"),
        ("narrow", "00_pretrain", "pretrain"), ("narrow", "01_prune_p1", "prune")]
    assert [r["parent_run_id"] for r in rows] == [parents["wide"].parent_run_id] * 2 + \
        [parents["narrow"].parent_run_id] * 2
    by_run = {(r["preset"], r["stage"]): r for r in rows}
    for run in ("wide", "narrow"):
        base, pruned = by_run[(run, "pretrain")], by_run[(run, "prune")]
        for key in ("params", "size_bytes", "flops", "map_voc07"):
            assert math.isfinite(pruned[key]) and math.isfinite(base[key]), key
        assert pruned["flops"] < base["flops"] and pruned["params_ratio"] > 1 and pruned["flops_ratio"] > 1
        assert pruned["params_ratio"] == pytest.approx(base["params"] / pruned["params"])
    assert by_run[("narrow", "prune")]["flops"] < by_run[("wide", "prune")]["flops"]
    # Without run ids: the latest runs, oldest first; a child's id names its parent run.
    assert [r["preset"] for r in compare_runs(uri, "compare-test")][::2] == ["wide", "narrow"]
    child = by_run[("narrow", "prune")]["mlflow_run_id"]
    assert {r["preset"] for r in compare_runs(uri, "compare-test", [child])} == {"narrow"}


def test_pareto_front_keeps_exactly_the_undominated_checkpoints(store):
    uri, _, _ = store
    rows = compare_runs(uri, "compare-test")
    front = pareto_front(rows)
    assert front and [r["flops"] for r in front] == sorted(r["flops"] for r in front)

    def dominates(a, b) -> bool:
        return a["flops"] <= b["flops"] and a["map_voc07"] >= b["map_voc07"] and \
            (a["flops"] < b["flops"] or a["map_voc07"] > b["map_voc07"])

    for row in rows:
        if any(row is f for f in front):
            assert not any(dominates(other, row) for other in rows), row["checkpoint"]
        else:
            assert any(dominates(f, row) or (f["flops"], f["map_voc07"]) == (row["flops"], row["map_voc07"])
                       for f in front), row["checkpoint"]
    # Hand-made points: the middle one costs more than the first and scores less than the last.
    points = [{"flops": 1e6, "map_voc07": 0.5}, {"flops": 2e6, "map_voc07": 0.4}, {"flops": 3e6, "map_voc07": 0.7}]
    assert pareto_front(points) == [points[0], points[2]]
    assert pareto_front([{"flops": 1e6, "top1": 0.9}, {"flops": 5e5, "top1": 0.95}]) == [{"flops": 5e5, "top1": 0.95}]


def test_pareto_plot_of_one_run_and_of_nothing(store, tmp_path):
    uri, parents, _ = store
    rows = compare_runs(uri, "compare-test", [parents["wide"].parent_run_id])
    path = pareto_plot(rows, tmp_path / "plots" / "wide.png")
    assert path == tmp_path / "plots" / "wide.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert pareto_plot([{"checkpoint": "failed", "stage": "prune"}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_unknown_run_empty_or_missing_experiment_and_missing_store_are_one_clear_error(store, tmp_path):
    uri, _, _ = store
    with pytest.raises(CompareError, match=r"run 'no-such-run': no MLflow run or Prefect flow run with this id"):
        compare_runs(uri, "compare-test", ["no-such-run"])
    with pytest.raises(CompareError, match=r"experiment 'empty-experiment' in .* has no pipeline runs yet"):
        compare_runs(uri, "empty-experiment")
    with pytest.raises(CompareError, match=r"no experiment 'nope' in .*experiments: .*compare-test"):
        compare_runs(uri, "nope")
    missing = tmp_path / "missing.db"
    with pytest.raises(CompareError, match="does not exist"):
        resolve_uri(f"sqlite:///{missing}")
    assert not missing.exists()  # looking did not create an empty store


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "flows.cli", "compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


def test_cli_prints_runs_side_by_side_and_writes_the_plot(store, tmp_path):
    uri, parents, _ = store
    out = tmp_path / "pareto.png"
    result = run_cli(parents["wide"].parent_run_id, "flow-run-narrow", "--experiment", "compare-test",
                     "--mlflow-uri", uri, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(f"wide-ssd_vgg_lite ({parents['wide'].parent_run_id[:8]})" in line for line in lines)
    assert any(f"narrow-ssd_vgg_lite ({parents['narrow'].parent_run_id[:8]})" in line for line in lines)
    assert sum("01_prune_p1" in line for line in lines) == 2
    assert f"Pareto plot (map_voc07 vs FLOPs): {out}" in result.stdout
    assert out.read_bytes()[:8] == PNG_MAGIC

    unknown = run_cli("0123456789abcdef", "--experiment", "compare-test", "--mlflow-uri", uri, cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.strip().count("\n") == 0
    assert "run '0123456789abcdef': no MLflow run or Prefect flow run with this id" in unknown.stderr
