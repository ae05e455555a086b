"""The one table every ingest adapter produces, and the error every adapter raises.

Event table (polars DataFrame), one row per page view, in log order:

    user     Utf8    user id (never null)
    session  Utf8    session id from the log, or null (then sessions are split on an inactivity gap)
    ts       Int64   milliseconds since the epoch; sources without clocks use a synthetic order
    page     Utf8    page name, normalised by `normalize_pages`: whitespace runs become "_", so one
                     page is one whitespace-free token. Outcome events are the pages CART / PURCHASE.
"""

from __future__ import annotations

import contextlib
import glob
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
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
EVENT_VALUES_KEPT = 20  # most frequent event values an adapter reports, for the no-outcome warning


class NoOutcomesWarning(UserWarning):
    """The log has event types, and none of them was read as Cart or Purchase."""


# Hints name the CLI's prepare/score flag; an error shows the spelling of its caller (`skip_spelling`).
SKIP_FLAG = "--skip-bad-rows"
_skip_spelling: ContextVar[str] = ContextVar("skip_spelling", default="on_bad_rows='skip'")  # the Python keyword


@contextlib.contextmanager
def skip_spelling(spelling: str) -> Iterator[None]:
    """IngestErrors shown within say "skip bad rows" as `spelling` (e.g. experiment's --set key)."""
    token = _skip_spelling.set(spelling)
    try:
        yield
    finally:
        _skip_spelling.reset(token)


class IngestError(ValueError):
    """A problem in an input file, said with the file, the line and what to do."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, hint: str = ""):
        self.path, self.line, self.problem, self.hint = str(path), line, problem, hint
        super().__init__(path, problem, line, hint)

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        hint = self.hint.replace(SKIP_FLAG, _skip_spelling.get())
        return f"{where}: {self.problem}" + (f" ({hint})" if hint else "")


@dataclass
class IngestResult:
    """Events plus what was skipped on the way (reason -> row count)."""

    events: pl.DataFrame
    source: str
    path: str
    skipped: dict[str, int] = field(default_factory=dict)
    # True when the log has no user ids: each user is one anonymous visit.
    anonymous: bool = False
    # How often each event type occurred (the most frequent EVENT_VALUES_KEPT), from adapters whose log
    # names event types: what to show when none of them became an outcome.
    event_values: dict[str, int] = field(default_factory=dict)
    # Values kept but worth knowing (reason -> count), e.g. distinct page names that normalisation merged.
    notes: dict[str, int] = field(default_factory=dict)


def event_codes(codes: str | Iterable[str]) -> tuple[str, ...]:
    """Outcome event codes from a comma list ("3,6", "addtocart") or a list of codes, stripped."""
    items = codes.split(",") if isinstance(codes, str) else codes
    return tuple(c for c in (str(item).strip() for item in items) if c)


def most_frequent(values: pl.Series) -> dict[str, int]:
    """The EVENT_VALUES_KEPT most frequent values of `values` (nulls left out) -> their counts."""
    counts = values.drop_nulls().cast(pl.Utf8).value_counts(sort=True, name="n").head(EVENT_VALUES_KEPT)
    return dict(zip(counts[:, 0].to_list(), counts["n"].to_list()))


def warn_if_no_outcomes(path: str | Path, event_values: dict[str, int], outcomes: int) -> None:
    """Say so (NoOutcomesWarning) when a log with event types gave no Cart or Purchase event: its
    outcome rates would all be 0 without a word. Lists the most frequent types to name instead."""
    if outcomes or not event_values:
        return
    seen = ", ".join(f"{value!r} ({n})" for value, n in sorted(event_values.items(), key=lambda kv: -kv[1])[:10])
    warnings.warn(
        f"{path}: no event was read as {CART} or {PURCHASE}, so every outcome rate will be 0; the most "
        f"frequent event types are {seen}. Name the add-to-cart and purchase types with --cart-events and "
        "--purchase-events (cart_events / purchase_events), e.g. --cart-events 3 --purchase-events 6 for GA360 "
        "action types",
        NoOutcomesWarning, stacklevel=2,
    )


def merge_counts(total: dict[str, int], more: dict[str, int]) -> None:
    """Add the counts `more` into `total` (event types seen chunk after chunk)."""
    for value, n in more.items():
        total[value] = total.get(value, 0) + n


def sample_users(events: pl.DataFrame, fraction: float, seed: int = 0) -> pl.DataFrame:
    """The events of about `fraction` of the users, chosen by a hash of the user id: the same users on
    every run and in every chunk of a log (with one polars version), so a sampled log keeps whole users."""
    if not 0 < fraction <= 1:
        raise ValueError(f"sample_users must be in (0, 1], not {fraction}")
    # A seed other than the partitions' (prepare hashes users with `seed` into partitions).
    kept = pl.col("user").hash(seed + 1_000_003) < int(fraction * 2**64 - 1)
    return events.filter(kept) if fraction < 1 else events


# Characters that show as nothing: zero-width space, non-joiner, joiner, word joiner, BOM (zero-width no-break).
ZERO_WIDTH = "[\u200b\u200c\u200d\u2060\ufeff]"


def unicode_text(expr: pl.Expr) -> pl.Expr:
    """Text as it reads: Unicode NFC (so 'Café' typed as e + combining accent is the one 'Café') and without
    zero-width characters."""
    return expr.cast(pl.Utf8).str.normalize("NFC").str.replace_all(ZERO_WIDTH, "")


def normalize_pages(expr: pl.Expr) -> pl.Expr:
    """Page names as single tokens: `unicode_text`, trimmed, whitespace runs (incl. newlines) -> '_', empty -> null."""
    # \x1c-\x1f (information separators) are whitespace to Python's str.split, though not to \s.
    cleaned = unicode_text(expr).str.replace_all(r"[\s\x1c-\x1f]+", " ").str.strip_chars().str.replace_all(" ", "_")
    return pl.when(cleaned.str.len_chars() > 0).then(cleaned).otherwise(None)


MERGED_PAGES = "distinct page names merged into one by normalisation (e.g. 'a b' and 'a_b')"
LOOK_ALIKE_PAGES = ("distinct page names that differ only in Unicode form or zero-width characters, merged into one "
                    "(e.g. 'Café' in NFC and NFD, 'Home' and 'Home' + U+200B)")
NUMERIC_TWIN_USERS = "distinct user ids equal as numbers but written differently (e.g. '1' and '1.0'; kept apart)"


def name_notes(raw_pages: pl.Series, pages: pl.Series, users: pl.Series) -> dict[str, int]:
    """Counts of the silent look-alikes of a log: raw page names that read alike (Unicode form, zero-width
    characters) and became one page, other raw names that became one page (whitespace), and user ids that
    differ as text but not as numbers (two users, as the log writes them; said so it can be fixed)."""
    names = pl.DataFrame({"raw": raw_pages, "page": pages}).drop_nulls().unique().with_columns(
        text=unicode_text(pl.col("raw")))
    look_alike = names.group_by("text").len().filter(pl.col("len") > 1)["len"].sum()
    merged = names.select("text", "page").unique().group_by("page").len().filter(pl.col("len") > 1)["len"].sum()
    ids = users.unique().to_frame("user").with_columns(
        number=pl.col("user").str.replace(r"^([+-]?)0*(\d+?)(\.0*)?$", "${1}${2}"))
    twins = ids.group_by("number").len().filter(pl.col("len") > 1)["len"].sum()
    counts = ((LOOK_ALIKE_PAGES, look_alike), (MERGED_PAGES, merged), (NUMERIC_TWIN_USERS, twins))
    return {name: int(n) for name, n in counts if n}


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


def is_parquet(path: str | Path) -> bool:
    """Whether the file is Parquet (by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def export_files(path: str | Path, table: str, what: str) -> list[Path]:
    """The files of a daily BigQuery export to read, in name (so date) order: `path` itself, its folder's
    `table`_* files, or a glob's. A `table`_intraday_YYYYMMDD file is left out when the day's
    `table`_YYYYMMDD is there: Google deletes the intraday table once the daily one is complete, so both hold
    the same rows."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.startswith(f"{table}_"))
    else:
        files = sorted(Path(f) for f in glob.glob(str(path)) if Path(f).is_file())
    if not files:
        raise IngestError(path, f"no {what} export files here (expected {table}_YYYYMMDD files)",
                          hint=f"point at an exported {table}_* file, a folder of them, or a quoted glob")
    daily = {m.group(1) for f in files if (m := re.match(rf"{table}_(\d{{8}})", f.name))}
    return [f for f in files if not ((m := re.match(rf"{table}_intraday_(\d{{8}})", f.name)) and m.group(1) in daily)]


def conform(expr: pl.Expr, have: pl.DataType | None, want: pl.DataType) -> pl.Expr:
    """`expr`, of type `have` (None: the column is absent), as type `want`: struct fields matched by name,
    absent or null-typed ones null, lists element by element, scalars cast (null where they do not parse).
    The daily files of one export differ in such details (a sub-field all null on a day is typed null)."""
    if have is None or have == pl.Null:
        return pl.lit(None, want)
    if isinstance(want, pl.Struct):
        if not isinstance(have, pl.Struct):
            raise pl.exceptions.SchemaError(f"expected a struct, found {have}")
        fields = {f.name: f.dtype for f in have.fields}
        return pl.struct([conform(expr.struct.field(f.name), fields.get(f.name), f.dtype).alias(f.name)
                          for f in want.fields])
    if isinstance(want, pl.List):
        if not isinstance(have, pl.List):
            raise pl.exceptions.SchemaError(f"expected a list, found {have}")
        return expr.list.eval(conform(pl.element(), have.inner, want.inner))
    return expr.cast(want, strict=False)
