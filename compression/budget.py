"""Budgeted compression, the pure part: budgets, the knob grid, Pareto fronts, the choice, rank correlation.

A *budget* says what the user can give up or must reach:

- ``map_drop=1.0``: at most 1.0 point (0.01) of the task metric (mAP VOC07, or top-1) below the
  pretrained model on the validation split; the answer is the most compressed model (FLOPs ratio first,
  then parameters) within it;
- ``flops=4x`` / ``params=6x`` / ``latency=3x``: at least that compression (``latency``: the checkpoint's
  measured batch-32 latency in the CPU deployment runtime, ONNX Runtime end to end, ``latency_ort_b32_ms``,
  against the base's); the answer is the model with the
  smallest validation metric drop among those reaching it.

A *trial* is the pipeline with some knobs set (``SearchConfig.knobs``: config key paths -> candidate
values, e.g. ``stages.selection.gamma: [0.5, 0.7, 0.9]``). Trials are screened cheaply (sparsity,
selection, pruning, no retraining), ranked by those cheap signals and by compression
(``retrain_order``), and only the most promising are retrained; ``choose`` picks the answer among them.
Everything here works on plain dicts with the keys ``flops_ratio``, ``params_ratio``, ``val_drop`` (the
retrained model's metric drop on the validation split, a fraction), ``val_pruned`` / ``val_thresholded``
(cheap signals, validation split), so the flow (``flows/budget.py``) and the tests share it. Every choice
here reads the validation split only; the test split is for reporting. No Prefect, Ray or MLflow here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compression.config import (
    PHASE_SELECTION_KEYS,
    PipelineConfig,
    apply_override,
    describe_error,
    validate_config,
)
from compression.errors import ConfigError

BudgetKind = Literal["map_drop", "flops", "params", "latency"]
BUDGET_FORMS = ("map_drop=POINTS (e.g. map_drop=1.0), flops=RATIOx (e.g. flops=4x), params=RATIOx (e.g. params=6x) "
                "or latency=RATIOx (e.g. latency=3x)")
# The trial measurement each ratio budget reads (``latency_ratio``: the base's network time over the trial's,
# timed in alternation in ONNX Runtime at the export batch size).
RATIO_KEYS: dict[str, str] = {"flops": "flops_ratio", "params": "params_ratio", "latency": "latency_ratio",
                              "map_drop": "flops_ratio"}
_NOUNS = {"flops": "FLOPs", "params": "parameters", "latency": "latency (batch 32)"}
_BUDGET = re.compile(r"^\s*(map_drop|flops|params|latency)\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(x?)\s*$")
# Knobs that change what happens before filter selection: trials that differ only in other knobs share
# their sparsity stage (the flow's cache does the sharing; the order below lets it).
_LATE_SECTIONS = ("stages.selection", "stages.retrain", "stages.distill")


def _late(key: str) -> bool:
    """A knob that acts at filter selection or after (``stages.phases.<name>.gamma`` is one, its λ is not)."""
    return key.startswith(_LATE_SECTIONS) or (key.startswith("stages.phases.")
                                               and key.rsplit(".", 1)[-1] in PHASE_SELECTION_KEYS)


# --------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Budget:
    """``map_drop`` in points (1.0 = 0.01 of mAP), or a compression ratio (base / model) to reach."""

    kind: BudgetKind
    value: float
    text: str = ""

    @property
    def max_drop(self) -> float | None:
        """The largest allowed drop as a fraction (``map_drop`` budgets only)."""
        return self.value / 100 if self.kind == "map_drop" else None

    @property
    def ratio_key(self) -> str:
        """The compression measure the budget is about (``map_drop``: FLOPs, the cost that matters)."""
        return RATIO_KEYS[self.kind]

    def describe(self) -> str:
        if self.kind == "map_drop":
            return f"at most {self.value:g} points of mAP/top-1 below the pretrained model"
        return f"at least {self.value:g}x {'lower' if self.kind == 'latency' else 'fewer'} {_NOUNS[self.kind]}"

    def reaches_ratio(self, trial: Mapping[str, Any]) -> bool:
        """Whether a trial's compression meets a ratio budget (always true for ``map_drop``)."""
        if self.kind == "map_drop":
            return True
        return (_number(trial.get(self.ratio_key)) or 0.0) >= self.value

    def meets(self, trial: Mapping[str, Any]) -> bool:
        """Whether a (retrained) trial is within the budget: its validation drop for ``map_drop``, its ratio
        otherwise."""
        if self.kind == "map_drop":
            drop = _number(trial.get("val_drop"))
            return drop is not None and drop <= self.max_drop + 1e-9
        return self.reaches_ratio(trial)


def parse_budget(text: str) -> Budget:
    """``map_drop=1.0`` | ``flops=4x`` | ``params=6x`` | ``latency=3x`` -> Budget; anything else is a one-line ConfigError."""
    match = _BUDGET.match(str(text))
    if match is None:
        raise ConfigError(f"--budget {text!r}: expected {BUDGET_FORMS}")
    kind, number, suffix = match.group(1), float(match.group(2)), match.group(3)
    if kind == "map_drop":
        if suffix:
            raise ConfigError(f"--budget {text!r}: map_drop is in mAP points, not a ratio (e.g. map_drop=1.0)")
        if not 0 <= number <= 100:
            raise ConfigError(f"--budget {text!r}: map_drop must be between 0 and 100 points")
    elif number <= 1:
        raise ConfigError(f"--budget {text!r}: a {kind} ratio must be above 1 (base / compressed, e.g. {kind}=4x)")
    return Budget(kind, number, text.strip())


# --------------------------------------------------------------------------------------------
# The search's settings and its trials


# The seed rule's knobs: how hard L1 pushes and how sparse a filter must be to go.
SEED_KNOBS: dict[str, list[Any]] = {"stages.sparsity.l1_lambda": [0.01, 0.03], "stages.selection.gamma": [0.6, 0.7, 0.8]}
_CUTS = ("target_flops_ratio", "target_latency_ratio", "prune_ratio")
# How far a latency budget's trials may cut one layer (digits_voc_thorough's cap).
LATENCY_MAX_LAYER_RATIO = 0.875


def default_knobs(cfg: PipelineConfig, budget: Budget) -> dict[str, list[Any]]:
    """What a search varies when ``--search`` names no knobs: λ and what decides how much comes off
    (``group_norm`` has no λ: only the cut).

    Where one cut decides it (a FLOPs or latency target or a ratio, set once for every phase or by one
    phase alone, as the default preset's ``l1_norm`` phase is), γ would change nothing: the trials vary
    that cut instead, toward the budget: ``flops=Rx`` tries R, 1.25R and 1.5R fewer FLOPs, ``latency=Rx``
    R, 1.1R and 1.25R lower latency (in place of the FLOPs target; a target beyond the floors cuts down to
    them, ``out_of_reach: closest``), and ``map_drop`` / ``params`` 2x, 3x and 4x
    fewer FLOPs. With one phase, a latency budget also widens it to every prunable layer and lets each lose
    up to ``LATENCY_MAX_LAYER_RATIO`` of its filters. Otherwise (the seed rule's γ, or several phases with
    cuts of their own) λ × γ.
    """
    from compression.checks import phases_for

    phases = phases_for(cfg)
    own = [phase for phase in phases if any(getattr(phase, cut) is not None for cut in _CUTS)]
    selection = cfg.stages.selection
    if len(own) == 1:
        where, settings = f"stages.phases.{own[0].name}", own[0]
    elif not own and any(getattr(selection, cut) is not None for cut in _CUTS):
        where, settings = "stages.selection", selection
    else:
        return {key: list(values) for key, values in SEED_KNOBS.items()}
    if cfg.stages.selection.criterion == "group_norm":  # no λ: its regulariser stays as the config has it
        knobs: dict[str, list[Any]] = {}
    else:
        knobs = {"stages.sparsity.l1_lambda": list(SEED_KNOBS["stages.sparsity.l1_lambda"])}
    if budget.kind == "flops":
        targets = [round(budget.value * factor, 2) for factor in (1.0, 1.25, 1.5)]
    elif budget.kind == "latency":
        # The table predicts the network's time within about 15% of what is then measured: the targets above
        # the budget give that margin. The highest may lie beyond what the layers' floors allow: those trials
        # cut down to the floors (out_of_reach: closest) rather than end with nothing.
        targets = [round(budget.value * factor, 2) for factor in (1.0, 1.1, 1.25)]
        knobs["stages.selection.out_of_reach"] = ["closest"]
    else:
        targets = [2.0, 3.0, 4.0]
    cut = "target_latency_ratio" if budget.kind == "latency" else "target_flops_ratio"
    knobs[f"{where}.{cut}"] = targets
    if budget.kind == "latency" and len(phases) == 1 and where.startswith("stages.phases."):
        # A FLOPs phase holds the layers where the FLOPs are; the time is spread wider (a detector's first
        # blocks cost about as much at any width the floors allow), so a latency budget cuts every prunable
        # layer, each down to an eighth of its filters at most.
        from compression.models import layer_names

        knobs[f"{where}.layers"] = [list(layer_names(cfg.model.name))]
        if (settings.max_layer_ratio or selection.max_layer_ratio) < LATENCY_MAX_LAYER_RATIO:
            knobs[f"{where}.max_layer_ratio"] = [LATENCY_MAX_LAYER_RATIO]
    for other in _CUTS:  # the cut the config had, if another, gives way (the first target reached would win)
        if other != cut and getattr(settings, other) is not None:
            knobs[f"{where}.{other}"] = [None]
    return knobs


class SearchConfig(BaseModel):
    """What a budgeted run explores and how much it spends (``prunepipe run --budget ... --search k=v``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    knobs: dict[str, list[Any]] = Field(
        default_factory=lambda: {key: list(values) for key, values in SEED_KNOBS.items()},
        description="config key path -> candidate values; trials are their combinations (``default_knobs``)",
    )
    max_trials: int = Field(6, ge=1, le=256, description="at most this many trials (a seeded sample of the grid)")
    trials_in_parallel: int = Field(2, ge=1, le=64, description="trials (and retrains) running at once")
    trial_workers: int = Field(1, ge=1, le=1024, description="Ray Train workers per trial fit")
    trial_gpus: float | None = Field(
        None, gt=0, le=64, description="GPU share of each trial worker when compute.use_gpu (default: "
        "1 / trials_in_parallel, so the parallel trials share one GPU)")
    retrain_top_k: int = Field(3, ge=1, le=256, description="at most this many trials are retrained")
    early_stop: bool = Field(True, description="stop retraining once a trial meets the budget and the rest "
                             "cannot beat it")
    max_pruned_drop: float | None = Field(
        None, ge=0, description="points: trials whose pruned (not retrained) validation metric lies further "
        "below the base's are not retrained")
    alias: str = Field("budget", min_length=1, description="MLflow Model Registry alias of the chosen model")
    seed: int = 0

    @field_validator("knobs")
    @classmethod
    def _non_empty(cls, knobs: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not knobs:
            raise ValueError("give at least one knob (config key path -> list of values)")
        for key, values in knobs.items():
            if not values:
                raise ValueError(f"knob {key!r} has no values")
            if key == "name" or key.startswith(("tracking", "workdir", "compute")):
                raise ValueError(f"knob {key!r}: only method settings (stages, seed, model, data) can be knobs")
        return knobs


def load_search(overrides: Iterable[str] = (), base: SearchConfig | None = None,
                knobs: Mapping[str, list[Any]] | None = None) -> SearchConfig:
    """``SearchConfig`` with ``key=value`` overrides (values parsed as YAML), starting from ``knobs`` when
    given (``default_knobs`` of the run's config); ``knobs.<config.key>=[...]`` sets one knob's values and
    ``knobs={...}`` replaces them all. One-line ConfigError on a bad one."""
    data = (base or SearchConfig()).model_dump(mode="json")
    if knobs is not None:
        data["knobs"] = {key: list(values) for key, values in knobs.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--search {item!r}: expected KEY=VALUE, e.g. max_trials=4 or "
                              "knobs.stages.selection.gamma=[0.6,0.8]")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if key.startswith("knobs."):
            if value is None:
                data["knobs"].pop(key.removeprefix("knobs."), None)
                continue
            data["knobs"][key.removeprefix("knobs.")] = value if isinstance(value, list) else [value]
        else:
            data[key] = value
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"--search: {describe_error(exc.errors()[0])}") from None


@dataclass
class Trial:
    index: int
    knobs: dict[str, Any]
    config: PipelineConfig
    group: str = ""  # trials of one group share everything up to filter selection
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"t{self.index:02d}"

    @property
    def folder(self) -> str:
        digest = hashlib.sha256(json.dumps(self.knobs, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"trial-{self.index:02d}-{digest}"

    def label(self) -> str:
        return ", ".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in self.knobs.items())


def plan_trials(cfg: PipelineConfig, search: SearchConfig) -> list[Trial]:
    """The trials: the knob grid (a seeded sample of ``max_trials`` when larger), each a validated config.

    Trials train with ``search.trial_workers`` Ray workers each (on a GPU run, each reserving
    ``search.trial_gpus`` of a GPU). A bad key or value fails with one line naming
    the knob. Trials are ordered so that the first ones have different early settings (their sparsity stages
    can run at once) and those sharing them come later (they find the shared stage done).
    """
    keys = list(search.knobs)
    grid = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(search.knobs[k] for k in keys))]
    if len(grid) > search.max_trials:
        picked = sorted(random.Random(search.seed).sample(range(len(grid)), search.max_trials))
        grid = [grid[i] for i in picked]
    base = cfg.model_dump(mode="json")
    trials = []
    for index, knobs in enumerate(grid):
        raw = json.loads(json.dumps(base))
        raw["compute"]["num_workers"] = search.trial_workers
        if cfg.compute.use_gpu:
            raw["compute"]["gpus_per_worker"] = search.trial_gpus or round(1 / search.trials_in_parallel, 6)
        for key, value in knobs.items():
            try:
                apply_override(raw, f"{key}={json.dumps(value)}")
            except ConfigError as exc:
                raise ConfigError(f"search.knobs {key!r}: {str(exc).split(': ', 1)[-1]}") from None
        trial_cfg = validate_config(raw, f"search.knobs (trial {dict(knobs)})")
        early = {k: v for k, v in knobs.items() if not _late(k)}
        trials.append(Trial(index, dict(knobs), trial_cfg, json.dumps(early, sort_keys=True, default=str)))
    return _interleave(trials)


def _interleave(trials: list[Trial]) -> list[Trial]:
    """Round-robin over groups: the first trial of every group, then the second of every group, ..."""
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(trial.group, []).append(trial)
    ordered = []
    for wave in itertools.zip_longest(*groups.values()):
        ordered += [t for t in wave if t is not None]
    return ordered


# --------------------------------------------------------------------------------------------
# Ranking, early stop, choice


def compression_key(trial: Mapping[str, Any], budget: Budget) -> tuple[float, float]:
    """Bigger = more compressed: the budget's ratio first, the other ratio second."""
    other = "flops_ratio" if budget.ratio_key == "params_ratio" else "params_ratio"
    return (_number(trial.get(budget.ratio_key)) or 0.0, _number(trial.get(other)) or 0.0)


def cheap_score(trial: Mapping[str, Any]) -> tuple[float, float]:
    """What the cheap signals predict of the final metric: the pruned model's validation metric, then
    the thresholded one's (bigger = better)."""
    return (_number(trial.get("val_pruned")) or 0.0, _number(trial.get("val_thresholded")) or 0.0)


def retrain_order(trials: Sequence[Mapping[str, Any]], budget: Budget, top_k: int,
                  base_val: float | None = None, max_pruned_drop: float | None = None) -> list[Mapping[str, Any]]:
    """The screened trials worth retraining, in the order to retrain them (at most ``top_k``).

    Ratio budgets: the trials reaching the ratio (compression does not change with retraining), best cheap
    signal first. ``map_drop``: the trials no other trial beats on both compression and cheap signal (the
    cheap Pareto front), most compressed first, so that the first one within the budget is the answer
    (``should_stop``). ``max_pruned_drop`` (points) drops trials whose pruned validation metric lies further
    below ``base_val``.
    """
    pool = [t for t in trials if t.get("status") != "failed" and budget.reaches_ratio(t)]
    if max_pruned_drop is not None and base_val is not None:
        pool = [t for t in pool if base_val - (_number(t.get("val_pruned")) or 0.0) <= max_pruned_drop / 100 + 1e-9]
    if budget.kind != "map_drop":
        return sorted(pool, key=lambda t: (cheap_score(t), compression_key(t, budget)), reverse=True)[:top_k]
    front = [t for t in pool if not any(_dominates(o, t, budget) for o in pool if o is not t)]
    rest = [t for t in pool if t not in front]
    ordered = sorted(front, key=lambda t: (compression_key(t, budget), cheap_score(t)), reverse=True)
    # Spare retrains go to the next-best of the others (by cheap signal), should the front all fail.
    ordered += sorted(rest, key=lambda t: (cheap_score(t), compression_key(t, budget)), reverse=True)
    return ordered[:top_k]


def _dominates(a: Mapping[str, Any], b: Mapping[str, Any], budget: Budget) -> bool:
    ca, cb = compression_key(a, budget)[0], compression_key(b, budget)[0]
    sa, sb = cheap_score(a)[0], cheap_score(b)[0]
    return ca >= cb and sa >= sb and (ca > cb or sa > sb)


def should_stop(retrained: Sequence[Mapping[str, Any]], remaining: Sequence[Mapping[str, Any]],
                budget: Budget) -> bool:
    """Early stop of the retraining: nothing left to retrain can beat the best trial within the budget.

    ``map_drop``: a retrained trial meets the budget and every remaining one is less compressed (the answer
    is the most compressed within the budget). Ratio budgets: a retrained trial lost nothing on the
    validation split (val_drop <= 0): no other can lose less than nothing by more than noise.
    """
    best = choose(retrained, budget)
    if best is None:
        return False
    if budget.kind == "map_drop":
        return all(compression_key(t, budget) <= compression_key(best, budget) for t in remaining)
    return (_number(best.get("val_drop")) or 0.0) <= 0.0


def choose(trials: Iterable[Mapping[str, Any]], budget: Budget) -> Mapping[str, Any] | None:
    """The answer among retrained trials: ``map_drop``: the most compressed within the validation drop (ties:
    smaller drop); ratio budgets: the smallest validation drop among those reaching the ratio (ties: more
    compressed). None when no trial is within the budget."""
    within = [t for t in trials if _number(t.get("val_drop")) is not None and budget.meets(t)]
    if not within:
        return None
    if budget.kind == "map_drop":
        return max(within, key=lambda t: (compression_key(t, budget), -_number(t.get("val_drop"))))
    return max(within, key=lambda t: (-_number(t.get("val_drop")), compression_key(t, budget)))


# --------------------------------------------------------------------------------------------
# Pareto fronts and rank correlation


def pareto_front(points: Iterable[Mapping[str, Any]], x: str = "flops_ratio", y: str = "map") -> list[Mapping[str, Any]]:
    """The points no other point beats on both ``x`` and ``y`` (both bigger = better), by ``x`` ascending.

    Points missing either value are left out; of equal points the first is kept.
    """
    valid = [p for p in points if _number(p.get(x)) is not None and _number(p.get(y)) is not None]
    front = []
    for p in valid:
        px, py = float(p[x]), float(p[y])
        beaten = any((float(q[x]) >= px and float(q[y]) >= py and (float(q[x]) > px or float(q[y]) > py))
                     for q in valid if q is not p)
        duplicate = any(float(q[x]) == px and float(q[y]) == py for q in front)
        if not beaten and not duplicate:
            front.append(p)
    return sorted(front, key=lambda p: float(p[x]))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired values (average ranks for ties); None for fewer than 3 pairs
    or when either side is constant (the correlation is undefined)."""
    pairs = [(float(u), float(v)) for u, v in zip(a, b, strict=True) if _number(u) is not None and _number(v) is not None]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if rho is None or not math.isfinite(float(rho)) else float(rho)


# --------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."
