"""Reliability (issue 16): no silent wrong results, no partial output that looks whole, no request that
sinks its batch. Each case asserts the clear error or the counted handling."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.cluster.base import ClusterwiseLM
from hetlm.experiment import ExperimentConfig, run_experiment
from hetlm.ingest.base import MERGED_PAGES, NUMERIC_TWIN_USERS
from hetlm.models import Preset, build_model
from hetlm.outputs import IncompleteOutput, check_prepared
from hetlm.prepare import PrepareConfig, prepare
from hetlm.sessions import DataError
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig, train_lm

from .conftest import SHIPPED

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
    monkeypatch.setattr(importlib.import_module("hetlm.prepare"), "SAMPLE_CHUNK_TARGETS", 7)
    chunks = prepare("taobao", tmp_path / "log.csv", tmp_path / "chunks")
    timing = ("seconds", "events_per_second", "path", "fingerprints")  # the files: the same rows, other row groups
    assert {k: v for k, v in once.items() if k not in timing} == {k: v for k, v in chunks.items() if k not in timing}
    for split in ("train", "val", "test"):
        once, chunks = (pl.read_parquet(tmp_path / d / f"{split}.parquet") for d in ("once", "chunks"))
        assert once.height and once.equals(chunks), split


# --- shared: a micro LM (random weights: these tests are about files and errors, not quality) ---------------

MICRO = Preset(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
runner = CliRunner()


def flat(text: str) -> str:
    """A command's output on one line (the console wraps long messages)."""
    return " ".join(text.split())


def micro_model(prepared: Path, folder: Path) -> Path:
    """A random micro LM over `prepared`'s vocabulary, saved with its tokenizer as `hetlm train` saves best/."""
    tokenizer = load_tokenizer(prepared / "tokenizer")
    torch.manual_seed(0)
    ClusterwiseLM.single(build_model(MICRO, len(tokenizer), max_positions=128), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two prepared logs with different page vocabularies (the shipped sample's first 6,000 and 3,000 lines),
    a micro model over the first."""
    root = tmp_path_factory.mktemp("two")
    logs = {}
    for name, rows in (("a", 6000), ("b", 3000)):
        with gzip.open(SHIPPED, "rt") as f:
            (root / f"{name}.csv").write_text("".join(itertools.islice(f, rows)))
        prepare("taobao", root / f"{name}.csv", root / name, PrepareConfig(max_len=128))
        logs[name] = root / f"{name}.csv"
    return root / "a", root / "b", micro_model(root / "a", root / "model"), logs


# --- 2. a tokenizer from another dataset ------------------------------------------------------------------


def test_score_refuses_another_datasets_tokenizer(two_datasets, tmp_path):
    a, b, model, logs = two_datasets
    out = tmp_path / "scores.parquet"
    args = ["score", str(model), str(logs["a"]), "--source", "taobao", "--out", str(out), "--n-samples", "0"]
    result = runner.invoke(app, [*args, "--tokenizer", str(b / "tokenizer")])
    assert result.exit_code == 2 and "not the one" in flat(result.output) and "Traceback" not in flat(result.output)
    assert not out.exists()
    assert runner.invoke(app, [*args, "--tokenizer", str(a / "tokenizer")]).exit_code == 0  # its own: fine
    # No tokenizer beside the model to compare with: the model's vocabulary size still must match.
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(bare)
    result = runner.invoke(app, [*args[:1], str(bare), *args[2:], "--tokenizer", str(b / "tokenizer")])
    assert result.exit_code == 2 and "another vocabulary" in flat(result.output)


def test_generate_refuses_another_datasets_prepared_folder(two_datasets, tmp_path):
    _, b, model, _ = two_datasets
    result = runner.invoke(app, ["generate", str(model), str(b), "--out", str(tmp_path / "gen.parquet")])
    assert result.exit_code == 2 and "not the one" in flat(result.output) and "Traceback" not in flat(result.output)


# --- 5, 6. killed prepare and score: the previous complete output or a clear "incomplete", never a mix -----

ZYGOTE = """
import json, os, sys, time
import hetlm.score  # the libraries once; each command runs in a fork of this process
from hetlm.cli import app
print("ready", flush=True)
for line in sys.stdin:
    args, log = json.loads(line)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        try:
            app(args)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, flush=True)
"""


class Commands:
    """hetlm commands run in forks of one process that imported the libraries (seconds each, not per run),
    so that kills land in the commands' own work."""

    def __init__(self, folder: Path):
        self.log = folder / "command.log"
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, args: list[str], kill_after: float | None = None, sig: int = signal.SIGKILL) -> tuple[int, float, str]:
        """(exit code, or minus the signal that ended it; seconds; output)."""
        self.proc.stdin.write(json.dumps([args, str(self.log)]) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        code, seconds = self.proc.stdout.readline().split()
        return int(code), float(seconds), self.log.read_text()

    def kill_at_random_points(self, args: list[str], seconds: float, check, repeats: int, seed: int = 0) -> None:
        """Run `args` `repeats` times, each killed (SIGKILL, or SIGINT every third time) at a random point of a
        run's `seconds`, then `check(signal, exit code, output)`."""
        rng = random.Random(seed)
        for i in range(repeats):
            sig = signal.SIGINT if i % 3 == 2 else signal.SIGKILL
            code, _, output = self.run(args, rng.uniform(0, 1.1 * seconds), sig)
            check(sig, code, output)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    commands = Commands(tmp_path_factory.mktemp("commands"))
    yield commands
    commands.close()


def test_killed_prepare_leaves_the_previous_output_or_says_incomplete(two_datasets, commands, tmp_path):
    _, _, _, logs = two_datasets
    out = tmp_path / "prepared"
    args = ["prepare", "taobao", str(logs["a"]), "--out", str(out), "--max-len", "128"]
    code, seconds, output = commands.run([*args[:4], str(tmp_path / "timing"), *args[5:]])
    assert code == 0, output
    previous = lambda: prepare("taobao", logs["b"], out, PrepareConfig(max_len=128))  # noqa: E731
    previous()
    seen = []

    def check(sig, code, output):
        assert code != 0 or "prepared taobao" in flat(output)  # a run can finish before the signal
        if sig == signal.SIGINT and code != 0:
            assert code == 130 and "interrupted" in flat(output) and "Traceback" not in flat(output)
        try:
            summary = check_prepared(out)
        except IncompleteOutput as err:
            assert "rerun" in str(err)
            seen.append("incomplete")
            result = runner.invoke(app, ["train", str(out), "--out", str(tmp_path / "run"), "--max-steps", "1"])
            assert result.exit_code == 2 and "incomplete" in flat(result.output) and "Traceback" not in flat(result.output)
        else:
            seen.append(Path(summary["path"]).name)  # the previous run's (b) or, finished, the new one's (a)
            # Its files are that run's: ids within its tokenizer, as many samples as its summary says.
            vocab = len(load_tokenizer(out / "tokenizer"))
            for split in ("train", "val", "test"):
                df = pl.read_parquet(out / f"{split}.parquet")
                assert df.height == summary["samples"][split]
                assert df["input_ids"].list.max().max() < vocab
        previous()

    commands.kill_at_random_points(args, seconds, check, repeats=6)
    assert set(seen) <= {"a.csv", "b.csv", "incomplete"} and len(seen) == 6
    assert not list(out.glob(".prepare-*")), "scratch folders of killed runs are removed by the next run"


def test_killed_score_leaves_the_previous_file(two_datasets, commands, tmp_path):
    _, _, model, logs = two_datasets
    out = tmp_path / "scores.parquet"
    args = ["score", str(model), str(logs["b"]), "--source", "taobao", "--out", str(out), "--n-samples", "1",
            "--batch-users", "16", "--max-new-tokens", "3"]

    def check(sig, returncode, output):
        if sig == signal.SIGINT and returncode != 0:
            assert returncode == 130 and "interrupted" in flat(output) and "Traceback" not in flat(output)
        scores = pl.read_parquet(out)  # always readable: the old file, or the new one whole
        assert out.read_bytes() == previous or (scores.height == users and (scores["top_pages"].list.len() == 5).all())

    code, seconds, output = commands.run([*args, "--k", "3"])
    assert code == 0, output
    previous = out.read_bytes()
    users = pl.read_parquet(out).height
    commands.kill_at_random_points([*args, "--k", "5"], seconds, check, repeats=6)
    assert runner.invoke(app, [*args, "--k", "5"]).exit_code == 0
    assert (pl.read_parquet(out)["top_pages"].list.len() == 5).all()
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"], "no partial file or scratch folder is left"


def test_a_prepared_folder_half_replaced_or_changed_is_reported_incomplete(two_datasets, tmp_path, monkeypatch):
    _, _, _, logs = two_datasets
    out = tmp_path / "prepared"
    prepare("taobao", logs["b"], out, PrepareConfig(max_len=128))
    real_replace = os.replace

    def dies_at_the_tokenizer(src, dst):  # a kill after the new Parquet files are in, before the tokenizer
        if Path(dst).name == "tokenizer":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_at_the_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        prepare("taobao", logs["a"], out, PrepareConfig(max_len=128))
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(IncompleteOutput, match="no summary.json: prepare was interrupted or failed.*rerun"):
        check_prepared(out)
    for command in (["train", str(out), "--out", str(tmp_path / "run")],
                    ["generate", str(two_datasets[2]), str(out), "--out", str(tmp_path / "gen.parquet")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "incomplete" in flat(result.output) and "Traceback" not in flat(result.output)
    prepare("taobao", logs["a"], out, PrepareConfig(max_len=128))
    assert check_prepared(out)["path"] == str(logs["a"])
    (out / "val.parquet").write_bytes((out / "test.parquet").read_bytes())  # changed after prepare
    with pytest.raises(IncompleteOutput, match="val.parquet does not match summary.json"):
        check_prepared(out)
    with pytest.raises(IncompleteOutput, match="not a folder written by `hetlm prepare`"):
        check_prepared(tmp_path / "nothing")


# --- 7, 8. runs that would train nothing, settings that would fail late ---------------------------------

BAD = REPO / "tests" / "data" / "bad"


def test_a_prepare_that_leaves_no_training_sample_stops(tmp_path):
    # 3-page sessions cost 5 tokens; max_len 8 leaves 3 tokens of history beside them: no sample has one.
    with pytest.raises(DataError, match="no training sample is left .*target with no history that fits max_len"):
        prepare("taobao", BAD / "taobao/good.csv", tmp_path, PrepareConfig(max_len=8))
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "train.parquet").exists()


@pytest.mark.parametrize("settings, field", [
    ({"epochs": 0}, "epochs"), ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"max_steps": 0}, "max_steps"), ({"eval_every": 0}, "eval_every"), ({"grad_accum": 0}, "grad_accum"),
])
def test_train_settings_that_would_train_nothing_are_refused(settings, field):
    with pytest.raises(ValueError, match=f"\n{field}\n  Input should be (greater|a finite number)"):
        TrainConfig(**settings)


def test_fewer_steps_than_eval_every_still_leave_a_validated_best_model(two_datasets, tmp_path):
    a = two_datasets[0]
    tokenizer = load_tokenizer(a / "tokenizer")
    model = build_model(MICRO, len(tokenizer), max_positions=128)
    config = TrainConfig(max_steps=2, eval_every=200, batch_size=16, max_len=128, save_every=10**6)
    result = train_lm(model, pl.read_parquet(a / "train.parquet"), pl.read_parquet(a / "val.parquet"), config,
                      tmp_path, progress=False)
    assert result.steps == 2 and result.best_step == 2 and (tmp_path / "best" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="no training samples"):
        train_lm(model, pl.read_parquet(a / "train.parquet").head(0), None, config, tmp_path / "empty", progress=False)
    result = runner.invoke(app, ["train", str(a), "--out", str(tmp_path / "cli"), "--epochs", "0"])
    assert result.exit_code == 2 and "train.epochs Input should be greater than or equal to 1" in flat(result.output)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("settings, problem", [
    ({"hetlm": {"config": {"alpha": float("nan")}}}, "hetlm.config.alpha\n  Input should be a finite number"),
    ({"hetlm": {"runs": [{"predictor_lr": -1}]}}, "predictor_lr\n  Input should be greater than 0"),
    ({"hetlm": {"config": {"batch_size": 0}}}, "hetlm.config.batch_size\n  Input should be greater than or equal to 1"),
    ({"pretrain": {"lr": 0}}, "pretrain.lr\n  Input should be greater than 0"),
    ({"kmeans": {"finetune": {"batch_size": 0}}}, "kmeans.finetune.batch_size\n  Input should be greater than or equal"),
    ({"encoder": {"model_name_or_path": "/no/such/sbert"}}, "neither a SentenceTransformer folder"),
])
def test_experiment_settings_are_checked_before_anything_runs(settings, problem):
    with pytest.raises(ValidationError, match=problem):
        ExperimentConfig(**settings)


def test_more_clusters_than_training_users_stop_before_pretraining(tmp_path):
    config = ExperimentConfig(source="taobao", path=str(BAD / "taobao/good.csv"), kmeans={"n_clusters": 9},
                              encoder={"name": "pagebag"})
    with pytest.raises(DataError, match=r"kmeans.n_clusters = 9 clusters, but the prepared log has \d training users"):
        run_experiment(config, tmp_path, progress=False)
    assert not (tmp_path / "train").exists()


# --- 11. user errors: a clear message, no traceback -----------------------------------------------------


def damaged_models(model: Path, root: Path) -> dict[str, Path]:
    """Copies of a micro model folder, each damaged in one way."""
    folders = {}
    for name in ("truncated", "missing", "vocab_changed"):
        folders[name] = root / name
        shutil.copytree(model, folders[name])
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (folders["missing"] / "model.safetensors").unlink()
    config = json.loads((model / "config.json").read_text())
    (folders["vocab_changed"] / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 7}))
    lm = AutoModelForCausalLM.from_pretrained(model)
    tokenizer = load_tokenizer(model / "tokenizer")
    clusterwise = ClusterwiseLM(kind="kmeans", models={0: lm, 1: lm}, centroids=np.eye(2, 4, dtype=np.float32),
                                routing="centroid", encoder={"name": "pagebag"}, sizes={0: 1, 1: 1})
    clusterwise.save_pretrained(root / "no_cluster_1", tokenizer)
    shutil.rmtree(root / "no_cluster_1" / "cluster_1")
    folders["no_cluster_1"] = root / "no_cluster_1"
    return folders


def test_damaged_model_folders_are_named_not_tracebacks(two_datasets, tmp_path):
    _, _, model, logs = two_datasets
    for name, folder in damaged_models(model, tmp_path).items():
        result = runner.invoke(app, ["score", str(folder), str(logs["b"]), "--source", "taobao", "--out",
                                     str(tmp_path / "s.parquet"), "--n-samples", "0"])
        said = flat(result.output)
        assert result.exit_code == 2 and "Traceback" not in said, (name, said)
        assert f"{folder} cannot be loaded" in said or "another vocabulary" in said, (name, said)


def test_paths_that_are_not_what_they_should_be(two_datasets, tmp_path):
    a, _, model, logs = two_datasets
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "folder").mkdir()
    cases = [
        (["prepare", "taobao", str(logs["b"]), "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["prepare", "taobao", str(logs["b"]), "--out", str(tmp_path / "a_file" / "out")], "cannot be created"),
        (["train", str(a), "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["generate", str(model), str(a), "--out", str(tmp_path / "folder")], "is a folder; give a file path"),
        (["score", str(model), str(logs["b"]), "--source", "taobao", "--out", str(tmp_path / "folder")], "is a folder"),
        (["prepare", "taobao", str(tmp_path / "folder"), "--out", str(tmp_path / "o")], "a folder, not a log file"),
        (["prepare", "taobao", str(tmp_path / "loop1"), "--out", str(tmp_path / "o")], "a loop of links"),
    ]
    for args, problem in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and problem in flat(result.output) and "Traceback" not in result.output, \
            (args, result.output)


# --- 12. look-alike names are counted, not silent ----------------------------------------------------------


def test_look_alike_page_names_and_user_ids_are_counted(tmp_path):
    summary = prepare("generic", BAD / "generic/look_alike_names.csv", tmp_path,
                      user="user", session="session", page="page", event="event", time="time")
    assert summary["ingest_notes"] == {MERGED_PAGES: 2, NUMERIC_TWIN_USERS: 2}
    clean = prepare("generic", BAD / "generic/good.csv", tmp_path / "good",
                    user="user", session="session", page="page", event="event", time="time")
    assert clean["ingest_notes"] == {}


# --- 13. progress where stdout is not a terminal --------------------------------------------------------


def test_progress_is_printed_as_lines_when_stdout_is_not_a_terminal(two_datasets, tmp_path, monkeypatch, capsys):
    a = two_datasets[0]
    monkeypatch.setenv("HETLM_PROGRESS_SECONDS", "0")  # a line per update (default: every 30 s)
    model = build_model(MICRO, len(load_tokenizer(a / "tokenizer")), max_positions=128)
    config = TrainConfig(max_steps=6, eval_every=3, batch_size=8, max_len=128, save_every=10**6)
    train_lm(model, pl.read_parquet(a / "train.parquet"), pl.read_parquet(a / "val.parquet"), config, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert len(lines) == 6 and lines[-1].startswith("train: 6/6 (100%) loss") and "elapsed" in lines[-1], lines
