"""`hetlm prepare` speed on analytics exports: a GA4 BigQuery export (gzipped JSON lines and Parquet, one
file per day) and an Adobe Analytics data feed (hit data per day with its lookups), generated in the
vendors' documented layouts (tests/analytics_exports.py) from the same simulated visits, plus a generic CSV
of the same events for comparison. For each: events/s of the adapter alone (read_events) and of the whole
prepare, and whether a partitioned prepare gives the same samples as the in-memory one.

    .venv/bin/python bench/bench_ingest.py [--users 5000] [--days 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import record  # noqa: E402
from tests.analytics_exports import adobe_rows, browsing, write_adobe, write_ga4  # noqa: E402

RUN_SPECIFIC = ("config", "seconds", "events_per_second", "path")


def write_logs(users: int, days: int, folder: Path) -> dict[str, tuple[str, Path, dict]]:
    """name -> (source, path, options): the same visits in each format."""
    import polars as pl

    hits = browsing(users, visits=4, pages=6, days=days)
    files = write_ga4(hits, folder / "ga4-json")
    (folder / "ga4-parquet").mkdir()
    for file in files:  # Parquet as BigQuery exports it: the same rows, INTEGERs as INT64
        pl.read_ndjson(file).with_columns(pl.col("event_timestamp").cast(pl.Int64)).write_parquet(
            folder / "ga4-parquet" / file.name.replace(".json.gz", ".parquet"))
    rows = adobe_rows(hits)
    for day, day_rows in pl.DataFrame(rows).group_by(pl.col("hit_time_gmt").cast(pl.Int64) // 86_400):
        write_adobe(day_rows.to_dicts(), folder / "adobe" / f"day{day[0]}", gz=True)
    generic = pl.DataFrame({"user": [h.user for h in hits], "session": [f"{h.user}-{h.visit}" for h in hits],
                            "ts": [h.us // 1000 for h in hits], "page": [h.path or h.kind for h in hits]})
    generic.write_csv(folder / "generic.csv")
    return {
        "ga4 json.gz": ("ga4", folder / "ga4-json", {}),
        "ga4 parquet": ("ga4", folder / "ga4-parquet", {}),
        "adobe tsv.gz": ("adobe", folder / "adobe", {}),
        "generic csv": ("generic", folder / "generic.csv",
                        dict(user="user", session="session", time="ts", time_unit="ms", page="page")),
    }


def same_prepared(a: Path, b: Path) -> bool:
    """The same samples (partitions are written one after another: compared sorted) and summary."""
    import polars as pl

    def summary(folder: Path) -> dict:
        return {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in RUN_SPECIFIC}

    def split(folder: Path, name: str) -> pl.DataFrame:
        return pl.read_parquet(folder / f"{name}.parquet").sort("target_start", "user")

    return summary(a) == summary(b) and all(split(a, s).equals(split(b, s)) for s in ("train", "val", "test"))


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def main() -> None:
    from hetlm.ingest import read_events
    from hetlm.prepare import PrepareConfig, prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the generic CSV has no outcome events
    rows, equal = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = write_logs(args.users, args.days, Path(tmp))
        for name, (source, path, options) in logs.items():
            started = time.perf_counter()
            events = read_events(source, path, **options).events.height
            read_s = time.perf_counter() - started
            out = Path(tmp) / f"out-{source}-{len(rows)}"
            started = time.perf_counter()
            summary = prepare(source, path, out / "memory", **options)
            prepare_s = time.perf_counter() - started
            started = time.perf_counter()
            prepare(source, path, out / "parts", PrepareConfig(partitions=args.partitions), **options)
            parts_s = time.perf_counter() - started
            same = same_prepared(out / "memory", out / "parts")
            equal[name] = same
            rows.append({"log": name, "events": events, "size_mb": size_mb(path), "adapter_s": read_s,
                         "adapter_events_per_s": events / read_s, "prepare_s": prepare_s,
                         "prepare_events_per_s": events / prepare_s, "partitioned_s": parts_s,
                         "samples": sum(summary["samples"].values()), "partitioned_same_samples": same})
    by_log = {row["log"]: row for row in rows}
    record("bench_ingest", vars(args), rows, {
        "ga4_json_prepare_events_per_s": by_log["ga4 json.gz"]["prepare_events_per_s"],
        "ga4_parquet_prepare_events_per_s": by_log["ga4 parquet"]["prepare_events_per_s"],
        "adobe_prepare_events_per_s": by_log["adobe tsv.gz"]["prepare_events_per_s"],
        "generic_csv_prepare_events_per_s": by_log["generic csv"]["prepare_events_per_s"],
        "partitioned_same_samples_all": all(equal.values()),
    })


if __name__ == "__main__":
    main()
