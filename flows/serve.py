"""`prunepipe serve`: the ``compress`` flow as Prefect deployments, one per preset, run by this process.

Each preset ``compression/configs/<name>.yaml`` becomes the deployment ``compress/<name>``:

* its one parameter ``config`` (the whole ``PipelineConfig``) defaults to the preset's values, so the
  Prefect UI's "Run > Custom run" form shows every setting, pre-filled; the form and the server check a
  run's parameters against the schema Prefect derives from ``PipelineConfig`` (``Field`` bounds become
  JSON-schema bounds: ``stages.selection.gamma = 1.5`` is refused before any run starts);
* a nightly cron schedule (``NIGHTLY_CRON``, UTC), active for CPU presets and *inactive* for the heavy
  ones (``compute.use_gpu`` or ssd300_vgg16): switch it on in the UI once a GPU machine serves them;
* tags ``prunepipe`` and the model's name; the preset's config hash as its version.

``prefect.serve`` registers them and then polls for their runs (scheduled, started in the UI or with
``prefect deployment run 'compress/<name>'``) and executes each in a subprocess of this process, in its
working directory and environment: relative paths in a config (``workdir``, ``data.root``) are relative to
where ``prunepipe serve`` was started, and ``--home`` points the runs at that local stack's MLflow and Ray.
Stopping the process (Ctrl-C) pauses the schedules (Prefect's default) until it serves again.

Parameters for a run from a script (the GitHub ``pipeline`` workflow): a preset plus ``key=value``
overrides, validated here, as the JSON ``prefect deployment run --params -`` reads::

    python -m flows.serve params default stages.retrain.epochs=3 \\
        | prefect deployment run compress/default --params - --watch

Production: a work pool instead of this process
-----------------------------------------------
``serve`` needs this process alive on the machine that runs the flows. For long-lived infrastructure,
register the same deployments against a work pool and let workers start each run (in a process, a
container or a Kubernetes job, with the pool's job template). ``prefect.yaml`` at the repository root
declares them (same names, schedules, tags; a CPU and a GPU pool); the ``config`` default comes from the
preset at deploy time, so the presets stay the one place the settings live::

    prefect work-pool create prunepipe-cpu --type process        # or docker / kubernetes
    export PRUNEPIPE_CHECKOUT=$PWD MLFLOW_TRACKING_URI=http://mlflow:5000 RAY_ADDRESS=ray-head:6379
    prefect --no-prompt deploy --name default --params "$(python -m flows.serve params default)"
    prefect worker start --pool prunepipe-cpu                      # on each machine that runs flows

or from Python, one deployment (``image`` for docker/kubernetes pools; a process pool needs none)::

    from flows.compress import compress
    compress.deploy("default", work_pool_name="prunepipe-gpu", image="prunepipe-cluster:latest",
                    build=False, push=False, parameters=deployment_parameters("default"),
                    cron=NIGHTLY_CRON, job_variables={"env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}})

With a process pool the worker runs the flow from a checkout of this repository (``pull`` step
``set_working_directory``); with docker or kubernetes pools from the image built by
``infra/docker/Dockerfile`` (checkout in /app). The flow reads ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS``
from the run's environment (the pool's job variables ``env``) when the config leaves them empty.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compression.config import CONFIG_DIR, PipelineConfig, load_config, resolve_preset
from compression.errors import ConfigError, PrunepipeError

FLOW_NAME = "compress"
NIGHTLY_CRON = "0 2 * * *"
TIMEZONE = "UTC"
HEAVY_MODELS = ("ssd300_vgg16",)


class ServeError(PrunepipeError):
    """No Prefect server to register with, or nothing to serve."""


@dataclass(frozen=True)
class PresetDeployment:
    """What one preset's deployment will be: ``compress/<name>`` with ``config`` as its default."""

    name: str
    source: Path
    config: PipelineConfig
    cron: str
    schedule_active: bool

    @property
    def full_name(self) -> str:
        return f"{FLOW_NAME}/{self.name}"


def preset_names() -> list[str]:
    """Every preset in compression/configs/ (``<name>.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def is_heavy(cfg: PipelineConfig) -> bool:
    """A run that needs a GPU machine: its nightly schedule starts inactive."""
    return cfg.compute.use_gpu or cfg.model.name in HEAVY_MODELS


def plan_deployments(presets: list[str] | None = None, overrides: list[str] | None = None,
                     cron: str = NIGHTLY_CRON) -> list[PresetDeployment]:
    """One deployment per preset (a name in compression/configs/ or a YAML path; default: every preset), validated.

    ``overrides`` (``key=value``) apply to every preset. A bad preset, value or cron raises ConfigError
    (one line) before anything is registered.
    """
    from prefect.schedules import Cron

    try:
        Cron(cron, timezone=TIMEZONE)
    except ValueError:
        raise ConfigError(f"--cron {cron!r}: not a valid cron expression (e.g. {NIGHTLY_CRON!r}: nightly at 02:00)") from None
    names = presets or preset_names()
    if not names:
        raise ServeError(f"{CONFIG_DIR}: no presets (*.yaml) to serve")
    planned: dict[str, PresetDeployment] = {}
    for preset in names:
        source = resolve_preset(preset)
        cfg = load_config(source, overrides)
        if source.stem in planned:
            raise ConfigError(f"{source}: a second preset named {source.stem!r} (deployment names must differ)")
        planned[source.stem] = PresetDeployment(source.stem, source, cfg, cron, not is_heavy(cfg))
    return list(planned.values())


def deployment_parameters(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The parameters of a run of ``compress/<preset>`` with ``overrides``: ``{"config": {...}}`` (JSON-able)."""
    return {"config": load_config(preset, overrides).model_dump(mode="json")}


def to_deployments(planned: list[PresetDeployment]) -> list[Any]:
    """``compress.to_deployment(...)`` for each planned preset (RunnerDeployments, not yet registered)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.compress import compress

    deployments = []
    for plan in planned:
        cfg = plan.config
        schedule_note = "" if plan.schedule_active else " The nightly schedule is off: switch it on where a GPU serves it."
        deployments.append(compress.to_deployment(
            name=plan.name,
            schedules=[Cron(plan.cron, timezone=TIMEZONE, active=plan.schedule_active)],
            parameters={"config": cfg.model_dump(mode="json")},
            description=(f"Preset `{plan.source.name}`: compress {cfg.model.name} on {cfg.data.kind} data "
                         f"({cfg.data.root}). Edit any setting in the run form; the pipeline's stages, MLflow "
                         f"runs and checkpoint table appear as the run goes.{schedule_note}"),
            tags=["prunepipe", cfg.model.name],
            version=cfg.config_hash(),
            enforce_parameter_schema=True,
            # Imported by module path in the run's subprocess: works from any working directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


# --------------------------------------------------------------------------------------------
# Which Prefect server: the local stack's, or $PREFECT_API_URL


def server_env(home: Path) -> dict[str, str]:
    """The environment that points Prefect (and the runs' MLflow and Ray) at a server.

    The same rule as ``prunepipe run``: each service the environment does not set (``$PREFECT_API_URL``,
    ``$MLFLOW_TRACKING_URI``, ``$RAY_ADDRESS``) comes from the stack recorded under ``home``
    (``prunepipe up``). Raises ServeError when that leaves no Prefect server: a temporary one would vanish
    with this process, and with it the UI.
    """
    from infra.local.stack import stack_env_for_run

    env = {key: value for service in stack_env_for_run(home).values() for key, value in service.items()}
    if env.get("PREFECT_API_URL") or os.environ.get("PREFECT_API_URL"):
        return env
    raise ServeError(
        f"no Prefect server: no stack recorded under {Path(home).resolve()} and PREFECT_API_URL is not set; "
        "start one with `prunepipe up` (or set PREFECT_API_URL)"
    )


def check_server(api_url: str, timeout: float = 10.0) -> None:
    """One line when the Prefect API does not answer its health check."""
    url = api_url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) from settings
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = f"does not answer ({getattr(exc, 'reason', exc)})"
    raise ServeError(f"Prefect API {api_url} {problem}; start it with `prunepipe up` or fix PREFECT_API_URL")


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def serve_presets(planned: list[PresetDeployment], limit: int | None = 1) -> None:
    """Register the deployments and execute their runs until interrupted (``prefect.serve``).

    The caller sets the environment (``server_env``, ``tasks.env.apply_env_defaults``) before this first
    imports Prefect.
    """
    from prefect import serve

    serve(*to_deployments(planned), limit=limit, print_starting_message=False)


def _main(argv: list[str]) -> int:
    """``python -m flows.serve params PRESET [KEY=VALUE ...]``: a run's parameters as JSON on stdout."""
    if len(argv) < 2 or argv[0] != "params":
        print("usage: python -m flows.serve params PRESET [KEY=VALUE ...]", file=sys.stderr)
        return 2
    try:
        print(json.dumps(deployment_parameters(argv[1], argv[2:])))
    except PrunepipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
