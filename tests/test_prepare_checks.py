"""What prepare says and refuses: hints in the caller's spelling, look-alike page names, a huge vocabulary,
an --out that holds something else."""

import importlib
import json
import warnings
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.ingest import IngestError, read_events
from hetlm.ingest.base import LOOK_ALIKE_PAGES
from hetlm.prepare import LargeVocabularyWarning, PrepareConfig, prepare
from hetlm.sessions import DataError

PREPARE = importlib.import_module("hetlm.prepare")  # the module (hetlm.prepare is the function)
BAD = Path(__file__).resolve().parent / "data" / "bad"
NON_UTF8 = BAD / "ga360" / "non_utf8.jsonl"  # an error whose hint is to skip bad rows
QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.json"


def flat(text: str) -> str:
    return " ".join(text.split())


def write_log(path: Path, rows: list[tuple]) -> Path:
    pl.DataFrame(rows, schema=["user", "session", "page", "time"], orient="row").write_csv(path)
    return path


def test_skip_hint_in_python_names_the_keyword():
    with pytest.raises(IngestError) as err:
        read_events("ga360", NON_UTF8)
    assert "on_bad_rows='skip'" in str(err.value) and "--skip-bad-rows" not in str(err.value)


def test_skip_hint_of_cli_prepare_names_its_flag(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "ga360", str(NON_UTF8), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "--skip-bad-rows" in flat(result.output)


def test_skip_hint_of_experiment_names_its_set_key(tmp_path):
    result = CliRunner().invoke(app, ["experiment", str(QUICK), "--out", str(tmp_path / "run"), "--data", str(NON_UTF8),
                                      "--source", "ga360"])
    assert result.exit_code == 2, result.output
    assert "--set prepare.on_bad_rows=skip" in flat(result.output) and "--skip-bad-rows" not in result.output


def test_generic_log_without_time_or_session_says_so(tmp_path):
    rows = [(f"u{u}", None, f"p{(u + i) % 7}", f"2021-01-01 10:0{i}:00") for u in range(20) for i in range(6)]
    log = write_log(tmp_path / "log.csv", rows)
    with pytest.raises(DataError, match="no user has two sessions") as err:
        prepare("generic", log, tmp_path / "p", user="user", page="page")
    assert "--time" in str(err.value) and "--session" in str(err.value)
    with pytest.raises(DataError) as err:  # a time column given, and it has one session a user: no such hint
        prepare("generic", log, tmp_path / "p2", user="user", page="page", time="time")
    assert "--time" not in str(err.value)


def test_look_alike_page_names_are_one_page_and_counted(tmp_path):
    names = ["Caf\u00e9", "Cafe\u0301", "Home", "Home\u200b"]  # NFC, NFD; zero-width space
    rows = [(f"u{u}", f"s{u}-{s}", names[(u + s + i) % 4], f"2021-01-0{1 + s} 10:0{i}:00")
            for u in range(6) for s in range(3) for i in range(3)]
    summary = prepare("generic", write_log(tmp_path / "log.csv", rows), tmp_path / "p", PrepareConfig(split="user"),
                      user="user", session="session", page="page", time="time")
    vocab = json.loads((tmp_path / "p" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"Café", "Home"} <= set(vocab) and "Cafe\u0301" not in vocab and "Home\u200b" not in vocab
    assert summary["pages"] == 2 and summary["ingest_notes"] == {LOOK_ALIKE_PAGES: 4}


def test_huge_vocabulary_is_warned_with_the_model_size(tmp_path, monkeypatch):
    monkeypatch.setattr(PREPARE, "LARGE_VOCABULARY", 100)
    # 150 users, each two sessions of pages no one else sees, and a few common pages seen by everyone.
    rows = [(f"u{u}", f"s{u}-{s}", page, f"2021-01-0{1 + s} 10:0{i}:00")
            for u in range(150) for s in range(2)
            for i, page in enumerate([f"common{s}", f"own{u}-{s}", f"common{s + 2}"])]
    log = write_log(tmp_path / "log.csv", rows)
    with pytest.warns(LargeVocabularyWarning, match=r"M parameters.*--min-page-count 2") as caught:
        summary = prepare("generic", log, tmp_path / "p", PrepareConfig(split="user"),
                          user="user", session="session", page="page", time="time")
    assert f"{summary['pages']:,} pages" in str(caught[0].message)
    monkeypatch.setattr(PREPARE, "LARGE_VOCABULARY", 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LargeVocabularyWarning)
        prepare("generic", log, tmp_path / "p2", PrepareConfig(split="user"),
                user="user", session="session", page="page", time="time")


def test_prepare_refuses_an_out_that_holds_something_else(tmp_path):
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "tokenizer" / "tokenizer.json").write_text("{}")
    (model / "config.json").write_text("{}")
    rows = [(f"u{u}", f"s{u}-{s}", f"p{(u + s + i) % 5}", f"2021-01-0{1 + s} 10:0{i}:00")
            for u in range(8) for s in range(3) for i in range(3)]
    log = write_log(tmp_path / "log.csv", rows)
    options = dict(user="user", session="session", page="page", time="time")
    with pytest.raises(ValueError, match="not a prepared folder.*config.json"):
        prepare("generic", log, model, PrepareConfig(split="user"), **options)
    assert (model / "tokenizer" / "tokenizer.json").read_text() == "{}"  # untouched
    result = CliRunner().invoke(app, ["prepare", "generic", str(log), "--out", str(model), "--user", "user",
                                      "--session", "session", "--page", "page", "--time", "time"])
    assert result.exit_code == 2 and "not a prepared folder" in flat(result.output)
    prepare("generic", log, tmp_path / "p", PrepareConfig(split="user"), **options)
    prepare("generic", log, tmp_path / "p", PrepareConfig(split="user"), **options)  # a prepared folder: replaced


def test_an_experiment_on_another_log_is_named_after_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("hetlm.experiment.run_experiment", lambda cfg, *args, **kwargs: seen.append(cfg.name))
    for extra in ([], ["--set", "name=mine"]):
        result = CliRunner().invoke(app, ["experiment", str(QUICK), "--out", str(tmp_path / "run"),
                                          "--data", str(NON_UTF8), "--source", "ga360", *extra])
        assert result.exit_code == 0, result.output
    assert seen == [f"{NON_UTF8.name} (ga360), settings of quick.json", "mine"]
