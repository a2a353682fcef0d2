"""Render BENCHMARKS.md from the scripts' latest results (bench/results/*.json); never typed in.

    .venv/bin/python bench/report.py

Each result file carries the machine, the command, the date and a `markdown` table that its script
produced; this only arranges them, in the order below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, portable  # noqa: E402

ORDER = ["controls", "pretrain", "compress", "overhead", "quality", "speedup", "compress_latency", "compress_latency_2x",
         "compress_latency_two_phases", "compress_latency_3x",
         "compress_latency_3x_sensitivity", "latency_controls", "latency_controls_1_5x", "latency_controls_1_75x",
         "latency_controls_2x_long", "latency_vs_flops_1_5x", "speedup_models_1_75x", "latency_pareto", "latency_alternatives",
         "latency_alternatives_1_75x", "latency_controls_w025", "latency_controls_w025_3_5x", "latency_controls_w025_rm",
         "speedup_models_w025", "speedup_w025", "speedup_w025_rm", "latency_controls_w0125_dense",
         "pruned_vs_narrow_w025_rm", "latency_controls_w0125_1_75x", "narrow_pruned_vs_dense",
         "wide_pruned_vs_narrow_pruned", "gpu",
         "budget", "budget_latency", "budget_latency_long", "budget_latency_2x_long"]
TITLES = {
    "controls": "Controls: the seed method against a dense model trained as long, other criteria, scratch",
    "pretrain": "Pretraining the default preset",
    "compress": "The default preset end to end, in-process",
    "budget_latency": "A latency budget on the default preset: `prunepipe run --budget latency=3x`",
    "budget_latency_long": "The same latency budget with 12 retraining epochs instead of the preset's 3",
    "budget_latency_2x_long": "A 2x latency budget with 12 retraining epochs",
    "compress_latency": "A latency-targeted model (phase 1 at 3x) in the controls' schedule, in-process",
    "compress_latency_2x": "A latency-targeted model (phase 1 at 2x) in the controls' schedule, in-process",
    "compress_latency_two_phases": "3x lower latency in two phases of 1.73x, 12 retraining epochs each, score thresholds "
                                   "chosen on validation (default preset, in-process)",
    "compress_latency_3x": "3x lower latency in one phase, 12 retraining epochs, score thresholds chosen on validation "
                           "(default preset, in-process; run at the same time as the next, one thread each)",
    "compress_latency_3x_sensitivity": "The same with `selection.layer_sensitivity` (each layer weighed by its "
                                       "validation-loss sensitivity)",
    "latency_controls": "A latency-targeted model against a dense control trained as long, over seeds",
    "latency_controls_1_5x": "The same at a 1.5x latency target",
    "latency_controls_1_75x": "The same at a 1.75x latency target",
    "latency_pareto": "Speed against accuracy: every controlled latency run of ssd_vgg_lite on digits-voc",
    "latency_controls_w025": "A model with room to prune: ssd_vgg_lite at width 0.25 (twice the default preset's), a 3.2x "
                             "latency target against a dense control trained as long, over seeds",
    "latency_controls_w025_3_5x": "The same wider model at a 3.5x latency target, no layer losing more than 70% of "
                                  "its filters",
    "latency_controls_w025_rm": "The same wider model without conv1_2 (removed whole before filter selection), the "
                                "rest pruned to a 3.2x latency target",
    "speedup_models_w025": "The wider model's speedup models: the same FLOPs cut as its latency-targeted model, and "
                           "a dense control (seed 0)",
    "speedup_w025": "Real CPU speedup of the wider model's pruned models",
    "speedup_w025_rm": "Real CPU speedup of the wider model without conv1_2, pruned to 3.2x (seed 0), against its "
                       "dense control",
    "latency_controls_w0125_dense": "The narrow model trained as long: the preset's width 0.125, pretrained as the wider "
                                    "base was, then dense controls over seeds",
    "pruned_vs_narrow_w025_rm": "Pruning the wide model or training the narrow one: the wider model without conv1_2, "
                                "pruned to 3.2x, against the narrow dense model trained as long, side by side",
    "latency_controls_w0125_1_75x": "The narrow model pruned instead: the same base, a 1.75x latency target, over "
                                    "seeds",
    "narrow_pruned_vs_dense": "The narrow model pruned to 1.75x against its dense controls trained as long, side by "
                              "side",
    "wide_pruned_vs_narrow_pruned": "The two routes side by side: the wide model without conv1_2 pruned to 3.2x "
                                    "against the narrow model pruned to 1.75x",
    "latency_controls_2x_long": "The same at a 2x latency target with 24 retraining epochs instead of 12",
    "latency_alternatives_1_75x": "Layer removal on top of filter pruning: the speedup section's latency-targeted model "
                                  "without conv1_2 (and conv3_3), against itself trained as long, over seeds",
    "speedup_models_1_75x": "The speedup section's models: seed 0 of a 1.75x latency target, the same FLOPs cut, and a "
                            "dense control",
    "latency_alternatives": "Other ways to a faster network: a lower input resolution, removed layers, each against "
                            "a dense control trained as long, over seeds",
    "latency_vs_flops_1_5x": "Filters chosen by time or by FLOPs: a 1.5x latency target, the same FLOPs cut, and a "
                             "dense control, over seeds",
    "overhead": "Orchestration overhead: in-process vs Prefect + Ray Train + MLflow",
    "quality": "Quality at equal FLOPs: criteria and torch-pruning's pruners",
    "speedup": "Real CPU speedup of pruned models",
    "gpu": "GPU throughput: stock torchvision SSD vs prunepipe's batched path",
    "budget": "Budgeted compression: `prunepipe run --budget`",
}
HEADER = """# Benchmarks

Every number below was written by a script in `bench/` (its command and machine are given with it) and
collected by `bench/report.py`; none is typed in. Re-run a script, then `bench/report.py`, to refresh.

Each section names the commit it was measured at. The controls and the end-to-end run of the default preset
measure the current method (BatchNorm-aware stage 2, early stopping on validation, every choice on the
validation split), and so do the latency sections from `latency_controls` on and the speedup section (its
models are those of `speedup_models_1_75x`). The `_w025` sections prune ssd_vgg_lite at width 0.25 (twice
the preset's), pretrained with `bench/pretrain.py --set model.width_mult=0.25 --keep
bench/checkpoints/base_w025.safetensors`; the narrow model they are set against in `pruned_vs_narrow_w025_rm`
was pretrained the same way at the preset's width (`bench/pretrain.py --keep
bench/checkpoints/base_w0125.safetensors`).
The quality and budget sections were measured before those changes and are history: they have no dense
control trained for the same epochs.
"""


def render(result: dict) -> str:
    m = result.get("machine", {})
    where = f"{m.get('cpu')} ({m.get('cores')} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + ")"
    smoke = "--quick" in str(result.get("command", ""))
    lines = [
        *(["> **Smoke run (`--quick`) on a shared, loaded machine: not a measurement; re-run without `--quick`.**", ""]
          if smoke else []),
        f"- command: `{result.get('command')}`",
        f"- machine: {where}, torch {m.get('torch')}, commit {m.get('commit')}",
        f"- date: {m.get('date')}",
        "",
        result.get("markdown") or "```\n" + json.dumps(result.get("summary", {}), indent=2) + "\n```",
    ]
    if result.get("notes"):
        lines += ["", result["notes"]]
    checks = TARGETS.get(result.get("benchmark"), lambda r: [])(result)
    if checks and not smoke:
        lines += ["", "Targets, checked against the numbers above:", ""]
        lines += [f"- {'met' if ok else '**not met**'}: {text}" for text, ok in checks]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The project's targets, evaluated on each result's own numbers


def _pretrain_targets(r: dict) -> list[tuple[str, bool]]:
    seconds, score = r["train_seconds"], r["metrics"].get("map_voc07", 0.0)
    return [(f"VOC07 mAP@0.5 >= 0.80 (measured {score:.3f})", score >= 0.80),
            (f"training under 6 min on 2 CPU cores (measured {seconds / 60:.1f} min)", seconds < 360)]


def _compress_targets(r: dict) -> list[tuple[str, bool]]:
    base = r["rows"][0]
    final = next((row for row in r["rows"] if row.get("final")), r["rows"][-1])
    key = "map_voc07" if base.get("map_voc07") is not None else "top1"
    drop = 100 * (base[key] - final[key])
    params, flops = final.get("params_ratio") or 1.0, final.get("flops_ratio") or 1.0
    if r.get("config") == "default":  # the short preset `make run` runs: half the FLOPs, no accuracy lost
        return [(f"FLOPs >= 2x fewer: {flops:.2f}x", flops >= 2),
                (f"{key} at most 1.0 point below the pretrained model: {drop:+.2f} points", drop <= 1.0)]
    return [
        (f"parameters >= 4x fewer (the method's target): {params:.2f}x", params >= 4),
        (f"parameters >= 6.7x fewer (the paper's SSD300 figure): {params:.2f}x", params >= 6.7),
        (f"FLOPs >= 2.5x fewer (the method's target): {flops:.2f}x", flops >= 2.5),
        (f"FLOPs >= 4x fewer (the benchmark's target): {flops:.2f}x", flops >= 4),
        (f"{key} at most 1.0 point below the pretrained model: {drop:+.2f} points", drop <= 1.0),
    ]


def _latency_compress_targets(r: dict) -> list[tuple[str, bool]]:
    """The speed issue's bar where the run timed its final model against the pretrained one."""
    checks = _compress_targets({**r, "config": "default"})[1:]
    speedup = r.get("speedup")
    if speedup:
        network, e2e = speedup["network"]["ratio"], speedup["end_to_end"]["ratio"]
        checks = [(f"network >= 3x faster (ONNX Runtime, batch 32): {network:.2f}x", network >= 3),
                  (f"end to end >= 3x faster (ONNX Runtime, batch 32): {e2e:.2f}x", e2e >= 3), *checks]
    return checks


def _latency_controls_targets(r: dict) -> list[tuple[str, bool]]:
    latency = [row for row in r["rows"] if row["method"] == "latency"]
    dense = {row["seed"]: row["metric"] for row in r["rows"] if row["method"] == "dense"}
    gaps = [100 * (dense[row["seed"]] - row["metric"]) for row in latency if row["seed"] in dense]
    e2e = [row["e2e_speedup"] for row in latency if row.get("e2e_speedup")]
    checks = []
    if gaps:
        gap = sum(gaps) / len(gaps)
        checks.append((f"at most 1.0 point of test VOC07 below the dense control (mean over seeds): {gap:+.2f} points",
                       gap <= 1.0))
    if e2e:
        checks.append((f"end to end >= 3x faster than the dense model (ONNX Runtime, batch 32), slowest seed: "
                       f"{min(e2e):.2f}x", min(e2e) >= 3))
    return checks


def _controls_targets(r: dict) -> list[tuple[str, bool]]:
    def mean(task: str, method: str, field: str) -> float | None:
        values = [row[field] for row in r["rows"] if row["task"] == task and row["method"] == method
                  and row.get(field) is not None]
        return sum(values) / len(values) if values else None

    checks = []
    for task, params_goal, flops_goal in (("det", 6.7, 4.0), ("cls", 10.0, None)):
        seed, dense = mean(task, "seed", "metric"), mean(task, "dense", "metric")
        if seed is None or dense is None:
            continue
        params, flops = mean(task, "seed", "params_ratio"), mean(task, "seed", "flops_ratio")
        checks.append((f"{task}: seed method at most 1.0 point below the dense control: "
                       f"{100 * (seed - dense):+.2f} points", 100 * (dense - seed) <= 1.0))
        checks.append((f"{task}: parameters >= {params_goal:g}x fewer: {params:.2f}x", params >= params_goal))
        if flops_goal:
            checks.append((f"{task}: FLOPs >= {flops_goal:g}x fewer: {flops:.2f}x", flops >= flops_goal))
        for other in ("l1_norm", "group_norm"):
            value = mean(task, other, "metric")
            if value is not None:
                checks.append((f"{task}: seed at least as good as {other} at equal FLOPs: "
                               f"{100 * (seed - value):+.2f} points", seed >= value))
        # Where the seed method loses, the task's everyday preset prunes by the criterion that wins on
        # validation (what a choice may read), the seed method one setting away.
        pruned = {m: mean(task, m, "val_metric") for m in ("seed", "l1_norm", "group_norm")}
        pruned = {m: v for m, v in pruned.items() if v is not None}
        if pruned:
            from compression.config import load_config

            preset = DEFAULT_PRESETS[task]
            winner, chosen = max(pruned, key=pruned.get), load_config(preset).stages.selection.criterion
            checks.append((f"{task}: the {preset} preset prunes by the criterion best on validation "
                           f"({winner}, {pruned[winner]:.3f}): it prunes by {chosen}", chosen == winner))
    return checks


DEFAULT_PRESETS = {"det": "default", "cls": "digits_cls"}  # the preset a user of each task starts from


def _overhead_targets(r: dict) -> list[tuple[str, bool]]:
    checks = [(f"`make run` (the flow on the default preset) under 10 min after setup: "
               f"{r['flow_total_s'] / 60:.1f} min", r["flow_total_s"] < 600)] if r.get("config") == "default" else []
    for stage in r["stages"]:
        if (stage.get("in_process_s") or 0) >= 60 and stage.get("added_pct") is not None:
            checks.append((f"orchestration adds at most 15% to {stage['stage']} ({stage['in_process_s']:.0f} s "
                           f"in-process): {stage['added_pct']:+.0f}%", stage["added_pct"] <= 15))
    return checks


BUDGET_TIME_LIMIT_MIN = 40  # the limit docs/budget.md documents for the default preset on 2 cores


def _budget_targets(r: dict) -> list[tuple[str, bool]]:
    chosen = r.get("chosen")
    checks = []
    if r.get("config") == "default":
        checks.append((f"`--budget {r['budget']}` on the default preset within the documented {BUDGET_TIME_LIMIT_MIN} min "
                       f"on 2 cores: {r['seconds'] / 60:.1f} min", r["seconds"] <= 60 * BUDGET_TIME_LIMIT_MIN))
    if r["budget"].startswith("map_drop="):
        limit = float(r["budget"].split("=", 1)[1])
        checks.append((f"the chosen model is within {limit:g} points of the pretrained one on the test split: "
                       + (f"{100 * chosen['final_drop']:+.2f} points" if chosen else "no trial chosen"),
                       bool(chosen) and 100 * chosen["final_drop"] <= limit + 1e-9))
    if r["budget"].startswith("latency="):
        target = float(r["budget"].split("=", 1)[1].rstrip("x"))
        for trial in r.get("trials", []):
            if trial.get("predicted_latency_ratio") and trial.get("latency_ratio"):
                error = trial["predicted_latency_ratio"] / trial["latency_ratio"] - 1
                checks.append((f"the latency table predicts {trial['trial']}'s measured network speedup within 15%: "
                               f"{100 * error:+.1f}%", abs(error) <= 0.15))
        checks.append((f"the chosen model's network is at least {target:g}x faster than the base's (measured): "
                       + (f"{chosen['latency_ratio']:.2f}x" if chosen else "no trial chosen"),
                       bool(chosen) and chosen["latency_ratio"] >= target))
    return checks


def _speedup_targets(r: dict) -> list[tuple[str, bool]]:
    """The latency goal: the latency-targeted model, at most 1 point of test VOC07 below the dense model
    measured with it (a dense control trained as long, from bench/latency_controls.py --keep), at least 3x faster than the dense model in ONNX Runtime at batch 1 and 32
    on one thread, and 5x faster than the dense model in PyTorch eager."""
    rows = [row for row in r.get("rows", []) if row.get("device", "cpu") == "cpu" and row["threads"] == 1]
    ms = {(row["model"], row["runtime"], row["batch"]): row["e2e_ms"] for row in rows}
    latency = next((row for row in rows if row["model"] == "latency_target"), None)
    if latency is None or not all(("dense", rt, b) in ms for rt in ("onnxruntime", "torch_eager") for b in (1, 32)):
        return []
    checks = []
    dense = next(row for row in rows if row["model"] == "dense")
    if dense.get("map_voc07") is not None and latency.get("map_voc07") is not None:
        drop = 100 * (dense["map_voc07"] - latency["map_voc07"])
        checks.append((f"latency_target at most 1.0 point of test VOC07 below the dense model measured here "
                       f"({dense['map_voc07']:.3f}): {drop:+.2f} points", drop <= 1.0))
    for batch in (1, 32):
        deployed = ms.get(("latency_target", "onnxruntime", batch))
        if deployed:
            ratio = ms[("dense", "onnxruntime", batch)] / deployed
            checks.append((f"latency_target >= 3x faster than dense in ONNX Runtime, batch {batch}, 1 thread: "
                           f"{ratio:.2f}x", ratio >= 3))
            ratio = ms[("dense", "torch_eager", batch)] / deployed
            checks.append((f"latency_target in ONNX Runtime >= 5x faster than dense in PyTorch eager, batch {batch}, "
                           f"1 thread: {ratio:.2f}x", ratio >= 5))
    for row in r.get("prediction", []):
        checks.append((f"the latency table predicts {row['model']}'s network within 15%: {100 * row['error']:+.1f}%",
                       abs(row["error"]) <= 0.15))
    return checks


TARGETS = {"controls": _controls_targets, "speedup": _speedup_targets, "speedup_w025": _speedup_targets,
           "speedup_w025_rm": _speedup_targets,
           "latency_controls_w025": _latency_controls_targets, "latency_controls_w025_3_5x": _latency_controls_targets,
           "latency_controls_w025_rm": _latency_controls_targets,
           "speedup_models_w025": _latency_controls_targets,
           "pretrain": _pretrain_targets, "compress": _compress_targets, "overhead": _overhead_targets,
           "budget": _budget_targets, "budget_latency": _budget_targets, "budget_latency_long": _budget_targets,
           "budget_latency_2x_long": _budget_targets,
           "compress_latency_two_phases": _latency_compress_targets,
           "latency_controls": _latency_controls_targets, "latency_controls_1_5x": _latency_controls_targets,
           "latency_controls_2x_long": _latency_controls_targets, "latency_vs_flops_1_5x": _latency_controls_targets,
           "latency_controls_1_75x": _latency_controls_targets, "speedup_models_1_75x": _latency_controls_targets,
           "compress_latency_3x": _latency_compress_targets,
           "compress_latency_3x_sensitivity": _latency_compress_targets}


def main() -> None:
    parts = [HEADER]
    # *.partial.json are a long benchmark's progress files and *quick* ones smoke runs (git ignores both), not
    # results: a report made where they lie about must not show them.
    names = sorted(p.stem for p in RESULTS.glob("*.json")
                   if p.stem not in ORDER and ".partial" not in p.stem and "quick" not in p.stem)
    for name in ORDER + names:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = portable(json.loads(path.read_text()))  # results written before paths were made relative
        parts.append(f"## {TITLES.get(name, name)}\n\n{render(result)}\n")
    out = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
