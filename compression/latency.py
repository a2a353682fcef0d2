"""A latency model of the deployment target: per-layer lookup tables measured on the device (NetAdapt, HALP).

The deployment graph (``export.deployment_network``: BatchNorm folded) is cut into *sites*: every conv with
the ops it alone feeds up to the next conv (ReLU, max-pooling). A site's time depends on its input channels
(the width of the prunable conv that produces them) and its output channels (its own width, when it is
prunable; an SSD head conv keeps its outputs). For every site ``measure_latency_table`` times the site alone
on the target, in the deployment runtime and layout, at the configured batch size and threads:

- ``ms``: a coarse grid of (input, output) widths, about 1/4, 1/2, 3/4 and all of each width rounded to
  multiples of ``grid_step``, interpolated bilinearly in between;
- ``fine_ms``: every multiple of ``grid_step`` up to the output width, the width itself and the powers of
  two below one step, at the full input width. It corrects the coarse grid between its points (the
  staircase of vector widths and blocked layouts) and names the site's *fast widths*: those that run faster than every wider one. A width between
  two of these is predicted at the wider one's time, input and output alike.

The network's time is predicted from the sum of its sites' times through whole networks timed on the
target (``calibration``): the model, and copies cut to a quarter and to an eighth of every prunable width.
Between two of them the prediction is the line through both (``knots``: sites, network), a slope and an
offset. The offset holds what the sites do not (the input normalisation, SSD's L2Norm, pooling that feeds
two branches, the head's reshapes); the slope how the sites, timed alone, differ from the same ops inside a
network. With one anchor (offset = network - sites at full width) that difference, a few percent of the
full network, landed whole on a pruned network of a quarter its time: beside a training process the sites
summed to 4% over the network (19.7 against 18.9 ms), and the table predicted the 0.75-pruned network 25%
too fast; the line through two networks, 4%. A line extrapolated past its narrower anchor doubles that
anchor's error at half its width: with two anchors, a quarter anchor timed ~10% slow put an eighth-width
network 22% over its time, and in a test run under load a 0.875-pruned network was predicted 32% over;
the eighth-width anchor holds that end too. The offset may be negative: each site timed alone pays its own
session call and layout reorders, which a network pays once, and on a CPU with AVX2 only that overhead
outweighed what the sites miss (sites 105.7 and 31.1 ms for networks of 86.9 and 21.4 ms: a line 6 ms below
the origin, through both networks). Below the narrowest anchor the lowest line goes on, unless it would put
the narrowest network the table can express (every prunable layer at its narrowest timed width) at no time
or less; then that stretch runs to the origin (``calibration_knots``).

ONNX Runtime on x86 runs convs in one of two layouts (``export.ORT_LAYOUTS``): blocked NCHWc, channels
padded to the vector block, or plain NCHW. The layout is part of the target (of the fingerprint): a table
holds one. With ``export.onnxruntime_layout: auto`` a model is measured in both, a network is predicted in
whichever its tables say is faster (``fastest_prediction``), and that is the layout it is deployed in. The
two tables are measured together, each timing taken in both layouts in turn (``measure_latency_tables``):
a prediction in one set against a base in the other is a ratio across tables, and load that differs
between two measurements would land on it whole.

Post-processing is not in the table: what it costs follows how many boxes clear the score threshold, i.e.
the trained model and the images, not the widths (``export.deployment_latency`` times it end to end).
Runtimes: ``onnxruntime`` on the CPU (graph optimisations on, ``intra_op_num_threads`` = threads),
``torch`` on a GPU (channels-last, CUDA-synchronised timing).

Every time is the fastest of a few warmed runs, and every site is timed in two passes over the network,
the faster kept (``_SITE_PASSES``). With one thread on the CPU it is the calling thread's CPU
time, not wall time: both runtimes compute in the calling thread then, and CPU time does not count the
time another process holds the core. Wall time on a busy 2-core machine doubled the whole network's time
(18 -> 35 ms) while single layers, shorter than a scheduler slice, kept theirs, and the table then
predicted a pruned network 3.6x too slow; CPU time kept the prediction within 10% under the same load.
With several threads (and on a GPU) the work runs on other threads, so wall time is the measure there,
and each whole network is timed in five sessions among the sites, the fastest kept, with a warning when the
timings disagree.

Tables are saved as JSON keyed by a device fingerprint (CPU model, runtime, threads, batch, torch and
ONNX Runtime versions; the GPU's name on a GPU): ``load_or_measure`` reuses a table of the same fingerprint
and model whose widths cover the model's. No Prefect, Ray or MLflow here.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
import json
import math
import platform
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.errors import ConfigError, ModelError
from compression.export import network_onnx
from compression.metrics import fastest_in_passes, timed_runs_ms, timing_clock

__all__ = ["LatencyTable", "device_fingerprint", "fastest_prediction", "load_or_measure", "measure_latency_table",
           "measure_latency_tables", "measure_network_ms",
           "model_widths", "network_speedup", "timing_clock"]

TABLE_FORMAT = "prunepipe-latency/1"
RUNTIMES = ("onnxruntime", "torch")
# Ops a site takes along after its conv: they read the conv's output alone and cost in proportion to it.
_FOLLOWERS = ("Relu", "MaxPool")
_COARSE_FRACTIONS = (0.25, 0.5, 0.75)
_NETWORK_RUNS = 20  # at least, for the whole network (see measure_latency_table)
_NETWORK_DRIFT = 0.10  # the whole network's timings disagreeing by more say the machine was busy
_ANCHOR_SESSIONS = 5  # ONNX Runtime sessions each whole network is timed in (see measure_latency_table)
# The calibration's narrower networks: every prunable layer keeps a quarter, and an eighth, of its filters.
_ANCHOR_CUTS = (0.75, 0.875)
# Every site is timed in this many passes over the network, each point's fastest kept. Load from outside
# the process (a VM's host, a sibling hyperthread) slows the calling thread's CPU clock too, in bursts of
# seconds. With one pass, in a test run whose whole networks agreed within 10%, the plain table predicted a
# 0.875-pruned network 22% over its time (within 5% quietly): its narrow sites had been timed in a burst.
# A burst rarely spans the same point in two passes a whole pass apart.
_SITE_PASSES = 2


# --------------------------------------------------------------------------------------------
# The device


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(runtime: str, batch_size: int, threads: int, device: str = "cpu",
                       layout: str = "nchwc") -> dict[str, Any]:
    """What a table's times depend on besides the model: the device, the runtime, its versions and (ONNX
    Runtime) layout, batch and threads. Two tables with equal fingerprints were measured on equal targets."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"latency runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    fingerprint: dict[str, Any] = {"runtime": runtime, "batch_size": int(batch_size), "threads": int(threads),
                                   "clock": timing_clock(threads, device), "cpu": _cpu_name(),
                                   "torch": torch.__version__}
    if runtime == "onnxruntime":
        import onnxruntime

        from compression.export import ORT_LAYOUTS

        if layout not in ORT_LAYOUTS:
            raise ConfigError(f"latency: ONNX Runtime layout {layout!r} is not one of {', '.join(ORT_LAYOUTS)}")
        fingerprint["onnxruntime"] = onnxruntime.__version__
        fingerprint["layout"] = layout
    if device.startswith("cuda"):
        fingerprint["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return fingerprint


def _fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(fingerprint), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Sites of the deployment graph


@dataclass
class Site:
    """One conv of the deployment graph and the ops it alone feeds (``followers``, ONNX nodes)."""

    name: str
    in_channels: int
    out_channels: int
    input_hw: tuple[int, int]
    conv: Any  # onnx.NodeProto
    followers: list[Any]
    producer: str | None  # the prunable conv whose output channels this site reads
    prunable: bool


def _module_path(node_name: str, modules: set[str]) -> str | None:
    parts = node_name.strip("/").split("/")[:-1]
    for candidate in (".".join(parts), parts[-1] if parts else ""):
        if candidate in modules:
            return candidate
    return None


def _sites(model: nn.Module, model_name: str, graph_model: Any) -> list[Site]:
    from compression.models import prunable_layers
    from compression.pruning import build_dependency_graph, consumers_of, resolve_layers

    dg = build_dependency_graph(model)
    prunable = dict(resolve_layers(model, model_name, prunable_layers(model_name, model), dg=dg))
    producer_of: dict[str, str] = {}
    for name, layer in prunable.items():
        for consumer, _module, kind in consumers_of(dg, layer):
            if kind in ("conv", "head", "depthwise"):
                producer_of[consumer] = name
    graph = graph_model.graph
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in [*graph.input, *graph.value_info, *graph.output]}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    outputs = {o.name for o in graph.output}
    modules = {name for name, _ in model.named_modules()}
    sites = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        name = _module_path(node.name, modules)
        if name is None:
            raise ModelError(f"latency: ONNX conv {node.name!r} matches no module of the model")
        followers, value = [], node.output[0]
        while value not in outputs and len(readers.get(value, [])) == 1 and readers[value][0].op_type in _FOLLOWERS:
            followers.append(readers[value][0])
            value = readers[value][0].output[0]
        batch, cin, height, width = shapes[node.input[0]]
        module = model.get_submodule(name)
        sites.append(Site(name, int(cin), int(module.out_channels), (int(height), int(width)), node, followers,
                          producer_of.get(name), name in prunable))
    return sites


def model_widths(model: nn.Module, model_name: str) -> dict[str, int]:
    """Output channels of every prunable layer of ``model`` (module path -> width)."""
    from compression.models import prunable_layers
    from compression.pruning import layer_channels, resolve_layers

    return {name: layer_channels(layer)
            for name, layer in resolve_layers(model, model_name, prunable_layers(model_name, model))}


# --------------------------------------------------------------------------------------------
# Timing


def _fastest_ms(run: Callable[[], Any], warmup: int, runs: int, sync: Callable[[], None] | None = None,
                clock: str = "wall") -> float:
    """The fastest of ``runs`` warmed runs (ms) on ``clock``. On a shared machine interference only ever adds
    time, and it comes in bursts that last several runs (5.0 ms runs next to 7.4 ms ones for one model and
    session), which can move a median by 40%; the fastest run is the layer's own cost."""
    return float(min(timed_runs_ms(run, warmup=warmup, runs=runs, clock=clock, sync=sync)))


def _site_graph(site: Site, batch_size: int, cin: int, cout: int) -> Any:
    """A one-site ONNX model: the site's conv at (cin, cout) with random weights, then its followers."""
    import onnx
    from onnx import TensorProto, helper

    groups = next((a.i for a in site.conv.attribute if a.name == "group"), 1)
    if groups != 1:
        raise ModelError(f"latency: grouped conv {site.name!r} is not supported")
    kernel = next(list(a.ints) for a in site.conv.attribute if a.name == "kernel_shape")
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [cout, cin, *kernel],
                                rng.standard_normal((cout, cin, *kernel)).astype(np.float32).tobytes(), raw=True)
    bias = helper.make_tensor("b", TensorProto.FLOAT, [cout], np.zeros(cout, np.float32).tobytes(), raw=True)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y0"])
    conv.attribute.extend(site.conv.attribute)
    nodes, value = [conv], "y0"
    for index, follower in enumerate(site.followers):
        node = helper.make_node(follower.op_type, [value], [f"y{index + 1}"])
        node.attribute.extend(follower.attribute)
        nodes.append(node)
        value = f"y{index + 1}"
    graph = helper.make_graph(nodes, "site", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch_size, cin, *site.input_hw])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)],
                              initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    return onnx.shape_inference.infer_shapes(model)


class _Timer:
    """Times sites and networks on the target: ONNX Runtime on the CPU, torch on a GPU."""

    def __init__(self, runtime: str, batch_size: int, threads: int, warmup: int, runs: int, device: str = "cpu",
                 layout: str = "nchwc"):
        self.runtime, self.batch_size, self.threads, self.layout = runtime, batch_size, threads, layout
        self.warmup, self.runs, self.device = warmup, runs, torch.device(device)
        self.clock = timing_clock(threads, device)

    def _onnx_ms(self, model_bytes: bytes, input_shape: list[int]) -> float:
        from compression.export import onnx_session

        session = onnx_session(model_bytes, self.threads, self.layout)
        feed = {session.get_inputs()[0].name: np.random.default_rng(1).random(input_shape, dtype=np.float32)}
        return _fastest_ms(lambda: session.run(None, feed), self.warmup, self.runs, clock=self.clock)

    def _torch_ms(self, module: nn.Module, input_shape: list[int]) -> float:
        module = module.to(self.device).eval().to(memory_format=torch.channels_last)
        batch = torch.rand(input_shape, device=self.device).contiguous(memory_format=torch.channels_last)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        with torch.inference_mode():
            return _fastest_ms(lambda: module(batch), self.warmup, self.runs, sync, self.clock)

    def site_ms(self, site: Site, cin: int, cout: int) -> float:
        shape = [self.batch_size, cin, *site.input_hw]
        if self.runtime == "onnxruntime":
            return self._onnx_ms(_site_graph(site, self.batch_size, cin, cout).SerializeToString(), shape)
        return self._torch_ms(_torch_site(site, cin, cout), shape)

    def network_ms(self, model: nn.Module, sessions: int = 1) -> float:
        """The fastest time over ``sessions`` fresh sessions (or modules) of ``model``'s deployment network."""
        from compression.export import deployment_network
        from compression.models import model_input_size

        shape = [self.batch_size, 3, *model_input_size(model)]
        if self.runtime == "onnxruntime":
            graph = network_onnx(model, self.batch_size).SerializeToString()
            return min(self._onnx_ms(graph, shape) for _ in range(sessions))
        return min(self._torch_ms(deployment_network(copy.deepcopy(model).to(self.device)), shape)
                   for _ in range(sessions))


def _attr(node: Any, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints) if attribute.ints else attribute.i
    return default


def _torch_site(site: Site, cin: int, cout: int) -> nn.Module:
    """The site as torch modules (for the torch runtime): its conv at (cin, cout), then its followers."""
    pads = _attr(site.conv, "pads", [0, 0, 0, 0])
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, _attr(site.conv, "kernel_shape", [1, 1]),
                                         stride=_attr(site.conv, "strides", [1, 1]), padding=tuple(pads[:2]),
                                         dilation=_attr(site.conv, "dilations", [1, 1]))]
    for follower in site.followers:
        if follower.op_type == "Relu":
            layers.append(nn.ReLU())
        else:
            follower_pads = _attr(follower, "pads", [0, 0, 0, 0])
            layers.append(nn.MaxPool2d(_attr(follower, "kernel_shape", [1, 1]), _attr(follower, "strides", [1, 1]),
                                       padding=tuple(follower_pads[:2]), ceil_mode=bool(_attr(follower, "ceil_mode", 0))))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# The table


def _grid(width: int, step: int) -> list[int]:
    """Coarse widths: about 1/4, 1/2, 3/4 of ``width`` (multiples of ``step`` where that is no coarser) and it."""
    points = {width}
    for fraction in _COARSE_FRACTIONS:
        value = width * fraction
        points.add(max(1, int(round(value / step)) * step if value >= step else int(round(value))))
    return sorted(p for p in points if p <= width)


def _fine(width: int, step: int) -> list[int]:
    # The powers of two below a step too: whether a layer narrower than one vector block runs any faster is
    # the table's to say. Without them a 0.875-pruned network (layers of 1, 2 and 4 filters, rounded up to
    # the narrowest timed width) was predicted 20-29% slower than it ran.
    narrow = {2**k for k in range(max(step, 1).bit_length()) if 2**k < step}
    return sorted({width} | {w for w in narrow if w < width} | set(range(step, width, step)) | set(_grid(width, step)))


def _interp(points: list[int], values: list[float], x: float) -> float:
    """Piecewise linear through the points; below the first, the line through the first two (never below 0);
    above the last, the last value."""
    if len(points) > 1 and x < points[0]:
        slope = (values[1] - values[0]) / (points[1] - points[0])
        return max(0.0, values[0] + slope * (x - points[0]))
    return float(np.interp(x, points, values))


def _round_up(timed: list[int], width: int) -> int:
    """The smallest timed width at least ``width`` (the widest when none is)."""
    index = bisect.bisect_left(timed, width)
    return timed[min(index, len(timed) - 1)]


class LatencyTable:
    """A measured table (``measure_latency_table``'s JSON) and the predictions made from it."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.sites: dict[str, dict[str, Any]] = data["sites"]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.data["fingerprint"]

    def site_ms(self, name: str, cin: float, cout: float) -> float:
        """Bilinear on the coarse grid, scaled by the fine profile's staircase along the output width."""
        site = self.sites[name]
        cin_grid, cout_grid, ms = site["cin_grid"], site["cout_grid"], site["ms"]
        by_cin = [_interp(cout_grid, row, cout) for row in ms]
        coarse = _interp(cin_grid, by_cin, cin)
        if not site["prunable"]:
            return coarse
        full_cin = by_cin[-1]
        fine = _interp(site["fine_widths"], site["fine_ms"], cout)
        return coarse * (fine / full_cin if full_cin > 0 else 1.0)

    def widths_of(self, widths: Mapping[str, int], name: str) -> tuple[int, int]:
        """Site ``name``'s (input, output) widths with the prunable layers at ``widths``. In ONNX Runtime's
        blocked NCHWc layout (and in tables of other runtimes) each is rounded up to the next width the
        table timed for its layer (``fine_widths``): channels are padded to the block, so a width
        between two timed ones runs at the wider one's time; interpolating put a model of odd widths (7, 17,
        25, ...) 18% under its measured time, rounding up 7% over. The plain NCHW layout pads nothing, and
        there the widths are taken as they are (the sites interpolate): rounding up put a model of widths 5,
        10, 20, 41 and 82 35% over its measured time, interpolating within 1%."""
        site = self.sites[name]
        cin, cout = site["in_channels"], site["out_channels"]
        snap = (lambda timed, width: width) if self.layout == "nchw" else _round_up
        if site["producer"]:
            cin = snap(self.sites[site["producer"]]["fine_widths"], widths.get(site["producer"], cin))
        if site["prunable"]:
            cout = snap(site["fine_widths"], widths.get(name, cout))
        return cin, cout

    def sites_ms(self, widths: Mapping[str, int]) -> float:
        """The sum of the sites' timed times with the prunable layers at ``widths`` (others: full width)."""
        return sum(self.site_ms(name, *self.widths_of(widths, name)) for name in self.sites)

    def network_ms(self, widths: Mapping[str, int]) -> float:
        """Predicted network time (ms per batch) with the prunable layers at ``widths`` (others: full width)."""
        return self.predict_from_sites(self.sites_ms(widths))

    def predict_from_sites(self, sites_ms: float) -> float:
        """The network time (ms per batch) of a network whose sites sum to ``sites_ms``: on the calibration's
        knots (``calibration_knots``)."""
        if "knots" not in self.data:  # measured before the knots: one line, scale x sites + fixed_ms
            return float(self.data.get("scale", 1.0)) * sites_ms + self.data["fixed_ms"]
        return _on_knots(self.data["knots"], sites_ms)

    def layer_ms(self, widths: Mapping[str, int], layer: str, width: int) -> float:
        """The time of the sites ``layer``'s width enters (its own, its readers'), as timed alone, with
        ``layer`` at ``width``. Selection compares these only within one network (what each move saves), so
        the calibration's slope there, a factor common to all, is left out."""
        changed = {**widths, layer: width}
        return sum(self.site_ms(name, *self.widths_of(changed, name))
                   for name, site in self.sites.items() if name == layer or site["producer"] == layer)

    def fast_widths(self, layer: str) -> list[int]:
        """The widths of ``layer`` the table shows the device runs faster than every wider one, ascending: the
        layer's own site and the sites that read it (``layer_ms``), the other layers at the table's widths."""
        widths = self.sites[layer]["fine_widths"]
        base = self.data.get("model", {}).get("widths", {})
        times = [self.layer_ms(base, layer, width) for width in widths]
        fast, best = [], math.inf
        for width, ms in sorted(zip(widths, times, strict=True), reverse=True):
            if ms < best or width == widths[-1]:
                fast.append(width)
                best = min(best, ms)
        return sorted(fast)

    def round_to(self, layer: str) -> int:
        """The width step of ``layer``'s fast widths (their greatest common divisor): its ``round_to``."""
        return math.gcd(*self.fast_widths(layer))

    def covers(self, model_name: str, input_size: tuple[int, int], widths: Mapping[str, int]) -> bool:
        model = self.data["model"]
        return (model["name"] == model_name and tuple(model["input_size"]) == tuple(input_size)
                and set(model["widths"]) == set(widths)
                and all(widths[name] <= model["widths"][name] for name in widths))

    @property
    def layout(self) -> str | None:
        return self.data.get("fingerprint", {}).get("layout")  # a hand-built table may have no fingerprint


def fastest_prediction(tables: Mapping[str, LatencyTable], widths: Mapping[str, int]) -> tuple[str, float]:
    """(layout, ms): the layout whose table predicts the network at ``widths`` fastest, and that time. A
    deployment runs each network in its fastest layout (``export.fastest_layout``), so that is its time."""
    return min(((layout, table.network_ms(widths)) for layout, table in tables.items()), key=lambda item: item[1])


def _cut_copy(model: nn.Module, model_name: str, cut: float) -> nn.Module:
    """A copy of ``model`` with every prunable layer's ``cut`` of its filters removed (the largest by L1 norm
    kept, at least one): a calibration network (``_ANCHOR_CUTS``)."""
    from compression.criteria import rank_filters, select_by_ratio
    from compression.models import prunable_layers
    from compression.pruning import build_dependency_graph, prune_filters, resolve_layers

    copied = copy.deepcopy(model)
    dg = build_dependency_graph(copied)
    layers = resolve_layers(copied, model_name, prunable_layers(model_name, copied), dg=dg)
    return prune_filters(copied, select_by_ratio(rank_filters("l1_norm", copied, dg, layers), cut), dg=dg)


def _on_knots(knots: list[list[float]], sites_ms: float) -> float:
    """The network time at ``sites_ms`` on the lines between the knots (sites, network), ascending; the end
    lines go on past the end knots."""
    index = min(max(bisect.bisect_left([k[0] for k in knots], sites_ms), 1), len(knots) - 1)
    (s0, n0), (s1, n1) = knots[index - 1], knots[index]
    return n0 + (n1 - n0) * (sites_ms - s0) / (s1 - s0)


def calibration_knots(points: list[Mapping[str, float]], narrowest_sites_ms: float = 0.0) -> list[list[float]]:
    """The knots ``[sites_ms, network_ms]`` a table predicts networks on (``_on_knots``): the calibration
    networks ``points`` (``{"sites_ms", "network_ms"}``), ascending. Below the narrowest network the line
    through the two narrowest goes on, unless it would put the narrowest network the table can express
    (``narrowest_sites_ms`` of sites) at no time or less: that stretch then runs to the origin. A network
    with more sites timed no slower than one with fewer says the timings were noisy: then one line through
    the origin, least squares over all the networks, with a warning."""
    ordered = sorted(points, key=lambda p: p["sites_ms"])
    knots = [[float(p["sites_ms"]), float(p["network_ms"])] for p in ordered]
    if all(s1 > s0 and n1 > n0 for (s0, n0), (s1, n1) in itertools.pairwise(knots)):
        if _on_knots(knots, narrowest_sites_ms) <= 0:
            knots.insert(0, [0.0, 0.0])
        return knots
    timings = ", ".join(f"{n:.2f} ms (sites {s:.2f})" for s, n in knots)
    warnings.warn(f"latency table: the calibration networks took {timings}: a wider network no slower than a "
                  "narrower one, the timings were noisy; fitted through the origin instead", stacklevel=3)
    scale = sum(s * n for s, n in knots) / sum(s**2 for s, _ in knots)
    return [[0.0, 0.0], [knots[-1][0], scale * knots[-1][0]]]


def _site_entry(timer: _Timer, site: Site, grid_step: int) -> dict[str, Any]:
    """One site's table entry: its coarse grid and, when prunable, its fine profile, timed on ``timer``."""
    cin_grid = _grid(site.in_channels, grid_step) if site.producer else [site.in_channels]
    cout_grid = _grid(site.out_channels, grid_step) if site.prunable else [site.out_channels]
    ms = [[timer.site_ms(site, cin, cout) for cout in cout_grid] for cin in cin_grid]
    entry = {"in_channels": site.in_channels, "out_channels": site.out_channels, "producer": site.producer,
             "prunable": site.prunable, "input_hw": list(site.input_hw),
             "ops": [site.conv.op_type, *(f.op_type for f in site.followers)],
             "cin_grid": cin_grid, "cout_grid": cout_grid, "ms": ms}
    if site.prunable:
        fine = _fine(site.out_channels, grid_step)
        known = dict(zip(cout_grid, ms[-1], strict=True))
        entry["fine_widths"] = fine
        entry["fine_ms"] = [known[w] if w in known else timer.site_ms(site, site.in_channels, w) for w in fine]
    return entry


def _faster_entry(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """A site's entry with each timed point the faster of two passes' (see ``_SITE_PASSES``)."""
    entry = {**first, "ms": [[min(a, b) for a, b in zip(row_a, row_b, strict=True)]
                             for row_a, row_b in zip(first["ms"], second["ms"], strict=True)]}
    if "fine_ms" in first:
        entry["fine_ms"] = [min(a, b) for a, b in zip(first["fine_ms"], second["fine_ms"], strict=True)]
    return entry


def _table_layouts(runtime: str, layouts: tuple[str, ...], device: str) -> dict[str, str]:
    """Each table's key and the layout it is timed in: one table per ONNX Runtime layout (repeats dropped);
    the torch runtime's one table is keyed by its device and has no layout of its own."""
    if runtime == "onnxruntime":
        return {layout: layout for layout in layouts}
    return {device: "nchwc"}


def measure_latency_tables(model: nn.Module, model_name: str, *, layouts: tuple[str, ...] = ("nchwc",),
                           runtime: str = "onnxruntime", batch_size: int = 32, threads: int = 1, grid_step: int = 8,
                           warmup: int = 2, runs: int = 5, device: str = "cpu") -> dict[str, LatencyTable]:
    """Measure ``model``'s latency tables on this machine (see the module docstring), one per ONNX Runtime
    ``layouts`` (``export.ORT_LAYOUTS``; the torch runtime's one table is keyed by ``device``); ``model`` is
    unchanged.

    The layouts' tables are measured together, every site and anchor timed in each layout in turn, so that
    they share one time base: a network is predicted in one layout's table and set against its base
    predicted in the other's (``fastest_prediction``), and a difference in the machine's state between two
    measurements then lands whole on the ratio. Measured one after the other on a VM whose host load came
    and went, the plain-layout table ran 9% slow against the blocked one, and a 0.875-pruned network's
    speedup was predicted 16% short. Tables measured together share a ``time_base`` token."""
    if runtime == "torch" and not device.startswith("cuda"):
        raise ConfigError("latency: the torch runtime is the GPU's; on the CPU the deployment runs ONNX Runtime")
    layout_of = _table_layouts(runtime, layouts, device)
    keys = tuple(layout_of)
    started = time.perf_counter()
    model = copy.deepcopy(model).cpu().float().eval()
    fingerprints = {key: device_fingerprint(runtime, batch_size, threads, device, layout_of[key]) for key in keys}
    timers = {key: _Timer(runtime, batch_size, threads, warmup, runs, device, layout_of[key]) for key in keys}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sites = _sites(model, model_name, network_onnx(model, batch_size))
        # The whole networks anchor the lines every prediction is read from, and a line doubles an
        # anchor's error at half that anchor's width (see the module docstring). Some ONNX Runtime sessions of a
        # network run slow for their whole life (on an AVX2-only CPU, quietly: 6.6 / 10.2 / 6.7 / 6.7 /
        # 10.3 ms for five sessions of one network), and another process's load slows some more: each
        # anchor is timed in _ANCHOR_SESSIONS sessions spread over the sites' measurement, and the fastest is
        # kept (a median was slow whenever three of five were). Timings further apart than _NETWORK_DRIFT
        # are reported.
        network_timers = {key: _Timer(runtime, batch_size, threads, warmup, max(runs, _NETWORK_RUNS), device,
                                      layout_of[key]) for key in keys}
        anchors = [model, *(_cut_copy(model, model_name, cut) for cut in _ANCHOR_CUTS)]
        network_times: dict[str, list[list[float]]] = {key: [[] for _ in anchors] for key in keys}

        def time_anchors() -> None:
            for key in keys:
                for times, anchor in zip(network_times[key], anchors, strict=True):
                    times.append(network_timers[key].network_ms(anchor))

        time_anchors()
        steps = _SITE_PASSES * len(sites)
        between = {steps * k // (_ANCHOR_SESSIONS - 1) for k in range(1, _ANCHOR_SESSIONS - 1)}
        table_sites: dict[str, dict[str, Any]] = {key: {} for key in keys}
        for step in range(steps):
            if step in between:
                time_anchors()
            site = sites[step % len(sites)]
            for key in keys:
                entry = _site_entry(timers[key], site, grid_step)
                kept = table_sites[key].get(site.name)
                table_sites[key][site.name] = entry if kept is None else _faster_entry(kept, entry)
        time_anchors()
        time_base = uuid.uuid4().hex[:12]
        tables = {}
        for key in keys:
            tables[key] = _fit_table(model, model_name, fingerprints[key], table_sites[key], anchors,
                                     network_times[key], warmup, runs, time_base)
    finally:
        torch.set_num_threads(previous)
    seconds = time.perf_counter() - started
    for table in tables.values():
        table.data["measured_seconds"] = seconds
    return tables


def _fit_table(model: nn.Module, model_name: str, fingerprint: dict[str, Any], table_sites: dict[str, Any],
               anchors: list[nn.Module], network_times: list[list[float]], warmup: int, runs: int,
               time_base: str) -> LatencyTable:
    """The table of one layout from its timed sites and anchors: the knots through the anchors."""
    from compression.models import model_input_size

    drift = max(max(times) / min(times) - 1 for times in network_times)
    if drift > _NETWORK_DRIFT:
        timings = "; ".join(" / ".join(f"{t:.2f}" for t in times) for times in network_times)
        layout = f" ({fingerprint['layout']} layout)" if "layout" in fingerprint else ""
        warnings.warn(f"latency: the whole {model_name} and its quarter- and eighth-width copies{layout} took "
                      f"{timings} ms in {len(network_times[0])} timings each ({fingerprint['clock']} clock): the machine was "
                      f"busy or its sessions differed, and this table's predictions may be off by {drift:.0%}",
                      stacklevel=3)
    widths = {name: entry["out_channels"] for name, entry in table_sites.items() if entry["prunable"]}
    data = {"format": TABLE_FORMAT, "fingerprint": fingerprint,
            "model": {"name": model_name, "input_size": list(model_input_size(model)), "widths": widths},
            "sites": table_sites, "network_drift": drift, "time_base": time_base,
            "timing": {"warmup": warmup, "runs": runs, "clock": fingerprint["clock"]}}
    sites = LatencyTable(data)  # its sites alone: the line through the two networks is fitted next
    calibration = []
    for anchor, times in zip(anchors, network_times, strict=True):
        anchor_widths = model_widths(anchor, model_name)
        calibration.append({"widths": anchor_widths, "network_ms": float(min(times)),
                            "sites_ms": sites.sites_ms(anchor_widths)})
    data["network_ms"] = calibration[0]["network_ms"]
    data["calibration"] = calibration
    narrowest = sites.sites_ms({name: entry["fine_widths"][0] for name, entry in table_sites.items() if entry["prunable"]})
    data["knots"] = calibration_knots(calibration, narrowest_sites_ms=narrowest)
    return LatencyTable(data)


def measure_latency_table(model: nn.Module, model_name: str, *, runtime: str = "onnxruntime", batch_size: int = 32,
                          threads: int = 1, grid_step: int = 8, warmup: int = 2, runs: int = 5,
                          device: str = "cpu", layout: str = "nchwc") -> LatencyTable:
    """``model``'s latency table in one ONNX Runtime ``layout`` (or the torch runtime's): see
    ``measure_latency_tables``."""
    tables = measure_latency_tables(model, model_name, layouts=(layout,), runtime=runtime, batch_size=batch_size,
                                    threads=threads, grid_step=grid_step, warmup=warmup, runs=runs, device=device)
    return next(iter(tables.values()))


def measure_network_ms(model: nn.Module, *, runtime: str = "onnxruntime", batch_size: int = 32, threads: int = 1,
                       warmup: int = 2, runs: int = 5, device: str = "cpu", layout: str = "nchwc",
                       sessions: int = _ANCHOR_SESSIONS) -> float:
    """The deployment network's fastest time (ms per batch) on this machine, as the table measures its
    anchors: the fastest over ``sessions`` fresh sessions. One session alone can run slow for its whole life
    (10.1 ms for a network whose other sessions ran it in 6.1 on an AVX2-only CPU under load), and a
    prediction checked against it then looks 40% off when the table is right."""
    if sessions < 1:
        raise ValueError(f"timing needs at least one session, got {sessions}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timer = _Timer(runtime, batch_size, threads, warmup, runs, device, layout)
        return timer.network_ms(copy.deepcopy(model).cpu().float().eval(), sessions)
    finally:
        torch.set_num_threads(previous)


def network_speedup(base: nn.Module, model: nn.Module, *, batch_size: int = 32, threads: int = 1, rounds: int = 5,
                    runs: int = 3, layouts: tuple[str, ...] | None = None, passes: int = 3) -> dict[str, Any]:
    """``base``'s deployment network time over ``model``'s in ONNX Runtime on the CPU, each in the fastest of
    ``layouts`` (default: every ``export.ORT_LAYOUTS``), all timed in alternation (``rounds`` times ``runs``
    runs each, the fastest kept), so that load which comes and goes weighs on all alike. Timed minutes
    apart, under different load (a budget's base alone, its trials two at a time), two identical 3x networks
    measured 2.51x and 2.58x, and every trial fell 14-22% short of the table's prediction.

    The alternation is repeated in ``passes`` fresh sets of sessions (``metrics.fastest_in_passes``) and
    each network's fastest pass kept: in one pass a dense network ran 20% over its usual time while its
    pruned copy ran at its own, and the ratio read 4.1 where it is 3.4; and some sessions run slow for
    their whole life (1.5x on an AVX2-only CPU), so that a median over three passes was slow whenever two
    of a network's sessions were. Interference only adds time, as for the runs within a pass
    (``_fastest_ms``). Passes disagreeing by more than ``_NETWORK_DRIFT`` are warned of. Returns
    ``{"ratio", "base_ms", "model_ms", "base_layout", "model_layout", "pass_ratios"}``."""
    from compression.export import ORT_LAYOUTS, onnx_session
    from compression.models import model_input_size

    # Each network at its own input size (a model retrained at a lower resolution runs on smaller images).
    feeds = [{"images": np.random.default_rng(1).random([batch_size, 3, *model_input_size(m)], dtype=np.float32)}
             for m in (base, model)]
    graphs = [network_onnx(m, batch_size).SerializeToString() for m in (base, model)]

    def open_sessions() -> dict[tuple[int, str], Callable[[], object]]:
        sessions = {(index, layout): onnx_session(graph, threads, layout)
                    for index, graph in enumerate(graphs) for layout in (layouts or ORT_LAYOUTS)}
        return {key: (lambda s=session, f=feeds[key[0]]: s.run(None, f)) for key, session in sessions.items()}

    times = fastest_in_passes(open_sessions, passes=passes, threads=threads, rounds=rounds, runs=runs)
    fastest = {key: float(min(values)) for key, values in times.items()}
    (base_key, base_ms), (model_key, model_ms) = (min(((k, t) for k, t in fastest.items() if k[0] == index),
                                                      key=lambda item: item[1]) for index in (0, 1))
    pass_ratios = [b / m for b, m in zip(times[base_key], times[model_key], strict=True)]
    if max(pass_ratios) / min(pass_ratios) - 1 > _NETWORK_DRIFT:
        warnings.warn(f"latency: the speedup read {' / '.join(f'{r:.2f}' for r in pass_ratios)}x in {passes} "
                      f"passes: the machine was busy; each network's fastest pass is kept", stacklevel=2)
    return {"ratio": base_ms / model_ms, "base_ms": base_ms, "model_ms": model_ms, "base_layout": base_key[1],
            "model_layout": model_key[1], "pass_ratios": pass_ratios}


def load_or_measure(path: Path | str, model: nn.Module, model_name: str, *, layouts: tuple[str, ...] = ("nchwc",),
                    runtime: str = "onnxruntime", batch_size: int = 32, threads: int = 1, grid_step: int = 8,
                    warmup: int = 2, runs: int = 5, device: str = "cpu") -> dict[str, LatencyTable]:
    """The tables in ``path`` for this device, one per ONNX Runtime ``layouts`` (the torch runtime's one,
    keyed by ``device``), when they cover ``model`` (same model and input size, widths no wider than the
    table's) and, for several layouts, were measured together (one ``time_base``, see
    ``measure_latency_tables``); otherwise all are measured now, together, and added to ``path`` (written
    atomically)."""
    from compression.files import write_json_atomic
    from compression.models import model_input_size

    path = Path(path)
    layout_of = _table_layouts(runtime, layouts, device)
    keys = tuple(layout_of)
    fingerprint_keys = {key: _fingerprint_key(device_fingerprint(runtime, batch_size, threads, device, layout))
                        for key, layout in layout_of.items()}
    stored: dict[str, Any] = {"format": TABLE_FORMAT, "tables": {}}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: is not a latency table file ({exc})") from None
        if stored.get("format") != TABLE_FORMAT or not isinstance(stored.get("tables"), dict):
            raise ConfigError(f"{path}: is not a {TABLE_FORMAT} latency table file")
    widths = model_widths(model, model_name)
    covering = {key: [table for table in map(LatencyTable, stored["tables"].get(fingerprint_keys[key], []))
                      if table.covers(model_name, model_input_size(model), widths)] for key in keys}
    if len(keys) == 1 and covering[keys[0]]:
        return {keys[0]: covering[keys[0]][0]}
    for first in covering[keys[0]]:
        base = first.data.get("time_base")
        together = {key: next((t for t in covering[key] if base and t.data.get("time_base") == base), None)
                    for key in keys}
        if all(together.values()):
            return together  # type: ignore[return-value]
    tables = measure_latency_tables(model, model_name, layouts=keys, runtime=runtime, batch_size=batch_size,
                                    threads=threads, grid_step=grid_step, warmup=warmup, runs=runs, device=device)
    for key, table in tables.items():
        stored["tables"].setdefault(fingerprint_keys[key], []).append(table.data)
    write_json_atomic(path, stored)
    return tables
