"""A pruned wide model against a narrow dense model trained as long: does pruning beat training the small
model in the first place (Liu et al., ICLR 2019, "Rethinking the value of network pruning")?

    .venv/bin/python bench/pruned_vs_narrow.py --pruned CKPT [CKPT ...] --narrow CKPT [CKPT ...]
        [--result pruned_vs_narrow]

The i-th ``--pruned`` checkpoint is set against the i-th ``--narrow`` one (pair i, the same seed): a
model pruned from a wide base (``bench/latency_controls.py --keep``: ``latency_<seed>``), and a dense
model of the narrow width trained for as many epochs (a base pretrained at that width as the wide one
was, then ``bench/latency_controls.py --methods dense``: ``dense_<seed>``), or the narrow model pruned
too, to compare the two routes. For each pair: both models' test VOC07 mAP@0.5 and validation mAP as
their stages stored them (every choice made on validation), their FLOPs and parameters, and how much
faster the pruned model runs than the narrow one (> 1: the pruned one is faster) in ONNX Runtime at batch
32 on ``export.threads`` threads, the two timed in alternation on the same test images: the network alone
and end to end (post-processing included, at each model's own score threshold).
Writes bench/results/<--result>.json; run bench/report.py afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import markdown_rows, mean_sd, write_result  # noqa: E402

COLUMNS = ("pair", "pruned_metric", "narrow_metric", "gap_points", "pruned_val_metric", "narrow_val_metric",
           "flops_ratio", "params_ratio", "network_speedup", "e2e_speedup", "layouts")


def pair_row(cfg, pair: int, pruned: Path, narrow: Path) -> dict[str, Any]:
    """One pair's row: stored metrics of both, and the pruned model's speedup over the narrow one."""
    from bench.compress import speedup_against_base
    from compression.measure import stored_metrics

    ours, theirs = stored_metrics(pruned), stored_metrics(narrow)
    timed = speedup_against_base(cfg, narrow, pruned)
    return {"pair": pair, "pruned": pruned.name, "narrow": narrow.name,
            "pruned_metric": ours.get("map_voc07"), "narrow_metric": theirs.get("map_voc07"),
            "gap_points": _points(ours.get("map_voc07"), theirs.get("map_voc07")),
            "pruned_val_metric": ours.get("val_map_voc07"), "narrow_val_metric": theirs.get("val_map_voc07"),
            # the narrow model's over the pruned one's (> 1: the pruned model has fewer)
            "flops_ratio": theirs["flops"] / ours["flops"], "params_ratio": theirs["params"] / ours["params"],
            "network_speedup": timed["network"]["ratio"], "e2e_speedup": timed["end_to_end"]["ratio"],
            "network_ms": {"pruned": timed["network"]["model_ms"], "narrow": timed["network"]["base_ms"]},
            "e2e_ms": {"pruned": timed["end_to_end"]["model_ms"], "narrow": timed["end_to_end"]["base_ms"]},
            "layouts": f"{timed['network']['model_layout']} / {timed['network']['base_layout']}"}


def _points(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else 100 * (ours - theirs)


def summarise(rows: list[dict[str, Any]], threads: int) -> str:
    lines = markdown_rows(rows, COLUMNS)
    lines += ["", f"- layouts: pruned / narrow; speedups: the narrow model's time over the pruned one's (ONNX Runtime, "
                  f"batch 32, {threads} thread(s), timed in alternation)",
              f"- pruned: test mAP {mean_sd([r['pruned_metric'] for r in rows])}; narrow: "
              f"{mean_sd([r['narrow_metric'] for r in rows])}; pruned minus narrow, same seed: "
              f"{mean_sd([r['gap_points'] for r in rows], digits=2)} points",
              f"- the pruned model runs {mean_sd([r['network_speedup'] for r in rows], digits=2)}x (network) and "
              f"{mean_sd([r['e2e_speedup'] for r in rows], digits=2)}x (end to end) as fast as the narrow one; the "
              f"narrow one has {mean_sd([r['flops_ratio'] for r in rows], digits=2)}x its FLOPs and "
              f"{mean_sd([r['params_ratio'] for r in rows], digits=2)}x its parameters"]
    return "\n".join(lines)


def check_pairs(pruned: list[Path], narrow: list[Path]) -> str | None:
    """What is wrong with the checkpoints given, in one line, or None."""
    from compression.checkpoint import read_metadata
    from compression.errors import CheckpointError

    if len(pruned) != len(narrow):
        return f"--pruned names {len(pruned)} checkpoint(s) and --narrow {len(narrow)}: give one narrow per pruned"
    metadata = {}
    for flag, paths in (("--pruned", pruned), ("--narrow", narrow)):
        for path in paths:
            if not path.is_file():
                return f"{flag} {path}: no such checkpoint"
            try:
                metadata[path] = read_metadata(path)
            except CheckpointError as exc:
                return f"{flag}: {exc}"
            if not {"flops", "params"} <= set(metadata[path].get("metrics") or {}):
                return f"{flag} {path}: stores no FLOPs or parameter count (not a stage's checkpoint)"
    for ours, theirs in zip(pruned, narrow, strict=True):
        sizes = [metadata[p]["model_args"].get("image_size") for p in (ours, theirs)]
        if sizes[0] != sizes[1]:
            return f"{ours} and {theirs}: input sizes {sizes[0]} and {sizes[1]} differ; they are timed on the same images"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", type=Path, nargs="+", required=True, help="pruned wide checkpoints, one per seed")
    parser.add_argument("--narrow", type=Path, nargs="+", required=True,
                        help="narrow checkpoints trained as long, in the same seed order")
    parser.add_argument("--result", default="pruned_vs_narrow")
    args = parser.parse_args()

    problem = check_pairs(args.pruned, args.narrow)
    if problem:
        sys.exit(f"error: {problem}")

    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from tasks.env import apply_env_defaults

    apply_env_defaults()
    cfg = load_config("default")
    ensure_builtin_data(cfg.data)
    rows = [pair_row(cfg, pair, pruned, narrow)
            for pair, (pruned, narrow) in enumerate(zip(args.pruned, args.narrow, strict=True))]
    markdown = summarise(rows, cfg.export.threads)
    out = write_result(args.result, {"rows": rows, "threads": cfg.export.threads, "markdown": markdown})
    print(f"{markdown}\n-> {out}")


if __name__ == "__main__":
    main()
