import numpy as np
import pytest
import torch

from hetlm.generate import generate_next_sessions, next_page_scores
from hetlm.models import FAMILIES
from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from hetlm.train import TrainConfig, train_lm

from .test_train import QUICK, VOCAB, chain_session, micro_model, one_thread, toy_samples  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def toy_lm(tmp_path_factory):
    model = micro_model()
    train_lm(model, toy_samples(300, seed=0), toy_samples(60, seed=1), TrainConfig(**QUICK),
             tmp_path_factory.mktemp("gen"), progress=False)
    return model.eval()


def boost_logits(model, token_ids, amount=100.0):
    """Make `token_ids` the model's favourites, to show that suppression, not luck, keeps them out."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., token_ids] += amount
        return logits
    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_never_emits_pad_unk_or_bos(strategy):
    model = micro_model()
    handle = boost_logits(model, [PAD_ID, UNK_ID, BOS_ID])
    out = generate_next_sessions(model, [chain_session(0), chain_session(1) * 3], max_new_tokens=12, strategy=strategy,
                                 num_beams=3, progress=False)
    handle.remove()
    assert all(len(s) <= 12 and min(s, default=EOS_ID + 1) > EOS_ID for s in out) and any(out)


def test_eos_ends_the_session():
    model = micro_model()
    handle = boost_logits(model, [EOS_ID])
    assert generate_next_sessions(model, [chain_session(0), []], progress=False) == [[], []]
    handle.remove()


def test_trained_model_walks_a_chain_and_stops(toy_lm):
    out = generate_next_sessions(toy_lm, [h for h, _ in toy_samples(20, seed=3)], max_new_tokens=20, progress=False)
    for session in out:
        assert len(session) == 4 and session[0] in range(4, VOCAB, 4)  # a whole chain, then [EOS]
        assert session == list(range(session[0], session[0] + 4))


def test_batching_and_left_padding_change_nothing(toy_lm):
    users = [h for h, _ in toy_samples(12, seed=4)]
    users = [users[0][-6:]] + [u * 3 for u in users[1:]]  # the first prompt is much shorter than the others
    together = generate_next_sessions(toy_lm, users, batch_size=64, progress=False)
    assert together[0] == generate_next_sessions(toy_lm, users[:1], progress=False)[0]
    assert together == generate_next_sessions(toy_lm, users, batch_size=5, progress=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scores_do_not_depend_on_padding(family):
    model = micro_model(family).eval()
    users = [chain_session(1), chain_session(2) * 4, chain_session(0) * 2 + chain_session(3)]
    together = next_page_scores(model, users)
    alone = np.concatenate([next_page_scores(model, [u]) for u in users])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_next_page_scores_are_page_log_probabilities(toy_lm):
    users = [h for h, _ in toy_samples(10, seed=7)]
    scores = next_page_scores(toy_lm, users, batch_size=4)
    assert scores.shape == (10, VOCAB) and np.isneginf(scores[:, :4]).all()
    np.testing.assert_allclose(np.exp(scores).sum(1), 1.0, atol=1e-5)
    first_pages = [s[0] for s in generate_next_sessions(toy_lm, users, progress=False)]
    assert scores.argmax(1).tolist() == first_pages


def test_long_prompts_keep_their_most_recent_tokens(toy_lm):
    long_history = chain_session(5) * 3 + chain_session(1) * 40  # 258 tokens, model positions 64
    out = generate_next_sessions(toy_lm, [long_history, long_history[-(64 - 10 - 1):]], max_new_tokens=10, progress=False)
    assert out[0] == out[1]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(toy_lm):
    users = [h for h, _ in toy_samples(6, seed=8)]
    torch.manual_seed(42)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(42)
    first = generate_next_sessions(toy_lm, users, strategy="sample", temperature=2.0, seed=3, progress=False)
    assert torch.equal(torch.rand(1), expected_next_draw)
    assert first == generate_next_sessions(toy_lm, users, strategy="sample", temperature=2.0, seed=3, progress=False)
