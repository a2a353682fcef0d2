"""bench/pruned_vs_narrow.py on tiny checkpoints: the pairs it refuses, and the row it writes for a pair
(real exports, real ONNX Runtime; the times themselves are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.pruned_vs_narrow import check_pairs, pair_row, summarise
from compression.checkpoint import Checkpoint, save_checkpoint
from compression.criteria import rank_filters, select_by_ratio
from compression.models import build_model, prunable_layers
from compression.pruning import build_dependency_graph, prune_filters, resolve_layers
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(path: Path, width: float, cut: float = 0.0, image_size: int = 64, **metrics) -> Path:
    torch.manual_seed(0)
    args = {"num_classes": 11, "width_mult": width, "image_size": image_size}
    model = build_model("ssd_vgg_lite", **args).eval()
    if cut:
        dg = build_dependency_graph(model)
        layers = resolve_layers(model, "ssd_vgg_lite", prunable_layers("ssd_vgg_lite"), dg=dg)
        model = prune_filters(model, select_by_ratio(rank_filters("l1_norm", model, dg, layers), cut), dg=dg)
    ckpt = Checkpoint(model=model, model_name="ssd_vgg_lite", model_args=args, class_names=[str(i) for i in range(10)],
                      stage="retrain", metrics=metrics)
    return save_checkpoint(ckpt, path)


def test_a_pair_is_timed_against_each_other_and_compared_on_its_stored_metrics(tmp_path, digits_devkit):
    # A wide model cut to half its filters against a dense one of half the width: about the same network.
    pruned = _checkpoint(tmp_path / "latency_0.safetensors", 0.125, cut=0.5, flops=3.0e6, params=2000,
                         map_voc07=0.80, val_map_voc07=0.79)
    narrow = _checkpoint(tmp_path / "dense_0.safetensors", 0.0625, flops=6.0e6, params=3000,
                         map_voc07=0.82, val_map_voc07=0.78)
    assert check_pairs([pruned], [narrow]) is None
    row = pair_row(tiny_config(tmp_path, digits_devkit), 0, pruned, narrow)
    assert row["pair"] == 0 and (row["pruned"], row["narrow"]) == ("latency_0.safetensors", "dense_0.safetensors")
    assert row["gap_points"] == pytest.approx(-2.0) and row["flops_ratio"] == 2.0 and row["params_ratio"] == 1.5
    assert (row["pruned_val_metric"], row["narrow_val_metric"]) == (0.79, 0.78)
    for kind in ("network", "e2e"):
        times = row[f"{kind}_ms"]
        assert times["pruned"] > 0 and times["narrow"] > 0
        assert row[f"{kind}_speedup"] == pytest.approx(times["narrow"] / times["pruned"])
    assert all(layout in ("nchwc", "nchw") for layout in row["layouts"].split(" / "))
    text = summarise([row], threads=1)
    assert "pruned minus narrow, same seed: -2.00 ± 0.00 points" in text and "| 0 | 0.8 | 0.82 | -2 |" in text


def test_pairs_that_cannot_be_compared_are_refused_in_one_line(tmp_path):
    good = _checkpoint(tmp_path / "a.safetensors", 0.0625, flops=1.0, params=1, map_voc07=0.5)
    bare = _checkpoint(tmp_path / "bare.safetensors", 0.0625, map_voc07=0.5)
    other_size = _checkpoint(tmp_path / "b.safetensors", 0.0625, image_size=96, flops=1.0, params=1)
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("weights")
    assert "give one narrow per pruned" in check_pairs([good, good], [good])
    assert check_pairs([good], [tmp_path / "missing.safetensors"]) == (
        f"--narrow {tmp_path / 'missing.safetensors'}: no such checkpoint")
    assert check_pairs([not_a_checkpoint], [good]) == f"--pruned: {not_a_checkpoint}: file is truncated (7 bytes)"
    assert "stores no FLOPs or parameter count" in check_pairs([good], [bare])
    assert "input sizes 64 and 96 differ" in check_pairs([good], [other_size])
    # From the command line: that line, a non-zero exit, no traceback, no result written.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "pruned_vs_narrow.py"), "--pruned", str(good),
                           "--narrow", str(other_size), "--result", "pruned_vs_narrow_refused"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {good} and {other_size}: input sizes 64 and 96 differ; they "
                                                "are timed on the same images"]
    assert not (ROOT / "bench" / "results" / "pruned_vs_narrow_refused.json").exists()
