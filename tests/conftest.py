"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (the small CPU models here gain nothing from more; other work
    on the 2 cores keeps its share), restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tiny test models train in float32. The presets' fast CPU path (bf16 autocast with channels-last tensors)
# gives a NaN loss within two steps for 64-px inputs at width 1/16 (and in L1 training at width 1/8,
# batch 16). Each switch alone trains fine, so this looks like a oneDNN kernel issue; train_model's NaN
# message says so.
FLOAT32 = ["compute.amp_bf16=false", "compute.channels_last=false"]
