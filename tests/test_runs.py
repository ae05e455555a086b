"""Run folders that are never lost or mixed: `hetlm experiment` on a folder log, an --out that holds
another run, results before extras, fingerprints checked by `hetlm report`, Ctrl-C and failures said plainly."""

import gzip
import itertools
import json
import shutil

import pytest
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.experiment import ExperimentConfig, run_experiment
from hetlm.runs import RunFolder
from tests.analytics_exports import browsing, write_ga4
from tests.conftest import SHIPPED

runner = CliRunner()


def tiny_config(path, source="taobao", **changes) -> ExperimentConfig:
    """The cheapest whole experiment: the small LM alone, two steps, greedy rows and baselines."""
    settings = {
        "name": "tiny", "source": source, "path": str(path),
        "prepare": {"max_len": 64, "max_train_targets_per_user": 1},
        "pretrain": {"max_steps": 2, "batch_size": 16, "eval_every": 2, "max_len": 64},
        "kmeans": {"enabled": False}, "hetlm": {"enabled": False}, "larger": {"enabled": False},
        "set_decoder": {"enabled": False}, "generation": {"max_new_tokens": 4}, "bert_score": False,
        "outcome_samples": 0, "baselines": ["most_popular"],
    }
    return ExperimentConfig.model_validate(settings | changes)


@pytest.fixture(scope="module")
def taobao_log(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "log.csv"
    with gzip.open(SHIPPED, "rt") as f:
        log.write_text("".join(itertools.islice(f, 6_000)))
    return log


@pytest.fixture(scope="module")
def ga4_folder(tmp_path_factory):
    """A GA4 export folder of two daily files (events_YYYYMMDD.json.gz), as `hetlm prepare ga4 DIR` reads it."""
    folder = tmp_path_factory.mktemp("ga4") / "export"
    write_ga4(browsing(40, visits=3, pages=4, days=2), folder)
    return folder


def test_experiment_on_a_folder_log_writes_its_results_and_report(ga4_folder, tmp_path):
    run = RunFolder(tmp_path / "run")
    run_experiment(tiny_config(ga4_folder, "ga4"), run.path, progress=False)
    result = run.read_results()
    assert len(result.data_fingerprint["input"]) == 64
    assert run.tables_file.is_file() and run.report_file.read_text().endswith("</html>")
    out = runner.invoke(app, ["report", str(run.path)])
    assert out.exit_code == 0, out.output


def test_results_are_kept_when_an_extra_fails(taobao_log, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figure code broke")
    monkeypatch.setattr("hetlm.experiment.write_report", broken)
    run = RunFolder(tmp_path / "run")
    run_experiment(tiny_config(taobao_log), run.path, progress=False)
    assert run.read_results().name == "tiny" and run.tables_file.is_file()
    assert not run.report_file.exists()


@pytest.fixture(scope="module")
def finished(taobao_log, tmp_path_factory):
    run = RunFolder(tmp_path_factory.mktemp("finished") / "run")
    run_experiment(tiny_config(taobao_log), run.path, progress=False)
    return run


def copy_of(run: RunFolder, tmp_path) -> RunFolder:
    shutil.copytree(run.path, tmp_path / "copy")
    return RunFolder(tmp_path / "copy")


def test_an_out_holding_another_run_is_refused_and_kept(finished, taobao_log, tmp_path):
    run = copy_of(finished, tmp_path)
    before = run.results_file.read_text()
    other = tiny_config(taobao_log, name="other", kmeans={"n_clusters": 500})
    (tmp_path / "other.json").write_text(other.model_dump_json())
    out = runner.invoke(app, ["experiment", str(tmp_path / "other.json"), "--out", str(run.path)])
    assert out.exit_code == 2 and "holds another run" in out.output and "--overwrite" in out.output
    assert run.results_file.read_text() == before and json.loads(run.config_file.read_text())["name"] == "tiny"
    # --overwrite: the old run is removed before the new one starts, so its failure leaves no mix of the two
    out = runner.invoke(app, ["experiment", str(tmp_path / "other.json"), "--out", str(run.path), "--overwrite"])
    assert out.exit_code == 2 and "500 clusters" in out.output
    assert not run.results_file.exists() and not (run.path / "generations").exists()
    assert json.loads(run.config_file.read_text())["name"] == "other"
    assert "not a finished" in runner.invoke(app, ["report", str(run.path)]).output


def test_report_refuses_a_folder_that_mixes_two_runs(finished, tmp_path, taobao_prepared):
    run = copy_of(finished, tmp_path)
    shutil.copy(taobao_prepared[0] / "test.parquet", run.split("test"))  # another run's samples
    out = runner.invoke(app, ["report", str(run.path)])
    assert out.exit_code == 2 and "prepared/test.parquet" in out.output and "mixes two runs" in out.output


def test_ctrl_c_in_experiment_says_what_the_folder_holds(taobao_log, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("hetlm.experiment.fit_single", interrupted)
    (tmp_path / "c.json").write_text(tiny_config(taobao_log).model_dump_json())
    out = runner.invoke(app, ["experiment", str(tmp_path / "c.json"), "--out", str(tmp_path / "run")])
    assert out.exit_code == 130
    assert "unfinished run (prepared; no results.json)" in out.output and "--overwrite" in out.output


def test_truncated_results_json_is_named(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    run.results_file.write_text(run.results_file.read_text()[:500])
    out = runner.invoke(app, ["report", str(run.path)])
    assert out.exit_code == 2 and "results.json is not a readable results file" in out.output


def test_report_on_a_read_only_folder_is_a_message(finished, tmp_path, monkeypatch):
    def read_only(path, data):
        raise OSError(30, "Read-only file system", str(path))
    monkeypatch.setattr("hetlm.report.write_atomically", read_only)
    out = runner.invoke(app, ["report", str(finished.path)])
    assert out.exit_code == 2 and "read-only" in out.output and "Traceback" not in out.output


def test_report_shows_no_absolute_local_paths(finished):
    page = finished.report_file.read_text()
    log = json.loads(finished.config_file.read_text())["path"]
    assert log.startswith("/") and log not in page and "log.csv" in page


@pytest.mark.parametrize("factor", [-3, 0, 1, "NaN", "Infinity", 1e300])
def test_larger_factor_is_checked_before_anything_runs(factor, tmp_path, taobao_log):
    (tmp_path / "c.json").write_text(tiny_config(taobao_log).model_dump_json())
    out = runner.invoke(app, ["experiment", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"),
                              "--set", f"larger.factor={factor}"])
    assert out.exit_code == 2 and "larger.factor" in out.output
    assert not (tmp_path / "run").exists()
