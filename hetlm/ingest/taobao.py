"""Alibaba Tianchi UserBehavior (Taobao): CSV, no header: user_id,item_id,category_id,behavior,timestamp.

Naming rule: a page is the item's category, `category_<category_id>`; behavior `cart` -> Cart,
`buy` -> Purchase, `fav` -> Favorite; `pv` -> the category page. No session ids (split on the gap).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .base import (
    CART, NOT_UTF8, NOT_UTF8_HINT, PURCHASE, IngestError, IngestResult, bad_rows, finish, normalize_pages, not_utf8,
    seconds_out_of_range,
)
from .generic import csv_error, read_csv_text

COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
BEHAVIOR_PAGES = {"cart": CART, "buy": PURCHASE, "fav": "Favorite"}


def read_taobao(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    try:
        raw, lossy = read_csv_text(path, has_header=False)
    except pl.exceptions.NoDataError:
        raise IngestError(path, "the file is empty", hint="point at a UserBehavior CSV") from None
    except (pl.exceptions.PolarsError, OSError) as e:
        raise csv_error(path, e, ",", "a 5-column UserBehavior CSV") from None
    if raw.width != len(COLUMNS) + 1:
        hint = "UserBehavior is comma-separated" if raw.width == 2 else "UserBehavior has 5 fields per line"
        raise IngestError(path, f"expected {len(COLUMNS)} columns {COLUMNS}, found {raw.width - 1}", 1, hint)
    raw.columns = ["_row", *COLUMNS]
    skipped: dict[str, int] = {}
    if lossy:
        raw = bad_rows(raw, not_utf8(raw, COLUMNS), path, NOT_UTF8, on_bad_rows, skipped, hint=NOT_UTF8_HINT)
    raw = bad_rows(
        raw, raw["timestamp"].is_null() | raw["behavior"].is_null(), path,
        "truncated line (missing fields)", on_bad_rows, skipped,
    )
    raw = bad_rows(
        raw, raw["user_id"].is_null() | raw["category_id"].is_null(), path, "missing user_id or category_id",
        on_bad_rows, skipped,
    )
    ts = raw["timestamp"].cast(pl.Int64, strict=False)
    raw = bad_rows(raw.with_columns(ts=ts), ts.is_null(), path, "unparsable timestamp", on_bad_rows, skipped)
    raw = bad_rows(
        raw, seconds_out_of_range(raw["ts"]), path, "timestamp out of range (unix seconds expected)",
        on_bad_rows, skipped,
    )
    known = raw["behavior"].is_in(["pv", *BEHAVIOR_PAGES])
    raw = bad_rows(raw, ~known, path, "unknown behavior (expected pv/cart/fav/buy)", on_bad_rows, skipped)
    page = (
        pl.col("behavior").replace_strict(BEHAVIOR_PAGES, default=None).fill_null(
            pl.lit("category ") + pl.col("category_id")
        )
    )
    events = raw.select(
        user=pl.col("user_id"),
        session=pl.lit(None, pl.Utf8),
        ts=pl.col("ts") * 1000,
        page=normalize_pages(page),
    )
    return IngestResult(finish(events), "taobao", str(path), skipped)
