"""Other ways to a faster network than removing filters, each against a dense control trained as long.

    .venv/bin/python bench/latency_alternatives.py --base CKPT [--reference CKPT] [--epochs 3] [--seeds 0 1 2]
        [--sizes 112 96] [--remove conv1_2 conv1_2,conv2_2] [--jobs 2] [--result latency_alternatives] [--quick]

Filter pruning cannot take the default preset's network below its floors (bench/speedup.py's reach): the
128 x 128 stage costs about as much with 4 filters as with 8. Two changes that do shrink it, from one
pretrained model of the default preset (``--base``), for each seed:

- ``dense``: the base trained ``--epochs`` more epochs with the preset's retraining settings: the control
  (``unchanged`` when ``--reference`` names another model: the base is then a pruned one);
- ``input_<S>``: the same, with the model's input resized to S x S pixels (``--sizes``) for training and
  inference: every layer's work shrinks by (S / 128)^2. The default boxes are fractions of the image, so
  nothing else changes;
- ``without_<layers>``: the same, with the named convs removed (conv and BatchNorm replaced by identity;
  ``--remove``, comma-separated per variant): layer pruning. A conv can go only where its input and output
  widths agree, within a VGG stage.

Seeds change the data order and augmentation, not the base. Each model is scored on the validation and test
splits (VOC07 mAP@0.5; no choice reads test) and, once every unit has trained, its network timed against the
base's (``--reference``'s, when given: e.g. the dense model a pruned ``--base`` came from, so that layer
removal on top of filter pruning is measured against where a user starts) in ONNX Runtime at batch 32 on
one thread, the two in alternation (``latency.network_speedup``; a lower-resolution network on its own
smaller images, so the resize a deployment adds is not counted). Writes
bench/results/<--result>.json; run bench/report.py afterwards.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import markdown_rows, mean_sd, write_result  # noqa: E402

QUICK_OVERRIDES = ["data.max_images=64"]


def without_layers(model: Any, layers: list[str]) -> Any:
    """``model`` (an ssd_vgg_lite SSD, changed in place) with the backbone convs ``layers`` and their BatchNorms
    replaced by identity; each must map as many channels in as out."""
    from torch import nn

    backbone = model.backbone
    for name in layers:
        conv = getattr(backbone, name, None)
        if not isinstance(conv, nn.Conv2d):
            raise SystemExit(f"error: --remove {name}: not a conv of the backbone")
        if conv.in_channels != conv.out_channels:
            raise SystemExit(f"error: --remove {name}: {conv.in_channels} channels in, {conv.out_channels} out; "
                             "only a conv that keeps its width can be removed")
        setattr(backbone, name, nn.Identity())
        if hasattr(backbone, f"{name}_bn"):
            setattr(backbone, f"{name}_bn", nn.Identity())
    return model


def variant(spec: dict[str, Any]) -> Any:
    """The base model changed as ``spec["method"]`` says (``input_<S>``, ``without_<a+b>``; the control as it is)."""
    from compression.checkpoint import load_checkpoint

    model = load_checkpoint(spec["base"]).model
    method = spec["method"]
    if method.startswith("input_"):
        size = int(method.removeprefix("input_"))
        model.transform.fixed_size = (size, size)
    elif method.startswith("without_"):
        without_layers(model, method.removeprefix("without_").split("+"))
    return model


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from compression.config import load_config
    from compression.data.loaders import build_loader
    from compression.device import resolve_compute
    from compression.measure import task_metrics
    from compression.models import model_input_size
    from compression.train import make_objective, seed_everything, train_model

    torch.set_num_threads(spec["threads"])
    cfg = load_config("default", [f"seed={spec['seed']}", *(QUICK_OVERRIDES if spec["quick"] else [])])
    model = variant(spec)
    started = time.perf_counter()
    seed_everything(spec["seed"])
    precision = resolve_compute(cfg.compute, "cpu")
    objective = make_objective(model, "detection", fast_ssd=cfg.compute.fast_ssd, amp_bf16=precision.amp_bf16,
                               channels_last=precision.channels_last)
    loader = build_loader(cfg.data, "train", train=True, image_size=model_input_size(model)[0], seed=spec["seed"])
    optim = cfg.stages.retrain.model_copy(update={"epochs": spec["epochs"]})
    train_model(objective, loader, optim, amp_bf16=precision.amp_bf16, channels_last=precision.channels_last,
                context=f"{spec['method']}, seed {spec['seed']}", progress=False, seed=spec["seed"])
    model.eval()
    scores = {split: task_metrics(model, cfg, "detection", spec["num_classes"], split)["map_voc07"]
              for split in ("val", "test")}
    return {"method": spec["method"], "seed": spec["seed"], "metric": scores["test"], "val_metric": scores["val"],
            "input_size": model_input_size(model)[0], "wall_seconds": time.perf_counter() - started,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def summarise(rows: list[dict[str, Any]], methods: list[str], epochs: int) -> str:
    columns = ("method", "seed", "input_size", "metric", "val_metric", "network_speedup")
    lines = markdown_rows(sorted(rows, key=lambda r: (methods.index(r["method"]), r["seed"])), columns)
    control = methods[0]  # "dense", or "unchanged" for a pruned base
    reference = "base" if control == "dense" else "reference"
    dense = {r["seed"]: r for r in rows if r["method"] == control}
    lines += ["", f"- every model trained {epochs} epochs from the base with the default preset's retraining "
                  f"settings; mAP: test VOC07 (validation in its own column)"]
    if dense:
        lines.append(f"- {control} control: test mAP {mean_sd([r['metric'] for r in dense.values()])}"
                     + (f", network {mean_sd([r.get('network_speedup') for r in dense.values()], digits=2)}x faster "
                        "than the reference" if control != "dense" else ""))
    for method in methods[1:]:
        ours = [r for r in rows if r["method"] == method]
        gaps = [dense[r["seed"]]["metric"] - r["metric"] for r in ours if r["seed"] in dense]
        lines.append(f"- {method}: test mAP {mean_sd([r['metric'] for r in ours])}, network "
                     f"{mean_sd([r.get('network_speedup') for r in ours], digits=2)}x faster than the {reference}; "
                     f"{control} control minus it, same seed: {mean_sd(gaps, 100, 2)} points")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the default preset's pretrained checkpoint")
    parser.add_argument("--reference", type=Path, default=None,
                        help="time every network against this model instead (the dense one a pruned --base came from)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of every unit (the preset retrains 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="*", default=[112, 96], help="input sides to try (pixels)")
    parser.add_argument("--remove", nargs="*", default=["conv1_2", "conv1_2,conv2_2"],
                        help="convs to remove, comma-separated per variant")
    parser.add_argument("--jobs", type=int, default=2, help="units in parallel, one process each")
    parser.add_argument("--result", default="latency_alternatives")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 images, one seed (<result>.quick.json)")
    args = parser.parse_args()

    import torch

    from compression.checkpoint import load_checkpoint
    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from compression.latency import network_speedup
    from tasks.env import apply_env_defaults

    apply_env_defaults()
    for flag, path in (("--base", args.base), ("--reference", args.reference)):
        if path is not None and not path.is_file():
            sys.exit(f"error: {flag} {path}: no such checkpoint")
    if any(not 32 <= size <= 1024 for size in args.sizes):
        sys.exit(f"error: --sizes {args.sizes}: each must be between 32 and 1024 pixels")
    if args.quick:  # a smoke run never replaces a measurement
        args.seeds, args.result = args.seeds[:1], f"{args.result}.quick"
    methods = ["unchanged" if args.reference else "dense", *(f"input_{size}" for size in args.sizes),
               *(f"without_{'+'.join(v.split(','))}" for v in args.remove)]
    base = load_checkpoint(args.base)
    reference = load_checkpoint(args.reference).model if args.reference else base.model
    for method in methods:  # bad --remove names fail here, before anything trains
        variant({"base": str(args.base), "method": method})
    cfg = load_config("default", QUICK_OVERRIDES if args.quick else [])
    ensure_builtin_data(cfg.data)
    started = time.perf_counter()
    common = {"base": str(args.base.resolve()), "epochs": args.epochs, "quick": args.quick,
              "num_classes": len(base.class_names),
              "threads": max(1, torch.get_num_threads() // args.jobs)}
    specs = [{**common, "seed": seed, "method": method} for seed in args.seeds for method in methods]
    # spawn: each unit's torch starts with its own thread pool.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        rows = list(pool.map(run_unit, specs))
    training_seconds = time.perf_counter() - started
    # Timed after training, nothing else running, each network in alternation with the reference's.
    for row in rows:
        weights = row.pop("weights")
        if row["method"] == "dense":  # the reference itself
            continue
        model = variant({"base": str(args.base), "method": row["method"]})
        model.load_state_dict(weights)
        timed = network_speedup(reference, model.eval(), batch_size=32, threads=cfg.export.threads,
                                rounds=3 if args.quick else 5)
        row.update(network_speedup=timed["ratio"], network_ms=timed["model_ms"], base_network_ms=timed["base_ms"])
    markdown = summarise(rows, methods, args.epochs)
    out = write_result(args.result, {"rows": rows, "methods": methods, "epochs": args.epochs, "seeds": args.seeds,
                                     "threads": cfg.export.threads, "training_seconds": training_seconds,
                                     "total_seconds": time.perf_counter() - started, "markdown": markdown})
    print(f"{markdown}\n-> {out}")


if __name__ == "__main__":
    main()
