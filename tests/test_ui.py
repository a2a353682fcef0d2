"""Browser tests: the Prefect UI and the MLflow UI of a real local stack, driven by headless Chromium.

The stack is `prunepipe up`'s (``infra.local.stack.stack_up``: Prefect server, MLflow server on sqlite,
Ray head; free ports, home in tmp, analytics off) and `prunepipe serve` runs as a subprocess, serving
``default``, ``ssd300_voc`` and ``ui_tiny``: the cheapest pipeline there is (32 digit images at 64 px,
ssd_vgg_lite at width 1/8, an untrained base checkpoint instead of pretraining, one phase of two layers,
one epoch of sparsity and of retraining on one Ray worker, no distillation, no model registration).
Playwright drives Debian's Chromium (``/usr/bin/chromium``; ``apt-get install -y chromium``).

Through the real UI: the deployments list; a run started with Run > Quick run > Run, the UI's answer
waited for (its "scheduled" toast, or an error toast that fails the test with the failed API calls), and
followed from the toast (or, once the toast is gone, by the id of the run the click created) to its flow
run page; that page showing Completed, and its checkpoint table artifact; the Custom
run form refusing stages.selection.gamma = 1.5 (the form submits, the server checks the parameter
schema, the form shows the refusal naming the field, and no run is created); the MLflow experiment's
runs table with size_bytes / flops / map_voc07 columns (picked in Columns) and the run's checkpoint runs.
Through the API (plain REST / MlflowClient): waiting for the run to finish while `prunepipe serve` lives,
its states (Scheduled until serve polls for it, Pending, Running, Completed; the UI is checked after),
the ids to open pages by, and the numbers the MLflow table must show. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from compression.checkpoint import save_checkpoint
from compression.jobs import initial_checkpoint
from infra.local.stack import stack_down, stack_env, stack_up

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
TINY = "ui_tiny"
EXPERIMENT = "ui-test"
RUN_TIMEOUT = 900  # seconds for the tiny flow run (about 2 min on an idle 2-core machine, 5 when busy)
UI_ANSWER_TIMEOUT = 300  # seconds for the UI to answer Run with a toast (about 1 s idle, 5 s when busy)
GAMMA_INPUT = ("xpath=//span[contains(@class, 'schema-form-property__label') and starts-with(normalize-space(.), 'Gamma')]"
               "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]//input")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_preset(root: Path, devkit: Path) -> Path:
    cfg = tiny_config(root, devkit, f"name={TINY}", "model.width_mult=0.125", "stages.sparsity.alpha_grid=[1.0]",
                      "stages.selection.gamma=0.9", "stages.selection.min_channels=4", "stages.distill.enabled=false",
                      "stages.phases=[{name: p1, layers: [conv1_1, conv1_2]}]", "tracking.mlflow_uri=null",
                      "tracking.registered_model=null", f"tracking.experiment={EXPERIMENT}", "compute.num_workers=1")
    base = save_checkpoint(initial_checkpoint(cfg), root / "base.safetensors")
    preset = cfg.model_dump(mode="json")
    preset["stages"]["pretrain"]["checkpoint"] = str(base)
    path = root / f"{TINY}.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


@dataclass
class Site:
    prefect: str
    mlflow: str
    deployments: dict[str, str]  # name -> id
    serve: subprocess.Popen
    serve_log: Path
    server_log: Path

    def api(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.prefect}/api{path}", data=data, method="POST" if data else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the test's own server
            return json.loads(response.read())

    def log_tail(self) -> str:
        return self.serve_log.read_text(errors="replace")[-4000:]

    def server_errors(self) -> str:
        """The Prefect server's logged request errors (the last few), or 'none'."""
        lines = self.server_log.read_text(errors="replace").splitlines()
        return " | ".join([line for line in lines if "exception in request" in line or "OperationalError" in line][-6:]) or "none"


@pytest.fixture(scope="module")
def site(tmp_path_factory, digits_devkit):
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    ports = {"prefect_port": free_port(), "mlflow_port": free_port(), "ray_port": free_port(),
             "ray_dashboard_port": free_port()}
    failure: list[BaseException] = []

    def start_stack() -> None:
        try:
            stack_up(home, **ports)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            failure.append(exc)

    stack_thread = threading.Thread(target=start_stack)
    # The stack's Prefect server logs the 503s a busy SQLite database causes (the failure messages here show them).
    stack_thread.start()  # the servers start while the preset is written here
    try:
        preset = tiny_preset(root, digits_devkit)
    finally:
        stack_thread.join()
    if failure:
        raise failure[0]
    env = stack_env(home)
    print(f"\nstack up with the tiny preset written: {time.perf_counter() - started:.1f}s")
    serve_log = root / "serve.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    child_env.update(PREFECT_HOME=str(root / "prefect-client"), PREFECT_RUNNER_POLL_FREQUENCY="2",
                     PYTHONPATH=str(ROOT), COLUMNS="200")
    command = [sys.executable, "-m", "flows.cli", "serve", "--home", str(home), "--preset", "default",
               "--preset", "ssd300_voc", "--preset", str(preset), "--cron", "0 0 1 1 *"]  # no nightly run mid-test
    with serve_log.open("w") as log:
        serve = subprocess.Popen(command, cwd=root, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    site = Site(env["PREFECT_API_URL"].removesuffix("/api"), env["MLFLOW_TRACKING_URI"], {}, serve, serve_log,
                home / "logs" / "prefect.log")
    try:
        while len(site.deployments) < 3:
            assert serve.poll() is None, f"prunepipe serve exited: {site.log_tail()}"
            assert time.perf_counter() - started < 600, f"deployments never registered: {site.log_tail()}"
            time.sleep(1)
            site.deployments = {d["name"]: d["id"] for d in site.api("/deployments/filter", {})}
        print(f"deployments registered: {time.perf_counter() - started:.1f}s")
        yield site
    finally:
        os.killpg(serve.pid, signal.SIGTERM)  # the runner pauses its schedules and exits
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        stack_down(home)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium)")
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    yield page
    context.close()


def open_run_menu(page, site: Site, deployment: str):
    page.goto(f"{site.prefect}/deployments")
    page.get_by_role("link", name=deployment, exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()


def flow_runs_of(site: Site, deployment: str) -> list[dict]:
    return site.api("/flow_runs/filter", {"deployments": {"id": {"any_": [site.deployments[deployment]]}}})


def record_failed_requests(page) -> list[str]:
    """What the page's API calls answered with an error (or never answered): the UI shows only "Oops"."""
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(f"{request.method} {request.url}: {request.failure}"))
    page.on("response", lambda response: failed.append(f"{response.request.method} {response.url}: HTTP {response.status}")
            if response.status >= 500 else None)
    return failed


def click_run_and_wait_for_the_answer(site: Site, page, dialog, failed: list[str]):
    """Click the Run dialog's Run and wait, however long a busy machine takes, for the UI's answer: the
    "<run> scheduled to start now" toast (the server created the run; the dialog closes) or an error toast
    (an API call failed: the dialog stays open and nothing is created). Returns the scheduled toast."""
    scheduled = page.locator(".toast-flow-run-create")  # "<run> scheduled to start now  [View run]"
    error = page.locator(".p-toast-container__toast").filter(has=page.locator(".p-toast__icon--error"))
    errors_before = error.count()
    clicked = time.perf_counter()
    dialog.get_by_role("button", name="Run", exact=True).click()
    while not scheduled.count():
        if error.count() > errors_before:
            raise AssertionError(f"the UI answered Run with an error toast {' '.join(error.last.inner_text().split())!r}; "
                                 f"failed API calls: {failed or 'none seen'}; server errors: {site.server_errors()}")
        assert time.perf_counter() - clicked < UI_ANSWER_TIMEOUT, (
            f"the UI showed neither a scheduled nor an error toast {UI_ANSWER_TIMEOUT}s after Run; "
            f"failed API calls: {failed or 'none seen'}; server errors: {site.server_errors()}")
        page.wait_for_timeout(200)
    print(f"\nthe UI scheduled the run {time.perf_counter() - clicked:.1f}s after Run")
    return scheduled


def new_flow_run(site: Site, before: set[str]) -> str:
    """The id of the one flow run of the tiny deployment that is not in ``before`` (the UI has just said
    that the server created it)."""
    created = [run["id"] for run in flow_runs_of(site, TINY) if run["id"] not in before]
    assert len(created) == 1, f"one click created {len(created)} flow runs"
    return created[0]


@pytest.fixture(scope="module")
def quick_run(site, browser) -> dict:
    """A run of compress/ui_tiny started from the UI: Run > Quick run > Run, then its flow run page."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)
    failed = record_failed_requests(page)
    try:
        open_run_menu(page, site, TINY)
        page.get_by_text("Quick run").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Validate parameters").wait_for()  # the parameter form has rendered
        before = {run["id"] for run in flow_runs_of(site, TINY)}
        scheduled = click_run_and_wait_for_the_answer(site, page, dialog, failed)
        run_id = new_flow_run(site, before)
        dialog.wait_for(state="hidden")
        # The toast's View run leads to the run; it lasts 5 s, so on a busy machine it may be gone by now.
        try:
            scheduled.last.get_by_role("button", name="View run").click(timeout=2_000)
        except PlaywrightTimeout:
            page.goto(f"{site.prefect}/runs/flow-run/{run_id}")
        page.wait_for_url(re.compile(rf"/runs/flow-run/{run_id}$"))
        page.get_by_text(TINY, exact=True).first.wait_for()  # the deployment, named on the flow run page
    except Exception:
        page.screenshot(path=SCREENSHOTS / "prefect_quick_run_failed.png")
        raise
    page.close()
    return {"id": run_id, "started": time.perf_counter()}


def test_the_deployments_page_lists_every_served_preset(site, page, quick_run):
    page.goto(f"{site.prefect}/deployments")
    for name in ("default", "ssd300_voc", TINY):
        page.get_by_role("link", name=name, exact=True).wait_for()
    assert page.get_by_text("At 12:00 AM on day 1 of the month, only in January").count() == 3
    page.screenshot(path=SCREENSHOTS / "prefect_deployments.png", full_page=True)
    run = site.api(f"/flow_runs/{quick_run['id']}")
    assert run["deployment_id"] == site.deployments[TINY]
    assert run["parameters"]["config"]["name"] == TINY  # the preset's values, unedited


def test_the_run_form_refuses_an_out_of_range_gamma(site, page, quick_run):
    before = len(flow_runs_of(site, TINY))
    open_run_menu(page, site, TINY)
    page.get_by_text("Custom run").click()
    gamma = page.locator(GAMMA_INPUT)
    assert gamma.input_value() == "0.9"  # the preset's value, pre-filled
    gamma.fill("1.5")
    page.get_by_role("button", name="Submit").click()
    page.get_by_text("Validation failed for field 'config.stages.selection.gamma'. "
                     "Failure reason: 1.5 is greater than the maximum of 1").first.wait_for()
    page.screenshot(path=SCREENSHOTS / "prefect_run_form_gamma_refused.png")
    assert "/run" in page.url  # still on the form
    assert len(flow_runs_of(site, TINY)) == before  # nothing was started


def state_times(states: list[dict]) -> list[tuple[str, float]]:
    """Each state's name and when it began, in seconds after the first."""
    times = [datetime.fromisoformat(state["timestamp"]) for state in states]
    return [(state["name"], (began - times[0]).total_seconds()) for state, began in zip(states, times, strict=True)]


@pytest.fixture(scope="module")
def finished_run(site, quick_run) -> dict:
    """The run once it has ended, waited for through the API while `prunepipe serve` lives: Scheduled until
    the serve process polls for it, then Pending (its subprocess starts), Running, and an end state."""
    while True:
        run = site.api(f"/flow_runs/{quick_run['id']}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert site.serve.poll() is None, f"prunepipe serve exited with the run {run['state_name']}: {site.log_tail()}"
        assert time.perf_counter() - quick_run["started"] < RUN_TIMEOUT, f"run still {run['state_name']}"
        time.sleep(3)
    states = sorted(site.api(f"/flow_run_states/?flow_run_id={run['id']}"), key=lambda state: state["timestamp"])
    print(f"\nflow run from the UI: {run['state_name']} after {time.perf_counter() - quick_run['started']:.0f}s "
          f"(flow {run['total_run_time']:.0f}s; states {', '.join(f'{n} +{t:.0f}s' for n, t in state_times(states))})")
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{site.log_tail()}"
    kinds = [state["type"] for state in states]
    # Each state once, in order (a busy machine may mark the scheduled run Late, a SCHEDULED state, first).
    assert [kind for kind, _ in itertools.groupby(kinds)] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    return run


def test_the_run_completes_and_its_checkpoint_table_shows(site, page, finished_run):
    page.goto(f"{site.prefect}/runs/flow-run/{finished_run['id']}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.screenshot(path=SCREENSHOTS / "prefect_flow_run_completed.png")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("compress-ui-tiny", exact=True).click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    page.locator("table th").filter(has_text="checkpoint").first.wait_for()
    headers = [h.strip() for h in page.locator("table th").all_inner_texts()]
    for column in ("checkpoint", "stage", "params", "size_bytes", "flops", "map_voc07", "params_ratio", "flops_ratio"):
        assert column in headers, (column, headers)
    table = page.locator("table").first.inner_text()
    for checkpoint in ("00_pretrain", "01_sparsity_p1", "03_prune_p1", "04_retrain_p1"):
        assert checkpoint in table
    page.screenshot(path=SCREENSHOTS / "prefect_checkpoint_table.png", full_page=True)


def test_mlflow_shows_the_experiment_with_size_flops_and_map_of_each_checkpoint(site, page, finished_run):
    from mlflow import MlflowClient

    client = MlflowClient(site.mlflow)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{finished_run['id']}'")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["pretrain", "prune-p1", "retrain-p1", "sparsity-p1"]

    page.set_viewport_size({"width": 1920, "height": 1000})
    page.goto(f"{site.mlflow}/#/experiments")
    page.get_by_role("link", name=EXPERIMENT, exact=True).wait_for()
    page.goto(f"{site.mlflow}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text(parent.info.run_name, exact=True).wait_for()
    assistant = page.get_by_role("button", name=re.compile("close", re.I))
    if assistant.count():  # MLflow 3's assistant panel takes a third of the width
        assistant.first.click()
    page.get_by_role("button", name="Columns", exact=True).click()
    for metric in ("size_bytes", "flops", "map_voc07"):
        page.get_by_placeholder("Search columns").fill(metric)
        node = page.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(f"^{metric}$"))
        node.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")
    page.get_by_role("row").filter(has_text=parent.info.run_name).get_by_role("button").first.click()  # expand
    for child in children:
        page.get_by_text(child.info.run_name, exact=True).wait_for()
    headers = page.get_by_role("columnheader").all_inner_texts()
    assert {"size_bytes", "flops", "map_voc07"} <= set(headers)
    cells = page.locator(".ag-center-cols-container").inner_text()
    for child in children:
        for metric in ("size_bytes", "flops"):
            assert str(int(child.data.metrics[metric])) in cells, (child.info.run_name, metric)
    page.screenshot(path=SCREENSHOTS / "mlflow_runs.png")
