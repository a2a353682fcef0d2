"""Pretraining benchmark (issue: the default preset must reach VOC07 mAP@0.5 >= 0.80 in < 6 min on 2 CPU cores).

    .venv/bin/python bench/pretrain.py [--config default] [--set k=v ...]

Generates the built-in data if missing, trains in-process exactly as `prunepipe train` does, and writes
bench/results/pretrain.json (training wall time, test-set metrics). Run bench/report.py afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import CHECKPOINTS, write_result  # noqa: E402


def _table(cfg, metrics: dict, train_seconds: float) -> str:
    rows = [
        ("model", cfg.model.name), ("epochs", cfg.stages.pretrain.epochs),
        ("training wall time (s)", f"{train_seconds:.0f}"),
        ("VOC07 11-point mAP@0.5 (test)", f"{metrics.get('map_voc07', float('nan')):.4f}"),
        ("VOC all-point mAP@0.5", f"{metrics.get('map_voc', float('nan')):.4f}"),
        ("COCO mAP@[.5:.95]", f"{metrics.get('map_coco', float('nan')):.4f}"),
        ("params", metrics["params"]), ("FLOPs (2 per MAC)", metrics["flops"]),
        ("checkpoint bytes", metrics["size_bytes"]),
        ("latency batch 1 (ms)", f"{metrics.get('latency_b1_ms', float('nan')):.1f}"),
        ("latency batch 32 (ms)", f"{metrics.get('latency_b32_ms', float('nan')):.1f}"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--keep", type=Path, default=CHECKPOINTS / "pretrain.safetensors",
                        help="where the trained checkpoint is kept for bench/compress.py, quality.py, speedup.py")
    args = parser.parse_args()
    if args.keep.exists():
        sys.exit(f"error: {args.keep} exists; move it away or pass --keep to another path")

    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from compression.stages import pretrain

    cfg = load_config(args.config, args.overrides)
    ensure_builtin_data(cfg.data)  # data generation is not training time
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path, metrics = pretrain(cfg, Path(tmp) / "pretrain.safetensors")
        total = time.perf_counter() - started
        args.keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.keep)
    history = metrics.pop("history", None)
    train_seconds = metrics["stage_seconds"]  # measured before evaluation
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.name,
        "epochs": cfg.stages.pretrain.epochs,
        "checkpoint": str(args.keep),
        "train_seconds": train_seconds,
        "total_seconds": total,
        "metrics": metrics,
        "history": history,
        "markdown": _table(cfg, metrics, train_seconds),
    }
    out = write_result("pretrain", result)
    print(f"{cfg.model.name}: VOC07 mAP@0.5 {metrics.get('map_voc07', float('nan')):.4f}, "
          f"COCO mAP {metrics.get('map_coco', float('nan')):.4f}, training {train_seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main()
