"""Detached service processes: each runs in its own process group, is recorded, and is stopped as a group.

Services started here outlive the Python process that started them (``prunepipe up`` returns while the
servers keep running), so every child gets its own session (``start_new_session``): stopping the group
stops the helpers a server forks (uvicorn workers, Ray's raylet and GCS) without touching anything else.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from compression.errors import PrunepipeError

# Console scripts of the venv that runs prunepipe (prefect, mlflow, ray), not whatever is first on PATH.
BIN_DIR = Path(sys.executable).parent

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Popen objects of children started by this interpreter, so they are reaped (no zombies, no
# "subprocess still running" ResourceWarning) when this same interpreter stops them.
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(PrunepipeError):
    """A local service cannot be started, found or stopped."""


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int  # also the process-group id: each service leads its own group
    start_ticks: int | None  # /proc/<pid>/stat start time; tells a live service from a reused pid
    log: str
    argv: tuple[str, ...]

    def to_json(self) -> dict:
        return asdict(self) | {"argv": list(self.argv)}

    @classmethod
    def from_json(cls, data: dict) -> ProcessRecord:
        return cls(
            name=data["name"],
            pid=int(data["pid"]),
            start_ticks=data.get("start_ticks"),
            log=data["log"],
            argv=tuple(data.get("argv", ())),
        )


def tool(name: str) -> str:
    path = BIN_DIR / name
    if not path.exists():
        raise StackError(f"{path}: '{name}' is not installed in this environment (pip install -e .)")
    return str(path)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **TELEMETRY_OFF, **(extra or {})}


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> ProcessRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():  # keep one previous log; a fresh one lets callers wait for start-up lines
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    stat = _stat(proc.pid)
    return ProcessRecord(name, proc.pid, stat[2] if stat else None, str(log_path), tuple(argv))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start_ticks) from /proc, or None where the pid is gone or there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        del _CHILDREN[pid]


def is_running(record: ProcessRecord) -> bool:
    _reap(record.pid)
    if Path("/proc").is_dir():
        stat = _stat(record.pid)
        if stat is None or stat[0] == "Z":
            return False
        return record.start_ticks is None or stat[2] == record.start_ticks
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    if Path("/proc").is_dir():
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat is not None and stat[1] == pgid and stat[0] != "Z":
                    members.append(int(entry.name))
        return members
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    return [pgid]


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pgid)
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop(record: ProcessRecord, leader_grace: float = 10.0, grace: float = 10.0) -> None:
    """Stop a service and everything in its process group: SIGTERM to the leader first (Ray's ``ray start
    --block`` then drains and stops its own daemons), after ``leader_grace`` seconds SIGTERM to the whole
    group, after ``grace`` more SIGKILL."""
    stat = _stat(record.pid)
    if stat is not None and record.start_ticks is not None and stat[2] != record.start_ticks:
        # The pid belongs to a newer process. Linux frees a pid only when no process uses it as its
        # process-group id any more, so nothing of this service is left to stop.
        return
    if is_running(record):
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    # If the leader has died, the group id is held only by processes it left behind.
    if not _wait_group_gone(record.pid, leader_grace):
        _signal_group(record.pid, signal.SIGTERM)
        if not _wait_group_gone(record.pid, grace):
            _signal_group(record.pid, signal.SIGKILL)
            _wait_group_gone(record.pid, 5.0)
    proc = _CHILDREN.pop(record.pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def port_taken(host: str, port: int) -> bool:
    """True if a listener holds ``port`` on ``host`` or on all interfaces (Ray's GCS binds 0.0.0.0)."""
    for bind_host in dict.fromkeys([host, "0.0.0.0"]):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Like the servers themselves, ignore connections in TIME_WAIT from an earlier run.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return True
                raise
    return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports that are free right now (the kernel's ephemeral picks)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body); status 0 when nothing answered."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def wait_until(
    checks: Iterable[tuple[ProcessRecord, Callable[[], bool]]], timeout: float
) -> ProcessRecord | None:
    """Poll every (process, check) pair, each in its own thread so a slow check does not hold up the
    others, until all pass. Return the first process that died or still failed at the deadline (the
    others stop waiting then), or None when all are healthy."""
    deadline = time.monotonic() + timeout
    first_failure: list[ProcessRecord] = []
    lock = threading.Lock()

    def poll(record: ProcessRecord, check: Callable[[], bool]) -> None:
        while not first_failure:
            if not is_running(record) or time.monotonic() >= deadline:
                with lock:
                    if not first_failure:
                        first_failure.append(record)
                return
            if check():
                return
            time.sleep(0.5)

    pairs = list(checks)
    with ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
        for future in [pool.submit(poll, *pair) for pair in pairs]:
            future.result()
    return first_failure[0] if first_failure else None


def log_tail(path: str | Path, lines: int = 1) -> str:
    """The last non-empty line(s) of a log, for a one-line error message."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])
