"""bench/bench_peers.py's per-user figures and paired intervals (no RecBole needed)."""

import numpy as np
import polars as pl
import pytest

from bench.bench_peers import hetlm_per_user, paired_gap, per_user
from hetlm.metrics import ranking_metrics


def test_per_user_figures_average_to_the_ranking_metrics():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 30))
    first = rng.integers(4, 30, size=50)
    first[:5] = 1  # [UNK] first pages are left out of the ranking, kept for IoU
    samples = pl.DataFrame({"target_ids": [[2, int(f), 3] for f in first]})
    figures = per_user(scores, samples, list(np.linspace(0, 1, 50)))
    expected = ranking_metrics(scores[5:], first[5:])
    assert len(figures["Recall@10"]) == 45 and len(figures["IoU"]) == 50
    assert figures["Recall@10"].mean() == pytest.approx(expected["Recall@10"])
    assert figures["NDCG@10"].mean() == pytest.approx(expected["NDCG@10"])


def test_paired_gap_interval():
    rng = np.random.default_rng(1)
    theirs = rng.random(400)
    shifted = paired_gap(theirs + 0.1, theirs)
    assert shifted["gap"] == pytest.approx(0.1) and shifted["lo"] == pytest.approx(0.1) and shifted["hi"] == pytest.approx(0.1)
    noisy = paired_gap(theirs + rng.normal(0.05, 0.5, 400), theirs)
    assert noisy["lo"] < noisy["gap"] < noisy["hi"]
    assert noisy["hi"] - noisy["lo"] == pytest.approx(2 * 1.96 * 0.5 / 20, rel=0.25)  # ~ the normal interval


def test_no_hetlm_figures_without_a_matching_run(taobao_prepared, tmp_path):
    prepared, _ = taobao_prepared
    assert hetlm_per_user(tmp_path / "missing", prepared) == {}
