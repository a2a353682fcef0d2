"""Benchmark: torchvision's stock SSD path vs compression/ssd_fast.py's batched path.

Runs on a bare GPU machine with only PyTorch, torchvision and torch-pruning installed (it imports nothing
from the project but compression/ssd_fast.py). For SSD300-VGG16 (21 classes, random weights) on a
synthetic batch of 300x300 images with 1-5 random boxes each it measures, for the dense model and a copy
with 50% of every backbone/extra conv's channels pruned (torch-pruning, head convs ignored):

- training images/s: stock ``model(images, targets)`` vs ``ssd_forward_train``, each + backward + SGD
  step, and backbone+head fwd+bwd alone;
- inference images/s: stock ``model.eval()(images)`` vs ``ssd_detect`` (matrix NMS and one
  batched_nms call), and backbone+head forward alone;
- the FLOPs ratio of the two networks (torch.utils.flop_counter) next to their speed ratios, and the
  share of each step spent in the network.

    python bench/gpu.py --json out.json                               # H100/H200: bf16, channels_last
    python bench/gpu.py --device cpu --batch 2 --steps 2 --json smoke.json    # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import ssd300_vgg16

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.ssd_fast import (  # noqa: E402  (needs the repo root on sys.path)
    prepare_model,
    preprocess_batch,
    run_network,
    ssd_detect,
    ssd_forward_train,
)

IMAGE_SIZE = 300


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed iterations (default 5 GPU, 10 with --compile, 0 CPU)",
    )
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    parser.add_argument("--compile", action="store_true", help="nn.Module.compile backbone and head")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare stock and batched results in float32 on this device first",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = args.device.type == "cuda"
    if args.channels_last is None:
        args.channels_last = args.device.type == "cuda"
    if args.warmup is None:
        # CPU runs are smoke tests (seconds per step on a shared CPU), not measurements.
        args.warmup = (10 if args.compile else 5) if args.device.type == "cuda" else 0
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - began) / steps


def synthetic_batch(batch: int, num_classes: int, device: torch.device, generator: torch.Generator):
    images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(1, 6, (1,), generator=generator))
        top_left = torch.rand(count, 2, generator=generator) * (IMAGE_SIZE - 20)
        size = 8 + torch.rand(count, 2, generator=generator) * (IMAGE_SIZE - 8)
        bottom_right = torch.minimum(top_left + size, torch.tensor(float(IMAGE_SIZE)))
        targets.append(
            {
                "boxes": torch.cat([top_left, bottom_right], dim=1).to(device),
                "labels": torch.randint(1, num_classes, (count,), generator=generator).to(device),
            }
        )
    return images, targets


class Network(nn.Module):
    """Backbone + head of an SSD as one module, for torch-pruning's tracing and the FLOP counter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.head(list(self.backbone(x).values()))
        return outputs["bbox_regression"], outputs["cls_logits"]


def prune_channels(model: nn.Module, ratio: float, device: torch.device) -> nn.Module:
    """Uniform magnitude pruning of every backbone/extra conv; the head's output channels are kept."""
    pruned = copy.deepcopy(model)
    network = Network(pruned)
    head_convs = [m for m in pruned.head.modules() if isinstance(m, nn.Conv2d)]
    pruner = tp.pruner.MagnitudePruner(
        network,
        torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=head_convs,
        # conv4_3's L2-norm rescale weight, one value per channel
        unwrapped_parameters=[(pruned.backbone.scale_weight, 0)],
    )
    pruner.step()
    return pruned


def network_flops(model: nn.Module, device: torch.device) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        Network(model)(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    return counter.get_total_flops()


def check_equivalence(model: nn.Module, images: torch.Tensor, targets: list[dict]) -> dict:
    """float32 stock vs batched results on this device (same weights, same batch)."""
    two = min(2, images.shape[0])
    model.train()
    stock = model(list(images[:two]), targets[:two])
    ours = ssd_forward_train(model, images[:two], targets[:two])
    loss_rel_diff = {
        name: abs(ours[name].item() - stock[name].item()) / max(abs(stock[name].item()), 1e-12)
        for name in stock
    }
    model.eval()
    with torch.no_grad():
        stock_detections = model(list(images[:two]))
    reproduced = {}
    for nms in ("matrix", "batched_nms"):
        fractions = []
        for a, b in zip(stock_detections, ssd_detect(model, images[:two], nms=nms), strict=True):
            fractions.append(
                len(_detection_keys(a) & _detection_keys(b)) / max(1, len(a["scores"]), len(b["scores"]))
            )
        reproduced[nms] = min(fractions)
    # Below 1 only where scores tie exactly (see compression/ssd_fast.py's docstring).
    return {"loss_rel_diff": loss_rel_diff, "min_fraction_of_detections_reproduced": reproduced}


def _detection_keys(detections: dict) -> set:
    rows = torch.cat([detections["boxes"], detections["scores"][:, None], detections["labels"][:, None]], 1)
    return {tuple(round(v, 3) for v in row) for row in rows.tolist()}


def benchmark_model(name, model, images, targets, args, results, save) -> None:
    device, batch = args.device, images.shape[0]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    image_list = list(images)
    measure = {}

    def record(key: str, seconds: float) -> None:
        measure[key] = {"seconds": seconds, "images_per_s": batch / seconds}
        print(
            f"  {name:6s} {key:28s} {batch / seconds:10.1f} img/s  ({seconds * 1000:8.2f} ms/batch)",
            flush=True,
        )
        results["models"][name] = measure
        save()

    with torch.no_grad():  # not inference_mode: batch_in is reused where autograd records
        batch_in, _ = preprocess_batch(model, images, channels_last=args.channels_last)
    # Inference first, while the random weights are the same for every path.
    model.eval()
    with torch.inference_mode():
        scores = torch.softmax(run_network(model, batch_in, amp_bf16=args.bf16)[0]["cls_logits"].float(), -1)
        measure["candidates_per_image"] = float((scores[:, :, 1:] > model.score_thresh).sum() / batch)

        def stock_infer():
            with autocast:
                return model(image_list)

        record("infer_stock", seconds_per_call(stock_infer, device, args.steps, args.warmup))
        for nms in ("matrix", "batched_nms"):
            record(
                f"infer_batched_{nms}",
                seconds_per_call(
                    lambda nms=nms: ssd_detect(
                        model, images, amp_bf16=args.bf16, channels_last=args.channels_last, nms=nms
                    ),
                    device,
                    args.steps,
                    args.warmup,
                ),
            )
        record(
            "infer_network_only",
            seconds_per_call(
                lambda: run_network(model, batch_in, amp_bf16=args.bf16), device, args.steps, args.warmup
            ),
        )

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def stock_step():
        with autocast:
            losses = model(image_list, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def batched_step():
        losses = ssd_forward_train(
            model, images, targets, amp_bf16=args.bf16, channels_last=args.channels_last
        )
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def network_fwd_bwd():
        outputs, _ = run_network(model, batch_in, amp_bf16=args.bf16)
        model.zero_grad(set_to_none=True)
        (outputs["bbox_regression"].float().mean() + outputs["cls_logits"].float().mean()).backward()

    record("train_stock", seconds_per_call(stock_step, device, args.steps, args.warmup))
    record("train_batched", seconds_per_call(batched_step, device, args.steps, args.warmup))
    record("train_network_fwd_bwd", seconds_per_call(network_fwd_bwd, device, args.steps, args.warmup))

    seconds = {key: value["seconds"] for key, value in measure.items() if isinstance(value, dict)}
    measure["speedup_train_batched_vs_stock"] = seconds["train_stock"] / seconds["train_batched"]
    default_nms = "matrix" if device.type == "cuda" else "batched_nms"  # ssd_detect's nms="auto"
    measure["default_nms"] = default_nms
    seconds["infer_batched"] = seconds[f"infer_batched_{default_nms}"]
    measure["speedup_infer_batched_vs_stock"] = seconds["infer_stock"] / seconds["infer_batched"]
    measure["network_share_train_stock"] = seconds["train_network_fwd_bwd"] / seconds["train_stock"]
    measure["network_share_train_batched"] = seconds["train_network_fwd_bwd"] / seconds["train_batched"]
    measure["network_share_infer_stock"] = seconds["infer_network_only"] / seconds["infer_stock"]
    measure["network_share_infer_batched"] = seconds["infer_network_only"] / seconds["infer_batched"]
    results["models"][name] = measure
    save()


def main() -> None:
    args = parse_args()
    if args.threads or args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    card = (
        torch.cuda.get_device_name(args.device)
        if args.device.type == "cuda"
        else platform.processor() or "cpu"
    )
    results: dict = {
        "card": card,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
        "settings": {
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "num_classes": args.num_classes,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "prune_ratio": args.prune_ratio,
            "device": str(args.device),
        },
        "models": {},
    }
    print(
        f"card {card} | torch {torch.__version__} | torchvision {torchvision.__version__} | {results['date']}"
    )
    print(json.dumps(results["settings"]), flush=True)

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2))

    dense = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=args.num_classes).to(args.device)
    images, targets = synthetic_batch(args.batch, args.num_classes, args.device, generator)
    if args.check:
        results["check_float32"] = check_equivalence(dense, images, targets)
        print(f"float32 check on {args.device}: {results['check_float32']}", flush=True)
    pruned = prune_channels(dense, args.prune_ratio, args.device)
    flops = {"dense": network_flops(dense, args.device), "pruned": network_flops(pruned, args.device)}
    results["flops_per_image"] = flops
    results["flops_ratio_dense_over_pruned"] = flops["dense"] / flops["pruned"]
    print(
        f"network GFLOPs/image: dense {flops['dense'] / 1e9:.2f}, pruned {flops['pruned'] / 1e9:.2f} "
        f"({results['flops_ratio_dense_over_pruned']:.2f}x fewer)",
        flush=True,
    )
    save()

    for name, model in (("dense", dense), ("pruned", pruned)):
        prepare_model(model, channels_last=args.channels_last, compile=args.compile)
        benchmark_model(name, model, images, targets, args, results, save)

    d, p = results["models"]["dense"], results["models"]["pruned"]
    results["pruned_speedup"] = {
        key: d[key]["seconds"] / p[key]["seconds"] for key in d if isinstance(d[key], dict)
    }
    save()
    print(f"\npruned vs dense speed-up (FLOPs ratio {results['flops_ratio_dense_over_pruned']:.2f}x):")
    for key, value in results["pruned_speedup"].items():
        print(f"  {key:28s} {value:5.2f}x")
    for name in ("dense", "pruned"):
        m = results["models"][name]
        print(
            f"{name}: train batched/stock {m['speedup_train_batched_vs_stock']:.2f}x, infer batched/stock "
            f"{m['speedup_infer_batched_vs_stock']:.2f}x; network share train stock "
            f"{m['network_share_train_stock']:.0%} batched {m['network_share_train_batched']:.0%}, infer stock "
            f"{m['network_share_infer_stock']:.0%} batched {m['network_share_infer_batched']:.0%}; "
            f"{m['candidates_per_image']:.0f} candidates/image above score_thresh"
        )


if __name__ == "__main__":
    main()
