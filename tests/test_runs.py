"""Run folders that are never lost or mixed: `hetlm experiment` on a folder log, an --out that holds
another run, results before extras, fingerprints checked by `hetlm report`, Ctrl-C and failures said plainly."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.experiment import ExperimentConfig, run_experiment
from hetlm.runs import RunFolder
from tests.analytics_exports import browsing, write_ga4
from tests.conftest import shipped_head

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
    return shipped_head(tmp_path_factory.mktemp("log") / "log.csv", 6_000)


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
    assert "unfinished run (prepared; no results.json)" in out.output
    assert "the same command starts it again" in out.output
    # which it does: a run of the same config replaces the unfinished one
    monkeypatch.undo()
    out = runner.invoke(app, ["experiment", str(tmp_path / "c.json"), "--out", str(tmp_path / "run")])
    assert out.exit_code == 0 and RunFolder(tmp_path / "run").read_results().name == "tiny"


def test_an_out_holding_other_files_named_like_a_runs_is_left_alone(taobao_log, tmp_path):
    (tmp_path / "out" / "models").mkdir(parents=True)
    (tmp_path / "out" / "models" / "mine.bin").write_text("not ours")
    with pytest.raises(ValueError, match="holds models but no run's config.json"):
        run_experiment(tiny_config(taobao_log), tmp_path / "out", progress=False, overwrite=True)
    assert (tmp_path / "out" / "models" / "mine.bin").read_text() == "not ours"


def test_truncated_results_json_is_named(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    run.results_file.write_text(run.results_file.read_text()[:500])
    out = runner.invoke(app, ["report", str(run.path)])
    assert out.exit_code == 2 and "results.json is not a readable results file" in out.output


def test_report_and_experiment_on_a_read_only_folder_are_messages(finished, taobao_log, small_disk, tmp_path):
    import subprocess

    disk = small_disk("8m")
    shutil.copytree(finished.path, disk / "run", ignore=shutil.ignore_patterns("train", "models"))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    out = runner.invoke(app, ["report", str(disk / "run")])
    assert out.exit_code == 2 and "read-only" in out.output, out.output
    (tmp_path / "c.json").write_text(tiny_config(taobao_log).model_dump_json())
    out = runner.invoke(app, ["experiment", str(tmp_path / "c.json"), "--out", str(disk / "new")])
    assert out.exit_code == 2 and "read-only" in out.output.lower(), out.output


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


# ---------------------------------------------------------------- hetlm train into a run folder


def prepared_from(log, out, **settings):
    from hetlm.prepare import PrepareConfig, prepare

    prepare("taobao", log, out, PrepareConfig(max_len=64, **settings))
    return out


@pytest.fixture(scope="module")
def prepared_a(taobao_log, tmp_path_factory):
    return prepared_from(taobao_log, tmp_path_factory.mktemp("prepA") / "prep")


@pytest.fixture(scope="module")
def prepared_renamed(taobao_log, tmp_path_factory):
    """The same log with its category ids permuted: as many pages, each id now another page."""
    lines = taobao_log.read_text().splitlines()
    categories = sorted({line.split(",")[2] for line in lines})
    renamed = dict(zip(categories, categories[1:] + categories[:1]))
    log = tmp_path_factory.mktemp("renamed") / "log.csv"
    log.write_text("".join(",".join(f[:2] + [renamed[f[2]]] + f[3:]) + "\n" for f in (l.split(",") for l in lines)))
    return prepared_from(log, tmp_path_factory.mktemp("prepB") / "prep")


TRAIN = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "16", "--set", "train.save_every=2"]


def train(prepared, out, *extra):
    return runner.invoke(app, ["train", str(prepared), "--out", str(out), *TRAIN, *extra])


def test_train_gives_the_model_the_prepared_max_len(prepared_a, tmp_path):
    out = train(prepared_a, tmp_path / "run")
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["max_position_embeddings"] == 64
    from hetlm.score import Scorer

    assert Scorer.from_pretrained(tmp_path / "run" / "best").history_budget == 64 - 40 - 1  # no untrained positions


def test_resume_refuses_a_checkpoint_of_another_vocabulary(prepared_a, prepared_renamed, tmp_path):
    from hetlm.tokenizer import load_tokenizer

    assert len(load_tokenizer(prepared_a / "tokenizer")) == len(load_tokenizer(prepared_renamed / "tokenizer"))
    assert train(prepared_a, tmp_path / "run").exit_code == 0
    out = train(prepared_renamed, tmp_path / "run", "--resume")
    assert out.exit_code == 2 and "belongs to another run" in out.output and "vocabulary" in out.output
    out = train(prepared_a, tmp_path / "run", "--resume", "--preset", "small")  # another shape: no traceback
    assert out.exit_code == 2 and "belongs to another run" in out.output
    import torch  # a checkpoint saved before identities were recorded

    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["identity"]
    torch.save(state, state_file)
    out = train(prepared_a, tmp_path / "run", "--resume", "--preset", "small")
    assert out.exit_code == 2 and "holds a model of another shape" in out.output


def test_a_fresh_run_stopped_before_its_first_save_leaves_no_old_checkpoint(prepared_a, tmp_path, monkeypatch):
    assert train(prepared_a, tmp_path / "run").exit_code == 0

    def crash(self, *args):
        raise ValueError("stopped before the first save")
    monkeypatch.setattr("hetlm.train._Run.step", crash)
    out = train(prepared_a, tmp_path / "run", "--lr", "3e-4")
    assert out.exit_code == 2
    assert not any((tmp_path / "run" / name).exists() for name in ("checkpoint", "best", "history.json"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["train"]["lr"] == 3e-4


def test_ctrl_c_in_train_saves_a_checkpoint_and_says_how_to_resume(prepared_a, tmp_path, monkeypatch):
    import signal

    from hetlm.train import _Run

    step = _Run.step

    def interrupted_at_3(self, *args):
        result = step(self, *args)
        if self.state["step"] == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: caught, training stops after this step
        return result
    monkeypatch.setattr("hetlm.train._Run.step", interrupted_at_3)
    run = tmp_path / "run"
    out = train(prepared_a, run)
    assert out.exit_code == 130 and "stopped at step 3" in out.output and "--resume" in out.output
    assert "best/ holds step 2" in out.output and (run / "best" / "tokenizer").is_dir()
    monkeypatch.setattr("hetlm.train._Run.step", step)
    out = train(prepared_a, run, "--resume")
    assert out.exit_code == 0 and "4 steps" in out.output, out.output
    assert json.loads((run / "history.json").read_text())["train"][-1]["step"] == 4


def test_train_without_validation_samples_says_what_to_do(taobao_log, tmp_path):
    prepared = prepared_from(taobao_log, tmp_path / "prep", val_fraction=0.0)
    out = train(prepared, tmp_path / "run")
    assert out.exit_code == 0, out.output
    assert "holds no samples" in out.output and "--split user" in out.output
    assert "None" not in out.output and "not validated" in out.output


# ---------------------------------------------------------------- score and evaluate: messages, not tracebacks


def score(finished, log, out, *extra):
    return runner.invoke(app, ["score", str(finished.model("small")), str(log), "--source", "taobao", "--out",
                               str(out), "--n-samples", "2", "--max-new-tokens", "4", *extra])


@pytest.mark.parametrize("option", [["--batch-users", "-1"], ["--batch-users", "0"], ["--batch-size", "-3"],
                                    ["--batch-size", "0"]])
def test_score_batch_settings_must_be_positive(option, finished, taobao_log, tmp_path):
    out = score(finished, taobao_log, tmp_path / "s.parquet", *option)
    assert out.exit_code == 2 and "must be a whole number >= 1" in out.output, out.output
    assert not (tmp_path / "s.parquet").exists()


def test_max_new_tokens_beyond_the_models_positions_is_refused_up_front(finished, taobao_log, tmp_path):
    from hetlm.score import Scorer

    out = score(finished, taobao_log, tmp_path / "s.parquet", "--max-new-tokens", "600")
    assert out.exit_code == 2 and "leaves no room for a history" in out.output and "use at most 62" in out.output
    with pytest.raises(ValueError, match="leaves no room"):  # what `hetlm serve` starts with
        Scorer.from_pretrained(finished.model("small"), max_new_tokens=600)


def test_score_says_why_columns_are_nan(finished, taobao_log, tmp_path):
    out = score(finished, taobao_log, tmp_path / "s.parquet")
    assert out.exit_code == 0, out.output
    assert "p_cart_calibrated, p_purchase_calibrated are NaN: the model folder has no outcome calibration" in out.output


def test_evaluate_on_a_missing_or_empty_generations_file(finished, tmp_path):
    import polars as pl

    prepared = str(finished.prepared)
    out = runner.invoke(app, ["evaluate", str(tmp_path / "none.parquet"), prepared])
    assert out.exit_code == 2 and "not found" in out.output and "hetlm generate" in out.output
    empty = pl.read_parquet(next((finished.path / "generations").iterdir())).head(0)
    empty.write_parquet(tmp_path / "empty.parquet")
    out = runner.invoke(app, ["evaluate", str(tmp_path / "empty.parquet"), prepared])
    assert out.exit_code == 2 and "holds no generations" in out.output
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 not really")
    out = runner.invoke(app, ["evaluate", str(tmp_path / "cut.parquet"), prepared])
    assert out.exit_code == 2 and "not readable Parquet" in out.output


# ---------------------------------------------------------------- a full disk: whole or absent, and a message


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size (skipped where mounting is not permitted)."""
    import subprocess

    mounted = []

    def mount(size: str):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_file_written_on_a_full_disk_is_the_old_one_or_absent(small_disk):
    import errno

    from hetlm.outputs import write_atomically

    disk = small_disk("64k")
    write_atomically(disk / "results.json", "old")
    with pytest.raises(OSError) as err:
        write_atomically(disk / "results.json", "x" * 200_000)
    assert err.value.errno == errno.ENOSPC
    assert [p.name for p in disk.iterdir()] == ["results.json"] and (disk / "results.json").read_text() == "old"


def test_a_model_folder_on_a_full_disk_is_absent_not_half_written(finished, small_disk):
    from hetlm.cluster.base import load_model

    disk = small_disk("256k")  # the tokenizer and config fit, the weights (2.4 MB) do not
    with pytest.raises(OSError):
        load_model(finished.model("small")).save_pretrained(disk / "small")
    assert list(disk.iterdir()) == []


def test_report_and_train_on_a_full_disk_say_so(finished, prepared_a, small_disk):
    disk = small_disk("32k")
    out = runner.invoke(app, ["report", str(finished.path), "--out", str(disk / "report.html")])
    assert out.exit_code == 2 and "the disk is full" in out.output, out.output
    assert list(disk.iterdir()) == []
    out = train(prepared_a, disk / "run")
    assert out.exit_code == 2 and "the disk is full" in out.output, out.output
    assert not any(p.name.endswith(".tmp") for p in (disk / "run").iterdir())


def test_a_folder_or_glob_log_is_fingerprinted_by_its_files(tmp_path):
    from hetlm.provenance import fingerprint, sha256

    folder = tmp_path / "ga4"
    folder.mkdir()
    (folder / "events_20240101.json").write_text("a")
    (folder / "events_20240102.json").write_text("b")
    assert fingerprint(folder / "events_20240101.json") == sha256(folder / "events_20240101.json")
    whole = fingerprint(folder)
    assert fingerprint(str(folder / "events_2024*.json")) == whole  # the same files, named alike
    (folder / "events_20240102.json").rename(folder / "events_20240103.json")
    assert fingerprint(folder) != whole  # a renamed day is another log
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path / "none_*.json")
