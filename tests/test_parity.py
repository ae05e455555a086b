"""The Python API and the CLI agree: a clusterwise model saved from Python is the folder `hetlm experiment`
saves (with its set decoder), and the README's set-decoder snippet runs as written."""

import json
import re

import numpy as np
import polars as pl

from hetlm import KMeansClusterwise, Scorer, ScoreConfig, TrainConfig, load_model
from hetlm.runs import SMALL, RunFolder, kmeans_folder
from hetlm.tokenizer import load_tokenizer

from .conftest import REPO


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_kmeans_saved_from_python_holds_what_the_experiment_saves(small_run, tmp_path):
    run = RunFolder(small_run)
    config = json.loads(run.config_file.read_text())
    train, val = (pl.read_parquet(run.split(s)) for s in ("train", "val"))
    z = np.load(run.embeddings)
    base = load_model(run.model(SMALL)).models[0]
    n_clusters = config["kmeans"]["n_clusters"]
    finetune = TrainConfig(max_steps=2, batch_size=32, eval_every=2, max_len=128)
    km = KMeansClusterwise(n_clusters, tmp_path / "train", finetune, progress=False).fit(
        base, train, z["train"], val, z["val"], config["encoder"])
    km.save_pretrained(tmp_path / "kmeans", load_tokenizer(run.prepared / "tokenizer"))
    # The Platt calibrator is fitted by the experiment's outcome evaluation (outcome_samples > 0) only.
    assert _files(tmp_path / "kmeans") == _files(run.model(kmeans_folder(n_clusters))) - {"outcome_calibration.json"}
    assert Scorer.from_pretrained(tmp_path / "kmeans").strategy(ScoreConfig()) == "set"  # as the README says


def test_readme_set_decoder_snippet_runs(small_run, tmp_path):
    run = RunFolder(small_run)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    snippet = next(b for b in blocks if "fit_set_decoder(" in b)
    folder = tmp_path / "lm"
    load_model(run.model(SMALL)).save_pretrained(folder)  # a copy: the snippet writes into the folder
    code = snippet.replace('"runs/lm/best"', repr(str(folder))).replace('f"prepared/', f'f"{run.prepared}/')
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["pages"]) == pl.read_parquet(run.split("test")).height
    assert all(isinstance(p, str) for pages in namespace["pages"] for p in pages)
    assert Scorer.from_pretrained(folder).strategy(ScoreConfig()) == "set"
