"""File helpers of the stages: atomic JSON, hidden scratch files, the selection JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compression.errors import ConfigError, StageError


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` in one step (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def scratch_path(out: Path, tag: str) -> Path:
    """A hidden working file next to ``out`` (same folder, so the final rename stays atomic)."""
    out = Path(out)
    return out.with_name(f".{out.stem}.{tag}{out.suffix}")


def refuse_same_file(source: Path, out: Path) -> None:
    """One-line ConfigError when a stage's output would overwrite its input."""
    if Path(source).resolve() == Path(out).resolve():
        raise ConfigError(f"{out}: the output would overwrite the stage's input; pass another output path")


def read_selection(path: Path) -> dict[str, Any]:
    """A selection JSON written by ``select_filters`` / ``taylor_prune_stage`` (one-line errors)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: selection file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a valid selection JSON ({exc})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("remove"), list) and isinstance(e.get("keep"), int) for e in layers.values()
    ):
        raise StageError(f"{path}: a selection needs 'layers': {{layer: {{'remove': [...], 'keep': n}}}}")
    return data
