"""Logs larger than memory: a log read in chunks of whole records, its events hashed by user into partitions.

Each chunk of lines goes through the source's adapter and its events are hashed by user into P partition
files, so every user's events are in one partition and the later steps (`prepare --partitions`, `score
--partitions`) can work on one partition at a time: peak memory is that of one partition or one chunk.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from .ingest import MULTI_FILE as MULTI_FILE_SOURCES
from .ingest import input_files, outcomes, read_events
from .ingest.base import IngestError, merge_counts, warn_if_no_outcomes
from .sessions import DataError

# Sources whose logs can be read in chunks of lines: the header lines repeated in every chunk.
HEADER_LINES = {"taobao": 0, "rees46": 1, "generic": 1, "otto": 0, "ga360": 0, "ga4": 0, "adobe": 0}
CSV_SOURCES = {"taobao", "rees46", "generic"}  # a newline inside a quoted field does not end a record
ESCAPED_SOURCES = {"adobe"}  # a newline after a backslash does not end a record
CHUNK_BYTES = 16 << 20  # raw log read per chunk


class Partitions:
    """Tables by (kind, partition): in memory when `folder` is None (an unpartitioned prepare), else
    Parquet files in `folder` (one per put, read back in put order)."""

    def __init__(self, folder: Path | None):
        self.folder, self.frames = folder, {}

    def put(self, kind: str, part: int, df: pl.DataFrame) -> None:
        if df.height == 0:
            return
        stored = self.frames.setdefault((kind, part), [])
        if self.folder is None:
            stored.append(df)
        else:
            file = self.folder / f"{kind}-{part}-{len(stored)}.parquet"
            df.write_parquet(file)
            stored.append(file)

    def keys(self, kind: str) -> list[int]:
        return sorted(part for k, part in self.frames if k == kind)

    def get(self, kind: str, part: int) -> pl.DataFrame:
        return self.scan(kind, part).collect() if self.folder else pl.concat(self.frames[kind, part])

    def scan(self, kind: str, part: int) -> pl.LazyFrame:
        stored = self.frames[kind, part]
        return pl.scan_parquet(stored) if self.folder else pl.concat(stored).lazy()


@dataclass
class Ingested:
    """What reading the log found, beside the events (put in the partitions as "events")."""

    events_read: int  # rows of the log, bad ones included
    events: int       # events the adapter returned
    skipped: dict[str, int]
    anonymous: bool
    event_values: dict[str, int]  # the event types seen (IngestResult.event_values)
    notes: dict[str, int] = field(default_factory=dict)  # summed over chunks (an upper bound when partitioned)


def ingest_log(source: str, path: str | Path, parts: Partitions, options: dict, partitions: int = 1,
               on_bad_rows: str = "error", sample: float | None = None, seed: int = 0) -> Ingested:
    """The log's events put into `parts` as "events": read whole when `parts` are kept in memory, else in
    chunks (CHUNK_BYTES) hashed by user (with `seed`) into `partitions` parts. options: the source's."""
    read = partial(read_events, on_bad_rows=on_bad_rows, sample=sample, seed=seed)
    if parts.folder is None:
        return _ingest_whole(source, path, parts, read, options)
    return _ingest_in_chunks(source, path, parts, read, partitions, seed, options)


def partition_events(source: str, path: str | Path, partitions: int, folder: str | Path, on_bad_rows: str = "error",
                     seed: int = 0, **source_options: Any) -> list[pl.LazyFrame]:
    """The log read in chunks (CHUNK_BYTES) and its events hashed by user into `partitions` Parquet parts
    under `folder`, as `prepare --partitions` starts: every user's events are in one part, so the parts can
    be processed one at a time. Returns a lazy frame per non-empty part (valid while `folder` exists)."""
    if on_bad_rows not in ("error", "skip") or partitions < 1:  # what PrepareConfig checks for `prepare`
        raise ValueError(f"on_bad_rows must be 'error' or 'skip' ({on_bad_rows!r}) and partitions 1 or more "
                         f"({partitions})")
    parts = Partitions(Path(folder))
    ingest_log(source, path, parts, source_options, partitions, on_bad_rows, seed=seed)
    return [parts.scan("events", p) for p in parts.keys("events")]


def _ingest_whole(source: str, path, parts: Partitions, read: Callable, options: dict) -> Ingested:
    ingested = read(source, path, **options)
    parts.put("events", 0, ingested.events)
    return Ingested(ingested.events.height + sum(ingested.skipped.values()), ingested.events.height,
                    dict(ingested.skipped), ingested.anonymous, ingested.event_values, dict(ingested.notes))


def _ingest_in_chunks(source: str, path, parts: Partitions, read: Callable, partitions: int, seed: int,
                      options: dict) -> Ingested:
    """Each chunk of the log through the adapter, its events hashed by user into `partitions` parts."""
    if source not in HEADER_LINES:
        raise DataError(f"partitions: the {source} source cannot be read in chunks; "
                         f"partitioned sources: {', '.join(HEADER_LINES)} (use partitions=1)")
    if source == "generic" and options.get("time") is None and options.get("order") is None:
        raise DataError("partitions: a generic log needs a time or order column (without one the row "
                         "number is the clock, which chunks would restart)")
    if source not in MULTI_FILE_SOURCES and not Path(path).is_file():
        return _ingest_whole(source, path, parts, read, options)  # the adapter's own error
    total = Ingested(0, 0, {}, False, {})
    anonymous_events = outcome_events = 0
    records = "csv" if source in CSV_SOURCES else "escaped" if source in ESCAPED_SOURCES else "lines"
    for file, file_options in input_files(source, path, **options):
        for chunk, lines_before in _chunks(file, HEADER_LINES[source], parts.folder, records):
            try:
                got = read(source, chunk, warn_outcomes=False, **(options | file_options))
            except IngestError as e:
                header = HEADER_LINES[source]
                line = e.line if e.line is None or e.line <= header else e.line - header + lines_before
                raise IngestError(file, e.problem, line, e.hint) from None
            part = (pl.col("user").hash(seed) % partitions).alias("_part")
            for (p,), events in got.events.with_columns(part).partition_by("_part", as_dict=True).items():
                parts.put("events", p, events.drop("_part"))
            total.events += got.events.height
            total.events_read += got.events.height + sum(got.skipped.values())
            merge_counts(total.skipped, got.skipped)
            merge_counts(total.event_values, got.event_values)
            merge_counts(total.notes, got.notes)
            outcome_events += outcomes(got.events)
            anonymous_events += got.events.height if got.anonymous else 0
    if total.events_read == 0:
        return _ingest_whole(source, path, parts, read, options)  # an empty log: the adapter's own error
    warn_if_no_outcomes(path, total.event_values, outcome_events)
    # The adapter decides per chunk whether users are anonymous visits; the log is if most events are.
    total.anonymous = anonymous_events * 2 > total.events
    return total
def _chunks(path: Path, header_lines: int, folder: Path, records: str) -> Iterator[tuple[Path, int]]:
    """(chunk file, lines of the log before its first data line): whole records, the header repeated."""
    chunk = folder / ("chunk" + "".join(s for s in path.suffixes[-2:] if s.lower() != ".gz"))
    with open(path, "rb") as raw:
        magic = raw.read(4)
    if chunk.suffix.lower() in (".parquet", ".pq") or magic == b"PAR1":
        yield from _parquet_chunks(path, chunk)
        return
    gzipped = magic[:2] == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        header = b"".join(f.readline() for _ in range(header_lines))
        lines_before = header_lines
        for block in _record_blocks(f, records):
            chunk.write_bytes(header + block)
            yield chunk, lines_before
            lines_before += block.count(b"\n")


def _record_blocks(f, records: str) -> Iterator[bytes]:
    """Whole records, about CHUNK_BYTES at a time. A last line without a newline (often a truncated one)
    joins the block before it, so that no chunk is only a broken line."""
    rest, ready = b"", b""
    while block := f.read(CHUNK_BYTES):
        data = rest + block
        cut = _last_record_end(data, records)
        if ready:
            yield ready
        ready, rest = data[:cut], data[cut:]
    if ready + rest:
        yield ready + rest


def _last_record_end(data: bytes, records: str) -> int:
    """Just past the last newline of `data` (which starts a record) that ends a record; 0 if none. records:
    "lines" (every newline ends one), "csv" (a newline ends a record when the quotes before it are even in
    number; "" inside a field counts two) or "escaped" (one after an odd run of backslashes does not)."""
    cut = data.rfind(b"\n") + 1
    if records == "escaped":
        while cut and _backslashes_before(data, cut - 1) % 2:
            cut = data.rfind(b"\n", 0, cut - 1) + 1
        return cut
    quotes = data.count(b'"', 0, cut) if records == "csv" else 0
    while cut and quotes % 2:
        previous = data.rfind(b"\n", 0, cut - 1) + 1
        quotes -= data.count(b'"', previous, cut)
        cut = previous
    return cut


def _backslashes_before(data: bytes, end: int) -> int:
    start = end
    while start and data[start - 1] == ord("\\"):
        start -= 1
    return end - start


def _parquet_chunks(path: Path, chunk: Path) -> Iterator[tuple[Path, int]]:
    import pyarrow as pa

    rows_before = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_BYTES // 64):  # ~64 bytes a row
        pq.write_table(pa.Table.from_batches([batch]), chunk)
        yield chunk, rows_before
        rows_before += batch.num_rows


