"""compute.amp_bf16 / compute.channels_last: "auto" resolved from what the training device runs natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compression.config import ComputeConfig, load_config
from compression.device import (
    choose_compute,
    cpu_capabilities,
    cuda_capabilities,
    device_capabilities,
    precision_line,
    resolve_compute,
)
from compression.errors import ConfigError


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_auto_on_this_cpu_follows_its_cpuinfo_flags():
    flags = _cpuinfo_flags()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    resolved = resolve_compute(ComputeConfig(), "cpu")

    assert resolved.amp_bf16 is native
    assert resolved.channels_last is torch.backends.mkldnn.is_available()
    expected = "AVX-512-BF16" if "avx512_bf16" in flags else "AMX-BF16" if native else "bf16 would be emulated"
    assert expected in resolved.reason
    assert device_capabilities("cpu").bf16 is native


def test_an_avx2_cpu_without_bf16_trains_in_float32_on_auto():
    epyc_avx2 = cpu_capabilities({"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}, onednn=True)
    resolved = choose_compute("auto", "auto", epyc_avx2)

    assert (resolved.amp_bf16, resolved.channels_last) == (False, True)
    assert resolved.describe() == ("precision: bf16 autocast off (CPU without AVX-512-BF16/AMX: bf16 would be "
                                   "emulated) / channels-last on (oneDNN)")
    sapphire_rapids = cpu_capabilities({"avx512_f": True, "avx512_bf16": True, "amx_bf16": True}, onednn=True)
    assert choose_compute("auto", "auto", sapphire_rapids).reason.startswith("bf16 autocast on (AVX-512-BF16+AMX-BF16)")
    no_onednn = cpu_capabilities({"avx512_bf16": True}, onednn=False)
    without = choose_compute("auto", "auto", no_onednn)
    assert (without.amp_bf16, without.channels_last) == (False, False)


def test_explicit_true_and_false_override_auto():
    for caps in (cpu_capabilities({"avx512_bf16": True}, True), cpu_capabilities({"avx2": True}, True)):
        off = choose_compute(False, False, caps)
        on = choose_compute(True, True, caps)
        assert (off.amp_bf16, off.channels_last, on.amp_bf16, on.channels_last) == (False, False, True, True)
        assert "compute.amp_bf16=false" in off.reason and "compute.channels_last=true" in on.reason
    # Forcing bf16 where it is emulated is allowed, and the reason says what it costs.
    assert "slower than float32" in choose_compute(True, "auto", cpu_capabilities({"avx2": True}, True)).reason


def test_gpu_records_decide_like_the_cpu_ones():
    h200 = cuda_capabilities("NVIDIA H200", (9, 0), native_bf16=True)
    v100 = cuda_capabilities("Tesla V100-SXM2-16GB", (7, 0), native_bf16=False)

    assert choose_compute("auto", "auto", h200).describe() == (
        "precision: bf16 autocast on (NVIDIA H200, sm_90) / channels-last on (cuDNN NHWC kernels)")
    volta = choose_compute("auto", "auto", v100)
    assert (volta.amp_bf16, volta.channels_last) == (False, True)
    assert "sm_70 has no native bf16" in volta.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of a machine without a GPU")
def test_the_precision_line_for_the_cli_describes_this_machine():
    line = precision_line(load_config("default").compute)
    assert line.startswith("precision: bf16 autocast ")
    assert " / channels-last " in line and "\n" not in line
    assert precision_line(ComputeConfig(amp_bf16=False, channels_last=False)) == (
        "precision: bf16 autocast off (compute.amp_bf16=false) / channels-last off (compute.channels_last=false)")
    assert "no GPU on this machine" in precision_line(ComputeConfig(use_gpu=True))


def test_the_config_takes_auto_true_and_false_and_names_a_bad_value():
    assert ComputeConfig().amp_bf16 == "auto" and ComputeConfig().channels_last == "auto"
    for preset in ("default", "digits_voc_thorough", "ssd300_voc"):
        compute = load_config(preset).compute
        assert (compute.amp_bf16, compute.channels_last) == ("auto", "auto"), preset
    cfg = load_config("default", ["compute.amp_bf16=false", "compute.channels_last=true"])
    assert (cfg.compute.amp_bf16, cfg.compute.channels_last) == (False, True)
    assert load_config("default", ["compute.amp_bf16=auto"]).compute.amp_bf16 == "auto"
    with pytest.raises(ConfigError, match="compute.amp_bf16") as err:
        load_config("default", ["compute.amp_bf16=fast"])
    assert "\n" not in str(err.value)
