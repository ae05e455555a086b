"""REES46 "eCommerce behavior data from multi category store" (Kechinov 2019): CSV with a header:
event_time ("2019-10-01 00:00:00 UTC"), event_type, product_id, category_id, category_code, brand,
price, user_id, user_session.

Naming rule: a `view` is the product's category page, its category_code with dots as word breaks
("electronics.smartphone" -> `electronics_smartphone`), or `category_<category_id>` when the code is
empty; `cart` -> Cart, `purchase` -> Purchase, `remove_from_cart` -> `Remove_from_cart`.
session = user_session.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .base import (
    CART, NOT_UTF8, NOT_UTF8_HINT, OUTCOME_NAMED_VIEW, OUTCOME_PAGES, PURCHASE, IngestError, IngestResult, bad_rows, check_columns, finish,
    normalize_pages, not_utf8,
)
from .generic import csv_error, read_csv_text

COLUMNS = ["event_time", "event_type", "category_id", "category_code", "user_id", "user_session"]
EVENT_PAGES = {"cart": CART, "purchase": PURCHASE, "remove_from_cart": "Remove from cart"}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def read_rees46(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    try:
        raw, lossy = read_csv_text(path)
    except pl.exceptions.NoDataError:
        raise IngestError(path, "the file is empty", hint="point at a REES46 month CSV") from None
    except (pl.exceptions.PolarsError, OSError) as e:
        raise csv_error(path, e, ",", "a REES46 CSV") from None
    check_columns(path, [c for c in raw.columns if c != "_row"], COLUMNS)
    skipped: dict[str, int] = {}
    if lossy:
        raw = bad_rows(raw, not_utf8(raw, COLUMNS), path, NOT_UTF8, on_bad_rows, skipped, 2, NOT_UTF8_HINT)
    raw = bad_rows(raw, raw["user_id"].is_null(), path, "missing user_id", on_bad_rows, skipped, 2)
    ts = raw["event_time"].str.to_datetime(TIME_FORMAT, strict=False).dt.epoch("ms")
    raw = bad_rows(
        raw.with_columns(ts=ts), ts.is_null(), path, f"unparsable event_time (expected {TIME_FORMAT})",
        on_bad_rows, skipped, 2,
    )
    known = raw["event_type"].is_in(["view", *EVENT_PAGES])
    raw = bad_rows(
        raw, ~known, path, "unknown event_type (expected view/cart/remove_from_cart/purchase)",
        on_bad_rows, skipped, 2,
    )
    category = pl.col("category_code").str.replace_all(".", " ", literal=True).fill_null(
        pl.lit("category ") + pl.col("category_id")
    )
    page = pl.col("event_type").replace_strict(EVENT_PAGES, default=None).fill_null(category)
    raw = raw.with_columns(page=normalize_pages(page))
    raw = bad_rows(
        raw, raw["page"].is_null(), path, "view without category_code or category_id", on_bad_rows, skipped, 2
    )
    named_like_outcome = raw.select((pl.col("event_type") == "view") & pl.col("page").is_in(OUTCOME_PAGES)).to_series()
    raw = bad_rows(raw, named_like_outcome, path, OUTCOME_NAMED_VIEW, on_bad_rows, skipped, 2)
    events = raw.select(user="user_id", session="user_session", ts="ts", page="page")
    return IngestResult(finish(events), "rees46", str(path), skipped)
