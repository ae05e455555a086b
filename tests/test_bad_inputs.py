"""The bad-input corpus (tests/data/bad/, listed in its README.md): every case either stops with an
IngestError naming the file, the line and the problem, or is handled with every dropped row counted in
prepare's summary. Big cases (a 10,000-page session) are generated here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.experiment import ExperimentConfig
from hetlm.ingest import IngestError, read_events
from hetlm.ingest.base import NOT_UTF8, OUTCOME_NAMED_VIEW
from hetlm.ingest.ga360 import HIT_TWICE
from hetlm.prepare import PrepareConfig, prepare

BAD = Path(__file__).resolve().parent / "data" / "bad"
GENERIC = dict(user="user", session="session", page="page", event="event", time="time")
REPEAT = "immediate repeat of the same page (collapsed)"
SHORT = "session shorter than 2 pages"
ONE_SESSION = "user with fewer than 2 sessions"
MSNBC_CLEANING = {REPEAT: 16, SHORT: 7}  # what cleaning drops from msnbc/good.seq itself

# file: (problem named in the error, line or None, dropped_rows with --skip-bad-rows or None when the
# problem cannot be skipped)
ERRORS = {
    "taobao/empty.csv": ("the file is empty", None, None),
    "taobao/header_line.csv": ("unparsable timestamp", 1, {"unparsable timestamp": 1}),
    "taobao/truncated_last_line.csv": ("truncated line", 28, {"truncated line (missing fields)": 1}),
    "taobao/blank_lines.csv": ("truncated line", 4, {"truncated line (missing fields)": 1, "unparsable timestamp": 1}),
    "taobao/tab_separated.csv": ("expected 5 columns", 1, None),
    "taobao/extra_field.csv": ("more fields than the first line has", 5, None),
    "taobao/non_utf8.csv": (NOT_UTF8, 10, {NOT_UTF8: 1}),
    "taobao/bad_timestamp.csv": ("unparsable timestamp", 7, {"unparsable timestamp": 1}),
    "taobao/timestamp_beyond_int64.csv": ("unparsable timestamp", 4, {"unparsable timestamp": 1}),
    "taobao/timestamp_out_of_range.csv": (
        "timestamp out of range", 8, {"timestamp out of range (unix seconds expected)": 1}),
    "taobao/missing_user.csv": ("missing user_id or category_id", 12, {"missing user_id or category_id": 1}),
    "taobao/unknown_behavior.csv": ("unknown behavior", 3, {"unknown behavior (expected pv/cart/fav/buy)": 1}),
    "rees46/empty.csv": ("the file is empty", None, None),
    "rees46/header_only.csv": ("no events in the file", None, None),
    "rees46/renamed_column.csv": ("missing column(s) ['user_id']", 1, None),
    "rees46/semicolon.csv": ("only one column", 1, None),
    "rees46/truncated_last_line.csv": ("missing user_id", 29, {"missing user_id": 1}),
    "rees46/bad_time.csv": ("unparsable event_time", 6, {"unparsable event_time (expected %Y-%m-%d %H:%M:%S UTC)": 1}),
    "rees46/non_utf8.csv": (NOT_UTF8, 7, {NOT_UTF8: 1}),
    "rees46/unknown_event_type.csv": (
        "unknown event_type", 5, {"unknown event_type (expected view/cart/remove_from_cart/purchase)": 1}),
    "ga360/empty.json.gz": ("the file is empty", None, None),
    "ga360/truncated.json.gz": ("truncated or corrupt gzip", None, None),
    "ga360/truncated_last_line.jsonl": (
        "malformed JSON line", 10, {"malformed JSON line (expected one JSON object per line)": 1}),
    "ga360/array_line.jsonl": (
        "malformed JSON line", 5, {"malformed JSON line (expected one JSON object per line)": 1}),
    "ga360/missing_visit_start.jsonl": (
        "session without fullVisitorId, visitId or a numeric visitStartTime", 4,
        {"session without fullVisitorId, visitId or a numeric visitStartTime": 1}),
    "ga360/hits_renamed.jsonl": ("no events in the file", None, None),
    "ga360/hits_not_a_list.jsonl": (
        "wrong type", 2, {"JSON values of the wrong type in the fields "
                          "['fullVisitorId', 'visitId', 'visitStartTime', 'hits']": 1}),
    "ga360/non_utf8.jsonl": (NOT_UTF8, 3, {NOT_UTF8: 1}),
    "ga360/start_out_of_range.jsonl": (
        "visitStartTime out of range", 6, {"visitStartTime out of range (unix seconds expected)": 1}),
    "ga360/hit_time_not_numeric.jsonl": ("hit without a numeric time", 7, {"hit without a numeric time": 1}),
    "otto/empty.jsonl": ("the file is empty", None, None),
    "otto/truncated_last_line.jsonl": (
        "malformed JSON line", 4, {"malformed JSON line (expected one JSON object per line)": 1}),
    "otto/missing_session.jsonl": ("line without a session id", 2, {"line without a session id": 1}),
    "otto/unknown_type.jsonl": (
        "clicks/carts/orders", 2, {"event without aid, numeric ts or type clicks/carts/orders": 1}),
    "otto/ts_beyond_int64.jsonl": (
        "numeric ts", 3, {"event without aid, numeric ts or type clicks/carts/orders": 1}),
    "otto/ts_out_of_range.jsonl": ("ts out of range", 3, {"event ts out of range (unix ms expected)": 1}),
    "otto/events_not_a_list.jsonl": (
        "wrong type", 2, {"JSON values of the wrong type in the fields ['session', 'events']": 1}),
    "msnbc/empty.seq": ("no category names line", None, None),
    "msnbc/header_only.seq": ("no events in the file", None, None),
    "msnbc/bad_number.seq": ("not a category number 1..17", 10, {"not a category number 1..17": 1} | MSNBC_CLEANING),
    "msnbc/non_numeric.seq": ("not a category number 1..17", 12, {"not a category number 1..17": 1} | MSNBC_CLEANING),
    "msnbc/non_utf8_names.seq": (NOT_UTF8, 3, None),
    "msnbc/no_names_line.seq": ("not the category names", 1, None),
    "msnbc/truncated.zip": ("truncated or corrupt zip", None, None),
    "msnbc/zip_without_seq.zip": ("no .seq file in the zip", None, None),
    "generic/empty.csv": ("the file is empty", None, None),
    "generic/header_only.csv": ("no events in the file", None, None),
    "generic/renamed_column.csv": ("missing column(s) ['page']", 1, None),
    "generic/semicolon.csv": ("only one column", 1, None),
    "generic/commas.tsv": ("only one column", 1, None),
    "generic/extra_field.csv": ("more fields than the first line has", 7, None),
    "generic/unclosed_quote.csv": ("a quoted field is never closed", None, None),
    "generic/truncated_last_line.csv": ("unparsable time", 29, {"unparsable time in ['time']": 1}),
    "generic/time_not_dates.csv": ("no date/time format fits the 'time' column", None, None),  # found by the fuzzer
    "generic/bad_time.csv": ("unparsable time", 8, {"unparsable time in ['time']": 1}),
    # the line of the file, not the row: a page name before it spans two lines
    "generic/bad_time_after_multiline_page.csv": ("unparsable time", 9, {"unparsable time in ['time']": 1}),
    "generic/non_utf8.csv": (NOT_UTF8, 6, {NOT_UTF8: 1}),
    "generic/reserved_page.csv": (
        "['[BOS]', '[UNK]'] are reserved for the tokenizer", None,
        {"page named like a special token ([PAD] [UNK] [BOS] [EOS])": 2, SHORT: 1}),
    "generic/page_named_cart.csv": ("viewed page named like an outcome", 4, {OUTCOME_NAMED_VIEW: 2}),
    "generic/ms_read_as_seconds.csv": ("time out of range after unit conversion", 2, None),  # every row: none left
    "generic/ms_among_seconds.csv": ("time out of range after unit conversion", 6, {
        "time out of range after unit conversion (before 1970 or after 2099, or in 1970 among later times)": 2,
        SHORT: 1}),
    "rees46/category_named_cart.csv": ("viewed page named like an outcome", 3, {OUTCOME_NAMED_VIEW: 1}),
    "generic/truncated.csv.gz": ("truncated or corrupt gzip", None, None),  # not the delimiter's fault
    "generic/empty.parquet": ("not a readable Parquet file", None, None),
    "generic/truncated.parquet": ("not a readable Parquet file", None, None),
    "generic/panics_reader.parquet": ("not a readable Parquet file", None, None),  # found by the fuzzer
    "generic/nested_page.parquet": ("column 'page' holds List(String)", 1, None),
    "ga4/empty.json.gz": ("the file is empty", None, None),
    "ga4/truncated.json.gz": ("truncated or corrupt gzip", None, None),
    "ga4/truncated_last_line.jsonl": (
        "malformed JSON line", 29, {"malformed JSON line (expected one JSON object per line)": 1}),
    "ga4/event_params_not_a_list.jsonl": ("wrong type", 2, {
        "JSON values of the wrong type in the fields "
        "['event_timestamp', 'event_name', 'user_pseudo_id', 'user_id', 'event_params', 'items']": 1}),
    "ga4/timestamp_not_numeric.jsonl": (
        "event without a numeric event_timestamp", 5, {"event without a numeric event_timestamp": 1}),
    "ga4/timestamp_out_of_range.jsonl": ("event_timestamp out of range", 6, {
        "event_timestamp out of range (microseconds since the epoch expected)": 1}),
    "ga4/missing_user.jsonl": ("event without user_pseudo_id", 3, {"event without user_pseudo_id": 1}),
    "ga4/missing_page_location.jsonl": (
        "page_view without a page_location parameter", 7, {"page_view without a page_location parameter": 1}),
    "ga4/non_utf8.jsonl": (NOT_UTF8, 1, {NOT_UTF8: 1}),
    "adobe/empty_hit_data": ("the file is empty", None, None),
    "adobe/no_column_headers": ("no column_headers.tsv", None, None),
    "adobe/renamed_column": ("missing column(s) ['post_visid_high']", 1, None),
    "adobe/extra_field": ("more fields than column_headers.tsv names (18)", 4, None),
    "adobe/bad_time": ("hit without a numeric hit_time_gmt", 6, {"hit without a numeric hit_time_gmt": 1}),
    "adobe/missing_visitor": (
        "hit without post_visid_high and post_visid_low", 3, {"hit without post_visid_high and post_visid_low": 1}),
    "adobe/truncated_last_line": (
        "hit without post_visid_high and post_visid_low", 29, {"hit without post_visid_high and post_visid_low": 1}),
    "adobe/non_utf8": (NOT_UTF8, 1, {NOT_UTF8: 1}),
}
ADOBE_EXCLUDED = {"hit excluded by Adobe (exclude_hit not 0)": 1, "data source hit (hit_source 5, 7, 8 or 9)": 1}

# file: (events read, dropped_rows, the good file of its format whose samples it must reproduce or None)
HANDLED = {
    "taobao/good.csv": (27, {}, None),
    "taobao/out_of_order.csv": (27, {}, "taobao/good.csv"),
    "taobao/duplicates.csv": (36, {REPEAT: 9}, "taobao/good.csv"),
    "taobao/one_session_user.csv": (30, {ONE_SESSION: 3}, "taobao/good.csv"),
    "taobao/one_page_session.csv": (28, {SHORT: 1}, "taobao/good.csv"),
    "taobao/crlf.csv": (27, {}, "taobao/good.csv"),
    "taobao/bom.csv": (27, {}, "taobao/good.csv"),
    "taobao/id_overflow.csv": (27, {}, None),
    "rees46/good.csv": (27, {}, None),
    "rees46/out_of_order.csv": (27, {}, "rees46/good.csv"),
    "rees46/columns_reordered.csv": (27, {}, "rees46/good.csv"),
    "rees46/quoted_fields.csv": (27, {}, None),
    "rees46/id_overflow.csv": (27, {}, None),
    "rees46/missing_session_id.csv": (27, {SHORT: 1}, None),
    "ga360/good.jsonl": (28, {}, None),
    "ga360/blank_lines.jsonl": (28, {}, "ga360/good.jsonl"),
    "ga360/shuffled_hits.jsonl": (28, {}, "ga360/good.jsonl"),
    "ga360/duplicate_session.jsonl": (31, {HIT_TWICE: 3}, "ga360/good.jsonl"),
    "ga360/tricky_paths.jsonl": (28, {}, None),
    "otto/good.jsonl": (27, {}, None),
    "otto/out_of_order.jsonl": (27, {}, "otto/good.jsonl"),
    "otto/duplicates.jsonl": (30, {REPEAT: 3}, "otto/good.jsonl"),
    "otto/one_event_user.jsonl": (28, {SHORT: 1}, "otto/good.jsonl"),
    "otto/aid_overflow.jsonl": (27, {}, None),
    "msnbc/good.seq": (41, MSNBC_CLEANING, None),
    "msnbc/good.zip": (41, MSNBC_CLEANING, "msnbc/good.seq"),
    "msnbc/crlf.seq": (41, MSNBC_CLEANING, "msnbc/good.seq"),
    "msnbc/tab_separated.seq": (41, MSNBC_CLEANING, "msnbc/good.seq"),
    "generic/good.csv": (27, {}, None),
    "generic/good.parquet": (27, {}, "generic/good.csv"),
    "generic/out_of_order.csv": (27, {}, "generic/good.csv"),
    "generic/duplicates.csv": (30, {REPEAT: 3}, "generic/good.csv"),
    "generic/one_session_user.csv": (30, {ONE_SESSION: 3}, "generic/good.csv"),
    "generic/tricky_pages.csv": (27, {}, None),
    "generic/look_alike_names.csv": (27, {ONE_SESSION: 3}, None),  # user 2.0 is not user 2: counted in ingest_notes
    "generic/id_overflow.csv": (27, {}, None),
    "generic/uint64_users.parquet": (27, {}, None),
    "ga4/good.jsonl": (28, {}, None),
    "ga4/good.parquet": (28, {}, "ga4/good.jsonl"),
    "ga4/shuffled.jsonl": (28, {}, "ga4/good.jsonl"),
    "ga4/days": (28, {}, "ga4/good.jsonl"),
    "ga4/no_session_id.jsonl": (28, {}, "ga4/good.jsonl"),  # sessions split on the gap instead
    "adobe/good": (28, {}, None),
    "adobe/gzipped": (28, {}, "adobe/good"),
    "adobe/multi_day": (28, {}, "adobe/good"),
    "adobe/excluded_hits": (30, ADOBE_EXCLUDED, "adobe/good"),
    "adobe/escaped_values": (28, {}, None),
}


def source_and_options(rel: str) -> tuple[str, dict]:
    source = rel.split("/")[0]
    return source, (GENERIC if source == "generic" else {})


def run_prepare(rel: str, out: Path, **config) -> dict:
    source, options = source_and_options(rel)
    return prepare(source, BAD / rel, out, PrepareConfig(**config), **options)


def samples(out: Path) -> dict[str, pl.DataFrame]:
    return {s: pl.read_parquet(out / f"{s}.parquet") for s in ("train", "val", "test")}


def test_every_corpus_file_is_a_case_and_listed_in_the_readme():
    files = {str(p.relative_to(BAD)) for p in BAD.glob("*/*")}
    assert files == set(ERRORS) | set(HANDLED)
    readme = (BAD / "README.md").read_text()
    assert all(f"`{f}`" in readme for f in files)


@pytest.mark.parametrize("rel", list(ERRORS))
def test_bad_file_stops_with_file_line_and_problem(rel, tmp_path):
    problem, line, _ = ERRORS[rel]
    with pytest.raises(IngestError) as caught:
        run_prepare(rel, tmp_path)
    err = caught.value
    # A data feed case is a folder: the error names its file.
    assert (err.path == str(BAD / rel) or err.path.startswith(f"{BAD / rel}/")) and err.line == line
    assert problem in err.problem
    where = f"{err.path}:{line}: " if line else f"{err.path}: "
    assert str(err).startswith(where) and err.hint  # the hint says what to do
    assert not (tmp_path / "train.parquet").exists()


@pytest.mark.parametrize("rel", [rel for rel, (_, _, skipped) in ERRORS.items() if skipped is not None])
def test_bad_rows_are_skipped_and_counted(rel, tmp_path):
    summary = run_prepare(rel, tmp_path, on_bad_rows="skip")
    assert summary["dropped_rows"] == ERRORS[rel][2]
    assert summary["events_read"] == summary["events_kept"] + sum(summary["dropped_rows"].values())


@pytest.mark.parametrize("rel", [rel for rel, (_, _, skipped) in ERRORS.items() if skipped is None])
def test_unskippable_problems_still_stop_with_skip_bad_rows(rel, tmp_path):
    with pytest.raises(IngestError, match="^" + re.escape(str(BAD / rel))):
        run_prepare(rel, tmp_path, on_bad_rows="skip")


@pytest.mark.parametrize("rel", list(HANDLED))
def test_handled_file_counts_every_dropped_row(rel, tmp_path):
    events_read, dropped, same_as = HANDLED[rel]
    summary = run_prepare(rel, tmp_path / "out")
    assert summary["events_read"] == events_read and summary["dropped_rows"] == dropped
    assert summary["events_read"] == summary["events_kept"] + sum(dropped.values())
    if same_as is not None:
        run_prepare(same_as, tmp_path / "good")
        for split, df in samples(tmp_path / "out").items():
            assert df.equals(samples(tmp_path / "good")[split]), split


@pytest.mark.parametrize("rel, users", [
    ("taobao/id_overflow.csv", {"18446744073709551616", "99999999999999999999999999", "-9223372036854775809"}),
    ("rees46/id_overflow.csv", {"92233720368547758081", "92233720368547758082", "92233720368547758083"}),
    ("generic/id_overflow.csv", {"1" * 30 + "1", "1" * 30 + "2", "1" * 30 + "3"}),
    ("generic/uint64_users.parquet", {"18446744073709551001", "18446744073709551002", "18446744073709551003"}),
])
def test_ids_beyond_int64_are_kept_exactly(rel, users):
    source, options = source_and_options(rel)
    assert set(read_events(source, BAD / rel, **options).events["user"]) == users


@pytest.mark.parametrize("rel, pages", [
    ("generic/tricky_pages.csv", {'a,b_"quoted"_\U0001F600', "two_lines", "tab_here"}),
    ("rees46/quoted_fields.csv", {'kids,toys_"lego"_\U0001F9F1', "tab_here"}),
    ("ga360/tricky_paths.jsonl", {"shop_smile", "shop_say_hi_there", "shop_two_lines_and_more"}),
    ("otto/aid_overflow.jsonl", {"item_123456789012345678901234567890"}),
    ("adobe/escaped_values", {"Tab_here", "Two_lines", "Back\\slash\\"}),
])
def test_page_names_with_delimiters_quotes_newlines_and_emoji(rel, pages, tmp_path):
    source, options = source_and_options(rel)
    assert pages <= set(read_events(source, BAD / rel, **options).events["page"])
    run_prepare(rel, tmp_path)
    vocab = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert pages <= set(vocab)


# --- generated big cases: a 10,000-page session -------------------------------------------------------


def long_session_log(path: Path, normal_users: int) -> None:
    """Taobao rows: `normal_users` users with 5 sessions of 3 pages, and user 0 with one 10,000-page
    session (pages cycle, so no repeat collapses) besides two normal ones."""
    t0, rows = 1_511_544_000, []
    for u in range(normal_users + 1):
        for k in range(5 if u else 2):
            rows += [(u, 10 + (u + k + i) % 4, t0 + k * 7200 + i * 60) for i in range(3)]
    rows += [(0, 10 + i % 7, t0 + 20 * 7200 + i) for i in range(10_000)]
    pl.DataFrame(rows, schema=["user", "category", "ts"], orient="row").select(
        "user", item=pl.col("category") + 1000, category="category", behavior=pl.lit("pv"), ts="ts"
    ).write_csv(path, include_header=False)


def test_a_10000_page_session_among_many_is_truncated_and_counted(tmp_path):
    long_session_log(tmp_path / "log.csv", normal_users=60)
    summary = prepare("taobao", tmp_path / "log.csv", tmp_path / "out")
    assert summary["long_session_cutoff"] == 3
    assert summary["dropped_rows"] == {"page beyond the 99th-percentile session length (3)": 9_997}
    assert summary["events_read"] == 61 * 15 - 9 + 10_000


def test_a_10000_page_session_that_max_len_cannot_hold_stops_before_anything_is_written(tmp_path):
    long_session_log(tmp_path / "log.csv", normal_users=2)  # too few sessions: the 99th percentile is the max
    with pytest.raises(ValueError, match=r"max_len=512 .* longest kept session \(10002 tokens\)"):
        prepare("taobao", tmp_path / "log.csv", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.parquet"))
    summary = prepare("taobao", tmp_path / "log.csv", tmp_path / "out", PrepareConfig(long_session_percentile=50))
    assert summary["long_session_cutoff"] == 3


def test_a_10000_page_msnbc_visit(tmp_path):
    header = (BAD / "msnbc" / "good.seq").read_text()
    visit = " ".join(str(1 + i % 17) for i in range(10_000))
    (tmp_path / "long.seq").write_text(header + visit + "\n")
    events = read_events("msnbc", tmp_path / "long.seq").events
    assert events.filter(pl.col("user") == "v10")["ts"].to_list() == [1_000_000 + i for i in range(10_000)]
    with pytest.raises(ValueError, match="max_len=512"):
        prepare("msnbc", tmp_path / "long.seq", tmp_path / "out")


# --- the command line ---------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("rel, shown", [
    ("taobao/truncated_last_line.csv", "truncated_last_line.csv:28: truncated line"),
    ("ga360/truncated.json.gz", "truncated.json.gz: truncated or corrupt gzip"),
    ("generic/semicolon.csv", "--sep"),
])
def test_cli_prints_the_error_without_a_traceback(rel, shown, tmp_path):
    source, options = source_and_options(rel)
    flags = [a for k, v in options.items() for a in (f"--{k}", v)]
    result = runner.invoke(app, ["prepare", source, str(BAD / rel), "--out", str(tmp_path), *flags])
    assert result.exit_code == 2, result.output
    assert shown in " ".join(result.output.split()) and "Traceback" not in result.output


def test_cli_skip_bad_rows_counts_them(tmp_path):
    result = runner.invoke(app, ["prepare", "taobao", str(BAD / "taobao/non_utf8.csv"), "--out", str(tmp_path),
                                 "--skip-bad-rows"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "summary.json").read_text())["dropped_rows"] == {NOT_UTF8: 1}


# --- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, field", [
    ({"gap_minutes": -5}, "gap_minutes"),
    ({"gap_minutes": 0}, "gap_minutes"),
    ({"test_fraction": 0}, "test_fraction"),
    ({"test_fraction": 1.2}, "test_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"test_fraction": 0.6, "val_fraction": 0.4}, "test_fraction + val_fraction"),
    ({"max_len": 7}, "max_len"),
    ({"min_sessions": 1}, "min_sessions"),
    ({"long_session_percentile": 101}, "long_session_percentile"),
    ({"long_sessions": "keep"}, "long_sessions"),
    ({"split": "random"}, "split"),
    ({"gap_minutes": 30, "gap": 5}, "gap"),  # unknown keys are errors too
])
def test_prepare_config_errors_name_the_field(settings, field):
    with pytest.raises(ValidationError) as caught:
        PrepareConfig(**settings)
    assert field in str(caught.value)


@pytest.mark.parametrize("settings, field, problem", [
    ({"source": "kaggle"}, "source", "unknown source 'kaggle'; choose from generic, taobao"),
    ({"model": {"preset": "gpt-5"}}, "model.preset", "unknown preset 'gpt-5'; choose from tiny"),
    ({"model": {"family": "mamba"}}, "model.family", "unknown family 'mamba'"),
    ({"baselines": ["markov", "oracle"]}, "baselines", "unknown baseline 'oracle'"),
    ({"prepare": {"max_len": 4}}, "prepare.max_len", "greater than or equal to 8"),
    ({"prepare": {"test_fraction": 0.5, "val_fraction": 0.5}}, "prepare",
     "test_fraction + val_fraction must be below 1"),
    ({"kmeans": {"n_clusters": 1}}, "kmeans.n_clusters", "greater than or equal to 2"),
    ({"hetlm": {"runs": [{"alpha": 1, "colour": 2}]}}, "hetlm", "runs[0]: unknown HeTLMConfig fields ['colour']"),
    ({"hetlm": {"runs": [[5, 9], {"l1": "relative"}]}}, "hetlm.l1", "'paper' or 'centered'"),
])
def test_experiment_config_errors_name_the_field(settings, field, problem):
    with pytest.raises(ValidationError) as caught:
        ExperimentConfig(**settings)
    assert f"\n{field}\n" in str(caught.value) and problem in str(caught.value)


def test_cli_prints_setting_errors_without_a_traceback(tmp_path):
    good = str(BAD / "taobao/good.csv")
    result = runner.invoke(app, ["prepare", "taobao", good, "--out", str(tmp_path), "--gap-minutes", "-1"])
    assert result.exit_code == 2 and "gap_minutes" in result.output and "Traceback" not in result.output
    config = tmp_path / "experiment.json"
    config.write_text(json.dumps({"model": {"preset": "gpt-5"}}))
    result = runner.invoke(app, ["experiment", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "model.preset" in result.output and "Traceback" not in result.output
    config.write_text("{}")
    result = runner.invoke(app, ["experiment", str(config), "--out", str(tmp_path / "run"), "--source", "kaggle"])
    assert result.exit_code == 2 and "unknown source 'kaggle'" in result.output
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_valid_utf8_replacement_character_is_not_taken_for_bad_bytes(tmp_path):
    text = (BAD / "generic/good.csv").read_text().replace("Page 11", "Page \ufffd", 1)
    (tmp_path / "log.csv").write_text(text)
    events = read_events("generic", tmp_path / "log.csv", **GENERIC).events
    assert events.height == 27 and "Page_\ufffd" in set(events["page"])
