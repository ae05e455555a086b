"""Reliability (issue 16): no silent wrong results, no partial output that looks whole, no request that
sinks its batch. Each case asserts the clear error or the counted handling."""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import polars as pl
import pytest

import hetlm.prepare
from hetlm.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_heavy_user import heavy_user_log, run as heavy_user_prepare  # noqa: E402


# --- 1. heavy users: memory linear in a user's events -----------------------------------------------------


def test_heavy_user_memory_grows_no_faster_than_events():
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        small = pool.submit(heavy_user_prepare, 4_000).result()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        big = pool.submit(heavy_user_prepare, 40_000).result()
    # Joining each target with the user's whole session list grew ~quadratically (100x here).
    assert big["peak_above_imports_mb"] < 10 * max(small["peak_above_imports_mb"], 50)


def test_samples_built_in_chunks_equal_samples_built_at_once(tmp_path, monkeypatch):
    heavy_user_log(tmp_path / "log.csv", 3_000)
    once = prepare("taobao", tmp_path / "log.csv", tmp_path / "once")
    monkeypatch.setattr(hetlm.prepare, "SAMPLE_CHUNK_TARGETS", 7)
    chunks = prepare("taobao", tmp_path / "log.csv", tmp_path / "chunks")
    timing = ("seconds", "events_per_second", "path")
    assert {k: v for k, v in once.items() if k not in timing} == {k: v for k, v in chunks.items() if k not in timing}
    for split in ("train", "val", "test"):
        once, chunks = (pl.read_parquet(tmp_path / d / f"{split}.parquet") for d in ("once", "chunks"))
        assert once.height and once.equals(chunks), split
