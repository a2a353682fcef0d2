"""Real CPU speedup of pruned models: latency of dense vs pruned next to the FLOPs ratio.

    .venv/bin/python bench/speedup.py                       # built models (random weights), ~10 min
    .venv/bin/python bench/speedup.py --checkpoints base.safetensors pruned1.safetensors ...
    .venv/bin/python bench/speedup.py --quick               # smoke test: fewer runs

Without ``--checkpoints`` it builds ssd_vgg_lite (default options) and vgg16_cifar (width 1.0), each dense
and uniformly pruned at 0.5 and 0.75 of every prunable layer (l1_norm per layer, ``select_by_ratio`` +
``prune_filters``). Their weights are random: latency does not depend on the values, except that an
untrained SSD's flat scores send many candidates to NMS (post-processing costs about what a trained
model's does at score_thresh 0.01, but pass trained checkpoints to be sure). With ``--checkpoints`` the
first file is the dense base of the others.

For every model: FLOPs (``metrics.count_flops``, 2 per MAC), params, and the median latency of warmed runs
at batch 1 and 32 with 1 and 2 threads of

- ``network``: backbone + head (SSD) or the classifier, on an already prepared batch;
- ``e2e``: prunepipe's path, ``ssd_fast.ssd_detect`` on a (B, 3, H, W) batch (pre-processing, network,
  batched post-processing); classifiers: the network;
- ``e2e_channels_last``: ``e2e`` with the model and the batch in channels-last (NHWC) tensors;
- ``e2e_torchvision`` (SSD only): torchvision's ``model(list_of_images)``, image by image around the network.

Speedup = dense latency / latency; efficiency = speedup / FLOPs ratio (target: >= 0.8 at batch 32, e2e).
A ``torch.profiler`` run of ``e2e`` at batch 32 (1 thread) splits the time into preprocess / backbone /
head / postprocess and lists the costliest ops. Writes bench/results/speedup.json (with a ``markdown``
table and an ``analysis``) and bench/results/speedup.png (latency vs FLOPs); run bench/report.py after.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torchvision.models.detection.ssd import SSD  # noqa: E402

from bench._common import RESULTS, write_result  # noqa: E402
from compression.checkpoint import load_checkpoint  # noqa: E402
from compression.criteria import rank_filters, select_by_ratio  # noqa: E402
from compression.errors import PrunepipeError  # noqa: E402
from compression.metrics import count_flops, count_parameters, measure_latency  # noqa: E402
from compression.models import build_model, model_input_size, model_task, prunable_layers  # noqa: E402
from compression.pruning import build_dependency_graph, prune_filters, resolve_layers  # noqa: E402
from compression.ssd_fast import default_boxes, postprocess_batched, preprocess_batch, ssd_detect  # noqa: E402

TARGET_EFFICIENCY = 0.8
STAGES = ("preprocess", "backbone", "head", "postprocess")
BUILT = {"ssd_vgg_lite": {"num_classes": 11}, "vgg16_cifar": {"num_classes": 10, "width_mult": 1.0}}


# --------------------------------------------------------------------------------------------
# Models


def _pruned_copy(model: nn.Module, model_name: str, ratio: float) -> nn.Module:
    """``model`` with ``ratio`` of every prunable layer's filters removed (lowest L1 norm per layer)."""
    pruned = copy.deepcopy(model)
    dg = build_dependency_graph(pruned)
    layers = resolve_layers(pruned, model_name, prunable_layers(model_name), dg=dg)
    selection = select_by_ratio(rank_filters("l1_norm", pruned, dg, layers), ratio)
    return prune_filters(pruned, selection, dg=dg)


def built_models(ratios: list[float]) -> list[dict[str, Any]]:
    entries = []
    for model_name, options in BUILT.items():
        torch.manual_seed(0)
        dense = build_model(model_name, **options).eval()
        entries.append({"label": f"{model_name} dense", "model_name": model_name, "base": True, "model": dense})
        for ratio in ratios:
            entries.append({"label": f"{model_name} pruned {ratio:g}", "model_name": model_name, "base": False,
                            "model": _pruned_copy(dense, model_name, ratio).eval()})
    return entries


def checkpoint_models(paths: list[Path]) -> list[dict[str, Any]]:
    entries = []
    for index, path in enumerate(paths):
        ckpt = load_checkpoint(path)
        if index and ckpt.model_name != entries[0]["model_name"]:
            raise PrunepipeError(f"{path}: a {ckpt.model_name!r} model, but the base {paths[0]} is "
                                 f"{entries[0]['model_name']!r}; compare one family per run")
        entries.append({"label": path.stem, "model_name": ckpt.model_name, "base": index == 0,
                        "model": ckpt.model.cpu().float().eval()})
    return entries


# --------------------------------------------------------------------------------------------
# Timing


def _batch(batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    # The same images metrics.measure_latency times.
    return torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))


def _median_ms(forward: Callable[[], Any], threads: int, warmup: int, runs: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for _ in range(warmup):
                forward()
            for _ in range(runs):
                start = time.perf_counter()
                forward()
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return float(statistics.median(times))


def latencies(model: nn.Module, nhwc: nn.Module, batch_size: int, threads: int, warmup: int,
              runs: int) -> dict[str, float]:
    """Median ms per path (see the module docstring) for one batch size and thread count.

    ``nhwc``: ``model`` converted to channels-last, for the ``e2e_channels_last`` path.
    """
    size = model_input_size(model)
    timing = {"warmup": warmup, "runs": runs, "threads": threads}
    batch = _batch(batch_size, size)
    if not isinstance(model, SSD):
        network = measure_latency(model, size, batch_size, **timing)["median_ms"]
        batch_nhwc = batch.contiguous(memory_format=torch.channels_last)
        channels_last = _median_ms(lambda: nhwc(batch_nhwc), threads, warmup, runs)
        return {"network": network, "e2e": network, "e2e_channels_last": channels_last}
    return {
        "network": measure_latency(model, size, batch_size, network_only=True, **timing)["median_ms"],
        "e2e": _median_ms(lambda: ssd_detect(model, batch), threads, warmup, runs),
        "e2e_channels_last": _median_ms(lambda: ssd_detect(nhwc, batch, channels_last=True), threads, warmup, runs),
        "e2e_torchvision": measure_latency(model, size, batch_size, **timing)["median_ms"],
    }


def profile_e2e(model: nn.Module, batch_size: int, runs: int) -> dict[str, Any]:
    """torch.profiler split of the e2e path (1 thread): ms per stage per batch, shares, the top ops."""
    size = model_input_size(model)
    batch = _batch(batch_size, size)
    is_ssd = isinstance(model, SSD)

    def step() -> None:
        if not is_ssd:
            with record_function("backbone"):
                model(batch)
            return
        with record_function("preprocess"):
            prepared, original_sizes = preprocess_batch(model, batch)
        with record_function("backbone"):
            features = list(model.backbone(prepared).values())
        with record_function("head"):
            outputs = model.head(features)
        with record_function("postprocess"):
            anchors = default_boxes(model, prepared.shape[-2:], [f.shape[-2:] for f in features], prepared.device)
            postprocess_batched(model, outputs, anchors, tuple(prepared.shape[-2:]), original_sizes)

    candidates = cap = None
    if is_ssd:
        # Boxes that enter NMS per image (what post-processing costs scale with; random weights vary it).
        with torch.inference_mode():
            prepared, _ = preprocess_batch(model, batch)
            logits = model.head(list(model.backbone(prepared).values()))["cls_logits"]
            above = (logits.float().softmax(-1)[..., 1:] > model.score_thresh).sum(1)
            candidates = float(above.clamp(max=model.topk_candidates).sum(-1).float().mean())
            cap = (logits.shape[-1] - 1) * model.topk_candidates

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            step()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    step()
    finally:
        torch.set_num_threads(previous)
    events = prof.key_averages()
    stage_ms = {e.key: e.cpu_time_total / 1000.0 / runs for e in events if e.key in STAGES}
    total = sum(stage_ms.values())
    ops = sorted((e for e in events if e.key not in STAGES), key=lambda e: e.self_cpu_time_total, reverse=True)
    self_total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {
        "stage_ms": stage_ms,
        "shares": {k: v / total for k, v in stage_ms.items()},
        "top_ops": [{"op": e.key, "share": e.self_cpu_time_total / self_total} for e in ops[:6]],
        "nms_candidates_per_image": candidates,
        "nms_candidates_cap": cap,
    }


def layer_times(model: nn.Module, batch_size: int, warmup: int, runs: int) -> list[dict[str, Any]]:
    """Each conv and max-pool timed alone on the input it gets in the network (batch ``batch_size``, 1 thread).

    Says which layers the time is in and how many GFLOP/s each one runs at, which FLOPs alone do not:
    a layer with a few channels at high resolution is bound by memory traffic, not arithmetic.
    """
    size = model_input_size(model)
    batch = _batch(batch_size, size)
    captured: dict[str, torch.Tensor] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))}
    def keep_input(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:  # None: the output stays
            captured.setdefault(name, args[0].clone())
        return hook

    hooks = [m.register_forward_hook(keep_input(name)) for name, m in modules.items()]
    try:
        with torch.inference_mode():
            if isinstance(model, SSD):
                prepared, _ = preprocess_batch(model, batch)
                model.head(list(model.backbone(prepared).values()))
            else:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for name, module in modules.items():
        if name not in captured:
            continue
        x = captured[name]
        with torch.inference_mode():
            out = module(x)
        flops = 0
        if isinstance(module, nn.Conv2d):  # 2 per multiply-add, as metrics.count_flops
            kh, kw = module.kernel_size
            flops = 2 * out[0].numel() * (module.in_channels // module.groups) * kh * kw
        ms = _median_ms(lambda module=module, x=x: module(x), 1, warmup, runs)
        rows.append({"layer": name, "kind": type(module).__name__, "in_channels": int(x.shape[1]),
                     "out_channels": int(out.shape[1]), "hw": list(out.shape[-2:]), "flops_per_image": flops,
                     "ms": ms, "gflops_per_s": flops * batch_size / (ms / 1000) / 1e9 if flops else None})
    return rows


# --------------------------------------------------------------------------------------------
# Report


def _key(batch_size: int, threads: int) -> str:
    return f"b{batch_size}_t{threads}"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = None
    for row in rows:
        if row["base"] or base is None or row["model_name"] != base["model_name"]:
            base = row
        row["base_label"] = base["label"]
        row["flops_ratio"] = base["flops"] / row["flops"]
        row["speedup"], row["efficiency"] = {}, {}
        for key, paths in row["latency_ms"].items():
            row["speedup"][key] = {p: base["latency_ms"][key][p] / ms for p, ms in paths.items()}
            row["efficiency"][key] = {p: s / row["flops_ratio"] for p, s in row["speedup"][key].items()}


def markdown(rows: list[dict[str, Any]], batches: list[int], threads: list[int], notes: str) -> str:
    head = ("| model | GFLOPs | params (M) | FLOPs ratio | batch | threads | network ms | e2e ms | e2e channels-last ms | "
            "e2e torchvision ms | speedup network / e2e / channels-last / torchvision | "
            "speedup ÷ FLOPs ratio (e2e / channels-last) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        for batch_size in batches:
            for count in threads:
                key = _key(batch_size, count)
                ms, up = row["latency_ms"][key], row["speedup"][key]
                tv = f"{ms['e2e_torchvision']:.1f}" if "e2e_torchvision" in ms else "-"
                ups = " / ".join(f"{up[p]:.2f}" for p in ("network", "e2e", "e2e_channels_last", "e2e_torchvision")
                                 if p in up)
                effs = []
                for path in ("e2e", "e2e_channels_last"):
                    eff = row["efficiency"][key][path]
                    mark = ""
                    if batch_size == 32 and not row["base"]:
                        mark = " ✓" if eff >= TARGET_EFFICIENCY else " ✗"
                    effs.append(f"{eff:.2f}{mark}")
                lines.append(
                    f"| {row['label']} | {row['flops'] / 1e9:.3f} | {row['params'] / 1e6:.2f} | "
                    f"{row['flops_ratio']:.2f} | {batch_size} | {count} | {ms['network']:.1f} | {ms['e2e']:.1f} | "
                    f"{ms['e2e_channels_last']:.1f} | {tv} | {ups} | {' / '.join(effs)} |"
                )
    prof_head = "| model | " + " | ".join(STAGES) + " | NMS candidates / image | costliest ops (self CPU share) |"
    prof_lines = [prof_head, "|" + "---|" * (prof_head.count("|") - 1)]
    for row in rows:
        profile_ = row["profile_b32"]
        shares = " | ".join(
            f"{profile_['shares'][s]:.0%} ({profile_['stage_ms'][s]:.0f} ms)" if s in profile_["shares"] else "-"
            for s in STAGES
        )
        ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in profile_["top_ops"][:4])
        candidates = profile_["nms_candidates_per_image"]
        prof_lines.append(f"| {row['label']} | {shares} | {'-' if candidates is None else f'{candidates:.0f}'} | {ops} |")
    return "\n".join([
        "Median latency of warmed runs on the CPU (ms per batch). ✓/✗: batch-32 e2e speedup reaches "
        f"{TARGET_EFFICIENCY}x of the FLOPs ratio or not.", "", *lines, "",
        "Where the time goes: torch.profiler, e2e path, batch 32, 1 thread (classifier: the whole network "
        "under backbone).", "", *prof_lines, "", *_layer_lines(rows), notes,
    ])


def _layer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per layer, dense base vs each pruned model: channels, FLOPs, ms and GFLOP/s (batch 32, 1 thread)."""
    lines = []
    bases = {row["label"]: row for row in rows if row["base"]}
    for row in rows:
        if row["base"] or row["base_label"] not in bases:
            continue
        dense = {r["layer"]: r for r in bases[row["base_label"]]["layers_b32"]}
        lines += [f"Per layer, {row['base_label']} → {row['label']}: each conv / max-pool timed alone on its input "
                  "in the network, batch 32, 1 thread; layers under 1% of the dense model's layer time are left out.",
                  "", "| layer | output | channels in→out | MFLOPs / image | ms | GFLOP/s |", "|---|---|---|---|---|---|"]
        total = sum(r["ms"] for r in dense.values()) or 1.0
        for layer in row["layers_b32"]:
            base = dense.get(layer["layer"])
            if base is None or base["ms"] < 0.01 * total:
                continue

            def pair(key: str, fmt: str, scale: float = 1.0, a: dict = base, b: dict = layer) -> str:
                if not a[key]:
                    return "–"  # a pool: no FLOPs
                return f"{format(a[key] / scale, fmt)} → {format(b[key] / scale, fmt)}"

            lines.append(
                f"| {layer['layer'].removeprefix('backbone.')} ({layer['kind']}) | {'x'.join(map(str, layer['hw']))} | "
                f"{base['in_channels']}→{base['out_channels']} / {layer['in_channels']}→{layer['out_channels']} | "
                f"{pair('flops_per_image', '.1f', 1e6)} | {pair('ms', '.1f')} | {pair('gflops_per_s', '.1f')} |"
            )
        lines.append("")
    return lines


def _layer_summary(row: dict[str, Any], base: dict[str, Any]) -> str:
    """Conv time and throughput, dense vs pruned, and how much time the pools (which FLOPs ignore) take."""
    def sums(layers: list[dict[str, Any]]) -> tuple[float, float, float]:
        convs = [r for r in layers if r["kind"] == "Conv2d"]
        return (sum(r["ms"] for r in convs), sum(r["flops_per_image"] for r in convs) * 32,
                sum(r["ms"] for r in layers if r["kind"] == "MaxPool2d"))

    conv_ms, conv_flops, pool_ms = sums(row["layers_b32"])
    dense_ms, dense_flops, dense_pool = sums(base["layers_b32"])
    if not conv_ms or not dense_ms:
        return ""
    costliest = max((r for r in row["layers_b32"] if r["kind"] == "Conv2d"), key=lambda r: r["ms"])
    text = (f"; the convs alone: {dense_ms:.0f} -> {conv_ms:.0f} ms = {dense_ms / conv_ms:.2f}x for "
            f"{dense_flops / conv_flops:.2f}x fewer conv FLOPs, at {conv_flops / conv_ms / 1e6:.1f} GFLOP/s against "
            f"the dense model's {dense_flops / dense_ms / 1e6:.1f}; its costliest conv is "
            f"{costliest['layer'].removeprefix('backbone.')} ({costliest['in_channels']}→{costliest['out_channels']} "
            f"channels at {'x'.join(map(str, costliest['hw']))}: {costliest['ms']:.0f} ms, "
            f"{costliest['gflops_per_s']:.1f} GFLOP/s)")
    if pool_ms or dense_pool:  # pooling modules (SSD's backbone pools functionally: see the profile instead)
        text += f"; max-pooling, which FLOPs do not count, {dense_pool:.0f} -> {pool_ms:.0f} ms"
    return text


def analysis(rows: list[dict[str, Any]], threads: list[int]) -> str:
    parts = []
    bases = {row["label"]: row for row in rows if row["base"]}
    for row in rows:
        if row["base"]:
            continue
        base = bases.get(row["base_label"], row)
        effs = {t: row["efficiency"][_key(32, t)]["e2e"] for t in threads}
        nets = {t: row["efficiency"][_key(32, t)]["network"] for t in threads}
        nhwc = {t: row["efficiency"][_key(32, t)]["e2e_channels_last"] for t in threads}
        nhwc_ms = {t: (base["latency_ms"][_key(32, t)]["e2e_channels_last"], row["latency_ms"][_key(32, t)]["e2e_channels_last"])
                   for t in threads}
        verdict = "meets" if all(e >= TARGET_EFFICIENCY for e in effs.values()) else "misses"
        text = (f"{row['label']} (FLOPs ratio {row['flops_ratio']:.2f}) {verdict} {TARGET_EFFICIENCY}x at batch 32: "
                "e2e efficiency " + ", ".join(f"{effs[t]:.2f} @{t}t" for t in threads)
                + " (network only " + ", ".join(f"{nets[t]:.2f} @{t}t" for t in threads) + "); in channels-last "
                "tensors " + ("meets" if all(e >= TARGET_EFFICIENCY for e in nhwc.values()) else "misses") + " it: "
                + ", ".join(f"{nhwc[t]:.2f} @{t}t ({nhwc_ms[t][0]:.0f} -> {nhwc_ms[t][1]:.0f} ms)" for t in threads))
        if verdict == "misses":
            ours, theirs = row["profile_b32"], base["profile_b32"]
            fixed = [s for s in ("preprocess", "postprocess") if s in ours["stage_ms"]]
            if fixed:
                dense_fixed = sum(theirs["stage_ms"][s] for s in fixed)
                ours_fixed = sum(ours["stage_ms"][s] for s in fixed)
                text += (f"; pre+post-processing takes {sum(ours['shares'][s] for s in fixed):.0%} of its time "
                         f"({ours_fixed:.0f} ms, dense {dense_fixed:.0f} ms; NMS candidates per image "
                         f"{ours['nms_candidates_per_image']:.0f}, dense {theirs['nms_candidates_per_image']:.0f})")
            network = [s for s in ("backbone", "head") if s in ours["stage_ms"]]
            dense_net = sum(theirs["stage_ms"][s] for s in network)
            ours_net = sum(ours["stage_ms"][s] for s in network)
            if ours_net:
                text += (f"; backbone+head {dense_net:.0f} -> {ours_net:.0f} ms = {dense_net / ours_net:.2f}x "
                         f"for {row['flops_ratio']:.2f}x fewer FLOPs; top op {ours['top_ops'][0]['op']}")
            text += _layer_summary(row, base)
        parts.append(text + ".")
    if any((r["profile_b32"]["nms_candidates_cap"] or 0) and r["profile_b32"]["nms_candidates_per_image"]
           >= 0.95 * r["profile_b32"]["nms_candidates_cap"] for r in rows):
        parts.append("Note: some detectors fill every class's top-k before NMS (flat scores of untrained weights): "
                     "their post-processing is a worst case; trained checkpoints (--checkpoints) send fewer boxes.")
    return " ".join(parts)


def figure(rows: list[dict[str, Any]], threads: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    families = sorted({row["model_name"] for row in rows})
    for family in families:
        members = sorted((r for r in rows if r["model_name"] == family), key=lambda r: r["flops"])
        flops = [r["flops"] / 1e9 for r in members]
        # A classifier's e2e is its network: one line.
        paths = (("e2e", "-o"), ("e2e_channels_last", "-^"))
        if model_task(family) == "detection":
            paths += (("network", "--s"),)
        for count in threads:
            for path_name, style in paths:
                ys = [r["latency_ms"][_key(32, count)][path_name] for r in members]
                ax.plot(flops, ys, style, label=f"{family} {path_name} {count}t", markersize=4)
        # Latency proportional to FLOPs, from the dense model's e2e at the first thread count: the ideal.
        dense = next(r for r in members if r["base"])
        dense_ms, dense_flops = dense["latency_ms"][_key(32, threads[0])]["e2e"], dense["flops"] / 1e9
        ax.plot([flops[0], flops[-1]], [dense_ms * f / dense_flops for f in (flops[0], flops[-1])], ":", color="gray",
                label="∝ FLOPs" if family == families[0] else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("latency, batch 32 (ms)")
    ax.set_title("CPU latency vs FLOPs (dense and pruned)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, nargs="+", help="dense base first, then pruned checkpoints")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="prune ratios of built models")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 2 timed runs, 1 profiled")
    args = parser.parse_args()
    if 32 not in args.batches:
        parser.error("--batches must include 32 (the target is judged there)")
    warmup, runs, profile_runs = (1, 2, 1) if args.quick else (args.warmup, args.runs, 3)

    try:
        entries = checkpoint_models(args.checkpoints) if args.checkpoints else built_models(args.ratios)
    except PrunepipeError as exc:
        sys.exit(f"error: {exc}")
    rows = []
    for entry in entries:
        model = entry.pop("model")
        size = model_input_size(model)
        row = {**entry, "input_size": list(size), "flops": count_flops(model, size),
               "params": count_parameters(model), "latency_ms": {}}
        # The same network in channels-last (NHWC) tensors: oneDNN's NCHW kernels are slow for a few channels
        # at high resolution, and pruning leaves channel counts that miss their fast paths.
        nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
        for batch_size in args.batches:
            for count in args.threads:
                row["latency_ms"][_key(batch_size, count)] = latencies(model, nhwc, batch_size, count, warmup, runs)
                print(f"{row['label']}: batch {batch_size}, {count} thread(s): "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in row["latency_ms"][_key(batch_size, count)].items()),
                      flush=True)
        row["profile_b32"] = profile_e2e(model, 32, profile_runs)
        row["layers_b32"] = layer_times(model, 32, warmup, runs)
        rows.append(row)
    add_ratios(rows)

    weights = "the checkpoints given" if args.checkpoints else "random weights (built here)"
    notes = (f"Models: {weights}. {'SMOKE TEST (--quick, shared machine): not a measurement. ' if args.quick else ''}"
             f"Median of {runs} runs after {warmup} warm-up(s); e2e = prunepipe's batched ssd_detect (classifier: "
             "the network); e2e torchvision = model(list of images).")
    text = analysis(rows, args.threads)
    png = RESULTS / "speedup.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure(rows, args.threads, png)
    out = write_result("speedup", {
        "quick": args.quick,
        "settings": {"batches": args.batches, "threads": args.threads, "warmup": warmup, "runs": runs,
                     "weights": weights, "target_efficiency": TARGET_EFFICIENCY},
        "models": rows,
        "analysis": text,
        "figure": str(png.relative_to(RESULTS.parent.parent)),
        "markdown": markdown(rows, args.batches, args.threads, notes) + f"\n\n**Analysis.** {text}\n\n"
                    "![latency vs FLOPs](bench/results/speedup.png)",
    })
    print(text)
    print(f"wrote {out} and {png} ({png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
