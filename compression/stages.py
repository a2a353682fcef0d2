"""The pipeline's stages as plain functions: (input paths, config, output path) -> (output path, metrics).

Stages pass checkpoint *paths*, not models, so an orchestrator (Prefect tasks in ``tasks/``) can
cache, retry and distribute them; training is delegated to a ``Trainer`` (in-process by default,
Ray Train in the flow). The order they run in, and which output each reads, is ``compression.plan``.

The method (docs/method.md), per phase: ``induce_sparsity`` (Θ -> Θ_L1, α chosen on the validation
split) -> ``select_filters`` (a selection JSON) -> ``prune`` (Θ_L1 minus the selected filters) ->
``retrain``; ``taylor_prune_stage`` replaces sparsity/selection/prune for the Taylor criterion; then
``distill`` from the pretrained teacher. An output file appears only once its stage is complete: a
trainer writes what it trained to a hidden scratch file next to it, and ``_finish`` measures the model
(``compression.measure``) and writes the output once, with the measurements in its metadata.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from compression import metrics as M
from compression.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from compression.checks import check_ranking_target
from compression.config import OptimConfig, PhaseConfig, PipelineConfig, class_names
from compression.errors import ConfigError, StageError
from compression.files import read_selection, refuse_same_file, scratch_path, write_json_atomic
from compression.jobs import LocalTrainer, Trainer, TrainJob
from compression.measure import add_ratios, choose_score_threshold, measure
from compression.train import default_device, evaluate, primary_metric

log = logging.getLogger(__name__)


def _finish(ckpt: Checkpoint, cfg: PipelineConfig, out: Path, base: dict[str, Any] | None,
            stage_seconds: float, extra_metrics: dict[str, Any] | None = None,
            val_metric: float | None = None) -> tuple[Path, dict[str, Any]]:
    """Measure ``ckpt`` (test split, and the validation metric every choice reads), then write ``out``
    once, with the measurements inside its metadata; the file's size is read back from it.

    ``out`` appears only when the stage is complete (``save_checkpoint`` writes atomically, and a failure
    while measuring writes nothing), so "the output file exists" means "the stage is done" (the
    in-process pipeline's resume relies on it).
    """
    out = Path(out)
    ckpt.path = None
    if ckpt.task == "detection":
        # Measured, stored and deployed with the same post-processing (ONNX sidecar, MLflow model).
        from compression.models import apply_postprocess_settings, postprocess_settings

        settings = {"score_threshold": cfg.export.score_threshold, "pre_nms_top_k": cfg.export.pre_nms_top_k}
        if cfg.export.score_threshold_max_val_drop is not None:
            choice = choose_score_threshold(ckpt.model, cfg, len(ckpt.class_names))
            settings["score_threshold"], val_metric = choice["score_threshold"], choice["val_map_voc07"]
            by_threshold = choice["val_map_voc07_by_score_threshold"]
            extra_metrics = {**(extra_metrics or {}), "score_threshold": choice["score_threshold"],
                             "score_threshold_val_cost": by_threshold[cfg.export.score_threshold] - val_metric}
        ckpt.extra["postprocess"] = postprocess_settings(apply_postprocess_settings(ckpt.model, settings))
    result = measure(ckpt, cfg, base=base, with_val=True, val_metric=val_metric)
    result["stage_seconds"] = stage_seconds
    if extra_metrics:
        result.update(extra_metrics)
    ckpt.metrics = dict(result)
    ckpt.path = save_checkpoint(ckpt, out)
    result["size_bytes"] = M.file_size_bytes(out)
    if base:
        add_ratios(result, base, ckpt.task)
    return out, result


class FirstBatches:
    """The first ``n`` batches of a loader, with a length (the scheduler needs one)."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n
        self.sampler = getattr(loader, "sampler", None)
        self.generator = getattr(loader, "generator", None)

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch


# --------------------------------------------------------------------------------------------
# Stage 1: pretrain


def pretrain(cfg: PipelineConfig, out: Path, trainer: Trainer | None = None) -> tuple[Path, dict[str, Any]]:
    """Train the base model with its original loss, or adopt ``stages.pretrain.checkpoint``."""
    from compression.data.loaders import ensure_builtin_data

    started = time.perf_counter()
    ensure_builtin_data(cfg.data)
    given = cfg.stages.pretrain.checkpoint
    if given is not None:
        base = load_checkpoint(given, expect_model=cfg.model.name)
        if base.class_names != class_names(cfg.data) and cfg.data.kind == "voc":
            raise StageError(
                f"{given}: its classes {base.class_names[:5]}... differ from the dataset's {class_names(cfg.data)[:5]}..."
            )
        ckpt = base.derive(base.model, stage="pretrain")
        ckpt.parent = str(given)
    else:
        job = TrainJob(stage="pretrain", config=cfg.model_dump(mode="json"),
                       optim=_optim(cfg.stages.pretrain), input_checkpoint=None,
                       output_checkpoint=str(scratch_path(out, "trained")))
        ckpt = _train(job, trainer)
    return _finish(ckpt, cfg, out, base=None, stage_seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Helpers of the method stages

def _optim(section: OptimConfig) -> dict[str, Any]:
    """The optimiser fields of a stage's section (``TrainJob.optim`` is validated as a plain OptimConfig)."""
    return section.model_dump(mode="json", include=set(OptimConfig.model_fields))


def _train(job: TrainJob, trainer: Trainer | None) -> Checkpoint:
    """Run ``job`` (its output is a scratch file), load what it trained and remove the scratch file."""
    scratch = Path(job.output_checkpoint)
    try:
        result = (trainer or LocalTrainer()).fit(job)
        ckpt = load_checkpoint(result.output_checkpoint)
    finally:
        scratch.unlink(missing_ok=True)
    ckpt.path = None
    return ckpt


def _phase_name(phase: PhaseConfig | None) -> str | None:
    return phase.name if phase is not None else None


def _phase_layers(ckpt: Checkpoint, phase: PhaseConfig) -> list[str]:
    """Module paths of the phase's layers in ``ckpt``'s model, without the ones removed whole (layer pruning:
    a phase may list every layer and remove some); one-line ConfigError for a bad name."""
    from compression.models import present_layers
    from compression.pruning import resolve_layers

    layers = present_layers(ckpt.model_name, ckpt.model, phase.layers)
    try:
        return [path for path, _ in resolve_layers(ckpt.model, ckpt.model_name, layers)]
    except ConfigError as exc:
        raise ConfigError(f"stages.phases ({phase.name}): {exc}") from None


def _overall_sparsity(ckpt: Checkpoint, fractions: dict[str, float]) -> float:
    sizes = {name: ckpt.model.get_submodule(name).weight.numel() for name in fractions}
    return sum(fractions[n] * sizes[n] for n in fractions) / max(1, sum(sizes.values()))


def _val_metric_fn(ckpt: Checkpoint, cfg: PipelineConfig):
    """``model -> primary metric on the validation split`` (what α is chosen on)."""
    from compression.data.loaders import build_loader
    from compression.models import model_input_size

    loader = build_loader(cfg.data, "val", train=False, image_size=model_input_size(ckpt.model)[0], seed=cfg.seed)
    key = primary_metric(ckpt.task)
    device = default_device(cfg.compute.use_gpu)

    def metric(model) -> float:
        return evaluate(model, loader, ckpt.task, len(ckpt.class_names), device=device,
                        fast_ssd=cfg.compute.fast_ssd)[key]

    return metric


# --------------------------------------------------------------------------------------------
# Stage 1b: layer removal (a phase's remove_layers)


def remove_layers(input_path: Path, cfg: PipelineConfig, out: Path, *, phase: PhaseConfig,
                  base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Layer pruning: the phase's ``remove_layers`` convs go whole (``models.remove_layers``), before the phase
    prunes filters; the phase's sparsity training and retraining then train the model without them.

    The checkpoint records every removed layer in its ``model_args`` (``removed_layers``), so it rebuilds.
    Refuses (one line) a layer removed already and one whose input and output widths no longer agree (an
    earlier phase pruned its filters or its input's).
    """
    from compression.errors import ModelError
    from compression.models import remove_layers as remove

    started = time.perf_counter()
    input_path, out = Path(input_path), Path(out)
    refuse_same_file(input_path, out)
    ckpt = load_checkpoint(input_path, expect_model=cfg.model.name)
    try:
        remove(ckpt.model_name, ckpt.model, list(phase.remove_layers))
    except ModelError as exc:
        raise StageError(f"stages.phases ({phase.name}).remove_layers: {input_path}: {exc}") from None
    removed = [*ckpt.model_args.get("removed_layers", []), *phase.remove_layers]
    layered = ckpt.derive(ckpt.model, stage="remove_layers", phase=phase.name, removed_layers=list(phase.remove_layers))
    layered.model_args["removed_layers"] = removed
    return _finish(layered, cfg, out, base_metrics, time.perf_counter() - started,
                   {"layers_removed": len(phase.remove_layers)})


# --------------------------------------------------------------------------------------------
# Stage 2: sparsity induction


def induce_sparsity(input_path: Path, cfg: PipelineConfig, out: Path, *, phase: PhaseConfig,
                    trainer: Trainer | None = None,
                    base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train with λ·Σ‖W_l‖₁ over the phase's layers (Θ -> Θ_L1), then choose α on the validation split.

    Criterion ``group_norm``: train with torch-pruning's GroupNormPruner regulariser over the phase's groups
    instead (``sparsity.group_norm_reg``); there is no α then (``alpha`` None, nothing thresholded).

    The saved checkpoint holds Θ_L1 (not thresholded); its ``extra`` (and the returned metrics) record
    α, every τ_l, the per-layer weight sparsity of the input model (``sparsity_before``), of Θ_L1
    (``sparsity_l1``) and of Θ_L1^th (``sparsity_after``), and the validation metric of Θ_L1 and Θ_L1^th.
    A loss that turns NaN/inf stops with a one-line ``StageError`` naming the epoch and λ; ``out`` is not
    written then and the input is never touched.
    """
    from compression.sparsity import choose_alpha, sparsity_targets, weight_sparsity

    started = time.perf_counter()
    cfg = cfg.for_phase(phase)
    input_path, out = Path(input_path), Path(out)
    refuse_same_file(input_path, out)
    source = load_checkpoint(input_path, expect_model=cfg.model.name)
    layers = _phase_layers(source, phase)
    # The phase's layers and their consumers: stage 2 trains and thresholds both (s_in reads the consumers).
    before = weight_sparsity(source.model, [target.layer for target in sparsity_targets(source.model, layers)])
    del source
    sparsity = cfg.stages.sparsity
    group_norm = cfg.stages.selection.criterion == "group_norm"
    job = TrainJob(stage="sparsity", config=cfg.model_dump(mode="json"), optim=_optim(sparsity),
                   input_checkpoint=str(input_path), output_checkpoint=str(scratch_path(out, "trained")),
                   phase=phase.name, sparsity_layers=layers, l1_lambda=0.0 if group_norm else sparsity.l1_lambda,
                   group_norm_reg=sparsity.group_norm_reg if group_norm else 0.0)
    trained = _train(job, trainer)
    if group_norm:
        # Group sparsity shrinks whole groups, not single weights: no α to choose, nothing thresholded.
        val = _val_metric_fn(trained, cfg)(trained.model)
        l1 = weight_sparsity(trained.model, [t.layer for t in sparsity_targets(trained.model, layers)])
        choice = {"alpha": None, "taus": None, "val_metric_l1": val, "val_metric_thresholded": val,
                  "sparsity_before": l1, "sparsity_after": l1, "tried": []}
    else:
        choice = choose_alpha(trained.model, layers, sparsity.alpha_grid, sparsity.max_drop,
                              _val_metric_fn(trained, cfg))
    trained.model.cpu()
    record = {
        "phase": phase.name,
        "layers": layers,
        "regulariser": "group_norm" if group_norm else "l1",
        "l1_lambda": job.l1_lambda,
        "group_norm_reg": job.group_norm_reg,
        "alpha": choice["alpha"],
        "taus": choice["taus"],
        "max_drop": sparsity.max_drop,
        "val_metric": primary_metric(trained.task),
        "val_metric_l1": choice["val_metric_l1"],
        "val_metric_thresholded": choice["val_metric_thresholded"],
        "sparsity_before": before,
        "sparsity_l1": choice["sparsity_before"],
        "sparsity_after": choice["sparsity_after"],
        "alpha_tried": choice["tried"],
    }
    trained.extra.update(record)
    summary = {
        **record,
        "val_drop": choice["val_metric_l1"] - choice["val_metric_thresholded"],
        "weight_sparsity_before": _overall_sparsity(trained, before),
        "weight_sparsity_l1": _overall_sparsity(trained, choice["sparsity_before"]),
        "weight_sparsity_after": _overall_sparsity(trained, choice["sparsity_after"]),
    }
    # Θ_L1's validation metric was measured while choosing α: the checkpoint's own is that one.
    return _finish(trained, cfg, out, base_metrics, time.perf_counter() - started, summary,
                   val_metric=choice["val_metric_l1"])


# --------------------------------------------------------------------------------------------
# Stage 3: filter selection


def select_filters(input_path: Path, cfg: PipelineConfig, out: Path, *,
                   phase: PhaseConfig) -> tuple[Path, dict[str, Any]]:
    """Choose the filters to remove and write them as JSON (atomically) to ``out``.

    ``seed``: on Θ_L1^th (α from the input's metadata), s_out / s_in over all consumers, flagged at γ,
    at least ``min_channels`` kept (``selection.select_filters``); with ``target_flops_ratio`` set, γ is
    not used: the filters are ranked globally by max(s_out, s_in) (``selection.sparsity_importance``) and
    cut at the FLOPs budget (``criteria.select_by_flops``). ``l1_norm`` / ``bn_scale`` / ``random``: ranked,
    then ``prune_ratio``, ``target_flops_ratio`` or ``target_latency_ratio`` (several set: the one that removes
    fewer filters). ``group_norm``: with a FLOPs target alone, the filters torch-pruning's GroupNormPruner
    removes on its way there (``tp_pruners.select_by_pruner``); with a ratio or latency target, ranked once
    globally by the same importance.
    ``taylor`` is iterative (``taylor_prune_stage``) and refused here.

    JSON: ``{criterion, phase, input_checkpoint, layers: {module_path: {remove, keep, <scores>}}, alpha,
    taus, ...}``. Metrics: filters removed per layer, in total and as a fraction of the phase's filters.
    """
    from compression.criteria import DEFAULT_SCOPE, rank_filters
    from compression.pruning import build_dependency_graph
    from compression.selection import filter_sparsity_scores, relative_l1_norms, sparsity_importance
    from compression.selection import select_filters as flag_sparse_filters
    from compression.sparsity import threshold_weights

    started = time.perf_counter()
    cfg = cfg.for_phase(phase)
    settings = cfg.stages.selection
    if settings.criterion == "taylor":
        raise ConfigError(
            "stages.selection.criterion 'taylor' prunes step by step with fine-tuning in between: "
            "use stages.taylor_prune_stage (the pipeline does), not select_filters"
        )
    check_ranking_target(cfg)
    input_path, out = Path(input_path), Path(out)
    ckpt = load_checkpoint(input_path, expect_model=cfg.model.name)
    layers = _phase_layers(ckpt, phase)
    record: dict[str, Any] = {
        "criterion": settings.criterion,
        "phase": phase.name,
        "input_checkpoint": str(input_path),
        "min_channels": settings.min_channels,
        "max_layer_ratio": settings.max_layer_ratio,
        "round_to": settings.round_to,
        "alpha": ckpt.extra.get("alpha"),
        "taus": ckpt.extra.get("taus"),
    }
    if settings.criterion == "seed":
        if "alpha" not in ckpt.extra:
            raise StageError(
                f"{input_path}: no α in its metadata; criterion 'seed' selects on the output of induce_sparsity"
            )
        if ckpt.phase != phase.name:
            raise StageError(f"{input_path}: is the sparsity checkpoint of phase {ckpt.phase!r}, not of {phase.name!r}")
        alpha = ckpt.extra["alpha"]
        # α None: no grid value kept the metric, so only the weights L1 drove to exactly zero count.
        thresholded, taus = threshold_weights(ckpt.model, layers, alpha if alpha is not None else 0.0)
        scores = filter_sparsity_scores(thresholded, build_dependency_graph(thresholded), layers)
        if settings.target_flops_ratio is None and settings.target_latency_ratio is None:
            chosen = flag_sparse_filters(scores, settings.gamma, settings.min_channels, settings.round_to,
                                         settings.max_layer_ratio)
            record.update(gamma=settings.gamma, taus=taus)
        else:
            # A FLOPs budget instead of γ: the same scores, ranked globally (sparser = less important).
            ranked = sparsity_importance(scores, relative_l1_norms(ckpt.model, layers))
            chosen, info = _select_ranked(ckpt, build_dependency_graph(ckpt.model), ranked, cfg, "global", out)
            for name, entry in chosen.items():
                entry.update(s_out=scores[name]["s_out"], s_in=scores[name]["s_in"])
            record.update(taus=taus, ranking="max(s_out, s_in), global", **info)
    elif settings.criterion == "group_norm" and settings.target_latency_ratio is None and settings.prune_ratio is None:
        # A FLOPs target: torch-pruning's own GroupNormPruner steps there, re-ranking after every step.
        from compression.tp_pruners import select_by_pruner

        chosen, info = select_by_pruner(ckpt.model, ckpt.model_name, layers, settings.target_flops_ratio,
                                        min_channels=settings.min_channels, max_layer_ratio=settings.max_layer_ratio,
                                        reg=cfg.stages.sparsity.group_norm_reg,
                                        closest=settings.out_of_reach == "closest")
        record.update(target_flops_ratio=settings.target_flops_ratio, scope="global", **info)
    else:
        dg = build_dependency_graph(ckpt.model)
        scores = rank_filters(settings.criterion, ckpt.model, dg, layers, seed=settings.seed)
        chosen, info = _select_ranked(ckpt, dg, scores, cfg, DEFAULT_SCOPE[settings.criterion], out)
        record.update(info)
    record["layers"] = chosen
    write_json_atomic(out, record)
    metrics = selection_metrics(record)
    metrics["selection_seconds"] = time.perf_counter() - started
    return out, metrics


LATENCY_TABLE = "latency_table.json"


def latency_tables_for(ckpt: Checkpoint, cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """The deployment target's latency tables for ``ckpt``'s model (``compression.latency.load_or_measure``),
    by layout: ONNX Runtime on the CPU in ``export.onnxruntime_layout`` (``auto``: one table per layout, the
    network runs in whichever is faster), torch on the GPU with ``compute.use_gpu`` (one table, key
    ``cuda``), at ``export.batch_size`` and ``export.threads``; kept in ``export.latency_table`` (default
    ``run_dir``/latency_table.json) and reused while they cover the model; the layouts' tables are
    measured together, on one time base."""
    from compression.export import layouts_of
    from compression.latency import load_or_measure

    path = Path(cfg.export.latency_table) if cfg.export.latency_table else Path(run_dir) / LATENCY_TABLE
    common = {"batch_size": cfg.export.batch_size, "threads": cfg.export.threads, "grid_step": cfg.export.grid_step}
    if default_device(cfg.compute.use_gpu).type == "cuda":
        return load_or_measure(path, ckpt.model, ckpt.model_name, runtime="torch", device="cuda", **common)
    return load_or_measure(path, ckpt.model, ckpt.model_name, runtime="onnxruntime",
                           layouts=layouts_of(cfg.export.onnxruntime_layout), **common)


def with_layers_of(reference: Checkpoint, ckpt: Checkpoint) -> Checkpoint:
    """``reference`` without the convs ``ckpt`` has lost whole (``remove_layers``); ``reference`` itself when
    it has lost none. Its latency tables are the ones that cover ``ckpt``'s network: a removed conv takes
    its site with it and changes what the next one reads, which a table of the whole network cannot say."""
    from compression.models import remove_layers, removed_from

    removed = removed_from(reference.model_name, reference.model, ckpt.model)
    if not removed:
        return reference
    return replace(reference, model=remove_layers(reference.model_name, copy.deepcopy(reference.model), removed))


def predicted_speedup(base: Checkpoint, ckpt: Checkpoint, cfg: PipelineConfig, run_dir: Path) -> float:
    """How much faster the latency tables (``latency_tables_for``, the ones the selection read) predict
    ``ckpt``'s network than ``base``'s, each in its fastest layout: what a latency target aimed at, to set
    beside the measured ratio. A network that lost whole convs is predicted in the tables of the base
    without them (``with_layers_of``), as its phase's selection was."""
    from compression.latency import fastest_prediction, model_widths

    base_ms = fastest_prediction(latency_tables_for(base, cfg, run_dir), model_widths(base.model, base.model_name))[1]
    tables = latency_tables_for(with_layers_of(base, ckpt), cfg, run_dir)
    return base_ms / fastest_prediction(tables, model_widths(ckpt.model, ckpt.model_name))[1]


def _best_latency_plan(plans: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Of ``select_by_latency``'s plans (one per layout), the one that reaches the target removing the least
    importance; when none does, the one that comes closest."""
    reaching = [plan for plan in plans if "latency_short_of_target" not in plan[1]]
    if reaching:
        return min(reaching, key=lambda plan: plan[1]["importance_removed"])
    return min(plans, key=lambda plan: plan[1]["latency_short_of_target"])


def _layer_sensitivity(ckpt: Checkpoint, scores: dict[str, list[float]], cfg: PipelineConfig) -> dict[str, float]:
    """``criteria.layer_sensitivity`` of ``ckpt``'s model on ``selection.sensitivity_batches`` validation
    batches, with the task's training loss."""
    from compression.criteria import layer_sensitivity
    from compression.data.loaders import build_loader
    from compression.models import model_input_size
    from compression.train import make_objective, move_batch

    device = default_device(cfg.compute.use_gpu)
    loader = build_loader(cfg.data, "val", train=False, image_size=model_input_size(ckpt.model)[0], seed=cfg.seed)

    def loss_fn(net, batch):
        inputs, targets = move_batch(batch, device)
        return make_objective(net, ckpt.task, fast_ssd=cfg.compute.fast_ssd)(inputs, targets)

    try:
        return layer_sensitivity(ckpt.model.to(device), scores, loss_fn,
                                 FirstBatches(loader, cfg.stages.selection.sensitivity_batches),
                                 model_name=ckpt.model_name)
    finally:
        ckpt.model.cpu()


def _select_ranked(ckpt: Checkpoint, dg, scores: dict[str, list[float]], cfg: PipelineConfig,
                   scope: str, out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from compression.criteria import select_by_flops, select_by_latency, select_by_ratio

    model = ckpt.model
    settings = cfg.stages.selection
    options: list[tuple[dict[str, dict[str, Any]], dict[str, Any]]] = []
    if settings.prune_ratio is not None:
        options.append((
            select_by_ratio(scores, settings.prune_ratio, settings.min_channels, settings.round_to, scope,
                            settings.max_layer_ratio),
            {"prune_ratio": settings.prune_ratio, "scope": scope},
        ))
    if settings.target_flops_ratio is not None:
        chosen, info = select_by_flops(model, scores, settings.target_flops_ratio, min_channels=settings.min_channels,
                                       max_layer_ratio=settings.max_layer_ratio,
                                       round_to=settings.round_to, scope=scope, dg=dg,
                                       closest=settings.out_of_reach == "closest")
        options.append((chosen, {"target_flops_ratio": settings.target_flops_ratio, "scope": scope, **info}))
    if settings.target_latency_ratio is not None:
        from compression.latency import fastest_prediction, model_widths

        tables = latency_tables_for(ckpt, cfg, Path(out).parent)
        # The target divides the model's time in its own fastest layout; each layout's table then plans its
        # own cut to that time, and the cut that reaches it removing the least importance is kept.
        base_layout, baseline_ms = fastest_prediction(tables, model_widths(model, ckpt.model_name))
        weights = _layer_sensitivity(ckpt, scores, cfg) if settings.layer_sensitivity else None
        plans = [select_by_latency(model, scores, settings.target_latency_ratio, table,
                                   model_name=ckpt.model_name, min_channels=settings.min_channels,
                                   max_layer_ratio=settings.max_layer_ratio, scope=scope, baseline_ms=baseline_ms,
                                   closest=True, layer_weights=weights)
                 for table in tables.values()]
        chosen, info = _best_latency_plan(plans)
        if "latency_short_of_target" in info and settings.out_of_reach != "closest":
            raise StageError(
                f"target_latency_ratio {settings.target_latency_ratio:g} is out of reach: cutting these layers to "
                f"the widths the device runs fastest, down to min_channels={settings.min_channels}, max_layer_ratio="
                f"{settings.max_layer_ratio:g}, gives at most {info['latency_ratio']:.2f}x")
        if weights is not None:
            info["layer_sensitivity"] = weights
        info = {**info, "latency_base_layout": base_layout,
                "latency_plans": {layout: {k: plan[1][k] for k in ("latency_after_ms", "importance_removed")}
                                  for layout, plan in zip(tables, plans, strict=True)}}
        options.append((chosen, {"target_latency_ratio": settings.target_latency_ratio, **info}))
    # Both targets set: stop at the first one reached (as taylor_prune does), i.e. remove fewer filters.
    return min(options, key=lambda option: sum(len(entry["remove"]) for entry in option[0].values()))


def selection_metrics(selection: dict[str, Any]) -> dict[str, Any]:
    """Filters removed per layer / in total / as a fraction, from a selection record (or its JSON)."""
    removed = {name: len(entry["remove"]) for name, entry in selection["layers"].items()}
    totals = {name: len(entry["remove"]) + int(entry["keep"]) for name, entry in selection["layers"].items()}
    total_removed, total = sum(removed.values()), sum(totals.values())
    return {
        "criterion": selection.get("criterion"),
        "filters_removed": removed,
        "filters_total": totals,
        "filters_removed_total": total_removed,
        "filters_total_all": total,
        "removed_fraction": total_removed / max(1, total),
    }


# --------------------------------------------------------------------------------------------
# Stage 4: prune


def prune_selected(ckpt, layers: dict[str, Any], cfg: PipelineConfig) -> None:
    """Remove ``layers``' selected filters from ``ckpt.model`` in place; with ``selection.compensate``, first
    fold their mean output (over ``compensation_batches`` un-augmented training batches) into the consumers."""
    from compression.pruning import consumer_input_means, prune_filters

    means = None
    if cfg.stages.selection.compensate:
        from compression.data.loaders import build_loader
        from compression.models import model_input_size
        from compression.train import move_batch

        device = next(ckpt.model.parameters()).device
        loader = build_loader(cfg.data, "train", train=False, image_size=model_input_size(ckpt.model)[0],
                              seed=cfg.seed)

        def forward(model) -> None:
            for batch in FirstBatches(loader, cfg.stages.selection.compensation_batches):
                inputs, _targets = move_batch(batch, device)
                model(inputs)

        means = consumer_input_means(ckpt.model, layers, forward, model_name=ckpt.model_name)
    prune_filters(ckpt.model, layers, model_name=ckpt.model_name, compensate=means)


def prune(input_path: Path, selection_path: Path, cfg: PipelineConfig, out: Path, *, phase: PhaseConfig,
          base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Remove the selected filters from Θ_L1 (the un-thresholded L1-trained weights) with their consumers.

    Real structural removal through torch-pruning's dependency graph (``pruning.prune_filters``). Refuses
    (one line) a selection of another phase, one made for other layer sizes, and one that would empty a layer.
    """
    from compression.pruning import layer_channels

    started = time.perf_counter()
    input_path, selection_path, out = Path(input_path), Path(selection_path), Path(out)
    refuse_same_file(input_path, out)
    selection = read_selection(selection_path)
    if selection.get("phase") != phase.name:
        raise StageError(f"{selection_path}: is the selection of phase {selection.get('phase')!r}, not of {phase.name!r}")
    ckpt = load_checkpoint(input_path, expect_model=cfg.model.name)
    modules = dict(ckpt.model.named_modules())
    for name, entry in selection["layers"].items():
        layer = modules.get(name)
        expected = len(entry["remove"]) + entry["keep"]
        if layer is not None and hasattr(layer, "weight") and layer_channels(layer) != expected:
            raise StageError(
                f"{selection_path}: layer {name!r} was selected with {expected} filters, "
                f"{input_path} has {layer_channels(layer)}; select again on this checkpoint"
            )
    try:
        prune_selected(ckpt, selection["layers"], cfg)
    except (StageError, ConfigError) as exc:
        raise type(exc)(f"{selection_path}: {exc}") from None
    modules = dict(ckpt.model.named_modules())
    for name, entry in selection["layers"].items():
        if layer_channels(modules[name]) != entry["keep"]:  # a dependency pulled other channels along
            raise StageError(f"prune: layer {name!r} has {layer_channels(modules[name])} filters, expected {entry['keep']}")
    pruned = ckpt.derive(ckpt.model, stage="prune", phase=phase.name, selection=str(selection_path),
                         criterion=selection.get("criterion"), alpha=selection.get("alpha"))
    summary = selection_metrics(selection)
    return _finish(pruned, cfg, out, base_metrics, time.perf_counter() - started, summary)


# --------------------------------------------------------------------------------------------
# Stage 5: retrain


def retrain(input_path: Path, cfg: PipelineConfig, out: Path, *, phase: PhaseConfig | None,
            trainer: Trainer | None = None,
            base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train the pruned model with the original loss only (no L1) to recover accuracy."""
    started = time.perf_counter()
    input_path, out = Path(input_path), Path(out)
    refuse_same_file(input_path, out)
    job = TrainJob(stage="retrain", config=cfg.model_dump(mode="json"), optim=_optim(cfg.stages.retrain),
                   input_checkpoint=str(input_path), output_checkpoint=str(scratch_path(out, "trained")),
                   phase=_phase_name(phase))
    ckpt = _train(job, trainer)
    return _finish(ckpt, cfg, out, base_metrics, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Stage 6: distill


def _preview(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def distill(student_path: Path, teacher_path: Path, cfg: PipelineConfig, out: Path, *,
            trainer: Trainer | None = None,
            base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Distil the teacher (the pretrained model) into the pruned student (``distill.DistillationObjective``).

    Refuses, before training, a teacher of another architecture or with other classes.
    """
    started = time.perf_counter()
    student_path, teacher_path, out = Path(student_path), Path(teacher_path), Path(out)
    refuse_same_file(student_path, out)
    student, teacher = read_metadata(student_path), read_metadata(teacher_path)
    if teacher["model_name"] != student["model_name"]:
        raise StageError(
            f"{teacher_path}: the teacher is a {teacher['model_name']!r}, the student a {student['model_name']!r}"
        )
    if list(teacher["class_names"]) != list(student["class_names"]):
        raise StageError(
            f"{teacher_path}: the teacher's {len(teacher['class_names'])} classes ({_preview(teacher['class_names'])}) "
            f"differ from the student's {len(student['class_names'])} ({_preview(student['class_names'])}); "
            "distillation needs the same classes"
        )
    job = TrainJob(stage="distill", config=cfg.model_dump(mode="json"), optim=_optim(cfg.stages.distill),
                   input_checkpoint=str(student_path), output_checkpoint=str(scratch_path(out, "trained")),
                   teacher_checkpoint=str(teacher_path))
    ckpt = _train(job, trainer)
    ckpt.extra["teacher"] = str(teacher_path)
    return _finish(ckpt, cfg, out, base_metrics, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Alternative: Molchanov's Taylor criterion, iterative


def taylor_prune_stage(input_path: Path, cfg: PipelineConfig, out: Path, *, phase: PhaseConfig,
                       base_metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Molchanov et al. 2017 on the phase's layers: score, remove the globally lowest filters, fine-tune, repeat.

    Runs in this process (``criteria.taylor_prune``): each step scores over ``selection.taylor_batches``
    training batches and fine-tunes ``selection.taylor_finetune_batches`` batches with the task loss and the
    ``stages.retrain`` optimiser settings at a constant learning rate, in this process (a few batches per
    step do not pay for a distributed job). Stops at ``prune_ratio`` / ``target_flops_ratio``. Writes the removed filters
    (original indices, per step) as ``<out>.selection.json`` next to the checkpoint.
    """
    from compression.criteria import taylor_prune
    from compression.data.loaders import build_loader
    from compression.device import resolve_compute
    from compression.models import model_input_size
    from compression.pruning import layer_channels
    from compression.train import make_objective, move_batch, seed_everything, train_model

    started = time.perf_counter()
    cfg = cfg.for_phase(phase)
    check_ranking_target(cfg)
    input_path, out = Path(input_path), Path(out)
    refuse_same_file(input_path, out)
    ckpt = load_checkpoint(input_path, expect_model=cfg.model.name)
    layers = _phase_layers(ckpt, phase)
    original = {name: layer_channels(ckpt.model.get_submodule(name)) for name in layers}
    seed_everything(cfg.seed)
    device = default_device(cfg.compute.use_gpu)
    model = ckpt.model.to(device)
    precision = resolve_compute(cfg.compute, device)
    objective = make_objective(model, ckpt.task, fast_ssd=cfg.compute.fast_ssd, amp_bf16=precision.amp_bf16)
    loader = build_loader(cfg.data, "train", train=True, image_size=model_input_size(model)[0], seed=cfg.seed)
    finetune_optim = OptimConfig.model_validate(_optim(cfg.stages.retrain)).model_copy(
        update={"epochs": 1, "warmup_epochs": 0.0, "schedule": "constant"}
    )
    context = f"stage taylor_finetune, phase {phase.name}"

    def loss_fn(net, batch):
        inputs, targets = move_batch(batch, device)
        return objective(inputs, targets)

    def finetune(net, batches: int) -> None:
        train_model(objective, FirstBatches(loader, batches), finetune_optim, device=device,
                    amp_bf16=precision.amp_bf16, context=context, progress=False)

    model, history = taylor_prune(model, layers, loss_fn, loader, finetune, cfg.stages.selection,
                                  model_name=ckpt.model_name)
    model.cpu()
    removed: dict[str, list[int]] = {name: [] for name in layers}
    for step in history:
        for name, idxs in step.get("removed", {}).items():
            removed[name].extend(idxs)
    selection = {
        "criterion": "taylor",
        "phase": phase.name,
        "input_checkpoint": str(input_path),
        "prune_ratio": cfg.stages.selection.prune_ratio,
        "target_flops_ratio": cfg.stages.selection.target_flops_ratio,
        "alpha": None,
        "taus": None,
        "layers": {name: {"remove": sorted(removed[name]), "keep": original[name] - len(removed[name])}
                   for name in layers},
        "history": history,
    }
    selection_path = write_json_atomic(out.with_name(f"{out.stem}.selection.json"), selection)
    pruned = ckpt.derive(model, stage="taylor", phase=phase.name, selection=str(selection_path),
                         criterion="taylor", taylor_steps=len(history))
    summary = {**selection_metrics(selection), "taylor_steps": len(history), "selection": str(selection_path)}
    return _finish(pruned, cfg, out, base_metrics, time.perf_counter() - started, summary)
