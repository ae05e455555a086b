"""Google Analytics 360 BigQuery export (e.g. the Google Merchandise Store sample): the daily tables
ga_sessions_YYYYMMDD (and ga_sessions_intraday_YYYYMMDD), one GA session per row with fullVisitorId,
visitId, visitStartTime (unix s) and hits[], exported as JSON lines (plain or gzipped) or Parquet; one file,
a folder of them (files named ga_sessions_*) or a glob ("export/ga_sessions_2016*.parquet").

Fields as Google's "[UA] BigQuery Export schema" documents them
(https://support.google.com/analytics/answer/3437719). Each file is read on its own and its needed fields
cast to one layout (SESSION): the daily Parquet files of one export differ in details (a sub-field that is
all null on a day is typed null there), and BigQuery writes INTEGER columns to JSON as strings.

Naming rule: a page is the hit's page.pagePath made readable, in this order:
  1. drop the query string and fragment (from the first "?" or "#");
  2. "+s" or "++s" at a word end after a letter other than "s" is the store's encoding of an
     apostrophe-s ("men++s", "women+s", "kid+s") and becomes "s" ("mens", "womens", "kids");
     "mens+s+s" (S/S, short sleeve) stays "mens s s", but a rare "google+s+s" reads "googles s";
  3. URL-decode ("+" -> space, %xx -> character) and lowercase;
  4. drop apostrophes (so "men's" -> "mens"), the leading "/google redesign" folder and web file
     extensions (.html .htm .axd .asp .aspx .php .jsp) at the end of a path segment;
  5. every run of non-alphanumerics -> one space, trimmed; empty -> "home".
So "/google+redesign/apparel/men++s/men++s+t+shirts" -> "apparel mens mens t shirts" (the paper's
"apparel men's men's t shirts"), "/basket.html" -> "basket", "/myaccount.html?mode=vieworder" ->
"myaccount"; `normalize_pages` then joins the words with "_". Only hits of type PAGE are pages.
A hit of any type with eCommerceAction.action_type "3" (add to cart) adds Cart, "6" (purchase) adds
Purchase, at that hit's time, after the page of the same hit.
user = fullVisitorId, session = fullVisitorId-visitId, ts = visitStartTime * 1000 + hits[].time (ms).

A session that crosses midnight is two rows, one in each day's table, with the same fullVisitorId and
visitId (the second with its own visitStartTime, its hit numbers going on): both are one session, counted
in the notes. A hit read twice (the same session and hit in two rows, e.g. a day given twice) is kept once
and counted. A session without a PAGE hit (nothing viewed: events only) gives no page and is left out,
counted, its outcome hits with it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote_plus

import polars as pl

from .base import (
    CART, PURCHASE, IngestError, IngestResult, bad_rows, conform, export_files, finish, is_parquet,
    normalize_pages, seconds_out_of_range,
)
from .generic import read_json_lines

HIT = pl.Struct({
    "hitNumber": pl.Utf8,
    "time": pl.Utf8,
    "type": pl.Utf8,
    "page": pl.Struct({"pagePath": pl.Utf8}),
    "eCommerceAction": pl.Struct({"action_type": pl.Utf8}),
})
SESSION = pl.Struct({
    "fullVisitorId": pl.Utf8, "visitId": pl.Utf8, "visitStartTime": pl.Utf8, "hits": pl.List(HIT),
})
ACTION_PAGES = {"3": CART, "6": PURCHASE}
POSSESSIVE = r"([\p{L}&&[^sS]])\+\+?([sS])\b"
WEB_EXTENSION = r"\.(?:html?|axd|aspx?|php|jsp)(/|$)"
NO_PAGE_HIT = "session without a PAGE hit (nothing viewed; its outcome hits left out with it)"
HIT_TWICE = "hit read twice (the same session and hit number in two rows or files; kept once)"
ACROSS_MIDNIGHT = "sessions that cross midnight (rows in two daily files), read as one session"


def day_files(path: str | Path) -> list[Path]:
    """The export files of `path` (a file, a folder of ga_sessions_* files or a glob), in date order."""
    return export_files(path, "ga_sessions", "GA360")


def read_ga360(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    skipped: dict[str, int] = {}
    files = day_files(path)
    hits = pl.concat([_file_hits(file, on_bad_rows, skipped).with_columns(file=pl.lit(number))
                      for number, file in enumerate(files)])
    notes = {}
    if len(files) > 1:
        days = hits.group_by("session").agg(pl.col("file").n_unique())
        if crossing := int((days["file"] > 1).sum()):
            notes[ACROSS_MIDNIGHT] = crossing
    columns = ["session", "hit", "ts", "type", "path", "action"]
    unique = hits.unique(subset=columns, keep="first", maintain_order=True)
    if twice := hits.height - unique.height:
        skipped[HIT_TWICE] = twice
    views = unique.filter(pl.col("type") == "PAGE")
    views = views.with_columns(page=page_names(views["path"]), after=0)
    outcomes = unique.filter(pl.col("action").is_in(list(ACTION_PAGES))).with_columns(
        page=pl.col("action").replace_strict(ACTION_PAGES), after=1
    )
    events = (
        pl.concat([views, outcomes])
        .sort(["ts", "session", "hit", "after"])  # session only breaks ties between sessions
        .select("user", "session", "ts", page=normalize_pages(pl.col("page")))
    )
    return IngestResult(finish(events), "ga360", str(path), skipped, notes=notes)


def _read(file: Path, on_bad_rows: str, skipped: dict[str, int]) -> pl.DataFrame:
    """A file's sessions in the SESSION layout plus `_row` (0-based line or row): JSON lines or Parquet."""
    if not is_parquet(file):
        return read_json_lines(file, SESSION, on_bad_rows, skipped)
    try:
        schema = pl.read_parquet_schema(file)
        present = [c for c in SESSION.to_schema() if c in schema]  # an export has many more columns
        raw = pl.read_parquet(file, columns=present, row_index_name="_row")
        return raw.select("_row", *[conform(pl.col(c), schema.get(c), dtype).alias(c)
                                    for c, dtype in SESSION.to_schema().items()])
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError) as e:
        raise IngestError(file, f"not a readable GA360 Parquet export: {e}".splitlines()[0],
                          hint="export or copy the file again") from None


def _file_hits(file: Path, on_bad_rows: str, skipped: dict[str, int]) -> pl.DataFrame:
    """One file's hits of sessions with a PAGE hit, checked (`_hits` has the columns), ts in ms."""
    sessions = _read(file, on_bad_rows, skipped)
    if sessions.height == 0:
        raise IngestError(file, "the file is empty", hint="point at a GA360 export file")
    start = sessions["visitStartTime"].cast(pl.Int64, strict=False)
    incomplete = sessions["fullVisitorId"].is_null() | sessions["visitId"].is_null() | start.is_null()
    sessions = bad_rows(
        sessions.with_columns(start=start), incomplete, file,
        "session without fullVisitorId, visitId or a numeric visitStartTime", on_bad_rows, skipped,
    )
    sessions = bad_rows(
        sessions, seconds_out_of_range(sessions["start"]), file,
        "visitStartTime out of range (unix seconds expected)", on_bad_rows, skipped,
    )
    viewed = pl.col("hits").list.eval(pl.element().struct.field("type") == "PAGE").list.any().fill_null(False)
    no_page = sessions.select(~viewed).to_series()
    if n := int(no_page.sum()):
        skipped[NO_PAGE_HIT] = skipped.get(NO_PAGE_HIT, 0) + n
        sessions = sessions.filter(~no_page)
    hits = _hits(sessions)
    hits = bad_rows(hits, hits["time"].is_null(), file, "hit without a numeric time", on_bad_rows, skipped)
    hits = bad_rows(hits, (hits["type"] == "PAGE") & hits["path"].is_null(), file, "PAGE hit without page.pagePath",
                    on_bad_rows, skipped)
    return bad_rows(
        hits, seconds_out_of_range(hits["time"] // 1000), file, "hit time out of range (ms since the visit start)",
        on_bad_rows, skipped,
    ).with_columns(ts=pl.col("start") * 1000 + pl.col("time"))


def _hits(sessions: pl.DataFrame) -> pl.DataFrame:
    """One row per hit: its session's line (_row), user, session, start (s), time (ms into the visit), hit
    number, type, path, action."""
    hit = pl.col("hits")
    return (
        sessions.explode("hits")
        .filter(hit.is_not_null())
        .select(
            "_row",
            "start",
            user=pl.col("fullVisitorId"),
            session=pl.col("fullVisitorId") + "-" + pl.col("visitId"),
            time=hit.struct.field("time").cast(pl.Int64, strict=False),
            hit=hit.struct.field("hitNumber").cast(pl.Int64, strict=False),
            type=hit.struct.field("type"),
            path=hit.struct.field("page").struct.field("pagePath"),
            action=hit.struct.field("eCommerceAction").struct.field("action_type"),
        )
    )


def page_names(paths: pl.Series) -> pl.Series:
    """Readable page names of GA pagePaths, by the steps in the module docstring."""
    distinct = paths.drop_nulls().unique()
    encoded = distinct.str.replace(r"[?#].*", "").str.replace_all(POSSESSIVE, "${1}${2}")
    # polars has no URL decoding; it runs once per distinct path, and a site has few of them.
    decoded = pl.Series([unquote_plus(p) for p in encoded], dtype=pl.Utf8)
    words = (
        decoded.str.to_lowercase()
        .str.replace_all(r"['’]", "")
        .str.replace(r"^/google redesign(/|$)", "/")
        .str.replace_all(WEB_EXTENSION, "$1")
        .str.replace_all(r"[^\p{L}\p{N}]+", " ")
        .str.strip_chars()
        .str.replace(r"^$", "home")
    )
    return paths.replace_strict(distinct, words, default=None)
