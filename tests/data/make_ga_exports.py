"""Writes tests/data/ga360-export/ and tests/data/ga4-export/: a few users of the real GA360 and GA4
Merchandise Store exports in ../shared/data (see that folder's README), rows as exported (every column).

    python tests/data/make_ga_exports.py /work/shared/data
"""

import gzip
import json
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
GA360_DAYS = ("20160801", "20160802", "20160803")
GA360_MIDNIGHT = "3634155159894530540"  # visit 1470121149 runs from 2016-08-01 into 08-02
GA4_DAYS = ("20201101", "20201102")
USERS = 10  # besides the chosen ones


def ga360(shared: Path) -> None:
    days = {day: pq.read_table(shared / "ga360-merchandise-store-92days" / f"ga_sessions_{day}.parquet")
            for day in GA360_DAYS}
    seen = pl.concat([pl.from_arrow(t.select(["fullVisitorId", "hits"])).select(
        "fullVisitorId", day=pl.lit(day),
        outcome=pl.col("hits").list.eval(pl.element().struct.field("eCommerceAction").struct.field("action_type")
                                         .is_in(["3", "6"])).list.any())
        for day, t in days.items()])
    by_user = seen.group_by("fullVisitorId").agg(pl.col("day").n_unique(), pl.col("outcome").any())
    chosen = by_user.filter((pl.col("day") > 1) & pl.col("outcome")).sort("fullVisitorId").head(USERS)
    users = {GA360_MIDNIGHT, *chosen["fullVisitorId"]}
    for day, table in days.items():
        keep = pl.from_arrow(table["fullVisitorId"]).is_in(list(users)).to_arrow()
        pq.write_table(table.filter(keep), HERE / "ga360-export/parquet" / f"ga_sessions_{day}.parquet",
                       compression="zstd")
    # The same users' sessions of 2016-08-01 as BigQuery wrote them to gzipped JSON lines.
    with gzip.open(shared / "ga360-merchandise-store/ga_sessions_20160801.json.gz", "rt") as f:
        lines = [line for line in f if json.loads(line)["fullVisitorId"] in users]
    with gzip.open(HERE / "ga360-export/json/ga_sessions_20160801.json.gz", "wt") as f:
        f.writelines(lines)


def ga4(shared: Path) -> None:
    days = {day: pq.read_table(shared / "ga4-merchandise-store" / f"events_{day}.parquet") for day in GA4_DAYS}
    frames = []
    for day, table in days.items():
        frame = pl.from_arrow(table.select(["user_pseudo_id", "event_name", "event_params", "items"]))
        frames.append(frame.select(
            "user_pseudo_id", "event_name", day=pl.lit(day),
            session=pl.col("event_params").list.eval(pl.element().filter(pl.element().struct.field("key")
                                                     == "ga_session_id").struct.field("value")
                                                     .struct.field("int_value")).list.first(),
            empty_items=(pl.col("event_name") == "view_item") & (pl.col("items").list.len() == 0)))
    events = pl.concat(frames)
    midnight = (events.group_by("user_pseudo_id", "session").agg(pl.col("day").n_unique())
                .filter(pl.col("day") > 1).sort("user_pseudo_id")["user_pseudo_id"].head(2))
    by_user = events.group_by("user_pseudo_id").agg(
        sessions=pl.col("session").n_unique(), cart=pl.col("event_name").is_in(["add_to_cart", "purchase"]).any(),
        empty=pl.col("empty_items").any(), n=pl.len())
    small = by_user.filter(pl.col("n") < 300).sort("user_pseudo_id")
    chosen = [*small.filter("cart")["user_pseudo_id"].head(USERS // 2),
              *small.filter("empty", pl.col("sessions") > 1)["user_pseudo_id"].head(USERS // 2)]
    users = {*midnight, *chosen}
    for day, table in days.items():
        keep = pl.from_arrow(table["user_pseudo_id"]).is_in(list(users)).to_arrow()
        pq.write_table(table.filter(keep), HERE / "ga4-export" / f"events_{day}.parquet", compression="zstd")


if __name__ == "__main__":
    ga360(Path(sys.argv[1]))
    ga4(Path(sys.argv[1]))
