"""Controls for the compression results: is the seed method's model as good as a dense model trained as long,
and as good as other criteria in the same schedule?

    .venv/bin/python bench/controls.py [--task det|cls|both] [--seeds 0 1 2] [--jobs 2] [--resume [--redo METHOD...]] [--quick]
        [--only METHOD ...]

Every method starts from one converged base per task (trained once with the task's preset: early stopping on
the validation split; kept in bench/checkpoints/controls_<task>_base.safetensors) and spends the same extra
epochs (E = phases x (sparsity + retrain epochs) + distill epochs):

- ``seed``: the phased seed method (BN-aware sparsity statistics), the preset's phases and settings, run by
  ``compression.pipeline`` (its answer is chosen on validation: distilled or not);
- ``l1_norm``: the identical phased pipeline (same sparsity training, retraining, distillation) with the
  filters chosen by L1 norm, each phase cut at the FLOPs reduction the seed run reached in that phase;
- ``group_norm``: the identical phased pipeline with criterion ``group_norm`` (DepGraph's group sparsity:
  the sparsity epochs train with torch-pruning's ``GroupNormPruner`` regulariser in place of L1, the
  filters are ranked globally by their group's normalised L2 norm), each phase cut as ``l1_norm``'s;
- ``dense``: the base itself trained for the E extra epochs with the retraining settings (the reference for
  "no accuracy loss");
- ``scratch``: the seed run's final architecture, randomly initialised, trained with the pretraining
  settings for as many epochs as the base plus E (Liu et al., ICLR 2019);
- ablations (detector, first seed, one phase over every prunable layer, sparsity and retraining as the
  preset), from one sparsity run: γ-flagged, the seed rule with s_out only, s_in only, and both (the
  paper's OR) at γ 0.8, and the OR at γ in {0.6, 0.7, 0.8, 0.9}; cut at ``ABLATION_FLOPS`` fewer FLOPs, as
  the preset's first phases cut, the global ranking by the OR, by s_out only, by s_in only, and by neither
  (only its tie-break, the L1 norm of the L1-trained filters). Each row records the share of the removed
  filters that the statistics ranked (a nonzero s_out or s_in) rather than the tie-break.

The detector runs on the first 1000 training images of digits-voc (validation and test splits whole) with
2 retraining epochs per phase and 1 distillation epoch, so that 3 seeds of every control fit in about an
hour on 2 cores; the classifier runs its preset as it is. Seeds change the data order, augmentation and the
pruning's training, not the base. ``metric`` is test VOC07 mAP@0.5 (det) or top-1 (cls); no choice reads it.

Writes bench/results/controls.json (rows ``{task, method, seed, params_ratio, flops_ratio, metric,
dense_metric, ...}``; its ``markdown`` key is what bench/report.py renders) and, after every finished unit,
bench/results/controls.partial.json, which ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import CHECKPOINTS, RESULTS, write_result  # noqa: E402

TASKS: dict[str, dict[str, Any]] = {
    "det": {"preset": "digits_voc_thorough", "label": "ssd_vgg_lite on digits-voc", "metric": "map_voc07",
            "overrides": ["data.max_images=1000", "stages.retrain.epochs=2", "stages.distill.epochs=1",
                          "stages.selection.criterion=seed"]},
    "cls": {"preset": "digits_cls", "label": "vgg16_cifar on digits-cls", "metric": "top1",
            "overrides": ["stages.selection.criterion=seed"]},  # the seed method's run; the others change it
}
QUICK_OVERRIDES = ["data.max_images=64", "stages.pretrain.epochs=1", "stages.pretrain.early_stopping=false",
                   "stages.sparsity.epochs=1", "stages.retrain.epochs=1", "stages.distill.epochs=1"]
METHODS = ("seed", "dense", "l1_norm", "group_norm", "scratch")
ABLATIONS = (("or", 0.6), ("or", 0.7), ("or", 0.8), ("or", 0.9), ("s_out", 0.8), ("s_in", 0.8))
ABLATION_FLOPS = 2.6  # the preset's phase-1 cut
FLOPS_ABLATIONS = ("or", "s_out", "s_in", "neither")
# Priority when units wait for a process: what the verdict needs first.
ORDER = {("det", "seed"): 0, ("det", "dense"): 0, ("det", "l1_norm"): 1, ("det", "group_norm"): 1,
         ("cls", "seed"): 2, ("cls", "dense"): 2, ("cls", "l1_norm"): 3, ("cls", "group_norm"): 3,
         ("cls", "scratch"): 3, ("det", "scratch"): 4, ("det", "ablation"): 5}


# --------------------------------------------------------------------------------------------
# Configuration


def task_config(task: str, seed: int, quick: bool, extra: list[str] | None = None):
    from compression.config import load_config

    overrides = [*TASKS[task]["overrides"], *(QUICK_OVERRIDES if quick else []), f"seed={seed}",
                 f"stages.selection.seed={seed}", *(extra or [])]
    if quick and task == "cls":
        overrides.remove("data.max_images=64")
    return load_config(TASKS[task]["preset"], overrides)


def phases_of(cfg):
    from compression.checks import check_method_config

    return check_method_config(cfg)


def extra_epochs(cfg) -> int:
    """The epochs the phased pipeline trains after pretraining: the dense and scratch controls get as many."""
    stages = cfg.stages
    distill = stages.distill.epochs if stages.distill.enabled else 0
    return len(phases_of(cfg)) * (stages.sparsity.epochs + stages.retrain.epochs) + distill


def layer_paths(model_name: str, names: list[str]) -> list[str]:
    from compression.models import layer_names

    paths = layer_names(model_name)
    return [paths.get(name, name) for name in names]


# --------------------------------------------------------------------------------------------
# Units: one (task, method, seed) each, in a worker process


def _die_with_parent() -> None:
    """Pool initializer: a worker gets SIGTERM when the script that started it dies (Linux), so killing the
    script does not leave units training on in the background."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"]) / f"{spec['task']}_{spec['method']}_{spec['seed']}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = task_config(spec["task"], spec["seed"], spec["quick"])
    started = time.perf_counter()
    method = spec["method"]
    try:
        if method == "seed":
            result = _pipeline(cfg, spec, work, criterion="seed")
        elif method == "l1_norm":
            result = _pipeline(cfg, spec, work, criterion="l1_norm")
        elif method == "group_norm":
            result = _pipeline(cfg, spec, work, criterion="group_norm")
        elif method == "dense":
            result = _dense(cfg, spec, work)
        elif method == "scratch":
            result = _scratch(cfg, spec, work)
        elif method == "ablation":
            result = {"ablations": _ablations(cfg, spec, work)}
        else:
            raise ValueError(method)
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed unit is a row of the results, the others go on
        result = {"status": "failed", "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    result.update(task=spec["task"], method=method, seed=spec["seed"], wall_seconds=time.perf_counter() - started)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _row(metrics: dict[str, Any], task: str) -> dict[str, Any]:
    key = TASKS[task]["metric"]
    return {"params_ratio": metrics.get("params_ratio"), "flops_ratio": metrics.get("flops_ratio"),
            "metric": metrics.get(key), "val_metric": metrics.get(f"val_{key}"), "params": metrics.get("params"),
            "flops": metrics.get("flops")}


def _pipeline(cfg, spec: dict[str, Any], work: Path, criterion: str) -> dict[str, Any]:
    """The preset's phased pipeline from the base; another criterion cuts each phase at the seed's FLOPs
    reduction there."""
    from compression.pipeline import run_pipeline_in_process

    cfg.stages.pretrain.checkpoint = Path(spec["base"])
    if criterion != "seed":
        phases = phases_of(cfg)  # the seed's phases, before the criterion changes (they are checked with it)
        cfg.stages.selection.criterion = criterion
        # A phase the seed cut further than this criterion's floors allow is cut as far as they go (and said).
        cfg.stages.selection.out_of_reach = "closest"
        cfg.stages.phases = [phase.model_copy(update={"target_flops_ratio": max(ratio, 1.0001), "gamma": None})
                             for phase, ratio in zip(phases, spec["phase_flops_ratios"], strict=True)]
    rows = run_pipeline_in_process(cfg, work / "run")
    final = next(row for row in rows if row["final"])
    phase_ratios, previous = [], rows[0]["metrics"]["flops"]
    for row in rows:
        if row["stage"] == "prune":
            phase_ratios.append(previous / row["metrics"]["flops"])
        if row["stage"] == "retrain":
            previous = row["metrics"]["flops"]
    result = {**_row(final["metrics"], spec["task"]), "final_stage": final["stage"],
              "phase_flops_ratios": phase_ratios}
    if criterion != "seed":
        short = [f"{phase.name}: {reached:.3f}x of {wanted:.3f}x" for phase, reached, wanted
                 in zip(cfg.stages.phases, phase_ratios, spec["phase_flops_ratios"], strict=True)
                 if reached < wanted * 0.999]
        if short:
            result["flops_short_of_target"] = short
    if criterion == "seed":  # the scratch control trains this architecture
        keep = Path(spec["keep"])
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final["path"], keep)
        result["architecture"] = str(keep)
    return result


def _measured(path: Path, cfg, base_metrics: dict[str, Any]) -> dict[str, Any]:
    from compression.measure import stored_metrics

    return stored_metrics(path, base_metrics)


def _dense(cfg, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from compression import stages as S

    cfg.stages.retrain.epochs = extra_epochs(cfg)
    _, metrics = S.retrain(Path(spec["base"]), cfg, work / "dense.safetensors", phase=None,
                           base_metrics=spec["base_metrics"])
    return {**_row(metrics, spec["task"]), "epochs": cfg.stages.retrain.epochs}


def reinitialise(model) -> None:
    """Fresh weights as the models' constructors draw them (He init for convs, BN at 1/0, Linear N(0, 0.01))."""
    import torch
    from torch import nn

    from compression.models.ssd import L2Norm

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, L2Norm):
            with torch.no_grad():  # SSD's conv4_3 scale starts at 20
                module.weight.fill_(20.0)


def _scratch(cfg, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from compression import stages as S
    from compression.checkpoint import load_checkpoint, save_checkpoint
    from compression.train import seed_everything

    seed_everything(cfg.seed)
    ckpt = load_checkpoint(spec["architecture"], expect_model=cfg.model.name)
    reinitialise(ckpt.model)
    start = save_checkpoint(ckpt.derive(ckpt.model, stage="prune", phase=None, initialised="random"),
                            work / "random.safetensors")
    epochs = spec["base_epochs"] + extra_epochs(cfg)
    pretrain = cfg.stages.pretrain
    retrain = cfg.stages.retrain
    for key in ("lr", "optimizer", "schedule", "warmup_epochs", "weight_decay", "grad_clip", "momentum"):
        if hasattr(pretrain, key) and hasattr(retrain, key):
            setattr(retrain, key, getattr(pretrain, key))
    retrain.epochs = epochs
    _, metrics = S.retrain(start, cfg, work / "scratch.safetensors", phase=None, base_metrics=spec["base_metrics"])
    return {**_row(metrics, spec["task"]), "epochs": epochs}


def _ablations(cfg, spec: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """The seed rule's parts on one phase over every prunable layer: one sparsity run, each rule / γ from it."""
    from compression import stages as S
    from compression.checkpoint import load_checkpoint, save_checkpoint
    from compression.config import PhaseConfig
    from compression.criteria import select_by_flops
    from compression.models import layer_names
    from compression.pruning import build_dependency_graph
    from compression.selection import filter_sparsity_scores, relative_l1_norms, sparsity_importance
    from compression.selection import select_filters as flag_sparse_filters
    from compression.sparsity import threshold_weights

    phase = PhaseConfig(name="all", layers=list(layer_names(cfg.model.name)))
    cfg.stages.phases = [phase]
    base_metrics = spec["base_metrics"]
    sparse, sparse_metrics = S.induce_sparsity(Path(spec["base"]), cfg, work / "sparse.safetensors", phase=phase,
                                               base_metrics=base_metrics)
    selection = cfg.stages.selection
    rows = []
    for rule, cut in [*ABLATIONS, *((rule, "flops") for rule in FLOPS_ABLATIONS)]:
        ckpt = load_checkpoint(sparse, expect_model=cfg.model.name)
        layers = layer_paths(ckpt.model_name, phase.layers)
        alpha = ckpt.extra.get("alpha")
        thresholded, _ = threshold_weights(ckpt.model, layers, alpha if alpha is not None else 0.0)
        scores = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), layers)
        # One statistic only (or neither): the other never flags or ranks a filter.
        for dropped in {"or": (), "s_out": ("s_in",), "s_in": ("s_out",), "neither": ("s_out", "s_in")}[rule]:
            scores = {name: {**entry, dropped: [0.0] * len(entry[dropped])} for name, entry in scores.items()}
        if cut == "flops":
            ranked = sparsity_importance(scores, relative_l1_norms(ckpt.model, layers))
            chosen, _ = select_by_flops(ckpt.model, ranked, ABLATION_FLOPS, min_channels=selection.min_channels,
                                        round_to=selection.round_to, scope="global",
                                        max_layer_ratio=selection.max_layer_ratio, closest=True)
            method = f"ablation: {rule}, {ABLATION_FLOPS}x FLOPs"
        else:
            chosen = flag_sparse_filters(scores, cut, selection.min_channels, selection.round_to,
                                         selection.max_layer_ratio)
            method = f"ablation: {rule}, γ {cut}"
        removed = sum(len(entry["remove"]) for entry in chosen.values())
        ranked_by_statistic = sum(max(scores[name]["s_out"][f], scores[name]["s_in"][f]) > 0
                                  for name, entry in chosen.items() for f in entry["remove"])
        S.prune_selected(ckpt, chosen, cfg)
        pruned = save_checkpoint(ckpt.derive(ckpt.model, stage="prune", phase="all", rule=rule, cut=cut),
                                 work / f"prune_{rule}_{cut}.safetensors")
        _, metrics = S.retrain(pruned, cfg, work / f"retrain_{rule}_{cut}.safetensors", phase=phase,
                               base_metrics=base_metrics)
        rows.append({"task": spec["task"], "method": method, "seed": spec["seed"], "rule": rule,
                     "gamma": None if cut == "flops" else cut, "filters_removed": removed, "alpha": alpha,
                     "share_ranked_by_statistic": ranked_by_statistic / removed if removed else None,
                     **_row(metrics, spec["task"])})
        print(f"  {method}: {removed} filters removed ({ranked_by_statistic} by a nonzero statistic), params "
              f"{metrics.get('params_ratio', 0):.2f}x, FLOPs {metrics.get('flops_ratio', 0):.2f}x, "
              f"{TASKS[spec['task']]['metric']} {metrics.get(TASKS[spec['task']]['metric'], float('nan')):.4f}",
              flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The base of each task


def prepare_base(task: str, quick: bool, tmp: Path) -> dict[str, Any]:
    from compression import stages as S
    from compression.checkpoint import file_digest, read_metadata
    from compression.data.loaders import ensure_builtin_data
    from compression.measure import stored_metrics

    cfg = task_config(task, 0, quick)
    ensure_builtin_data(cfg.data)
    base = (tmp if quick else CHECKPOINTS) / f"controls_{task}_base.safetensors"
    if not base.exists():
        print(f"{task}: pretraining the base with {TASKS[task]['preset']} (early stopping on validation) -> {base.name}",
              flush=True)
        started = time.perf_counter()
        trained, _ = S.pretrain(cfg, tmp / f"base_{task}.safetensors")
        base.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trained, base)
        print(f"{task}: base trained in {time.perf_counter() - started:.0f} s", flush=True)
    meta = read_metadata(base)
    history = meta.get("extra", {}).get("history") or []
    key = TASKS[task]["metric"]
    curve = [{"epoch": h.get("epoch", i + 1), f"val_{key}": h.get(f"val_{key}"), "loss": h.get("train_loss")}
             for i, h in enumerate(history)]
    metrics = stored_metrics(base)
    return {"base": str(base), "digest": file_digest(base), "config": cfg.config_hash(), "metrics": metrics,
            "epochs": len(history), "curve": curve, "extra_epochs": extra_epochs(cfg),
            "phases": [p.name for p in phases_of(cfg)]}


# --------------------------------------------------------------------------------------------
# Summary


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:  # one seed has no spread to show
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def _points(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values):.2f}"


def summarise(rows: list[dict[str, Any]], bases: dict[str, dict[str, Any]]) -> str:
    parts = []
    for task, base in bases.items():
        key = TASKS[task]["metric"]
        label = "test VOC07 mAP@0.5" if key == "map_voc07" else "test top-1"
        parts.append(f"**{TASKS[task]['label']}** ({label}; base: {base['epochs']} epochs with early stopping, "
                     f"test {base['metrics'].get(key, float('nan')):.4f}; every method trains "
                     f"{base['extra_epochs']} more epochs over phases {', '.join(base['phases'])})\n")
        parts.append("| method | seeds | params ratio | FLOPs ratio | metric | vs dense (points) | val metric |")
        parts.append("|---|---|---|---|---|---|---|")
        ok = [r for r in rows if r["task"] == task and r.get("status", "ok") == "ok"]
        for method in (*METHODS, *(f"ablation: {rule}, γ {gamma}" for rule, gamma in ABLATIONS),
                       *(f"ablation: {rule}, {ABLATION_FLOPS}x FLOPs" for rule in FLOPS_ABLATIONS)):
            mine = [r for r in ok if r["method"] == method]
            if not mine:
                continue
            deltas = [r["metric"] - r["dense_metric"] for r in mine
                      if r.get("dense_metric") is not None and r.get("metric") is not None]
            parts.append(f"| {method} | {len(mine)} | {_mean_sd([r['params_ratio'] for r in mine])} | "
                         f"{_mean_sd([r['flops_ratio'] for r in mine])} | {_mean_sd([r['metric'] for r in mine])} | "
                         f"{_points(deltas)} | {_mean_sd([r.get('val_metric') for r in mine])} |")
        parts.append("")
        if base["curve"]:
            parts.append("Base validation curve: " + ", ".join(
                f"{c['epoch']}: {c[f'val_{key}']:.3f}" for c in base["curve"] if c.get(f"val_{key}") is not None))
            parts.append("")
        parts.extend(verdicts(ok, task))
        parts.extend(f"- {r['method']} seed {r['seed']} stopped short of the seed's FLOPs in "
                     f"{'; '.join(r['flops_short_of_target'])} (its floors, min_channels and max_layer_ratio, allow no more)"
                     for r in ok if r.get("flops_short_of_target"))
        parts.append("")
    return "\n".join(parts)


def verdicts(rows: list[dict[str, Any]], task: str) -> list[str]:
    def mean(method: str, field: str) -> float | None:
        values = [r[field] for r in rows if r["method"] == method and r.get(field) is not None]
        return statistics.fmean(values) if values else None

    seed, dense = mean("seed", "metric"), mean("dense", "metric")
    if seed is None or dense is None:
        return ["- not enough finished runs for a verdict"]
    lines = [f"- seed vs dense: {100 * (seed - dense):+.2f} points at {mean('seed', 'params_ratio'):.2f}x fewer "
             f"parameters and {mean('seed', 'flops_ratio'):.2f}x fewer FLOPs (mean of seeds)"]
    for other in ("l1_norm", "group_norm", "scratch"):
        value = mean(other, "metric")
        if value is not None:
            lines.append(f"- seed vs {other}: {100 * (seed - value):+.2f} points "
                         f"({other} at {mean(other, 'flops_ratio'):.2f}x fewer FLOPs, "
                         f"{mean(other, 'params_ratio'):.2f}x fewer parameters)")
    return lines


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("det", "cls", "both"), default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=(*METHODS, "ablation"), default=None)
    parser.add_argument("--jobs", type=int, default=2, help="units in parallel, one process each")
    parser.add_argument("--resume", action="store_true", help="keep the finished units of the partial file")
    parser.add_argument("--redo", nargs="+", choices=(*METHODS, "ablation"), default=[],
                        help="with --resume: run these methods again (after a change to how they run)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, 1 epoch per stage, 1 seed")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the results from the partial file's finished units (implies --resume)")
    args = parser.parse_args()
    tasks = ["det", "cls"] if args.task == "both" else [args.task]
    seeds = [args.seeds[0]] if args.quick else sorted(set(args.seeds))
    methods = list(args.only or (*METHODS, "ablation"))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    partial = RESULTS / ("controls.quick.partial.json" if args.quick else "controls.partial.json")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="controls-") as tmp_name:
        tmp = Path(tmp_name)
        bases = {task: prepare_base(task, args.quick, tmp) for task in tasks}
        done: dict[str, dict[str, Any]] = {}
        if (args.resume or args.report) and partial.exists():
            previous = json.loads(partial.read_text())
            if any(previous.get("bases", {}).get(t, {}).get("digest") not in (None, bases[t]["digest"]) for t in tasks):
                sys.exit(f"error: {partial}: made from another base; drop --resume to start over")
            done = {key: unit for key, unit in previous.get("units", {}).items() if unit.get("status") == "ok"}
            # A task whose preset changed since its units ran is redone (a file that predates recording the
            # preset is trusted); --redo redoes the methods named; a task not run now keeps its results.
            for task in tasks:
                if previous.get("bases", {}).get(task, {}).get("config", bases[task]["config"]) != bases[task]["config"]:
                    stale = [key for key in done if key.startswith(f"{task}/")]
                    if stale and args.only:  # dropping them would leave the methods not named with no rows
                        sys.exit(f"error: {task}: {TASKS[task]['preset']} changed since its {len(stale)} finished "
                                 "units ran, so every method must run again: drop --only (nothing was written)")
                    if stale:
                        print(f"{task}: {TASKS[task]['preset']} changed since its {len(stale)} finished units ran; "
                              "they are redone", flush=True)
                    for key in stale:
                        del done[key]
            for key in [key for key in done if key.split("/")[0] in tasks and key.split("/")[1] in args.redo]:
                del done[key]
            for task, base in previous.get("bases", {}).items():
                bases.setdefault(task, base)
        RESULTS.mkdir(parents=True, exist_ok=True)

        def save() -> None:
            partial.write_text(json.dumps({"bases": bases, "units": done}, indent=1, default=str))

        save()
        keep_dir = (tmp if args.quick else CHECKPOINTS) / "controls"
        todo = [(task, method, seed) for task in tasks for method in methods for seed in seeds
                if not (method == "ablation" and (task != "det" or seed != seeds[0]))
                and f"{task}/{method}/{seed}" not in done and not args.report]
        needs_seed = {"l1_norm", "group_norm", "scratch"}

        def ready(unit: tuple[str, str, int]) -> bool:
            task, method, seed = unit
            return method not in needs_seed or f"{task}/seed/{seed}" in done

        def spec(unit: tuple[str, str, int]) -> dict[str, Any]:
            task, method, seed = unit
            out = {"task": task, "method": method, "seed": seed, "quick": args.quick, "threads": threads,
                   "work": str(tmp), "base": bases[task]["base"], "base_metrics": bases[task]["metrics"],
                   "base_epochs": bases[task]["epochs"], "keep": str(keep_dir / f"{task}_seed_{seed}.safetensors")}
            if method in needs_seed:
                seeded = done[f"{task}/seed/{seed}"]
                out.update(phase_flops_ratios=seeded["phase_flops_ratios"], architecture=seeded["architecture"])
            return out

        print(f"{len(todo)} units to do ({len(done)} done); {args.jobs} job(s) x {threads} thread(s)", flush=True)
        running: dict[Future, tuple[str, str, int]] = {}
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_die_with_parent) as pool:
            while todo or running:
                startable = sorted((u for u in todo if ready(u)), key=lambda u: (ORDER[(u[0], u[1])], u[2]))
                while startable and len(running) < args.jobs:
                    unit = startable.pop(0)
                    todo.remove(unit)
                    running[pool.submit(run_unit, spec(unit))] = unit
                if not running:  # what is left waits on a seed run that failed or was not run
                    print(f"skipped (no finished seed run of the same seed): {todo}", flush=True)
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task, method, seed = running.pop(future)
                    result = future.result()
                    if result["status"] == "ok":
                        done[f"{task}/{method}/{seed}"] = result
                    save()
                    key = TASKS[task]["metric"]
                    shown = (f"{key} {result.get('metric', float('nan')):.4f}, params {result.get('params_ratio') or 1:.2f}x, "
                             f"FLOPs {result.get('flops_ratio') or 1:.2f}x" if result["status"] == "ok" and method != "ablation"
                             else result.get("error", "ablations done"))
                    print(f"[{time.perf_counter() - started:6.0f}s] {task} {method} seed {seed}: {result['status']}: "
                          f"{shown} ({result['wall_seconds']:.0f} s)", flush=True)

    rows = []
    for unit in done.values():
        if unit["method"] == "ablation":
            rows.extend(unit["ablations"])
        else:
            rows.append({k: v for k, v in unit.items() if k not in ("architecture",)})
    dense = {(r["task"], r["seed"]): r["metric"] for r in rows if r["method"] == "dense"}
    for row in rows:
        row["dense_metric"] = dense.get((row["task"], row["seed"]))
    rows.sort(key=lambda r: (r["task"], r["method"], r["seed"]))
    missing = [f"{t}/{m}/{s}" for t in tasks for m in methods for s in seeds
               if f"{t}/{m}/{s}" not in done and not (m == "ablation" and (t != "det" or s != seeds[0]))]
    bases = {task: bases[task] for task in TASKS if task in bases}  # det first, whichever ran now
    markdown = summarise(rows, bases)
    if missing:
        markdown += f"\nNot run (or failed) yet: {', '.join(missing)}.\n"
    name = "controls.quick" if args.quick else "controls"
    out = write_result(name, {"tasks": list(bases), "seeds": seeds, "bases": bases, "rows": rows, "missing": missing,
                              "total_seconds": time.perf_counter() - started, "markdown": markdown})
    print(markdown)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
