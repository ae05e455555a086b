"""Adobe Analytics data feed: hit data (hit_data.tsv, or the multi-file delivery's <rsid>_<date>.tsv, plain
or gzipped) with the lookup files delivered beside it: column_headers.tsv (the hit data's column names, one
tab-separated line) and event.tsv (event id -> name). `path` is one hit data file (lookups in its folder or
in `lookups`), or a feed folder: every .tsv(.gz) file in it and its subfolders (e.g. one unzipped
delivery per day) that is not a lookup file is hit data, read with the column_headers.tsv of its own folder
or the nearest folder above it.

Followed field by field from Adobe's Experience League pages: the data column reference
(analytics/export/analytics-data-feed/data-feed-contents/datafeeds-reference), "Use data feeds to
calculate common metrics" (datafeeds-calculate) and "Special characters in data feeds" (datafeeds-spec-chars):
  - rows with exclude_hit other than 0 and rows with hit_source 5, 7, 8 or 9 (data sources) are left out
    (counted in the summary's dropped rows);
  - a tab, newline or backslash preceded by a backslash is part of a value, not a delimiter;
  - visitor = post_visid_high-post_visid_low; visit = visitor-visit_num-visit_start_time_gmt (the
    start time when the feed has it); time = hit_time_gmt (unix seconds);
  - outcomes from post_event_list, comma-separated event ids (1 = purchase, 12 = cart addition) named in
    event.tsv.

Naming rule: a page view (a row with post_page_event 0, or any row when the feed has no such column) is a
page: its post_pagename, or when that is empty the path of post_page_url read as a GA360 pagePath
(`ga360.page_names`: "https://www.example.com/Shop/Shoes.html?id=1" -> `shop_shoes`); page="post_page_url"
always uses the URL. Link hits (100-102) and other non-page hits give no page. A hit whose post_event_list
holds an id in `cart_events` -> Cart, in `purchase_events` -> Purchase (ids, or names from event.tsv,
compared case-insensitively), after that hit's page. Ties in time keep visit_page_num, then file order.
"""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl

from .base import (
    CART, NOT_UTF8, NOT_UTF8_HINT, PURCHASE, IngestError, IngestResult, bad_rows, check_columns, event_codes,
    finish, most_frequent, normalize_pages, not_utf8, seconds_out_of_range,
)
from .ga360 import page_names
from .generic import read_bytes, read_csv_text

# Lookup files of a data feed delivery (never hit data).
LOOKUPS = {
    "column_headers", "event", "browser", "browser_type", "color_depth", "connection_type", "country",
    "javascript_version", "languages", "operating_systems", "plugins", "referrer_type", "resolution",
    "search_engines",
}
NEEDED = ["post_visid_high", "post_visid_low", "visit_num", "hit_time_gmt"]
OPTIONAL = ["post_pagename", "post_page_url", "post_event_list", "post_page_event", "exclude_hit", "hit_source",
            "visit_start_time_gmt", "visit_page_num"]
PAGES = ("post_pagename", "post_page_url")
DATA_SOURCES = ["5", "7", "8", "9"]
URL_ORIGIN = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*"
# Escaped delimiters become these bytes while the file is split into fields, then turn back.
ESCAPES = [(b"\\\\", b"\x01", "\\"), (b"\\\t", b"\x02", "\t"), (b"\\\n", b"\x03", "\n")]


def feed_files(path: str | Path, lookups: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(hit data file, folder of its lookup files) for each hit data file of `path`, in name order."""
    path = Path(path)
    if path.is_file():
        return [(path, Path(lookups) if lookups else path.parent)]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _is_hit_data(f))
        return [(f, Path(lookups) if lookups else _lookup_folder(f, path)) for f in files] or _no_files(path)
    files = sorted(Path(f) for f in glob.glob(str(path)) if Path(f).is_file())
    return [(f, Path(lookups) if lookups else f.parent) for f in files] or _no_files(path)


def _is_hit_data(file: Path) -> bool:
    name = file.name.lower().removesuffix(".gz")
    return name.endswith(".tsv") and name.removesuffix(".tsv") not in LOOKUPS


def _lookup_folder(file: Path, top: Path) -> Path:
    """The nearest folder from `file`'s up to `top` that holds column_headers.tsv (else `file`'s own)."""
    for folder in [file.parent, *file.parent.parents]:
        if _lookup_file(folder, "column_headers") or folder == top:
            return folder
    return file.parent


def _no_files(path: Path) -> list:
    raise IngestError(path, "no Adobe hit data files here (.tsv or .tsv.gz besides the lookup files)",
                      hint="point at a data feed folder, a hit_data.tsv file, or a glob of them")


def _lookup_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.tsv", folder / f"{name}.tsv.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_adobe(
    path: str | Path,
    *,
    page: str = "post_pagename",
    cart_events: str | tuple[str, ...] = ("12",),
    purchase_events: str | tuple[str, ...] = ("1",),
    lookups: str | Path | None = None,
    on_bad_rows: str = "error",
) -> IngestResult:
    if page not in PAGES:
        raise ValueError(f"adobe: page must be one of {list(PAGES)}, not {page!r}")
    skipped: dict[str, int] = {}
    frames, seen = [], {}
    for number, (file, folder) in enumerate(feed_files(path, lookups)):
        names = _event_names(folder)
        outcomes = _outcome_ids(names, cart_events, CART) | _outcome_ids(names, purchase_events, PURCHASE)
        events, ids = _file_events(file, _column_names(folder, file), page, outcomes, on_bad_rows, skipped)
        frames.append(events.with_columns(file=pl.lit(number)))
        for event_id, n in most_frequent(ids).items():
            label = f"{event_id} ({names[event_id]})" if event_id in names else event_id
            seen[label] = seen.get(label, 0) + n
    events = (
        pl.concat(frames)
        .sort(["ts", "page_num", "file", "_row", "after"], nulls_last=True)
        .select("user", "session", "ts", page=normalize_pages(pl.col("page")))
    )
    return IngestResult(finish(events), "adobe", str(path), skipped, event_values=seen)


def _column_names(folder: Path, file: Path) -> list[str]:
    headers = _lookup_file(folder, "column_headers")
    if headers is None:
        raise IngestError(file, f"no column_headers.tsv in {folder}",
                          hint="keep the data feed's lookup files beside the hit data, or name their folder")
    lines = read_bytes(headers).decode("utf-8", errors="replace").splitlines()
    names = lines[0].strip().split("\t") if lines else []
    # A feed without either page column has no pages: ask for the usual one.
    needed = NEEDED if set(PAGES) & set(names) else [*NEEDED, PAGES[0]]
    check_columns(headers, names, needed, "column_headers.tsv names the hit data's columns, separated by tabs")
    return names


def _event_names(folder: Path) -> dict[str, str]:
    """event.tsv: event id -> name (empty when the feed has no event.tsv)."""
    lookup = _lookup_file(folder, "event")
    if lookup is None:
        return {}
    rows = [line.split("\t") for line in read_bytes(lookup).decode("utf-8", errors="replace").splitlines()]
    return {row[0].strip(): row[1].strip() for row in rows if len(row) >= 2}


def _outcome_ids(names: dict[str, str], codes: str | tuple[str, ...], outcome: str) -> dict[str, str]:
    """Event ids of the codes (an id, or a name in event.tsv) -> the outcome page."""
    by_name = {name.lower(): event_id for event_id, name in names.items()}
    return {by_name.get(code.lower(), code): outcome for code in event_codes(codes)}


def _unescape(column: str) -> pl.Expr:
    text = pl.col(column)
    for _, placeholder, character in ESCAPES:
        text = text.str.replace_all(placeholder.decode(), character, literal=True)
    return text


def _line_of(data: bytes, row: int) -> int:
    """1-based file line on which hit `row` starts: escaped newlines inside values count as lines."""
    start = 0
    for _ in range(row):
        start = data.index(b"\n", start) + 1
    return row + 1 + data.count(ESCAPES[2][1], 0, start)


def _check_fields(file: Path, data: bytes, columns: int) -> None:
    """Raise on the first hit with more fields than column_headers.tsv names (the reader would drop them
    silently). Counting all tabs is cheap; lines are looked at only when the count is off."""
    hits = data.count(b"\n") + (not data.endswith(b"\n"))
    if not data or data.count(b"\t") == hits * (columns - 1):
        return
    for row, line in enumerate(data.split(b"\n")):
        if line.count(b"\t") >= columns:
            raise IngestError(file, f"more fields than column_headers.tsv names ({columns})", _line_of(data, row),
                              "check that column_headers.tsv belongs to this hit data")


def _read_hits(file: Path, headers: list[str], on_bad_rows: str, skipped: dict[str, int]):
    """The columns this adapter uses (as text, escapes undone; missing optional ones null) plus `_row`, and
    the file line of a row."""
    data = read_bytes(file)
    if not data:
        raise IngestError(file, "the file is empty", hint="point at a data feed's hit data")
    for escaped, placeholder, _ in ESCAPES:
        data = data.replace(escaped, placeholder)
    _check_fields(file, data, len(headers))
    wanted = [c for c in NEEDED + OPTIONAL if c in headers]
    # The names as a first line: the reader then knows every column even when the first hit is cut short.
    named = "\t".join(headers).encode() + b"\n" + data
    try:
        raw, lossy = read_csv_text(named, separator="\t", quote_char=None, columns=wanted)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise IngestError(file, f"not an Adobe hit data file: {str(e).splitlines()[0]}",
                          hint="check that it is a data feed's hit data") from None
    raw = raw.select("_row", *[_unescape(c) for c in wanted])
    raw = raw.with_columns([pl.lit(None, pl.Utf8).alias(c) for c in OPTIONAL if c not in wanted])
    line_of = lambda row: _line_of(data, row)  # noqa: E731
    if lossy:
        raw = bad_rows(raw, not_utf8(raw, wanted), file, NOT_UTF8, on_bad_rows, skipped, line_of, NOT_UTF8_HINT)
    return raw, line_of


def _file_events(file: Path, headers: list[str], page: str, outcomes: dict[str, str], on_bad_rows: str,
                 skipped: dict[str, int]) -> tuple[pl.DataFrame, pl.Series]:
    """One hit data file's pages and outcomes (_row, ts, page_num, user, session, page, after), and the event
    ids of its hits (for the no-outcome warning)."""
    raw, line_of = _read_hits(file, headers, on_bad_rows, skipped)
    excluded = raw["exclude_hit"].fill_null("0").str.strip_chars().is_in(["", "0"]).not_()
    skipped_by_rule = {"hit excluded by Adobe (exclude_hit not 0)": excluded,
                       "data source hit (hit_source 5, 7, 8 or 9)": raw["hit_source"].is_in(DATA_SOURCES) & ~excluded}
    for reason, rows in skipped_by_rule.items():
        if rows.any():
            skipped[reason] = skipped.get(reason, 0) + int(rows.sum())
    raw = raw.filter(~excluded & ~raw["hit_source"].is_in(DATA_SOURCES).fill_null(False))

    high, low = pl.col("post_visid_high").str.strip_chars(), pl.col("post_visid_low").str.strip_chars()
    user = pl.when((high.str.len_chars() > 0) & (low.str.len_chars() > 0)).then(high + "-" + low)
    visit = pl.col("visit_num").str.strip_chars()
    start = pl.col("visit_start_time_gmt").str.strip_chars()
    session = pl.when(visit.str.len_chars() > 0).then(pl.concat_str([user, visit, start], separator="-",
                                                                     ignore_nulls=True))
    seconds = pl.col("hit_time_gmt").str.strip_chars().cast(pl.Int64, strict=False)
    raw = raw.with_columns(user=user, session=session, seconds=seconds)
    raw = bad_rows(raw, raw["user"].is_null(), file, "hit without post_visid_high and post_visid_low",
                   on_bad_rows, skipped, line_of)
    raw = bad_rows(raw, raw["seconds"].is_null(), file, "hit without a numeric hit_time_gmt", on_bad_rows, skipped,
                   line_of)
    raw = bad_rows(raw, seconds_out_of_range(raw["seconds"]), file,
                   "hit_time_gmt out of range (unix seconds expected)", on_bad_rows, skipped, line_of)
    raw = raw.with_columns(ts=pl.col("seconds") * 1000,
                           page_num=pl.col("visit_page_num").str.strip_chars().cast(pl.Int64, strict=False))
    keep = ["_row", "ts", "page_num", "user", "session"]

    is_view = pl.col("post_page_event").str.strip_chars().fill_null("0") == "0"
    url = pl.col("post_page_url").str.strip_chars()
    url = pl.when(url.str.len_chars() > 0).then(url.str.replace(URL_ORIGIN, ""))
    views = raw.filter(is_view).with_columns(url=url, name=pl.col("post_pagename").str.strip_chars())
    paths = page_names(views["url"])
    name = views["name"] if page == "post_pagename" else pl.Series([None] * views.height, dtype=pl.Utf8)
    views = views.with_columns(page=pl.when(name.str.len_chars() > 0).then(name).otherwise(paths))
    frames = [views.filter(pl.col("page").is_not_null()).select(*keep, "page", after=pl.lit(0))]

    ids = raw.select(*keep, id=pl.col("post_event_list").str.split(",")).explode("id").with_columns(
        pl.col("id").str.replace(r"[=:].*", "").str.strip_chars()  # a value or serial after an event id
    )
    hits = ids.filter(pl.col("id").is_in(list(outcomes))).with_columns(page=pl.col("id").replace_strict(outcomes))
    frames.append(hits.unique(["_row", "page"], keep="first", maintain_order=True).select(*keep, "page",
                                                                                         after=pl.lit(1)))
    return pl.concat(frames), ids["id"].filter(ids["id"].str.len_chars() > 0)
