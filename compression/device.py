"""The device a run trains on, and the precision and memory format it uses there.

``compute.amp_bf16`` and ``compute.channels_last`` are ``"auto"`` by default: on where the device runs
them natively, off where they would be emulated. bf16 autocast on a CPU without AVX-512-BF16 or AMX
(an AVX2-only EPYC, say) runs through oneDNN's emulation, about ten times slower than float32, so
``auto`` turns it off there. Everything here is resolved on the machine that trains (a Ray worker, not
the driver, which may have no GPU); the decision and its reason travel back with the fit's result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compression.config import ComputeConfig
from compression.errors import StageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capabilities:
    """What a device runs natively, with the words that explain it."""

    device_type: str
    bf16: bool
    bf16_why: str  # the feature that runs bf16 ("AVX-512-BF16"), or why there is none
    channels_last: bool
    channels_last_why: str


@dataclass(frozen=True)
class ResolvedCompute:
    """The precision and memory format a run uses, and why (``reason``: one line)."""

    amp_bf16: bool
    channels_last: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"precision: {self.reason}"


def default_device(use_gpu: bool = False) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise StageError("compute.use_gpu is true but no CUDA GPU is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_capabilities(features: Mapping[str, Any], onednn: bool) -> Capabilities:
    """A CPU's record from its feature flags (``torch.cpu.get_capabilities()``) and whether oneDNN is built in."""
    native = [name for key, name in (("avx512_bf16", "AVX-512-BF16"), ("amx_bf16", "AMX-BF16"), ("bf16", "Arm BF16"))
              if features.get(key)]
    if not onednn:
        return Capabilities("cpu", False, "no oneDNN in this torch build", False, "no oneDNN in this torch build")
    bf16_why = "+".join(native) if native else "CPU without AVX-512-BF16/AMX: bf16 would be emulated"
    return Capabilities("cpu", bool(native), bf16_why, True, "oneDNN")


def cuda_capabilities(name: str, compute_capability: tuple[int, int], native_bf16: bool) -> Capabilities:
    """A CUDA GPU's record (``native_bf16``: ``torch.cuda.is_bf16_supported(including_emulation=False)``)."""
    major, minor = compute_capability
    arch = f"{name}, sm_{major}{minor}"
    bf16_why = arch if native_bf16 else f"{arch} has no native bf16"
    return Capabilities("cuda", native_bf16, bf16_why, True, "cuDNN NHWC kernels")


def device_capabilities(device: torch.device | str) -> Capabilities:
    """The record of the device this process trains on."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cuda_capabilities(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                                 torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return cpu_capabilities(torch.cpu.get_capabilities(), torch.backends.mkldnn.is_available())
    return Capabilities(device.type, False, f"{device.type}: not measured", False, f"{device.type}: not measured")


def choose_compute(amp_bf16: bool | str, channels_last: bool | str, caps: Capabilities) -> ResolvedCompute:
    """``auto`` settings decided by ``caps``; ``true``/``false`` kept as set."""
    if amp_bf16 == "auto":
        bf16 = caps.bf16
        bf16_text = f"bf16 autocast {'on' if bf16 else 'off'} ({caps.bf16_why})"
    else:
        bf16 = bool(amp_bf16)
        note = "" if caps.bf16 or not bf16 else f"; {caps.bf16_why}, slower than float32"
        bf16_text = f"bf16 autocast {'on' if bf16 else 'off'} (compute.amp_bf16={str(bf16).lower()}{note})"
    if channels_last == "auto":
        nhwc = caps.channels_last
        nhwc_text = f"channels-last {'on' if nhwc else 'off'} ({caps.channels_last_why})"
    else:
        nhwc = bool(channels_last)
        nhwc_text = f"channels-last {'on' if nhwc else 'off'} (compute.channels_last={str(nhwc).lower()})"
    return ResolvedCompute(bf16, nhwc, f"{bf16_text} / {nhwc_text}")


def resolve_compute(compute: ComputeConfig, device: torch.device | str) -> ResolvedCompute:
    """What ``compute.amp_bf16`` / ``compute.channels_last`` mean on ``device`` (call it where training runs)."""
    caps = device_capabilities(device)
    resolved = choose_compute(compute.amp_bf16, compute.channels_last, caps)
    if resolved.amp_bf16 and not caps.bf16:
        log.warning("compute.amp_bf16=true: %s, so bf16 runs slower than float32; set it to auto or false",
                    caps.bf16_why)
    return resolved


def precision_line(compute: ComputeConfig) -> str:
    """``precision: ...`` for this machine's training device (the CLI prints it in a run's first lines).

    With ``compute.use_gpu`` and no GPU here (a driver in front of a GPU cluster) the workers decide.
    """
    if compute.use_gpu and not torch.cuda.is_available():
        return "precision: decided on each GPU worker (no GPU on this machine)"
    return resolve_compute(compute, default_device(compute.use_gpu)).describe()
