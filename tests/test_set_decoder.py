import itertools
import math

import numpy as np
import pytest

from hetlm.outcomes import decode, monte_carlo_rows
from hetlm.set_decoder import Evidence, SetDecoder, candidates, expected_iou_by_size, history_sessions
from hetlm.tokenizer import BOS_ID, EOS_ID, SPECIALS

from .test_generate import boost_logits
from .test_train import VOCAB, chain_session, micro_model, one_thread, toy_samples  # noqa: F401 (fixture)


def brute_force_expected_iou(selected: set[int], p: np.ndarray, rest: float) -> float:
    """E[|S & A| / |S | A|] by enumerating every actual set A of the candidates and a Poisson count of others."""
    poisson = [math.exp(-rest) * rest**k / math.factorial(k) for k in range(40)]
    total = 0.0
    for outcome in itertools.product([0, 1], repeat=len(p)):
        prob = np.prod([pi if o else 1 - pi for pi, o in zip(p, outcome)])
        actual = {i for i, o in enumerate(outcome) if o}
        for k, pk in enumerate(poisson):
            union = len(selected | actual) + k
            total += prob * pk * (len(selected & actual) / union if union else 0.0)
    return total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rest", [0.0, 0.8])
def test_expected_iou_matches_brute_force_and_top_m_is_the_best_set(seed, rest):
    p = np.sort(np.random.default_rng(seed).uniform(0.02, 0.95, size=6))[::-1]
    by_size = expected_iou_by_size(p, rest, max_size=6)
    for m in range(1, 7):
        assert by_size[m - 1] == pytest.approx(brute_force_expected_iou(set(range(m)), p, rest), abs=1e-6)
    best_subset = max(brute_force_expected_iou(set(s), p, rest)
                      for r in range(1, 7) for s in itertools.combinations(range(6), r))
    assert by_size.max() == pytest.approx(best_subset, abs=1e-6)  # the decoder's choice is the best of all 63 sets


def test_history_sessions_reads_prompts():
    assert history_sessions([BOS_ID, 5, 6, EOS_ID, BOS_ID, 7, 1, EOS_ID]) == [[5, 6], [7]]  # [UNK] (1) left out
    assert history_sessions([6, 7, EOS_ID, BOS_ID, 8]) == [[6, 7], [8]]  # cut at the front, still open at the end


def synthetic(n_users: int, seed: int):
    """Users whose next session holds their last session's pages (plus noise); evidence with flat LM scores."""
    rng = np.random.default_rng(seed)
    inputs, targets = [], []
    for _ in range(n_users):
        sessions = [list(rng.choice(np.arange(8, VOCAB), size=3, replace=False)) for _ in range(3)]
        inputs.append([t for s in sessions for t in [BOS_ID, *s, EOS_ID]])
        targets.append([BOS_ID, *sessions[-1][:2], int(rng.integers(8, VOCAB)), EOS_ID])
    logp = np.log(np.full((n_users, VOCAB), 1.0 / (VOCAB - len(SPECIALS)), dtype=np.float32))
    logp[:, :len(SPECIALS)] = -np.inf
    logp[:, 4] += 3  # page 4 is the LM's favourite first page, and a page no one visits next
    return inputs, targets, Evidence(logp, [[[4, 5, 4]] for _ in range(n_users)])


def test_decoder_learns_recency_emits_clean_sets_and_round_trips(tmp_path):
    inputs, targets, evidence = synthetic(200, seed=0)
    decoder = SetDecoder(n_samples=1).fit(inputs, evidence, targets, outcome_ids=(5, -1))
    test_inputs, test_targets, test_evidence = synthetic(50, seed=1)
    sets = decoder.predict(test_inputs, test_evidence)
    for s, inp in zip(sets, test_inputs):
        assert s and len(s) == len(set(s)) and min(s) >= len(SPECIALS)   # no repeat, no special token
        assert 4 not in s and set(s) <= set(inp)                          # the LM's lure is learnt away
    hits = np.mean([len(set(s) & set(t)) / len(set(s) | set(t[1:-1])) for s, t in zip(sets, test_targets)])
    assert hits > 0.4
    decoder.save_pretrained(tmp_path)
    assert SetDecoder.from_pretrained(tmp_path).predict(test_inputs, test_evidence) == sets


def test_decoder_on_a_real_lm_never_repeats_or_emits_specials():
    model = micro_model()
    handle = boost_logits(model, list(range(len(SPECIALS), VOCAB, 3)), amount=5.0)
    inputs = [h for h, _ in toy_samples(30, seed=2)]
    decoder = SetDecoder(n_samples=3, max_new_tokens=8)
    evidence = decoder.evidence(model, inputs)
    decoder.fit(inputs, evidence, [t for _, t in toy_samples(30, seed=2)], outcome_ids=(-1, -1))
    for s in decoder.predict(inputs, evidence):
        assert len(s) == len(set(s)) and all(t >= len(SPECIALS) for t in s)
    for sessions in evidence.samples:  # free-running draws: no page twice in a row
        assert all(a != b for s in sessions for a, b in zip(s, s[1:]))
    handle.remove()


def test_free_running_decoders_never_repeat_a_page_at_once():
    from hetlm.generate import generate_next_sessions

    model = micro_model(seed=3)
    handle = boost_logits(model, [9], amount=50.0)  # page 9 would be emitted at every step
    prompts = [chain_session(0), chain_session(1) * 2]
    for strategy in ("greedy", "beam", "sample"):
        for s in generate_next_sessions(model, prompts, max_new_tokens=10, strategy=strategy, progress=False):
            assert s and all(a != b for a, b in zip(s, s[1:]))
    drawn = decode(model, prompts, [monte_carlo_rows(p, 1, 0)[0] for p in prompts], max_new_tokens=10).sessions
    assert all(s and all(a != b for a, b in zip(s, s[1:])) for s in drawn)
    handle.remove()


def test_page_scores_rank_candidates_by_probability_then_the_lm():
    inputs, targets, evidence = synthetic(200, seed=0)
    decoder = SetDecoder().fit(inputs, evidence, targets, outcome_ids=(5, -1))
    scores = decoder.page_scores(inputs[:3], Evidence(evidence.first_page_logprobs[:3], evidence.samples[:3]))
    assert np.isneginf(scores[:, :len(SPECIALS)]).all()
    for u, s in enumerate(decoder.predict(inputs[:3], Evidence(evidence.first_page_logprobs[:3], evidence.samples[:3]))):
        assert list(np.argsort(-scores[u], kind="stable")[:len(s)]) == s  # the emitted set heads the ranking
    cands = candidates(inputs[:3], Evidence(evidence.first_page_logprobs[:3], evidence.samples[:3]), (5, -1))
    is_candidate = np.zeros(scores.shape, bool)
    is_candidate[cands.user, cands.page] = True
    assert (scores[is_candidate] >= 1).all() and (scores[~is_candidate] < 1).all()
