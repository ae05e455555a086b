"""GA360 and GA4 exports as users hold them: small real slices of the Merchandise Store exports in
tests/data/ga360-export and tests/data/ga4-export (tests/data/make_ga_exports.py wrote them)."""

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.config import load_config
from hetlm.experiment import ExperimentConfig
from hetlm.ingest import IngestError, read_events
from hetlm.ingest.ga360 import ACROSS_MIDNIGHT, NO_PAGE_HIT
from hetlm.prepare import PrepareConfig, prepare
from hetlm.sessions import sessionize

DATA = Path(__file__).resolve().parent / "data"
GA360 = DATA / "ga360-export"
GA4 = DATA / "ga4-export"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIDNIGHT_USER = "3634155159894530540"  # visit 1470121149: rows in the 2016-08-01 and 08-02 files


def test_ga360_folder_glob_and_files_read_alike():
    folder = read_events("ga360", GA360 / "parquet")
    glob = read_events("ga360", str(GA360 / "parquet" / "ga_sessions_2016080*.parquet"))
    assert folder.events.equals(glob.events) and folder.events["user"].n_unique() == 11
    days = [read_events("ga360", f).events for f in sorted((GA360 / "parquet").iterdir())]
    assert folder.events.height == sum(d.height for d in days)
    assert {"Cart", "Purchase", "apparel_mens_mens_t_shirts"} <= set(folder.events["page"])


def test_ga360_daily_parquet_files_of_different_schemas_are_read():
    schemas = {str(pq.read_schema(f).field("hits").type) for f in (GA360 / "parquet").iterdir()}
    assert len(schemas) > 1  # an all-null sub-field typed null on some day: one dataset read would fail
    with pytest.raises(pl.exceptions.PolarsError):
        pl.read_parquet(GA360 / "parquet", columns=["hits"])


def test_ga360_gzipped_json_and_parquet_of_a_day_give_the_same_events():
    json = read_events("ga360", GA360 / "json" / "ga_sessions_20160801.json.gz")
    parquet = read_events("ga360", GA360 / "parquet" / "ga_sessions_20160801.parquet")
    assert json.events.height > 100 and json.events.equals(parquet.events)


def test_ga360_session_across_midnight_is_one_session():
    folder = read_events("ga360", GA360 / "parquet")
    assert folder.notes == {ACROSS_MIDNIGHT: 3}
    first_day = read_events("ga360", GA360 / "parquet" / "ga_sessions_20160801.parquet").events
    visit = f"{MIDNIGHT_USER}-1470121149"
    both = folder.events.filter(pl.col("session") == visit)
    assert both.height > first_day.filter(pl.col("session") == visit).height > 0  # hits from both files
    sessions = sessionize(folder.events.filter(pl.col("user") == MIDNIGHT_USER))
    visits = folder.events.filter(pl.col("user") == MIDNIGHT_USER)["session"].n_unique()
    assert sessions["session"].n_unique() == visits  # not one more for the second day's part


def test_ga360_hits_read_twice_are_kept_once(tmp_path):
    day = GA360 / "parquet" / "ga_sessions_20160801.parquet"
    for name in ("ga_sessions_20160801.parquet", "ga_sessions_20160801_copy.parquet"):
        (tmp_path / name).write_bytes(day.read_bytes())
    twice = read_events("ga360", tmp_path)
    assert twice.events.equals(read_events("ga360", day).events) and sum(twice.skipped.values()) > 0


def test_ga360_sessions_without_a_page_hit_are_counted(tmp_path):
    day = pl.read_parquet(GA360 / "parquet" / "ga_sessions_20160801.parquet")
    events_only = day.head(2).with_columns(
        pl.col("hits").list.eval(pl.element().struct.with_fields(type=pl.lit("EVENT"))),
        visitId=pl.col("visitId") + 1)
    pl.concat([day, events_only]).write_parquet(tmp_path / "ga_sessions_20160801.parquet")
    result = read_events("ga360", tmp_path)
    assert result.skipped == {NO_PAGE_HIT: 2}
    assert result.events.equals(read_events("ga360", GA360 / "parquet" / "ga_sessions_20160801.parquet").events)


def test_ga360_partitioned_prepare_gives_the_same_samples(tmp_path):
    whole = prepare("ga360", GA360 / "parquet", tmp_path / "one", PrepareConfig(split="user"))
    parts = prepare("ga360", GA360 / "parquet", tmp_path / "parts", PrepareConfig(split="user", partitions=3))
    assert whole["samples"] == parts["samples"] and whole["samples"]["train"] > 0
    for split in ("train", "test"):
        one, three = (pl.read_parquet(tmp_path / d / f"{split}.parquet").sort("user", "target_start")
                      for d in ("one", "parts"))
        assert one.equals(three)


def test_ga4_view_item_without_items_is_its_page():
    result = read_events("ga4", GA4)
    bad = read_events("ga4", GA4, empty_items="bad", on_bad_rows="skip")
    n_empty = bad.skipped["view_item without an item with an item_name"]
    assert result.skipped == {} and n_empty > 0
    assert result.events.height == bad.events.height + n_empty  # each is one page instead
    with pytest.raises(IngestError, match="view_item without an item") as err:
        read_events("ga4", GA4, empty_items="bad")
    assert "empty_items='page'" in str(err.value)


def test_ga4_session_across_midnight_is_one_session():
    result = read_events("ga4", str(GA4 / "events_*.parquet"))
    assert result.notes == {ACROSS_MIDNIGHT: 1}
    days = result.events.with_columns(day=pl.from_epoch("ts", "ms").dt.date())
    crossing = days.group_by("session").agg(pl.col("day").n_unique()).filter(pl.col("day") > 1)
    assert crossing.height == 1


@pytest.mark.parametrize("source, path", [("ga360", GA360 / "parquet"), ("ga4", GA4)])
def test_prepare_an_export_folder_with_no_flag_prints_a_readable_summary(source, path, tmp_path):
    result = CliRunner().invoke(app, ["prepare", source, str(path), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "users" in text and "outcome rates" in text and "train: cart" in text and "%" in text
    assert '{"' not in result.output  # no raw JSON


@pytest.mark.parametrize("name", ["ga360-dataset-i.json", "ga360-dataset-i-gpu.json"])
def test_dataset_i_configs_load_with_the_papers_preprocessing(name):
    config = load_config(ExperimentConfig, CONFIGS / name)
    assert config.source == "ga360" and config.prepare.split == "user" and config.prepare.max_len == 512
    assert config.prepare.test_fraction == 0.1 and config.prepare.long_sessions == "drop"
    assert config.kmeans.n_clusters == 6 and config.hetlm.config.n_clusters == 6
    pairs = [tuple(run) for run in config.hetlm.runs if not isinstance(run, dict)]
    assert pairs == [(1.0, 0.0), (2.0, 1.0), (3.0, 1.0), (5.0, 9.0)]


def test_prepare_config_file_is_not_overridden_by_option_defaults(tmp_path):
    (tmp_path / "prepare.json").write_text('{"split": "user", "max_len": 256}')
    result = CliRunner().invoke(app, ["prepare", "ga360", str(GA360 / "parquet"), "--out", str(tmp_path / "p"),
                                      "--config", str(tmp_path / "prepare.json"), "--max-len", "300"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "p" / "summary.json").read_text())["config"]
    assert config["split"] == "user" and config["max_len"] == 300  # the file's, then the option given
