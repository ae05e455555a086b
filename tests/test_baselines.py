import pytest

import numpy as np

from hetlm.baselines import (
    BASELINES,
    HistoryOutcomes,
    LastSession,
    Markov,
    MarkovFromLastPage,
    MostPopular,
    RecencyTopM,
)
from hetlm.ingest.base import CART


def test_most_popular_counts_sessions_and_median_length():
    targets = [["a", "b", "a"], ["a", "c"], ["b", "a", "d"]]
    # sessions containing: a 3, b 2, c 1, d 1; distinct lengths 2, 2, 3 -> median 2
    model = MostPopular().fit([[], [], []], targets)
    assert model.predict([[], [["x"]]]) == [["a", "b"], ["a", "b"]]
    # n = 3: c and d tie at 1, broken alphabetically
    assert MostPopular(n_pages=3).fit([[], [], []], targets).predict([[]]) == [["a", "b", "c"]]


def test_last_session_as_is():
    histories = [[["a"], ["b", "b", "c"]], []]
    assert LastSession().fit(histories, [["x"], ["y"]]).predict(histories) == [["b", "b", "c"], []]


def _shop_model(**kwargs) -> Markov:
    # BOS->Home 3; Home->Shoes 2, Home->Shirts 1; Shoes->Cart 2; Cart->EOS 2; Shirts->EOS 1
    histories = [[["Home", "Shoes", CART]], [["Home", "Shirts"]]]
    targets = [["Home", "Shoes", CART], []]
    return Markov(**kwargs).fit(histories, targets)


def test_markov_obvious_chain():
    assert _shop_model().predict([[], [["Shirts"]]]) == [["Home", "Shoes", CART]] * 2


def test_markov_stops_on_cycle_and_max_len():
    # BOS->a 1; a->b 3; b->a 2, b->EOS 1: greedy a b a, then a->b again -> stop
    corpus = [["a", "b", "a", "b", "a", "b"]]
    assert Markov().fit([[]], corpus).predict([[]]) == [["a", "b", "a"]]
    assert Markov(max_len=2).fit([[]], corpus).predict([[]]) == [["a", "b"]]


def test_markov_last_page_start():
    model = _shop_model(start="last_page")
    # from Shoes: Cart, then EOS; unknown last page falls back to BOS; from Shirts only EOS (skipped) -> empty
    assert model.predict([[["Home", "Shoes"]], [["Unseen"]], [["Shirts"]]]) == [[CART], ["Home", "Shoes", CART], []]


def test_markov_rejects_unknown_start():
    with pytest.raises(ValueError):
        Markov(start="middle")


def test_registry():
    assert BASELINES == {"most_popular": MostPopular, "last_session": LastSession, "markov": Markov,
                         "markov_last_page": MarkovFromLastPage, "recency_top_m": RecencyTopM}


def test_recency_top_m_tunes_its_size_and_ranks_recent_pages_first():
    # The next session is always the last two sessions' pages: a, b (last) and c (before) -> m = 3, c third.
    histories = [[["x", "c"], ["a", "b"]]] * 5
    targets = [["a", "b", "c"]] * 5
    model = RecencyTopM(decays=(0.5,)).fit(histories, targets)
    assert model.m_ == 3 and model.predict([[["x"], ["c"], ["a", "b"]]]) == [["b", "a", "c"]]  # ties: seen last first


def test_page_scores_rank_own_pages_then_popularity():
    pages = ["a", "b", "c", "d"]
    targets = [["d"], ["d", "c"], ["c"], ["d"]]  # popularity d 3, c 2
    histories = [[["a", "b"]]] * 4
    scores = LastSession().fit(histories, targets).page_scores([[["b", "a"]]], pages)[0]
    assert list(np.argsort(-scores)) == [1, 0, 3, 2]  # b, a (last session, in order), then d, c
    scores = MostPopular().fit(histories, targets).page_scores([[]], pages)[0]
    assert scores[3] > scores[2] > scores[0] == scores[1] == 0
    markov = MarkovFromLastPage().fit([[["a", "c"], ["a", "c"], ["a", "b"]]], [[]])
    assert np.argmax(markov.page_scores([[["a"]]], pages)[0]) == 2  # a -> c twice, a -> b once


def test_history_outcomes_learn_from_past_carts():
    rng = np.random.default_rng(0)
    histories = [[["p", CART] if rng.random() < 0.5 else ["p", "q"] for _ in range(3)] for _ in range(300)]
    carted = np.array([sum(CART in s for s in h) for h in histories])
    y = rng.random(300) < 0.1 + 0.25 * carted
    model = HistoryOutcomes().fit(histories, {"cart": y, "purchase": np.zeros(300, bool)})
    p = model.predict_proba([[["p", CART]] * 3, [["p", "q"]] * 3])
    assert p["cart"][0] > 0.5 > p["cart"][1] and p["purchase"].tolist() == [0.0, 0.0]  # never seen: base rate 0


def test_stacking_an_lm_probability_on_the_history_model_uses_its_signal():
    rng = np.random.default_rng(1)
    histories = [[["p", "q"]] for _ in range(400)]  # histories say nothing; the "LM" log-odds do
    signal = rng.normal(size=400)
    y = rng.random(400) < 1 / (1 + np.exp(-2 * signal))
    history = HistoryOutcomes().fit(histories, {"cart": y})
    stacked = history.stack(histories[:200], signal[:200, None], {"cart": y[:200]})
    p = stacked.predict_proba(histories[200:], signal[200:, None])["cart"]
    assert (np.argsort(p) == np.argsort(signal[200:])).all()  # ranked by the LM signal
    assert np.ptp(history.predict_proba(histories[200:])["cart"]) == 0  # the history model alone cannot rank them
