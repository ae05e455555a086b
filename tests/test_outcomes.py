"""Outcome probabilities: per-row decoding matches greedy generation and does not depend on the batch, the
Monte Carlo estimate agrees with an exactly computable probability, and calibration data is right."""

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from hetlm.cluster.base import ClusterwiseLM
from hetlm.generate import NEVER_EMITTED, generate_next_sessions, next_page_scores, session_prompts
from hetlm.outcomes import (
    OutcomeCalibrator,
    Decoding,
    calibration,
    decode,
    decode_sessions,
    outcome_calibration,
    outcome_probabilities,
    outcome_table,
    row_seed,
)
from hetlm.runs import RunFolder
from hetlm.tokenizer import load_tokenizer

from .test_score import train_micro


@pytest.fixture(scope="module")
def micro(taobao_prepared, tmp_path_factory):
    folder = train_micro(taobao_prepared[0], tmp_path_factory.mktemp("micro"))
    test = pl.read_parquet(taobao_prepared[0] / "test.parquet")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder / "tokenizer"), test


def test_decoding_is_greedy_generation_and_batch_independent(micro):
    model, _, test = micro
    inputs = test["input_ids"].to_list()[:10]
    greedy = decode_sessions(model, inputs, [Decoding()] * 10, max_new_tokens=10, batch_size=4)
    assert greedy == generate_next_sessions(model, inputs, max_new_tokens=10, progress=False)
    rows = [Decoding(1.0, row_seed(3, ids, "x")) for ids in inputs]
    sampled = decode_sessions(model, inputs, rows, max_new_tokens=10)
    assert sampled != greedy
    assert decode_sessions(model, inputs[::-1], rows[::-1], max_new_tokens=10, batch_size=3)[::-1] == sampled
    assert [decode_sessions(model, [i], [r], max_new_tokens=10)[0] for i, r in zip(inputs, rows)] == sampled
    # A mixed batch: each greedy row still decodes greedily, each sampled row still draws its own sample.
    mixed = [Decoding() if j % 2 else row for j, row in enumerate(rows)]
    assert decode_sessions(model, inputs, mixed, max_new_tokens=10) == [
        greedy[j] if j % 2 else sampled[j] for j in range(10)]


def test_decoders_first_step_gives_the_next_page_scores(micro):
    """The first-page distribution `decode` keeps from its first step (the prompt's KV cache, then its last
    token) is `next_page_scores`' one pass over the whole prompt, up to float rounding; sampled rows too."""
    model, _, test = micro
    # histories that fit beside the 4 decoded pages, so both see the same prompt (as `Scorer` fits them)
    inputs = [ids for ids in test["input_ids"].to_list() if len(ids) < model.config.max_position_embeddings - 8][:12]
    rows = [Decoding(1.0 if j % 3 == 0 else None, j) for j in range(12)]
    decoded = decode(model, inputs, rows, max_new_tokens=4, batch_size=5, first_pages_of=range(0, 12, 2))
    assert sorted(decoded.first_page_logprobs) == list(range(0, 12, 2))
    full = next_page_scores(model, inputs)
    for j, logprobs in decoded.first_page_logprobs.items():
        assert np.array_equal(np.isinf(logprobs), np.isinf(full[j])) and np.isinf(logprobs[:4]).all()
        np.testing.assert_allclose(logprobs[4:], full[j][4:], atol=1e-4)


def test_monte_carlo_matches_exact_probability(micro):
    """With one-page sessions P(Cart in the session) = P(first page = Cart) over pages and [EOS], which the
    logits give exactly: the estimate must fall within 4 standard errors of it."""
    model, tokenizer, test = micro
    inputs = test["input_ids"].to_list()[:3]
    n = 400
    est = outcome_probabilities(model, inputs, tokenizer, n_samples=n, seed=0, max_new_tokens=1, batch_size=400)
    prompts = session_prompts(inputs, model.config.max_position_embeddings - 1)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model(prompt[None]).logits[0, -1]
        logits[NEVER_EMITTED] = float("-inf")
        exact = torch.softmax(logits, -1)
        for name, page in (("cart", "Cart"), ("purchase", "Purchase")):
            p = exact[tokenizer.convert_tokens_to_ids(page)].item()
            assert abs(est.p[name][i] - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (name, est.p[name][i], p)
            assert est.se[name][i] == pytest.approx(np.sqrt(est.p[name][i] * (1 - est.p[name][i]) / n))
    again = outcome_probabilities(model, inputs, tokenizer, n_samples=n, seed=0, max_new_tokens=1)
    np.testing.assert_array_equal(again.p["cart"], est.p["cart"])  # same seed, same estimate
    with pytest.raises(ValueError, match="n_samples"):
        outcome_probabilities(model, inputs, tokenizer, n_samples=0)


def test_outcome_table_format(micro, tmp_path):
    model, tokenizer, test = micro
    samples = test.head(8)
    table = outcome_table(ClusterwiseLM.single(model, tokenizer), tokenizer, samples, n_samples=4, max_new_tokens=6)
    assert table.columns[:5] == ["user", "p_cart", "p_purchase", "cart", "purchase"]
    assert table["user"].to_list() == samples["user"].to_list() and table["cart"].equals(samples["cart"])
    assert table["p_cart"].is_between(0, 1).all() and set(table["p_purchase"].to_list()) <= {0, 0.25, 0.5, 0.75, 1}
    path = RunFolder(tmp_path).write_artefact("outcomes", "tiny", table)
    assert path == tmp_path / "outcomes" / "tiny.parquet" and pl.read_parquet(path).equals(table)
    assert set(outcome_calibration(table)) == {"cart", "purchase"}


def test_calibration():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    y = rng.uniform(0, 1, p.size) < p  # calibrated by construction
    cal = calibration(np.append(p, np.nan), np.append(y, True), n_bins=10)
    assert cal.n == p.size and sum(b["count"] for b in cal.bins) == p.size  # NaN predictions ignored
    assert cal.brier == pytest.approx(np.mean((p - y) ** 2))
    assert cal.brier < cal.brier_base_rate
    for b in cal.bins:
        assert abs(b["observed_rate"] - b["mean_predicted"]) < 0.03
    overconfident = calibration(np.clip(2 * p - 0.5, 0, 1), y, n_bins=10)
    assert overconfident.bins[0]["observed_rate"] > overconfident.bins[0]["mean_predicted"] + 0.1
    assert overconfident.brier > cal.brier
    constant = calibration(np.full(10, 0.3), np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]))
    assert constant.bins == [{"mean_predicted": pytest.approx(0.3), "observed_rate": 0.3, "count": 10}]
    assert constant.brier == pytest.approx(0.21) and constant.brier_base_rate == pytest.approx(0.21)


def test_platt_calibrator_fixes_overconfident_estimates(tmp_path):
    rng = np.random.default_rng(0)
    n, draws = 3000, 16
    true = 1 / (1 + np.exp(-rng.normal(-1.5, 0.8, n)))
    bought = rng.random(n) < true
    estimate = rng.binomial(draws, np.clip(2 * true, 0, 1)) / draws  # an LM twice as sure of a purchase
    half = n // 2
    table = pl.DataFrame({"p_cart": estimate, "p_purchase": estimate, "cart": bought, "purchase": np.zeros(n, bool)})
    calibrator = OutcomeCalibrator().fit(table[:half], draws)  # fitted on "validation", scored on the rest
    raw, fixed = estimate[half:], calibrator.transform("cart", estimate[half:])
    brier = {name: np.mean((p - bought[half:]) ** 2) for name, p in (("raw", raw), ("fixed", fixed))}
    base = np.mean((bought[:half].mean() - bought[half:]) ** 2)
    assert brier["fixed"] < base < brier["raw"], (brier, base)
    assert np.all(np.diff(fixed[np.argsort(raw)]) >= 0)  # a monotone map: the ranking (AUC) is unchanged
    assert "purchase" not in calibrator.coefficients  # no purchase in the fit data: nothing learnt
    assert np.isnan(calibrator.transform("purchase", raw)).all()
    calibrator.save_pretrained(tmp_path)
    assert OutcomeCalibrator.from_pretrained(tmp_path) == calibrator
    assert OutcomeCalibrator.from_pretrained(tmp_path / "elsewhere") is None
    # Worse than chance on the fit data: the slope is dropped, every user gets the observed rate.
    reversed_ = OutcomeCalibrator().fit(table.with_columns(cart=~pl.col("cart"))[:half], draws)
    assert reversed_.coefficients["cart"][0] == 0
    assert np.allclose(reversed_.transform("cart", raw), 1 - bought[:half].mean())
