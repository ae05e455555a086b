"""Google Analytics 4 BigQuery export: the daily tables events_YYYYMMDD (and events_intraday_YYYYMMDD), one
row per event, exported as newline-delimited JSON (plain or gzipped) or Parquet; one file, a folder of
them (files named events_*) or a glob ("export/events_2021*.json.gz").

Fields as Google's "[GA4] BigQuery Export schema" documents them
(https://support.google.com/analytics/answer/7029846, also developers.google.com/analytics/bigquery/event-schema):
event_timestamp (INTEGER, microseconds UTC), event_name, user_pseudo_id, user_id, the repeated record
event_params (key, value.string_value / int_value / float_value / double_value) and the repeated record
items (item_id, item_name, item_category, ...). BigQuery writes INTEGER columns to JSON as strings, so
numbers are read from strings or numbers alike; any field may be missing.

Naming rule:
  - a `page_view` event is a page: the path of its page_location parameter, made readable as a GA360
    pagePath (`ga360.page_names`: query dropped, URL-decoded, lowercased, the Google Merchandise Store's
    "/Google Redesign" folder dropped, non-alphanumerics as spaces, "/" -> "home"), so
    "https://shop.googlemerchandisestore.com/Google+Redesign/Apparel/Mens?q=1" -> `apparel_mens`;
    or its page_title parameter as it is (page="page_title");
  - a `view_item` event gives one page per item, in the items' order: its item_name (items="item_name")
    or item_category (items="item_category"); items=None ignores view_item. A view_item whose `items`
    list is empty (or holds no such field; frequent in the Merchandise Store export) is its page, named as
    a page_view's (empty_items="page", the default; it then often repeats the page_view just before it,
    a repeat that prepare collapses), or a bad row (empty_items="bad");
  - events named in `cart_events` (add_to_cart) -> Cart, in `purchase_events` (purchase) -> Purchase,
    after the pages of the same event (e.g. cart_events="add_to_cart,begin_checkout").
user = user_pseudo_id, or user_id where the event has one (user="user_id"); session =
user_pseudo_id-<ga_session_id parameter> (an event without ga_session_id has no session: sessions are then
split on the inactivity gap); ts = event_timestamp // 1000 (ms). Events keep their order within a
microsecond.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json

from .base import (
    CART, PURCHASE, IngestError, IngestResult, bad_rows, event_codes, export_files, finish, is_parquet,
    most_frequent, normalize_pages, seconds_out_of_range,
)
from .ga360 import ACROSS_MIDNIGHT, page_names
from .generic import read_bytes, read_json_lines

VALUE = pl.Struct({"string_value": pl.Utf8, "int_value": pl.Utf8})
EVENT = pl.Struct({
    "event_timestamp": pl.Utf8,
    "event_name": pl.Utf8,
    "user_pseudo_id": pl.Utf8,
    "user_id": pl.Utf8,
    "event_params": pl.List(pl.Struct({"key": pl.Utf8, "value": VALUE})),
    "items": pl.List(pl.Struct({"item_name": pl.Utf8, "item_category": pl.Utf8})),
})


def _arrow(dtype: pl.DataType) -> pa.DataType:
    if isinstance(dtype, pl.Struct):
        return pa.struct([(f.name, _arrow(f.dtype)) for f in dtype.fields])
    return pa.list_(_arrow(dtype.inner)) if isinstance(dtype, pl.List) else pa.string()


# pyarrow parses export lines with nested arrays several times faster than polars' read_ndjson (measured by
# bench/bench_ingest.py's first versions); it needs the exact
# types (strings, as BigQuery writes INTEGERs), and anything else takes the checked path of read_json_lines.
FAST_JSON = pa_json.ParseOptions(explicit_schema=pa.schema([(k, _arrow(t)) for k, t in EVENT.to_schema().items()]),
                                 unexpected_field_behavior="ignore")
PAGES = ("page_location", "page_title")
ITEMS = ("item_name", "item_category")
USERS = ("user_pseudo_id", "user_id")
EMPTY_ITEMS = ("page", "bad")  # what a view_item without items is: its page, or a bad row
URL_ORIGIN = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*"  # scheme and host: a page is the URL's path


def day_files(path: str | Path) -> list[Path]:
    """The export files of `path` (a file, a folder of events_* files or a glob), in date order."""
    return export_files(path, "events", "GA4")


def read_ga4(
    path: str | Path,
    *,
    user: str = "user_pseudo_id",
    page: str = "page_location",
    items: str | None = "item_name",
    cart_events: str | tuple[str, ...] = ("add_to_cart",),
    purchase_events: str | tuple[str, ...] = ("purchase",),
    empty_items: str = "page",
    on_bad_rows: str = "error",
) -> IngestResult:
    for name, value, valid in (("user", user, USERS), ("page", page, PAGES), ("items", items, (*ITEMS, None)),
                               ("empty_items", empty_items, EMPTY_ITEMS)):
        if value not in valid:
            raise ValueError(f"ga4: {name} must be one of {list(valid)}, not {value!r}")
    outcomes = {e: CART for e in event_codes(cart_events)} | {e: PURCHASE for e in event_codes(purchase_events)}
    skipped: dict[str, int] = {}
    frames, names = [], []
    for number, file in enumerate(day_files(path)):
        events, event_names = _file_events(file, user, page, items, empty_items, outcomes, on_bad_rows, skipped)
        frames.append(events.with_columns(file=pl.lit(number)))
        names.append(event_names)
    events = pl.concat(frames)
    days = events.drop_nulls("session").group_by("session").agg(pl.col("file").n_unique())
    crossing = int((days["file"] > 1).sum())
    events = (
        events
        .sort(["us", "file", "_row", "item"])  # the row (and item) order within a microsecond
        .select("user", "session", ts=pl.col("us") // 1000, page=normalize_pages(pl.col("page")))
    )
    event_values = most_frequent(pl.concat(names))
    notes = {ACROSS_MIDNIGHT: crossing} if crossing else {}
    return IngestResult(finish(events), "ga4", str(path), skipped, event_values=event_values, notes=notes)


def _read(file: Path, on_bad_rows: str, skipped: dict[str, int]) -> pl.DataFrame:
    """A file's events in the EVENT layout plus `_row` (0-based line or row): JSON lines or Parquet."""
    if not is_parquet(file):
        data = read_bytes(file)
        try:
            data.decode("utf-8")  # pyarrow lets invalid UTF-8 through; read_json_lines names its line
            table = pa_json.read_json(io.BytesIO(data), parse_options=FAST_JSON)
            if table.num_rows == data.count(b"\n") + (not data.endswith(b"\n")):  # no blank line: rows are lines
                return pl.from_arrow(table).with_row_index("_row")
        except (UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        return read_json_lines(file, EVENT, on_bad_rows, skipped)
    fields = EVENT.to_schema()
    try:
        present = [c for c in pl.read_parquet_schema(file) if c in fields]  # an export has many more columns
        raw = pl.read_parquet(file, columns=present, row_index_name="_row")
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as e:
        raise IngestError(file, f"not a readable Parquet file: {e}".splitlines()[0],
                          hint="export or copy the file again") from None
    # Top-level fields the export left out are null; nested ones are read by name where they are used.
    return raw.select("_row", *[pl.col(c) if c in raw.columns else pl.lit(None, fields[c]).alias(c) for c in fields])


def _param(key: str, field: str) -> pl.Expr:
    """The event parameter `key`'s value.<field> (as text), or null when the event has no such parameter."""
    value = pl.element().struct.field("value").struct.field(field).cast(pl.Utf8)
    return pl.col("event_params").list.eval(value.filter(pl.element().struct.field("key") == key)).list.first()


def _named_pages(events: pl.DataFrame, page: str, what: str, file: Path, on_bad_rows: str,
                 skipped: dict[str, int]) -> pl.DataFrame:
    """`events` with `page`: their page parameter, named by the rule of the module docstring."""
    events = events.with_columns(page=_param(page, "string_value"))
    events = bad_rows(events, events["page"].is_null(), file, f"{what} without a {page} parameter", on_bad_rows,
                      skipped)
    if page == "page_location":
        events = events.with_columns(page=page_names(events["page"].str.replace(URL_ORIGIN, "")))
    return events


def _file_events(file: Path, user: str, page: str, items: str | None, empty_items: str, outcomes: dict[str, str],
                 on_bad_rows: str, skipped: dict[str, int]) -> tuple[pl.DataFrame, pl.Series]:
    """One file's pages and outcomes (_row, us, user, session, page not yet normalised, item: the order
    among the event's pages), and every event's name (for the no-outcome warning)."""
    raw = _read(file, on_bad_rows, skipped)
    if raw.height == 0:
        raise IngestError(file, "the file is empty", hint="point at a GA4 export file")
    pseudo = pl.col("user_pseudo_id").cast(pl.Utf8)
    raw = raw.with_columns(
        us=pl.col("event_timestamp").cast(pl.Utf8).str.strip_chars().cast(pl.Int64, strict=False),
        user=pl.coalesce(pl.col("user_id").cast(pl.Utf8), pseudo) if user == "user_id" else pseudo,
        session=pseudo + "-" + _param("ga_session_id", "int_value"),
        name=pl.col("event_name").cast(pl.Utf8),
    )
    names = raw["name"]
    raw = bad_rows(raw, raw["user"].is_null(), file, f"event without {user}", on_bad_rows, skipped)
    raw = bad_rows(raw, raw["us"].is_null(), file, "event without a numeric event_timestamp", on_bad_rows, skipped)
    raw = bad_rows(raw, seconds_out_of_range(raw["us"] // 1_000_000), file,
                   "event_timestamp out of range (microseconds since the epoch expected)", on_bad_rows, skipped)
    keep = ["_row", "us", "user", "session"]

    views = _named_pages(raw.filter(pl.col("name") == "page_view"), page, "page_view", file, on_bad_rows, skipped)
    if items is not None:
        viewed = pl.col("items").list.eval(pl.element().struct.field(items)).list.drop_nulls()
        item_views = raw.filter(pl.col("name") == "view_item").with_columns(page=viewed)
        no_items = item_views["page"].list.len().fill_null(0) == 0
        if empty_items == "page":
            fallback = _named_pages(item_views.filter(no_items).drop("page"), page, f"view_item with no {items} and",
                                    file, on_bad_rows, skipped)
            views, item_views = pl.concat([views, fallback]), item_views.filter(~no_items)
        else:
            item_views = bad_rows(item_views, no_items, file, f"view_item without an item with an {items}",
                                  on_bad_rows, skipped, hint="read such a view_item as its page (empty_items='page'), "
                                  "fix the export, or skip them")
    frames = [views.select(*keep, "page", item=pl.lit(0))]
    if items is not None:
        item_views = item_views.with_columns(item=pl.int_ranges(pl.col("page").list.len())).explode("page", "item")
        frames.append(item_views.select(*keep, "page", "item"))
    outcome_rows = raw.filter(pl.col("name").is_in(list(outcomes)))
    # After every page of its event (view_item pages are numbered from 0).
    frames.append(outcome_rows.select(*keep, page=pl.col("name").replace_strict(outcomes), item=pl.lit(1 << 30)))
    return pl.concat([f.with_columns(pl.col("item").cast(pl.Int64)) for f in frames]), names
