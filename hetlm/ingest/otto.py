"""OTTO recsys dataset (otto-de/recsys-dataset): JSON lines {"session": int, "events": [{"aid": int,
"ts": ms, "type": "clicks" | "carts" | "orders"}]}.

Naming rule: a click is the article's page `item_<aid>`; `carts` -> Cart, `orders` -> Purchase.
An OTTO "session" is one user's whole month, so user = str(session) and session is null (sessions
are split later on the inactivity gap).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .base import CART, PURCHASE, IngestResult, bad_rows, finish, normalize_pages, seconds_out_of_range
from .generic import read_json_lines

EVENT = pl.Struct({"aid": pl.Utf8, "ts": pl.Utf8, "type": pl.Utf8})
USER_MONTH = pl.Struct({"session": pl.Utf8, "events": pl.List(EVENT)})
TYPE_PAGES = {"carts": CART, "orders": PURCHASE}


def read_otto(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    skipped: dict[str, int] = {}
    months = read_json_lines(path, USER_MONTH, on_bad_rows, skipped)
    months = bad_rows(
        months, months["session"].is_null(), path, "line without a session id", on_bad_rows, skipped
    )
    event = pl.col("events")
    events = months.explode("events").filter(event.is_not_null()).select(
        "_row",
        user=pl.col("session"),
        ts=event.struct.field("ts").cast(pl.Int64, strict=False),
        type=event.struct.field("type"),
        aid=event.struct.field("aid"),
    )
    known = events["type"].is_in(["clicks", *TYPE_PAGES])
    events = bad_rows(
        events, events["ts"].is_null() | events["aid"].is_null() | ~known, path,
        "event without aid, numeric ts or type clicks/carts/orders", on_bad_rows, skipped,
    )
    events = bad_rows(
        events, seconds_out_of_range(events["ts"] // 1000), path, "event ts out of range (unix ms expected)",
        on_bad_rows, skipped,
    )
    page = pl.col("type").replace_strict(TYPE_PAGES, default=None).fill_null(pl.lit("item ") + pl.col("aid"))
    events = events.select("user", session=pl.lit(None, pl.Utf8), ts="ts", page=normalize_pages(page))
    return IngestResult(finish(events), "otto", str(path), skipped)
