"""Checkpoints: one ``.safetensors`` file holding the weights and, in its header, JSON metadata.

The metadata says how to rebuild the model (registry name and arguments), the shape of every
tensor after pruning, the class names, the lineage (parent checkpoint and stage) and the metrics.
Loading rebuilds the model from the registry, resizes pruned modules to the recorded shapes and
loads the weights. Nothing is ever unpickled: safetensors stores raw tensors only, and a pickle
(``torch.save``) file is refused. Writes go to a temporary file renamed into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compression.errors import CheckpointError, ModelError

FORMAT = "prunepipe-checkpoint/1"
_META_KEY = "prunepipe"


@dataclass
class Checkpoint:
    """A model with what is needed to rebuild it, and where it came from."""

    model: nn.Module
    model_name: str
    model_args: dict[str, Any]
    class_names: list[str]
    stage: str = "pretrain"
    phase: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def task(self) -> str:
        from compression.models import model_task

        return model_task(self.model_name)

    def derive(self, model: nn.Module, stage: str, phase: str | None = None, **extra: Any) -> Checkpoint:
        """A child checkpoint of this one (same architecture family, new weights/shapes)."""
        return Checkpoint(
            model=model,
            model_name=self.model_name,
            model_args=dict(self.model_args),
            class_names=list(self.class_names),
            stage=stage,
            phase=phase,
            parent=str(self.path) if self.path else None,
            extra=dict(extra),
        )


def module_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every resizable module (for humans and `prunepipe info`)."""
    shapes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {"in_channels": module.in_channels, "out_channels": module.out_channels}
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            shapes[name] = {"num_features": module.num_features}
        elif isinstance(module, nn.Linear):
            shapes[name] = {"in_features": module.in_features, "out_features": module.out_features}
    return shapes


def save_checkpoint(ckpt: Checkpoint, path: Path | str) -> Path:
    """Write ``ckpt`` atomically to ``path`` (``.safetensors``); returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoint files must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Shared storage (tied weights) must be cloned: safetensors refuses aliased tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt.model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model_name": ckpt.model_name,
        "model_args": ckpt.model_args,
        "class_names": ckpt.class_names,
        "stage": ckpt.stage,
        "phase": ckpt.phase,
        "parent": ckpt.parent,
        "metrics": ckpt.metrics,
        "extra": ckpt.extra,
        "module_shapes": module_shapes(ckpt.model),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, default=_json_default)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # a full disk, a quota, a read-only folder
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: could not write the checkpoint ({_os_reason(err)}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    ckpt.path = path
    return path


def _os_reason(err: BaseException) -> str:
    lines = str(err).splitlines()
    return getattr(err, "strerror", None) or (lines[0] if lines else type(err).__name__)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its weights."""
    path = _check_file(Path(path))
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_short(exc)})") from None
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without prunepipe metadata (not a prunepipe checkpoint)")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: unsupported checkpoint format {found!r} (expected {FORMAT})")
    for key, kind in (("model_name", str), ("model_args", dict), ("class_names", list)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{path}: checkpoint metadata {key!r} is {meta.get(key)!r}, expected a {kind.__name__}"
            )
    return meta


def load_checkpoint(path: Path | str, expect_model: str | None = None) -> Checkpoint:
    """Rebuild the model recorded in ``path`` and load its weights (pruned shapes included)."""
    from compression.models import build_model

    path = Path(path)
    meta = read_metadata(path)
    if expect_model is not None and meta["model_name"] != expect_model:
        raise CheckpointError(
            f"{path}: checkpoint holds a {meta['model_name']!r} model, but {expect_model!r} was expected"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({_short(exc)}); the file may be truncated") from None
    try:
        model = build_model(meta["model_name"], **meta["model_args"])
    except (ModelError, TypeError, ValueError) as exc:  # metadata naming no model this version can build
        raise CheckpointError(f"{path}: cannot rebuild its model ({_short(exc)})") from None
    resize_to_state_dict(model, tensors, path)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"{path}: weights do not fit a {meta['model_name']!r} model ({what}); "
            "is it a checkpoint of another architecture?"
        )
    postprocess = (meta.get("extra") or {}).get("postprocess")
    if postprocess is not None:  # the deployment's post-processing the stage measured the model with
        from compression.models import apply_postprocess_settings

        try:
            apply_postprocess_settings(model, postprocess if isinstance(postprocess, dict) else {})
        except (ModelError, AttributeError) as exc:
            raise CheckpointError(f"{path}: metadata 'postprocess' {postprocess!r}: {_short(exc)}") from None
    return Checkpoint(
        model=model,
        model_name=meta["model_name"],
        model_args=meta["model_args"],
        class_names=meta["class_names"],
        stage=meta.get("stage", "pretrain"),
        phase=meta.get("phase"),
        parent=meta.get("parent"),
        metrics=meta.get("metrics", {}),
        extra=meta.get("extra", {}),
        path=path,
    )


def resize_to_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
    """Give every parameter/buffer the shape recorded in ``tensors`` and fix module attributes.

    Pruning changes only tensor shapes (dense, smaller modules), so the fresh model is resized tensor
    by tensor before ``load_state_dict``; the channel attributes of convs/BN/linear layers follow.
    """
    own = model.state_dict()
    changed_modules: set[str] = set()
    for key, tensor in tensors.items():
        if key not in own or own[key].shape == tensor.shape:
            continue
        if own[key].dim() != tensor.dim():
            raise CheckpointError(
                f"{path}: tensor {key!r} has {tensor.dim()} dims, the model expects {own[key].dim()}; "
                "is it a checkpoint of another architecture?"
            )
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        old = getattr(module, attr)
        new = torch.empty(tensor.shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, new)
        changed_modules.add(module_name)
    for name in changed_modules:
        _sync_module_attributes(model.get_submodule(name) if name else model)


def _sync_module_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def load_weights(model: nn.Module, path: Path | str) -> None:
    """Load a plain weights file (``.safetensors``, or a state dict read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
        raise CheckpointError(f"{path}: cannot read weights ({_short(exc)})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(tensors).__name__}")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({_short(exc)})") from None


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors checkpoint file")
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors: an 8-byte header length, then the JSON header ("{"). Anything else that starts like
    # torch.save's output (a zip "PK", or a raw pickle's 0x80 protocol byte) is refused, never unpickled.
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path}: looks like a pickle/torch.save file; prunepipe never unpickles checkpoints "
            "(convert it to .safetensors)"
        )
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is truncated ({len(head)} bytes)")
    return path


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file (cache keys for flow tasks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
