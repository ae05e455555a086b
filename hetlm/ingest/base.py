"""The one table every ingest adapter produces, and the error every adapter raises.

Event table (polars DataFrame), one row per page view, in log order:

    user     Utf8    user id (never null)
    session  Utf8    session id from the log, or null (then sessions are split on an inactivity gap)
    ts       Int64   milliseconds since the epoch; sources without clocks use a synthetic order
    page     Utf8    page name, normalised by `normalize_pages`: whitespace runs become "_", so one
                     page is one whitespace-free token. Outcome events are the pages CART / PURCHASE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

CART = "Cart"
PURCHASE = "Purchase"
OUTCOME_PAGES = (CART, PURCHASE)

EVENT_SCHEMA = {"user": pl.Utf8, "session": pl.Utf8, "ts": pl.Int64, "page": pl.Utf8}


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


def normalize_pages(expr: pl.Expr) -> pl.Expr:
    """Page names as single tokens: trimmed, whitespace runs (incl. newlines) -> '_', empty -> null."""
    cleaned = expr.cast(pl.Utf8).str.strip_chars().str.replace_all(r"\s+", "_")
    return pl.when(cleaned.str.len_chars() > 0).then(cleaned).otherwise(None)


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
    line_offset: int = 1,
    hint: str = "fix the file, or pass --skip-bad-rows to drop such rows and count them in the summary",
) -> pl.DataFrame:
    """Raise on the first bad row (default) or drop them all and count them under `problem`.

    `raw` must carry a `_row` index column (0-based data row); `line_offset` turns it into a
    1-based file line number (1 for headerless files, 2 when there is a header line).
    """
    n_bad = int(bad.sum())
    if n_bad == 0:
        return raw
    if on_bad_rows == "error":
        first = raw.filter(bad).row(0, named=True)
        line = int(first["_row"]) + line_offset
        shown = {k: v for k, v in first.items() if k != "_row"}
        raise IngestError(path, f"{problem}: {shown} ({n_bad} such row(s) in all)", line, hint)
    skipped[problem] = skipped.get(problem, 0) + n_bad
    return raw.filter(~bad)


def check_columns(path: str | Path, present: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise IngestError(
            path,
            f"missing column(s) {missing}; the file has {present}",
            1,
            "name the right columns (see `hetlm prepare --help`) or check the delimiter",
        )
