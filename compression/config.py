"""The whole pipeline's configuration: one pydantic v2 schema, YAML presets, ``--set`` overrides.

Every model forbids unknown keys, so a typo fails at load time with the key's path and the valid
choices, before any work starts. The same schema is the Prefect flow's parameter, so the Prefect UI
renders it as a validated form (ranges from ``Field`` constraints become JSON-schema bounds).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compression.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# VOC image sets are "YEAR:SPLIT" (the loader parses them the same way: compression.data.voc).
_IMAGE_SET = re.compile(r"^[^:/\\\s]+:[^:/\\\s]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    kind: Literal["voc", "cifar10", "imagefolder"] = "voc"
    root: str = Field("data/digits-voc/VOCdevkit", description="VOCdevkit folder, CIFAR folder or ImageFolder root: "
                      "a path, or a URI (file://, s3://, gs://) that prunepipe run's nodes copy from")
    builtin: Literal["digits-voc", "digits-cls"] | None = Field(
        "digits-voc", description="generate this built-in dataset at `root` when it does not exist yet"
    )
    classes: Literal["digits", "voc"] | list[str] = Field(
        "digits", description="class names (without background): a preset name or an explicit list"
    )
    train_sets: list[str] = Field(["2007:train"], description="VOC year:split lists combined for training")
    val_sets: list[str] = Field(
        ["2007:val"], description="VOC year:split lists for validation, disjoint from train_sets ([] with val_holdout)"
    )
    val_holdout: float | None = Field(
        None, gt=0, lt=1,
        description="validate on this share of the training images instead, drawn with data.seed and left out "
                    "of training (for training sets that leave no validation split of their own)",
    )
    test_sets: list[str] = ["2007:test"]
    hflip: bool = Field(False, description="horizontal-flip augmentation (off for digits: a flipped 2 is no 2)")
    augment: Literal["ssd", "photometric"] = Field(
        "ssd", description="detection training augmentation: SSD's full set, or photometric only (no zoom/crop)"
    )
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    max_images: int | None = Field(None, ge=1, description="use only the first N images of each split (smoke tests)")
    seed: int = Field(0, description="seed of the built-in dataset generator and of the val_holdout draw")

    @field_validator("root", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("train_sets", "val_sets", "test_sets")
    @classmethod
    def _year_split(cls, sets: list[str]) -> list[str]:
        bad = [spec for spec in sets if not _IMAGE_SET.match(spec)]
        if bad:
            raise ValueError(f"image set {bad[0]!r}: expected 'YEAR:SPLIT', e.g. '2007:trainval'")
        return sets

    @model_validator(mode="after")
    def _validation_apart_from_training(self) -> DataConfig:
        # Choices made on validation (alpha, early checks) must not be made on training images.
        if self.val_holdout is not None:
            if self.val_sets:
                raise ValueError(f"data.val_holdout={self.val_holdout} validates on held-out training images: "
                                 f"set data.val_sets to [] (got {self.val_sets})")
            return self
        if self.kind == "voc":
            for val in self.val_sets:
                for train in self.train_sets:
                    if _image_sets_overlap(val, train):
                        raise ValueError(f"data.val_sets {val!r} overlaps data.train_sets {train!r}: validation would "
                                         "run on training images; hold them out with data.val_holdout instead")
        return self


def _image_sets_overlap(a: str, b: str) -> bool:
    """Whether two VOC ``YEAR:SPLIT`` lists share images by VOC's naming (trainval is train plus val)."""
    year_a, split_a = a.split(":")
    year_b, split_b = b.split(":")
    parts = {"trainval": {"train", "val"}}
    return year_a == year_b and bool(parts.get(split_a, {split_a}) & parts.get(split_b, {split_b}))


class ModelConfig(_Strict):
    name: Literal["ssd300_vgg16", "ssd_vgg_lite", "vgg16_cifar"] = "ssd_vgg_lite"
    width_mult: float | None = Field(None, gt=0, le=1, description="channel width multiplier (lite/cifar models)")
    image_size: int | None = Field(None, ge=32, le=1024, description="input size (lite/cifar models)")
    weights: Path | None = Field(None, description="local weights file (.safetensors or a weights-only state dict)")
    batch_norm: bool | None = Field(
        None, description="ssd_vgg_lite: a BatchNorm after every conv (empty: on); false gives the paper's plain "
                          "conv + ReLU SSD"
    )

    @model_validator(mode="after")
    def _batch_norm_option(self) -> ModelConfig:
        if self.batch_norm is not None and self.name != "ssd_vgg_lite":
            raise ValueError(f"batch_norm is an option of ssd_vgg_lite only, not of {self.name}")
        return self


class OptimConfig(_Strict):
    epochs: int = Field(10, ge=0, le=10_000)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class PretrainConfig(OptimConfig):
    checkpoint: Path | None = Field(None, description="start from this base checkpoint instead of training")
    early_stopping: bool = Field(
        False, description="stop when the validation split's primary metric has not improved for `patience` "
                           "epochs; `epochs` is then the maximum, and the best epoch's weights are the output"
    )
    patience: int = Field(3, ge=1, description="epochs without a better validation metric before pretraining stops")
    eval_every: int = Field(1, ge=1, description="early stopping: evaluate on the validation split every N epochs")


class SparsityConfig(OptimConfig):
    epochs: int = Field(5, ge=0, le=10_000)
    l1_lambda: float = Field(1e-4, ge=0, description="λ of the L1 penalty over the phase's conv weights")
    group_norm_reg: float = Field(
        5e-4, ge=0, description="criterion group_norm: the GroupNormPruner regulariser's strength (in place of λ; "
                                "torch-pruning's CIFAR setting)"
    )
    alpha_grid: list[float] = Field(
        [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
        min_length=1,
        description="candidate global multipliers α of the per-layer threshold τ_l = α·mean|W_l|",
    )
    max_drop: float = Field(0.01, ge=0, le=1, description="largest validation mAP/accuracy drop allowed for α")

    @field_validator("alpha_grid")
    @classmethod
    def _positive_alphas(cls, grid: list[float]) -> list[float]:
        bad = [a for a in grid if a <= 0]
        if bad:
            raise ValueError(f"every α must be > 0, got {bad}")
        return sorted(grid)


class SelectionConfig(_Strict):
    criterion: Literal["seed", "taylor", "l1_norm", "bn_scale", "random", "group_norm"] = "seed"
    gamma: float = Field(0.9, gt=0, le=1, description="a filter is removed when s_out or s_in reaches γ")
    min_channels: int = Field(4, ge=1, description="never keep fewer filters than this in a layer")
    max_layer_ratio: float = Field(
        1.0, gt=0, le=1,
        description="never remove more than this share of a layer's filters in one selection (torch-pruning's "
                    "max_pruning_ratio); below 1 it keeps a global ranking from squeezing a whole stretch of the "
                    "network to min_channels",
    )
    round_to: int = Field(1, ge=1, description="round kept filter counts to a multiple of this")
    prune_ratio: float | None = Field(
        None, gt=0, le=1, description="ranking criteria: fraction of the phase's filters to remove"
    )
    target_flops_ratio: float | None = Field(
        None, gt=1, description="ranking criteria: remove filters until FLOPs shrink by this factor"
    )
    out_of_reach: Literal["fail", "closest"] = Field(
        "fail", description="a FLOPs or latency target the floors (min_channels, max_layer_ratio) cannot reach: fail, "
                            "or prune as far as they allow and record how far short it stopped"
    )
    target_latency_ratio: float | None = Field(
        None, gt=1,
        description="remove the filters with the least importance per millisecond saved until the deployment "
                    "latency (the latency table of export.*) shrinks by this factor; kept widths are the ones the "
                    "table shows the device runs fastest",
    )
    taylor_batches: int = Field(10, ge=1, description="batches over which Taylor scores are accumulated")
    taylor_step_filters: int = Field(8, ge=1, description="filters removed per Taylor step")
    taylor_finetune_batches: int = Field(20, ge=0, description="fine-tuning batches between Taylor steps")
    compensate: bool = Field(
        True, description="fold each removed filter's mean output into its consumers' biases when pruning (ours)"
    )
    compensation_batches: int = Field(4, ge=1, description="training batches (no augmentation) those means are taken over")
    layer_sensitivity: bool = Field(
        False, description="latency targets: weigh each layer's filters by how much the validation loss rises when "
                           "that layer alone loses half its filters (Li et al. 2017's sensitivity analysis), so that "
                           "the plan spares the layers the model needs most"
    )
    sensitivity_batches: int = Field(4, ge=1, description="validation batches the layer sensitivity is measured on")
    seed: int = 0


class RetrainConfig(OptimConfig):
    pass


class DistillConfig(OptimConfig):
    enabled: bool = True
    temperature: float = Field(4.0, gt=0, le=100)
    kd_weight: float = Field(0.5, ge=0, le=1, description="a: weight of the KL term on class logits")
    box_weight: float = Field(0.5, ge=0, description="b: weight of the teacher-bounded regression loss")
    margin: float = Field(0.0, ge=0, description="m: teacher-bounded regression margin")
    hint_weight: float = Field(0.0, ge=0, description="c: weight of the hint (feature) loss; 0 disables it")
    hint_layer: str | None = Field(None, description="student/teacher feature map for the hint loss")


# A phase's own settings of filter selection (``PipelineConfig.for_phase`` puts them in stages.selection).
PHASE_SELECTION_KEYS = ("gamma", "prune_ratio", "target_flops_ratio", "target_latency_ratio", "max_layer_ratio")


class PhaseConfig(_Strict):
    name: str
    layers: list[str] = Field(min_length=1, description="layers pruned in this phase (paper names or module paths)")
    # The paper tunes each phase; unset means the stage's setting (see ``for_phase``).
    l1_lambda: float | None = Field(None, ge=0, description="this phase's λ (default stages.sparsity.l1_lambda)")
    gamma: float | None = Field(None, gt=0, le=1, description="this phase's γ (default stages.selection.gamma)")
    prune_ratio: float | None = Field(None, gt=0, le=1, description="this phase's stages.selection.prune_ratio")
    target_flops_ratio: float | None = Field(
        None, gt=1, description="this phase's stages.selection.target_flops_ratio (FLOPs of the phase's input model)"
    )
    target_latency_ratio: float | None = Field(
        None, gt=1, description="this phase's stages.selection.target_latency_ratio (latency of the phase's input model)"
    )
    max_layer_ratio: float | None = Field(None, gt=0, le=1, description="this phase's stages.selection.max_layer_ratio")
    remove_layers: list[str] = Field(
        default_factory=list,
        description="convs removed whole before the phase prunes filters (layer pruning; ssd_vgg_lite: a conv after "
                    "the first of its VGG stage); the phase's targets count from the model without them",
    )

    def identity(self) -> dict[str, Any]:
        """What names this phase's outputs besides its λ / γ / cuts (which reach each stage's own settings):
        its name and layers, and the layers it removes when it removes any (keys of earlier runs unchanged)."""
        identity: dict[str, Any] = {"name": self.name, "layers": list(self.layers)}
        if self.remove_layers:
            identity["remove_layers"] = list(self.remove_layers)
        return identity


class StagesConfig(_Strict):
    pretrain: PretrainConfig = PretrainConfig()
    sparsity: SparsityConfig = SparsityConfig()
    selection: SelectionConfig = SelectionConfig()
    retrain: RetrainConfig = RetrainConfig(epochs=5)
    distill: DistillConfig = DistillConfig(epochs=5)
    phases: list[PhaseConfig] | None = Field(None, description="empty: the model's default phases")


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(None, description="empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "prunepipe"
    registered_model: str | None = Field(
        "prunepipe-{name}", description="Model Registry name ({name}: the run's name, {model}: the model); empty: skip"
    )
    alias: str = Field("champion", description="moves to a new version only when it passes the champion gate")
    champion_max_drop: float = Field(
        0.01, ge=0, le=1, description="the alias moves only to a model whose validation metric is at most this "
                                      "far below its base's (a fraction) and above the current holder's"
    )
    log_checkpoints: Literal["all", "final", "none"] = Field(
        "final", description="checkpoint files uploaded to MLflow: every stage's, the final one's, or none"
    )

    @field_validator("registered_model")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        if value:
            try:
                value.format(name="name", model="model")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{value!r}: unknown placeholder {exc} (use {{name}} or {{model}})") from None
        return value
    log_onnx: bool = Field(True, description="export the final checkpoint to ONNX and log the files, "
                           "onnx_size_bytes and onnx_flops on its MLflow run")


class ExportConfig(_Strict):
    """The deployment target: its post-processing, and the runtime, batch and threads latency is measured at."""

    score_threshold: float = Field(
        0.01, ge=0, lt=1, description="detectors: class scores at or below this never reach NMS (evaluation uses it too)"
    )
    score_threshold_max_val_drop: float | None = Field(
        None, ge=0, le=1, description="detectors: when set, every checkpoint's score threshold is chosen on the "
        "validation split: the highest of 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5 at or above score_threshold "
        "whose validation mAP (VOC07) is at most this below the mAP at score_threshold (0.005: half a point). A "
        "pruned detector sends more low-scoring boxes through NMS, and its post-processing shrinks with it"
    )
    pre_nms_top_k: int = Field(
        400, ge=1, le=100_000, description="detectors: at most this many boxes per class and image enter NMS "
                                           "(evaluation uses it too)"
    )
    batch_size: int = Field(32, ge=1, le=4096, description="batch size the latency table is measured at")
    threads: int = Field(1, ge=1, le=1024, description="CPU threads of the deployment runtime (ONNX Runtime)")
    onnxruntime_layout: Literal["auto", "nchwc", "nchw"] = Field(
        "auto", description="ONNX Runtime's layout on the CPU: nchwc (blocked, its top optimisation level), nchw "
                            "(every fusion but that), or auto: whichever runs the model faster, measured per model "
                            "(pruned networks narrower than a vector block run faster in nchw)"
    )
    grid_step: int = Field(
        8, ge=1, le=512, description="latency table: widths measured are multiples of this (and each layer's width)"
    )
    latency_table: str | None = Field(
        None, description="latency table file to read, and to add this device's table to when it has none that "
                          "covers the model (default: latency_table.json in the run's folder)"
    )


class ComputeConfig(_Strict):
    use_gpu: bool = False
    num_workers: int = Field(2, ge=1, le=1024, description="Ray Train workers per training stage")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(
        1.0, gt=0, le=64, description="GPUs each worker reserves when use_gpu; a fraction lets small fits share a GPU"
    )
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker (default: cpus)")
    ray_address: str | None = Field(None, description="empty: $RAY_ADDRESS, else a local Ray for the run")
    max_failures: int = Field(1, ge=0, le=100)
    storage_path: str | None = Field(
        None, description="Ray Train storage: a path every node sees, or a URI (s3://, gs://, file://); "
                          "default: <workdir>/ray"
    )
    @field_validator("storage_path", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    amp_bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast; auto: on where the device runs bf16 natively (a CPU with AVX-512-BF16 "
                            "or AMX, a GPU with bf16), off where it would be emulated"
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="channels-last (NHWC) tensors; auto: on with oneDNN (CPU) or cuDNN (GPU)"
    )
    log_every_steps: int = Field(20, ge=0, description="a training progress line every N steps (0: once per epoch)")
    compile: bool = False
    fast_ssd: bool = Field(True, description="batched SSD loss / post-processing instead of torchvision's loops")


class PipelineConfig(_Strict):
    name: str = "default"
    seed: int = 0
    workdir: str = Field("runs", description="where checkpoints and run outputs go: a folder, or a URI (s3://, gs://, "
                                             "file://) that every node reads and writes")

    @field_validator("workdir", mode="before")
    @classmethod
    def _workdir_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: StagesConfig = StagesConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _data_fits_model(self) -> PipelineConfig:
        from compression.models import model_task  # local: keep config import-light

        task = model_task(self.model.name)
        if task == "detection" and self.data.kind != "voc":
            raise ValueError(f"model {self.model.name!r} is a detector and needs data.kind 'voc', got {self.data.kind!r}")
        if task == "classification" and self.data.kind == "voc":
            raise ValueError(f"model {self.model.name!r} is a classifier and needs data.kind 'cifar10' or 'imagefolder'")
        return self

    def for_phase(self, phase: PhaseConfig | None) -> PipelineConfig:
        """This config with ``phase``'s own λ / γ / ratios in place of the stages' settings (a copy)."""
        if phase is None:
            return self
        sparsity = {"l1_lambda": phase.l1_lambda} if phase.l1_lambda is not None else {}
        selection = {key: getattr(phase, key) for key in PHASE_SELECTION_KEYS if getattr(phase, key) is not None}
        if not sparsity and not selection:
            return self
        stages = self.stages.model_copy(update={
            "sparsity": self.stages.sparsity.model_copy(update=sparsity),
            "selection": self.stages.selection.model_copy(update=selection),
        })
        return self.model_copy(update={"stages": stages})

    def config_hash(self) -> str:
        """Stable digest of every setting that differs from the schema's default (the MLflow tag that groups
        a pipeline's runs): a setting added later, whose default keeps what runs did before, leaves it as it
        was. What identifies one stage's output is ``compression.plan.stage_settings``."""
        payload = json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML preset (a path, or a name in compression/configs/) and apply ``key.path=value`` overrides."""
    source = "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_preset(path)
        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # PyYAML's can span lines
            raise ConfigError(f"{file}:{where} is not valid YAML ({problem})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of settings, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source)


def resolve_preset(path: Path | str) -> Path:
    file = Path(path)
    if not file.exists() and not file.suffix and (CONFIG_DIR / f"{file}.yaml").exists():
        file = CONFIG_DIR / f"{file}.yaml"
    if not file.is_file():
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"{file}: config file not found (presets: {', '.join(presets)})")
    return file


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value``: value parsed as YAML (so 3 is an int, [1,2] a list, null is None). A phase of
    ``stages.phases`` is addressed by its name: ``stages.phases.phase1.target_flops_ratio=4``."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. stages.retrain.epochs=3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = _named_item(node, part) if isinstance(node, list) else node.setdefault(part, {})
        if child is None:
            names = ", ".join(str(entry.get("name")) for entry in node if isinstance(entry, dict))
            raise ConfigError(f"--set {item!r}: no phase {part!r} (the phases are {names or 'none'})")
        if not (isinstance(child, dict) or isinstance(child, list) and all(isinstance(e, dict) for e in child)):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node = child
    if isinstance(node, list):
        raise ConfigError(f"--set {item!r}: name a phase and its setting, e.g. stages.phases.phase1.gamma=0.8")
    node[parts[-1]] = value


def _named_item(items: list[Any], part: str) -> dict[str, Any] | None:
    """The entry of a list of sections (``stages.phases``) named ``part``: ``stages.phases.phase1.gamma``."""
    return next((entry for entry in items if isinstance(entry, dict) and entry.get("name") == part), None)


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{source}: {describe_error(err)}") from None


def describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    key = ".".join(loc) or "(top level)"
    if not key.isprintable():  # a key with a line break or a control character: show it escaped, on one line
        key = key.encode("unicode_escape").decode("ascii")
    if err.get("type") == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        return f"unknown key '{key}' (valid keys here: {', '.join(valid)})"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")  # our validators' own words
    if not loc:  # a check across sections (model vs data): its message names the keys
        return msg
    if "input" in err and err.get("type") != "missing":
        got = err["input"]
        if not isinstance(got, dict):
            return f"key '{key}': {msg} (got {got!r})"
    return f"key '{key}': {msg}"


def _valid_keys(loc: list[str]) -> list[str]:
    """Field names of the model at ``loc`` (walking the schema, list indices skipped)."""
    model: Any = PipelineConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def class_names(cfg: DataConfig) -> list[str]:
    """Class names without background, from the preset name or the explicit list."""
    if isinstance(cfg.classes, list):
        return list(cfg.classes)
    if cfg.classes == "voc":
        from compression.data.voc import VOC_CLASSES

        return list(VOC_CLASSES)
    from compression.data.digits import DIGIT_CLASSES

    return list(DIGIT_CLASSES)
