"""Locations that may be URIs: ``compute.storage_path`` and ``data.root`` (s3://, gs://, file:// or a path).

They stay strings in the config and are opened with ``pyarrow.fs.FileSystem.from_uri``, as Ray Train opens
its storage path; a plain path keeps meaning a local (or mounted) folder, resolved against the driver's
working directory before it travels to a node.

* ``stage_data(source, target)``: copy a prepared dataset folder to shared storage (``prunepipe data stage``).
* ``local_data_root(root)``: on a node, a folder the data loaders can read: the path itself, a ``file://``
  URI's path, or a copy of a remote folder in this node's cache, made once and reused by every stage and
  worker on the node.

A run folder (``workdir``) may be a URI too. A plain path is used in place (one machine, or a mount every
node shares). A URI is remote storage, ``file://`` included: every machine works on its own copy of the
files it needs (``local_mirror``: ``$PRUNEPIPE_RUN_CACHE/<store>/<path>``) and publishes what it writes
(``publish``), so nodes and the flow's process share nothing but that storage.

* ``run_folder(workdir, name)``: this machine's folder of a run; ``location_of(path, workdir)``: where a
  file of it lives for every node.
* ``fetch(location)``: a local file holding ``location``, downloaded when this machine's copy is missing
  or differs from the stored file (size, modification time).
"""

from __future__ import annotations

import hashlib
import json
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
    """``location`` / parts; a URI's query (``?endpoint_override=...``) stays at the end."""
    base, sep, query = str(location).partition("?") if is_uri(location) else (str(location), "", "")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def parent(location: str) -> str:
    base, sep, query = str(location).partition("?") if is_uri(location) else (str(location), "", "")
    return base.rstrip("/").rsplit("/", 1)[0] + sep + query


# --------------------------------------------------------------------------------------------
# Run folders that are URIs: a local copy per machine, outputs published to the store


def run_cache() -> Path:
    """Where this machine keeps its copies of remote run folders (read each time: a node sets its own)."""
    return Path(os.environ.get("PRUNEPIPE_RUN_CACHE") or Path(tempfile.gettempdir()) / "prunepipe-runs")


def local_mirror(location: str) -> Path:
    """This machine's copy of ``location``: the path itself when it is one, else
    ``run_cache()/<digest of the store>/<path in the store>``."""
    if not is_uri(location):
        return Path(location).resolve()
    from urllib.parse import urlsplit

    parts = urlsplit(str(location))
    store = hashlib.sha256(f"{parts.scheme}://{parts.netloc}?{parts.query}".encode()).hexdigest()[:16]
    inside = [p for p in (parts.netloc + "/" + parts.path).split("/") if p not in ("", ".")]
    if ".." in inside:
        raise DataError(f"{location}: '..' in a storage location")
    return run_cache() / store / Path(*inside)


def run_folder(workdir: str | os.PathLike[str], name: str) -> Path:
    """The folder of run ``name`` on this machine (``workdir``'s copy here when it is a URI)."""
    return local_mirror(join(str(workdir), name)) if is_uri(workdir) else Path(workdir, name).resolve()


def location_of(path: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> str:
    """Where the file ``path`` (on this machine) lives for every node: its place under a URI ``workdir`` when
    it is in this machine's copy of it, else the absolute path."""
    path = Path(path).resolve()
    if is_uri(workdir):
        root = local_mirror(str(workdir))
        if path.is_relative_to(root):
            return join(str(workdir), *path.relative_to(root).parts)
    return str(path)


def _stamp(info: Any) -> dict[str, Any]:
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _stamp_file(local: Path) -> Path:
    return local.with_name(f".{local.name}.stored")


def fetch(location: str) -> Path:
    """A local file with the contents of ``location`` (FileNotFoundError when there is none): a path as it
    is; for a URI this machine's copy, downloaded when missing or older than the stored file."""
    if not is_uri(location):
        return Path(location)
    from pyarrow import fs

    system, path = filesystem(location)
    info = system.get_file_info(path)
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    local = local_mirror(location)
    stamp = _stamp_file(local)
    try:
        if local.is_file() and json.loads(stamp.read_text()) == _stamp(info):
            return local
    except (OSError, ValueError):
        pass
    local.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded aside and renamed into place: stages and workers on one node may fetch at once.
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".download", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as out, system.open_input_stream(path) as stream:
            shutil.copyfileobj(stream, out, 1 << 20)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp.write_text(json.dumps(_stamp(info)))
    return local


def forget(location: str) -> None:
    """Drop this machine's copy of a URI ``location`` (a path is left alone: it is the file itself)."""
    if is_uri(location):
        local = local_mirror(location)
        local.unlink(missing_ok=True)
        _stamp_file(local).unlink(missing_ok=True)


def remove(location: str) -> None:
    """Delete the file at ``location`` if there is one."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    from pyarrow import fs

    system, path = filesystem(location)
    if system.get_file_info(path).type == fs.FileType.File:
        system.delete_file(path)


def publish(local: str | os.PathLike[str], location: str) -> None:
    """Store the local file ``local`` at ``location`` (nothing to do when that is the same path)."""
    if not is_uri(location) and Path(local).resolve() == Path(location).resolve():
        return
    from pyarrow import fs

    system, path = filesystem(location)
    system.create_dir(path.rsplit("/", 1)[0], recursive=True)
    # An object store makes the object visible whole when the upload closes; a file system gets a
    # temporary name and a move, so a reader never sees half a file.
    direct = not isinstance(system, fs.LocalFileSystem)
    target = path if direct else f"{path}.{os.getpid()}.part"
    with open(local, "rb") as source, system.open_output_stream(target) as out:
        shutil.copyfileobj(source, out, 1 << 20)
    if not direct:
        system.move(target, path)
    # When ``local`` is this machine's copy of the stored file, the next fetch here downloads nothing.
    if local_mirror(location) == Path(local).resolve():
        _stamp_file(Path(local).resolve()).write_text(json.dumps(_stamp(system.get_file_info(path))))


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
