"""A preset's pipeline end to end, in-process: params, size, FLOPs, mAP and wall time per stage.

    .venv/bin/python bench/compress.py [--config default] [--set k=v ...] [--base CKPT] [--keep CKPT] [--result NAME]

`--base` reuses a pretrained checkpoint (e.g. the one bench/pretrain.py measured) instead of pretraining
again. Writes bench/results/<NAME>.json (default ``compress``); run bench/report.py afterwards.
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

COLUMNS = ("stage", "phase", "params", "size_bytes", "flops", "map_voc07", "map_coco", "top1", "val_map_voc07",
           "val_top1", "score_threshold", "params_ratio", "flops_ratio", "stage_seconds")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def speedup_against_base(cfg, base_path: Path, final_path: Path) -> dict:
    """The final model's deployment against the pretrained one's (ONNX Runtime at batch 32, the config's
    threads and layout), each pair timed in alternation: the network alone and end to end."""
    from compression.checkpoint import load_checkpoint
    from compression.export import deployment_speedup
    from compression.latency import network_speedup
    from compression.measure import split_images
    from compression.models import model_input_size

    base, final = (load_checkpoint(path).model.eval() for path in (base_path, final_path))
    images = split_images(cfg, 32, model_input_size(base))
    return {"network": network_speedup(base, final, batch_size=32, threads=cfg.export.threads),
            "end_to_end": deployment_speedup(base, final, images, 32, threads=cfg.export.threads,
                                             layout=cfg.export.onnxruntime_layout)}


def kept_widths(base_path: Path, final_path: Path) -> dict[str, list[int]]:
    """``{layer: [kept, original]}`` filters of every prunable layer: where the cut went."""
    from compression.checkpoint import load_checkpoint
    from compression.latency import model_widths

    base, final = (load_checkpoint(path) for path in (base_path, final_path))
    original = model_widths(base.model, base.model_name)
    return {name: [kept, original[name]] for name, kept in model_widths(final.model, final.model_name).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--base", type=Path, default=None, help="pretrained checkpoint to start from")
    parser.add_argument("--keep", type=Path, default=CHECKPOINTS / "compressed.safetensors",
                        help="where the final checkpoint is kept (bench/speedup.py measures it)")
    parser.add_argument("--result", default="compress", help="name of the result file in bench/results/")
    args = parser.parse_args()

    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from compression.pipeline import run_pipeline_in_process
    from compression.stages import LATENCY_TABLE

    overrides = list(args.overrides)
    if args.base is not None:
        overrides.append(f"stages.pretrain.checkpoint={args.base}")
    cfg = load_config(args.config, overrides)
    ensure_builtin_data(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rows = run_pipeline_in_process(cfg, Path(tmp) / "run")
        total = time.perf_counter() - started
        args.keep.parent.mkdir(parents=True, exist_ok=True)
        final_row = next(row for row in rows if row["final"])  # the pipeline's answer, chosen on validation
        shutil.copyfile(final_row["path"], args.keep)
        speedup = speedup_against_base(cfg, rows[0]["path"], final_row["path"])
        widths = kept_widths(rows[0]["path"], final_row["path"])
        # A latency target's table of this machine: kept beside the model, to inspect and to reuse.
        table = Path(tmp) / "run" / LATENCY_TABLE
        if table.exists():
            shutil.copyfile(table, args.keep.with_suffix(".latency_table.json"))
    table = []
    for row in rows:
        metrics = row.get("metrics", {})
        table.append({"stage": row.get("stage"), "phase": row.get("phase"), "final": row["final"],
                      **{k: metrics.get(k) for k in COLUMNS if k not in ("stage", "phase")}})
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = "\n".join("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in table)
    base, final = rows[0]["metrics"], final_row["metrics"]
    key = "map_voc07" if "map_voc07" in base else "top1"
    verdict = (
        f"final vs pretrained: {final.get('params_ratio', float('nan')):.2f}x fewer params, "
        f"{final.get('flops_ratio', float('nan')):.2f}x fewer FLOPs, {key} {base.get(key, float('nan')):.4f} -> "
        f"{final.get(key, float('nan')):.4f} ({final_row['stage']} model, chosen on validation; {100 * (base.get(key, 0) - final.get(key, 0)):+.2f} points drop); "
        f"total {total:.0f} s" + (" (pretraining reused from --base)" if args.base else "")
        + f"; ONNX Runtime, batch 32, {cfg.export.threads} thread(s), final against pretrained timed in alternation: "
        f"{speedup['network']['ratio']:.2f}x network ({speedup['network']['base_layout']} / "
        f"{speedup['network']['model_layout']}), {speedup['end_to_end']['ratio']:.2f}x end to end"
    )
    cut = ", ".join(f"{name.rsplit('.', 1)[-1]} {kept}/{n}" for name, (kept, n) in widths.items() if kept < n)
    verdict += f"\n\nfilters kept / original where the final model was cut: {cut or 'none'}"
    out = write_result(args.result, {"config": args.config, "overrides": overrides, "rows": table,
                                    "total_seconds": total, "speedup": speedup, "widths": widths,
                                    "markdown": f"{header}\n{body}\n\n{verdict}"})
    print(f"{header}\n{body}\n\n{verdict}\n-> {out}")


if __name__ == "__main__":
    main()
