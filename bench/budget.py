"""Budgeted compression on a preset (issue: budget): time, trials, Pareto front, and how well the cheap signals rank.

    .venv/bin/python bench/budget.py [--config default] [--budget map_drop=1.0] [--set k=v ...] [--search k=v ...]

Runs `prunepipe run --budget` (the `budget` flow: a temporary Prefect server, a local Ray, MLflow in
sqlite) from scratch in its own work folder (pretraining included) and times it. Then, unless
`--no-correlation`, runs the same search again with every screened trial retrained and no early stop:
the Prefect cache reuses everything the first run computed, so only the extra retrains cost time, and the
Spearman rank correlation between the cheap signals (validation mAP of the thresholded and of the pruned,
not retrained, model) and the retrained model's test mAP is measured over all trials. Writes
bench/results/<--result>.json (default budget) and bench/results/budget.png (the Pareto plot of the second
run, as logged to MLflow); run bench/report.py afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, write_result  # noqa: E402

COLUMNS = (("trial", "trial"), ("knobs", "knobs"), ("status (first run)", "status"), ("FLOPs x", "flops_ratio"),
           ("params x", "params_ratio"), ("network latency x (ORT, batch 32)", "latency_ratio"),
           ("latency table's prediction x", "predicted_latency_ratio"), ("ORT layout", "latency_layout"),
           ("val mAP thresholded", "val_thresholded"),
           ("val mAP pruned", "val_pruned"), ("test mAP pruned", "map_pruned"), ("test mAP retrained", "map"),
           ("drop (points)", "drop_points"), ("Pareto (FLOPs / params)", "front"))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--budget", default="map_drop=1.0")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--search", dest="search", action="append", default=[])
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--result", default="budget", help="name of the result file in bench/results/")
    parser.add_argument("--no-correlation", dest="correlation", action="store_false",
                        help="skip the second run that retrains every trial")
    args = parser.parse_args()

    from tasks.env import apply_env_defaults

    apply_env_defaults()
    from compression.budget import default_knobs, load_search, parse_budget
    from compression.config import load_config
    from compression.data.loaders import ensure_builtin_data
    from flows.budget import run_budget

    budget = parse_budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        overrides = [*args.overrides, f"workdir={work / 'runs'}", f"tracking.mlflow_uri=sqlite:///{work / 'mlflow.db'}"]
        cfg = load_config(args.config, overrides)
        search = load_search(args.search, knobs=default_knobs(cfg, budget))
        ensure_builtin_data(cfg.data)  # the data set is an input, not part of the search's time
        started = time.perf_counter()
        first = run_budget(cfg, args.budget, search)
        first_seconds = time.perf_counter() - started
        second, second_seconds = None, None
        if args.correlation:
            every = search.model_copy(update={"retrain_top_k": len(first["trials"]), "early_stop": False})
            started = time.perf_counter()
            second = run_budget(cfg, args.budget, every)
            second_seconds = time.perf_counter() - started
            from mlflow import MlflowClient

            plot = MlflowClient(second["mlflow"]["uri"]).download_artifacts(
                second["mlflow"]["run_id"], "plots/pareto_front.png", str(work))
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, RESULTS / "budget.png")

    final = second or first
    status = {t["trial"]: t["status"] for t in first["trials"]}
    rows = []
    for row in final["table"]:
        front = "/".join(("yes" if row.get(f"front_{k}") else "no") for k in ("flops_ratio", "params_ratio"))
        rows.append({**row, "status": status.get(row["trial"]), "front": front})
    header = "| " + " | ".join(c for c, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = "\n".join("| " + " | ".join(_cell(r.get(k)) for _, k in COLUMNS) + " |" for r in rows)
    chosen = first["chosen"]
    metric = first["metric"]
    base_map = first["base_metrics"].get(metric)
    lines = [f"{header}\n{body}", ""]
    lines.append(f"- budget `{budget.text}` ({budget.describe()}); base {metric} {base_map:.4f} (test split)")
    lines.append(f"- `prunepipe run --budget {budget.text}` from scratch (pretraining included): "
                 f"{first_seconds / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in first['timings'].items())}); "
                 f"{sum(t['status'] != 'screened' and t['status'] != 'failed' for t in first['trials'])} of "
                 f"{len(first['trials'])} trials retrained or skipped by early stop")
    if chosen:
        latency = (f"{chosen['latency_ratio']:.2f}x lower measured network latency and "
                   f"{chosen['final_latency_e2e_ratio']:.2f}x end to end (ONNX Runtime, batch 32, the final model), "
                   if chosen.get("latency_ratio") else "")
        lines.append(f"- chosen: {chosen['trial']} ({chosen['knobs']}): {latency}{chosen['flops_ratio']:.2f}x fewer FLOPs, "
                     f"{chosen['params_ratio']:.2f}x fewer params, {metric} {chosen['final_map']:.4f} "
                     f"({100 * chosen['final_drop']:+.2f} points, after {chosen['final_stage']})")
    else:
        lines.append("- chosen: none within the budget")
    if second is not None:
        rho = second["spearman"]
        shown = ", ".join(f"{k.removeprefix('spearman_')}: {v:+.2f}" if v is not None else f"{k}: undefined"
                          for k, v in rho.items())
        lines.append(f"- every trial retrained (second run, cached stages reused): {second_seconds / 60:.1f} min more; "
                     f"Spearman rank correlation of the cheap signal with the retrained test {metric} over "
                     f"{sum(r.get('map') is not None for r in second['table'])} trials: {shown}")
        lines.append("- Pareto plot (as logged to the parent MLflow run): [bench/results/budget.png](bench/results/budget.png)")
    failed = [t for t in first["trials"] if t["status"] == "failed"]
    for trial in failed:
        lines.append(f"- {trial['trial']} ({trial['knobs']}) failed: {trial.get('error') or 'see the run log'}")
    out = write_result(args.result, {
        "config": args.config, "overrides": args.overrides, "budget": budget.text, "search": search.model_dump(),
        "seconds": first_seconds, "correlation_run_seconds": second_seconds, "base_map": base_map,
        "chosen": chosen, "trials": first["trials"], "table": rows, "pareto": final["pareto"],
        "spearman": (second or first)["spearman"], "timings": first["timings"],
        "markdown": "\n".join(lines),
    })
    print("\n".join(lines) + f"\n-> {out}")


if __name__ == "__main__":
    main()
