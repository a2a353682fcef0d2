"""The cluster path: the flow's process orchestrates, Ray nodes that can host a worker compute.

A real three-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head with no CPU (as on
KubeRay or the cluster launcher, nothing can run there) and two 1-CPU worker nodes. The compress flow's
driver joins it through ``compute.ray_address`` with the tiny test config; every stage must run on a worker
node. The same cluster with a GPU declared on each worker (resources only: this machine has no CUDA) shows a
GPU run getting past preflight from a driver without a GPU, its stage scheduled on a worker node, and the
missing CUDA there reported in one line.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from tasks.env import apply_env_defaults

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))  # before Prefect loads
apply_env_defaults()

import pytest  # noqa: E402
from conftest import tiny_config  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from compression.config import ComputeConfig  # noqa: E402
from tasks.cluster import UNLIMITED, Capacity, ComputeError, check_offers, worker_node  # noqa: E402
from tasks.ray_trainer import ensure_ray, shutdown_ray  # noqa: E402

OBJECT_STORE = 80 * 1024 * 1024


def start_cluster(worker_gpus: int, node_env: list[dict[str, str]] | None = None):
    """A head with 0 CPUs and two 1-CPU workers (``worker_gpus`` GPUs each, declared only); ``node_env``:
    environment variables of the head's and each worker's processes."""
    from ray.cluster_utils import Cluster

    shutdown_ray()  # a Ray another test module started in this process
    env = node_env or [{}, {}, {}]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False,
        "env_vars": env[0]})
    workers = [cluster.add_node(num_cpus=1, num_gpus=worker_gpus, object_store_memory=OBJECT_STORE,
                                env_vars=env[i + 1])
               for i in range(2)]
    cluster.wait_for_nodes()
    return cluster, cluster.head_node.node_id, {node.node_id for node in workers}


@pytest.fixture
def cpu_cluster():
    cluster, head, workers = start_cluster(worker_gpus=0)
    try:
        yield cluster, head, workers
    finally:
        shutdown_ray()
        cluster.shutdown()


@pytest.fixture
def gpu_cluster():
    cluster, head, workers = start_cluster(worker_gpus=1)
    try:
        yield cluster, head, workers
    finally:
        shutdown_ray()
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.long
def test_every_stage_runs_on_a_worker_node_never_on_the_cpu_less_head(cpu_cluster, prefect_server, digits_devkit,
                                                                       tmp_path):
    from flows.compress import run_pipeline

    cluster, head, workers = cpu_cluster
    cfg = tiny_config(tmp_path, digits_devkit, f"compute.ray_address={cluster.address}", "stages.distill.enabled=false")
    started = time.perf_counter()
    summary = run_pipeline(cfg)
    print(f"\nflow on the 3-node cluster: {time.perf_counter() - started:.1f}s")

    nodes = summary["stage_nodes"]
    assert [name.split("_", 1)[1] for name in nodes] == ["pretrain", "sparsity_p1", "selection_p1", "prune_p1",
                                                         "retrain_p1"]
    assert {node["node_id"] for node in nodes.values()} <= workers, nodes
    assert head not in {node["node_id"] for node in nodes.values()}
    # The MLflow child run of each checkpoint says where it was computed (and its selection, for a prune).
    client = MlflowClient(cfg.tracking.mlflow_uri)
    for row in summary["checkpoints"]:
        params = client.get_run(row["mlflow_run_id"]).data.params
        assert params["ray_node_id"] in workers and params["ray_hostname"], row["checkpoint"]
        assert row["ray_node_id"] == params["ray_node_id"]
    prune = next(row for row in summary["checkpoints"] if row["stage"] == "prune")
    assert client.get_run(prune["mlflow_run_id"]).data.params["selection_ray_node_id"] in workers


@pytest.mark.slow
@pytest.mark.long
def test_a_run_folder_on_storage_is_all_the_nodes_and_the_flow_share(prefect_server, digits_devkit, tmp_path,
                                                                      monkeypatch):
    """``workdir`` as a URI: the flow's process and each node keep their own copies (three caches, no
    folder in common but the store); the stages read their inputs from the store and write their outputs
    back, Ray Train keeps its runs there too, and the flow ends with every checkpoint stored whole."""
    from compression.checkpoint import file_digest
    from flows.compress import run_pipeline

    caches = {name: tmp_path / f"cache-{name}" for name in ("head", "worker-1", "worker-2", "flow")}
    cluster, _, workers = start_cluster(0, [{"PRUNEPIPE_RUN_CACHE": str(caches[name])}
                                            for name in ("head", "worker-1", "worker-2")])
    try:
        monkeypatch.setenv("PRUNEPIPE_RUN_CACHE", str(caches["flow"]))
        store = tmp_path / "store"
        cfg = tiny_config(tmp_path, digits_devkit, f"compute.ray_address={cluster.address}",
                          "stages.distill.enabled=false", f"workdir={store.as_uri()}")
        summary = run_pipeline(cfg)
    finally:
        shutdown_ray()
        cluster.shutdown()

    assert {node["node_id"] for node in summary["stage_nodes"].values()} <= workers
    rows = summary["checkpoints"]
    assert [row["stage"] for row in rows] == ["pretrain", "sparsity", "prune", "retrain"]
    for row in rows:  # the flow's copy of each checkpoint is the stored file
        local = Path(row["path"])
        assert local.is_relative_to(caches["flow"]), local
        assert file_digest(local) == file_digest(store / "tiny" / local.name)
    assert len(list((store / "tiny").glob("*_selection_p1.json"))) == 1  # the selection, stored as well
    assert list((store / "ray").iterdir())  # Ray Train's runs, under <workdir>/ray
    # The nodes worked in their own copies, the head in none; the exchanged checkpoints were cleaned up.
    assert any(caches[name].is_dir() for name in ("worker-1", "worker-2"))
    assert not caches["head"].exists()
    assert not list(store.rglob(".prunepipe-exchange/*.safetensors"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_gpu_run_from_a_driver_without_a_gpu_is_scheduled_on_a_gpu_worker(gpu_cluster, prefect_server,
                                                                             digits_devkit, tmp_path):
    import torch

    from flows.compress import preflight, run_pipeline

    if torch.cuda.is_available():
        pytest.skip("needs a driver without a CUDA GPU")
    cluster, head, workers = gpu_cluster
    cfg = tiny_config(tmp_path, digits_devkit, f"compute.ray_address={cluster.address}", "compute.use_gpu=true",
                      "stages.distill.enabled=false")
    preflight(cfg)  # the driver has no GPU; the cluster's workers offer two
    assert ensure_ray(cfg.compute).gpus == 2
    started = time.perf_counter()
    with pytest.raises(ComputeError) as err:
        run_pipeline(cfg)
    message = str(err.value)
    print(f"\nGPU run failed after {time.perf_counter() - started:.1f}s: {message}")
    assert "\n" not in message
    assert "offers GPUs to Ray but torch sees no CUDA device there" in message
    # The stage was scheduled on a worker node (the one the error names), not on the head.
    assert any(f"Ray node {worker} " in message for worker in workers), message
    assert head not in message
    # The flow marked the pretrain stage FAILED in MLflow with that line.
    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    failed = client.search_runs([experiment.experiment_id], filter_string="tags.prunepipe.stage = 'pretrain'")
    assert [run.data.tags["prunepipe.error"] for run in failed] == [f"ComputeError: {message}"]


def test_what_the_cluster_can_offer_counts_nodes_and_the_autoscalers_node_groups():
    gpu_workers = ComputeConfig(use_gpu=True, num_workers=4, cpus_per_worker=7, gpus_per_worker=1)
    head = {"CPU": 0.0}
    # Nothing up but the head; the autoscaler may add four 1-GPU, 7-CPU nodes: enough.
    check_offers(gpu_workers, Capacity(nodes=[head], groups=[({"CPU": 7, "GPU": 1}, 4)]), "head:6379")
    # Only two such nodes may be added.
    with pytest.raises(ComputeError, match=r"need 4 GPUs, the Ray cluster at head:6379 has 0 \(nor can its autosc"):
        check_offers(gpu_workers, Capacity(nodes=[head], groups=[({"CPU": 7, "GPU": 1}, 2)]), "head:6379")
    # A worker of 8 CPUs fits no node of 7, however many.
    eight = gpu_workers.model_copy(update={"cpus_per_worker": 8})
    with pytest.raises(ComputeError, match=r"cpus_per_worker=8: no node .* has that many CPUs \(the largest has 7"):
        check_offers(eight, Capacity(nodes=[head], groups=[({"CPU": 7, "GPU": 1}, UNLIMITED)]), "head:6379")
    # No autoscaler: what is up is all there is.
    with pytest.raises(ComputeError, match="its autoscaler adds none"):
        check_offers(ComputeConfig(num_workers=3), Capacity(nodes=[head, {"CPU": 1}, {"CPU": 1}]), "head:6379")
    check_offers(ComputeConfig(num_workers=2), Capacity(nodes=[head, {"CPU": 1}, {"CPU": 1}]), "head:6379")


@pytest.mark.slow
def test_a_worker_node_is_chosen_and_a_cluster_that_can_never_hold_the_workers_is_refused(cpu_cluster):
    cluster, head, workers = cpu_cluster
    compute = ComputeConfig(ray_address=cluster.address, num_workers=2)
    info = ensure_ray(compute)
    assert info.cpus == 2 and info.capacity is not None and len(info.capacity.nodes) == 3
    assert {worker_node(compute) for _ in range(8)} <= workers
    with pytest.raises(ComputeError, match=r"^compute.use_gpu: 2 workers x gpus_per_worker need 2 GPUs") as err:
        ensure_ray(compute.model_copy(update={"use_gpu": True}))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.long
def test_two_runs_of_one_preset_started_together_do_not_touch_each_others_files(cpu_cluster, prefect_server,
                                                                                 digits_devkit, tmp_path):
    """Two ``prunepipe run`` processes, same preset and run folder, started at once on the same cluster and
    stores: the second waits for the first, then reuses its finished stages; both end well, every file is
    whole, each has its own MLflow runs."""
    import json
    import subprocess
    import sys

    from conftest import tiny_overrides

    from compression.checkpoint import load_checkpoint

    cluster, _, _ = cpu_cluster
    settings = tiny_overrides(tmp_path, digits_devkit, "stages.distill.enabled=false")
    command = [sys.executable, "-m", "flows.cli", "run", "--config", "default",
               *[arg for setting in settings for arg in ("--set", setting)]]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_API_URL": prefect_server, "RAY_ADDRESS": cluster.address}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    waited = [i for i, (_, err) in enumerate(outputs) if "waiting for that run to end" in err]
    assert len(waited) == 1, [err[-2000:] for _, err in outputs]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("prunepipe")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.prunepipe.preset = 'tiny'")
    parents = [run for run in parents if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 2 and {run.info.status for run in parents} == {"FINISHED"}
    cached = {}
    for parent in parents:
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(run.data.tags["prunepipe.stage"] for run in children) == ["pretrain", "prune", "retrain",
                                                                                 "sparsity"]
        cached[parent.info.run_id] = {run.data.tags["prunepipe.cached"] for run in children}
    # One run computed every stage, the other (the one that waited) found all of them in the cache.
    assert sorted(map(sorted, cached.values())) == [["false"], ["true"]]
    run_dir = tmp_path / "runs" / "tiny"
    for checkpoint in run_dir.glob("*.safetensors"):
        load_checkpoint(checkpoint)  # whole, not half-written by the other run
    for result in (run_dir / ".prefect-results").iterdir():
        json.loads(result.read_text())  # every cache entry is whole JSON
    # The same final checkpoint: one model version, not two.
    assert len(client.search_model_versions("name = 'prunepipe-tiny'")) == 1
