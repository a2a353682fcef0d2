"""Environment defaults for a pipeline run. Prefect reads its settings when it is first imported, so
``apply_env_defaults()`` must run before ``import prefect`` (the CLI and the tests call it first)."""

from __future__ import annotations

import os

ENV_DEFAULTS = {
    # No telemetry from any of the three.
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Prefect 3 starts a temporary server when none is configured; on a busy 2-core machine it needs
    # more than the default 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Our modules' log lines in the Prefect UI next to the task logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "compression,tasks,flows",
}


def apply_env_defaults() -> None:
    """Set every default that the environment does not set already."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
