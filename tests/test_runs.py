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
