"""Fixtures shared by the test modules: one torch thread, the tiny pipeline config, the digits devkit it
trains on, a Prefect test server and an MLflow store, each isolated from the user's own."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.env import apply_env_defaults

# Prefect reads PREFECT_HOME when it is first imported: a session never touches the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
apply_env_defaults()

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from compression.config import PipelineConfig

# Tiny test models train in float32. The presets' fast CPU path (bf16 autocast with channels-last tensors)
# gives a NaN loss within two steps for 64-px inputs at width 1/16 (and in L1 training at width 1/8,
# batch 16). Each switch alone trains fine, so this looks like a oneDNN kernel issue; train_model's NaN
# message says so.
FLOAT32 = ["compute.amp_bf16=false", "compute.channels_last=false"]
# The digits devkit the tiny pipeline trains on: 64-px canvases, enough to train and to validate once.
TINY_DEVKIT_IMAGES = {"train": 32, "val": 16, "test": 8}


def tiny_overrides(root: Path, devkit: Path, *extra: str) -> list[str]:
    """Overrides of the ``default`` preset for the cheapest real pipeline: ssd_vgg_lite at width 1/16 on
    64-px digits, one epoch per stage, one phase of two layers pruned by the seed method, float32, no retries; run outputs and a
    sqlite MLflow store under ``root``. ``extra`` come last and win."""
    return [
        "name=tiny", f"workdir={root / 'runs'}", f"tracking.mlflow_uri=sqlite:///{root / 'mlflow.db'}",
        f"data.root={devkit}", "data.builtin=null", "data.batch_size=8", "data.eval_batch_size=8",
        "model.width_mult=0.0625", "model.image_size=64", *FLOAT32,
        "stages.pretrain.epochs=1", "stages.pretrain.warmup_epochs=0", "stages.sparsity.epochs=1",
        "stages.sparsity.alpha_grid=[3.0]", "stages.selection.min_channels=2", "stages.retrain.epochs=1",
        "stages.distill.epochs=1", "stages.selection.criterion=seed",
        "stages.phases=[{name: p1, layers: [conv3_1, conv3_2]}]",
        "compute.max_failures=0", *extra,
    ]


def tiny_config(root: Path, devkit: Path, *extra: str) -> PipelineConfig:
    """The ``default`` preset with :func:`tiny_overrides`."""
    from compression.config import load_config

    return load_config("default", tiny_overrides(root, devkit, *extra))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (the small CPU models here gain nothing from more; other work
    on the 2 cores keeps its share), restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_devkit(tmp_path_factory) -> Path:
    """The tiny pipeline's digits VOCdevkit (seed 0), written once per session; tests only read it."""
    from compression.data.digits import write_digits_voc

    return write_digits_voc(tmp_path_factory.mktemp("digits"), seed=0, image_size=64, num_images=TINY_DEVKIT_IMAGES)


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """A Prefect test server (sqlite under the session's PREFECT_HOME) for the session; its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=None):
        print(f"\nPrefect test server: {time.perf_counter() - started:.1f}s")
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """A sqlite MLflow tracking store of the test module's own."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
