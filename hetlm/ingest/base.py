"""The one table every ingest adapter produces, and the error every adapter raises.

Event table (polars DataFrame), one row per page view, in log order:

    user     Utf8    user id (never null)
    session  Utf8    session id from the log, or null (then sessions are split on an inactivity gap)
    ts       Int64   milliseconds since the epoch; sources without clocks use a synthetic order
    page     Utf8    page name, normalised by `normalize_pages`: whitespace runs become "_", so one
                     page is one whitespace-free token. Outcome events are the pages CART / PURCHASE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

CART = "Cart"
PURCHASE = "Purchase"
OUTCOME_PAGES = (CART, PURCHASE)

# A viewed page named like an outcome would count as one (a log without a cart event got a cart rate of 0.57).
OUTCOME_NAMED_VIEW = f"viewed page named like an outcome ({', '.join(OUTCOME_PAGES)}), not a cart/purchase event"

EVENT_SCHEMA = {"user": pl.Utf8, "session": pl.Utf8, "ts": pl.Int64, "page": pl.Utf8}
# Latest accepted clock, 9999-12-31T23:59:59 UTC: later values are corrupt, and x1000 would overflow Int64.
MAX_SECONDS = 253_402_300_799
# Undecodable bytes become U+FFFD when a file is read with lossy UTF-8 decoding.
REPLACEMENT_CHAR = "\ufffd"
NOT_UTF8 = "text that is not valid UTF-8"
NOT_UTF8_HINT = "convert the file to UTF-8 (e.g. iconv -f cp1252 -t utf-8), or pass --skip-bad-rows"


class IngestError(ValueError):
    """A problem in an input file, said with the file, the line and what to do."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, hint: str = ""):
        self.path, self.line, self.problem, self.hint = str(path), line, problem, hint
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}" + (f" ({hint})" if hint else ""))


@dataclass
class IngestResult:
    """Events plus what was skipped on the way (reason -> row count)."""

    events: pl.DataFrame
    source: str
    path: str
    skipped: dict[str, int] = field(default_factory=dict)
    # True when the log has no user ids: each user is one anonymous visit.
    anonymous: bool = False
    # Values kept but worth knowing (reason -> count), e.g. distinct page names that normalisation merged.
    notes: dict[str, int] = field(default_factory=dict)


def normalize_pages(expr: pl.Expr) -> pl.Expr:
    """Page names as single tokens: trimmed, whitespace runs (incl. newlines) -> '_', empty -> null."""
    # \x1c-\x1f (information separators) are whitespace to Python's str.split, though not to \s.
    cleaned = expr.cast(pl.Utf8).str.replace_all(r"[\s\x1c-\x1f]+", " ").str.strip_chars().str.replace_all(" ", "_")
    return pl.when(cleaned.str.len_chars() > 0).then(cleaned).otherwise(None)


MERGED_PAGES = "distinct page names merged into one by normalisation (e.g. 'a b' and 'a_b')"
NUMERIC_TWIN_USERS = "distinct user ids equal as numbers but written differently (e.g. '1' and '1.0'; kept apart)"


def name_notes(raw_pages: pl.Series, pages: pl.Series, users: pl.Series) -> dict[str, int]:
    """Counts of the two silent look-alikes of a log: raw page names that became one page, and user ids that
    differ as text but not as numbers (two users, as the log writes them; said so it can be fixed)."""
    names = pl.DataFrame({"raw": raw_pages, "page": pages}).drop_nulls().unique()
    merged = names.group_by("page").len().filter(pl.col("len") > 1)["len"].sum()
    ids = users.unique().to_frame("user").with_columns(
        number=pl.col("user").str.replace(r"^([+-]?)0*(\d+?)(\.0*)?$", "${1}${2}"))
    twins = ids.group_by("number").len().filter(pl.col("len") > 1)["len"].sum()
    return {name: int(n) for name, n in ((MERGED_PAGES, merged), (NUMERIC_TWIN_USERS, twins)) if n}


def finish(events: pl.DataFrame) -> pl.DataFrame:
    """Cast to EVENT_SCHEMA, in column order."""
    return events.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])


def bad_rows(
    raw: pl.DataFrame,
    bad: pl.Series,
    path: str | Path,
    problem: str,
    on_bad_rows: str,
    skipped: dict[str, int],
    line_offset: int | Callable[[int], int] = 1,
    hint: str = "fix the file, or pass --skip-bad-rows to drop such rows and count them in the summary",
) -> pl.DataFrame:
    """Raise on the first bad row (default) or drop them all and count them under `problem`.

    `raw` must carry a `_row` index column (0-based data row); `line_offset` turns it into a
    1-based file line number: added to it (1 for headerless files, 2 when there is a header line), or
    called with it (CSV records whose quoted fields hold newlines span several lines).
    """
    n_bad = int(bad.sum())
    if n_bad == 0:
        return raw
    if on_bad_rows == "error":
        first = raw.filter(bad).row(0, named=True)
        row = int(first["_row"])
        line = line_offset(row) if callable(line_offset) else row + line_offset
        shown = {k: v for k, v in first.items() if k != "_row"}
        raise IngestError(path, f"{problem}: {shown} ({n_bad} such row(s) in all)", line, hint)
    skipped[problem] = skipped.get(problem, 0) + n_bad
    return raw.filter(~bad)


def check_columns(
    path: str | Path, present: list[str], needed: list[str],
    delimiter_hint: str = "the file is probably not comma-separated",
) -> None:
    """Raise when a needed column is missing; a one-column file almost always means the wrong delimiter."""
    missing = [c for c in needed if c not in present]
    if missing and len(present) == 1:
        raise IngestError(
            path, f"missing column(s) {missing}; the file has only one column {present}", 1, delimiter_hint
        )
    if missing:
        raise IngestError(
            path,
            f"missing column(s) {missing}; the file has {present}",
            1,
            "name the right columns (see `hetlm prepare --help`) or check the delimiter",
        )


def not_utf8(raw: pl.DataFrame, columns: list[str]) -> pl.Series:
    """Rows where any of `columns` held undecodable bytes (read with encoding="utf8-lossy")."""
    return raw.select(
        pl.any_horizontal([pl.col(c).str.contains(REPLACEMENT_CHAR, literal=True) for c in columns]).fill_null(False)
    ).to_series()


def seconds_out_of_range(seconds: pl.Series) -> pl.Series:
    """Unix times (s) beyond year 9999 or before -9999: corrupt, and they would overflow in ms."""
    return (seconds.abs() > MAX_SECONDS).fill_null(False)
