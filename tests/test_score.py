"""Batch scoring: prompts built as prepare builds histories, batch-independent results, `hetlm score`
streaming one bounded row group per batch of users, and the routing probabilities."""

import gzip
import itertools
import math
from dataclasses import asdict

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from hetlm import partitioned
from hetlm.cli import app
from hetlm.cluster.base import ClusterwiseLM
from hetlm.cluster.selector import Selector
from hetlm.models import Preset, build_model
from hetlm.score import ScoreConfig, Scorer, fit_histories, log_sessions, route_users, sessions_frame
from hetlm.sessions import SessionCleaning
from hetlm.tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer
from hetlm.train import TrainConfig, train_lm

from .conftest import SHIPPED


MICRO = Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def train_micro(prepared, folder, steps=30):
    """A micro LM trained for a few steps on prepared samples, saved with its tokenizer like `hetlm train`."""
    tokenizer = load_tokenizer(prepared / "tokenizer")
    torch.manual_seed(0)
    model = build_model(MICRO, len(tokenizer), max_positions=128)
    config = TrainConfig(lr=1e-2, max_steps=steps, batch_size=32, max_len=128, eval_every=10_000,
                         early_stopping_patience=None, save_every=10_000)
    train_lm(model, pl.read_parquet(prepared / "train.parquet"), None, config, folder / "train", progress=False)
    ClusterwiseLM.single(model, tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def log_head(path, rows):
    """The first `rows` lines of the shipped Taobao sample, as a plain CSV."""
    with gzip.open(SHIPPED, "rt") as f:
        path.write_text("".join(itertools.islice(f, rows)))
    return path


def assert_same_score(a, b):
    """Equal scores: everything exact (NaN equal to NaN) except float noise in the probabilities from logits,
    which depend on padding within a batch."""
    a, b = asdict(a), asdict(b)
    np.testing.assert_allclose(a.pop("top_probs"), b.pop("top_probs"), rtol=1e-4)
    assert a.pop("cluster_prob") == pytest.approx(b.pop("cluster_prob"), rel=1e-5)
    for key in ("p_cart_first_page", "p_purchase_first_page"):  # exact from logits: the same float noise
        np.testing.assert_allclose(a.pop(key), b.pop(key), rtol=1e-4)
    assert a == b or all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), (a, b)


@pytest.fixture(scope="module")
def micro(taobao_prepared, tmp_path_factory):
    return train_micro(taobao_prepared[0], tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def scorer(micro):
    return Scorer.from_pretrained(micro, max_new_tokens=12)


def test_histories_are_built_like_prepare(taobao_prepared, scorer):
    vocab = scorer.vocab
    sessions = pl.DataFrame({"user": ["a"] * 3 + ["b"], "session": [0, 1, 2, 0], "start": [0, 1, 2, 0],
                             "pages": [["Cart", "x"], ["y", "z", "Cart"], ["Purchase", "Cart"], ["Cart", "Cart"]]})
    fitted = fit_histories(sessions, vocab, budget=9)
    # "a": the last two sessions cost 5 + 4 = 9 tokens, the first one no longer fits.
    assert fitted["user"].to_list() == ["a", "b"]
    assert fitted["history"][0].to_list() == [["y", "z", "Cart"], ["Purchase", "Cart"]]
    cart, purchase = vocab["Cart"], vocab["Purchase"]
    assert fitted["input_ids"][0].to_list() == [BOS_ID, UNK_ID, UNK_ID, cart, EOS_ID, BOS_ID, purchase, cart, EOS_ID]
    assert fit_histories(sessions, vocab, budget=3).height == 0  # no last session fits 3 tokens
    # The prompts of prepared test users are exactly their prepared input_ids.
    test = pl.read_parquet(taobao_prepared[0] / "test.parquet").head(20)
    rebuilt = fit_histories(sessions_frame(test["history"].to_list()), vocab, budget=10_000)
    assert rebuilt["input_ids"].to_list() == test["input_ids"].to_list()


def test_batch_scores_equal_single_scores(taobao_prepared, scorer):
    histories = pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"].to_list()[:6]
    histories[2] = [*histories[2], ["never_seen_page", "Cart"]]
    options = [ScoreConfig(k=5, n_samples=6, seed=1), ScoreConfig(k=3, n_samples=0),
               ScoreConfig(strategy="sample", temperature=0.7, seed=4, n_samples=3)] * 2
    together = scorer.score(histories, options)
    for history, option, batched in zip(histories, options, together):
        assert_same_score(scorer.score([history], [option])[0], batched)
    first, no_outcomes, sampled = together[:3]
    assert first.cluster is None and first.cluster_prob == 1.0  # a single LM has no clusters
    assert len(first.top_pages) == 5 and first.top_probs == sorted(first.top_probs, reverse=True)
    assert 0 <= first.p_cart <= 1 and first.se_cart == pytest.approx(math.sqrt(first.p_cart * (1 - first.p_cart) / 6))
    assert 0 < first.p_cart_first_page < 1 and len(no_outcomes.top_pages) == 3
    assert math.isnan(no_outcomes.p_cart) and math.isnan(no_outcomes.se_cart) and 0 < no_outcomes.p_cart_first_page < 1
    assert sampled.unknown_pages == ["never_seen_page"]
    for history, score in zip(histories, together):  # the most recent whole sessions that fit 128 - 12 - 1
        costs = [len(s) + 2 for s in history[::-1]]
        assert sum(costs[:score.sessions_used]) <= 115 < sum(costs[:score.sessions_used + 1]) or \
            score.sessions_used == len(history)
    assert len(first.next_session) <= 12 and "[UNK]" not in first.next_session


def test_default_outcomes_are_the_exact_first_page_probabilities(taobao_prepared, scorer):
    from hetlm.generate import next_page_scores
    from hetlm.score import sessions_frame

    histories = pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"].to_list()[:5]
    scores = scorer.score(histories, [ScoreConfig()] * len(histories))  # n_samples = 0: no sampling
    fitted = fit_histories(sessions_frame(histories), scorer.vocab, scorer.history_budget)
    logprobs = next_page_scores(scorer.model.models[0], fitted["input_ids"].to_list())
    for name in ("cart", "purchase"):
        exact = np.exp(logprobs[:, scorer.outcome_ids[name]])
        assert [getattr(s, f"p_{name}_first_page") for s in scores] == pytest.approx(exact, rel=1e-4, abs=1e-7)
        assert all(math.isnan(getattr(s, f"p_{name}")) for s in scores)  # no sessions drawn: not estimated


def test_score_command_streams_bounded_batches(micro, tmp_path):
    log = log_head(tmp_path / "log.csv", 4000)
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(app, ["score", str(micro), str(log), "--source", "taobao", "--out", str(out),
                                      "--batch-users", "8", "--n-samples", "2", "--k", "4", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    sessions, users_in_log = log_sessions("taobao", log)
    scores = pl.read_parquet(out)
    assert scores["user"].sort().to_list() == sessions["user"].unique().sort().to_list()
    assert f"{scores.height} of {users_in_log} users scored" in result.output
    assert scores["cluster"].null_count() == scores.height
    assert (scores["top_pages"].list.len() == 4).all() and scores["p_cart"].is_between(0, 1).all()
    # Written batch by batch: one row group of at most 8 users each, never the whole table at once.
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == math.ceil(scores.height / 8) > 1
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) == 8
    bad = CliRunner().invoke(app, ["score", str(tmp_path), str(log), "--source", "taobao", "--out", str(out)])
    assert bad.exit_code == 2 and "no page tokenizer" in bad.output and "Traceback" not in bad.output
    routed = CliRunner().invoke(app, ["score", str(micro), str(log), "--source", "taobao", "--out", str(out),
                                      "--routing", "centroid"])
    assert routed.exit_code == 2 and "clusterwise models only" in routed.output
    # Options change the cleaning recorded with the tokenizer: here sessions over 3 pages are dropped.
    strict = CliRunner().invoke(app, ["score", str(micro), str(log), "--source", "taobao", "--out", str(out),
                                      "--n-samples", "0", "--long-sessions", "drop", "--long-session-cutoff", "3"])
    assert strict.exit_code == 0, strict.output
    kept, _ = log_sessions("taobao", log, SessionCleaning(long_sessions="drop", long_session_cutoff=3))
    assert pl.read_parquet(out)["user"].sort().to_list() == kept["user"].unique().sort().to_list()
    assert kept["user"].n_unique() < sessions["user"].n_unique()


def test_partitioned_scoring_gives_the_same_rows(micro, monkeypatch, tmp_path):
    """`--partitions 3` with ~50 KB chunks: users hashed into parts scored one at a time, the same rows."""
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 50_000)
    log = log_head(tmp_path / "log.csv", 6000)
    args = ["--source", "taobao", "--n-samples", "3", "--k", "4", "--max-new-tokens", "8", "--batch-users", "16"]
    for partitions in (1, 3):
        result = CliRunner().invoke(app, ["score", str(micro), str(log), "--out", str(tmp_path / f"{partitions}.parquet"),
                                          "--partitions", str(partitions), *args])
        assert result.exit_code == 0, result.output
    one, three = (pl.read_parquet(tmp_path / f"{n}.parquet").sort("user") for n in (1, 3))
    assert one.height > 40
    # top_probs: float noise of the padding within a batch, which differs between the two
    assert_frame_equal(one.drop("top_probs"), three.drop("top_probs"))
    np.testing.assert_allclose(np.concatenate(one["top_probs"].to_list()), np.concatenate(three["top_probs"].to_list()),
                               rtol=1e-4)
    assert not list(tmp_path.glob(".score-partitions-*")), "scratch parts are removed"


def test_routing_probabilities():
    rng = np.random.default_rng(0)
    centroids = np.eye(3, 8, dtype=np.float32)
    z = np.vstack([centroids[2], 0.5 * centroids[0] + 0.5 * centroids[1], rng.normal(size=(5, 8))]).astype(np.float32)
    model = ClusterwiseLM("kmeans", {0: None, 1: None, 2: None}, centroids, routing="centroid")
    clusters, probs = route_users(model, z)
    assert clusters[0] == 2 and probs[0] > 0.5
    # tau = 2 (every pair of centroids is sqrt(2) apart); squared distances 0.5, 0.5, 1.5
    assert probs[1] == pytest.approx(np.exp(-0.25) / (2 * np.exp(-0.25) + np.exp(-0.75)), rel=1e-5)
    alone = route_users(model, z[3:4])
    assert alone[0][0] == clusters[3] and alone[1][0] == pytest.approx(probs[3])  # independent of other users
    labels = (z[:, 0] > 0.3).astype(int)
    model.selector = Selector(n_clusters=2, epochs=50).fit(z, labels)
    clusters, probs = route_users(model, z, "selector")
    np.testing.assert_allclose(probs, model.selector.predict_proba(z).max(1), rtol=1e-6)


def test_set_decoder_is_the_default_where_the_folder_has_one(taobao_prepared, micro, tmp_path):
    from hetlm.evaluate import GenerationConfig, fit_set_decoder, predict
    from hetlm.set_decoder import SetDecoder

    prepared = taobao_prepared[0]
    tokenizer = load_tokenizer(prepared / "tokenizer")
    plain = Scorer.from_pretrained(micro, max_new_tokens=12)
    test = pl.read_parquet(prepared / "test.parquet").head(8)
    histories = test["history"].to_list()
    assert plain.describe()["default_decoder"] == "greedy"
    assert {s.decoder for s in plain.score(histories, [ScoreConfig(n_samples=0)] * 8)} == {"greedy"}
    with pytest.raises(ValueError, match="set decoder"):
        plain.score(histories[:1], [ScoreConfig(strategy="set")])

    val = pl.read_parquet(prepared / "val.parquet")
    lm = plain.model
    decoder = fit_set_decoder(SetDecoder(), predict(lm, val, tokenizer, GenerationConfig(), progress=False,
                                                    greedy=False), val, tokenizer)
    decoder.save_pretrained(micro)
    try:
        scorer = Scorer.from_pretrained(micro, max_new_tokens=12)
        scores = scorer.score(histories, [ScoreConfig(n_samples=0)] * 7 + [ScoreConfig(strategy="greedy", n_samples=0)])
        prompts = fit_histories(sessions_frame(histories), scorer.vocab, scorer.history_budget)  # as the scorer cuts them
        expected = predict(lm, prompts, tokenizer, GenerationConfig(), progress=False, greedy=False)
        sets = [tokenizer.convert_ids_to_tokens(s) for s in decoder.predict(prompts["input_ids"].to_list(), expected.evidence)]
        assert [s.decoder for s in scores] == ["set"] * 7 + ["greedy"]
        assert [s.next_session for s in scores[:7]] == sets[:7]
        assert scores[7].next_session == plain.score(histories[7:], [ScoreConfig(n_samples=0)])[0].next_session
    finally:
        (micro / "set_decoder.json").unlink()
