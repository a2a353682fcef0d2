"""MLflow tracking of a pipeline run: one parent run per flow run, one nested child run per checkpoint.

Every call names its run explicitly (``MlflowClient`` with run ids, no "active run" stack), so logging
works from any thread or Prefect task. A child run holds the stage's settings (params), its
measurements (size, FLOPs, mAP/top-1, latency, ratios to the base), the per-epoch training curves
(step = epoch), the checkpoint file, the selection JSON and plots; the parent holds the whole config, the
checkpoint table and the mAP-vs-FLOPs plot. The final model is registered as a pyfunc built from the
safetensors checkpoint (``tasks/mlflow_model.py``: models from code, nothing pickled) and gets an alias;
its ONNX export (files under ``onnx/``, ``onnx_size_bytes``, ``onnx_flops``) goes to its child run too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compression.config import PipelineConfig, TrackingConfig
from compression.errors import PrunepipeError

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
COMPRESSION_PACKAGE = Path(__file__).resolve().parent.parent / "compression"
_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")
# The MLflow UI opens an experiment on its GenAI pages (traces, tokens) unless told it trains models: the
# experiment carries the kind tag, and links name the UI's "Model training" view, which MLflow 3.17's UI
# takes from the link (or the browser's last choice) rather than from the tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW = "machine_learning"
# Keys of a checkpoint's metrics that are measurements (everything numeric is logged; these come first
# in the checkpoint table).
TABLE_KEYS = ("params", "nonzero_params", "size_bytes", "flops", "map_voc07", "map_voc", "map_coco", "top1")


class TrackingError(PrunepipeError):
    """The MLflow tracking server/store cannot be used."""


# --------------------------------------------------------------------------------------------
# Runs left RUNNING by a killed process

# ``host:pid:start`` of the process that opened a run. A run still RUNNING whose process is gone was
# killed (SIGKILL, OOM, power): the next pipeline run on that host closes it as KILLED.
PROCESS_TAG = "prunepipe.process"


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may contain spaces


def process_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def process_is_gone(tag: str) -> bool:
    """Whether the process named by ``tag`` surely no longer runs (only decidable on its own host)."""
    host, _, rest = tag.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(start) and _start_ticks(pid) != start  # the pid was reused by a newer process


def close_orphaned_runs(client: Any, experiment_id: str) -> list[str]:
    """Set every RUNNING run of the experiment whose process is gone to KILLED; returns their ids."""
    from mlflow.entities import ViewType

    orphans = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        tag = run.data.tags.get(PROCESS_TAG)
        if tag and process_is_gone(tag):
            client.set_terminated(run.info.run_id, "KILLED")
            orphans.append(run.info.run_id)
    return orphans


# --------------------------------------------------------------------------------------------
# Where to track, and whether it answers


def tracking_uri(tracking: TrackingConfig) -> str:
    """``tracking.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (working dir)."""
    return tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail with one line when the tracking store cannot be reached (before the flow starts any work)."""
    if uri.startswith(("http://", "https://")):
        url, uri = uri.rstrip("/") + "/health", redact_text(uri)  # the messages show the URI without userinfo
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri}: /health answered HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"MLflow tracking server {uri}: /health answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({reason}); start it (`mlflow server`) or set "
                f"tracking.mlflow_uri to a local store such as {DEFAULT_URI}"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise TrackingError(f"tracking.mlflow_uri {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking.mlflow_uri {uri}: folder {folder} is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
        if folder.exists() and not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking.mlflow_uri {uri}: {folder} is not writable")


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go next to the database (MLflow would use the working dir)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts").as_uri()
    return None


def open_results_hint(uri: str) -> str:
    uri = redact_text(uri)  # printed: no user:password@
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# Small converters


REDACTED = "***"
# A key naming a secret: one of these words as a whole part of the key (``db_password``, ``api-key``,
# ``access_token``), not inside another word (``tokens_per_second``).
_SECRET_KEY = re.compile(
    r"(?:^|[._\-])(?:password|passwd|passphrase|token|secret|api[_\-]?key|access[_\-]?key|private[_\-]?key|"
    r"credentials?|auth)(?:$|[._\-])", re.IGNORECASE)
# ``scheme://user:password@host``: the userinfo part goes, the rest (where it points) stays.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s]+@")


def redact_text(text: str) -> str:
    """``https://user:pass@host`` -> ``https://***@host`` wherever a URI with userinfo occurs in ``text``."""
    return _USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)


def _redacted(key: str, value: Any) -> Any:
    if value is None:
        return None
    if _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list | tuple):
        return [_redacted("", item) for item in value]
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values.

    Secrets never leave: the value of a key that names one (``password``, ``token``, ``api_key``, ...; a whole
    section under such a key too) becomes ``***``, and so does the ``user:password@`` of any URI.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            inner = flatten(value, name + ".")
            secret = _SECRET_KEY.search(str(key))
            flat.update({k: REDACTED if secret and v is not None else v for k, v in inner.items()})
        else:
            flat[name] = _redacted(str(key), value)
    return flat


def param_value(value: Any) -> str:
    """A value as an MLflow param (text, at most 6000 characters), URIs without their userinfo."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = redact_text(text)
    return text if len(text) <= 6000 else text[:5997] + "..."


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every finite number in ``metrics`` (nested dicts flattened with dots), with MLflow-safe keys."""
    out: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[_METRIC_KEY.sub("_", key)] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend; each returns the PNG path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_channels(shapes: Mapping[str, Mapping[str, int]], base_shapes: Mapping[str, Mapping[str, int]],
                  title: str, out: Path) -> Path | None:
    """Output channels kept per conv layer, against the base model (None when nothing was pruned)."""
    layers = [name for name, shape in base_shapes.items() if "out_channels" in shape and name in shapes]
    if not layers or all(shapes[n].get("out_channels") == base_shapes[n]["out_channels"] for n in layers):
        return None
    plt = _pyplot()
    base = [base_shapes[n]["out_channels"] for n in layers]
    kept = [shapes[n]["out_channels"] for n in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
    positions = range(len(layers))
    ax.bar(positions, base, color="#cccccc", label="base")
    ax.bar(positions, kept, color="#1f77b4", label="kept")
    ax.set_xticks(list(positions), layers, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_weight_histogram(checkpoint: Path, title: str, out: Path) -> Path | None:
    """Histogram of log10|w| over every conv weight of a checkpoint (the L1 stage's near-zero mass)."""
    import numpy as np
    from safetensors import safe_open

    values = []
    with safe_open(str(checkpoint), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.endswith(".weight"):
                tensor = handle.get_tensor(key)
                if tensor.dim() == 4:
                    values.append(tensor.abs().flatten().float().numpy())
    if not values:
        return None
    magnitudes = np.log10(np.concatenate(values) + 1e-12)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(magnitudes, bins=100, color="#1f77b4")
    ax.set_xlabel("log10 |w| (conv weights)")
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_metric_vs_flops(rows: list[dict[str, Any]], metric: str, out: Path) -> Path | None:
    points = [(r["flops"], r[metric], r["checkpoint"]) for r in rows if r.get("flops") and r.get(metric) is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#1f77b4")
    for flops, value, label in points:
        ax.annotate(label, (flops, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs FLOPs across the run's checkpoints")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# The tracker


@dataclass
class RunTracker:
    """A pipeline run in MLflow. ``start`` opens the parent run; everything else logs by run id."""

    uri: str
    experiment_id: str
    parent_run_id: str
    base_shapes: dict[str, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    log_checkpoints: str = "final"  # tracking.log_checkpoints: which checkpoint files are uploaded

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    @classmethod
    def start(cls, cfg: PipelineConfig, *, flow_run_id: str | None = None, run_name: str | None = None,
              uri: str | None = None) -> RunTracker:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        started = time.perf_counter()
        uri = uri or tracking_uri(cfg.tracking)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_root(uri),
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        elif experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"tracking.experiment {cfg.tracking.experiment!r} is deleted in {uri}; restore it or pick another name"
            )
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before prunepipe set it; a kind chosen in the UI stays
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        closed = close_orphaned_runs(client, experiment_id)
        tags = {"prunepipe.config_hash": cfg.config_hash(), "prunepipe.preset": cfg.name,
                "prunepipe.model": cfg.model.name, PROCESS_TAG: process_id()}
        if flow_run_id:
            tags["prefect.flow_run_id"] = str(flow_run_id)
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, tags=tags, run_name=run_name or f"{cfg.name}-{cfg.model.name}")
        params = [Param(k, param_value(v)) for k, v in flatten(cfg.model_dump(mode="json")).items()]
        for chunk in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[chunk:chunk + 100])
        tracker = cls(uri=uri, experiment_id=experiment_id, parent_run_id=run.info.run_id,
                      log_checkpoints=cfg.tracking.log_checkpoints)
        if closed:
            log.warning("closed %d MLflow run(s) as KILLED: their pipeline process on this host is gone (%s)",
                        len(closed), ", ".join(closed))
            for run_id in closed:
                client.set_tag(run_id, "prunepipe.closed_by", run.info.run_id)
        tracker.timings["start_parent_run"] = time.perf_counter() - started
        return tracker

    def run_link(self, run_id: str | None = None) -> str:
        run_id = run_id or self.parent_run_id
        if self.uri.startswith(("http://", "https://")):
            return (f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
                    f"?workflowType={UI_WORKFLOW}")
        return f"run {run_id} in experiment {self.experiment_id} ({open_results_hint(self.uri)})"

    def log_checkpoint(
        self,
        *,
        stage: str,
        phase: str | None,
        checkpoint: Path | str,
        metrics: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        history: Iterable[Mapping[str, Any]] = (),
        selection: Path | str | None = None,
        cached: bool = False,
    ) -> str:
        """One child run for one checkpoint; returns its run id."""
        from mlflow.entities import Metric, Param, RunTag

        from compression.checkpoint import read_metadata

        started = time.perf_counter()
        client = self.client
        checkpoint = Path(checkpoint)
        name = stage + (f"-{phase}" if phase else "")
        tags = {"mlflow.parentRunId": self.parent_run_id, "prunepipe.stage": stage,
                "prunepipe.checkpoint": str(checkpoint.resolve()), "prunepipe.cached": str(cached).lower(),
                PROCESS_TAG: process_id()}
        if phase:
            tags["prunepipe.phase"] = phase
        run = client.create_run(self.experiment_id, tags=tags, run_name=name)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            meta = read_metadata(checkpoint)
            # How the stage trained: bf16 / channels-last as resolved on the workers, where early stopping ended.
            trained = {k: v for k, v in meta.get("extra", {}).items() if k in ("precision", "early_stopping")}
            flat_params = {"stage": stage, "phase": phase or "", **flatten(params or {}), **flatten(trained)}
            metric_rows = [Metric(k, v, now, 0) for k, v in numeric_metrics(metrics).items()]
            for epoch_metrics in history:
                step = int(epoch_metrics.get("epoch", 0))
                metric_rows += [Metric(f"train/{k}", v, now, step) for k, v in numeric_metrics(epoch_metrics).items()
                                if k != "epoch"]
            client.log_batch(run_id, params=[Param(k, param_value(v)) for k, v in flat_params.items()][:100],
                             metrics=metric_rows[:1000], tags=[RunTag("prunepipe.checkpoint_name", checkpoint.name)])
            for chunk in range(1000, len(metric_rows), 1000):
                client.log_batch(run_id, metrics=metric_rows[chunk:chunk + 1000])
            if self.log_checkpoints == "all":  # "final": the flow uploads the answer's once it is chosen
                client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
            if selection is not None and Path(selection).is_file():
                client.log_artifact(run_id, str(selection), artifact_path="selection")
            shapes = meta.get("module_shapes", {})
            if stage == "pretrain" and not self.base_shapes:
                self.base_shapes = shapes
            with tempfile.TemporaryDirectory(prefix="prunepipe-plots-") as folder:
                plots = [plot_channels(shapes, self.base_shapes, f"channels kept: {name}",
                                       Path(folder) / "channels_per_layer.png")]
                if stage in ("sparsity", "induce_sparsity"):
                    plots.append(plot_weight_histogram(checkpoint, f"conv weight magnitudes: {name}",
                                                       Path(folder) / "weight_sparsity_histogram.png"))
                for plot in plots:
                    if plot is not None:
                        client.log_artifact(run_id, str(plot), artifact_path="plots")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        self.timings[f"log_{name}"] = time.perf_counter() - started
        return run_id

    def log_failed_stage(self, stage: str, phase: str | None, error: BaseException) -> str:
        """A FAILED child run for the stage that stopped the pipeline, with the error as a tag."""
        client = self.client
        name = stage + (f"-{phase}" if phase else "")
        message = (str(error).splitlines() or [type(error).__name__])[0][:4000]
        run = client.create_run(self.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.parent_run_id, "prunepipe.stage": stage, "prunepipe.phase": phase or "",
            "prunepipe.error": f"{type(error).__name__}: {message}"})
        client.set_terminated(run.info.run_id, "FAILED")
        return run.info.run_id

    def log_summary(self, rows: list[dict[str, Any]], metric: str) -> None:
        """The checkpoint table (JSON) and the metric-vs-FLOPs plot on the parent run."""
        client = self.client
        with tempfile.TemporaryDirectory(prefix="prunepipe-summary-") as folder:
            table = Path(folder) / "checkpoints.json"
            table.write_text(json.dumps(rows, indent=2, default=str))
            client.log_artifact(self.parent_run_id, str(table))
            plot = plot_metric_vs_flops(rows, metric, Path(folder) / f"{metric}_vs_flops.png")
            if plot is not None:
                client.log_artifact(self.parent_run_id, str(plot), artifact_path="plots")
        final = rows[-1] if rows else {}
        summary = {f"final_{k}": v for k, v in final.items() if k in TABLE_KEYS or k.endswith(("_ratio", "_drop"))}
        client.log_batch(self.parent_run_id, metrics=_metric_rows(summary))

    def log_final_checkpoint(self, checkpoint: Path | str, run_id: str) -> bool:
        """Upload the answer's checkpoint file to its child run (``tracking.log_checkpoints: final``; with
        ``all`` it is there already, with ``none`` it stays in the run folder). True when uploaded."""
        if self.log_checkpoints != "final":
            return False
        self.client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
        return True

    def register_model(self, cfg: PipelineConfig, checkpoint: Path | str, run_id: str, input_example: Any = None,
                       metrics: Mapping[str, Any] | None = None, gated: bool = True) -> dict[str, str] | None:
        """Log the final checkpoint as a pyfunc in ``run_id``, register it under ``tracking.registered_model``
        with its metrics and lineage as version tags, and move ``tracking.alias`` to it when it passes the
        gate (``champion_gate``; ``gated=False``: always, as for the budget search's own alias).

        Returns the name, version, alias, ``alias_moved``, the model URI (the alias's when it moved, else the
        version's) and a ``note`` saying what happened to the alias."""
        import mlflow

        if not cfg.tracking.registered_model:
            return None
        from compression.checkpoint import file_digest

        started = time.perf_counter()
        name = registered_model_name(cfg)
        alias = cfg.tracking.alias
        client = self.client
        digest = file_digest(checkpoint)
        metrics = dict(metrics or {})
        # The same checkpoint registered before (a cached re-run) adds no version.
        existing = client.search_model_versions(f"name = '{name}' and tag.prunepipe_sha256 = '{digest}'")
        if existing:
            version, new_version = str(existing[0].version), "false"
        else:
            mlflow.set_tracking_uri(self.uri)
            # log_model needs the run active in this thread; resuming it by id does not touch other runs.
            with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(MODEL_CODE),
                    artifacts={"checkpoint": str(checkpoint)},
                    code_paths=[str(COMPRESSION_PACKAGE)],
                    pip_requirements=_pip_requirements(),
                    input_example=input_example,
                )
            tags = {"prunepipe_sha256": digest, **version_tags(cfg, checkpoint, metrics, run_id, self.parent_run_id)}
            version, new_version = str(mlflow.register_model(info.model_uri, name, tags=tags).version), "true"
        if gated:
            moved, note = champion_gate(client, cfg, name, version, metrics)
        else:
            moved, note = True, f"{alias} moved to version {version}"
        if moved:
            client.set_registered_model_alias(name, alias, version)
        self.timings["register_model"] = time.perf_counter() - started
        return {"name": name, "version": version, "alias": alias, "alias_moved": str(moved).lower(),
                "uri": f"models:/{name}@{alias}" if moved else f"models:/{name}/{version}",
                "new_version": new_version, "note": note}

    def log_onnx_export(self, checkpoint: Path | str, run_id: str, cfg: PipelineConfig) -> dict[str, Any] | None:
        """Export ``checkpoint`` to ONNX (``compression.export.export_onnx``) and log it on ``run_id``.

        The files (``model.onnx``, ``model.json`` and, for detectors, ``model.anchors.npy``) go to the
        artifact folder ``onnx``; the metrics ``onnx_size_bytes`` (the .onnx file) and ``onnx_flops`` (counted
        from the exported graph, comparable with the run's ``flops``). Returns the export's metrics (``files`` as
        artifact paths), or None when ``tracking.log_onnx`` is off.
        """
        if not cfg.tracking.log_onnx:
            return None
        from compression.export import export_onnx

        started = time.perf_counter()
        client = self.client
        with tempfile.TemporaryDirectory(prefix="prunepipe-onnx-") as folder:
            exported = export_onnx(checkpoint, Path(folder) / "model.onnx")
            for path in exported["files"].values():
                client.log_artifact(run_id, path, artifact_path="onnx")
            onnx_model = self._log_onnx_model(Path(folder) / "model.onnx", run_id)
        # The temporary folder is gone: point at the artifacts instead.
        exported["files"] = {kind: f"onnx/{Path(path).name}" for kind, path in exported["files"].items()}
        if onnx_model is not None:
            exported["model_uri"] = onnx_model
        client.log_batch(run_id, metrics=_metric_rows({key: exported[key]
                                                       for key in ("onnx_size_bytes", "onnx_flops")}))
        self.timings["log_onnx_export"] = time.perf_counter() - started
        return exported

    def _log_onnx_model(self, path: Path, run_id: str) -> str | None:
        """The exported graph as an MLflow ONNX model (``onnx_model``, loadable with ``mlflow.onnx.load_model``
        or served by onnxruntime) where the ``onnx`` package is installed; the files above stay either way.
        Returns its model URI."""
        try:
            import onnx
        except ImportError:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id):
            return mlflow.onnx.log_model(onnx.load(str(path)), name="onnx_model").model_uri

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status)


# --------------------------------------------------------------------------------------------
# The registry: names, version tags, the champion gate


def registered_model_name(cfg: PipelineConfig) -> str:
    """``tracking.registered_model`` with the run's name (the preset's) and model filled in."""
    return str(cfg.tracking.registered_model).format(name=cfg.name, model=cfg.model.name)


def _task_of(cfg: PipelineConfig) -> str:
    from compression.models import model_task

    return model_task(cfg.model.name)


def version_tags(cfg: PipelineConfig, checkpoint: Path | str, metrics: Mapping[str, Any], run_id: str,
                 pipeline_run_id: str) -> dict[str, str]:
    """A model version's tags: its measurements (``metric.<key>``) and its lineage (the MLflow runs, the
    preset, its stage and the checkpoint and stage it was made from, the git commit when known)."""
    from compression.checkpoint import read_metadata
    from compression.measure import val_key

    meta = read_metadata(checkpoint)
    tags = {"prunepipe.run_id": run_id, "prunepipe.pipeline_run_id": pipeline_run_id,
            "prunepipe.preset": cfg.name, "prunepipe.model": cfg.model.name,
            "prunepipe.stage": str(meta.get("stage") or "")}
    parent = meta.get("parent")
    if parent:
        tags["prunepipe.parent_checkpoint"] = Path(parent).name
        try:
            tags["prunepipe.parent_stage"] = str(read_metadata(parent).get("stage") or "")
        except (OSError, PrunepipeError):  # moved or deleted since: the name above still says which
            pass
    commit = git_commit()
    if commit:
        tags["prunepipe.git_commit"] = commit
    val = val_key(_task_of(cfg))
    shown = (*TABLE_KEYS, val, f"{val}_drop")
    tags.update({f"metric.{key}": repr(value) for key, value in numeric_metrics(metrics).items()
                 if key in shown or key.endswith("_ratio") or key.endswith("_drop")})
    return tags


def champion_gate(client: Any, cfg: PipelineConfig, name: str, version: str,
                  metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether ``tracking.alias`` moves to ``version``: its validation metric (``val_map_voc07`` / ``val_top1``)
    is at most ``tracking.champion_max_drop`` below its base's and above the current holder's (the first
    version within the drop takes a free alias). Also a line saying why."""
    from mlflow.exceptions import MlflowException

    from compression.measure import val_key

    alias, limit = cfg.tracking.alias, cfg.tracking.champion_max_drop
    key = val_key(_task_of(cfg))
    value, drop = metrics.get(key), metrics.get(f"{key}_drop")
    if drop is not None and drop > limit:
        return False, (f"{alias} stays: version {version}'s {key} is {drop:.4f} below its base's "
                       f"(tracking.champion_max_drop {limit:g})")
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no holder yet
        return True, f"{alias} moved to version {version} (the first)"
    if str(holder.version) == str(version):
        return True, f"{alias} stays on version {version}"
    if value is None:
        return False, f"{alias} stays on version {holder.version}: version {version} has no {key}"
    held = holder.tags.get(f"metric.{key}")
    held_value = float(held) if held is not None else client.get_run(holder.run_id).data.metrics.get(key)
    if held_value is not None and value <= held_value:
        return False, (f"{alias} stays on version {holder.version}: {key} {value:.4f} is not above its "
                       f"{held_value:.4f}")
    return True, f"{alias} moved to version {version} from {holder.version}"


def _metric_rows(values: Mapping[str, Any]) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in numeric_metrics(values).items()]


def _pip_requirements() -> list[str]:
    """What the pyfunc needs to load (pinned to this environment; no slow requirement inference)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "safetensors", "torch-pruning", "pydantic", "pyyaml", "numpy", "pandas",
                    "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins
