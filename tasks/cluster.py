"""Where stage work runs: the flow's process orchestrates, a Ray node that can host a training worker computes.

* ``worker_bundle(compute)``: what one Ray Train worker asks for (``CPU``, and ``GPU`` with ``use_gpu``).
* ``cluster_capacity()`` / ``check_offers(compute, ...)``: how many such workers the cluster's nodes hold
  now, and how many its autoscaler's node groups could hold (``ray._private.state``'s cluster config, which
  KubeRay and the cluster launcher publish); a run that neither can ever serve stops in one line naming
  the missing resource.
* ``on_worker_node(compute, function, ...)``: ``function`` as a Ray task on a node that can host a worker
  (one is waited for through ``ray.autoscaler.sdk.request_resources`` when none is up yet).

The task reserves 0 CPUs and 0 GPUs: it only drives a stage. Ray Train's controller (0 CPUs, placed on
the caller's node) and its workers hold the resources; a stage task holding a CPU or a GPU could take
the very slot a worker needs on a small cluster and wait on it forever. Pinning it to a node that can
host a worker keeps it off a CPU-less head, and its own evaluation and measurement there see the node's
GPUs (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for a task that asks for none).
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compression.config import ComputeConfig
from compression.errors import PrunepipeError

log = logging.getLogger(__name__)

# How long a stage waits for the autoscaler to start a node that can host a worker.
NODE_WAIT_SECONDS = 900.0
UNLIMITED = math.inf


class ComputeError(PrunepipeError):
    """Ray or the accelerator the config asks for is not there."""


def worker_bundle(compute: ComputeConfig) -> dict[str, float]:
    """The resources of one Ray Train worker."""
    bundle = {"CPU": float(compute.cpus_per_worker)}
    if compute.use_gpu:
        bundle["GPU"] = float(compute.gpus_per_worker)
    return bundle


def workers_fitting(resources: dict[str, float], bundle: dict[str, float]) -> float:
    """How many ``bundle`` s one node of ``resources`` holds."""
    return min(math.floor(resources.get(key, 0.0) / amount + 1e-9) for key, amount in bundle.items() if amount > 0)


@dataclass
class Capacity:
    """The cluster's alive nodes (their total resources) and its autoscaler's node groups."""

    nodes: list[dict[str, float]] = field(default_factory=list)
    # (resources of one node, most nodes of the group; UNLIMITED when the group has no maximum)
    groups: list[tuple[dict[str, float], float]] = field(default_factory=list)

    def workers(self, bundle: dict[str, float]) -> float:
        """The most workers of ``bundle`` the cluster can hold at once, now or once scaled up."""
        now = sum(workers_fitting(node, bundle) for node in self.nodes)
        scaled = sum(count * workers_fitting(resources, bundle) if workers_fitting(resources, bundle) else 0
                     for resources, count in self.groups)
        return max(now, scaled)

    def largest(self, key: str) -> float:
        """The most of resource ``key`` any one node has or could have."""
        return max([node.get(key, 0.0) for node in self.nodes]
                   + [resources.get(key, 0.0) for resources, count in self.groups if count], default=0.0)


def cluster_capacity() -> Capacity:
    """What the connected Ray cluster has (alive nodes) and what its autoscaler may add (its node groups)."""
    import ray
    from ray._private.state import state

    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node["Alive"]]
    groups: list[tuple[dict[str, float], float]] = []
    config = state.get_cluster_config()  # published by the autoscaler (KubeRay, cluster launcher); None without
    if config is not None:
        for group in config.node_group_configs:
            count = UNLIMITED if group.max_count == -1 else float(group.max_count)
            groups.append(({k: float(v) for k, v in group.resources.items()}, count))
    return Capacity(nodes, groups)


def check_offers(compute: ComputeConfig, capacity: Capacity, address: str) -> None:
    """Fail in one line when neither the cluster nor its autoscaler can ever hold the run's workers."""
    bundle = worker_bundle(compute)
    if capacity.workers(bundle) >= compute.num_workers:
        return
    scaling = "its autoscaler adds none" if not capacity.groups else "nor can its autoscaler add them"
    if compute.use_gpu:
        gpu_only = capacity.workers({"GPU": bundle["GPU"]})
        if gpu_only < compute.num_workers:
            have = sum(node.get("GPU", 0.0) for node in capacity.nodes)
            raise ComputeError(
                f"compute.use_gpu: {compute.num_workers} workers x gpus_per_worker need "
                f"{compute.num_workers * bundle['GPU']:g} GPUs, the Ray cluster at {address} has {have:g} "
                f"({scaling}); lower compute.num_workers or compute.gpus_per_worker"
            )
    largest = capacity.largest("CPU")
    if largest < bundle["CPU"]:
        raise ComputeError(
            f"compute.cpus_per_worker={bundle['CPU']:g}: no node of the Ray cluster at {address} has that many CPUs "
            f"(the largest has {largest:g}, {scaling}); lower compute.cpus_per_worker"
        )
    have = sum(node.get("CPU", 0.0) for node in capacity.nodes)
    raise ComputeError(
        f"compute.num_workers x cpus_per_worker = {compute.num_workers * bundle['CPU']:g} CPUs on nodes that hold "
        f"workers of {bundle}, but the Ray cluster at {address} has {have:g} CPUs ({scaling}); lower "
        "compute.num_workers or compute.cpus_per_worker"
    )


# --------------------------------------------------------------------------------------------
# Running a function on a node that can host a worker


def worker_node(compute: ComputeConfig, wait_seconds: float = NODE_WAIT_SECONDS) -> str:
    """The id of an alive node that can host a worker; asks the autoscaler for one when none is up yet."""
    import ray

    bundle = worker_bundle(compute)

    def eligible() -> list[str]:
        return [node["NodeID"] for node in ray.nodes()
                if node["Alive"] and workers_fitting({k: float(v) for k, v in node["Resources"].items()}, bundle)]

    nodes = eligible()
    if nodes:
        return random.choice(nodes)  # spread the stages that run at once (budget trials)
    from ray.autoscaler.sdk import request_resources

    log.warning("no Ray node can host a worker (%s) yet: asking the autoscaler for one", bundle)
    request_resources(bundles=[bundle])
    deadline = time.monotonic() + wait_seconds
    try:
        while not (nodes := eligible()):
            if time.monotonic() > deadline:
                raise ComputeError(
                    f"no Ray node that can host a worker ({bundle}) joined within {wait_seconds:.0f}s; see "
                    "`ray status` for what the autoscaler is doing"
                )
            time.sleep(5)
    finally:
        request_resources(bundles=[])  # the request persists otherwise; the workers' own demand takes over
    return nodes[0]


def node_identity() -> dict[str, str]:
    """The Ray node id and host name of the calling process (recorded with each stage's result)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


def on_worker_node(compute: ComputeConfig, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` as a 0-CPU, 0-GPU Ray task on a node that can host a worker; its result.

    The task's own exception is raised here (a ``PrunepipeError`` stays one line; another keeps the remote
    traceback as a note). Ray does not retry the task: the Prefect task around it decides.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = worker_node(compute)
    remote = ray.remote(function).options(
        num_cpus=0, num_gpus=0, max_retries=0, retry_exceptions=False,
        name=getattr(function, "__name__", "stage"),
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    )
    try:
        return ray.get(remote.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if cause is None:
            raise
        if not isinstance(cause, PrunepipeError):
            cause.add_note(f"raised on Ray node {node}:\n{err.traceback_str}")
        raise cause from None
