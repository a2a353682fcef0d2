"""`prunepipe serve`'s deployments, registered on a real Prefect server (test harness) and read back.

The deployments are the ones `serve` hands to ``prefect.serve`` (``flows.serve.to_deployments``),
registered with ``RunnerDeployment.apply`` as the runner does; `tests/test_ui.py` runs the whole
`prunepipe serve` process behind the UI. Here: schedules (active for a CPU preset, inactive for a GPU
one), the parameter schema with the config's bounds, the preset as the default parameter, the server
refusing an out-of-range value with a message naming the field, the CLI refusing a bad preset value or
a missing server in one line before anything is registered, and prefect.yaml (the work-pool route)
declaring the same deployments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError

from compression.config import load_config
from flows.serve import NIGHTLY_CRON, deployment_parameters, plan_deployments, preset_names, to_deployments

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def registered(prefect_server):
    """Every preset's deployment (what `prunepipe serve` registers by default), read back from the server."""
    planned = plan_deployments()
    ids = {d.name: d.apply() for d in to_deployments(planned)}
    with get_client(sync_client=True) as client:
        return {name: client.read_deployment(ids[name]) for name in ids}, planned


@pytest.mark.slow
def test_every_preset_becomes_a_compress_deployment_with_a_nightly_cron(registered):
    deployments, planned = registered
    assert sorted(deployments) == preset_names() and {"default", "ssd300_voc"} <= set(deployments)
    assert [p.full_name for p in planned] == [f"compress/{name}" for name in preset_names()]
    for plan in planned:
        deployment = deployments[plan.name]
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == NIGHTLY_CRON and schedule.schedule.timezone == "UTC"
        # Switched off for the presets that need a GPU (ssd300_vgg16, compute.use_gpu), on for the others.
        assert schedule.active is not (plan.config.compute.use_gpu or plan.config.model.name == "ssd300_vgg16")
        assert deployment.entrypoint == "flows.compress.compress"
        assert deployment.enforce_parameter_schema
        assert deployment.tags == ["prunepipe", plan.config.model.name]
    assert deployments["default"].schedules[0].active and not deployments["ssd300_voc"].schedules[0].active


@pytest.mark.slow
def test_the_parameter_is_the_whole_config_defaulting_to_the_preset_with_its_bounds(registered):
    deployments, _ = registered
    default = deployments["default"]
    assert default.parameters == {"config": load_config("default").model_dump(mode="json")}
    assert default.version == load_config("default").config_hash()
    schema = default.parameter_openapi_schema
    assert schema["required"] == ["config"] and list(schema["properties"]) == ["config"]
    gamma = schema["definitions"]["SelectionConfig"]["properties"]["gamma"]
    assert (gamma["exclusiveMinimum"], gamma["maximum"]) == (0, 1)
    epochs = schema["definitions"]["RetrainConfig"]["properties"]["epochs"]
    assert (epochs["minimum"], epochs["maximum"]) == (0, 10_000)
    assert schema["definitions"]["ModelConfig"]["properties"]["name"]["enum"] == [
        "ssd300_vgg16", "ssd_vgg_lite", "vgg16_cifar"]


@pytest.mark.slow
def test_the_server_refuses_an_out_of_range_value_and_names_the_field(registered):
    deployments, _ = registered
    default = deployments["default"]
    bad = deployment_parameters("default", ["stages.selection.gamma=0.5"])
    bad["config"]["stages"]["selection"]["gamma"] = 1.5  # what an edited form or API call may send
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(default.id, parameters=bad)
        detail = refused.value.response.json()["detail"]
        assert detail == ("Error creating flow run: Validation failed for field 'config.stages.selection.gamma'. "
                          "Failure reason: 1.5 is greater than the maximum of 1")
        # The pipeline workflow's parameters (preset + overrides) are accepted as they are.
        good = deployment_parameters("default", ["stages.retrain.epochs=3"])
        run = client.create_flow_run_from_deployment(default.id, parameters=good)
        assert run.parameters["config"]["stages"]["retrain"]["epochs"] == 3
        client.delete_flow_run(run.id)


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


def test_serve_refuses_a_bad_value_or_a_missing_server_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    no_server = cli("serve", "--home", str(tmp_path / "home"), env=env, cwd=tmp_path)
    assert no_server.returncode == 2 and no_server.stderr.count("\n") == 1
    assert "no Prefect server: no stack recorded under" in no_server.stderr and "prunepipe up" in no_server.stderr

    closed = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing listens on port 9
    bad = cli("serve", "--home", str(tmp_path / "home"), "--set", "stages.selection.gamma=1.5", env=closed,
              cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "key 'stages.selection.gamma': Input should be less than or equal to 1" in bad.stderr
    down = cli("serve", "--home", str(tmp_path / "home"), "--preset", "default", env=closed, cwd=tmp_path)
    assert down.returncode == 2 and down.stderr.count("\n") == 1
    assert "Prefect API http://127.0.0.1:9/api does not answer" in down.stderr


def test_params_for_a_scripted_run_come_from_the_preset_and_overrides(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flows.serve", "params", "default", "stages.retrain.epochs=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    params = json.loads(result.stdout)
    assert params == {"config": load_config("default", ["stages.retrain.epochs=3"]).model_dump(mode="json")}
    bad = subprocess.run([sys.executable, "-m", "flows.serve", "params", "default", "stages.retrain.epochs=-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "stages.retrain.epochs" in bad.stderr and bad.stdout == ""


def test_prefect_yaml_declares_the_served_deployments_for_work_pools():
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    planned = {p.name: p for p in plan_deployments()}  # every preset in compression/configs/
    declared = {d["name"]: d for d in project["deployments"]}
    assert sorted(declared) == sorted(preset_names()) == sorted(planned)
    for name, deployment in declared.items():
        assert deployment["entrypoint"] == "flows/compress.py:compress"
        [schedule] = deployment["schedules"]
        assert (schedule["cron"], schedule["timezone"]) == (NIGHTLY_CRON, "UTC")
        assert schedule["active"] is planned[name].schedule_active
        heavy = not planned[name].schedule_active
        assert deployment["work_pool"]["name"] == ("prunepipe-gpu" if heavy else "prunepipe-cpu")
        assert ("image" in deployment["work_pool"]["job_variables"]) is heavy  # the GPU pool runs the image
        assert deployment["tags"] == ["prunepipe", planned[name].config.model.name]


def test_prefect_yaml_pull_steps_deliver_the_deployed_commit(tmp_path, monkeypatch):
    """The pull steps, run by Prefect's own step runner, clone the repository at the deployed commit and work
    from that clone: a worker runs the code it was deployed with."""
    import asyncio
    import re

    from prefect.deployments.steps.core import run_steps

    source = tmp_path / "upstream" / "prunepipe"
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    (source / "flows").mkdir()
    (source / "flows" / "compress.py").write_text("deployed = 1\n")
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "deployed"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (source / "flows" / "compress.py").write_text("deployed = 2\n")  # a later commit must not be what runs
    subprocess.run([*git, "commit", "-q", "-am", "later"], check=True)

    values = {"PRUNEPIPE_REPOSITORY": source.as_uri(), "PRUNEPIPE_COMMIT": commit}
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    # `prefect deploy` fills {{ $VAR }} from the deploying shell's environment.
    filled = json.loads(re.sub(r"\{\{ \$(\w+) \}\}", lambda m: values[m[1]], json.dumps(pull)))
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.chdir(worker)
    outputs = asyncio.run(run_steps(filled, print_function=lambda *args, **kwargs: None))
    clone = Path(outputs["directory"]).resolve()
    assert Path.cwd() == clone and clone.parent == worker
    assert (clone / "flows" / "compress.py").read_text() == "deployed = 1\n"
