"""Locations that may be URIs: ``compute.storage_path`` and ``data.root`` (s3://, gs://, file:// or a path).

They stay strings in the config and are opened with ``pyarrow.fs.FileSystem.from_uri``, as Ray Train opens
its storage path; a plain path keeps meaning a local (or mounted) folder, resolved against the driver's
working directory before it travels to a node.

* ``stage_data(source, target)``: copy a prepared dataset folder to shared storage (``prunepipe data stage``).
* ``local_data_root(root)``: on a node, a folder the data loaders can read: the path itself, a ``file://``
  URI's path, or a copy of a remote folder in this node's cache, made once and reused by every stage and
  worker on the node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compression.errors import DataError

# Where a node keeps its copies of remote datasets (one folder per data.root).
DATA_CACHE = Path(os.environ.get("PRUNEPIPE_DATA_CACHE", Path(tempfile.gettempdir()) / "prunepipe-data"))
_COMPLETE = ".prunepipe-staged"  # written last: a copy without it is incomplete


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def absolute(location: str | os.PathLike[str]) -> str:
    """A URI as it is, a path resolved against this working directory."""
    return str(location) if is_uri(location) else str(Path(location).resolve())


def filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path in it)`` for a URI or a local path."""
    from pyarrow import fs

    if is_uri(location):
        try:
            return fs.FileSystem.from_uri(location)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{location}: cannot open this URI ({str(exc).splitlines()[0][:200]})") from None
    return fs.LocalFileSystem(), str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def read_text(location: str) -> str:
    """A file's text at a URI or path (``OSError`` when it is not there)."""
    system, path = filesystem(location)
    with system.open_input_stream(path) as stream:
        return stream.read().decode()


def check_stage_target(target: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of a staging target that can be opened and holds nothing yet (one-line
    DataError otherwise), checked before anything is generated or copied."""
    from pyarrow import fs

    system, path = filesystem(target)
    info = system.get_file_info(path)
    if info.type == fs.FileType.File or (
            info.type == fs.FileType.Directory and system.get_file_info(fs.FileSelector(path, recursive=False))):
        raise DataError(f"{target}: already exists and is not empty; refusing to overwrite")
    return system, path


def stage_data(source: str | os.PathLike[str], target: str) -> int:
    """Copy the dataset folder ``source`` (a local folder) to ``target`` (a URI or path); returns the number
    of files. A target that already holds files is refused (nothing is overwritten)."""
    from pyarrow import fs

    source = Path(source).resolve()
    if not source.is_dir():
        raise DataError(f"data.root {source}: not a folder to stage")
    system, path = check_stage_target(target)
    files = [p for p in source.rglob("*") if p.is_file()]
    fs.copy_files(str(source), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=system)
    return len(files)


def local_data_root(root: str) -> str:
    """A local folder holding ``root``: a path or a ``file://`` URI's path as it is; a remote folder copied
    into this node's cache (``$PRUNEPIPE_DATA_CACHE``) the first time and reused afterwards."""
    if not is_uri(root):
        return root
    from pyarrow import fs

    system, path = filesystem(root)
    if isinstance(system, fs.LocalFileSystem):
        return path
    cached = DATA_CACHE / hashlib.sha256(root.encode()).hexdigest()[:16] / Path(path).name
    if (cached.parent / _COMPLETE).is_file():
        return str(cached)
    if system.get_file_info(path).type != fs.FileType.Directory:
        raise DataError(f"data.root {root}: no such folder")
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Copied aside and renamed into place: the stages and workers of a node may start at once.
    scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached.parent))
    try:
        fs.copy_files(path, str(scratch / cached.name), source_filesystem=system,
                      destination_filesystem=fs.LocalFileSystem())
        try:
            (scratch / cached.name).rename(cached)
        except OSError:  # another process on this node finished first
            if not cached.is_dir():
                raise
        (cached.parent / _COMPLETE).touch()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(cached)
