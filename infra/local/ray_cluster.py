"""A two-node Ray cluster on one machine, for testing multi-node Ray Train code without a second host.

``start_two_node_cluster`` runs ``ray start --head`` and a second ``ray start --address=...`` with its own
temp dir and a custom resource ``node2``; both are detached process groups recorded in
``<tmpdir>/ray_cluster.json``, and ``stop_cluster(tmpdir)`` stops exactly those. Like the local stack the
cluster uses token authentication (Ray's GCS listens on every interface): ``cluster_env(tmpdir)`` gives a
driver the address and the token's path.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.local.process import (
    ProcessRecord,
    StackError,
    child_env,
    free_ports,
    is_running,
    log_tail,
    spawn,
    stop,
    tool,
)

CLUSTER_FILE = "ray_cluster.json"
# `ray start` prints this once its node's raylet has registered with the GCS.
_STARTED_MARKER = "Ray runtime started."
# Ray's minimum object store; the default (30% of RAM per node) is far more than a test needs.
_OBJECT_STORE_BYTES = 80 * 1024 * 1024


def _short_temp_dir(prefix: str) -> Path:
    # Ray's unix socket paths under its temp dir must stay under 107 bytes; pytest's tmp paths are long.
    return Path(tempfile.mkdtemp(prefix=prefix))


def _wait_started(record: ProcessRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(record):
            raise StackError(
                f"ray node '{record.name}' exited during start-up; see {record.log}: {log_tail(record.log)}"
            )
        if _STARTED_MARKER in Path(record.log).read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise StackError(f"ray node '{record.name}' did not start within {timeout:.0f}s; see {record.log}")


def cluster_env(tmpdir: Path) -> dict[str, str]:
    """RAY_ADDRESS and the token settings a driver needs to join the cluster recorded in ``tmpdir``."""
    state = _read_state(Path(tmpdir))
    if state is None:
        raise StackError(f"no Ray cluster recorded under {tmpdir}")
    return {"RAY_ADDRESS": state["address"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token"]}


def _read_state(tmpdir: Path) -> dict | None:
    path = tmpdir / CLUSTER_FILE
    return json.loads(path.read_text()) if path.exists() else None


def start_two_node_cluster(
    tmpdir: Path, head_cpus: int = 1, worker_cpus: int = 1, *, timeout: float = 120.0
) -> str:
    """Start a head node and a worker node (custom resource ``node2``) on this machine; return the
    head's GCS address (``127.0.0.1:<port>``)."""
    tmpdir = Path(tmpdir).resolve()
    tmpdir.mkdir(parents=True, exist_ok=True)
    if _read_state(tmpdir) is not None:
        raise StackError(
            f"{tmpdir / CLUSTER_FILE}: a cluster is already recorded here; stop_cluster() it first"
        )
    token = tmpdir / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    env = child_env(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # On SIGTERM a node drains for up to 30 s by default, and a head that ran Ray Train waits all
            # of it; a throwaway cluster has nothing to drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
    )
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    # fmt: off
    common = [
        "--block", "--disable-usage-stats", "--include-log-monitor", "false",
        "--object-store-memory", str(_OBJECT_STORE_BYTES),
    ]
    # fmt: on
    head_temp, worker_temp = _short_temp_dir("rayh-"), _short_temp_dir("rayw-")
    state: dict = {
        "address": address,
        "token": str(token),
        "temp_dirs": [str(head_temp), str(worker_temp)],
        "nodes": [],
    }

    def record(node: ProcessRecord) -> None:
        state["nodes"].append(node.to_json())
        (tmpdir / CLUSTER_FILE).write_text(json.dumps(state, indent=2))

    try:
        # fmt: off
        head_argv = [
            tool("ray"), "start", "--head",
            "--port", str(port),
            "--num-cpus", str(head_cpus),
            "--include-dashboard", "false",
            "--temp-dir", str(head_temp),
            *common,
        ]
        # fmt: on
        head = spawn("head", head_argv, tmpdir / "logs" / "head.log", env, tmpdir)
        record(head)
        _wait_started(head, timeout)
        # fmt: off
        worker_argv = [
            tool("ray"), "start",
            "--address", address,
            "--num-cpus", str(worker_cpus),
            "--resources", json.dumps({"node2": 1}),
            "--temp-dir", str(worker_temp),
            *common,
        ]
        # fmt: on
        worker = spawn("node2", worker_argv, tmpdir / "logs" / "node2.log", env, tmpdir)
        record(worker)
        _wait_started(worker, timeout)
    except BaseException:
        stop_cluster(tmpdir)
        raise
    return address


def stop_cluster(tmpdir: Path) -> list[str]:
    """Stop the nodes ``start_two_node_cluster`` recorded in ``tmpdir``; return their names."""
    tmpdir = Path(tmpdir).resolve()
    state = _read_state(tmpdir)
    if state is None:
        raise StackError(f"nothing to stop: no Ray cluster recorded under {tmpdir}")
    nodes = [ProcessRecord.from_json(node) for node in state["nodes"]]
    # Both leaders at once: SIGTERM to `ray start --block` stops its node in ~3 s, whereas SIGTERM to
    # every process of the group makes the raylet wait ~10 s for its peers.
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        list(pool.map(lambda node: stop(node, leader_grace=5.0, grace=5.0), nodes))
    for temp in state["temp_dirs"]:
        shutil.rmtree(temp, ignore_errors=True)
    (tmpdir / CLUSTER_FILE).unlink()
    return [node.name for node in nodes]


def probe_train_loop(config: dict) -> None:
    """Ray Train worker function that records where it ran: each rank writes ``rank<N>.json`` (node id,
    world size, result of a gloo all-reduce of rank+1) to ``config["out_dir"]``. Ray Train (V2) keeps
    only rank 0's reported metrics, so per-worker facts go through files on the (shared, local) disk."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the process group Ray Train set up (gloo on CPU)
    facts = {
        "rank": rank,
        "world_size": context.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "allreduce": total.item(),
        "backend": dist.get_backend(),
    }
    out = Path(config["out_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps(facts))


def run_probe(address: str, out_dir: Path, storage_path: Path) -> dict:
    """Run ``probe_train_loop`` with two 1-CPU workers on the cluster at ``address``; return the alive
    nodes' resources by node id (the driver's view) and each rank's record."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}
        TorchTrainer(
            probe_train_loop,
            train_loop_config={"out_dir": str(out_dir)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(storage_path), name="two-node-probe"),
        ).fit()
    finally:
        ray.shutdown()
    ranks = [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]
    return {"nodes": nodes, "ranks": ranks}


if __name__ == "__main__":
    # python -m infra.local.ray_cluster OUT_DIR STORAGE_PATH, with cluster_env() in the environment: runs
    # the probe in a process of its own, so the caller's interpreter keeps no Ray state (Ray reads
    # RAY_AUTH_MODE once, when it is first imported).
    import sys

    result = run_probe(os.environ["RAY_ADDRESS"], Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(result))
