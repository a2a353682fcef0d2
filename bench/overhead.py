"""Orchestration overhead: the same stages in-process vs through Prefect + Ray Train + MLflow (issue: benchmarks).

    .venv/bin/python bench/overhead.py [--config default] [--set k=v ...] [--base CKPT]

1. Fixed start-up costs, each in a fresh Python process (as a user's first run pays them): Prefect's
   temporary server with a first and a second trivial flow run and per-task cost; ``ray.init`` and a
   trivial ``TorchTrainer.fit`` (2 CPU workers, twice: the per-stage cost of Ray Train); MLflow's first
   and second run on a SQLite store with a logged checkpoint-sized artifact.
2. One pipeline (the preset, by default `default`: exactly what `make run` runs) twice from the same inputs: in this process (``run_pipeline_in_process``, torch on both cores) and as the
   ``compress`` flow in a child process (temporary Prefect server, local Ray with the preset's workers,
   MLflow on SQLite). Per stage: the in-process wall time (measurement included) vs the flow's (task,
   orchestration, Ray fit, MLflow logging of that checkpoint).

Writes bench/results/overhead.json; run bench/report.py afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import write_result  # noqa: E402

# None by default: the comparison runs the preset itself, so with the default preset the flow's total is
# what `make run` takes after setup (its data generated beforehand, as a second `make run` finds it).
OVERRIDES: list[str] = []
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
             "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
             "PREFECT_LOGGING_LEVEL": "WARNING"}

PREFECT_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from prefect import flow, task
imported = time.perf_counter()

@task
def nothing(i):
    return i

@flow
def empty():
    return 1

@flow
def tasks(n):
    return [nothing(i) for i in range(n)]

a = time.perf_counter(); empty(); b = time.perf_counter(); empty(); c = time.perf_counter()
tasks(1)  # the first task run of a process registers the task: not part of the per-task cost
d = time.perf_counter(); tasks(1); e = time.perf_counter(); tasks(41); f = time.perf_counter()
json.dump({"import_s": imported - t0, "first_flow_run_s": b - a, "next_flow_run_s": c - b,
           "per_task_s": ((f - e) - (e - d)) / 40}, open(sys.argv[1], "w"))
"""

RAY_PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
imported = time.perf_counter()
ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
started = time.perf_counter()

def loop(config):
    import ray.train
    ray.train.report({"done": 1})

fits = []
for i in range(2):
    a = time.perf_counter()
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=sys.argv[2], name=f"probe{i}")).fit()
    fits.append(time.perf_counter() - a)
json.dump({"import_s": imported - t0, "init_s": started - imported, "first_fit_s": fits[0], "next_fit_s": fits[1]},
          open(sys.argv[1], "w"))
"""

MLFLOW_PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
import mlflow
imported = time.perf_counter()
mlflow.set_tracking_uri("sqlite:///" + os.path.join(sys.argv[2], "mlflow.db"))
artifact = os.path.join(sys.argv[2], "ckpt.bin")
open(artifact, "wb").write(os.urandom(1 << 20))
times = []
for i in range(2):
    a = time.perf_counter()
    mlflow.set_experiment("probe")
    with mlflow.start_run():
        mlflow.log_params({f"p{k}": k for k in range(20)})
        mlflow.log_metrics({f"m{k}": float(k) for k in range(20)})
        mlflow.log_artifact(artifact)
    times.append(time.perf_counter() - a)
json.dump({"import_s": imported - t0, "first_run_s": times[0], "next_run_s": times[1]}, open(sys.argv[1], "w"))
"""

FLOW_CHILD = """
import json, sys
from tasks.env import apply_env_defaults
apply_env_defaults()
from compression.config import load_config
from flows.compress import run_pipeline
cfg = load_config(sys.argv[2])
summary = run_pipeline(cfg)
json.dump(summary, open(sys.argv[1], "w"), default=str)
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "RAY_ADDRESS"))}
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PYTHONPATH"] = str(ROOT)
    return env


def _probe(source: str, home: Path, *extra: str) -> dict:
    """Run ``source`` in a fresh interpreter; returns its JSON plus the process's wall time."""
    out = home / "probe.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", textwrap.dedent(source), str(out), *extra], env=_env(home), cwd=home,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def fixed_costs(tmp: Path) -> dict[str, dict]:
    costs = {}
    for name, source in (("prefect", PREFECT_PROBE), ("ray", RAY_PROBE), ("mlflow", MLFLOW_PROBE)):
        home = tmp / name
        home.mkdir()
        costs[name] = _probe(source, home, str(home))
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in costs[name].items()), flush=True)
    return costs


def _stage_key(row: dict) -> str:
    return row["stage"] + (f" ({row['phase']})" if row.get("phase") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--base", type=Path, default=None,
                        help="start both pipelines from this pretrained checkpoint (skips timing pretrain)")
    args = parser.parse_args()

    import yaml

    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from compression.pipeline import run_pipeline_in_process

    overrides = OVERRIDES + list(args.overrides)
    if args.base is not None:
        overrides.append(f"stages.pretrain.checkpoint={args.base.resolve()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        costs = fixed_costs(tmp)

        cfg = load_config(args.config, overrides + [f"workdir={tmp / 'runs'}"])
        ensure_builtin_data(cfg.data)
        started = time.perf_counter()
        local_rows = run_pipeline_in_process(cfg, tmp / "in-process")
        local_total = time.perf_counter() - started
        print(f"in-process pipeline: {local_total:.0f}s", flush=True)

        config_file = tmp / "flow.yaml"
        flow_cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}"})})
        config_file.write_text(yaml.safe_dump(flow_cfg.model_dump(mode="json")))
        home = tmp / "flow-home"
        home.mkdir()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOW_CHILD, str(tmp / "summary.json"), str(config_file)],
                       env=_env(home), cwd=ROOT, check=True)
        flow_total = time.perf_counter() - started
        summary = json.loads((tmp / "summary.json").read_text())
        print(f"flow (child process, from interpreter start): {flow_total:.0f}s", flush=True)

    flow_rows = {_stage_key(row): row for row in summary["checkpoints"]}
    stages = []
    for row in local_rows:
        key = _stage_key(row)
        flowed = flow_rows.get(key, {})
        local_s = row["metrics"].get("wall_seconds")
        flow_s = flowed.get("call_seconds")
        stages.append({"stage": key, "in_process_s": local_s, "flow_s": flow_s,
                       "fit_s": flowed.get("fit_seconds"),
                       "added_s": None if None in (local_s, flow_s) else flow_s - local_s,
                       "added_pct": None if None in (local_s, flow_s) else 100 * (flow_s - local_s) / local_s})
    timings = summary.get("timings", {})
    result = {
        "config": args.config, "overrides": overrides, "fixed_costs": costs, "stages": stages,
        "in_process_total_s": local_total, "flow_total_s": flow_total, "flow_timings": timings,
        "ray": summary.get("ray"),
        "markdown": _markdown(costs, stages, local_total, flow_total, timings, args.config, overrides),
    }
    out = write_result("overhead", result)
    print(result["markdown"])
    print(f"-> {out}")


def _s(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def _markdown(costs, stages, local_total, flow_total, timings, config, overrides) -> str:
    p, r, m = costs["prefect"], costs["ray"], costs["mlflow"]
    fixed = [
        ("Prefect: import", p["import_s"]), ("Prefect: first flow run (temporary server start)", p["first_flow_run_s"]),
        ("Prefect: next flow run", p["next_flow_run_s"]), ("Prefect: per task (trivial task, warm)", p["per_task_s"]),
        ("Ray: import (ray.train.torch)", r["import_s"]), ("Ray: ray.init (local, 2 CPUs)", r["init_s"]),
        ("Ray Train: first trivial TorchTrainer.fit, 2 CPU workers", r["first_fit_s"]),
        ("Ray Train: next trivial fit (the fixed cost of each training stage)", r["next_fit_s"]),
        ("MLflow: import", m["import_s"]), ("MLflow: first run on SQLite (+1 MiB artifact)", m["first_run_s"]),
        ("MLflow: next run", m["next_run_s"]),
    ]
    lines = ["Fixed costs, each in a fresh process:", "", "| | seconds |", "|---|---|"]
    lines += [f"| {name} | {_s(v)} |" for name, v in fixed]
    preset = f"preset `{config}`" + (" with " + ", ".join(f"`{o}`" for o in overrides) if overrides else " as it ships")
    lines += ["", f"One pipeline, {preset}; the flow's total is `make run`'s wall time after setup:", "",
              "| stage | in-process (s) | flow (s) | of which Ray fit (s) | added (s) | added (%) |",
              "|---|---|---|---|---|---|"]
    for s in stages:
        pct = "" if s["added_pct"] is None else f"{s['added_pct']:+.0f}%"
        lines.append(f"| {s['stage']} | {_s(s['in_process_s'])} | {_s(s['flow_s'])} | {_s(s['fit_s'])} | "
                     f"{_s(s['added_s'])} | {pct} |")
    flow_only = [(k, v) for k, v in timings.items() if k in ("preflight", "evaluate_base", "evaluate_final")]
    for key, value in flow_only:
        lines.append(f"| {key} (flow only) | | {_s(value)} | | {_s(value)} | |")
    lines.append(f"| **total** (flow: child process from interpreter start) | {_s(local_total)} | {_s(flow_total)} | | "
                 f"{_s(flow_total - local_total)} | {100 * (flow_total - local_total) / local_total:+.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
