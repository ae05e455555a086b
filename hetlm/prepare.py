"""`hetlm prepare`: a raw click log in, tokenized next-session samples out.

Writes to OUT: train/val/test.parquet (samples), tokenizer/ (PreTrainedTokenizerFast), summary.json (last,
with the fingerprints of the others: see `outputs`).

Logs larger than memory: with `partitions=P` the log is read in chunks of lines, each chunk goes
through the source's adapter and its events are hashed by user into P partition files. Every later
step works on one partition at a time, and the few settings that depend on all users (the long-session
cutoff, the time-split cutoffs, the vocabulary) are computed over all partitions first, from counts
that do not grow with the log, so the samples are the same as with one partition (written partition
after partition, so in another row order) while peak memory is that of one partition or one chunk.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ingest import MULTI_FILE as MULTI_FILE_SOURCES
from .ingest import input_files, outcomes, read_events
from .ingest.base import CART, PURCHASE, IngestError, merge_counts, warn_if_no_outcomes
from .sessions import (
    CleaningReport,
    DataError,
    SessionCleaning,
    SplitConfig,
    assign_splits,
    build_samples,
    group_sessions,
    limit_sessions,
    session_ids,
    sessionize,
    split_within_sessions,
    time_split_quantiles,
)
from .outputs import publish_prepared, work_dir, writable_folder
from .tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, build_tokenizer

SPLITS = ("train", "val", "test")
# Sources a partitioned prepare can read in chunks of lines: header lines repeated in every chunk.
HEADER_LINES = {"taobao": 0, "rees46": 1, "generic": 1, "otto": 0, "ga360": 0, "ga4": 0, "adobe": 0}
CSV_SOURCES = {"taobao", "rees46", "generic"}  # a newline inside a quoted field does not end a record
ESCAPED_SOURCES = {"adobe"}  # a newline after a backslash does not end a record
CHUNK_BYTES = 16 << 20  # raw log read per chunk by a partitioned prepare
HOUR_MS = 3_600_000  # target start times are counted per hour for the exact time-split cutoffs
ROW_GROUP_ROWS = 8192  # samples per Parquet row group: what a streaming reader holds at once
SAMPLE_CHUNK_TARGETS = 20_000  # targets whose samples are built and written at once


class PrepareConfig(BaseModel):
    """Every setting of the data stage; the defaults are the paper's where it has one."""

    model_config = ConfigDict(extra="forbid")

    gap_minutes: float = Field(30.0, gt=0, description="inactivity gap that splits sessions")
    use_log_sessions: bool = True
    collapse_repeats: bool = True
    min_session_len: int = Field(2, ge=1)
    long_session_percentile: float | None = Field(99.0, gt=0, le=100)
    long_sessions: Literal["truncate", "drop"] = "truncate"
    min_sessions: int = Field(2, ge=2)
    samples: Literal["auto", "next-session", "within-session"] = "auto"
    split: Literal["time", "user"] = "time"
    test_fraction: float = Field(0.1, gt=0, lt=1)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_targets: Literal["first", "all"] = "first"
    max_train_targets_per_user: int | None = Field(None, ge=1, description="keep each user's most recent training targets only")
    max_len: int = Field(512, ge=8, description="token budget of history + target")
    min_page_count: int = Field(1, ge=1, description="pages seen fewer times in training map to [UNK]")
    on_bad_rows: Literal["error", "skip"] = "error"
    partitions: int = Field(1, ge=1, description="users hashed into this many partitions processed one at "
                            "a time: peak memory ~1/partitions of the log, same samples")
    sample_users: float | None = Field(None, gt=0, le=1, description="keep this fraction of the users (by a hash "
                                       "of the user id, the same on every run): to try a big log quickly")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> PrepareConfig:
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"test_fraction + val_fraction must be below 1 (they are {self.test_fraction} + {self.val_fraction}),"
                " or no sample is left for training"
            )
        return self


def _percentiles(lengths: pl.Series) -> dict[str, float]:
    if lengths.len() == 0:
        return {}
    return {f"p{q}": float(lengths.quantile(q / 100, "nearest")) for q in (50, 90, 99)} | {
        "max": float(lengths.max())
    }


def prepare(source: str, path: str | Path, out: str | Path, config: PrepareConfig | None = None,
            **source_options: Any) -> dict[str, Any]:
    """Run the data stage end to end; returns (and writes) the summary.

    Everything is written in a scratch folder inside `out` and moved into place on success, summary.json
    (with the files' fingerprints) last: a failed or killed run leaves the previous complete output, or a
    folder that `outputs.check_prepared` reports as incomplete, never a mix.
    """
    cfg = config or PrepareConfig()
    out = writable_folder(Path(out))
    clock = {"start": time.perf_counter()}
    with work_dir(out, ".prepare-") as work:
        parts = _Partitions(work if cfg.partitions > 1 else None)
        if cfg.partitions > 1:
            ingested = _ingest_in_chunks(source, path, cfg, parts, source_options)
        else:
            ingested = _ingest_whole(source, path, cfg, parts, source_options)
        clock["ingest"] = time.perf_counter()
        (work / "new").mkdir()
        summary = {"source": source, "path": str(path)} | _prepare_partitions(parts, ingested, cfg, work / "new", clock)
        if summary["samples"]["train"] == 0:  # a run that trains nothing must not start
            raise DataError(f"no training sample is left (samples {summary['samples']}; rows dropped by reason: "
                            f"{summary['dropped_rows']}); raise max_len or use a longer log")
        publish_prepared(work / "new", out, summary)
    return summary


def partition_events(source: str, path: str | Path, partitions: int, folder: str | Path, on_bad_rows: str = "error",
                     seed: int = 0, **source_options: Any) -> list[pl.LazyFrame]:
    """The log read in chunks (CHUNK_BYTES) and its events hashed by user into `partitions` Parquet parts
    under `folder`, as `prepare --partitions` starts: every user's events are in one part, so the parts can
    be processed one at a time. Returns a lazy frame per non-empty part (valid while `folder` exists)."""
    parts = _Partitions(Path(folder))
    cfg = PrepareConfig(partitions=partitions, on_bad_rows=on_bad_rows, seed=seed)
    _ingest_in_chunks(source, path, cfg, parts, source_options)
    return [parts.scan("events", p) for p in parts.keys("events")]


@dataclass
class _Ingested:
    events_read: int  # rows of the log, bad ones included
    events: int       # events the adapter returned
    skipped: dict[str, int]
    anonymous: bool
    event_values: dict[str, int]  # the event types seen (IngestResult.event_values)
    notes: dict[str, int] = field(default_factory=dict)  # summed over chunks (an upper bound when partitioned)


def _read(source: str, path, cfg: PrepareConfig, options: dict, warn_outcomes: bool = True):
    return read_events(source, path, on_bad_rows=cfg.on_bad_rows, sample=cfg.sample_users, seed=cfg.seed,
                       warn_outcomes=warn_outcomes, **options)


class _Partitions:
    """Tables by (kind, partition): in memory for an unpartitioned prepare, else Parquet files in `folder`
    (one per put, read back in put order)."""

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


def _ingest_whole(source: str, path, cfg: PrepareConfig, parts: _Partitions, options: dict) -> _Ingested:
    ingested = _read(source, path, cfg, options)
    parts.put("events", 0, ingested.events)
    return _Ingested(ingested.events.height + sum(ingested.skipped.values()), ingested.events.height,
                     dict(ingested.skipped), ingested.anonymous, ingested.event_values, dict(ingested.notes))


def _ingest_in_chunks(source: str, path, cfg: PrepareConfig, parts: _Partitions, options: dict) -> _Ingested:
    """Each chunk of the log through the adapter, its events hashed by user into cfg.partitions parts."""
    if source not in HEADER_LINES:
        raise DataError(f"partitions: the {source} source cannot be read in chunks; "
                         f"partitioned sources: {', '.join(HEADER_LINES)} (use partitions=1)")
    if source == "generic" and options.get("time") is None and options.get("order") is None:
        raise DataError("partitions: a generic log needs a time or order column (without one the row "
                         "number is the clock, which chunks would restart)")
    if source not in MULTI_FILE_SOURCES and not Path(path).is_file():
        return _ingest_whole(source, path, cfg, parts, options)  # the adapter's own error
    total = _Ingested(0, 0, {}, False, {})
    anonymous_events = outcome_events = 0
    records = "csv" if source in CSV_SOURCES else "escaped" if source in ESCAPED_SOURCES else "lines"
    for file, file_options in input_files(source, path, **options):
        for chunk, lines_before in _chunks(file, HEADER_LINES[source], parts.folder, records):
            try:
                got = _read(source, chunk, cfg, options | file_options, warn_outcomes=False)
            except IngestError as e:
                header = HEADER_LINES[source]
                line = e.line if e.line is None or e.line <= header else e.line - header + lines_before
                raise IngestError(file, e.problem, line, e.hint) from None
            part = (pl.col("user").hash(cfg.seed) % cfg.partitions).alias("_part")
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
        return _ingest_whole(source, path, cfg, parts, options)  # an empty log: the adapter's own error
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


def _grouped_sessions(events: pl.DataFrame, cfg: PrepareConfig, report: CleaningReport) -> pl.DataFrame:
    """A partition's events -> sessions before the filters that depend on all users (see `_sessions`)."""
    null_pages = events["page"].is_null()
    report.add("empty page name", null_pages.sum())
    return group_sessions(sessionize(events.filter(~null_pages), cfg.gap_minutes, cfg.use_log_sessions), report,
                          cfg.collapse_repeats, cfg.min_session_len)


def _sessions(grouped: pl.DataFrame, cfg: PrepareConfig, mode: str, report: CleaningReport,
              long_cutoff: int | None) -> pl.DataFrame:
    sessions = limit_sessions(grouped, report, cfg.long_session_percentile, cfg.long_sessions,
                              1 if mode == "within-session" else cfg.min_sessions, long_cutoff, cfg.min_session_len)
    return split_within_sessions(sessions) if mode == "within-session" else sessions


_CANDIDATE = pl.col("session") >= 1  # a session that can be a target (assign_splits)


class _Counts:
    """How often each integer value was seen, added partition after partition: exact quantiles of many
    values in the memory of their distinct values."""

    def __init__(self):
        self.table = pl.DataFrame(schema={"value": pl.Int64, "len": pl.Int64})

    @property
    def n(self) -> int:
        return int(self.table["len"].sum())

    def add(self, values: pl.Series) -> None:
        counts = values.cast(pl.Int64).rename("value").value_counts(name="len").cast({"len": pl.Int64})
        self.table = pl.concat([self.table, counts]).group_by("value").agg(pl.col("len").sum())

    def quantile(self, q: float) -> tuple[int, int]:
        """polars' quantile(q, "higher") of the values: (that value, its rank among the rows equal to it)."""
        rank = min(self.n - 1, math.ceil(q * (self.n - 1)))  # the "higher" rank among n sorted values
        before = self.table.sort("value").with_columns(before=pl.col("len").cum_sum() - pl.col("len"))
        value, first = before.filter(pl.col("before") <= rank).select("value", "before").row(-1)
        return value, rank - first


def _time_cutoffs(parts: _Partitions, start_hours: _Counts, split: SplitConfig) -> tuple[int, int]:
    """time_cutoffs over all partitions' candidate targets, holding the start times of one hour only:
    the hour of each quantile from the counts per hour, then the start time of its rank in that hour."""
    cutoffs = []
    for q in time_split_quantiles(split):
        hour, rank = start_hours.quantile(q)
        in_hour = _CANDIDATE & (pl.col("start") // HOUR_MS == hour)
        starts = pl.concat([parts.scan("sessions", p).filter(in_hour).select("start")
                            for p in parts.keys("sessions")]).collect()["start"]
        cutoffs.append(int(starts.sort()[rank]))
    return cutoffs[0], cutoffs[1]


def _prepare_partitions(parts: _Partitions, ingested: _Ingested, cfg: PrepareConfig, out: Path, clock: dict) -> dict:
    """Sessions, splits, vocabulary and samples, one partition at a time; the summary without source/path."""
    report = CleaningReport(dict(ingested.skipped))
    mode = cfg.samples
    if mode == "auto":
        mode = "within-session" if ingested.anonymous else "next-session"
    lengths = _Counts()
    for p in parts.keys("events"):
        grouped = _grouped_sessions(parts.get("events", p), cfg, report)
        parts.put("grouped", p, grouped)
        lengths.add(grouped["pages"].list.len())
    long_cutoff = None
    if cfg.long_session_percentile is not None and lengths.n:
        # length_cutoff over all partitions' sessions: the one of an in-memory prepare.
        long_cutoff = max(lengths.quantile(cfg.long_session_percentile / 100)[0], cfg.min_session_len)
    start_hours, longest = _Counts(), 0
    for p in parts.keys("grouped"):
        sessions = _sessions(parts.get("grouped", p), cfg, mode, report, long_cutoff)
        parts.put("sessions", p, sessions)
        start_hours.add(sessions.filter(_CANDIDATE)["start"] // HOUR_MS)
        longest = max(longest, int(sessions["pages"].list.len().max() or 0) + 2)
    clock["sessions"] = time.perf_counter()

    history_budget = cfg.max_len - longest
    if history_budget < 3:
        raise DataError(
            f"max_len={cfg.max_len} leaves no room for history beside the longest kept session "
            f"({longest} tokens); raise max_len or lower long_session_percentile"
        )
    if start_hours.n == 0:
        raise DataError("no user has two sessions after cleaning: nothing to predict")
    split = SplitConfig(**cfg.model_dump(include=set(SplitConfig.model_fields)))
    cutoffs = _time_cutoffs(parts, start_hours, split) if cfg.split == "time" else None
    page_counts = []
    for p in parts.keys("sessions"):
        targets, train_sessions = assign_splits(parts.get("sessions", p), split, cutoffs)
        parts.put("targets", p, targets)
        page_counts.append(_copied(train_sessions.select(pl.col("pages").explode()).group_by("pages").len()))
    counts = pl.concat(page_counts).group_by("pages").agg(pl.col("len").sum())
    # Most frequent first, so ids are stable and small ids are common pages.
    pages = counts.filter(pl.col("len") >= cfg.min_page_count).sort(["len", "pages"], descending=[True, False])
    tokenizer = build_tokenizer(pages["pages"].to_list())
    vocab = tokenizer.get_vocab()

    stats, sample_stats = [], []
    with _SplitWriters(out) as writers:
        for p in parts.keys("targets"):
            sessions = parts.get("sessions", p)
            with_ids = session_ids(sessions, vocab, UNK_ID, BOS_ID, EOS_ID)
            # Targets in chunks, in the order build_samples sorts samples (so the files are as with one
            # chunk): memory holds one chunk's samples, however many targets one user has.
            targets = parts.get("targets", p).sort("start", "user")
            for first in range(0, targets.height, SAMPLE_CHUNK_TARGETS):
                samples = build_samples(with_ids, targets.slice(first, SAMPLE_CHUNK_TARGETS), history_budget)
                has_history = pl.col("history").list.len() > 0
                report.add("target with no history that fits max_len (sample dropped)",
                           samples.height - samples.select(has_history.sum()).item())
                samples = samples.filter(has_history)
                writers.write(samples)
                sample_stats.append(_sample_stats(samples, vocab))
            stats.append(_session_stats(sessions))
    clock["samples"] = time.perf_counter()
    SessionCleaning(gap_minutes=cfg.gap_minutes, use_log_sessions=cfg.use_log_sessions,
                    collapse_repeats=cfg.collapse_repeats, min_session_len=cfg.min_session_len,
                    long_sessions=cfg.long_sessions, long_session_percentile=cfg.long_session_percentile,
                    long_session_cutoff=long_cutoff).save_to(tokenizer)
    tokenizer.save_pretrained(out / "tokenizer")
    clock["write"] = time.perf_counter()
    return _summary(cfg, mode, ingested, stats, sample_stats, tokenizer, report, clock)


def _copied(df: pl.DataFrame) -> pl.DataFrame:
    """df with its own string buffers. A polars string column taken from another (a group_by's keys)
    views the source's buffers and keeps them all alive: kept per partition, memory would grow with the log."""
    return pl.from_arrow(df.to_arrow(compat_level=pl.CompatLevel.oldest()))


class _SplitWriters:
    """train/val/test.parquet, appended partition after partition in row groups of ROW_GROUP_ROWS.

    Each partition's samples go to disk as soon as they are built (sorted by target start within the
    partition: a global sort would need every sample in memory at once; with one partition this is
    build_samples' order), so memory holds one partition's samples, and training can stream the files
    row group by row group.
    """

    def __init__(self, out: Path):
        self.out, self.writers, self.schema = out, {}, None

    def write(self, samples: pl.DataFrame) -> None:
        self.schema = self.schema or samples.drop("split").head(0).to_arrow().schema
        for (name,), rows in samples.partition_by("split", as_dict=True).items():
            if name not in self.writers:
                self.writers[name] = pq.ParquetWriter(self.out / f"{name}.parquet", self.schema, compression="zstd")
            self.writers[name].write_table(rows.drop("split").to_arrow(), row_group_size=ROW_GROUP_ROWS)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.close()
        if exc[0] is None:  # a split no partition had: an empty file with the samples' columns
            for name in set(SPLITS) - set(self.writers):
                pq.write_table(self.schema.empty_table(), self.out / f"{name}.parquet")


def _session_stats(sessions: pl.DataFrame) -> dict[str, Any]:
    """What the summary needs from one partition's sessions: sums, and per-user session counts."""
    return {
        "events_kept": int(sessions["pages"].list.len().sum()),
        "users": sessions["user"].n_unique(),  # users never span partitions, so these add up
        "sessions": sessions.height,
        "sessions_per_user": sessions.group_by("user").len()["len"],
    }


def _sample_stats(samples: pl.DataFrame, vocab: dict[str, int]) -> dict[str, Any]:
    """What the summary needs from one chunk of samples: sums, each split's users, per-sample lengths."""
    test_pages = samples.filter(pl.col("split") == "test").select(pl.col("target").explode()).to_series().drop_nulls()
    by_split = samples.group_by("split").agg(
        n=pl.len(), cart=pl.col("cart").sum(), purchase=pl.col("purchase").sum(),
        cart_or_purchase=(pl.col("cart") | pl.col("purchase")).sum(),
    )
    return {
        "by_split": by_split,
        "split_users": samples.select("split", "user").unique(),  # a user's samples can span chunks
        "tokens": samples["input_ids"].list.len() + samples["target_ids"].list.len(),
        "target_tokens": samples["target_ids"].list.len(),
        "test_pages": test_pages.len(),
        "test_pages_unknown": int((~test_pages.is_in(list(vocab))).sum()),
    }


def _summary(cfg, mode, ingested: _Ingested, stats: list[dict], sample_stats: list[dict], tokenizer, report, clock):
    def total(key: str) -> int:
        return sum(s.get(key, 0) for s in stats + sample_stats)

    def concat(key: str) -> pl.Series:
        found = [s[key] for s in stats + sample_stats if key in s]
        return pl.concat(found) if found else pl.Series([], dtype=pl.Int64)

    split_rows = {}
    if sample_stats:
        users = pl.concat([s["split_users"] for s in sample_stats]).unique().group_by("split").agg(users=pl.len())
        by_split = pl.concat([s["by_split"] for s in sample_stats]).group_by("split").sum().join(users, on="split")
        split_rows = {row["split"]: row for row in by_split.iter_rows(named=True)}
    split = {s: split_rows.get(s, {"n": 0, "users": 0, "cart": 0, "purchase": 0, "cart_or_purchase": 0})
             for s in SPLITS}
    elapsed = clock["write"] - clock["start"]
    return {
        "sample_mode": mode,
        "config": cfg.model_dump(),
        "events_read": ingested.events_read,
        "events_kept": total("events_kept"),
        "users": total("users"),
        "sessions": total("sessions"),
        "sessions_per_user_median": float(concat("sessions_per_user").median() or 0),
        "samples": {s: row["n"] for s, row in split.items()},
        "users_per_split": {s: row["users"] for s, row in split.items()},
        "pages": len(tokenizer) - len(SPECIALS),
        "test_target_pages_unknown": total("test_pages_unknown") / total("test_pages") if total("test_pages") else 0.0,
        "outcome_rates": {
            s: {k: row[k] / row["n"] if row["n"] else 0.0 for k in ("cart", "purchase", "cart_or_purchase")}
            for s, row in split.items()
        },
        "outcome_pages": [CART, PURCHASE],
        "tokens_per_sample": _percentiles(concat("tokens")),
        "target_tokens": _percentiles(concat("target_tokens")),
        "long_session_cutoff": report.long_session_cutoff,
        "dropped_rows": report.dropped,
        "ingest_notes": ingested.notes,
        "seconds": {
            stage: round(clock[stage] - clock[prev], 3)
            for prev, stage in zip(["start", "ingest", "sessions", "samples"], ["ingest", "sessions", "samples", "write"])
        } | {"total": round(elapsed, 3)},
        "events_per_second": round(ingested.events / elapsed) if elapsed > 0 else None,
    }
