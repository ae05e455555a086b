"""UCI "MSNBC.com anonymous web data" (msnbc990928.seq, plain, gzipped or inside the UCI .zip).

Header lines start with "%" or are blank; the first other line names the page categories, the
category numbered i being its i-th word; every later line is one user's single visit, a sequence of
category numbers.

Naming rule: a page is its category's name from that line (`frontpage`, `news`, ..., `travel`).
user = session = "v<index of the sequence, 0-based>"; there is no clock, so ts is the synthetic
order sequence index * 100_000 + position (the longest sequence has 14,795 views) in the sequence. Every user is one anonymous visit.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import polars as pl

from .base import NOT_UTF8, NOT_UTF8_HINT, REPLACEMENT_CHAR, IngestError, IngestResult, bad_rows, finish
from .generic import read_bytes

SEQUENCE_STRIDE = 100_000
ZIP_MAGIC = b"PK\x03\x04"


def read_msnbc(path: str | Path, on_bad_rows: str = "error") -> IngestResult:
    lines = pl.DataFrame({"line": _seq_text(path).split("\n")}).with_row_index("_row")
    text = pl.col("line").str.strip_chars()
    content = lines.filter((text != "") & ~text.str.starts_with("%"))
    if content.height == 0:
        raise IngestError(path, "no category names line", hint="point at msnbc990928.seq or its .zip")
    names_line = int(content["_row"][0]) + 1
    if REPLACEMENT_CHAR in content["line"][0]:
        raise IngestError(path, f"the category names line holds {NOT_UTF8}", names_line, NOT_UTF8_HINT)
    names = content["line"][0].split()
    if all(name.isdigit() for name in names):
        raise IngestError(
            path, "the first line is a sequence of numbers, not the category names", names_line,
            "the .seq header names the categories (frontpage news ...) before the sequences",
        )
    categories = pl.DataFrame({"number": [str(i) for i in range(1, len(names) + 1)], "page": names})
    visits = content[1:].select(
        "_row",
        user=pl.format("v{}", pl.int_range(pl.len())),
        seq=pl.int_range(pl.len(), dtype=pl.Int64),
        number=pl.col("line").str.strip_chars().str.replace_all(r"\s+", " ").str.split(" "),
    ).with_columns(position=pl.int_ranges(0, pl.col("number").list.len(), dtype=pl.Int64))
    views = (
        visits.explode(["number", "position"])
        .join(categories, on="number", how="left", maintain_order="left")
    )
    skipped: dict[str, int] = {}
    views = bad_rows(
        views, views["page"].is_null(), path, f"not a category number 1..{len(names)}", on_bad_rows, skipped
    )
    events = views.select(
        "user", session="user", ts=pl.col("seq") * SEQUENCE_STRIDE + pl.col("position"), page="page"
    )
    return IngestResult(finish(events), "msnbc", str(path), skipped, anonymous=True)


def _seq_text(path: str | Path) -> str:
    """The .seq text: the zip member ending in .seq (macOS resource forks ignored), else the file."""
    if not zipfile.is_zipfile(path):
        data = read_bytes(path)
        if data.startswith(ZIP_MAGIC):
            raise IngestError(path, "truncated or corrupt zip file", hint="download or copy the file again")
        return data.decode("utf-8", errors="replace")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".seq") and not m.startswith("__MACOSX")]
            if not members:
                raise IngestError(
                    path, f"no .seq file in the zip (it has {archive.namelist()})",
                    hint="point at the UCI zip, which holds msnbc990928.seq",
                )
            return archive.read(members[0]).decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise IngestError(path, f"corrupt zip file ({e})", hint="download or copy the file again") from None
