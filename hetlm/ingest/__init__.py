"""Click logs in, one Event table out: `read_events(source, path, **options)`.

Each source module states its one page-naming rule in its docstring; `base` holds the Event table
contract shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .adobe import feed_files, read_adobe
from .base import (
    CART, EVENT_SCHEMA, OUTCOME_PAGES, PURCHASE, IngestError, IngestResult, NoOutcomesWarning, sample_users,
    warn_if_no_outcomes,
)
from . import ga4, ga360
from .ga4 import read_ga4
from .ga360 import read_ga360
from .generic import read_generic
from .msnbc import read_msnbc
from .otto import read_otto
from .rees46 import read_rees46
from .taobao import read_taobao

SOURCES: dict[str, Callable[..., IngestResult]] = {
    "generic": read_generic,
    "taobao": read_taobao,
    "rees46": read_rees46,
    "ga360": read_ga360,
    "otto": read_otto,
    "msnbc": read_msnbc,
    "ga4": read_ga4,
    "adobe": read_adobe,
}
# Sources whose log may be a folder or glob of files (one per day); `input_files` lists them.
MULTI_FILE = {"ga360", "ga4", "adobe"}

__all__ = [
    "CART", "EVENT_SCHEMA", "OUTCOME_PAGES", "PURCHASE", "SOURCES", "IngestError", "IngestResult",
    "NoOutcomesWarning", "input_files", "read_events",
]


def read_events(source: str, path: str | Path, *, sample: float | None = None, seed: int = 0,
                warn_outcomes: bool = True, **options) -> IngestResult:
    """Read `path` with the `source` adapter; options go to it (e.g. on_bad_rows="skip").

    Checks every adapter's result: at least one event, and no page named like a special token. sample:
    keep only this fraction of the users (`sample_users`, by a hash of the id with `seed`). warn_outcomes:
    warn (NoOutcomesWarning) when the log names event types and none became Cart or Purchase.
    """
    from ..tokenizer import SPECIALS  # here, not at the top: transformers is slow to import

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source not in MULTI_FILE and not Path(path).is_file():
        raise IngestError(path, _not_a_file(Path(path)), hint=f"check the path given for the {source} log")
    result = SOURCES[source](path, **options)
    reserved = result.events["page"].is_in(SPECIALS)
    if reserved.any():
        if options.get("on_bad_rows", "error") == "error":
            names = sorted(set(result.events.filter(reserved)["page"]))
            raise IngestError(
                path, f"page name(s) {names} are reserved for the tokenizer ({int(reserved.sum())} rows)",
                hint="rename these pages in the file, or pass --skip-bad-rows",
            )
        result.skipped[f"page named like a special token ({' '.join(SPECIALS)})"] = int(reserved.sum())
        result.events = result.events.filter(~reserved)
    if result.events.height == 0:
        dropped = f"; bad rows dropped: {result.skipped}" if result.skipped else ""
        raise IngestError(path, f"no events in the file{dropped}", hint=f"check that it is a {source} log")
    if warn_outcomes:
        warn_if_no_outcomes(path, result.event_values, outcomes(result.events))
    if sample is not None:
        result.events = sample_users(result.events, sample, seed)
    return result


def outcomes(events) -> int:
    """How many Cart and Purchase events `events` holds."""
    return int(events["page"].is_in(OUTCOME_PAGES).sum())


def input_files(source: str, path: str | Path, **options) -> list[tuple[Path, dict]]:
    """The files of a log, each with the adapter options it is read with on its own (a partitioned prepare
    reads them one chunk at a time): a GA360 or GA4 export's day files, a data feed's hit data files with their
    lookup folder, or the one file of other sources."""
    if source in ("ga360", "ga4"):
        return [(file, {}) for file in (ga360 if source == "ga360" else ga4).day_files(path)]
    if source == "adobe":
        return [(file, {"lookups": str(folder)}) for file, folder in feed_files(path, options.get("lookups"))]
    return [(Path(path), {})]
def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "a folder, not a log file"
    if path.is_symlink():
        return "a symbolic link to nothing (or a loop of links)"
    if path.exists():
        return "not a regular file"
    return "no such file"
