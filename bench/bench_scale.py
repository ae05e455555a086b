"""`hetlm prepare` on a log larger than memory, and the peak memory of a partitioned prepare.

Writes a Taobao UserBehavior CSV of --events events (default 20M) to --workdir, in chunks of users so
that writing it needs little memory: pages and behaviours are drawn from the shipped sample's
frequencies, events per user from its users, gaps so that about as many events start a session as in
the sample. The file is generated (the issue asks for a 50M-event log; no real log that size is here)
and deterministic (--seed). Then, each in a child process whose peak RSS is read back, with
partitions = events / --events-per-partition each time (memory should then not grow with the log):

1. prefixes of it (--prefix-events, default 1M and 4M events) and the whole log, prepared partitioned:
   peak RSS and events/s against the log size;
2. the first prefix prepared in memory (partitions=1): the same samples, the ratio of memory and time.

    .venv/bin/python bench/bench_scale.py [--events 50000000] [--events-per-partition 1000000]

Training targets are capped at each user's 3 most recent (--max-train-targets, as configs/quick.json):
a sample holds its user's whole history, so all targets would make the output many times the log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHIPPED, peak_rss_mb, record

USERS_PER_CHUNK = 20_000
MINUTE_MS = 60_000


def sample_frequencies() -> dict:
    """Category, behaviour and events-per-user frequencies, and the session-start rate, of the sample."""
    raw = pl.read_csv(SHIPPED, has_header=False, new_columns=["user", "item", "category", "behavior", "ts"],
                      schema_overrides={"category": pl.Utf8, "behavior": pl.Utf8, "ts": pl.Int64})
    raw = raw.sort("user", "ts")
    new_session = ((pl.col("user") != pl.col("user").shift(1)) | (pl.col("ts").diff() > 30 * 60)).fill_null(True)
    # Sorted by value: value_counts' row order varies from run to run, and with it the drawn log.
    categories = raw["category"].value_counts().sort("category")
    behaviors = raw["behavior"].value_counts().sort("behavior")
    return {
        "categories": categories["category"].to_numpy(), "category_p": (categories["count"] / raw.height).to_numpy(),
        "behaviors": behaviors["behavior"].to_numpy(), "behavior_p": (behaviors["count"] / raw.height).to_numpy(),
        "events_per_user": raw.group_by("user").len()["len"].to_numpy(),
        "session_rate": raw.select(new_session.mean()).item(),
    }


def write_log(path: Path, n_events: int, seed: int) -> int:
    """A UserBehavior CSV of about n_events events; returns the exact count."""
    freq = sample_frequencies()
    mean_events = freq["events_per_user"].mean()
    written, chunk, first_user = 0, 0, 0
    path.unlink(missing_ok=True)
    with open(path, "ab") as f:
        while written < n_events:
            rng = np.random.default_rng([seed, chunk])
            n_users = min(USERS_PER_CHUNK, max(1, round((n_events - written) / mean_events)))
            per_user = rng.choice(freq["events_per_user"], n_users).astype(np.int64)
            per_user[-1] = max(1, min(per_user[-1], n_events - written - per_user[:-1].sum()))
            n = int(per_user.sum())
            users = np.repeat(np.arange(first_user, first_user + n_users), per_user)
            # A new session with the sample's rate: a gap of 31 min to 2 days, else 0-10 minutes.
            starts = rng.random(n) < freq["session_rate"]
            gaps = np.where(starts, rng.integers(31 * MINUTE_MS, 2 * 1440 * MINUTE_MS, n), rng.integers(0, 10 * MINUTE_MS, n))
            first = np.r_[0, np.cumsum(per_user)[:-1]]
            gaps[first] = rng.integers(0, 2 * 1440 * MINUTE_MS, n_users)  # each user starts at a random time
            clock = np.cumsum(gaps)
            clock -= np.repeat(clock[first] - gaps[first], per_user)  # each user's clock from 0
            ts = 1_511_539_200 + clock // 1000  # 2017-11-25, as the sample
            pl.DataFrame({
                "user": users, "item": rng.integers(1, 5_000_000, n),
                "category": rng.choice(freq["categories"], n, p=freq["category_p"]),
                "behavior": rng.choice(freq["behaviors"], n, p=freq["behavior_p"]), "ts": ts,
            }).write_csv(f, include_header=False)
            written, chunk, first_user = written + n, chunk + 1, first_user + n_users
    return written


def head(path: Path, out: Path, n_lines: int) -> None:
    with open(path, "rb") as src, open(out, "wb") as dst:
        dst.writelines(itertools.islice(src, n_lines))


def with_prefixes(log: Path, n_events: int, prefix_events: list[int], folder: Path) -> list[tuple[str, Path, int]]:
    """(name, file, events) of the log's first `prefix_events` lines, each written to `folder`, then the log."""
    logs = []
    for n in prefix_events:
        head(log, folder / f"prefix-{n}.csv", n)
        logs.append((f"prefix {n:,}", folder / f"prefix-{n}.csv", n))
    return logs + [("full log", log, n_events)]


def run_prepare(log: Path, out: Path, partitions: int, max_train_targets: int) -> dict:
    """prepare in a child process: its summary, wall time and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(log), str(out), str(partitions), str(max_train_targets)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"prepare failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return child | {"seconds": time.perf_counter() - started}


def child(log: str, out: str, partitions: str, max_train_targets: str) -> None:
    from hetlm.prepare import PrepareConfig, prepare

    config = PrepareConfig(partitions=int(partitions), max_train_targets_per_user=int(max_train_targets))
    summary = prepare("taobao", log, out, config)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "samples": summary["samples"], "events": summary["events_read"],
                      "stage_seconds": summary["seconds"]}))


def events_in_memory_mb(log: Path) -> float:
    """Size of a log's events as the Event table (user, session, ts, page) in memory."""
    from hetlm.ingest import read_events

    return read_events("taobao", log).events.estimated_size("mb")


def partitions_for(n_events: int, events_per_partition: int) -> int:
    return max(2, round(n_events / events_per_partition))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000_000,
                        help="events in the generated log (the issue's figure: 50000000)")
    parser.add_argument("--max-train-targets", type=int, default=3,
                        help="each user's most recent training targets (all of them would make the samples, "
                             "each with its whole history, many times the log)")
    parser.add_argument("--events-per-partition", type=int, default=1_000_000,
                        help="partitions = events / this, for every log prepared partitioned, so peak memory "
                             "should not grow with the log")
    parser.add_argument("--prefix-events", type=int, nargs="*", default=[1_000_000, 4_000_000],
                        help="prefixes of the log also prepared partitioned (peak memory against log size); "
                             "the first is also prepared in memory (same samples, memory and time ratios)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hetlm-bench-scale"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated log and outputs")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.workdir).free / 2**30
    need_gb = args.events * 60 / 2**30  # the CSV (~35 B/event), partitions and samples
    if free_gb < need_gb:
        sys.exit(f"{args.workdir}: {free_gb:.1f} GiB free, about {need_gb:.1f} GiB needed")

    log = args.workdir / "UserBehavior_generated.csv"
    started = time.perf_counter()
    n_events = write_log(log, args.events, args.seed)
    generate_s = time.perf_counter() - started
    log_mb = log.stat().st_size / 2**20

    logs = with_prefixes(log, n_events, args.prefix_events, args.workdir)
    rows, runs = [], {}
    for name, path, n in logs:
        partitions = partitions_for(n, args.events_per_partition)
        runs[name] = run = run_prepare(path, args.workdir / "out", partitions, args.max_train_targets)
        rows.append({"run": f"{name}, partitioned", "events": run["events"], "partitions": partitions,
                     "seconds": run["seconds"], "events_per_s": run["events"] / run["seconds"],
                     "peak_rss_mb": run["peak_rss_mb"]})
    first_name, first_log, _ = logs[0]
    in_memory = run_prepare(first_log, args.workdir / "out", 1, args.max_train_targets)
    partitioned = runs[first_name]
    if in_memory["samples"] != partitioned["samples"]:
        raise AssertionError(f"partitioned samples differ: {partitioned['samples']} vs {in_memory['samples']}")
    rows.append({"run": f"{first_name}, in memory", "events": in_memory["events"], "partitions": 1,
                 "seconds": in_memory["seconds"], "events_per_s": in_memory["events"] / in_memory["seconds"],
                 "peak_rss_mb": in_memory["peak_rss_mb"]})
    full = runs["full log"]
    events_mb = events_in_memory_mb(first_log) * n_events / in_memory["events"]

    record("bench_scale", vars(args) | {"workdir": str(args.workdir)}, rows, {
        "log_events": n_events, "log_csv_mb": round(log_mb), "log_events_in_memory_mb_est": round(events_mb),
        "generate_seconds": generate_s,
        "full_peak_rss_mb": full["peak_rss_mb"],
        "full_peak_rss_over_events_in_memory": full["peak_rss_mb"] / events_mb,
        "peak_rss_full_over_smallest_prefix": full["peak_rss_mb"] / partitioned["peak_rss_mb"],
        "full_events_per_s": full["events"] / full["seconds"],
        "full_stage_seconds": full["stage_seconds"],
        "slice_peak_rss_ratio_partitioned_over_in_memory": partitioned["peak_rss_mb"] / in_memory["peak_rss_mb"],
        "slice_time_ratio_partitioned_over_in_memory": partitioned["seconds"] / in_memory["seconds"],
        "slice_samples_equal": True,
        "full_samples": full["samples"],
    })
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
