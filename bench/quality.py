"""Quality at equal FLOPs (issue: quality): the seed method, the other criteria and torch-pruning's pruners.

    .venv/bin/python bench/quality.py [--task det|cls|both] [--targets 2 4 8] [--seeds 0 1 2] [--epochs N]
        [--methods ...] [--base-det CKPT] [--base-cls CKPT] [--max-layer-ratio R] [--jobs N] [--resume] [--quick]

One pretrained checkpoint per task: det = ssd_vgg_lite on digits-voc (bench/checkpoints/pretrain.safetensors,
from bench/pretrain.py), cls = vgg16_cifar on digits-cls (bench/checkpoints/pretrain_cls.safetensors); a missing
one is trained here once with its preset (compression/configs/default.yaml, compression/configs/digits_cls.yaml) and kept. Every
method prunes the same layers, all prunable convs of the backbone in one phase (the SSD loc/conf head convs and
the classifier's output layer only lose input channels), down to the same FLOPs target with at most
--max-layer-ratio (0.8) of any layer's filters removed, and then fine-tunes
with the same budget: stages.retrain with the preset's retrain optimiser and schedule for --epochs epochs on
the first --train-images training images. How each method reaches the target:

- seed: induce_sparsity (λ·Σ‖W‖₁ for --epochs epochs, α chosen on the validation split), then the filters ranked
  globally by max(s_out, s_in) and cut at the FLOPs budget (select_filters with criterion seed and
  target_flops_ratio), removed from Θ_L1;
- l1_norm / bn_scale / random: scores per layer, the smallest share per layer that reaches the budget
  (criteria.select_by_flops); bn_scale runs on the classifier only unless asked for;
- taylor: Molchanov's loop (taylor_prune_stage) until the budget, with its own fine-tuning batches between
  steps, reported as extra batches;
- tp_group_l1 / tp_bn_scale / tp_group_norm: torch-pruning's MagnitudePruner (group L1) / BNScalePruner /
  GroupNormPruner, global, stepped until the budget (compression/tp_pruners.py); the last two after --epochs
  epochs of sparse training with pruner.regularize (the seed's sparsity optimiser), as the seed's induction.

Writes bench/results/quality.json (its `markdown` key is the table bench/report.py renders), quality.png, and
after every finished run bench/results/quality.partial.json (quality.quick.partial.json for --quick):
--resume skips the (task, method, target, seed) runs it holds. Intermediate checkpoints live in a temp dir.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import CHECKPOINTS, RESULTS, write_result  # noqa: E402

METHODS = ("seed", "taylor", "l1_norm", "bn_scale", "random", "tp_group_l1", "tp_bn_scale", "tp_group_norm")
PRE_TRAINED = ("seed", "tp_bn_scale", "tp_group_norm")  # a training phase before pruning (same epochs)
TASKS: dict[str, dict[str, Any]] = {
    "det": {"preset": "default", "base": CHECKPOINTS / "pretrain.safetensors", "metrics": ("map_voc07", "map_coco"),
            "methods": tuple(m for m in METHODS if m != "bn_scale"), "label": "ssd_vgg_lite on digits-voc"},
    "cls": {"preset": "digits_cls", "base": CHECKPOINTS / "pretrain_cls.safetensors", "metrics": ("top1",),
            "methods": METHODS, "label": "vgg16_cifar on digits-cls"},
}
LABELS = {"map_voc07": "mAP VOC07", "map_coco": "mAP COCO", "top1": "top-1"}
# The default budget: both tasks x 3 targets x 3 seeds x every method in about an hour on 2 cores (--jobs 2).
# det takes the first N images of each split (data.max_images: 500 keeps the whole test split); cls, whose
# ImageFolder lists the images class by class, gets the first N training images of the built-in generator
# (balanced: image i shows digit i mod 10) and its whole val/test splits (or eval_images of each).
FULL = {"det": {"epochs": 2, "train_images": 1000}, "cls": {"epochs": 1, "train_images": 5000}}
QUICK = {"det": {"epochs": 1, "train_images": 48}, "cls": {"epochs": 1, "train_images": 200, "eval_images": 200}}
FULL_SEEDS, FULL_TARGETS = (0, 1, 2), (2.0, 4.0, 8.0)
# Every method may remove at most this share of a layer's filters (torch-pruning's max_pruning_ratio). Without
# it the global rankings (seed, taylor, torch-pruning's) squeezed conv3_3 .. fc6 of the detector to
# min_channels at 4x (seed: VOC07 0.004 after fine-tuning); the per-layer ones (l1_norm, random) remove ~0.5.
# 0.75 would cap ssd_vgg_lite at 7.9x fewer FLOPs, short of the 8x target; 0.8 allows 9.2x.
MAX_LAYER_RATIO = 0.8
# Taylor: scoring and fine-tuning batches per step; a step removes this share of the phase's filters.
TAYLOR = {"taylor_batches": 2, "taylor_finetune_batches": 2, "step_fraction": 0.08}


# --------------------------------------------------------------------------------------------
# Configuration


def task_config(task: str, budget: dict[str, Any], seed: int, base_args: dict[str, Any], data: list[str]):
    """The task's preset with the benchmark's budget, seed, one phase over every prunable layer, the base's shape.

    ``data``: overrides of the data section (``_data_overrides``).
    """
    from compression.config import PhaseConfig, load_config
    from compression.models import layer_names

    epochs = budget["epochs"]
    overrides = [*data, f"seed={seed}", f"stages.selection.seed={seed}",
                 f"stages.selection.max_layer_ratio={budget['max_layer_ratio']}",
                 f"stages.retrain.epochs={epochs}", f"stages.sparsity.epochs={epochs}",
                 f"stages.selection.taylor_batches={TAYLOR['taylor_batches']}",
                 f"stages.selection.taylor_finetune_batches={TAYLOR['taylor_finetune_batches']}"]
    overrides += [f"model.{key}={base_args[key]}" for key in ("width_mult", "image_size") if key in base_args]
    cfg = load_config(TASKS[task]["preset"], overrides)
    layers = list(layer_names(cfg.model.name))
    cfg.stages.phases = [PhaseConfig(name="all", layers=layers)]
    return cfg


def _taylor_step(cfg) -> int:
    from compression.models import build_model
    from compression.pruning import layer_channels

    model = build_model(cfg.model.name, num_classes=2, **{k: v for k, v in (
        ("width_mult", cfg.model.width_mult), ("image_size", cfg.model.image_size)) if v is not None})
    total = sum(layer_channels(model.get_submodule(path)) for path in _layer_paths(cfg))
    return max(1, math.ceil(TAYLOR["step_fraction"] * total))


def _layer_paths(cfg) -> list[str]:
    from compression.models import layer_names

    paths = layer_names(cfg.model.name)
    return [paths.get(name, name) for name in cfg.stages.phases[0].layers]


def _with_selection(cfg, **selection):
    out = cfg.model_copy(deep=True)
    for key, value in selection.items():
        setattr(out.stages.selection, key, value)
    return out


# --------------------------------------------------------------------------------------------
# Time accounting: wall and CPU (this process and its reaped children, e.g. DataLoader workers)


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block; ``split`` files the CPU under train / eval / fixed for the estimate."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, _cpu() - self.cpu0

    def split(self, train_wall: float = 0.0, eval_wall: float = 0.0) -> dict[str, float]:
        """CPU per kind of work: training scales with epochs x images, evaluation with the eval images."""
        ratio = self.cpu / max(self.wall, 1e-9)
        train = min(self.cpu, train_wall * ratio)
        evaluation = min(self.cpu - train, eval_wall * ratio)
        return {"train": train, "eval": evaluation, "fixed": self.cpu - train - evaluation}


def _add(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value
    return total


# --------------------------------------------------------------------------------------------
# One unit of work: (task, method, seed) over the targets, sharing the pre-pruning phase


def run_unit(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from compression import stages as S
    from compression.checkpoint import read_metadata

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    task, method, seed = spec["task"], spec["method"], spec["seed"]
    cfg = task_config(task, spec["budget"], seed, spec["base_args"], spec["data"])
    cfg = _with_selection(cfg, taylor_step_filters=spec["taylor_step"])
    phase = cfg.stages.phases[0]
    work = Path(spec["work_dir"]) / f"{task}_{method}_seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    base_path, base_metrics = Path(spec["base"]), spec["base_metrics"]
    pre: dict[str, Any] = {"seconds": 0.0, "cpu": {}, "info": {}}
    source, pre_error = base_path, None
    try:
        if method == "seed":
            with Clock() as clock:
                source, metrics = S.induce_sparsity(base_path, cfg, work / "sparse.safetensors", phase=phase,
                                                    base_metrics=base_metrics)
            train_wall = sum(h.get("epoch_seconds", 0.0) for h in read_metadata(source)["extra"].get("history", []))
            pre = {"seconds": clock.wall, "cpu": clock.split(train_wall, clock.wall - train_wall),
                   "info": {"alpha": metrics.get("alpha"), "val_drop": metrics.get("val_drop"),
                            "weight_sparsity_after": metrics.get("weight_sparsity_after")}}
        elif method in ("tp_bn_scale", "tp_group_norm"):
            with Clock() as clock:
                source, info = _tp_sparse_training(method, base_path, cfg, work / "sparse.safetensors")
            pre = {"seconds": clock.wall, "cpu": clock.split(train_wall=clock.wall), "info": info}
    except Exception as exc:  # noqa: BLE001 - recorded in the table; the other units go on
        pre_error = f"{type(exc).__name__}: {exc}"
    records = []
    for target in spec["targets"]:
        record: dict[str, Any] = {"task": task, "method": method, "target": target, "seed": seed,
                                  "pre_seconds": pre["seconds"], "pre_cpu": pre["cpu"], "pre_info": pre["info"],
                                  "pre_epochs": cfg.stages.sparsity.epochs if method in PRE_TRAINED else 0,
                                  "retrain_epochs": cfg.stages.retrain.epochs}
        if pre_error is not None:
            record.update(status="failed", error=pre_error)
        else:
            try:
                record.update(_run_target(method, target, source, cfg, phase, work, base_metrics,
                                          spec["measure_pruned"]))
                record["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - a failed run is a row of the table, not the end of the benchmark
                record.update(status="failed", error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        record["wall_seconds"] = pre["seconds"] + record.get("own_seconds", 0.0)
        _save_run(spec["partial"], spec["lock"], record)
        print(_progress_line(record, TASKS[task]["metrics"][0]), flush=True)
        records.append(record)
    return records


def _tp_sparse_training(method: str, base_path: Path, cfg, out: Path) -> tuple[Path, dict[str, Any]]:
    """The sparse training torch-pruning's README shows for its pruner, with the seed's sparsity optimiser."""
    from compression.checkpoint import load_checkpoint, save_checkpoint
    from compression.config import OptimConfig
    from compression.data.loaders import build_loader
    from compression.models import model_input_size
    from compression.tp_pruners import DEFAULT_REG, build_pruner, sparse_train
    from compression.train import make_objective, seed_everything

    ckpt = load_checkpoint(base_path, expect_model=cfg.model.name)
    seed_everything(cfg.seed)
    pruner = build_pruner(method, ckpt.model, _layer_paths(cfg), model_name=ckpt.model_name)
    objective = make_objective(ckpt.model, ckpt.task, fast_ssd=cfg.compute.fast_ssd)
    loader = build_loader(cfg.data, "train", train=True, image_size=model_input_size(ckpt.model)[0], seed=cfg.seed)
    optim = OptimConfig.model_validate(cfg.stages.sparsity.model_dump(include=set(OptimConfig.model_fields)))
    history = sparse_train(pruner, ckpt.model, objective, loader, optim, context=f"{method} sparse training")
    ckpt.model.cpu()
    trained = ckpt.derive(ckpt.model, stage="sparsity", phase="all", method=method, reg=DEFAULT_REG[method],
                          history=history)
    return save_checkpoint(trained, out), {"reg": DEFAULT_REG[method], "epochs": len(history)}


def _run_target(method: str, target: float, source: Path, cfg, phase, work: Path,
                base_metrics: dict[str, Any], measure_pruned: bool) -> dict[str, Any]:
    """Prune ``source`` to base FLOPs / ``target`` with ``method``, fine-tune, measure.

    The pruned model is measured before fine-tuning only with ``measure_pruned`` (a broken detector's
    evaluation is slow), except for taylor, whose stage always measures its output.
    """
    from compression import stages as S
    from compression.checkpoint import read_metadata
    from compression.measure import evaluate_checkpoint

    tag = f"{target:g}x"
    cpu: dict[str, float] = {}
    extra: dict[str, Any] = {}
    with Clock() as prune_clock:
        if method == "taylor":
            cfg_t = _with_selection(cfg, criterion="taylor", target_flops_ratio=target)
            pruned, pruned_metrics = S.taylor_prune_stage(source, cfg_t, work / f"taylor_{tag}.safetensors",
                                                          phase=phase, base_metrics=base_metrics)
            steps = int(pruned_metrics.get("taylor_steps", 0))
            selection = cfg_t.stages.selection
            extra = {"taylor_steps": steps, "taylor_step_filters": selection.taylor_step_filters,
                     "extra_batches": steps * selection.taylor_batches
                     + max(0, steps - 1) * selection.taylor_finetune_batches}
        else:
            pruned = work / f"prune_{tag}.safetensors"
            if method.startswith("tp_"):
                info = _tp_prune(method, target, source, cfg, phase, pruned)
                extra = {"tp_steps": info["steps"]}
            else:
                cfg_t = _with_selection(cfg, criterion=method, target_flops_ratio=target)
                selection, _ = S.select_filters(source, cfg_t, work / f"selection_{tag}.json", phase=phase)
                _prune_selection(source, selection, cfg_t, phase, pruned)
            pruned_metrics = (evaluate_checkpoint(pruned, cfg, base=base_metrics, latency=False)
                              if measure_pruned else {})
    _add(cpu, prune_clock.split(eval_wall=pruned_metrics.get("eval_seconds", 0.0)))
    shapes = read_metadata(pruned)["module_shapes"]
    extra["channels"] = {path.rpartition(".")[2]: shapes[path]["out_channels"] for path in _layer_paths(cfg)}
    with Clock() as retrain_clock:
        _, metrics = S.retrain(pruned, cfg, work / f"retrain_{tag}.safetensors", phase=phase, base_metrics=base_metrics)
    _add(cpu, retrain_clock.split(metrics.get("stage_seconds", 0.0), metrics.get("eval_seconds", 0.0)))
    keys = ("params", "nonzero_params", "size_bytes", "flops", "params_ratio", "size_bytes_ratio", "flops_ratio",
            "map_voc07", "map_voc", "map_coco", "top1", "map_voc07_drop", "top1_drop", "latency_b1_ms",
            "latency_b32_ms", "eval_seconds")
    record = {key: metrics[key] for key in keys if key in metrics}
    if "map_coco" in metrics and "map_coco" in base_metrics:
        record["map_coco_drop"] = base_metrics["map_coco"] - metrics["map_coco"]
    record["pruned"] = {key: pruned_metrics[key] for key in ("map_voc07", "map_coco", "top1", "flops_ratio", "params")
                        if key in pruned_metrics}
    record.update(extra, prune_seconds=prune_clock.wall, retrain_seconds=retrain_clock.wall,
                  own_seconds=prune_clock.wall + retrain_clock.wall, cpu=cpu)
    return record


def _prune_selection(source: Path, selection: Path, cfg, phase, out: Path) -> None:
    """``stages.prune`` without its measurement: the selected filters out of ``source``, saved to ``out``."""
    from compression import stages as S
    from compression.checkpoint import load_checkpoint, save_checkpoint
    from compression.files import read_selection

    record = read_selection(selection)
    ckpt = load_checkpoint(source, expect_model=cfg.model.name)
    S.prune_selected(ckpt, record["layers"], cfg)
    save_checkpoint(ckpt.derive(ckpt.model, stage="prune", phase=phase.name, selection=str(selection),
                                criterion=record.get("criterion"), alpha=record.get("alpha")), out)


def _tp_prune(method: str, target: float, source: Path, cfg, phase, out: Path) -> dict[str, Any]:
    from compression.checkpoint import load_checkpoint, save_checkpoint
    from compression.tp_pruners import build_pruner, prune_to_flops

    ckpt = load_checkpoint(source, expect_model=cfg.model.name)
    pruner = build_pruner(method, ckpt.model, _layer_paths(cfg), model_name=ckpt.model_name)
    info = prune_to_flops(pruner, ckpt.model, target, min_channels=cfg.stages.selection.min_channels,
                          max_layer_ratio=cfg.stages.selection.max_layer_ratio)
    del pruner
    pruned = ckpt.derive(ckpt.model, stage="prune", phase=phase.name, criterion=method, tp_steps=info["steps"],
                         channels=info["channels"])
    save_checkpoint(pruned, out)
    return info


def _progress_line(record: dict[str, Any], metric: str) -> str:
    head = f"{record['task']} {record['method']:<13} {record['target']:g}x seed {record['seed']}:"
    if record["status"] != "ok":
        return f"{head} FAILED ({record.get('error')})"
    before = record["pruned"].get(metric)
    return (f"{head} {metric} {record.get(metric, float('nan')):.4f}"
            + (f" (before fine-tuning {before:.4f})" if before is not None else "")
            + f", {record.get('flops_ratio', float('nan')):.2f}x FLOPs, {record['wall_seconds']:.0f} s")


# --------------------------------------------------------------------------------------------
# The partial results file (written by every worker after each run, under a lock)


def _key(task: str, method: str, target: float, seed: int) -> str:
    return f"{task}/{method}/{float(target):g}/{seed}"


def _save_run(partial: str, lock: str, record: dict[str, Any]) -> None:
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            path = Path(partial)
            data = json.loads(path.read_text())
            data["runs"][_key(record["task"], record["method"], record["target"], record["seed"])] = record
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str))
            os.replace(tmp, path)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Preparation in the parent: data, base checkpoints, their measurements


def _used_sizes(task: str, budget: dict[str, Any], sizes: dict[str, int]) -> dict[str, int]:
    """Images of each split a run with ``budget`` uses."""
    if task == "det":
        return {split: min(budget["train_images"], n) for split, n in sizes.items()}
    evaluated = budget.get("eval_images")
    return {"train": min(budget["train_images"], sizes["train"]),
            **{split: min(evaluated or n, n) for split in ("val", "test") for n in (sizes[split],)}}


def _data_overrides(task: str, preset, used: dict[str, int], sizes: dict[str, int], tmp: Path) -> list[str]:
    if used == sizes:
        return []
    if task == "det":
        return [f"data.max_images={used['train']}"]
    from compression.data.digits import write_digits_cls

    root = write_digits_cls(tmp / "digits-cls", seed=preset.data.seed, num_images=used)
    return [f"data.root={root}", "data.builtin=null"]


def _prepare_task(task: str, budget: dict[str, Any], base_arg: Path | None, quick: bool, tmp: Path) -> dict[str, Any]:
    from compression import stages as S
    from compression.checkpoint import file_digest, read_metadata
    from compression.config import load_config
    from compression.data.loaders import build_dataset, ensure_builtin_data
    from compression.measure import evaluate_checkpoint

    preset = load_config(TASKS[task]["preset"])
    ensure_builtin_data(preset.data)
    sizes = {split: len(build_dataset(preset.data, split, train=False, image_size=preset.model.image_size or 32))
             for split in ("train", "val", "test")}
    used = _used_sizes(task, budget, sizes)
    data = _data_overrides(task, preset, used, sizes, tmp)
    base = Path(base_arg) if base_arg is not None else TASKS[task]["base"]
    if not base.exists():
        if base_arg is not None:
            sys.exit(f"error: {base}: base checkpoint not found")
        if quick:  # a throwaway base, so a smoke run works before the real one exists
            print(f"{task}: {base} missing; --quick pretrains a throwaway base (1 epoch)", flush=True)
            cfg = load_config(TASKS[task]["preset"], [*data, "stages.pretrain.epochs=1"])
            base, _ = S.pretrain(cfg, tmp / f"base_{task}.safetensors")
        else:  # once, with the preset as it is (for det what bench/pretrain.py does), kept for later runs
            print(f"{task}: pretraining {preset.model.name} with compression/configs/{TASKS[task]['preset']}.yaml once -> {base}",
                  flush=True)
            started = time.perf_counter()
            trained, _ = S.pretrain(preset, tmp / f"pretrain_{task}.safetensors")
            base.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trained, base)
            print(f"{task}: pretrained in {time.perf_counter() - started:.0f} s", flush=True)
    meta = read_metadata(base)
    cfg = task_config(task, budget, 0, meta["model_args"], data)
    base_metrics = evaluate_checkpoint(base, cfg)
    return {"base": str(base), "base_digest": file_digest(base), "base_args": meta["model_args"],
            "base_metrics": base_metrics, "split_sizes": sizes, "used_sizes": used, "data": data,
            "taylor_step": _taylor_step(cfg), "layers": len(cfg.stages.phases[0].layers), "model": cfg.model.name,
            "budget": budget}


# --------------------------------------------------------------------------------------------
# Table, verdict, figure, estimate

HOW = """How each method reaches the FLOPs target (same layers: every prunable conv of the backbone, one phase; every
layer keeps at least the preset's min_channels filters):

- **seed**: sparsity induction (λ·Σ‖W‖₁, α on the validation split), then filters ranked globally by
  max(s_out, s_in) on Θ_L1^th and removed from Θ_L1, sparsest first, until the FLOPs budget
  (`stages.selection.criterion: seed` with `target_flops_ratio`);
- **l1_norm / bn_scale / random**: scores per layer, the smallest per-layer share that reaches the budget
  (`criteria.select_by_flops`);
- **taylor**: Molchanov's loop (`taylor_prune_stage`), a few filters at a time with fine-tuning batches between
  steps, until the budget;
- **tp_group_l1 / tp_bn_scale / tp_group_norm**: torch-pruning's `MagnitudePruner` (group L1) / `BNScalePruner` /
  `GroupNormPruner`, global ranking, `pruner.step()` until the budget, the last step cut at it
  (`compression/tp_pruners.py`); BNScale and GroupNorm after sparse training with `pruner.regularize`."""


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = _mean_sd(values)
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def summarize(runs: list[dict[str, Any]], tasks: list[str], methods: dict[str, list[str]],
              targets: list[float]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        metric_keys = TASKS[task]["metrics"]
        for method in methods[task]:
            for target in targets:
                group = [r for r in runs if (r["task"], r["method"], float(r["target"])) == (task, method, target)]
                ok = [r for r in group if r["status"] == "ok"]
                row: dict[str, Any] = {"task": task, "method": method, "target": target, "runs": len(group),
                                       "ok": len(ok), "errors": sorted({r["error"] for r in group if r["status"] != "ok"})}
                for key in ("flops", "flops_ratio", "params", "params_ratio", "size_bytes", "wall_seconds",
                            *metric_keys, f"{metric_keys[0]}_drop", "extra_batches"):
                    row[key] = _mean_sd([r.get(key) for r in ok])
                row["pruned"] = _mean_sd([r["pruned"].get(metric_keys[0]) for r in ok])
                row["pre_epochs"] = ok[0]["pre_epochs"] if ok else None
                row["retrain_epochs"] = ok[0]["retrain_epochs"] if ok else None
                rows.append(row)
    return rows


def _table(task: str, runs: list[dict[str, Any]], methods: list[str], targets: list[float],
           prep: dict[str, Any]) -> str:
    keys = TASKS[task]["metrics"]
    base = prep["base_metrics"]
    header = ["method", "target", "FLOPs (M)", "FLOPs ratio", "params (k)", "size (KB)",
              *(LABELS[k] for k in keys), f"{LABELS[keys[0]]} drop (pts)", f"{LABELS[keys[0]]} before fine-tuning",
              "epochs (pre + fine-tune)", "extra batches", "wall (s)", "seeds ok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| pretrained | 1x | " + " | ".join([
        f"{base['flops'] / 1e6:.1f}", "1.00", f"{base['params'] / 1e3:.1f}", f"{base['size_bytes'] / 1024:.0f}",
        *(f"{base[k]:.3f}" for k in keys), "0", "", "", "", "", ""]) + " |")
    for method in methods:
        for target in targets:
            group = [r for r in runs if (r["task"], r["method"], float(r["target"])) == (task, method, target)]
            ok = [r for r in group if r["status"] == "ok"]
            if not group:
                continue
            if not ok:
                lines.append(f"| {method} | {target:g}x | failed: {group[0].get('error', '')[:80]} |")
                continue
            pre = ok[0]["pre_epochs"]
            cells = [
                method, f"{target:g}x", _pm([r["flops"] for r in ok], 1e-6, 1), _pm([r["flops_ratio"] for r in ok], 1, 2),
                _pm([r["params"] for r in ok], 1e-3, 1), _pm([r["size_bytes"] for r in ok], 1 / 1024, 0),
                *(_pm([r.get(k) for r in ok]) for k in keys), _pm([r.get(f"{keys[0]}_drop") for r in ok], 100, 1),
                _pm([r["pruned"].get(keys[0]) for r in ok]), f"{pre} + {ok[0]['retrain_epochs']}",
                _pm([r.get("extra_batches") for r in ok], 1, 0) if method == "taylor" else "0",
                _pm([r["wall_seconds"] for r in ok], 1, 0), f"{len(ok)}/{len(group)}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed_stats(runs: list[dict[str, Any]], task: str, method: str, target: float) -> tuple[float, float | None, int]:
    key = TASKS[task]["metrics"][0]
    values = [r.get(key) for r in runs if r["task"] == task and r["method"] == method
              and float(r["target"]) == target and r["status"] == "ok"]
    mean, sd = _mean_sd(values)
    return mean, sd, len(values)


def _verdicts(runs: list[dict[str, Any]], tasks: list[str], targets: list[float]) -> list[str]:
    """The issue's target: at 4x fewer FLOPs the seed method's metric >= torch-pruning Group-L1's and random's."""
    target = 4.0 if 4.0 in targets else max(targets)
    lines = []
    for task in tasks:
        key = TASKS[task]["metrics"][0]
        seed = _seed_stats(runs, task, "seed", target)
        others = {name: _seed_stats(runs, task, name, target) for name in ("tp_group_l1", "random")}
        if seed[2] == 0 or not all(o[2] for o in others.values()):
            lines.append(f"- {task} at {target:g}x: not every method of the comparison ran (seed, tp_group_l1, random).")
            continue
        beats = all(seed[0] >= o[0] for o in others.values())
        detail = ", ".join(f"{name} {o[0]:.4f}" + (f" ± {o[1]:.4f}" if o[1] is not None else "")
                           for name, o in others.items())
        spread = f" ± {seed[1]:.4f}" if seed[1] is not None else ""
        lines.append(f"- {task} at {target:g}x fewer FLOPs: seed {LABELS[key]} {seed[0]:.4f}{spread} vs {detail}: "
                     + ("**met** (seed ≥ both, means over seeds)" if beats else "**not met** (seed below at least one)"))
    return lines


def make_figure(runs: list[dict[str, Any]], tasks: list[str], methods: dict[str, list[str]], targets: list[float],
                preps: dict[str, dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        key = TASKS[task]["metrics"][0]
        base = preps[task]["base_metrics"]
        for method in methods[task]:
            xs, ys, errs = [], [], []
            for target in targets:
                ok = [r for r in runs if (r["task"], r["method"], float(r["target"])) == (task, method, target)
                      and r["status"] == "ok"]
                if ok:
                    xs.append(_mean_sd([r["flops"] for r in ok])[0] / 1e6)
                    mean, sd = _mean_sd([r.get(key) for r in ok])
                    ys.append(mean)
                    errs.append(sd or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, lw=1.2,
                            ls="-" if not method.startswith("tp_") else "--", label=method)
        ax.plot([base["flops"] / 1e6], [base[key]], marker="*", ms=12, color="black", ls="none", label="pretrained")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("FLOPs (M, log scale)")
        ax.set_ylabel(LABELS[key])
        ax.set_title(f"{task}: {TASKS[task]['label']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _scaled(cpu: dict[str, float], scales: dict[str, float]) -> float:
    return sum(cpu.get(kind, 0.0) * scale for kind, scale in scales.items())


def estimate_full(runs: list[dict[str, Any]], preps: dict[str, dict[str, Any]], seeds: list[int],
                  targets: list[float], methods: dict[str, list[str]]) -> dict[str, Any]:
    """CPU seconds of the default benchmark, scaled from ``runs``' CPU time per kind of work.

    Training CPU scales with epochs x training images, evaluation CPU with the evaluated images (test split),
    the rest (selection, torch-pruning steps, Taylor's fixed batches, latency) not at all; then with the
    number of seeds, targets and methods of the default run (the pre-pruning phase once per method and seed).
    """
    out: dict[str, Any] = {}
    total = 0.0
    for task, prep in preps.items():
        sizes, used, full = prep["split_sizes"], prep["budget"], FULL[task]
        full_used, now_used = _used_sizes(task, full, sizes), prep["used_sizes"]
        train_scale = full["epochs"] * full_used["train"] / max(1, used["epochs"] * now_used["train"])
        eval_scale = full_used["test"] / max(1, now_used["test"])
        ran = [r for r in runs if r["task"] == task and r["status"] == "ok" and r.get("cpu")]
        if not ran:
            continue

        scales = {"train": train_scale, "eval": eval_scale, "fixed": 1.0}
        per_run = sum(_scaled(r["cpu"], scales) for r in ran) / len(ran)
        units = {(r["method"], r["seed"]): r["pre_cpu"] for r in ran}
        pre_units = [_scaled(cpu, scales) for (method, _), cpu in units.items() if method in PRE_TRAINED]
        pre_per_unit = sum(pre_units) / len(pre_units) if pre_units else 0.0
        full_methods = TASKS[task]["methods"]
        n_runs = len(full_methods) * len(FULL_TARGETS) * len(FULL_SEEDS)
        n_pre = sum(m in PRE_TRAINED for m in full_methods) * len(FULL_SEEDS)
        seconds = per_run * n_runs + pre_per_unit * n_pre
        out[task] = {"cpu_seconds": seconds, "runs": n_runs, "cpu_per_run": per_run, "cpu_per_pre_phase": pre_per_unit,
                     "train_scale": train_scale, "eval_scale": eval_scale}
        total += seconds
    out["cpu_seconds"] = total
    out["wall_minutes_2_jobs"] = total / 2 / 60
    return out


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("det", "cls", "both"), default="both")
    parser.add_argument("--targets", type=float, nargs="+", default=None, help="FLOPs reduction factors (default 2 4 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs, and epochs of every pre-pruning training phase (default: det 2, cls 1)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="training images (default: det 1000, cls 5000 = all); det takes the first N of every "
                             "split, so below 500 its test split shrinks too")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="default: every method (bn_scale on cls only)")
    parser.add_argument("--base-det", type=Path, default=None, help=f"default {TASKS['det']['base']}")
    parser.add_argument("--base-cls", type=Path, default=None, help=f"default {TASKS['cls']['base']}")
    parser.add_argument("--max-layer-ratio", type=float, default=MAX_LAYER_RATIO,
                        help="no method removes more than this share of any layer's filters "
                             f"(stages.selection.max_layer_ratio; default {MAX_LAYER_RATIO})")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    parser.add_argument("--measure-pruned", action="store_true",
                        help="also evaluate every pruned model before fine-tuning (taylor's always is)")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in the partial results file")
    parser.add_argument("--quick", action="store_true", help="tiny budget smoke run (1 seed, few images, 1 epoch)")
    args = parser.parse_args()
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--jobs and --epochs must be >= 1")
    if not 0 < args.max_layer_ratio <= 1:
        parser.error("--max-layer-ratio must be in (0, 1]")
    if args.targets is not None and min(args.targets) <= 1:
        parser.error("every --targets value must be > 1 (a FLOPs reduction factor)")

    tasks = ["det", "cls"] if args.task == "both" else [args.task]
    targets = sorted({float(t) for t in (args.targets or FULL_TARGETS)})
    seeds = sorted(set(args.seeds if args.seeds is not None else ([0] if args.quick else FULL_SEEDS)))
    methods = {task: [m for m in (args.methods or TASKS[task]["methods"])] for task in tasks}
    budgets = {}
    for task in tasks:
        budget = dict((QUICK if args.quick else FULL)[task], max_layer_ratio=args.max_layer_ratio)
        if args.epochs is not None:
            budget["epochs"] = args.epochs
        if args.train_images is not None:
            budget["train_images"] = args.train_images
        budgets[task] = budget
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the preparation in this process too
    partial = RESULTS / ("quality.quick.partial.json" if args.quick else "quality.partial.json")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp_name:
        tmp = Path(tmp_name)
        preps = {task: _prepare_task(task, budgets[task], args.base_det if task == "det" else args.base_cls,
                                     args.quick, tmp) for task in tasks}
        settings = {task: {k: preps[task][k] for k in ("base_digest", "budget", "used_sizes", "taylor_step")}
                    for task in tasks}
        done: dict[str, dict[str, Any]] = {}
        if args.resume and partial.exists():
            previous = json.loads(partial.read_text())
            for task in tasks:
                if previous.get("settings", {}).get(task) not in (None, settings[task]):
                    sys.exit(f"error: {partial}: its {task} runs used another base or budget; drop --resume to start over")
            done = previous.get("runs", {})
            settings = {**previous.get("settings", {}), **settings}
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"settings": settings, "runs": done}, indent=1, default=str))
        lock = tmp / "partial.lock"

        specs = []
        for task in tasks:
            for method in methods[task]:
                for seed in seeds:
                    todo = [t for t in targets if _key(task, method, t, seed) not in done
                            or done[_key(task, method, t, seed)].get("status") != "ok"]
                    if todo:
                        specs.append({"task": task, "method": method, "seed": seed, "targets": todo,
                                      "budget": budgets[task], "base": preps[task]["base"], "data": preps[task]["data"],
                                      "base_args": preps[task]["base_args"],
                                      "base_metrics": preps[task]["base_metrics"],
                                      "taylor_step": preps[task]["taylor_step"], "work_dir": str(tmp),
                                      "partial": str(partial), "lock": str(lock), "threads": threads,
                                      "measure_pruned": args.measure_pruned})
        # Longest first (detection, then the methods with a training phase before pruning), for load balance.
        specs.sort(key=lambda s: (s["task"] != "det", s["method"] not in PRE_TRAINED))
        print(f"{len(specs)} units ({sum(len(s['targets']) for s in specs)} runs) to do"
              + (f", {len(done)} runs already in {partial.name}" if done else "")
              + f"; {args.jobs} job(s) x {threads} thread(s)", flush=True)
        if args.jobs == 1:
            for spec in specs:
                run_unit(spec)
        else:
            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(run_unit, spec) for spec in specs]):
                    future.result()
    total = time.perf_counter() - started

    stored = json.loads(partial.read_text())["runs"]
    runs = [r for r in stored.values() if r["task"] in tasks and r["method"] in methods[r["task"]]
            and float(r["target"]) in targets and r["seed"] in seeds]
    runs.sort(key=lambda r: (tasks.index(r["task"]), METHODS.index(r["method"]), r["target"], r["seed"]))
    figure = make_figure(runs, tasks, methods, targets, preps, RESULTS / "quality.png")
    estimate = estimate_full(runs, preps, seeds, targets, methods)
    parts = []
    for task in tasks:
        prep = preps[task]
        budget, used = prep["budget"], prep["used_sizes"]
        parts.append(
            f"**{task}: {TASKS[task]['label']}** — base `{prep['base']}`; every run: all {prep['layers']} prunable "
            f"convs in one phase, at most {budget['max_layer_ratio']:g} of any layer's filters removed, "
            f"{budget['epochs']} fine-tuning epoch(s) (the preset's retrain optimiser and "
            f"schedule) on {used['train']} training images, test on {used['test']} images (validation "
            f"{used['val']}); seed / tp_bn_scale / tp_group_norm train "
            f"{budget['epochs']} more epochs before pruning (seed's sparsity optimiser); taylor fine-tunes "
            f"{TAYLOR['taylor_finetune_batches']} batches after each step of {prep['taylor_step']} filters "
            f"(scored on {TAYLOR['taylor_batches']} batches).\n\n"
            + _table(task, runs, methods[task], targets, prep))
    verdicts = _verdicts(runs, tasks, targets)
    failed = [r for r in runs if r["status"] != "ok"]
    notes = (f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))} (one line per method "
             "and FLOPs target). FLOPs: 2 per multiply-add, convs and linears (metrics.count_flops). "
             "'before fine-tuning': the pruned model before stages.retrain, measured with --measure-pruned and "
             "always for taylor (after its own fine-tuning between steps). Wall: pre-pruning phase (shared by the targets of a seed, counted in full in each) + "
             f"pruning + fine-tuning + measurements, one job of {args.jobs} on {threads} thread(s). "
             + (f"{len(failed)} run(s) failed (shown in the table). " if failed else ""))
    markdown = "\n\n".join([HOW, *parts]) + "\n\nTarget (4x fewer FLOPs, same budget):\n\n" \
        + "\n".join(verdicts) + f"\n\n![quality vs FLOPs](bench/results/{figure.name})\n\n{notes}"
    payload = {
        "tasks": {task: {**preps[task], "label": TASKS[task]["label"]} for task in tasks},
        "targets": targets, "seeds": seeds, "methods": methods, "taylor": TAYLOR, "jobs": args.jobs, "threads": threads,
        "runs": runs, "summary": summarize(runs, tasks, methods, targets), "verdicts": verdicts,
        "estimate_full_run": estimate, "total_seconds": total, "figure": str(figure), "markdown": markdown,
    }
    out = write_result("quality", payload)
    print(markdown)
    print(f"\ntotal {total / 60:.1f} min -> {out}, {figure}")
    per_task = ", ".join(f"{t} {estimate[t]['cpu_seconds'] / 60:.0f}" for t in tasks if t in estimate)
    print(f"estimated default run (both tasks, 3 targets, 3 seeds, every method), scaled from this run's CPU time: "
          f"{estimate['cpu_seconds'] / 60:.0f} CPU-min ({per_task}), about {estimate['wall_minutes_2_jobs']:.0f} min "
          "with --jobs 2 on 2 idle cores" + ("" if len(tasks) == 2 else " (only the tasks run here are counted)")
          + ("; from --quick an overestimate: per-call overheads are scaled with the images too" if args.quick else ""))


if __name__ == "__main__":
    main()
