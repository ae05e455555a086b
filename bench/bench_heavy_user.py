"""`hetlm prepare` peak memory with one heavy user (a bot or a shared account) among light ones.

The log (Taobao format): 20 light users with 5 sessions of 5 pages, and one user with N events in
sessions of 10 pages an hour apart, so N / 10 sessions and as many targets. Each size runs in its own
process; the figure is the peak resident memory above that of the same process after importing hetlm
(the libraries). Memory must grow no faster than the events: the samples a target gets are bounded by
max_len, so the work per target is constant.

    .venv/bin/python bench/bench_heavy_user.py [--events 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import peak_rss_mb, record

T0 = 1_511_544_000  # 2017-11-24, in the Taobao log's days
PAGES, SESSION_PAGES = 50, 10


def heavy_user_log(path: Path, events: int) -> None:
    """Taobao rows: user 0 with `events` page views, users 1..20 with 25 each."""
    import polars as pl

    i = pl.int_range(events, eager=True, dtype=pl.Int64)
    ts = T0 + (i // SESSION_PAGES) * 3600 + i % SESSION_PAGES * 60
    heavy = pl.DataFrame({"category": i % PAGES, "ts": ts}).select(user=pl.lit(0, pl.Int64), category="category", ts="ts")
    j = pl.int_range(20 * 25, eager=True, dtype=pl.Int64)
    light = pl.DataFrame({"user": 1 + j // 25, "category": (j * 7) % PAGES, "ts": T0 + (j % 25) // 5 * 7200 + j % 5 * 60})
    pl.concat([heavy, light]).select(
        "user", item=pl.col("category") + 1000, category="category", behavior=pl.lit("pv"), ts="ts"
    ).write_csv(path, include_header=False)


def run(events: int) -> dict:
    from hetlm.prepare import prepare  # the libraries' memory is the baseline

    baseline = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        heavy_user_log(Path(tmp) / "log.csv", events)
        started = time.perf_counter()
        summary = prepare("taobao", Path(tmp) / "log.csv", Path(tmp) / "out")
    return {"events": events, "seconds": round(time.perf_counter() - started, 2),
            "samples": sum(summary["samples"].values()), "peak_mb": round(peak_rss_mb(), 1),
            "peak_above_imports_mb": round(peak_rss_mb() - baseline, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    rows = []
    for events in args.events:  # a fresh process each: peak RSS never goes down
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(run, events).result())
    first, last = rows[0], rows[-1]
    events_growth = last["events"] / first["events"]
    memory_growth = last["peak_above_imports_mb"] / first["peak_above_imports_mb"]
    record("bench_heavy_user", {"events": args.events, "light_users": 20, "pages_per_session": SESSION_PAGES,
                                "max_len": 512}, rows,
           {"events_growth": events_growth, "peak_above_imports_growth": round(memory_growth, 3),
            "memory_growth_over_events_growth": round(memory_growth / events_growth, 3)})


if __name__ == "__main__":
    main()
