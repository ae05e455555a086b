"""`hetlm prepare`: a raw click log in, tokenized next-session samples out.

Writes to OUT: train/val/test.parquet (samples), tokenizer/ (PreTrainedTokenizerFast), summary.json (last,
with the fingerprints of the others: see `outputs`).

Logs larger than memory: with `partitions=P` the log is read in chunks and its events hashed by user
into P partition files (`partitioned`). Every later step works on one partition at a time, and the few
settings that depend on all users (the long-session cutoff, the time-split cutoffs, the vocabulary) are
computed over all partitions first, from counts that do not grow with the log, so the samples are the
same as with one partition (written partition after partition, so in another row order) while peak
memory is that of one partition or one chunk.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Self

import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ingest.base import CART, PURCHASE
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
from .outputs import OLD_TOKENIZER, PREPARED_ENTRIES, publish_prepared, work_dir, writable_folder
from .partitioned import Ingested, Partitions, ingest_log
from .tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, build_tokenizer

SPLITS = ("train", "val", "test")
HOUR_MS = 3_600_000  # target start times are counted per hour for the exact time-split cutoffs
ROW_GROUP_ROWS = 8192  # samples per Parquet row group: what a streaming reader holds at once
SAMPLE_CHUNK_TARGETS = 20_000  # targets whose samples are built and written at once
LARGE_VOCABULARY = 100_000  # pages beyond which prepare warns: the tiny preset's embeddings alone are 12.8M+
SCRATCH = ".prepare-"  # prepare's scratch folders inside --out


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
    out = writable_folder(_not_foreign(Path(out)))
    clock = {"start": time.perf_counter()}
    with work_dir(out, SCRATCH) as work:
        parts = Partitions(work if cfg.partitions > 1 else None)
        ingested = ingest_log(source, path, parts, source_options, cfg.partitions, cfg.on_bad_rows,
                              cfg.sample_users, cfg.seed)
        clock["ingest"] = time.perf_counter()
        (work / "new").mkdir()
        try:
            summary = {"source": source, "path": str(path)} | _prepare_partitions(parts, ingested, cfg, work / "new",
                                                                                  clock)
        except NoSessionPairs as err:
            raise DataError(f"{err}{_one_session_hint(source, source_options)}") from None
        if summary["samples"]["train"] == 0:  # a run that trains nothing must not start
            raise DataError(f"no training sample is left (samples {summary['samples']}; rows dropped by reason: "
                            f"{summary['dropped_rows']}); raise max_len or use a longer log")
        publish_prepared(work / "new", out, summary)
    return summary


def _not_foreign(out: Path) -> Path:
    """`out`, unless it is a non-empty folder that holds more than a prepared folder does (e.g. a model folder:
    publishing would replace its tokenizer/)."""
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_ENTRIES
                         and not p.name.startswith((SCRATCH, OLD_TOKENIZER)))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"--out {out} is not a prepared folder (it holds {shown}); prepare writes "
                             f"{', '.join(PREPARED_ENTRIES)} there and would replace them: give a new or empty folder")
    return out


class NoSessionPairs(DataError):
    """No user has two sessions after cleaning."""


def _one_session_hint(source: str, options: dict[str, Any]) -> str:
    """Why a log may have no user with two sessions, where the reason can be seen in the options."""
    if source == "generic" and options.get("time") is None and options.get("session") is None:
        return ("; the log was read without a time or a session column, so each user's rows are one session: name "
                "the time column (--time, time=) or the session id column (--session, session=)")
    return ""


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


def _time_cutoffs(parts: Partitions, start_hours: _Counts, split: SplitConfig) -> tuple[int, int]:
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


def _prepare_partitions(parts: Partitions, ingested: Ingested, cfg: PrepareConfig, out: Path, clock: dict) -> dict:
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
        raise NoSessionPairs("no user has two sessions after cleaning: nothing to predict")
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
    if pages.height > LARGE_VOCABULARY:
        _warn_large_vocabulary(pages["len"], cfg.min_page_count)
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


class LargeVocabularyWarning(UserWarning):
    """So many distinct pages that the page embeddings outweigh the model."""


def _warn_large_vocabulary(counts: pl.Series, min_page_count: int) -> None:
    """Say what a vocabulary of len(counts) pages (their training counts) costs, and what --min-page-count saves."""
    from .models import preset_parameters  # torch: imported only when there is something to say

    size = preset_parameters("tiny", len(counts) + len(SPECIALS))
    fewer = next(((m, int((counts >= m).sum())) for m in (2, 3, 5, 10, 20, 50, 100)
                  if m > min_page_count and (counts >= m).sum() <= LARGE_VOCABULARY), None)
    suggestion = (f"--min-page-count {fewer[0]} (min_page_count={fewer[0]}) keeps {fewer[1]:,} pages seen {fewer[0]}+ "
                  "times and maps the rest to [UNK]" if fewer else "raise --min-page-count (min_page_count)")
    warnings.warn(
        f"the vocabulary has {len(counts):,} pages ({int((counts == 1).sum()):,} of them seen once in training): "
        f"even the tiny preset then has {size / 1e6:,.0f}M parameters, nearly all page embeddings that "
        f"train, validate and score slowly and learn little from pages seen a few times; {suggestion}",
        LargeVocabularyWarning, stacklevel=3,
    )


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


def _summary(cfg, mode, ingested: Ingested, stats: list[dict], sample_stats: list[dict], tokenizer, report, clock):
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


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary as (label, text) rows for a person: counts with thousands separators, rates as
    percentages, one line per dropped-row reason and note."""
    def per_split(values: dict[str, Any], fmt) -> str:
        return "  ".join(f"{s} {fmt(values[s])}" for s in SPLITS)

    def rates(split: str) -> str:
        r = summary["outcome_rates"][split]
        return f"{split}: cart {r['cart']:.1%}, purchase {r['purchase']:.1%}, either {r['cart_or_purchase']:.1%}"

    def counts(table: dict[str, int]) -> str:
        return "\n".join(f"{n:>9,}  {reason}" for reason, n in table.items()) or "none"

    tokens = summary["tokens_per_sample"]
    seconds = summary["seconds"]
    return [
        ("users", f"{summary['users']:,} ({per_split(summary['users_per_split'], '{:,}'.format)})"),
        ("sessions", f"{summary['sessions']:,} (median {summary['sessions_per_user_median']:g} per user)"),
        ("pages", f"{summary['pages']:,} (vocabulary, without special tokens)"),
        ("samples", f"{per_split(summary['samples'], '{:,}'.format)} ({summary['sample_mode']})"),
        ("outcome rates", "\n".join(rates(s) for s in SPLITS)),
        ("tokens per sample", "  ".join(f"{k} {v:g}" for k, v in tokens.items()) or "none"),
        ("events", f"{summary['events_read']:,} read, {summary['events_kept']:,} kept in sessions"),
        ("dropped rows", counts(summary["dropped_rows"])),
        ("ingest notes", counts(summary["ingest_notes"])),
        ("time", f"{seconds['total']:.1f} s (ingest {seconds['ingest']:.1f} s), "
                 f"{summary['events_per_second'] or 0:,} events/s"),
    ]
