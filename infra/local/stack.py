"""The local stack behind ``prunepipe up / down / status``: a Prefect server, an MLflow tracking server and
a Ray head node, each a detached process group whose logs, pids and data live under one home folder.

Layout of ``home``::

    stack.json            what ``stack_up`` started (pids, urls, ports); ``stack_down`` reads it
    pids/<service>.pid    one pid per service, for people and shell scripts
    logs/<service>.log    each server's stdout and stderr
    prefect/              PREFECT_HOME with the Prefect server's SQLite database
    mlflow.db             MLflow's backend store; artifacts go to mlartifacts/
    ray/                  Ray's temp dir (a short folder under /tmp when home's path is too long for
                          Ray's unix sockets) and ray_auth_token, the token a Ray client needs

Everything binds to ``host`` (127.0.0.1 by default) except Ray's GCS and raylet, which listen on every
interface whatever the flags: the Ray head therefore runs with token authentication, and
``stack_env`` hands the token's path to flow runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from infra.local.process import (
    TELEMETRY_OFF,
    ProcessRecord,
    StackError,
    child_env,
    http_get,
    is_running,
    log_tail,
    port_taken,
    spawn,
    stop,
    tcp_open,
    tool,
    wait_until,
)

__all__ = [
    "ServiceInfo",
    "ServiceStatus",
    "StackError",
    "stack_down",
    "stack_env",
    "stack_env_for_run",
    "stack_status",
    "stack_up",
]

STACK_FILE = "stack.json"
SERVICES = ("prefect", "mlflow", "ray")
# AF_UNIX socket paths are capped at 107 bytes; Ray appends
# "/session_YYYY-MM-DD_HH-MM-SS_ffffff_<pid>/sockets/plasma_store" (about 70) to its temp dir.
_RAY_SOCKET_SUFFIX_LEN = 72
_UNIX_PATH_MAX = 107
_RAY_STARTED_MARKER = "Ray runtime started."
# Seconds a service's leader gets to stop its own children before the whole group gets SIGTERM: the
# `mlflow server` CLI does not pass SIGTERM on to its uvicorn child; `ray start --block` drains first.
_LEADER_GRACE = {"prefect": 5.0, "mlflow": 0.0, "ray": 15.0}


@dataclass(frozen=True)
class ServiceInfo:
    name: str
    url: str
    pid: int
    log: Path


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    pid: int
    alive: bool
    healthy: bool


@dataclass(frozen=True)
class _Service:
    name: str
    port: int
    url: str
    argv: list[str]
    env: dict[str, str]
    healthy: Callable[[], bool]


def _prefect_healthy(url: str) -> Callable[[], bool]:
    return lambda: http_get(f"{url}/api/health") == (200, "true")


def _mlflow_healthy(url: str) -> Callable[[], bool]:
    return lambda: http_get(f"{url}/health")[0] == 200


def _ray_healthy(host: str, port: int, env: dict[str, str], log: Path | None = None) -> Callable[[], bool]:
    # During start-up (``log`` given) the node counts as up once `ray start` has logged that its raylet
    # joined: the GCS answers earlier, before a bad node option (say a negative CPU count) kills it.
    # `ray health-check` then asks the GCS itself, with the token; the port probe spares that subprocess
    # while nothing listens yet.
    def check() -> bool:
        if log is not None and _RAY_STARTED_MARKER not in log.read_text(errors="replace"):
            return False
        if not tcp_open(host, port):
            return False
        result = subprocess.run(
            [tool("ray"), "health-check", "--address", f"{host}:{port}"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        return result.returncode == 0

    return check


def _ray_temp_dir(home: Path) -> Path:
    preferred = home / "ray"
    if len(str(preferred)) + _RAY_SOCKET_SUFFIX_LEN <= _UNIX_PATH_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="prunepipe-ray-"))


def _ray_auth_env(token_path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def _write_token(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))


def _services(
    home: Path,
    host: str,
    prefect_port: int,
    mlflow_port: int,
    ray_port: int,
    ray_dashboard_port: int,
    ray_num_cpus: int | None,
    ray_temp: Path,
    ray_token: Path,
) -> list[_Service]:
    prefect_url = f"http://{host}:{prefect_port}"
    mlflow_url = f"http://{host}:{mlflow_port}"
    prefect_env = child_env(
        {
            "PREFECT_HOME": str(home / "prefect"),
            # PREFECT_SERVER_DATABASE_CONNECTION_URL is prefect 3's name for PREFECT_API_DATABASE_CONNECTION_URL.
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
            "PREFECT_API_URL": f"{prefect_url}/api",
            # A busy SQLite database makes the server answer 503, which the UI shows as "Oops. Something went
            # wrong"; by default the server logs nothing then. Log it, so logs/prefect.log says why.
            "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
        }
    )
    # A single-node stack has nowhere to move work on `down`: short drain instead of Ray's 30 s.
    ray_env = child_env({**_ray_auth_env(ray_token), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3"})
    # fmt: off
    prefect_argv = [
        tool("prefect"), "server", "start",
        "--host", host,
        "--port", str(prefect_port),
        "--analytics-off",
    ]
    mlflow_argv = [
        tool("mlflow"), "server",
        "--host", host,
        "--port", str(mlflow_port),
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "mlartifacts"),
        "--workers", "1",
        # The security middleware stays on, narrowed from "any localhost port" to this server's origin.
        "--allowed-hosts", f"{host}:{mlflow_port},localhost:{mlflow_port}",
        "--cors-allowed-origins", f"http://{host}:{mlflow_port},http://localhost:{mlflow_port}",
    ]
    ray_argv = [
        tool("ray"), "start", "--head", "--block",
        "--port", str(ray_port),
        "--dashboard-host", host,
        "--dashboard-port", str(ray_dashboard_port),
        "--temp-dir", str(ray_temp),
        "--disable-usage-stats",
    ]
    # fmt: on
    if ray_num_cpus is not None:
        ray_argv += ["--num-cpus", str(ray_num_cpus)]
    return [
        _Service(
            "prefect", prefect_port, prefect_url, prefect_argv, prefect_env, _prefect_healthy(prefect_url)
        ),
        _Service("mlflow", mlflow_port, mlflow_url, mlflow_argv, child_env(), _mlflow_healthy(mlflow_url)),
        _Service(
            "ray",
            ray_port,
            f"{host}:{ray_port}",
            ray_argv,
            ray_env,
            _ray_healthy(host, ray_port, ray_env, home / "logs" / "ray.log"),
        ),
    ]


def _read_state(home: Path) -> dict | None:
    path = home / STACK_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StackError(
            f"{path}: unreadable stack record ({exc}); stop the servers by hand and delete it"
        ) from exc


def _records(state: dict) -> list[ProcessRecord]:
    return [ProcessRecord.from_json(entry["process"]) for entry in state["services"]]


def _write_state(home: Path, state: dict) -> None:
    path = home / STACK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)
    pid_dir = home / "pids"
    pid_dir.mkdir(exist_ok=True)
    for entry in state["services"]:
        (pid_dir / f"{entry['name']}.pid").write_text(f"{entry['process']['pid']}\n")


def _forget(home: Path, state: dict) -> None:
    (home / STACK_FILE).unlink(missing_ok=True)
    for name in SERVICES:
        (home / "pids" / f"{name}.pid").unlink(missing_ok=True)
    ray_temp = Path(state.get("ray_temp_dir", home / "ray"))
    if not ray_temp.is_relative_to(home):
        shutil.rmtree(ray_temp, ignore_errors=True)


def stack_up(
    home: Path,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    ray_port: int = 6379,
    host: str = "127.0.0.1",
    ray_num_cpus: int | None = None,
    *,
    ray_dashboard_port: int = 8265,
    timeout: float = 180.0,
) -> list[ServiceInfo]:
    """Start Prefect, MLflow and a Ray head under ``home`` and wait until each answers its health check.

    Raises StackError, having started nothing, when a port is taken or a stack is already running under
    ``home``; when a service fails its health check within ``timeout`` seconds, stops what it started
    and names that service and its log.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    state = _read_state(home)
    if state is not None:
        if any(is_running(record) for record in _records(state)):
            raise StackError(f"{home}: a stack is already running here (see `prunepipe status`)")
        _forget(home, state)  # left behind by a stack that died: nothing of it runs any more

    ports = {
        "prefect": prefect_port,
        "mlflow": mlflow_port,
        "ray": ray_port,
        "ray dashboard": ray_dashboard_port,
    }
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise StackError(f"port {port} is given to both {seen[port]} and {name}")
        seen[port] = name
        if port_taken(host, port):
            raise StackError(
                f"port {port} ({name}) on {host} is already in use; free it or choose another port"
            )

    ray_temp = _ray_temp_dir(home)
    ray_token = home / "ray" / "ray_auth_token"
    _write_token(ray_token)
    services = _services(
        home, host, prefect_port, mlflow_port, ray_port, ray_dashboard_port, ray_num_cpus, ray_temp, ray_token
    )
    started: list[tuple[_Service, ProcessRecord]] = []
    state = {
        "home": str(home),
        "host": host,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ray_temp_dir": str(ray_temp),
        "ray_auth_token": str(ray_token),
        "env": {},
        "services": [],
    }
    try:
        for service in services:
            record = spawn(
                service.name, service.argv, home / "logs" / f"{service.name}.log", service.env, home
            )
            started.append((service, record))
            state["services"].append(
                {"name": service.name, "url": service.url, "port": service.port, "process": record.to_json()}
            )
            # Recorded as soon as it runs, so `stack_down` can stop it even if this call is interrupted.
            _write_state(home, state)
        failed = wait_until([(record, service.healthy) for service, record in started], timeout)
        # One that passed its check early may have died while the others were still starting.
        failed = failed or next((record for _, record in started if not is_running(record)), None)
    except BaseException:
        _stop_all([record for _, record in started])
        _forget(home, state)
        raise
    if failed is not None:
        died = not is_running(failed)
        _stop_all([record for _, record in started])
        _forget(home, state)
        reason = "exited" if died else f"did not answer its health check within {timeout:.0f}s"
        last = log_tail(failed.log)
        raise StackError(
            f"{failed.name} {reason}; stopped the others; see {failed.log}" + (f": {last}" if last else "")
        )

    state["env"] = _env_for(state)
    _write_state(home, state)
    return [
        ServiceInfo(service.name, service.url, record.pid, Path(record.log)) for service, record in started
    ]


def _stop_all(records: list[ProcessRecord]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(records))) as pool:
        list(
            pool.map(lambda record: stop(record, leader_grace=_LEADER_GRACE.get(record.name, 10.0)), records)
        )


def stack_down(home: Path) -> list[str]:
    """Stop the services ``stack_up`` started under ``home`` (and only those); return their names."""
    home = Path(home).resolve()
    state = _read_state(home)
    if state is None:
        raise StackError(f"nothing to stop: no stack recorded under {home}")
    records = _records(state)
    _stop_all(records)
    _forget(home, state)
    return [record.name for record in records]


def stack_status(home: Path) -> list[ServiceStatus]:
    """One status per recorded service; an empty list when no stack is recorded under ``home``."""
    home = Path(home).resolve()
    state = _read_state(home)
    if state is None:
        return []
    host = state["host"]
    statuses = []
    for entry in state["services"]:
        record = ProcessRecord.from_json(entry["process"])
        alive = is_running(record)
        if not alive:
            healthy = False
        elif entry["name"] == "prefect":
            healthy = _prefect_healthy(entry["url"])()
        elif entry["name"] == "mlflow":
            healthy = _mlflow_healthy(entry["url"])()
        else:
            env = child_env(_ray_auth_env(Path(state["ray_auth_token"])))
            healthy = _ray_healthy(host, entry["port"], env)()
        statuses.append(ServiceStatus(entry["name"], entry["url"], record.pid, alive, healthy))
    return statuses


def _env_for(state: dict) -> dict[str, str]:
    urls = {entry["name"]: entry["url"] for entry in state["services"]}
    return {
        "PREFECT_API_URL": f"{urls['prefect']}/api",
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "RAY_ADDRESS": urls["ray"],
        **_ray_auth_env(Path(state["ray_auth_token"])),
        **TELEMETRY_OFF,
    }


def stack_env(home: Path) -> dict[str, str]:
    """Environment variables that point a flow run at the stack under ``home``."""
    home = Path(home).resolve()
    state = _read_state(home)
    if state is None or not state.get("env"):
        raise StackError(f"no stack recorded under {home}: run `prunepipe up` first")
    return dict(state["env"])


# Each service's variables go together: the Ray token belongs to the stack's Ray address only.
SERVICE_ENV = {
    "prefect": ("PREFECT_API_URL",),
    "mlflow": ("MLFLOW_TRACKING_URI",),
    "ray": ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"),
}


def stack_env_for_run(home: Path, environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, str]]:
    """What a pipeline run takes from the stack ``prunepipe up`` started under ``home``: per service, the
    variables to set. A service whose address the environment already sets (non-empty) is left to it;
    no stack recorded under ``home`` gives ``{}``.

    Raises StackError when a stack is recorded but one of its servers no longer runs: the run would
    otherwise quietly go to a temporary server and a local store.
    """
    home = Path(home).resolve()
    state = _read_state(home)
    if state is None or not state.get("env"):
        return {}
    stopped = [record.name for record in _records(state) if not is_running(record)]
    if stopped:
        raise StackError(
            f"the stack under {home} is recorded but {', '.join(stopped)} no longer runs; "
            f"restart it (`prunepipe down --home {home}`, then `prunepipe up --home {home}`)"
        )
    env = state["env"]
    return {
        service: {key: env[key] for key in keys if key in env}
        for service, keys in SERVICE_ENV.items()
        if not environ.get(keys[0])
    }
