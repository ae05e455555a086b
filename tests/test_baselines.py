import pytest

from hetlm.baselines import BASELINES, LastSession, Markov, MostPopular
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
    assert BASELINES == {"most_popular": MostPopular, "last_session": LastSession, "markov": Markov}
