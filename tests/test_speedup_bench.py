"""bench/speedup.py's parts on tiny models: the devices it times on and the rows it writes (real exports,
real ONNX Runtime; one run each, so the times themselves are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.speedup import (
    CPU_RUNTIMES,
    MODELS,
    bench_devices,
    built_models,
    markdown,
    measure_rows,
    prediction_markdown,
    prediction_rows,
    reach_markdown,
    reach_row,
)
from compression.errors import StageError
from compression.latency import model_widths
from compression.measure import split_images
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_devices_follow_compute_use_gpu():
    assert bench_devices(False) == [torch.device("cpu")]
    if torch.cuda.is_available():
        assert [d.type for d in bench_devices(True)] == ["cpu", "cuda"]
    else:
        with pytest.raises(StageError, match="compute.use_gpu is true but no CUDA GPU is visible"):
            bench_devices(True)


def test_rows_compare_dense_flops_and_latency_targets(tmp_path, digits_devkit):
    cfg = tiny_config(tmp_path, digits_devkit, "export.batch_size=2", "stages.selection.min_channels=1")
    models = built_models(cfg, flops_ratio=2.0, latency_ratio=1.3, quick=True, table_path=tmp_path / "table.json")
    assert list(models) == list(MODELS) and (tmp_path / "table.json").is_file()
    rows = measure_rows(models, [torch.device("cpu")], batches=[1, 2], threads=[1], warmup=0, runs=1, cfg=cfg)
    assert len(rows) == len(MODELS) * len(CPU_RUNTIMES) * 2
    assert {(r["model"], r["runtime"]) for r in rows} == {(m, rt) for m in MODELS for rt in CPU_RUNTIMES}
    for row in rows:
        # An ONNX Runtime row also names the layout its model's export runs in.
        extra = {"layout"} if row["runtime"] == "onnxruntime" else set()
        assert set(row) == {"model", "runtime", "batch", "threads", "e2e_ms", "map_voc07", "flops_ratio", "device",
                            "speedup", "speedup_vs_dense_eager"} | extra
        assert row.get("layout", "nchwc") in ("nchwc", "nchw")
        assert row["e2e_ms"] > 0 and row["map_voc07"] is None and row["device"] == "cpu"
        if row["model"] == "dense" and row["runtime"] == "torch_eager":
            assert row["speedup_vs_dense_eager"] == 1.0
        if row["model"] == "dense":
            assert row["flops_ratio"] == 1.0 and row["speedup"] == 1.0
        else:
            assert row["flops_ratio"] > 1.2
    flops_rows = [r for r in rows if r["model"] == "flops_target"]
    assert min(r["flops_ratio"] for r in flops_rows) >= 2.0
    assert "| latency_target | onnxruntime | cpu | 2 | 1 |" in markdown(rows, "")

    # The table's prediction of each network, from the table built_models measured (the same fingerprint).
    prediction = prediction_rows(models, cfg, tmp_path / "table.json", warmup=0, runs=1)
    assert [r["model"] for r in prediction] == list(MODELS)
    for row in prediction:
        assert row["clock"] == "thread_cpu" and row["batch_size"] == 2 and row["threads"] == 1
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["measured_ms"] - 1)
        assert row["layout"] in ("nchwc", "nchw") and row["predicted_layout"] in ("nchwc", "nchw")
    # export.onnxruntime_layout auto: a table per layout.
    assert [len(tables) for tables in json.loads((tmp_path / "table.json").read_text())["tables"].values()] == [1, 1]
    assert "| latency_target |" in prediction_markdown(prediction)

    # The reach of filter pruning: every prunable layer at its floor, from the same tables (not re-measured).
    reach = reach_row(models, cfg, tmp_path / "table.json", warmup=0, runs=1, max_layer_ratio=0.5)
    widths = model_widths(models["dense"].model, models["dense"].model_name)
    assert reach["floors"] == {name: max(1, -(-n // 2)) for name, n in widths.items()}  # min_channels=1: half
    assert reach["floor_ms"] > 0 and reach["speedup"] == reach["dense_ms"] / reach["floor_ms"]
    assert f"at most {reach['speedup']:.2f}x faster" in reach_markdown(reach)

    # Without a FLOPs-targeted model (a user may have only the dense and the latency-targeted checkpoints).
    pair = {label: models[label] for label in ("dense", "latency_target")}
    rows = measure_rows(pair, [torch.device("cpu")], batches=[1], threads=[1], warmup=0, runs=1, cfg=cfg)
    assert {r["model"] for r in rows} == set(pair) and len(rows) == 2 * len(CPU_RUNTIMES)
    assert "| flops_target |" not in markdown(rows, "")


def test_checkpoints_need_the_dense_and_the_latency_targeted_model(tmp_path):
    import subprocess
    import sys

    ckpt = tmp_path / "a.safetensors"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "bench/speedup.py", "--dense", str(ckpt), "--flops-target", str(ckpt)],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 2 and "give --dense and --latency-target" in done.stderr
    assert "Traceback" not in done.stderr


def test_models_are_timed_on_test_images_not_noise(tmp_path, digits_devkit):
    """Post-processing costs what the boxes above the score threshold cost, so the batch is the test split's
    own images (cycled when the split is smaller than the batch), the same for every model."""
    from compression.data.loaders import build_loader

    cfg = tiny_config(tmp_path, digits_devkit)
    first = next(iter(build_loader(cfg.data, "test", train=False, image_size=64, seed=cfg.seed)))[0]
    images = split_images(cfg, 3, (64, 64))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert torch.equal(images[0], first[0].float())
    split_size = sum(len(batch[0]) for batch in build_loader(cfg.data, "test", train=False, image_size=64,
                                                             seed=cfg.seed))
    cycled = split_images(cfg, split_size + 1, (64, 64))
    assert torch.equal(cycled[split_size], cycled[0])
