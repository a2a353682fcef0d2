"""Checks of the method's settings that need no training: the phases, their layers, each criterion's target.

Run before the first stage (the in-process pipeline, the flows' preflight, every budget trial), so a bad
setting fails with one line naming it before anything starts.
"""

from __future__ import annotations

import re
from functools import lru_cache

from compression.config import PhaseConfig, PipelineConfig
from compression.errors import ConfigError

# Criteria that rank filters and remove a configured share of them (``criteria.rank_filters``).
RANKING_CRITERIA = ("l1_norm", "bn_scale", "random", "group_norm")
PHASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_ranking_target(cfg: PipelineConfig) -> None:
    """A ranking criterion needs ``prune_ratio``, ``target_flops_ratio`` or ``target_latency_ratio``, Taylor one
    of the first two (one-line ConfigError)."""
    selection = cfg.stages.selection
    if selection.criterion == "taylor" and selection.target_latency_ratio is not None:
        raise ConfigError("stages.selection: criterion 'taylor' takes prune_ratio or target_flops_ratio, not "
                          "target_latency_ratio (use seed, l1_norm, bn_scale or random for a latency target)")
    if selection.criterion in (*RANKING_CRITERIA, "taylor") and selection.prune_ratio is None \
            and selection.target_flops_ratio is None and selection.target_latency_ratio is None:
        latency = "" if selection.criterion == "taylor" else " (or target_latency_ratio)"
        raise ConfigError(
            f"stages.selection: criterion {selection.criterion!r} needs prune_ratio or target_flops_ratio{latency}: "
            "how many filters to remove; only 'seed' decides that from the weights"
        )


def check_method_config(cfg: PipelineConfig) -> list[PhaseConfig]:
    """Everything about the method's settings that can be checked before any training; returns the phases."""
    phases = phases_for(cfg)
    for phase in phases:
        check_ranking_target(cfg.for_phase(phase))
    return phases


def phases_for(cfg: PipelineConfig) -> list[PhaseConfig]:
    """``stages.phases``, or the model's ``DEFAULT_PHASES`` named phase1, phase2, ...; every layer checked.

    Each layer must exist in the model and be prunable (``pruning.resolve_layers``: a Conv2d/Linear, not
    an SSD head conv, not the network's output layer); a bad one fails with one line naming the phase,
    before any training. Phase names key the output files, so they must be unique and file-name safe.
    """
    from compression.models import DEFAULT_PHASES

    phases = list(cfg.stages.phases or [
        PhaseConfig(name=f"phase{index + 1}", layers=list(layers))
        for index, layers in enumerate(DEFAULT_PHASES[cfg.model.name])
    ])
    if not phases:
        raise ConfigError(f"stages.phases: no phase to prune (and {cfg.model.name} has no default phases)")
    seen: set[str] = set()
    for index, phase in enumerate(phases):
        if not PHASE_NAME.fullmatch(phase.name):
            raise ConfigError(f"stages.phases.{index}.name: {phase.name!r} must be letters, digits, '_', '-' or '.'")
        if phase.name in seen:
            raise ConfigError(f"stages.phases.{index}.name: {phase.name!r} is used twice (it names the output files)")
        seen.add(phase.name)
    check_phase_layers(cfg.model.name, cfg.model.width_mult, cfg.model.image_size,
                       tuple((phase.name, tuple(phase.layers), tuple(phase.remove_layers)) for phase in phases))
    return phases


@lru_cache(maxsize=16)
def check_phase_layers(model_name: str, width_mult: float | None, image_size: int | None,
                       phases: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]) -> None:
    """Resolve every phase's layers on a freshly built model (the class count does not matter here), each
    phase's ``remove_layers`` removed from it first (a removed layer a phase lists is skipped, as the stages do)."""
    from compression.errors import ModelError
    from compression.models import build_model, present_layers, remove_layers
    from compression.pruning import build_dependency_graph, resolve_layers

    options = {k: v for k, v in (("width_mult", width_mult), ("image_size", image_size)) if v is not None}
    model = build_model(model_name, num_classes=2, **options)
    dg = build_dependency_graph(model)
    for index, (name, layers, remove) in enumerate(phases):
        if remove:
            try:
                remove_layers(model_name, model, list(remove))
            except ModelError as exc:
                raise ConfigError(f"stages.phases.{index} ({name}).remove_layers: {exc}") from None
            dg = build_dependency_graph(model)
        try:
            resolve_layers(model, model_name, present_layers(model_name, model, list(layers)), dg=dg)
        except ConfigError as exc:
            raise ConfigError(f"stages.phases.{index} ({name}): {exc}") from None


def check_inputs(cfg: PipelineConfig) -> None:
    """The files a run reads: the pretrained checkpoint if given, and the dataset (the built-in one is
    generated) with images in every split. Run where the stages run (a cluster node reads ``data.root``)."""
    from pathlib import Path

    from compression.data.loaders import build_dataset, ensure_builtin_data
    from compression.errors import DataError

    if cfg.stages.pretrain.checkpoint is not None:
        from compression.checkpoint import read_metadata

        read_metadata(cfg.stages.pretrain.checkpoint)
    root = ensure_builtin_data(cfg.data)
    if not Path(root).exists():
        raise DataError(f"data.root {root}: does not exist (and data.builtin is empty)")
    size = cfg.model.image_size or 300
    for split in ("train", "val", "test"):
        if len(build_dataset(cfg.data, split, train=False, image_size=size)) == 0:  # type: ignore[arg-type]
            raise DataError(f"data.root {root}: the {split} split has no images")
