"""Fuzzing the ingesters: random bytes and byte-mutated slices of every real format. The only
acceptable outcomes are events that meet the Event-table contract, or an IngestError.

Runs ~10 s in all (fixed seed); HETLM_FUZZ_SECONDS=300 runs longer. A failure prints the seed and
writes the offending input under the test's tmp folder."""

from __future__ import annotations

import functools
import gzip
import os
import random
import time
import zipfile
from pathlib import Path

import polars as pl
import pytest

from hetlm.ingest import EVENT_SCHEMA, SOURCES, IngestError, read_events

from .conftest import SHARED_DATA

BAD = Path(__file__).resolve().parent / "data" / "bad"
SECONDS = float(os.environ.get("HETLM_FUZZ_SECONDS", "10"))
# Mutations often break the one outcome event of a seed; that warning is no finding here.
pytestmark = pytest.mark.filterwarnings("ignore::hetlm.ingest.NoOutcomesWarning")
GENERIC = dict(user="user", session="session", page="page", event="event", time="time")
DIGINETICA = dict(sep=";", user="user_id", session="session_id", page="item_id", time="eventdate", order="timeframe")
# Bytes that matter to the parsers: delimiters, quotes, JSON syntax, newlines, invalid UTF-8, digits.
SPECIAL = [b",", b";", b"\t", b'"', b"'", b"\n", b"\r\n", b"{", b"}", b"[", b"]", b":", b"\\", b"\xff",
           b"\xe9", b"\x00", b"-", b"9" * 25, b"NA", b"", b" ", b"\xf0\x9f\x98\x80", b"null", b"1e400"]


def head_lines(data: bytes, n: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:n])


@functools.cache
def real_slices() -> list[tuple[str, str, bytes, dict]]:
    """Small slices of the shared real logs, when they are there."""
    def read(rel: str) -> bytes | None:
        path = SHARED_DATA / rel
        return path.read_bytes() if path.is_file() else None

    slices = []
    if (data := read("taobao-userbehavior/UserBehavior_head.csv")) is not None:
        slices.append(("taobao", ".csv", head_lines(data, 60), {}))
    if (data := read("rees46-sample/2019-Oct-sample.csv")) is not None:
        slices.append(("rees46", ".csv", head_lines(data, 30), {}))
    if (data := read("ga360-merchandise-store/ga_sessions_20160801.json.gz")) is not None:
        slices.append(("ga360", ".json", head_lines(gzip.decompress(data), 2), {}))
    if (data := read("otto-sample/train_test_resource.jsonl")) is not None:
        slices.append(("otto", ".jsonl", head_lines(data, 3), {}))
    if (data := read("msnbc/msnbc990928.zip")) is not None:
        with zipfile.ZipFile(SHARED_DATA / "msnbc/msnbc990928.zip") as z:
            slices.append(("msnbc", ".seq", head_lines(z.read("msnbc990928.seq"), 40), {}))
    if (data := read("diginetica-sample/sample_train-item-views.csv")) is not None:
        slices.append(("generic", ".csv", head_lines(data, 40), DIGINETICA))
    return slices


def corpus_seeds() -> list[tuple[str, str, bytes, dict]]:
    """The good files of tests/data/bad/ (every format, incl. gzip, zip and Parquet)."""
    files = ["taobao/good.csv", "rees46/good.csv", "ga360/good.jsonl", "otto/good.jsonl", "msnbc/good.seq",
             "msnbc/good.zip", "generic/good.csv", "generic/good.parquet", "ga4/good.jsonl", "ga4/good.parquet"]
    seeds = []
    for rel in files:
        source, name = rel.split("/")
        seeds.append((source, Path(name).suffix, (BAD / rel).read_bytes(), GENERIC if source == "generic" else {}))
    seeds.append(("ga360", ".json.gz", gzip.compress((BAD / "ga360/good.jsonl").read_bytes()), {}))
    seeds.append(("ga4", ".json.gz", gzip.compress((BAD / "ga4/good.jsonl").read_bytes()), {}))
    # A data feed's hit data, read with the good feed's lookup files.
    seeds.append(("adobe", ".tsv", (BAD / "adobe/good/hit_data.tsv").read_bytes(), {"lookups": str(BAD / "adobe/good")}))
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-4 random edits: flip, insert, delete, duplicate, truncate, or splice a special token."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(6)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = rng.choice(SPECIAL)
        elif kind == 2:
            del out[at:at + rng.randint(1, 40)]
        elif kind == 3:
            out[at:at] = out[max(0, at - rng.randint(1, 80)):at]
        elif kind == 4:
            del out[at:]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def check_contract(events: pl.DataFrame) -> None:
    assert dict(events.schema) == EVENT_SCHEMA and events.height > 0
    assert events.select(pl.col("user", "ts", "page").null_count().sum()).row(0) == (0, 0, 0)
    assert not events["page"].str.contains(r"\s").any()


def fuzz(seeds, budget_s: float, seed: int, tmp_path: Path) -> int:
    rng = random.Random(seed)
    deadline, runs = time.monotonic() + budget_s, 0
    while time.monotonic() < deadline:
        source, suffix, data, options = rng.choice(seeds)
        data = rng.randbytes(rng.randint(0, 300)) if rng.random() < 0.1 else mutate(data, rng)
        path = tmp_path / f"case{suffix}"
        path.write_bytes(data)
        mode = rng.choice(["error", "skip"])
        try:
            check_contract(read_events(source, path, on_bad_rows=mode, **options).events)
        except IngestError:
            pass
        except (Exception, pl.exceptions.PanicException) as err:  # a polars panic is no Exception
            kept = tmp_path / f"failing_{source}_{runs}{suffix}"
            kept.write_bytes(data)
            raise AssertionError(f"{source} ({mode}) on {kept} (seed {seed}, run {runs}): {err!r}") from err
        runs += 1
    return runs


@pytest.mark.parametrize("source", list(SOURCES))
def test_ingesters_survive_mutated_inputs(source, tmp_path):
    seeds = [s for s in corpus_seeds() + real_slices() if s[0] == source]
    runs = fuzz(seeds, SECONDS / len(SOURCES), seed=list(SOURCES).index(source), tmp_path=tmp_path)
    assert runs > 0
