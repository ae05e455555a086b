"""`hetlm prepare`: a raw click log in, tokenized next-session samples out.

Writes to OUT: train/val/test.parquet (samples), tokenizer/ (PreTrainedTokenizerFast), summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .ingest import read_events
from .ingest.base import CART, PURCHASE
from .sessions import (
    CleaningReport, SplitSettings, assign_splits, build_samples, clean_sessions, session_ids,
    sessionize, split_within_sessions,
)
from .tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, build_tokenizer

SPLITS = ("train", "val", "test")


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
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> PrepareConfig:
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must be below 1")
        return self


def _percentiles(lengths: pl.Series) -> dict[str, float]:
    if lengths.len() == 0:
        return {}
    return {f"p{q}": float(lengths.quantile(q / 100, "nearest")) for q in (50, 90, 99)} | {
        "max": float(lengths.max())
    }


def prepare(source: str, path: str | Path, out: str | Path, config: PrepareConfig | None = None,
            **source_options: Any) -> dict[str, Any]:
    """Run the data stage end to end; returns (and writes) the summary."""
    cfg = config or PrepareConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = {"start": time.perf_counter()}

    ingested = read_events(source, path, on_bad_rows=cfg.on_bad_rows, **source_options)
    events = ingested.events
    report = CleaningReport(dict(ingested.skipped))
    null_pages = events["page"].is_null()
    report.add("empty page name", null_pages.sum())
    events = events.filter(~null_pages)
    clock["ingest"] = time.perf_counter()

    mode = cfg.samples
    if mode == "auto":
        mode = "within-session" if ingested.anonymous else "next-session"
    sessions = clean_sessions(
        sessionize(events, cfg.gap_minutes, cfg.use_log_sessions), report,
        collapse_repeats=cfg.collapse_repeats, min_session_len=cfg.min_session_len,
        long_session_percentile=cfg.long_session_percentile, long_sessions=cfg.long_sessions,
        min_sessions=1 if mode == "within-session" else cfg.min_sessions,
    )
    if mode == "within-session":
        sessions = split_within_sessions(sessions)
    clock["sessions"] = time.perf_counter()

    longest = int(sessions["pages"].list.len().max() or 0) + 2
    history_budget = cfg.max_len - longest
    if history_budget < 3:
        raise ValueError(
            f"max_len={cfg.max_len} leaves no room for history beside the longest kept session "
            f"({longest} tokens); raise max_len or lower long_session_percentile"
        )
    split = SplitSettings(cfg.split, cfg.test_fraction, cfg.val_fraction, cfg.test_targets,
                          cfg.max_train_targets_per_user, cfg.seed)
    targets, train_sessions = assign_splits(sessions, split)

    counts = train_sessions.select(pl.col("pages").explode()).group_by("pages").len()
    # Most frequent first, so ids are stable and small ids are common pages.
    pages = counts.filter(pl.col("len") >= cfg.min_page_count).sort(["len", "pages"], descending=[True, False])
    tokenizer = build_tokenizer(pages["pages"].to_list())
    vocab = tokenizer.get_vocab()
    samples = build_samples(session_ids(sessions, vocab, UNK_ID, BOS_ID, EOS_ID), targets, history_budget)
    has_history = pl.col("history").list.len() > 0
    report.add("target with no history that fits max_len (sample dropped)",
               samples.height - samples.select(has_history.sum()).item())
    samples = samples.filter(has_history)
    clock["samples"] = time.perf_counter()

    for name in SPLITS:
        samples.filter(pl.col("split") == name).drop("split").write_parquet(out / f"{name}.parquet")
    tokenizer.save_pretrained(out / "tokenizer")
    clock["write"] = time.perf_counter()

    summary = _summary(source, path, cfg, mode, events, sessions, samples, tokenizer, report, ingested, clock)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _summary(source, path, cfg, mode, events, sessions, samples, tokenizer, report, ingested, clock):
    by_split = {s: samples.filter(pl.col("split") == s) for s in SPLITS}
    lengths = samples["input_ids"].list.len() + samples["target_ids"].list.len()
    test_pages = by_split["test"].select(pl.col("target").explode()).to_series()
    vocab = set(tokenizer.get_vocab())
    elapsed = clock["write"] - clock["start"]
    return {
        "source": source,
        "path": str(path),
        "sample_mode": mode,
        "config": cfg.model_dump(),
        "events_read": ingested.events.height + sum(ingested.skipped.values()),
        "events_kept": int(sessions["pages"].list.len().sum()),
        "users": sessions["user"].n_unique(),
        "sessions": sessions.height,
        "sessions_per_user_median": float(sessions.group_by("user").len()["len"].median() or 0),
        "samples": {s: df.height for s, df in by_split.items()},
        "users_per_split": {s: df["user"].n_unique() for s, df in by_split.items()},
        "pages": len(tokenizer) - len(SPECIALS),
        "test_target_pages_unknown": float((~test_pages.is_in(list(vocab))).mean()) if len(test_pages) else 0.0,
        "outcome_rates": {
            s: {"cart": float(df["cart"].mean() or 0), "purchase": float(df["purchase"].mean() or 0),
                "cart_or_purchase": float((df["cart"] | df["purchase"]).mean() or 0)}
            for s, df in by_split.items()
        },
        "outcome_pages": [CART, PURCHASE],
        "tokens_per_sample": _percentiles(lengths),
        "target_tokens": _percentiles(samples["target_ids"].list.len()),
        "long_session_cutoff": report.long_session_cutoff,
        "dropped_rows": report.dropped,
        "seconds": {
            stage: round(clock[stage] - clock[prev], 3)
            for prev, stage in zip(["start", "ingest", "sessions", "samples"], ["ingest", "sessions", "samples", "write"])
        } | {"total": round(elapsed, 3)},
        "events_per_second": round(ingested.events.height / elapsed) if elapsed > 0 else None,
    }
