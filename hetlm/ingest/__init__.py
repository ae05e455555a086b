"""Click logs in, one Event table out: `read_events(source, path, **options)`.

Each source module states its one page-naming rule in its docstring; `base` holds the Event table
contract shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import CART, EVENT_SCHEMA, OUTCOME_PAGES, PURCHASE, IngestError, IngestResult
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
}

__all__ = [
    "CART", "EVENT_SCHEMA", "OUTCOME_PAGES", "PURCHASE", "SOURCES", "IngestError", "IngestResult",
    "read_events",
]


def read_events(source: str, path: str | Path, **options) -> IngestResult:
    """Read `path` with the `source` adapter; options go to it (e.g. on_bad_rows="skip").

    Checks every adapter's result: at least one event, and no page named like a special token.
    """
    from ..tokenizer import SPECIALS  # here, not at the top: transformers is slow to import

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if not Path(path).is_file():
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
    return result


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "a folder, not a log file"
    if path.is_symlink():
        return "a symbolic link to nothing (or a loop of links)"
    if path.exists():
        return "not a regular file"
    return "no such file"
