"""Alibaba Tianchi UserBehavior (Taobao): CSV, no header: user_id,item_id,category_id,behavior,timestamp.

Naming rule: a page is the item's category, `category_<category_id>`; behavior `cart` -> Cart,
`buy` -> Purchase, `fav` -> Favorite; `pv` -> the category page. No session ids (split on the gap).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .base import CART, PURCHASE, IngestError, IngestResult, bad_rows, finish, normalize_pages

COLUMNS = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
BEHAVIOR_PAGES = {"cart": CART, "buy": PURCHASE, "fav": "Favorite"}


def read_taobao(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    try:
        raw = pl.read_csv(
            path, has_header=False, new_columns=COLUMNS, infer_schema=False, row_index_name="_row"
        )
    except pl.exceptions.NoDataError:
        raise IngestError(path, "the file is empty", hint="point at a UserBehavior CSV") from None
    except pl.exceptions.ComputeError as e:
        raise IngestError(path, f"not a 5-column UserBehavior CSV: {e}".splitlines()[0]) from None
    if raw.width != len(COLUMNS) + 1:
        raise IngestError(path, f"expected {len(COLUMNS)} columns {COLUMNS}, found {raw.width - 1}", 1)
    skipped: dict[str, int] = {}
    raw = bad_rows(
        raw, raw["timestamp"].is_null() | raw["behavior"].is_null(), path,
        "truncated line (missing fields)", on_bad_rows, skipped,
    )
    ts = raw["timestamp"].cast(pl.Int64, strict=False)
    raw = bad_rows(raw.with_columns(ts=ts), ts.is_null(), path, "unparsable timestamp", on_bad_rows, skipped)
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
