"""Real speedup of pruned detectors in their deployment runtimes: dense vs FLOPs-targeted vs latency-targeted.

    .venv/bin/python bench/speedup.py --quick        # smoke test: built models, 1 warm-up, 2 runs (not a measurement)
    .venv/bin/python bench/speedup.py                # built models (random weights, no mAP), a few minutes
    .venv/bin/python bench/speedup.py --dense BASE --flops-target A --latency-target B   # trained checkpoints
    .venv/bin/python bench/speedup.py --dense BASE --latency-target B                    # without a FLOPs model
    .venv/bin/python bench/speedup.py --set compute.use_gpu=true ...                   # adds the GPU table
    .venv/bin/python bench/speedup.py ... --result speedup_w025                          # bench/results/<name>.json

Three models of one SSD, each end to end (pre-processing, network, post-processing with the checkpoint's
``export.score_threshold`` / ``export.pre_nms_top_k``) on the first B images of the config's test split,
as one prepared (B, 3, H, W) batch, in three runtimes:

- ``torch_eager``: ``ssd_fast.ssd_detect`` on the model as trained (NCHW, BatchNorm unfolded);
- ``torch_channels_last``: the deployment graph in PyTorch (``export.fold_batchnorm``, channels-last);
- ``onnxruntime``: the ONNX export (``export.export_onnx``) in ONNX Runtime (``export.onnx_detect``), with
  the same batched post-processing;

at batch 1 and 32 with 1 and 2 threads (median of warmed runs), and with ``compute.use_gpu`` also
``torch_cuda`` (the deployment graph, channels-last, on the GPU; CUDA-synchronised).

Real images, not noise: post-processing costs what the boxes above the score threshold cost, and a weak
detector fed noise sends several times more of them to NMS than on the images it was trained for (a
latency-targeted model measured 49 ms end to end on noise against 31 ms on test images, batch 32).
One thread is timed on the calling thread's CPU clock (``metrics.timing_clock``: both runtimes and the
post-processing compute in that thread), so a busy machine does not inflate it; several threads and the GPU
on the wall clock.

Without checkpoints the models are built here from the config's model (random weights, seed 0; their flat
scores send the most boxes to NMS: a worst case for post-processing) and pruned by ``l1_norm`` without
retraining: ``flops_target`` to ``--flops-ratio`` (``criteria.select_by_flops``), ``latency_target`` to
``--latency-ratio`` of the network's predicted latency (``criteria.select_by_latency`` on a latency table of
this machine, ONNX Runtime at batch 32, kept in bench/checkpoints/). Their mAP is not measured (None).
With checkpoints, mAP is the checkpoint's stored test-split ``map_voc07``.

Rows (bench/results/speedup.json, ``rows``): ``{"model", "runtime", "batch", "threads", "e2e_ms", "map_voc07",
"flops_ratio", "device", "speedup", "speedup_vs_dense_eager"}`` (speedup: the dense model's e2e_ms in the same
runtime, batch and threads / this one's; speedup_vs_dense_eager: the dense model's in ``torch_eager`` at that
batch and threads / this one's, CPU rows), and for ``onnxruntime`` the ``layout`` each model's export runs in (the faster of
blocked NCHWc and plain NCHW for that model, ``export.export_onnx``). bench/results/speedup.png plots latency (batch 32) against mAP, or against the FLOPs
ratio without mAP. ``--quick`` writes speedup_quick.json / .png instead, so a smoke test never replaces a
measurement. Run bench/report.py after a full run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._common import CHECKPOINTS, RESULTS, plot, write_result  # noqa: E402
from compression.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from compression.config import PipelineConfig, load_config  # noqa: E402
from compression.data.loaders import ensure_builtin_data  # noqa: E402
from compression.device import default_device  # noqa: E402
from compression.errors import PrunepipeError  # noqa: E402
from compression.measure import split_images  # noqa: E402
from compression.metrics import count_flops, timed_runs_ms, timing_clock  # noqa: E402
from compression.models import apply_postprocess_settings, build_model, model_input_size, prunable_layers  # noqa: E402

MODELS = ("dense", "flops_target", "latency_target")
CPU_RUNTIMES = ("torch_eager", "torch_channels_last", "onnxruntime")


# --------------------------------------------------------------------------------------------
# Models


def _num_classes(cfg: PipelineConfig) -> int:
    from compression.config import class_names

    return len(class_names(cfg.data)) + 1


def built_models(cfg: PipelineConfig, flops_ratio: float, latency_ratio: float, quick: bool,
                 table_path: Path = CHECKPOINTS / "latency_table.json") -> dict[str, Checkpoint]:
    """The config's model with random weights, and two l1_norm-pruned copies (see the module docstring); the
    latency table is read from (or measured into) ``table_path``."""
    from compression.criteria import rank_filters, select_by_flops, select_by_latency
    from compression.export import layouts_of
    from compression.latency import fastest_prediction, load_or_measure, model_widths
    from compression.pruning import build_dependency_graph, prune_filters, resolve_layers

    name = cfg.model.name
    options = {k: v for k, v in (("width_mult", cfg.model.width_mult), ("image_size", cfg.model.image_size))
               if v is not None}
    args = {"num_classes": _num_classes(cfg), **options}
    torch.manual_seed(0)
    dense = build_model(name, **args).eval()
    classes = [str(i) for i in range(args["num_classes"] - 1)]

    def pruned(select: Callable[[nn.Module, dict[str, list[float]], Any], tuple[dict, dict]]) -> nn.Module:
        model = copy.deepcopy(dense)
        dg = build_dependency_graph(model)
        layers = resolve_layers(model, name, prunable_layers(name, model), dg=dg)
        selection, _ = select(model, rank_filters("l1_norm", model, dg, layers), dg)
        return prune_filters(model, selection, dg=dg).eval()

    settings = {"min_channels": cfg.stages.selection.min_channels, "max_layer_ratio": 0.75}
    flops = pruned(lambda m, scores, dg: select_by_flops(m, scores, flops_ratio, dg=dg, **settings))
    table_path.parent.mkdir(parents=True, exist_ok=True)
    # The config's layouts measured together (as dense_tables reads them); the cut is planned in the table
    # of the layout the dense network runs fastest in.
    tables = load_or_measure(table_path, dense, name, layouts=layouts_of(cfg.export.onnxruntime_layout),
                             batch_size=cfg.export.batch_size, threads=cfg.export.threads,
                             grid_step=cfg.export.grid_step, warmup=1 if quick else 2, runs=2 if quick else 5)
    table = tables[fastest_prediction(tables, model_widths(dense, name))[0]]
    latency = pruned(lambda m, scores, _dg: select_by_latency(m, scores, latency_ratio, table, model_name=name,
                                                                 **settings))
    return {label: Checkpoint(model=model, model_name=name, model_args=args, class_names=classes)
            for label, model in zip(MODELS, (dense, flops, latency), strict=True)}


def checkpoint_models(paths: dict[str, Path]) -> dict[str, Checkpoint]:
    models = {label: load_checkpoint(path) for label, path in paths.items()}
    names = {ckpt.model_name for ckpt in models.values()}
    if len(names) != 1:
        raise PrunepipeError(f"the checkpoints hold different models ({', '.join(sorted(names))}); compare one family")
    if models["dense"].task != "detection":
        raise PrunepipeError(f"{paths['dense']}: a classifier; this benchmark compares detectors")
    return models


# --------------------------------------------------------------------------------------------
# The latency table's prediction


def dense_tables(dense: Checkpoint, cfg: PipelineConfig, table_path: Path, warmup: int,
                 runs: int) -> dict[str, Any]:
    """The dense model's latency tables in ``table_path``, measured there once (one per ONNX Runtime layout
    with ``export.onnxruntime_layout: auto``, together), keyed by layout."""
    from compression.export import layouts_of
    from compression.latency import load_or_measure

    table_path.parent.mkdir(parents=True, exist_ok=True)
    return load_or_measure(table_path, dense.model, dense.model_name,
                           layouts=layouts_of(cfg.export.onnxruntime_layout), grid_step=cfg.export.grid_step,
                           warmup=warmup, runs=runs, batch_size=cfg.export.batch_size, threads=cfg.export.threads)


def prediction_rows(models: dict[str, Checkpoint], cfg: PipelineConfig, table_path: Path, warmup: int,
                    runs: int) -> list[dict[str, Any]]:
    """Each model's network time as the dense model's latency tables predict it (in the layout they predict
    fastest, ``latency.fastest_prediction``; one table per ONNX Runtime layout with
    ``export.onnxruntime_layout: auto``), and as measured in the same runtime, batch, threads and clock, in
    the layout it runs fastest in (``latency.measure_network_ms``). A model that lost whole convs is
    predicted in the tables of the dense model without them (``stages.with_layers_of``, measured once)."""
    from compression.latency import fastest_prediction, measure_network_ms, model_widths
    from compression.stages import with_layers_of

    settings = {"batch_size": cfg.export.batch_size, "threads": cfg.export.threads}
    rows = []
    for label, ckpt in models.items():
        tables = dense_tables(with_layers_of(models["dense"], ckpt), cfg, table_path, warmup, runs)
        layouts = tuple(tables)
        fingerprint = next(iter(tables.values())).fingerprint
        predicted_layout, predicted = fastest_prediction(tables, model_widths(ckpt.model, ckpt.model_name))
        timed = {layout: measure_network_ms(ckpt.model, warmup=warmup, runs=runs, layout=layout, **settings)
                 for layout in layouts}
        layout = min(timed, key=timed.__getitem__)
        rows.append({"model": label, "runtime": fingerprint["runtime"], **settings, "clock": fingerprint["clock"],
                     "predicted_ms": predicted, "predicted_layout": predicted_layout, "measured_ms": timed[layout],
                     "layout": layout, "error": predicted / timed[layout] - 1})
    return rows


def reach_row(models: dict[str, Checkpoint], cfg: PipelineConfig, table_path: Path, warmup: int, runs: int,
              max_layer_ratio: float = 0.875) -> dict[str, Any]:
    """How far filter pruning alone can take this network on this device: the dense model's latency tables'
    prediction with every prunable layer at its floor (``selection.layer_floor``: ``min_channels``, and
    ``max_layer_ratio`` as the latency runs set it), against their prediction of the dense network. Layers
    whose time does not shrink with their width (conv1_1 reads a 3-channel full-resolution input) bound it."""
    from compression.latency import fastest_prediction, model_widths
    from compression.selection import layer_floor

    dense = models["dense"]
    tables = dense_tables(dense, cfg, table_path, warmup, runs)
    widths = model_widths(dense.model, dense.model_name)
    floors = {name: layer_floor(n, cfg.stages.selection.min_channels, max_layer_ratio) for name, n in widths.items()}
    _, dense_ms = fastest_prediction(tables, widths)
    layout, floor_ms = fastest_prediction(tables, floors)
    return {"dense_ms": dense_ms, "floor_ms": floor_ms, "layout": layout, "speedup": dense_ms / floor_ms,
            "min_channels": cfg.stages.selection.min_channels, "max_layer_ratio": max_layer_ratio, "floors": floors}


# --------------------------------------------------------------------------------------------
# Timing


def bench_devices(use_gpu: bool) -> list[torch.device]:
    """The CPU, and with ``use_gpu`` the GPU (``compute.use_gpu``; one-line StageError when none is visible)."""
    devices = [torch.device("cpu")]
    if use_gpu:
        devices.append(default_device(True))
    return devices


def _median_ms(forward: Callable[[], Any], warmup: int, runs: int, device: torch.device, threads: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        times = timed_runs_ms(forward, warmup=warmup, runs=runs, clock=timing_clock(threads, device.type), sync=sync)
    return float(statistics.median(times))


class Runners:
    """The e2e forward of one model in each runtime, built once (the ONNX export and sessions included)."""

    def __init__(self, ckpt: Checkpoint, folder: Path, label: str):
        from compression.export import export_onnx, fold_batchnorm, read_sidecar

        self.model = ckpt.model.cpu().float().eval()
        self.nhwc = fold_batchnorm(self.model).to(memory_format=torch.channels_last)
        path = save_checkpoint(ckpt, folder / f"{label}.safetensors")
        self.onnx_path = Path(export_onnx(path, folder / f"{label}.onnx")["files"]["onnx"])
        self.sidecar, self.anchors = read_sidecar(self.onnx_path)
        self.sessions: dict[int, Any] = {}
        self.gpu: nn.Module | None = None

    def forward(self, runtime: str, batch: torch.Tensor, threads: int) -> Callable[[], Any]:
        from compression.export import onnx_detect, onnx_session
        from compression.ssd_fast import ssd_detect

        if runtime == "torch_eager":
            return lambda: ssd_detect(self.model, batch)
        if runtime == "torch_channels_last":
            return lambda: ssd_detect(self.nhwc, batch, channels_last=True)
        if runtime == "onnxruntime":
            session = self.sessions.setdefault(threads, onnx_session(self.onnx_path, threads))
            anchors = self.anchors
            return lambda: onnx_detect(session, self.sidecar, anchors, batch)
        if runtime == "torch_cuda":
            if self.gpu is None:
                self.gpu = self.nhwc.to("cuda")
            on_gpu = batch.to("cuda")
            return lambda: ssd_detect(self.gpu, on_gpu, channels_last=True)
        raise ValueError(f"unknown runtime {runtime!r}")


def measure_rows(models: dict[str, Checkpoint], devices: list[torch.device], batches: list[int], threads: list[int],
                 warmup: int, runs: int, cfg: PipelineConfig) -> list[dict[str, Any]]:
    rows = []
    size = model_input_size(models["dense"].model)
    images = split_images(cfg, max(batches), size)
    base_flops = count_flops(models["dense"].model, size)
    with tempfile.TemporaryDirectory(prefix="speedup-") as folder:
        for label, ckpt in models.items():
            runners = Runners(ckpt, Path(folder), label)
            flops_ratio = base_flops / count_flops(ckpt.model, size)
            plan = [(runtime, count) for runtime in CPU_RUNTIMES for count in threads]
            if any(d.type == "cuda" for d in devices):
                plan.append(("torch_cuda", None))
            for runtime, count in plan:
                for batch_size in batches:
                    batch = images[:batch_size].contiguous()
                    previous = torch.get_num_threads()
                    torch.set_num_threads(count or previous)
                    try:
                        ms = _median_ms(runners.forward(runtime, batch, count or 1), warmup, runs,
                                        torch.device("cuda" if runtime == "torch_cuda" else "cpu"), count or 1)
                    finally:
                        torch.set_num_threads(previous)
                    rows.append({"model": label, "runtime": runtime, "batch": batch_size, "threads": count,
                                 "e2e_ms": ms, "map_voc07": ckpt.metrics.get("map_voc07"), "flops_ratio": flops_ratio,
                                 "device": "cuda" if runtime == "torch_cuda" else "cpu"})
                    if runtime == "onnxruntime":  # the layout its export recorded (export.exported_layout)
                        rows[-1]["layout"] = runners.sidecar["onnxruntime"]["layout"]
                    print(f"{label} {runtime} batch {batch_size} threads {count or '-'}: {ms:.1f} ms", flush=True)
    dense = {(r["runtime"], r["batch"], r["threads"]): r["e2e_ms"] for r in rows if r["model"] == "dense"}
    for row in rows:
        row["speedup"] = dense[(row["runtime"], row["batch"], row["threads"])] / row["e2e_ms"]
        # What a user starts from: the dense model as trained, in PyTorch eager on the same CPU threads.
        eager = dense.get(("torch_eager", row["batch"], row["threads"]))
        row["speedup_vs_dense_eager"] = eager / row["e2e_ms"] if eager and row["device"] == "cpu" else None
    return rows


# --------------------------------------------------------------------------------------------
# Report


def markdown(rows: list[dict[str, Any]], notes: str) -> str:
    head = ("| model | runtime | device | batch | threads | e2e ms | speedup vs dense | vs dense in torch_eager | "
            "FLOPs ratio | mAP VOC07 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["device"], r["batch"], r["threads"] or 0, r["runtime"], MODELS.index(r["model"]))):
        mean_ap = "-" if r["map_voc07"] is None else f"{r['map_voc07']:.4f}"
        eager = "-" if r.get("speedup_vs_dense_eager") is None else f"{r['speedup_vs_dense_eager']:.2f}"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['device']} | {r['batch']} | {r['threads'] or '-'} | "
                     f"{r['e2e_ms']:.1f} | {r['speedup']:.2f} | {eager} | {r['flops_ratio']:.2f} | {mean_ap} |")
    return "\n".join([*lines, "", notes])


def prediction_markdown(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [f"The latency table's prediction of each network (without pre- and post-processing), against its "
             f"measured time: {first['runtime']}, batch {first['batch_size']}, {first['threads']} thread(s), "
             f"{first['clock']} clock, fastest of the runs.", "",
             "| model | predicted ms | predicted layout | measured ms | measured layout | error |",
             "|---|---|---|---|---|---|"]
    # Rows written before the layout was chosen per model ran blocked NCHWc, ONNX Runtime's default.
    lines += [f"| {r['model']} | {r['predicted_ms']:.2f} | {r.get('predicted_layout', 'nchwc')} | {r['measured_ms']:.2f} "
              f"| {r.get('layout', 'nchwc')} | {100 * r['error']:+.1f}% |" for r in rows]
    return "\n".join(lines)


def reach_markdown(reach: dict[str, Any]) -> str:
    return (f"What filter pruning alone can reach here: the same tables predict the dense network at "
            f"{reach['dense_ms']:.2f} ms and, with every prunable layer at its floor ({reach['min_channels']} "
            f"filters, or {1 - reach['max_layer_ratio']:g} of the layer), at {reach['floor_ms']:.2f} ms "
            f"({reach['layout']}): at most {reach['speedup']:.2f}x faster, whatever the accuracy.")


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency at batch 32 (one thread; the GPU's own) against mAP, or the FLOPs ratio when mAP is unknown."""
    with_map = all(r["map_voc07"] is not None for r in rows)
    with plot(path, xlabel="end-to-end latency, batch 32, 1 thread (ms)",
              ylabel="mAP VOC07 (test)" if with_map else "FLOPs ratio (no mAP: random weights)",
              title="Latency vs " + ("mAP" if with_map else "FLOPs ratio") + ": "
                    + ", ".join(dict.fromkeys(r["model"] for r in rows)),
              size=(6.4, 4.0)) as ax:
        for runtime in sorted({r["runtime"] for r in rows}):
            points = [r for r in rows if r["runtime"] == runtime and r["batch"] == 32 and r["threads"] in (1, None)]
            points.sort(key=lambda r: r["e2e_ms"])
            xs = [r["e2e_ms"] for r in points]
            ys = [r["map_voc07"] if with_map else r["flops_ratio"] for r in points]
            ax.plot(xs, ys, "-o", label=runtime, markersize=4)
            for r, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(r["model"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="preset or YAML (the model, export.* and compute.use_gpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY.PATH=VALUE override")
    parser.add_argument("--dense", type=Path, help="trained dense checkpoint (with the two targets below)")
    parser.add_argument("--flops-target", type=Path, help="checkpoint pruned with target_flops_ratio (optional)")
    parser.add_argument("--latency-target", type=Path, help="checkpoint pruned with target_latency_ratio")
    parser.add_argument("--flops-ratio", type=float, default=4.4, help="built models: the FLOPs target")
    parser.add_argument("--latency-ratio", type=float, default=2.5, help="built models: the latency target")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 2 timed runs, batch 1 and 8")
    parser.add_argument("--result", default="speedup", help="bench/results/<name>.json and .png")
    args = parser.parse_args()
    given = {"dense": args.dense, "flops_target": args.flops_target, "latency_target": args.latency_target}
    if any(given.values()) and not (args.dense and args.latency_target):
        parser.error("give --dense and --latency-target (and --flops-target if you have one), or none")
    given = {label: path for label, path in given.items() if path}
    warmup, runs = (1, 2) if args.quick else (args.warmup, args.runs)
    batches = [1, 8] if args.quick else args.batches
    try:
        cfg = load_config(args.config, args.overrides)
        ensure_builtin_data(cfg.data)  # the models are timed on the test split's images
        devices = bench_devices(cfg.compute.use_gpu)
        if given:
            models = checkpoint_models(given)
        else:
            models = built_models(cfg, args.flops_ratio, args.latency_ratio, args.quick)
            for ckpt in models.values():
                apply_postprocess_settings(ckpt.model, {"score_threshold": cfg.export.score_threshold,
                                                        "pre_nms_top_k": cfg.export.pre_nms_top_k})
        rows = measure_rows(models, devices, batches, args.threads, warmup, runs, cfg)
        table_path = CHECKPOINTS / ("latency_table_quick.json" if args.quick else "latency_table.json")
        prediction = prediction_rows(models, cfg, table_path, warmup, runs)
        reach = reach_row(models, cfg, table_path, warmup, runs)
    except PrunepipeError as exc:
        sys.exit(f"error: {exc}")
    name = f"{args.result}_quick" if args.quick else args.result
    weights = "the checkpoints given" if given else "random weights, pruned without retraining (built here)"
    notes = (f"Models: {weights}. {'SMOKE TEST (--quick): not a measurement. ' if args.quick else ''}"
             f"Median of {runs} runs after {warmup} warm-up(s); e2e = pre-processing, network and post-processing "
             "of the test split's first images as one prepared batch at the model's input size; one thread on the "
             "thread's CPU clock, two on the wall clock.")
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure(rows, png)
    table = markdown(rows, notes) + "\n\n" + prediction_markdown(prediction) + "\n\n" + reach_markdown(reach)
    out = write_result(name, {
        "quick": args.quick,
        "settings": {"batches": batches, "threads": args.threads, "warmup": warmup, "runs": runs, "weights": weights,
                     "devices": [str(d) for d in devices], "flops_ratio_target": args.flops_ratio,
                     "latency_ratio_target": args.latency_ratio, "config": args.config, "overrides": args.overrides},
        "rows": rows,
        "prediction": prediction,
        "reach": reach,
        "figure": str(png.relative_to(RESULTS.parent.parent)),
        "markdown": table + f"\n\n![latency vs accuracy](bench/results/{png.name})",
    })
    print(table)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
