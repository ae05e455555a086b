"""A partitioned prepare (logs larger than memory) gives exactly the samples of the in-memory one."""

import importlib
import json
import math

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from hetlm import partitioned
from hetlm.data import ParquetSequences
from hetlm.ingest import IngestError
from hetlm.prepare import SPLITS, PrepareConfig, prepare

from .conftest import SHIPPED

prepare_module = importlib.import_module("hetlm.prepare")  # `hetlm.prepare` is the function

RUN_SPECIFIC = ("config", "seconds", "events_per_second", "fingerprints")  # files: same rows, other order
DIGINETICA = {"sep": ";", "user": "user_id", "session": "session_id", "page": "item_id", "page_prefix": "item ",
              "time": "eventdate", "order": "timeframe"}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ~200 KB, so the logs here are read in many chunks (line offsets, repeated headers)."""
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 200_000)


def assert_same_prepared(a, b) -> None:
    for split in SPLITS:
        left, right = (pl.read_parquet(d / f"{split}.parquet").sort("target_start", "user") for d in (a, b))
        assert left.height > 0
        assert left.equals(right), split  # the same rows; partitions are written one after another
    left, right = ({k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in RUN_SPECIFIC}
                   for d in (a, b))
    assert left == right
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the config records the session cleaning and its cutoff
        assert (a / "tokenizer" / name).read_text() == (b / "tokenizer" / name).read_text()


def test_partitioned_equals_in_memory_on_shipped_taobao(taobao_prepared, small_chunks, tmp_path):
    in_memory, _ = taobao_prepared
    summary = prepare("taobao", SHIPPED, tmp_path, PrepareConfig(partitions=5))
    assert summary["config"]["partitions"] == 5
    assert_same_prepared(in_memory, tmp_path)
    assert not list(tmp_path.glob(".prepare-*")), "scratch partitions are removed"


def test_partitioned_equals_in_memory_with_bad_rows(shared_data, small_chunks, tmp_path):
    log = shared_data / "taobao-userbehavior" / "UserBehavior_head.csv"  # its last line is truncated
    for partitions in (1, 3):
        prepare("taobao", log, tmp_path / str(partitions),
                PrepareConfig(partitions=partitions, on_bad_rows="skip", max_train_targets_per_user=3))
    assert_same_prepared(tmp_path / "1", tmp_path / "3")
    errors = []
    for partitions in (1, 3):
        with pytest.raises(IngestError) as err:
            prepare("taobao", log, tmp_path / "err", PrepareConfig(partitions=partitions))
        errors.append(str(err.value))
    assert errors[0] == errors[1]  # same file and line in the message, not a chunk's
    assert f"{log}:84476:" in errors[0]


def test_partitioned_generic_anonymous_sessions(shared_data, small_chunks, tmp_path):
    log = shared_data / "diginetica-sample" / "sample_train-item-views.csv"
    for partitions in (1, 4):
        summary = prepare("generic", log, tmp_path / str(partitions), PrepareConfig(partitions=partitions),
                          **DIGINETICA)
        assert summary["sample_mode"] == "within-session"
    assert_same_prepared(tmp_path / "1", tmp_path / "4")


def test_partitions_refuse_what_cannot_be_chunked(shared_data, tmp_path):
    with pytest.raises(ValueError, match="cannot be read in chunks"):
        prepare("msnbc", shared_data / "msnbc" / "msnbc990928.zip", tmp_path, PrepareConfig(partitions=2))
    no_clock = {k: v for k, v in DIGINETICA.items() if k not in ("time", "order")}
    with pytest.raises(ValueError, match="time or order column"):
        prepare("generic", shared_data / "diginetica-sample" / "sample_train-item-views.csv", tmp_path,
                PrepareConfig(partitions=2), **no_clock)


def test_splits_written_in_bounded_row_groups(taobao_prepared, monkeypatch, tmp_path):
    """Samples go to disk partition after partition in row groups a streaming trainer can read."""
    in_memory, _ = taobao_prepared
    monkeypatch.setattr(prepare_module, "ROW_GROUP_ROWS", 500)
    prepare("taobao", SHIPPED, tmp_path, PrepareConfig(partitions=3))
    assert_same_prepared(in_memory, tmp_path)
    train = pq.ParquetFile(tmp_path / "train.parquet").metadata
    sizes = [train.row_group(g).num_rows for g in range(train.num_row_groups)]
    assert max(sizes) <= 500 and sum(sizes) > 2000 and len(sizes) >= sum(sizes) / 500
    sequences = ParquetSequences(tmp_path / "train.parquet")
    assert len(sequences) == sum(sizes)


def test_split_no_partition_has_is_written_empty_with_columns(tmp_path):
    summary = prepare("taobao", SHIPPED, tmp_path, PrepareConfig(partitions=2, val_fraction=0))
    assert summary["samples"]["val"] == 0
    val, train = (pl.read_parquet(tmp_path / f"{split}.parquet") for split in ("val", "train"))
    assert val.height == 0 and val.schema == train.schema


@pytest.mark.parametrize("high", [5, 10**12])  # few distinct values (session lengths), all distinct (times)
def test_counts_quantile_is_polars_higher_quantile(high):
    """Cutoffs from counts added partition after partition equal the quantile of all values at once."""
    rng = np.random.default_rng(high)
    for _ in range(50):
        parts = [pl.Series(rng.integers(-high, high, rng.integers(1, 200))) for _ in range(rng.integers(1, 5))]
        counts = prepare_module._Counts()
        for part in parts:
            counts.add(part)
        values = pl.concat(parts).sort()
        for q in (0.99, 1 - 0.1, 1 - 0.1 - 0.05, 0.5, 0.0, 1.0):
            value, rank = counts.quantile(q)
            assert value == values.quantile(q, "higher")
            assert values.search_sorted(value, "left") + rank == min(values.len() - 1, math.ceil(q * (values.len() - 1)))


def test_chunks_never_cut_inside_a_quoted_field(monkeypatch, tmp_path):
    """A generic CSV whose quoted page names hold newlines (and doubled quotes), read in chunks of ~1 KB:
    most chunk ends fall inside a quoted field, and the cut moves back to the last newline outside quotes."""
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 1000)
    rows = pl.read_csv(SHIPPED, has_header=False, new_columns=["user", "item", "category", "behavior", "time"],
                       n_rows=4000)
    quoted = rows.select("user", "time", page=pl.format('"shelf\n{} ""{}"""', "category", "behavior"))
    log = tmp_path / "log.csv"
    log.write_text("user,time,page\n" + "\n".join(f"{u},{t},{p}" for u, t, p in quoted.iter_rows()) + "\n")
    options = {"user": "user", "time": "time", "page": "page", "time_unit": "s"}
    for partitions in (1, 3):
        prepare("generic", log, tmp_path / str(partitions), PrepareConfig(partitions=partitions), **options)
    assert_same_prepared(tmp_path / "1", tmp_path / "3")
    pages = json.loads((tmp_path / "3" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert any(p.startswith('shelf_') and p.endswith('"pv"') for p in pages)
