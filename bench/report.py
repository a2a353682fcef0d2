"""Render BENCHMARKS.md from the scripts' latest results (bench/results/*.json); never typed in.

    .venv/bin/python bench/report.py

Each result file carries the machine, the command, the date and a `markdown` table that its script
produced; this only arranges them, in the order below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS  # noqa: E402

ORDER = ["pretrain", "compress", "overhead", "quality", "speedup", "gpu"]
TITLES = {
    "pretrain": "Pretraining the default preset (issue: foundation)",
    "compress": "The seed method end to end, in-process (issue: method)",
    "overhead": "Orchestration overhead: in-process vs Prefect + Ray Train + MLflow",
    "quality": "Quality at equal FLOPs: criteria and torch-pruning's pruners",
    "speedup": "Real CPU speedup of pruned models",
    "gpu": "GPU throughput: stock torchvision SSD vs prunepipe's batched path",
}
HEADER = """# Benchmarks

Every number below was written by a script in `bench/` (its command and machine are given with it) and
collected by `bench/report.py`; none is typed in. Re-run a script, then `bench/report.py`, to refresh.
"""


def render(result: dict) -> str:
    m = result.get("machine", {})
    where = f"{m.get('cpu')} ({m.get('cores')} cores" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + ")"
    smoke = "--quick" in str(result.get("command", ""))
    lines = [
        *(["> **Smoke run (`--quick`) on a shared, loaded machine: not a measurement; re-run without `--quick`.**", ""]
          if smoke else []),
        f"- command: `{result.get('command')}`",
        f"- machine: {where}, torch {m.get('torch')}, commit {m.get('commit')}",
        f"- date: {m.get('date')}",
        "",
        result.get("markdown") or "```\n" + json.dumps(result.get("summary", {}), indent=2) + "\n```",
    ]
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines)


def main() -> None:
    parts = [HEADER]
    for name in ORDER + sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in ORDER):
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        parts.append(f"## {TITLES.get(name, name)}\n\n{render(result)}\n")
    out = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
