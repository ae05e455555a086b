"""Google Analytics 360 BigQuery export (e.g. the Google Merchandise Store sample): JSON lines, plain
or gzipped, one GA session per line with fullVisitorId, visitId, visitStartTime (unix s) and hits[].

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
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote_plus

import polars as pl

from .base import CART, PURCHASE, IngestResult, bad_rows, finish, normalize_pages, seconds_out_of_range
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


def read_ga360(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    skipped: dict[str, int] = {}
    sessions = read_json_lines(path, SESSION, on_bad_rows, skipped)
    start = sessions["visitStartTime"].cast(pl.Int64, strict=False)
    incomplete = sessions["fullVisitorId"].is_null() | sessions["visitId"].is_null() | start.is_null()
    sessions = bad_rows(
        sessions.with_columns(start=start), incomplete, path,
        "session without fullVisitorId, visitId or a numeric visitStartTime", on_bad_rows, skipped,
    )
    sessions = bad_rows(
        sessions, seconds_out_of_range(sessions["start"]), path,
        "visitStartTime out of range (unix seconds expected)", on_bad_rows, skipped,
    )
    hits = _hits(sessions)
    hits = bad_rows(hits, hits["time"].is_null(), path, "hit without a numeric time", on_bad_rows, skipped)
    hits = bad_rows(
        hits, seconds_out_of_range(hits["time"] // 1000), path, "hit time out of range (ms since the visit start)",
        on_bad_rows, skipped,
    ).with_columns(ts=pl.col("start") * 1000 + pl.col("time"))
    views = hits.filter(pl.col("type") == "PAGE")
    views = bad_rows(
        views, views["path"].is_null(), path, "PAGE hit without page.pagePath", on_bad_rows, skipped
    )
    views = views.with_columns(page=page_names(views["path"]), after=0)
    outcomes = hits.filter(pl.col("action").is_in(list(ACTION_PAGES))).with_columns(
        page=pl.col("action").replace_strict(ACTION_PAGES), after=1
    )
    events = (
        pl.concat([views, outcomes])
        .sort(["ts", "session", "hit", "after"])  # session only breaks ties between sessions
        .select("user", "session", "ts", page=normalize_pages(pl.col("page")))
    )
    return IngestResult(finish(events), "ga360", str(path), skipped)


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
