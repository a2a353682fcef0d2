"""Infrastructure: the local Prefect/MLflow/Ray stack, a two-node Ray cluster running Ray Train, and the
deployment files (Ray cluster launcher, KubeRay, Docker, GitHub workflows) checked as far as this machine
allows (no Docker engine, no Kubernetes, no cloud account)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.local.process import BIN_DIR, free_ports, group_members, http_get, port_taken
from infra.local.ray_cluster import cluster_env, start_two_node_cluster, stop_cluster
from infra.local.stack import StackError, stack_down, stack_env, stack_status, stack_up

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WORKFLOWS = ROOT / ".github" / "workflows"
INFRA_YAML = sorted((ROOT / "infra").rglob("*.yaml"))


def _pin(package: str) -> str:
    """The exact version pyproject.toml pins ``package`` to."""
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}==(\S+)", requirement)
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml does not pin {package}")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- stack


@pytest.fixture
def stack_home(tmp_path):
    home = tmp_path / "home"
    yield home
    if (home / "stack.json").exists():  # the test failed before its own stack_down
        with contextlib.suppress(StackError):
            stack_down(home)


def _ports(count: int) -> dict[str, int]:
    names = ["prefect_port", "mlflow_port", "ray_port", "ray_dashboard_port"]
    return dict(zip(names, free_ports(count), strict=False))


def _recorded_pids(home: Path) -> list[int]:
    state = json.loads((home / "stack.json").read_text())
    return [entry["process"]["pid"] for entry in state["services"]]


def _processes_using(home: Path) -> list[int]:
    """Live processes whose command line or environment names ``home`` (every stack service has it in
    one or the other: PREFECT_HOME, MLflow's store paths, Ray's token path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in text:
            found.append(int(proc.name))
    return found


def _post_json(url: str, body: dict, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def _non_loopback_ipv4() -> list[str]:
    """This machine's IPv4 addresses other than 127.x (from the routing table's view of the outside)."""
    found = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("198.51.100.1", 9))  # no packet is sent: this only picks the outgoing interface
            found.add(sock.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in found if not a.startswith("127."))


def test_stack_up_status_env_down(stack_home):
    ports = _ports(4)
    services = stack_up(stack_home, ray_num_cpus=1, **ports)
    assert [s.name for s in services] == ["prefect", "mlflow", "ray"]
    urls = {s.name: s.url for s in services}
    assert urls["prefect"] == f"http://127.0.0.1:{ports['prefect_port']}"

    # Each server answers, stores its data under home, and accepts a real write.
    assert http_get(f"{urls['prefect']}/api/health") == (200, "true")
    assert _post_json(f"{urls['prefect']}/api/flows/", {"name": "infra-test"}) in (200, 201)
    assert (stack_home / "prefect" / "prefect.db").exists()
    assert http_get(f"{urls['mlflow']}/health")[0] == 200
    create = f"{urls['mlflow']}/api/2.0/mlflow/experiments/create"
    assert _post_json(create, {"name": "infra-test"}) == 200
    assert (stack_home / "mlflow.db").exists()
    # MLflow's security middleware is on: a foreign Host header (DNS rebinding) and a foreign browser
    # origin are refused.
    search = f"{urls['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_get(search, headers={"Host": "evil.example:80"})[0] == 403
    assert _post_json(create, {"name": "from-evil"}, {"Origin": "http://evil.example"}) == 403
    # Prefect and MLflow listen on loopback only: the machine's other addresses do not answer.
    for address in _non_loopback_ipv4():
        for name in ("prefect", "mlflow"):
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((address, ports[f"{name}_port"])) != 0, f"{name} answers on {address}"

    statuses = stack_status(stack_home)
    assert [(s.name, s.alive, s.healthy) for s in statuses] == [
        ("prefect", True, True),
        ("mlflow", True, True),
        ("ray", True, True),
    ]
    env = stack_env(stack_home)
    assert env["PREFECT_API_URL"] == f"{urls['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == urls["mlflow"]
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray_port']}"
    assert env["DO_NOT_TRACK"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    # Ray's GCS listens on every interface, so it must refuse a client without the token.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    check = [str(BIN_DIR / "ray"), "health-check", "--address", env["RAY_ADDRESS"]]
    assert subprocess.run(check, env=no_token, capture_output=True, timeout=120).returncode != 0

    with pytest.raises(StackError, match="already running"):
        stack_up(stack_home, **_ports(4))

    pids = _recorded_pids(stack_home)
    assert len(_processes_using(stack_home)) >= 3
    assert stack_down(stack_home) == ["prefect", "mlflow", "ray"]
    assert all(group_members(pid) == [] for pid in pids)  # every server and its helpers are gone
    assert _processes_using(stack_home) == []
    assert not any(port_taken("127.0.0.1", port) for port in ports.values())
    assert not (stack_home / "stack.json").exists() and not list((stack_home / "pids").iterdir())
    assert stack_status(stack_home) == []


def test_up_with_a_taken_port_names_it_and_starts_nothing(stack_home):
    ports = _ports(4)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports["mlflow_port"]))
        holder.listen()
        with pytest.raises(
            StackError, match=rf"^port {ports['mlflow_port']} \(mlflow\) on 127\.0\.0\.1 is already"
        ):
            stack_up(stack_home, **ports)
    assert not (stack_home / "stack.json").exists()
    assert not (stack_home / "logs").exists()  # no service was spawned


def test_down_with_nothing_running_is_one_clear_error(stack_home):
    with pytest.raises(StackError, match=r"^nothing to stop: no stack recorded under .*home$"):
        stack_down(stack_home)
    with pytest.raises(StackError, match="run `prunepipe up` first"):
        stack_env(stack_home)


@pytest.mark.slow
def test_a_service_that_fails_is_named_and_the_others_are_stopped(stack_home):
    # Ray rejects a negative CPU count after it has started; Prefect and MLflow are up or starting then.
    with pytest.raises(StackError, match=r"^ray exited; stopped the others; see .*logs/ray\.log"):
        stack_up(stack_home, ray_num_cpus=-1, **_ports(4))
    assert not (stack_home / "stack.json").exists()
    for name in ("prefect", "mlflow", "ray"):
        assert (stack_home / "logs" / f"{name}.log").exists()
    assert _processes_using(stack_home) == []


# ---------------------------------------------------------------------------------- two-node Ray


@pytest.fixture
def ray_two_nodes(request, tmp_path):
    """A head and a second node on this machine; both stopped afterwards, whatever happens. A test sizes
    them with ``@pytest.mark.parametrize("ray_two_nodes", [{"head_cpus": 2}], indirect=True)`` (the
    arguments of ``start_two_node_cluster``; 1 CPU each by default)."""
    cluster_dir = tmp_path / "cluster"
    start_two_node_cluster(cluster_dir, **getattr(request, "param", {}))
    try:
        yield cluster_dir
    finally:
        stop_cluster(cluster_dir)


@pytest.mark.slow
def test_ray_train_workers_land_on_both_nodes(ray_two_nodes, tmp_path):
    # The driver runs in its own process: Ray reads its auth settings once per interpreter, and this
    # test must leave no Ray state behind in pytest's.
    env = {**os.environ, **cluster_env(ray_two_nodes)}
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.local.ray_cluster",
            str(tmp_path / "ranks"),
            str(tmp_path / "ray_results"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    nodes, ranks = result["nodes"], result["ranks"]

    assert len(nodes) == 2
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert [r["allreduce"] for r in ranks] == [3.0, 3.0]  # 1 + 2, summed across the two nodes
    assert {r["node_id"] for r in ranks} == set(nodes)  # one worker on each node
    assert sorted(nodes[r["node_id"]].get("node2", 0) for r in ranks) == [0, 1]


# A driver for the node-loss test, run in a process of its own (Ray reads its auth settings once per
# interpreter). argv: WORK EPOCHS. It fits the tiniest pretrain stage (test_ray_trainer's config) through
# RayTrainer with 2 one-CPU workers and compute.max_failures=1. Ray Train packs a worker group onto one node
# when it can, so until the test says "release" a placement group holds one of the head's 2 CPUs: the
# first group then spans both nodes; after that the head alone has room for the whole group again.
_NODE_LOSS_DRIVER = """
import json, logging, sys, threading, time
from pathlib import Path

from tasks.env import apply_env_defaults

apply_env_defaults()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
work, epochs = Path(sys.argv[1]), int(sys.argv[2])

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from compression.config import OptimConfig, load_config
from compression.data.digits import write_digits_voc
from compression.jobs import TrainJob
from tasks.ray_trainer import RayTrainer, ensure_ray

devkit = write_digits_voc(work / "digits", image_size=64, num_images={"train": 32, "val": 8, "test": 8})
cfg = load_config("default", [
    f"data.root={devkit}", "data.builtin=null", "data.batch_size=8", "model.width_mult=0.0625",
    "model.image_size=64", "compute.amp_bf16=false", "compute.channels_last=false",
    f"stages.pretrain.epochs={epochs}", "stages.pretrain.warmup_epochs=0",
    f"workdir={work}", "compute.num_workers=2", "compute.cpus_per_worker=1", "compute.max_failures=1",
])
ensure_ray(cfg.compute)
node2 = {n["NodeID"]: "node2" in n["Resources"] for n in ray.nodes() if n["Alive"]}
head = next(node for node, is_node2 in node2.items() if not is_node2)
hold = placement_group([{"CPU": 1}], bundle_label_selector=[{"ray.io/node-id": head}])
assert hold.wait(120), "the head's placeholder CPU was not reserved"
facts = {"driver_on_head": ray.get_runtime_context().get_node_id() == head}

def release():
    while not (work / "release").exists():
        time.sleep(0.05)
    groups = [g for g in placement_group_table().values()
              if g["state"] == "CREATED" and g["placement_group_id"] != hold.id.hex()]
    facts["bundles_on_node2"] = sorted(node2[n] for g in groups for n in g["bundles_to_node_id"].values())
    remove_placement_group(hold)
    (work / "released").write_text("")

threading.Thread(target=release, daemon=True).start()
job = TrainJob(stage="pretrain", config=cfg.model_dump(mode="json"),
               optim=cfg.stages.pretrain.model_dump(mode="json", include=set(OptimConfig.model_fields)),
               input_checkpoint=None, output_checkpoint=str(work / "pretrained.safetensors"))
trainer = RayTrainer(cfg.compute, work / "ray")
result = trainer.fit(job)
fit = trainer.fits[-1]
facts.update(history=result.history, output=result.output_checkpoint, seconds=fit.seconds,
             resumed_from_epoch=fit.resumed_from_epoch, restarted_from_epoch=fit.restarted_from_epoch,
             epochs_trained=fit.epochs_trained)
(work / "result.json").write_text(json.dumps(facts))
"""


def _parents() -> dict[int, int]:
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _reported_epoch(storage: Path) -> int | None:
    """The epoch of the newest checkpoint the Ray Train controller has registered (what a restarted worker
    group gets from ``ray.train.get_checkpoint()``). A ``checkpoint_*`` folder alone is not enough: the
    controller takes a report in at its next poll of the workers, and a report still in flight when a
    worker dies is dropped with the worker group."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # OSError/ValueError: mid-write
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
    return None


def _kill_node(leader: int) -> list[int]:
    """SIGKILL a ``ray start`` node the way a machine dies, all at once: its process group (raylet and
    agents) and everything it started (Ray's worker processes lead process groups of their own)."""
    parents = _parents()
    node = set(group_members(leader))
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in node} - node
        node |= children
        grown = bool(children)
    for pid in node:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(node)


@pytest.mark.fault  # long: make test-faults (CI)
@pytest.mark.parametrize("ray_two_nodes", [{"head_cpus": 2, "worker_cpus": 1}], indirect=True)
def test_a_node_that_dies_mid_fit_costs_a_restart_on_the_rest_not_the_epochs(ray_two_nodes, tmp_path):
    started = time.monotonic()
    epochs = 5
    state = json.loads((ray_two_nodes / "ray_cluster.json").read_text())
    node2 = next(node for node in state["nodes"] if node["name"] == "node2")
    head_temp = Path(state["temp_dirs"][0])
    work = tmp_path / "work"
    work.mkdir()
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", _NODE_LOSS_DRIVER, str(work), str(epochs)],
            # The controller polls the workers every 2 s by default: it takes reports in and notices a dead
            # worker that much sooner.
            env={**os.environ, **cluster_env(ray_two_nodes), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:

        def wait_for(what: str, done) -> None:
            # Generous: on a busy 2-core machine the first worker group alone has taken minutes to start.
            deadline = time.monotonic() + 600
            while not done():
                assert driver.poll() is None, f"driver ended before {what}: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no {what} after 600 s: {log_path.read_text()[-3000:]}"
                time.sleep(0.05)

        wait_for("the first reported checkpoint", lambda: _reported_epoch(work / "ray") is not None)
        (work / "release").touch()
        wait_for("the head's placeholder CPU was released", (work / "released").exists)
        reported_before_kill = _reported_epoch(work / "ray")
        killed = _kill_node(node2["pid"])
        killed_at = time.monotonic()
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    driver_log = log_path.read_text()
    assert driver.returncode == 0, driver_log[-3000:]
    assert not [pid for pid in killed if _alive(pid)]  # the whole node is gone, not just its raylet
    facts = json.loads((work / "result.json").read_text())
    print(f"\nnode loss: killed node2 at {killed_at - started:.0f}s after epoch {reported_before_kill} was "
          f"reported, fit took {facts['seconds']:.0f}s, test {time.monotonic() - started:.0f}s")

    assert facts["driver_on_head"]  # the Ray Train controller runs on the driver's node: it must survive
    assert facts["bundles_on_node2"] == [False, True]  # the first worker group had a worker on node2
    # The fit finished, with every epoch's history, and its checkpoint loads.
    from compression.checkpoint import load_checkpoint

    assert [h["epoch"] for h in facts["history"]] == list(range(1, epochs + 1))
    assert load_checkpoint(facts["output"]).model_name == "ssd_vgg_lite"
    # Ray restarted the worker group once (max_failures=1) and the restarted group resumed from the last
    # reported checkpoint: it trained only the epochs after it, not all of them again.
    assert facts["resumed_from_epoch"] == 0  # the fit itself started from scratch ...
    assert facts["restarted_from_epoch"] is not None, driver_log[-3000:]  # ... Ray restarted it mid-fit ...
    assert reported_before_kill <= facts["restarted_from_epoch"] < epochs  # ... and the restart resumed
    restarted = facts["restarted_from_epoch"]
    assert re.search(
        rf"pretrain: Ray Train fit pretrain-\w+: a worker failed \(a lost node or process\) and Ray "
        rf"restarted the worker group \(compute.max_failures=1\); it resumed after epoch {restarted} of "
        rf"{epochs}, none of those was retrained",
        driver_log,
    ), driver_log[-3000:]
    # Ray's own account, in the controller's log on the head: one retry, charged to the worker group.
    messages = [
        json.loads(line)["message"]
        for path in head_temp.glob("session_latest/logs/train/ray-train-app-controller-*.log")
        for line in path.read_text().splitlines()
    ]
    retries = [m for m in messages if m.startswith("[FailurePolicy] RETRY")]
    assert len(retries) == 1, messages
    assert "Source: worker group\n  Error count: 1 (max allowed: 1)" in retries[0]


def test_a_worker_lost_with_its_node_is_a_transient_stage_failure():
    """The error Ray Train raises once a node's worker is lost and max_failures is spent, as its worker group
    builds it (ray/train/v2/_internal/execution/worker_group): the dead rank fails the health check with an
    actor error, the other rank's collective breaks. The stage's Prefect retry must see it as transient;
    a serialization failure in the same wrapper, or a PrunepipeError in a worker, must not."""
    from tasks.env import apply_env_defaults

    apply_env_defaults()
    from ray.exceptions import ActorUnavailableError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from compression.errors import DataError
    from tasks.stages import is_transient

    def group_error(rank0: Exception) -> WorkerGroupError:
        broken_collective = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")
        return WorkerGroupError("...", {0: rank0, 1: UserExceptionWithTraceback(broken_collective, "...")})

    def health_check_failed(cause: Exception) -> WorkerHealthCheckFailedError:
        return WorkerHealthCheckFailedError("A worker health check failed.", failure=cause)

    unavailable = ActorUnavailableError("RpcError: failed to connect to all addresses", None)
    assert is_transient(group_error(health_check_failed(unavailable)))
    not_serializable = TypeError("cannot pickle '_thread.lock' object")
    assert not is_transient(group_error(health_check_failed(not_serializable)))
    assert not is_transient(group_error(UserExceptionWithTraceback(DataError("x.xml: no boxes"), "...")))


# ------------------------------------------------------------------------------ deployment files


def test_every_infra_yaml_parses():
    names = {p.relative_to(ROOT).as_posix() for p in INFRA_YAML}
    assert {
        "infra/ray/cluster.yaml",
        "infra/ray/kuberay-raycluster.yaml",
        "infra/ray/kuberay-rayjob.yaml",
        "infra/ray/kuberay-storage.yaml",
        "infra/docker/compose.yaml",
    } <= names
    for path in [*INFRA_YAML, *WORKFLOWS.glob("*.yml")]:
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_ray_cluster_launcher_config_is_valid():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(ROOT / "infra" / "ray" / "cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # the checks `ray up` runs before it launches anything

    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["ray.worker.gpu"]
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instance families
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    setup = "\n".join(config["setup_commands"])
    assert f"pip install torch=={_pin('torch')} torchvision=={_pin('torchvision')}" in setup
    assert "pip install -e ~/prunepipe" in setup
    assert config["file_mounts"] == {"~/prunepipe": "."}
    assert "/mnt/shared" in setup


# The spec schemas of KubeRay v1's RayCluster and RayJob CRDs, trimmed from their openAPIV3Schema (the
# file's $comment says from which KubeRay commit and how).
KUBERAY_SCHEMA = json.loads((ROOT / "tests" / "data" / "kuberay-v1-spec.schema.json").read_text())


def _manifest_schema(kind: str) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
            },
            "spec": KUBERAY_SCHEMA[kind],
        },
    }


def _quantity(value: str | int | float) -> float:
    """A Kubernetes CPU / GPU quantity ("7", "7500m", 1) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gpu_presets() -> list:
    from compression.config import CONFIG_DIR, load_config

    presets = [load_config(path.stem) for path in sorted(CONFIG_DIR.glob("*.yaml"))]
    return [cfg for cfg in presets if cfg.compute.use_gpu]


def _containers(cluster_spec: dict) -> list[tuple[dict, dict]]:
    """(pod spec, container) for every container of the head and worker groups."""
    templates = [cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec.get("workerGroupSpecs", [])]
    return [(t["spec"], c) for t in templates for c in t["spec"]["containers"]]


def test_kuberay_manifests_match_the_crd_fields_and_share_storage():
    cluster = _load(ROOT / "infra" / "ray" / "kuberay-raycluster.yaml")
    job = _load(ROOT / "infra" / "ray" / "kuberay-rayjob.yaml")
    pvc = _load(ROOT / "infra" / "ray" / "kuberay-storage.yaml")
    jsonschema.validate(cluster, _manifest_schema("RayCluster"))
    jsonschema.validate(job, _manifest_schema("RayJob"))
    # The schemas do catch a misspelt field (KubeRay would ignore it silently), also inside a pod template,
    # and a wrong type.
    broken = json.loads(json.dumps(job))
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _manifest_schema("RayJob"))
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["toleration"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _manifest_schema("RayCluster"))
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _manifest_schema("RayCluster"))

    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec  # the one-shot job runs the same cluster
    ray_minor = re.search(r"ray\[train\]>=(\d+\.\d+)", " ".join(PYPROJECT["project"]["dependencies"])).group(
        1
    )
    assert spec["rayVersion"].startswith(ray_minor + ".")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert (
        len(gpu_groups) == 1
        and gpu_groups[0]["minReplicas"] <= gpu_groups[0]["replicas"] <= gpu_groups[0]["maxReplicas"]
    )
    gpu_resources = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu_resources["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_resources["requests"]["nvidia.com/gpu"] == gpu_resources["limits"]["nvidia.com/gpu"]

    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for pod, container in _containers(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), container["name"]
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        images.add(container["image"])
    assert len(images) == 1

    entrypoint = job["spec"]["entrypoint"]
    assert "prunepipe run --config ssd300_voc --set compute.ray_address=auto" in entrypoint
    for setting in ("compute.storage_path", "workdir", "data.root"):  # everything a node reads or writes is shared
        assert f"--set {setting}=/mnt/shared/" in entrypoint, setting
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The image is the one .github/workflows/image.yml builds and pushes, at the project's version.
    [image] = images
    assert re.fullmatch(r"ghcr\.io/[a-z0-9-]+/prunepipe-cluster:" + re.escape(PYPROJECT["project"]["version"]), image)


def test_the_cluster_manifests_hold_every_gpu_preset():
    """Each GPU preset's workers fit the GPU pods / nodes (per node: CPUs and GPUs of one worker; in all: the
    autoscaler's maximum), checked by the run's own preflight rule; the head takes no worker."""
    from tasks.cluster import Capacity, check_offers

    spec = _load(ROOT / "infra" / "ray" / "kuberay-raycluster.yaml")["spec"]
    groups = []
    for group in spec["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, group["groupName"]  # guaranteed QoS: Ray sees what the pod gets
        resources = {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}
        groups.append((resources, float(group["maxReplicas"])))
        # The pod's memory covers its CPUs' data loaders (4 GiB a CPU) and /dev/shm is mounted for them.
        assert float(limits["memory"].removesuffix("Gi")) >= 4 * resources["CPU"]
        assert "/dev/shm" in {m["mountPath"] for m in container["volumeMounts"]}
    launcher = _load(ROOT / "infra" / "ray" / "cluster.yaml")
    node_types = launcher["available_node_types"]
    launcher_groups = [({k: float(v) for k, v in t["resources"].items()}, float(t["max_workers"]))
                       for name, t in node_types.items() if name != launcher["head_node_type"]]
    head = {"CPU": 0.0}  # both heads: num-cpus 0 / resources CPU 0
    presets = _gpu_presets()
    assert {cfg.name for cfg in presets} >= {"ssd300_voc", "vgg16_cifar"}
    for cfg in presets:
        check_offers(cfg.compute, Capacity(nodes=[head], groups=groups), "kuberay-raycluster.yaml")
        check_offers(cfg.compute, Capacity(nodes=[head], groups=launcher_groups), "cluster.yaml")
    # The check does refuse a preset that asks for more CPUs per worker than a pod has.
    greedy = presets[0].compute.model_copy(update={"cpus_per_worker": groups[0][0]["CPU"] + 1})
    with pytest.raises(Exception, match="no node of the Ray cluster at kuberay-raycluster.yaml has that many CPUs"):
        check_offers(greedy, Capacity(nodes=[head], groups=groups), "kuberay-raycluster.yaml")


def test_the_image_workflow_builds_and_pushes_the_cluster_image():
    workflow = _load(WORKFLOWS / "image.yml")
    triggers = workflow.get("on", workflow.get(True))
    assert {"push", "workflow_dispatch"} <= set(triggers)
    assert workflow["permissions"] == {"contents": "read"}
    job = workflow["jobs"]["cluster-image"]
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    build = next(step for step in job["steps"] if step.get("uses", "").startswith("docker/build-push-action@"))
    assert re.fullmatch(r"docker/build-push-action@[0-9a-f]{40}", build["uses"])
    assert (build["with"]["file"], build["with"]["target"], build["with"]["context"]) == (
        "infra/docker/Dockerfile", "cluster", ".")
    login = next(step for step in job["steps"] if step.get("uses", "").startswith("docker/login-action@"))
    assert login["with"]["registry"] == "ghcr.io"
    # The tags it pushes: ghcr.io/<owner>/prunepipe-cluster:<pyproject version>, what the manifests name.
    script = next(step["run"] for step in job["steps"] if step.get("id") == "names")
    assert 'image="ghcr.io/${OWNER,,}/prunepipe-cluster"' in script and '"${image}:${version}"' in script
    assert 'tomllib.load(open("pyproject.toml", "rb"))["project"]["version"]' in script
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS cluster$", dockerfile, re.MULTILINE)


def test_compose_publishes_only_on_loopback_and_keeps_mlflow_security():
    compose = _load(ROOT / "infra" / "docker" / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"prefect", "mlflow", "ray-head", "runner"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        assert service["build"] == {
            "context": "../..",
            "dockerfile": "infra/docker/Dockerfile",
            "target": "runner",
        }
        env = service["environment"]
        assert env["DO_NOT_TRACK"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0", name
    assert "ports" not in services["ray-head"]  # the GCS has no auth here: never published
    mlflow_args = " ".join(services["mlflow"]["command"])
    assert (
        "--allowed-hosts=mlflow:5000," in mlflow_args and "--disable-security-middleware" not in mlflow_args
    )
    assert {dep: cond["condition"] for dep, cond in services["runner"]["depends_on"].items()} == {
        "prefect": "service_healthy",
        "mlflow": "service_healthy",
        "ray-head": "service_healthy",
    }
    assert (ROOT / services["runner"]["build"]["dockerfile"]).exists()


def test_dockerfile_installs_like_the_makefile_with_pyproject_pins():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    runs = [
        " ".join(shlex.split(line[4:]))
        for line in re.sub(r"\\\n\s*", " ", dockerfile).splitlines()
        if line.startswith("RUN ")
    ]
    torch_line = f"pip install torch=={_pin('torch')} torchvision=={_pin('torchvision')}"
    assert runs.count(torch_line) == 1
    editable = next(i for i, run in enumerate(runs) if run.startswith("pip install -e ."))
    assert runs.index(torch_line) < editable  # pinned pair first, as the Makefile does
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert PYPROJECT["project"]["requires-python"] == f">={python},<3.{int(python.split('.')[1]) + 1}"
    for package in [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]:
        assert f"COPY {package} ./{package}" in dockerfile
    makefile = ROOT / "Makefile"
    if makefile.exists():
        pins = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", makefile.read_text()))
        assert pins == {"torch": _pin("torch"), "torchvision": _pin("torchvision")}


# --------------------------------------------------------------------------------------- workflows


def _tool(name: str) -> str:
    path = BIN_DIR / name
    assert path.exists(), f"{name} is missing: pip install -e '.[dev]'"
    return str(path)


def _run_scripts(workflow: dict) -> list[str]:
    return [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]


def test_workflows_pass_schema_security_and_shell_lint(tmp_path):
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml", "image.yml", "pipeline.yml"]
    schema = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    # zizmor: template injection, unpinned actions, credential persistence, excessive permissions...
    audit = subprocess.run(
        [_tool("zizmor"), "--offline", "--no-progress", str(WORKFLOWS)], capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # Every run: block through shellcheck, as GitHub runs it (bash -e -o pipefail).
    for workflow_file in files:
        for index, script in enumerate(_run_scripts(_load(workflow_file))):
            path = tmp_path / f"{workflow_file.stem}-{index}.sh"
            path.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + script)
            lint = subprocess.run([_tool("shellcheck"), str(path)], capture_output=True, text=True)
            assert lint.returncode == 0, f"{workflow_file.name} run #{index}:\n{lint.stdout}"


def test_workflows_do_what_the_project_needs():
    ci, pipeline = _load(WORKFLOWS / "ci.yml"), _load(WORKFLOWS / "pipeline.yml")
    triggers = ci.get("on", ci.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert set(triggers) == {"push", "pull_request"}
    ci_steps = ci["jobs"]["test"]["steps"]
    assert ci["jobs"]["test"]["container"]["image"].startswith("python:3.11")
    assert any("apt-get install" in s.get("run", "") and "chromium" in s["run"] for s in ci_steps)
    # The README's test command, then the long tiers, as .ci/run runs them.
    assert [s["run"] for s in ci_steps[-3:]] == ["make test", "make test-long", "make test-faults"]
    assert (ROOT / ".ci" / "run").read_text().split("\n")[-4:] == ["make test", "make test-long", "make test-faults", ""]

    triggers = pipeline.get("on", pipeline.get(True))
    assert set(triggers["workflow_dispatch"]["inputs"]) == {"preset", "overrides"}
    assert triggers["schedule"][0]["cron"]
    job = pipeline["jobs"]["run"]
    assert job["env"]["PRESET"].startswith("${{ inputs.preset")
    scripts = _run_scripts(pipeline)
    assert not any("${{" in script for script in scripts)  # inputs only through the environment
    assert any('prunepipe run --config "$PRESET"' in s for s in scripts)
    assert any('prefect deployment run "compress/$PRESET"' in s for s in scripts)
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "runs/"
    for workflow in (ci, pipeline, _load(WORKFLOWS / "image.yml")):
        assert workflow["permissions"] == {"contents": "read"}


def test_the_lint_tools_catch_an_injection(tmp_path):
    """The lint test above could pass by linting nothing; show it fails on a workflow that splices an
    input into a script."""
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on:\n  workflow_dispatch:\n    inputs:\n      preset: {type: string}\npermissions: {}\n"
        "jobs:\n  run:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ inputs.preset }}\n"
    )
    audit = subprocess.run(
        [_tool("zizmor"), "--offline", "--no-progress", str(bad.parent)], capture_output=True, text=True
    )
    assert audit.returncode != 0 and "template-injection" in audit.stdout + audit.stderr
