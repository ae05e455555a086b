"""A partitioned prepare (logs larger than memory) gives exactly the samples of the in-memory one."""

import json

import polars as pl
import pytest

from hetlm import prepare as prepare_module
from hetlm.ingest import IngestError
from hetlm.prepare import SPLITS, PrepareConfig, prepare

from .conftest import SHIPPED

RUN_SPECIFIC = ("config", "seconds", "events_per_second")
DIGINETICA = dict(sep=";", user="user_id", session="session_id", page="item_id", page_prefix="item ",
                  time="eventdate", order="timeframe")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ~200 KB, so the logs here are read in many chunks (line offsets, repeated headers)."""
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 200_000)


def assert_same_prepared(a, b) -> None:
    for split in SPLITS:
        left, right = (pl.read_parquet(d / f"{split}.parquet").sort("target_start", "user") for d in (a, b))
        assert left.height > 0
        assert left.equals(right), split  # the same rows; partitions are written one after another
    left, right = ({k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in RUN_SPECIFIC}
                   for d in (a, b))
    assert left == right
    assert (a / "tokenizer" / "tokenizer.json").read_text() == (b / "tokenizer" / "tokenizer.json").read_text()


def test_partitioned_equals_in_memory_on_shipped_taobao(taobao_prepared, small_chunks, tmp_path):
    in_memory, _ = taobao_prepared
    summary = prepare("taobao", SHIPPED, tmp_path, PrepareConfig(partitions=5))
    assert summary["config"]["partitions"] == 5
    assert_same_prepared(in_memory, tmp_path)
    assert not list(tmp_path.glob(".partitions-*")), "scratch partitions are removed"


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
