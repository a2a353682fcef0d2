"""Speed against accuracy on the default preset's model: every controlled latency run on one plot (no training).

    .venv/bin/python bench/latency_pareto.py

Reads what bench/latency_controls.py wrote (``latency_controls*.json``, ``latency_vs_flops*.json``,
``speedup_models*.json``) and the
one-seed 3x runs of bench/compress.py (``compress_latency_3x*.json``), each from a pretrained model of the
default preset (at the preset's width unless the run was given a wider base: ``width`` tells them apart) in
one schedule (one phase over every prunable layer, ``max_layer_ratio`` 0.875). Each point
is a pruned model's end-to-end speedup over the base (ONNX Runtime, batch 32, timed in alternation with it)
against its test VOC07 minus the dense control's of the same seed (points; the base trained as many extra
epochs). Seeds give the mean and the spread. A one-seed 3x run is set against the seed-0 dense control of
the controls with the same width and retraining epochs (they are deterministic: the same seed gives the
same dense model in every run). Writes bench/results/latency_pareto.json and .png; run bench/report.py afterwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, mean_and_sd, plot, write_result  # noqa: E402

GOAL_SPEEDUP, GOAL_DROP = 3.0, 1.0  # the speed goal: 3x end to end, at most 1 point below the dense control


def model_width(result: dict[str, Any]) -> float:
    """The width multiplier of the model a result pruned: recorded by bench/latency_controls.py, set by a
    bench/compress.py override, or the default preset's."""
    from compression.config import load_config

    if (result.get("model") or {}).get("width_mult") is not None:
        return float(result["model"]["width_mult"])
    given = [o.split("=", 1)[1] for o in result.get("overrides", []) if o.startswith("model.width_mult=")]
    return float(given[-1]) if given else float(load_config("default").model.width_mult)


def control_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per pruned method of a bench/latency_controls.py result, over its seeds."""
    dense = {row["seed"]: row["metric"] for row in result["rows"] if row["method"] == "dense"}
    points = []
    for method in sorted({row["method"] for row in result["rows"]} - {"dense"}):
        rows = [row for row in result["rows"] if row["method"] == method and row["seed"] in dense]
        if not rows or any(row.get("e2e_speedup") is None for row in rows):
            continue
        goal = (f"{result.get('flops_target')}x fewer FLOPs" if method == "flops"
                else f"{result['target']}x latency")
        if result.get("max_layer_ratio", 0.875) != 0.875:  # the schedule's cap, unless another was given
            goal += f", max_layer_ratio {result['max_layer_ratio']}"
        if result.get("remove_layers"):
            goal += f", without {'+'.join(result['remove_layers'])}"
        (speedup, speedup_sd), (gap, gap_sd) = (
            mean_and_sd([row["e2e_speedup"] for row in rows]),
            mean_and_sd([100 * (row["metric"] - dense[row["seed"]]) for row in rows]))
        points.append({"result": result["benchmark"], "method": method, "label": goal, "width": model_width(result),
                       "retrain_epochs": result["retrain_epochs"], "seeds": len(rows), "e2e_speedup": speedup,
                       "e2e_speedup_sd": speedup_sd, "vs_dense_points": gap, "vs_dense_points_sd": gap_sd})
    return points


def one_seed_point(result: dict[str, Any], dense_by_epochs: dict[tuple[float, int], float]) -> dict[str, Any] | None:
    """A bench/compress.py latency run (seed 0) against the seed-0 dense control of its width and retraining
    epochs."""
    epochs = next((int(o.split("=", 1)[1]) for o in result.get("overrides", []) if o.startswith("stages.retrain.epochs=")),
                  None)
    final = next((row for row in result["rows"] if row.get("final")), None)
    width = model_width(result)
    if final is None or (width, epochs) not in dense_by_epochs or not result.get("speedup"):
        return None
    label = "3x latency" + (", layer sensitivity" if "sensitivity" in result["benchmark"] else "")
    return {"result": result["benchmark"], "method": "latency", "label": label, "width": width,
            "retrain_epochs": epochs, "seeds": 1, "e2e_speedup": result["speedup"]["end_to_end"]["ratio"],
            "e2e_speedup_sd": 0.0, "vs_dense_points": 100 * (final["map_voc07"] - dense_by_epochs[width, epochs]),
            "vs_dense_points_sd": 0.0}


def figure(points: list[dict[str, Any]], path: Path) -> None:
    with plot(path, xlabel="end-to-end speedup over the base (ONNX Runtime, batch 32, 1 thread)",
              ylabel="test VOC07 minus the dense control (points)",
              title="Speed against accuracy, ssd_vgg_lite on digits-voc (dashed: the goal)") as ax:
        for method, marker in (("latency", "o"), ("flops", "s")):
            chosen = [p for p in points if p["method"] == method]
            if not chosen:
                continue
            ax.errorbar([p["e2e_speedup"] for p in chosen], [p["vs_dense_points"] for p in chosen],
                        xerr=[p["e2e_speedup_sd"] for p in chosen], yerr=[p["vs_dense_points_sd"] for p in chosen],
                        fmt=marker, capsize=3, markersize=4, label=f"{method}-targeted")
            for i, p in enumerate(sorted(chosen, key=lambda p: p["e2e_speedup"])):  # alternate: neighbours overlap
                ax.annotate(f"{p['label']}, width {p['width']:g}, {p['retrain_epochs']} ep, {p['seeds']} seed(s)",
                            (p["e2e_speedup"], p["vs_dense_points"]), fontsize=6,
                            xytext=(5, 4 if i % 2 else -9), textcoords="offset points")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.axhline(-GOAL_DROP, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(GOAL_SPEEDUP, color="grey", linewidth=0.8, linestyle="--")


def main() -> None:
    loaded = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
              if p.stem.startswith(("latency_controls", "latency_vs_flops", "speedup_models", "compress_latency_3x"))
              and ".quick" not in p.stem and ".partial" not in p.stem}
    controls = [r for name, r in loaded.items() if not name.startswith("compress_")]
    if not controls:
        sys.exit(f"error: no bench/latency_controls.py result in {RESULTS}; run it first")
    points = [point for result in controls for point in control_points(result)]
    dense_by_epochs = {(model_width(r), r["retrain_epochs"]): row["metric"] for r in controls for row in r["rows"]
                       if row["method"] == "dense" and row["seed"] == 0}
    points += [p for name, r in loaded.items() if name.startswith("compress_")
               if (p := one_seed_point(r, dense_by_epochs))]
    points.sort(key=lambda p: (p["width"], p["e2e_speedup"]))
    lines = ["| result | width | method | target | retraining epochs | seeds | end-to-end speedup | test VOC07 minus dense control (points) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['result']} | {p['width']:g} | {p['method']} | {p['label']} | {p['retrain_epochs']} | {p['seeds']} | "
              f"{p['e2e_speedup']:.2f} ± {p['e2e_speedup_sd']:.2f} | {p['vs_dense_points']:+.2f} ± "
              f"{p['vs_dense_points_sd']:.2f} |" for p in points]
    lines.append("")
    for width in sorted({p["width"] for p in points}):
        at_width = [p for p in points if p["width"] == width]
        met = [p for p in at_width if p["e2e_speedup"] >= GOAL_SPEEDUP and p["vs_dense_points"] >= -GOAL_DROP]
        free = [p for p in at_width if p["vs_dense_points"] >= -GOAL_DROP]
        fastest = max(free, key=lambda p: p["e2e_speedup"]) if free else None
        lines += [f"- width {width:g}: fastest point at most {GOAL_DROP:g} point below its dense control: "
                  + (f"{fastest['result']} ({fastest['e2e_speedup']:.2f}x end to end)" if fastest else "none")
                  + f"; points meeting the goal ({GOAL_SPEEDUP:g}x, at most {GOAL_DROP:g} point below): {len(met)}"]
    png = RESULTS / "latency_pareto.png"
    figure(points, png)
    markdown = "\n".join(lines) + "\n\n![speed against accuracy](bench/results/latency_pareto.png)"
    out = write_result("latency_pareto", {"points": points, "figure": str(png.relative_to(RESULTS.parent.parent)),
                                          "markdown": markdown})
    print(f"{markdown}\n-> {out}")


if __name__ == "__main__":
    main()
