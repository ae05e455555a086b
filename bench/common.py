"""Shared by the bench scripts: what machine a figure came from, and where results go.

Every script prints a table and appends one JSON line per run to bench/results/<name>.jsonl, so
BENCHMARKS.md can cite the latest line and older lines stay for comparison.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHIPPED = REPO / "data" / "taobao-sample" / "UserBehavior_sample.csv.gz"
SHARED_DATA = Path(os.environ.get("HETLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def machine() -> dict:
    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "git": rev,
            "load_avg_1m": os.getloadavg()[0]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name: str, settings: dict, rows: list[dict], summary: dict, path: Path | None = None) -> dict:
    """Print rows as a table and append {time, machine, settings, rows, summary} to results/<name>.jsonl
    (or to `path`)."""
    table = Table(title=name)
    for col in rows[0] if rows else []:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console = Console(width=160)
    console.print(table)
    for key, value in summary.items():
        console.print(f"[bold]{key}[/]: {value:.4g}" if isinstance(value, float) else f"[bold]{key}[/]: {value}")
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "settings": settings,
              "rows": rows, "summary": summary}
    path = path or RESULTS / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result
