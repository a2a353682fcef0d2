"""A latency-targeted model against a dense control trained as long, over seeds, with its measured speedup.

    .venv/bin/python bench/latency_controls.py --base CKPT [--target 2.0] [--retrain-epochs 12] [--seeds 0 1 2]
        [--methods latency dense] [--flops-target R] [--max-layer-ratio 0.875] [--keep DIR] [--jobs 2]
        [--max-val-drop 0.005] [--remove-layers CONV ...]
        [--result latency_controls] [--quick]

From one pretrained model of the default preset (``--base``; its width and input size are the model's, so a
base trained at another ``model.width_mult`` works as it is), for each seed:

- ``latency``: the default preset's pipeline with one phase over every prunable layer (none losing more than
  ``--max-layer-ratio`` of its filters) cut to ``--target``
  times lower network latency (the latency tables of this machine, measured once up front and shared),
  ``--retrain-epochs`` retraining epochs, the preset's distillation, every checkpoint's score threshold
  chosen on validation (``export.score_threshold_max_val_drop``); its answer (distilled or not) is chosen on
  validation. With ``--remove-layers`` the phase first removes those convs whole (layer pruning), and the
  target counts from the model without them;
- ``flops`` (with ``--flops-target``): the same pipeline with the phase cut to ``--flops-target`` times fewer
  FLOPs instead: the same criterion and schedule, filters chosen by FLOPs rather than by time;
- ``dense``: the base trained for as many extra epochs (sparsity + retraining + distillation) with the
  retraining settings, its score threshold chosen the same way: the reference for "no accuracy loss".

Seeds change the data order, augmentation and the pruning's training, not the base. Once every unit has
trained, nothing else running, each pruned model is timed against the base in ONNX Runtime at batch 32 on
``export.threads`` threads, the two in alternation: the network alone and end to end (post-processing
included). ``metric`` is test VOC07 mAP@0.5; no choice reads it. Writes bench/results/<--result>.json; run
bench/report.py afterwards. ``--keep DIR`` keeps every unit's final checkpoint there
(``<method>_<seed>.safetensors``), for bench/speedup.py.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import markdown_rows, mean_sd, write_result  # noqa: E402

METHODS = ("latency", "flops", "dense")
QUICK_OVERRIDES = ["data.max_images=64", "stages.sparsity.epochs=1", "stages.distill.epochs=1"]


def unit_config(spec: dict[str, Any]):
    from compression.config import load_config
    from compression.models import prunable_layers

    layers = ", ".join(prunable_layers("ssd_vgg_lite"))
    target = (f"target_flops_ratio: {spec['flops_target']}" if spec["method"] == "flops"
              else f"target_latency_ratio: {spec['target']}")
    removal = f", remove_layers: [{', '.join(spec['remove_layers'])}]" if spec.get("remove_layers") else ""
    return load_config("default", [
        f"seed={spec['seed']}", f"stages.selection.seed={spec['seed']}",
        f"stages.pretrain.checkpoint={spec['base']}", f"stages.retrain.epochs={spec['retrain_epochs']}",
        "stages.selection.out_of_reach=closest", f"export.latency_table={spec['table']}",
        f"export.score_threshold_max_val_drop={spec['max_val_drop']}",
        f"stages.phases=[{{name: phase1, layers: [{layers}], {target}, max_layer_ratio: {spec['max_layer_ratio']}"
        f"{removal}}}]",
        *(QUICK_OVERRIDES if spec["quick"] else []),
        *base_model_overrides(Path(spec["base"])),
    ])


def base_model(base: Path) -> dict[str, Any]:
    """The base's width and input size (a base may be trained at another width or input size than the preset's)."""
    from compression.checkpoint import read_metadata

    options = read_metadata(base)["model_args"]
    return {key: options[key] for key in ("width_mult", "image_size") if options.get(key) is not None}


def base_model_overrides(base: Path) -> list[str]:
    """The base's model options as config overrides: the config describes the model the units prune."""
    return [f"model.{key}={value}" for key, value in base_model(base).items()]


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench.controls import extra_epochs  # what the pipeline trains after pretraining
    from compression import stages as S
    from compression.measure import stored_metrics
    from compression.pipeline import run_pipeline_in_process

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"]) / f"{spec['method']}_{spec['seed']}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = unit_config(spec)
    started = time.perf_counter()
    if spec["method"] != "dense":
        rows = run_pipeline_in_process(cfg, work / "run")
        final = next(row for row in rows if row["final"])
        metrics, path, stage = final["metrics"], final["path"], final["stage"]
    else:
        epochs = extra_epochs(cfg)
        cfg.stages.retrain.epochs = epochs
        path, metrics = S.retrain(Path(spec["base"]), cfg, work / "dense.safetensors", phase=None,
                                  base_metrics=stored_metrics(Path(spec["base"])))
        stage = f"retrain ({epochs} epochs)"
    if spec["keep"]:
        shutil.copyfile(path, Path(spec["keep"]) / f"{spec['method']}_{spec['seed']}.safetensors")
    return {"method": spec["method"], "seed": spec["seed"], "path": str(path), "final_stage": stage,
            "metric": metrics.get("map_voc07"), "val_metric": metrics.get("val_map_voc07"),
            "flops_ratio": metrics.get("flops_ratio"), "params_ratio": metrics.get("params_ratio"),
            "score_threshold": metrics.get("score_threshold"), "wall_seconds": time.perf_counter() - started}


def summarise(rows: list[dict[str, Any]], base: dict[str, Any], args) -> str:
    columns = ("method", "seed", "final_stage", "metric", "val_metric", "flops_ratio", "params_ratio",
               "network_speedup", "e2e_speedup", "score_threshold")
    lines = markdown_rows(sorted(rows, key=lambda r: (r["method"], r["seed"])), columns)
    dense = [r for r in rows if r["method"] == "dense"]
    paired = {r["seed"]: r["metric"] for r in dense}
    model = ", ".join(f"{key} {value}" for key, value in base_model(args.base).items())
    lines += ["", f"- base (`--base`, ssd_vgg_lite {model}): test VOC07 mAP {base.get('map_voc07', float('nan')):.4f}, validation "
                  f"{base.get('val_map_voc07', float('nan')):.4f}; {args.retrain_epochs} retraining epochs, "
                  f"max_layer_ratio {args.max_layer_ratio}, "
                  + (f"without {', '.join(args.remove_layers)}, " if args.remove_layers else "")
                  + f"{len(args.seeds)} seed(s)"]
    for method in (m for m in METHODS if m != "dense" and m in args.methods):
        pruned = [r for r in rows if r["method"] == method]
        gaps = [paired[r["seed"]] - r["metric"] for r in pruned if r["seed"] in paired]
        goal = f"{args.flops_target}x fewer FLOPs" if method == "flops" else f"{args.target}x lower network latency"
        lines += [
            f"- {method}-targeted ({goal}): test mAP {mean_sd([r['metric'] for r in pruned])}, "
            f"{mean_sd([r['flops_ratio'] for r in pruned], digits=2)}x fewer FLOPs, network "
            f"{mean_sd([r.get('network_speedup') for r in pruned], digits=2)}x and end to end "
            f"{mean_sd([r.get('e2e_speedup') for r in pruned], digits=2)}x faster than the base (ONNX Runtime, "
            f"batch 32, {args.threads} thread(s), timed in alternation with it)",
        ]
        if gaps:
            lines.append(f"- dense control minus {method}-targeted, same seed: {mean_sd(gaps, 100, 2)} points")
    if dense:
        lines.append(f"- dense control ({dense[0]['final_stage']}): test mAP {mean_sd([r['metric'] for r in dense])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the default preset's pretrained checkpoint")
    parser.add_argument("--target", type=float, default=2.0, help="times lower network latency")
    parser.add_argument("--retrain-epochs", type=int, default=12)
    parser.add_argument("--max-layer-ratio", type=float, default=0.875,
                        help="the most of any layer's filters the phase may remove")
    parser.add_argument("--remove-layers", nargs="+", default=[], metavar="CONV",
                        help="convs the pruned models lose whole first (layer pruning), e.g. conv1_2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["latency", "dense"])
    parser.add_argument("--flops-target", type=float, default=None, help="times fewer FLOPs (method flops)")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the final checkpoints in")
    parser.add_argument("--jobs", type=int, default=2, help="units in parallel, one process each")
    parser.add_argument("--max-val-drop", type=float, default=0.005, help="export.score_threshold_max_val_drop")
    parser.add_argument("--result", default="latency_controls")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 images, one seed (<result>.quick.json)")
    args = parser.parse_args()

    import torch

    from bench.compress import speedup_against_base
    from compression.checkpoint import load_checkpoint
    from compression.data.loaders import ensure_builtin_data
    from compression.errors import ModelError
    from compression.measure import stored_metrics
    from compression.models import remove_layers
    from compression.stages import latency_tables_for
    from tasks.env import apply_env_defaults

    apply_env_defaults()
    if not args.base.is_file():
        sys.exit(f"error: --base {args.base}: no such checkpoint")
    if "flops" in args.methods and not args.flops_target:
        sys.exit("error: --methods flops needs --flops-target (times fewer FLOPs)")
    if args.keep and args.keep.exists() and any(args.keep.glob("*_*.safetensors")):
        sys.exit(f"error: --keep {args.keep}: holds checkpoints already; name an empty or new folder")
    tabled = load_checkpoint(args.base)  # the selection's input: the base without --remove-layers
    try:
        remove_layers(tabled.model_name, tabled.model, args.remove_layers)
    except ModelError as exc:
        sys.exit(f"error: --remove-layers: {exc}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.quick:  # a smoke run never replaces a measurement
        args.seeds, args.result = args.seeds[:1], f"{args.result}.quick"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latency-controls-") as tmp:
        common = {"base": str(args.base.resolve()), "table": str(Path(tmp) / "latency_table.json"),
                  "target": args.target, "flops_target": args.flops_target, "retrain_epochs": args.retrain_epochs,
                  "max_layer_ratio": args.max_layer_ratio, "remove_layers": args.remove_layers,
                  "keep": str(args.keep.resolve()) if args.keep else None, "max_val_drop": args.max_val_drop,
                  "quick": args.quick, "work": tmp, "threads": max(1, torch.get_num_threads() // args.jobs)}
        cfg = unit_config({**common, "seed": 0, "method": "latency"})
        args.threads = cfg.export.threads
        ensure_builtin_data(cfg.data)
        latency_tables_for(tabled, cfg, Path(tmp))  # once, before anything trains
        specs = [{**common, "seed": seed, "method": method} for seed in args.seeds for method in args.methods]
        # spawn: the units' torch must not inherit this process's thread pools (the tables ran here).
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(run_unit, specs))
        training_seconds = time.perf_counter() - started
        for row in rows:
            if row["method"] != "dense":
                timed = speedup_against_base(cfg, args.base, Path(row["path"]))
                row.update(network_speedup=timed["network"]["ratio"], e2e_speedup=timed["end_to_end"]["ratio"],
                           layouts=f"{timed['network']['base_layout']} / {timed['network']['model_layout']}")
            row.pop("path")
    base = stored_metrics(args.base)
    markdown = summarise(rows, base, args)
    out = write_result(args.result, {"rows": rows, "base": {k: base.get(k) for k in ("map_voc07", "val_map_voc07")},
                                     "model": base_model(args.base),
                                     "target": args.target, "flops_target": args.flops_target,
                                     "max_layer_ratio": args.max_layer_ratio,
                                     "remove_layers": args.remove_layers,
                                     "methods": args.methods, "retrain_epochs": args.retrain_epochs,
                                     "seeds": args.seeds, "training_seconds": training_seconds,
                                     "total_seconds": time.perf_counter() - started, "markdown": markdown})
    print(f"{markdown}\n-> {out}")


if __name__ == "__main__":
    main()
