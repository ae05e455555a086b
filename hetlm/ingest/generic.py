"""Any click log as a table: CSV (any delimiter), TSV or Parquet, with the columns named by the user.

Naming rule: a page is `page_prefix` + the value of the `page` column. When an `event` column is
named, events listed in `cart_events` -> Cart and in `purchase_events` -> Purchase (compared
case-insensitively; lists or comma lists, e.g. "3" / "6" for a GA360 action_type, "addtocart" /
"transaction" for RetailRocket); any other event keeps its page. Users that are null, empty or "NA" become
"session:<session id>" (an anonymous visit) when a session column is named.

Also home to the small readers the other adapters share: `read_bytes`, `read_json_lines`, `to_millis`.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import polars as pl

from .base import (
    CART, NOT_UTF8, NOT_UTF8_HINT, OUTCOME_NAMED_VIEW, OUTCOME_PAGES, PURCHASE, IngestError, IngestResult, bad_rows,
    check_columns, event_codes, finish, most_frequent, name_notes, normalize_pages, not_utf8,
)

PARQUET_SUFFIXES = (".parquet", ".pq")
TAB_SUFFIXES = (".tsv", ".tab")
MISSING_USER = ("", "NA")
UNIT_MS = {"s": 1000, "ms": 1}
YEAR_MS = 365 * 86_400_000
END_MS = 4_102_444_800_000  # 2100-01-01, in ms


def read_generic(
    path: str | Path,
    *,
    user: str,
    page: str,
    time: str | None = None,
    session: str | None = None,
    event: str | None = None,
    order: str | None = None,
    sep: str | None = None,
    time_format: str | None = None,
    time_unit: str = "s",
    page_prefix: str = "",
    cart_events: str | tuple[str, ...] = ("cart",),
    purchase_events: str | tuple[str, ...] = ("purchase",),
    on_bad_rows: str = "error",
) -> IngestResult:
    """Events from a table whose columns are named by the caller.

    time: unix seconds/milliseconds (`time_unit`) or date/datetime strings (`time_format`, else
    inferred); None -> the data row index is the (synthetic) clock. order: a numeric column added
    to ts in milliseconds (e.g. Diginetica's timeframe within eventdate); used alone when time is None.
    Events are returned in file order.
    """
    if time_unit not in UNIT_MS:
        raise ValueError(f"time_unit must be one of {list(UNIT_MS)}, not {time_unit!r}")
    raw, line_of, lossy = read_table(path, sep)
    named = [c for c in (user, page, time, session, event, order) if c is not None]
    check_columns(
        path, [c for c in raw.columns if c != "_row"], named,
        "the delimiter is probably wrong: pass it with --sep (e.g. --sep ';')",
    )
    check_flat(path, raw.select(named))
    skipped: dict[str, int] = {}

    def drop(rows: pl.DataFrame, bad: pl.Series, problem: str, **hint: str) -> pl.DataFrame:
        return bad_rows(rows, bad, path, problem, on_bad_rows, skipped, line_of, **hint)

    if lossy:
        raw = drop(raw, not_utf8(raw, list(dict.fromkeys(named))), NOT_UTF8, hint=NOT_UTF8_HINT)
    raw = _with_users_and_pages(raw, drop, user, page, session, event, page_prefix, cart_events, purchase_events)
    raw = _with_times(raw, drop, path, time, order, time_format, time_unit)
    return _result(raw, path, page, event, page_prefix, skipped)


def _with_users_and_pages(
    raw: pl.DataFrame, drop: Callable[..., pl.DataFrame], user: str, page: str, session: str | None,
    event: str | None, page_prefix: str, cart_events: str | tuple[str, ...], purchase_events: str | tuple[str, ...],
) -> pl.DataFrame:
    """`_user`, `_anonymous`, `_session` and `_page` added; rows without a user or a page, and views named
    like an outcome page, dropped (or reported) by `drop`."""
    raw = raw.with_columns(_session=_blank_to_null(pl.col(session)) if session else pl.lit(None, pl.Utf8))
    raw = _with_users(raw, user)
    raw = drop(raw, raw["_user"].is_null(), "missing user id (and no session id to stand in)")
    raw = raw.with_columns(
        _page=_pages(page, event, page_prefix, event_codes(cart_events), event_codes(purchase_events))
    )
    raw = drop(raw, raw["_page"].is_null(), "missing page")
    view_named_like_outcome = pl.col("_page").is_in(OUTCOME_PAGES) & _outcomes(event, cart_events, purchase_events).is_null()
    return drop(
        raw, raw.select(view_named_like_outcome).to_series(), OUTCOME_NAMED_VIEW,
        hint="give the pages a --page-prefix, or pass --skip-bad-rows to drop such rows and count them",
    )


def _with_times(
    raw: pl.DataFrame, drop: Callable[..., pl.DataFrame], path: str | Path, time: str | None, order: str | None,
    time_format: str | None, time_unit: str,
) -> pl.DataFrame:
    """`_ts` (ms) added; rows whose time does not parse, or is implausible, dropped (or reported) by `drop`."""
    try:
        raw = raw.with_columns(_ts=_clock(raw, time, order, time_format, time_unit))
    except pl.exceptions.ComputeError as e:  # no value of the column looks like a date
        raise IngestError(
            path, f"no date/time format fits the {time!r} column ({str(e).splitlines()[0]})",
            hint="give the format with --time-format (e.g. '%d/%m/%Y %H:%M'), or name a unix-time column",
        ) from None
    raw = drop(
        raw, raw["_ts"].is_null(), f"unparsable time in {[c for c in (time, order) if c]}",
        hint="give time_format / time_unit, fix the file, or pass --skip-bad-rows",
    )
    if time is None:
        return raw
    return drop(
        raw, implausible_times(raw["_ts"]),
        "time out of range after unit conversion (before 1970 or after 2099, or in 1970 among later times)",
        hint=f"the column was read as {'dates' if time_format else f'unix {time_unit} if numeric'}: check "
             "--time-unit (s or ms; are seconds mixed with milliseconds?), or pass --skip-bad-rows",
    )


def _result(raw: pl.DataFrame, path: str | Path, page: str, event: str | None, page_prefix: str,
            skipped: dict[str, int]) -> IngestResult:
    events = raw.select(user="_user", session="_session", ts="_ts", page="_page")
    fallback_users = raw.filter(pl.col("_anonymous"))["_user"].n_unique()
    anonymous = fallback_users > events["user"].n_unique() / 2
    event_values = most_frequent(raw[event].cast(pl.Utf8).str.strip_chars()) if event else {}
    viewed = pl.lit(page_prefix) + _blank_to_null(pl.col(page))
    names = raw.select(raw=viewed, page=normalize_pages(viewed))
    notes = name_notes(names["raw"], names["page"], events["user"])
    return IngestResult(finish(events), "generic", str(path), skipped, anonymous, event_values=event_values, notes=notes)


def read_table(path: str | Path, sep: str | None) -> tuple[pl.DataFrame, Callable[[int], int], bool]:
    """All columns (CSV as strings) plus a 0-based `_row`, the file line of a row (for `bad_rows`), and
    whether the file held invalid UTF-8 (see `read_csv_text`)."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in PARQUET_SUFFIXES:
        try:
            return pl.read_parquet(path, row_index_name="_row"), lambda row: row + 1, False  # "line": 1-based row
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as e:  # corrupt files can panic
            raise IngestError(
                path, f"not a readable Parquet file: {e}".splitlines()[0], hint="export or copy the file again"
            ) from None
    separator = sep or ("\t" if suffix in TAB_SUFFIXES else ",")
    if len(separator) != 1:
        raise ValueError(f"the delimiter must be one character, not {separator!r}")
    try:
        raw, lossy = read_csv_text(path, separator=separator)
    except pl.exceptions.NoDataError:
        raise IngestError(path, "the file is empty", hint="point at a log with a header line") from None
    except (pl.exceptions.PolarsError, OSError) as e:
        raise csv_error(path, e, separator, f"a {separator!r}-separated table") from None
    return raw, partial(record_line, path, separator), lossy


def record_line(path: str | Path, separator: str, row: int) -> int:
    """The 1-based file line on which data row `row` (0-based, after the header line) starts. Rows are CSV
    records and a quoted field may hold newlines, so this counts records, not lines; it reads the file
    again, so it is only for error messages."""
    reader = csv.reader(io.StringIO(read_bytes(path).decode("utf-8", errors="replace"), newline=""),
                        delimiter=separator)
    try:
        for _ in itertools.islice(reader, row + 1):  # the header and the rows before
            pass
    except csv.Error:  # e.g. a field over csv's size limit: one line per row, as polars mostly has it
        return row + 2
    return reader.line_num + 1


def read_csv_text(path: str | Path, **options) -> tuple[pl.DataFrame, bool]:
    """All columns as text plus a 0-based `_row`, and whether the file held invalid UTF-8: then it is
    read again with each bad byte as U+FFFD for `not_utf8` to flag (a valid file is never flagged)."""
    try:
        return pl.read_csv(path, infer_schema=False, row_index_name="_row", **options), False
    except pl.exceptions.ComputeError as e:
        if "utf-8" not in str(e).lower():
            raise
    return pl.read_csv(path, infer_schema=False, row_index_name="_row", encoding="utf8-lossy", **options), True


def csv_error(path: str | Path, error: Exception, separator: str, expected: str) -> IngestError:
    """The IngestError for a CSV that polars could not read, naming the line when one has too many fields."""
    problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    gzip_problem = _gzip_problem(path)
    if gzip_problem:  # not the delimiter's fault
        return IngestError(path, f"truncated or corrupt gzip file ({gzip_problem})", hint="download or copy the file again")
    if "is not properly escaped" in str(error):
        start = problem.partition("`")[2][:60]
        return IngestError(
            path, f"a quoted field is never closed (it starts {start!r})",
            hint='close the quote, or write "" for a quote inside a field',
        )
    if "more fields" in problem:
        line = first_long_line(path, separator)
        if line is not None:
            return IngestError(
                path, "more fields than the first line has", line,
                "quote fields that hold the delimiter, or fix the line",
            )
    return IngestError(path, f"not {expected}: {problem}", hint="check the file's format and delimiter")


def _gzip_problem(path: str | Path) -> str | None:
    """What is wrong with a gzip file that does not decompress to its end (None: fine, or not gzip)."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return None
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        return str(e) or type(e).__name__
    return None


def first_long_line(path: str | Path, separator: str) -> int | None:
    """1-based number of the first line with more fields than line 1 (quoted text ignored), if any.

    Only for error messages: it reads the whole file, and a quoted field spanning lines can fool it.
    """
    try:
        text = read_bytes(path).decode("utf-8", errors="replace")
    except IngestError:
        return None
    lines = pl.Series(text.split("\n"))
    fields = lines.str.replace_all(r'"[^"]*"', "").str.count_matches(separator, literal=True)
    longer = (fields > fields[0]).arg_true()
    return int(longer[0]) + 1 if len(longer) else None


def check_flat(path: str | Path, columns: pl.DataFrame) -> None:
    """Named columns must hold text, numbers or times (Parquet can hold lists and structs)."""
    for name, dtype in columns.schema.items():
        if dtype.is_nested() or dtype == pl.Binary:
            raise IngestError(
                path, f"column {name!r} holds {dtype}, not text, numbers or times", 1,
                "name a column of plain values",
            )


def _blank_to_null(expr: pl.Expr) -> pl.Expr:
    text = expr.cast(pl.Utf8).str.strip_chars()
    return pl.when(text.str.len_chars() > 0).then(text).otherwise(None)


def _with_users(raw: pl.DataFrame, user: str) -> pl.DataFrame:
    """`_user`, falling back to the session id for anonymous rows; `_anonymous` marks the fallback."""
    given = pl.col(user).cast(pl.Utf8).str.strip_chars()
    missing = given.is_null() | given.is_in(MISSING_USER)
    return raw.with_columns(
        _user=pl.when(missing).then(pl.lit("session:") + pl.col("_session")).otherwise(given),
        _anonymous=missing,
    )


def _pages(
    page: str, event: str | None, prefix: str, cart_events: tuple[str, ...], purchase_events: tuple[str, ...]
) -> pl.Expr:
    """The page name of each row: outcome events by their event, any other row by its page column."""
    viewed = _blank_to_null(pl.col(page))
    return pl.coalesce(_outcomes(event, cart_events, purchase_events), normalize_pages(pl.lit(prefix) + viewed))


def _outcomes(event: str | None, cart_events: tuple[str, ...], purchase_events: tuple[str, ...]) -> pl.Expr:
    """CART / PURCHASE on outcome events, null on any other row."""
    if event is None:
        return pl.lit(None, pl.Utf8)
    kind = pl.col(event).cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    return (
        pl.when(kind.is_in([e.lower() for e in cart_events])).then(pl.lit(CART))
        .when(kind.is_in([e.lower() for e in purchase_events])).then(pl.lit(PURCHASE))
    )


def _clock(
    raw: pl.DataFrame, time: str | None, order: str | None, time_format: str | None, time_unit: str
) -> pl.Series:
    """ts in ms: time (+ order); order alone; or the row index when the log has no clock."""
    if time is None and order is None:
        return raw["_row"].cast(pl.Int64)
    ts = to_millis(raw[time], time_format, time_unit) if time is not None else 0
    return ts + to_millis(raw[order], None, "ms") if order is not None else ts


def implausible_times(ts: pl.Series) -> pl.Series:
    """Clocks (ms) no click log holds: before 1970 or from 2100 on (milliseconds read as seconds give years up to
    ~300,000), or in 1970's first year within a log that has times after 1990 (seconds read as milliseconds)."""
    bad = (ts < 0) | (ts >= END_MS)
    if (ts >= 20 * YEAR_MS).any():
        bad = bad | (ts < YEAR_MS)
    return bad.fill_null(False)


def to_millis(values: pl.Series, time_format: str | None = None, time_unit: str = "s") -> pl.Series:
    """Epoch milliseconds (Int64, null where unparsable) from numbers, dates or datetime strings.

    Numbers are unix time in `time_unit`; strings count as numbers when most of them parse as
    numbers and no `time_format` is given, else they are parsed with `time_format` (or inferred).
    """
    if values.dtype.is_temporal():
        return values.cast(pl.Datetime("ms")).dt.epoch("ms")
    text = values.cast(pl.Utf8).str.strip_chars()
    numbers = text.cast(pl.Float64, strict=False)
    if time_format is None and numbers.is_not_null().sum() * 2 > text.is_not_null().sum():
        return (numbers * UNIT_MS[time_unit]).round().cast(pl.Int64, strict=False)
    return text.str.to_datetime(time_format, strict=False).dt.epoch("ms")


def read_bytes(path: str | Path) -> bytes:
    """The whole file, gunzipped when it is gzip (by its magic bytes, not its name)."""
    data = Path(path).read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise IngestError(
            path, f"truncated or corrupt gzip file ({e})", hint="download or copy the file again"
        ) from None


def read_json_lines(
    path: str | Path, dtype: pl.Struct, on_bad_rows: str, skipped: dict[str, int]
) -> pl.DataFrame:
    """One row per non-blank line of a (gzipped) JSON-lines file: the `dtype` fields plus `_row`.

    Lines that are not a JSON object, not UTF-8 or not in the `dtype` layout are bad rows (raised with
    their line number, or skipped). Fields missing from a line are null; fields not in `dtype` are ignored.
    """
    data = read_bytes(path)
    n_lines = data.count(b"\n") + (not data.endswith(b"\n"))
    try:
        rows = pl.read_ndjson(data, schema=dtype.to_schema(), row_index_name="_row")
        if rows.height == n_lines:  # no blank lines skipped, so `_row` + 1 is the file line
            return rows
    except (pl.exceptions.PolarsError, OSError):  # OSError: bytes polars takes for a broken compressed stream
        pass
    return _decode_lines(path, data, dtype, on_bad_rows, skipped)


def _decode_lines(
    path: str | Path, data: bytes, dtype: pl.Struct, on_bad_rows: str, skipped: dict[str, int]
) -> pl.DataFrame:
    """The slow path of `read_json_lines`, for files with blank or malformed lines."""
    try:
        text, lossy = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, lossy = data.decode("utf-8", errors="replace"), True
    lines = pl.DataFrame({"line": text.split("\n")}).with_row_index("_row")
    lines = lines.with_columns(pl.col("line").str.strip_chars()).filter(pl.col("line") != "")
    if lines.height == 0:
        raise IngestError(path, "the file is empty", hint="point at a JSON-lines file")
    if lossy:
        lines = _drop_bad(lines, not_utf8(lines, ["line"]), path, NOT_UTF8, on_bad_rows, skipped, hint=NOT_UTF8_HINT)
    text = pl.col("line")
    ok = lines.select(text.str.starts_with("{") & text.str.json_path_match("$").is_not_null())[:, 0]
    lines = _drop_bad(
        lines, ~ok, path, "malformed JSON line (expected one JSON object per line)", on_bad_rows, skipped
    )
    misfit = _misfit_lines(lines["line"], dtype, first_only=on_bad_rows == "error")
    lines = _drop_bad(
        lines, pl.int_range(lines.height, eager=True).is_in(misfit), path,
        f"JSON values of the wrong type in the fields {list(dtype.to_schema())}", on_bad_rows, skipped,
    )
    decoded = lines["line"].str.json_decode(dtype)
    return pl.DataFrame({"_row": lines["_row"], "json": decoded}).unnest("json")


def _drop_bad(
    lines: pl.DataFrame, bad: pl.Series, path: str | Path, problem: str, on_bad_rows: str,
    skipped: dict[str, int], **hint: str,
) -> pl.DataFrame:
    """`bad_rows` on JSON lines, showing the line's first 80 characters."""
    shown = lines.select("_row", start=pl.col("line").str.slice(0, 80))
    kept = bad_rows(shown, bad, path, problem, on_bad_rows, skipped, **hint)
    return lines.filter(pl.col("_row").is_in(kept["_row"].implode()))


def _misfit_lines(lines: pl.Series, dtype: pl.Struct, first_only: bool) -> list[int]:
    """Indices of JSON lines that do not decode as `dtype`, found by bisection (cheap when few are)."""
    try:
        lines.str.json_decode(dtype)
        return []
    except pl.exceptions.PolarsError:
        if len(lines) == 1:
            return [0]
    half = len(lines) // 2
    misfit = _misfit_lines(lines[:half], dtype, first_only)
    if misfit and first_only:
        return misfit
    return misfit + [half + i for i in _misfit_lines(lines[half:], dtype, first_only)]
