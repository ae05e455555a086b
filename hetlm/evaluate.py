"""Evaluation of one model on the test samples: generate each user's next session (routing users to
their cluster's LM for clusterwise models) greedily, as the paper does, and gather the LM's evidence for the
set decoder (`set_decoder`); then compute the metrics (`metrics`), per cluster and Combined."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel

from . import metrics as M
from .cluster.base import ClusterwiseLM, for_each_cluster
from .generate import generate_next_sessions
from .ingest.base import CART, PURCHASE
from .set_decoder import Evidence, SetDecoder, gather_evidence, outcome_page_ids
from .tokenizer import SPECIALS

OUTCOME_PAGES = {"cart": CART, "purchase": PURCHASE}  # outcome column -> its page


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    strategy: str = "greedy"
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Predictions:
    """What a model produced for the test users, in test-frame order."""

    pages: list[list[str]]              # greedy next sessions (empty lists when not generated)
    clusters: np.ndarray
    evidence: Evidence                  # first-page log-probabilities (and sampled sessions) for the set decoder
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def first_page_logprobs(self) -> np.ndarray:  # (n, vocab) log P(first page of the next session)
        return self.evidence.first_page_logprobs


def _decode(tokenizer, ids: list[list[int]]) -> list[list[str]]:
    return [tokenizer.convert_ids_to_tokens(list(row)) for row in ids]


def predict(model: ClusterwiseLM, samples: pl.DataFrame, tokenizer, settings: GenerationConfig,
            z: np.ndarray | None = None, routing: str | None = None, progress: bool = True, greedy: bool = True,
            n_samples: int = 0) -> Predictions:
    """Every user's greedy next session (unless `greedy` is False) and the LM's evidence for the set decoder
    (first-page log-probabilities and `n_samples` sampled sessions), each user by its cluster's LM (`z`, the
    users' embeddings, routes them; a single LM needs none)."""
    inputs = samples["input_ids"].to_list()
    kwargs = settings.model_dump()
    seconds = {"generation": 0.0, "scoring": 0.0}

    def run(lm: PreTrainedModel, idx: np.ndarray) -> list[tuple]:
        cluster_inputs = [inputs[i] for i in idx]
        started = time.perf_counter()
        pages = _decode(tokenizer, generate_next_sessions(lm, cluster_inputs, progress=progress, **kwargs)) \
            if greedy else [[] for _ in idx]
        scored = time.perf_counter()
        evidence = gather_evidence(lm, cluster_inputs, n_samples, settings.seed, settings.max_new_tokens,
                                   settings.batch_size)
        seconds["generation"] += scored - started
        seconds["scoring"] += time.perf_counter() - scored
        return list(zip(pages, evidence.first_page_logprobs, evidence.samples))

    clusters = model.route(z, routing, inputs)
    rows = for_each_cluster(model, clusters, run)  # per user: next session, first-page log-probs, samples
    first_pages = np.stack([r[1] for r in rows]) if rows else np.zeros((0, len(tokenizer)))
    evidence = Evidence(first_pages.astype(np.float32), [r[2] for r in rows])
    return Predictions([r[0] for r in rows], clusters, evidence, seconds)


def fit_set_decoder(decoder: SetDecoder, val: Predictions, val_samples: pl.DataFrame, tokenizer) -> SetDecoder:
    """Fit the set decoder on the validation users' evidence (from `predict(..., greedy=False)`)."""
    return decoder.fit(val_samples["input_ids"].to_list(), val.evidence, val_samples["target_ids"].to_list(),
                       outcome_page_ids(tokenizer))


def fit_default_set_decoder(model: ClusterwiseLM, val: pl.DataFrame, z_val: np.ndarray | None = None) -> SetDecoder | None:
    """The set decoder with its default settings fitted on the validation users (routed by `z_val` as the model
    routes them; a single LM needs none), or None without validation users: what `hetlm train`, `train_single`
    and the clusterwise estimators' `save_pretrained` write into a model folder (`set_decoder.json`)."""
    if not val.height:
        return None
    evidence = predict(model, val, model.tokenizer, GenerationConfig(), z_val, progress=False, greedy=False)
    return fit_set_decoder(SetDecoder(), evidence, val, model.tokenizer)


def set_decoded_pages(decoder: SetDecoder, pred: Predictions, samples: pl.DataFrame, tokenizer) -> list[list[str]]:
    return _decode(tokenizer, decoder.predict(samples["input_ids"].to_list(), pred.evidence))


def baseline_page_scores(baseline, samples: pl.DataFrame, tokenizer) -> np.ndarray:
    """(n, vocab) a baseline's ranking of every page as the next session's first page, specials -inf."""
    pages = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    scores = baseline.page_scores(samples["history"].to_list(), pages)
    scores[:, :len(SPECIALS)] = -np.inf
    return scores


def save_generations(path: str | Path, samples: pl.DataFrame, pages: list[list[str]], clusters: np.ndarray) -> None:
    """Generations beside what `compute_metrics` needs to evaluate them (history, target), one row per user."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    samples.select("user", "target_start", "history", "target").with_columns(
        generated=pl.Series(pages, dtype=pl.List(pl.Utf8)), cluster=pl.Series(clusters.astype(int))
    ).write_parquet(path)


def _flat(history: list[list[str]]) -> list[str]:
    return [p for s in history for p in s]


def compute_metrics(pages: list[list[str]], test: pl.DataFrame, vocabulary: set[str], clusters: np.ndarray | None = None,
                    first_page_logprobs: np.ndarray | None = None, tokenizer=None, bert_encoder=None) -> dict:
    """The 20 metrics per cluster and Combined, plus (Combined only) BLEU, BERTScore, ranking and AUC."""
    actual = test["target"].to_list()
    history = [_flat(h) for h in test["history"].to_list()]
    clusters = np.zeros(len(pages), dtype=int) if clusters is None else clusters
    result = M.evaluate_generations(pages, actual, history, vocabulary)
    per_cluster = {}
    for k in np.unique(clusters):
        idx = np.flatnonzero(clusters == k)
        sub = M.evaluate_generations([pages[i] for i in idx], [actual[i] for i in idx],
                                     [history[i] for i in idx], vocabulary)
        per_cluster[int(k)] = {"n": len(idx), **sub.metrics}
    extra = {"BLEU": M.bleu(pages, actual)}
    if bert_encoder is not None:
        extra |= {f"BERTScore-{k}": v for k, v in M.bert_score(pages, actual, bert_encoder).items()}
    per_user = {"per_user_iou": result.per_user["IoU"].to_list()}
    if first_page_logprobs is not None and tokenizer is not None:
        ranking, per_user["first_page_ranks"] = _ranking_and_auc(first_page_logprobs, test, tokenizer)
        extra |= ranking
    return {"combined": {"n": len(pages), **result.metrics}, "clusters": per_cluster, "extra": extra, **per_user}


def first_page_outcomes(test: pl.DataFrame, first_page_logprobs: np.ndarray, tokenizer) -> pl.DataFrame:
    """Each test user's outcome probabilities beside the observed outcomes: columns user, p_cart,
    p_purchase, cart, purchase (test-frame order). The probability is P(first page of the next session
    = Cart / Purchase); NaN where the vocabulary lacks the page."""
    probs = {}
    for col, page in OUTCOME_PAGES.items():
        page_id = tokenizer.convert_tokens_to_ids(page)
        known = page_id >= len(SPECIALS)
        probs[f"p_{col}"] = np.exp(first_page_logprobs[:, page_id]) if known else np.full(test.height, np.nan)
    return test.select("user").with_columns(
        *(pl.Series(name, p, dtype=pl.Float64) for name, p in probs.items()), test["cart"], test["purchase"])


def _ranking_and_auc(logprobs: np.ndarray, test: pl.DataFrame, tokenizer) -> tuple[dict[str, float], list]:
    """Ranking of the actual first next page; AUC of P(first page is Cart / Purchase) for the outcome. Also each
    user's rank of that page (None where it is unknown), for paired intervals between models."""
    first = np.array([tokenizer.convert_tokens_to_ids(t[0]) for t in test["target"].to_list()])
    known = first >= len(SPECIALS)  # unknown first pages cannot be ranked
    ranks = M.page_ranks(logprobs[known], first[known]) if known.any() else np.zeros(0, int)
    out = M.rank_metrics(ranks) if known.any() else {}
    per_user = np.full(len(first), None, dtype=object)
    per_user[known] = ranks.tolist()
    outcomes = first_page_outcomes(test, logprobs, tokenizer)
    for col, page in OUTCOME_PAGES.items():
        prob = outcomes[f"p_{col}"].to_numpy()
        out[f"AUC-{page}(first page)"] = math.nan if np.isnan(prob).all() else M.outcome_auc(prob, test[col].to_numpy())
    return out, per_user.tolist()
