"""Decoding for the metric: the next session as the set of pages that maximises the expected IoU.

Greedy decoding writes the single likeliest continuation, which for a small page LM is one or two pages,
while users are scored on the overlap of sets (HR, IoU). The set decoder instead:

1. gathers the LM's evidence for each user (`gather_evidence`): the log-probability of every page being the
   next session's first page, and `n_samples` sessions sampled at temperature 1 (immediate repeats banned);
2. scores candidate pages (the user's history pages, the outcome pages, the LM's top first pages and every
   sampled page) by a logistic model of "this page is in the next session" over LM features (first-page
   log-probability, share of samples holding the page) and history features (recency, frequency), fitted
   on validation users (`fit`), so the probabilities are calibrated on sessions the LM never trained on;
3. emits, per user, the top-m candidates whose expected IoU is highest (`expected_iou_by_size`), or a fixed
   m, whichever scored best on the validation users.

Expected IoU of a set S of size m, treating pages as independent Bernoulli(p_i) and pages outside the
candidates as a Poisson(r) count (r fitted): IoU = X / (m + Y) with X = |S & A| and Y = |A - S| independent,
so E[IoU] = E[X] * E[1 / (m + Y)] and E[1 / (m + Y)] = integral_0^1 t^(m-1) E[t^Y] dt, where E[t^Y] is a
product of (1 - p_j + p_j t) over the unselected candidates times exp(r (t - 1)). For a fixed size the best
set is the top-m by probability (a swap towards a likelier page raises E[X] and lowers Y), so only sizes
are searched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from .generate import next_page_scores
from .ingest.base import CART, PURCHASE
from .metrics import set_iou
from .outcomes import decode, monte_carlo_rows
from .tokenizer import BOS_ID, EOS_ID, SPECIALS

CONFIG_FILE = "set_decoder.json"
FEATURES = ("lm_first_logp", "lm_first_gap", "lm_sampled", "in_history", "in_last_session", "sessions_ago",
            "sessions_with_page", "tokens_ago", "is_cart", "is_purchase")
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(48)
_NODES, _WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2  # Gauss-Legendre on [0, 1]


@dataclass
class Evidence:
    """What the LM says about each user's next session."""

    first_page_logprobs: np.ndarray   # (n_users, vocab) log P(first page), specials -inf
    samples: list[list[list[int]]]    # per user, its sampled sessions (page ids)


def gather_evidence(model, input_ids_list: list[list[int]], n_samples: int = 0, seed: int = 0,
                    max_new_tokens: int = 40, batch_size: int = 64, progress: bool = False) -> Evidence:
    """First-page log-probabilities and `n_samples` sampled sessions per user, in one decoding pass (the
    draws are those of `outcomes.outcome_probabilities` at the same seed)."""
    if n_samples == 0:
        return Evidence(next_page_scores(model, input_ids_list, batch_size), [[] for _ in input_ids_list])
    prompts = [ids for ids in input_ids_list for _ in range(n_samples)]
    rows = [d for ids in input_ids_list for d in monte_carlo_rows(ids, n_samples, seed)]
    decoded = decode(model, prompts, rows, max_new_tokens, batch_size, progress,
                     first_pages_of=range(0, len(prompts), n_samples))
    first = np.stack([decoded.first_page_logprobs[i * n_samples] for i in range(len(input_ids_list))]) \
        if input_ids_list else np.zeros((0, model.config.vocab_size), dtype=np.float32)
    samples = [decoded.sessions[i:i + n_samples] for i in range(0, len(prompts), n_samples)]
    return Evidence(first.astype(np.float32), samples)


def history_sessions(input_ids: list[int]) -> list[list[int]]:
    """The page ids of each session in a prompt (written [BOS] p1 ... pn [EOS]); a session cut at the front
    by the length budget keeps its pages. [UNK] and other specials are left out."""
    sessions, current = [], []
    for token in input_ids:
        if token == BOS_ID:
            current = []
        elif token == EOS_ID:
            sessions.append(current)
            current = []
        elif token >= len(SPECIALS):
            current.append(token)
    if current:
        sessions.append(current)
    return [s for s in sessions if s]


@dataclass
class Candidates:
    """Candidate pages of every user, one row each: user index, page id, features (len(FEATURES) columns)."""

    user: np.ndarray
    page: np.ndarray
    x: np.ndarray


def candidates(input_ids_list: list[list[int]], evidence: Evidence, outcome_ids: tuple[int, int], top_first: int = 10) -> Candidates:
    """`outcome_ids`: the ids of Cart and Purchase (-1 where the vocabulary lacks one; `outcome_page_ids`)."""
    users, pages, rows = [], [], []
    for u, input_ids in enumerate(input_ids_list):
        sessions = history_sessions(input_ids)
        logp = evidence.first_page_logprobs[u]
        best = float(np.max(logp)) if np.isfinite(logp).any() else 0.0
        sampled: dict[int, int] = {}
        for session in evidence.samples[u]:
            for page in set(session):
                sampled[page] = sampled.get(page, 0) + 1
        n_drawn = max(len(evidence.samples[u]), 1)
        # Recency of each history page: sessions since it was last seen, tokens since, sessions holding it.
        last_session, tokens_ago, n_sessions = {}, {}, {}
        flat = [p for s in sessions for p in s]
        for age, session in enumerate(reversed(sessions)):
            for page in set(session):
                last_session.setdefault(page, age)
                n_sessions[page] = n_sessions.get(page, 0) + 1
        for age, page in enumerate(reversed(flat)):
            tokens_ago.setdefault(page, age)
        top = np.argpartition(-logp, min(top_first, len(logp) - 1))[:top_first] if top_first else []
        pool = list(dict.fromkeys([*last_session, *(i for i in outcome_ids if i >= len(SPECIALS)), *sampled,
                                   *(int(p) for p in top if np.isfinite(logp[p]))]))
        for page in pool:
            seen = page in last_session
            lp = max(float(logp[page]), -30.0)
            rows.append((lp, lp - best, sampled.get(page, 0) / n_drawn, float(seen), float(last_session.get(page) == 0),
                         np.log1p(last_session.get(page, 0)) if seen else 0.0, np.log1p(n_sessions.get(page, 0)),
                         np.log1p(tokens_ago.get(page, 0)) if seen else 0.0,
                         float(page == outcome_ids[0]), float(page == outcome_ids[1])))
            users.append(u)
            pages.append(page)
    x = np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))
    return Candidates(np.asarray(users, dtype=np.int64), np.asarray(pages, dtype=np.int64), x)


def expected_iou_by_size(p: np.ndarray, rest: float, max_size: int) -> np.ndarray:
    """E[IoU] of the top-m pages for m = 1..min(len(p), max_size), `p` sorted descending, independent pages,
    and a Poisson(`rest`) number of actual pages outside the candidates (see the module docstring)."""
    n = min(len(p), max_size)
    if n == 0:
        return np.zeros(0)
    # log E[t^Y] of the pages after the first m: suffix sums of log(1 - p_j (1 - t)), one column per node.
    logs = np.log1p(-np.clip(p, 0, 1 - 1e-12)[:, None] * (1 - _NODES[None, :]))
    suffix = np.concatenate([np.cumsum(logs[::-1], axis=0)[::-1], np.zeros((1, len(_NODES)))])  # suffix[m] = sum_{j>=m}
    m = np.arange(1, n + 1)
    generating = np.exp(suffix[m] + rest * (_NODES[None, :] - 1))          # (n, nodes): E[t^Y] for the top-m set
    inverse = (_NODES[None, :] ** (m[:, None] - 1) * generating) @ _WEIGHTS  # E[1 / (m + Y)]
    return np.cumsum(p[:n]) * inverse


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


class SetDecoder:
    """The expected-IoU set decoder (see the module docstring), scikit-learn shaped: `fit` on validation
    users' evidence and next sessions, `predict` sets for others; `save_pretrained` / `from_pretrained`
    keep it (a JSON file) in a model folder.

    n_samples: LM sessions sampled per user (0: first-page probabilities only, one forward pass);
    top_first: the LM's likeliest first pages added as candidates; max_size: the largest set considered;
    sizes: fixed set sizes tried against per-user expected-IoU sizing on the fitting users.
    """

    def __init__(self, n_samples: int = 0, top_first: int = 10, max_size: int = 20, sizes: tuple[int, ...] = tuple(range(1, 11)),
                 C: float = 1.0, seed: int = 0, max_new_tokens: int = 40):
        self.n_samples, self.top_first, self.max_size, self.sizes = n_samples, top_first, max_size, tuple(sizes)
        self.C, self.seed, self.max_new_tokens = C, seed, max_new_tokens

    def evidence(self, model, input_ids_list: list[list[int]], batch_size: int = 64, progress: bool = False) -> Evidence:
        return gather_evidence(model, input_ids_list, self.n_samples, self.seed, self.max_new_tokens, batch_size, progress)

    def fit(self, input_ids_list: list[list[int]], evidence: Evidence, target_ids_list: list[list[int]],
            outcome_ids: tuple[int, int]) -> SetDecoder:
        self.outcome_ids_ = [int(i) for i in outcome_ids]
        cands = candidates(input_ids_list, evidence, self.outcome_ids_, self.top_first)
        actual = [set(t) - set(range(len(SPECIALS))) for t in target_ids_list]
        y = np.array([page in actual[u] for u, page in zip(cands.user, cands.page)])
        if y.all() or not y.any():
            raise ValueError("the fitting users' candidates are all in (or all out of) their next sessions: "
                             "too few validation users to fit the set decoder")
        self.mean_, self.scale_ = cands.x.mean(0), cands.x.std(0) + 1e-9
        lr = LogisticRegression(C=self.C, max_iter=2000).fit((cands.x - self.mean_) / self.scale_, y)
        self.coef_, self.intercept_ = lr.coef_[0], float(lr.intercept_[0])
        covered = np.bincount(cands.user[y], minlength=len(actual))
        self.rest_ = float(np.mean([len(a) for a in actual]) - covered.mean()) if actual else 0.0
        # The size rule: per-user expected IoU, or the fixed size that did best on these users.
        scores = {}
        for size in (None, *self.sizes):
            self.size_ = size
            sets = self._sets(cands, len(input_ids_list))
            scores[size] = float(np.mean([set_iou(s, a) for s, a in zip(sets, actual)]))
        self.size_ = max(scores, key=lambda s: (scores[s], s is None))
        self.fit_iou_ = {("expected_iou" if k is None else str(k)): v for k, v in scores.items()}
        self.feature_names_ = list(FEATURES)
        return self

    def page_probabilities(self, cands: Candidates) -> np.ndarray:
        return _sigmoid(((cands.x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_)

    def page_scores(self, input_ids_list: list[list[int]], evidence: Evidence) -> np.ndarray:
        """(n_users, vocab) a ranking of every page: candidates by their probability of being in the next
        session (1 + p), the other pages below them in the LM's first-page order (specials -inf)."""
        cands = candidates(input_ids_list, evidence, self.outcome_ids_, self.top_first)
        lm = evidence.first_page_logprobs.astype(np.float64)
        scores = np.where(np.isfinite(lm), np.exp(lm) * 0.5, -np.inf)  # < 1: below every candidate
        scores[cands.user, cands.page] = 1 + self.page_probabilities(cands)
        return scores

    def predict(self, input_ids_list: list[list[int]], evidence: Evidence) -> list[list[int]]:
        """Each user's next session: page ids, likeliest first, no repeats, no special token."""
        return self._sets(candidates(input_ids_list, evidence, self.outcome_ids_, self.top_first), len(input_ids_list))

    def _sets(self, cands: Candidates, n_users: int) -> list[list[int]]:
        p = self.page_probabilities(cands)
        order = np.lexsort((-p, cands.user))  # by user, then likeliest first
        bounds = np.searchsorted(cands.user[order], np.arange(n_users + 1))
        out = []
        for u in range(n_users):
            rows = order[bounds[u]:bounds[u + 1]]
            if self.size_ is None:
                expected = expected_iou_by_size(p[rows], self.rest_, self.max_size)
                size = int(np.argmax(expected)) + 1 if len(expected) else 0
            else:
                size = self.size_
            out.append(cands.page[rows[:size]].tolist())
        return out

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        state = {k: getattr(self, k) for k in ("n_samples", "top_first", "max_size", "sizes", "C", "seed", "max_new_tokens")}
        fitted = {"outcome_ids": self.outcome_ids_, "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
                  "coef": self.coef_.tolist(), "intercept": self.intercept_, "rest": self.rest_, "size": self.size_,
                  "fit_iou": self.fit_iou_, "features": self.feature_names_}
        (Path(path) / CONFIG_FILE).write_text(json.dumps({"settings": state, "fitted": fitted}, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SetDecoder:
        saved = json.loads((Path(path) / CONFIG_FILE).read_text())
        fitted = saved["fitted"]
        if fitted["features"] != list(FEATURES):
            raise ValueError(f"{Path(path) / CONFIG_FILE}: fitted on features {fitted['features']}, this hetlm "
                             f"computes {list(FEATURES)}; refit it (hetlm experiment or SetDecoder.fit)")
        decoder = cls(**saved["settings"])
        decoder.outcome_ids_, decoder.rest_, decoder.size_ = fitted["outcome_ids"], fitted["rest"], fitted["size"]
        decoder.mean_, decoder.scale_ = np.array(fitted["mean"]), np.array(fitted["scale"])
        decoder.coef_, decoder.intercept_ = np.array(fitted["coef"]), fitted["intercept"]
        decoder.fit_iou_, decoder.feature_names_ = fitted["fit_iou"], fitted["features"]
        return decoder

    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / CONFIG_FILE).exists()


def outcome_page_ids(tokenizer) -> tuple[int, int]:
    """Ids of Cart and Purchase, -1 where the vocabulary lacks the page."""
    ids = [tokenizer.convert_tokens_to_ids(page) for page in (CART, PURCHASE)]
    return tuple(i if i is not None and i >= len(SPECIALS) else -1 for i in ids)
