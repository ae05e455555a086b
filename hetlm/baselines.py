"""The obvious baselines the LMs must beat, as scikit-learn shaped estimators.

A sample is one user: `history` = the user's past sessions (each a list of page strings) and
`target` = the next session. Every estimator has `fit(histories, targets) -> self`,
`predict(histories) -> list[list[str]]` (one generated next session per user, without [BOS]/[EOS]) and
`page_scores(histories, pages) -> (n_users, len(pages))` (a ranking of every page as the next session's
first page, for Recall@k / NDCG / MRR; the baseline's own order, ties broken by popularity).
Ties between equally frequent pages are broken alphabetically, so results do not depend on data order.

`HistoryOutcomes` is the outcome baseline a marketer would fit first: a logistic regression of "the next
session holds Cart / Purchase" on counts from the user's history.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from sklearn.linear_model import LogisticRegression

import numpy as np

from hetlm.ingest.base import CART, PURCHASE
from hetlm.metrics import set_iou
from hetlm.tokenizer import BOS, EOS

Session = list[str]
History = Sequence[Session]


def _top(counts: Counter[str], n: int | None = None) -> list[str]:
    """Most frequent keys first, ties alphabetical."""
    return sorted(counts, key=lambda page: (-counts[page], page))[:n]


class _Popularity:
    """Counts of target sessions holding each page (fitted), as tie-breaking scores in [0, 1)."""

    def fit_popularity(self, targets: Sequence[Session]) -> None:
        self.session_counts_ = Counter(page for target in targets for page in set(target))

    def popularity(self, pages: Sequence[str]) -> np.ndarray:
        counts = np.array([self.session_counts_.get(page, 0) for page in pages], dtype=np.float64)
        return counts / (counts.max() + 1) if len(counts) else counts

    def page_scores(self, histories: Sequence[History], pages: Sequence[str]) -> np.ndarray:
        """Per user, 1 + the baseline's own score of each page it ranks (>= 1), popularity (< 1) for the rest."""
        popularity = self.popularity(pages)
        column = {page: j for j, page in enumerate(pages)}
        out = np.tile(popularity, (len(histories), 1))
        for u, history in enumerate(histories):
            for page, score in self._own_scores(history).items():
                if page in column:
                    out[u, column[page]] += 1 + score
        return out

    def _own_scores(self, history: History) -> dict[str, float]:
        return {}


class MostPopular(_Popularity):
    """The same next session for everyone: the n pages found in the most training target sessions.

    Popularity counts target sessions containing the page (not raw views), since the set metrics
    reward a page once per session. n defaults to the median number of distinct pages per training
    target (rounded half to even, at least 1).
    """

    def __init__(self, n_pages: int | None = None):
        self.n_pages = n_pages

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> MostPopular:
        self.fit_popularity(targets)
        self.pages_ = _top(self.session_counts_, self.n_pages or _median_distinct_length(targets))
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [list(self.pages_) for _ in histories]


def _median_distinct_length(sessions: Sequence[Session]) -> int:
    return max(1, round(float(np.median([len(set(s)) for s in sessions])))) if sessions else 1


class LastSession(_Popularity):
    """The next session repeats the user's most recent one, as is (empty without history). Ranking: the last
    session's pages, its first page first."""

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> LastSession:
        self.fit_popularity(targets)
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [list(history[-1]) if history else [] for history in histories]

    def _own_scores(self, history: History) -> dict[str, float]:
        last = list(dict.fromkeys(history[-1])) if history else []
        return {page: (len(last) - i) / (len(last) + 1) for i, page in enumerate(last)}


class RecencyTopM(_Popularity):
    """The m pages of the user's history with the highest recency-weighted count: a page scores
    decay^age summed over the sessions holding it (age 0 = the last session), ties to the page seen last.
    m and decay are the pair of the grid with the best mean IoU on the fitting samples (last `tune_on`)."""

    def __init__(self, sizes: Sequence[int] = tuple(range(1, 11)), decays: Sequence[float] = (0.3, 0.5, 0.7, 1.0),
                 tune_on: int = 5000):
        self.sizes, self.decays, self.tune_on = tuple(sizes), tuple(decays), tune_on

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> RecencyTopM:
        self.fit_popularity(targets)
        histories, targets = list(histories)[-self.tune_on:], list(targets)[-self.tune_on:]
        best = (-1.0, 0, 0.0)
        for decay in self.decays:
            ranked = [self._ranked(h, decay) for h in histories]
            for m in self.sizes:
                iou = float(np.mean([set_iou(r[:m], t) for r, t in zip(ranked, targets)])) if targets else 0.0
                best = max(best, (iou, -m, decay))  # ties: the smaller set
        self.fit_iou_, self.m_, self.decay_ = best[0], -best[1] or self.sizes[0], best[2] or self.decays[0]
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [self._ranked(history, self.decay_)[:self.m_] for history in histories]

    @staticmethod
    def _weights(history: History, decay: float) -> dict[str, float]:
        weights: dict[str, float] = {}
        for age, session in enumerate(reversed(history)):
            for page in set(session):
                weights[page] = weights.get(page, 0.0) + decay**age
        return weights

    def _ranked(self, history: History, decay: float) -> Session:
        weights = self._weights(history, decay)
        last_seen = {page: i for i, page in enumerate(p for s in history for p in s)}
        return sorted(weights, key=lambda page: (-weights[page], -last_seen[page]))

    def _own_scores(self, history: History) -> dict[str, float]:
        ranked = self._ranked(history, self.decay_)
        return {page: (len(ranked) - i) / (len(ranked) + 1) for i, page in enumerate(ranked)}


class Markov(_Popularity):
    """First-order Markov chain over pages, decoded greedily.

    Transitions are counted within sessions written [BOS] p1 ... pn [EOS], over every training
    session (history sessions and targets). Generation follows the most frequent successor until
    [EOS] or `max_len` pages, and stops before a transition it has already taken (a greedy chain that
    repeats a transition would loop forever).

    start="bos" (paper-simple): every user gets the chain from [BOS], i.e. the same session.
    start="last_page": the chain starts at the user's last page seen, and its first step skips [EOS]
    (sessions often end there); users whose last page is unknown fall back to [BOS].
    """

    def __init__(self, max_len: int = 40, start: str = "bos"):
        if start not in ("bos", "last_page"):
            raise ValueError(f"start must be 'bos' or 'last_page', got {start!r}")
        self.max_len = max_len
        self.start = start

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> Markov:
        self.fit_popularity(targets)
        self.transitions_: dict[str, Counter[str]] = defaultdict(Counter)
        for session in _all_sessions(histories, targets):
            path = [BOS, *session, EOS]
            for current, following in zip(path, path[1:]):
                self.transitions_[current][following] += 1
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [self._generate(self._start_page(history)) for history in histories]

    def _own_scores(self, history: History) -> dict[str, float]:
        """Successors of the start page by transition count ([EOS] left out: it is not a page)."""
        successors = {p: c for p, c in self.transitions_.get(self._start_page(history), Counter()).items() if p != EOS}
        total = sum(successors.values()) + 1
        return {page: count / total for page, count in successors.items()}

    def _start_page(self, history: History) -> str:
        if self.start == "last_page":
            last = next((session[-1] for session in reversed(history) if session), None)
            if last in self.transitions_:
                return last
        return BOS

    def _next_page(self, current: str, allow_end: bool) -> str | None:
        successors = self.transitions_.get(current, Counter())
        return next((page for page in _top(successors) if allow_end or page != EOS), None)

    def _generate(self, start: str) -> Session:
        generated: Session = []
        taken: set[tuple[str, str]] = set()
        current = start
        while len(generated) < self.max_len:
            # From the user's last page, [EOS] would end the new session before it starts.
            from_last_page = start != BOS and not generated
            following = self._next_page(current, allow_end=not from_last_page)
            if following is None or following == EOS or (current, following) in taken:
                break
            taken.add((current, following))
            generated.append(following)
            current = following
        return generated


def _all_sessions(histories: Sequence[History], targets: Sequence[Session]) -> Iterable[Session]:
    for history in histories:
        yield from history
    yield from targets


class MarkovFromLastPage(Markov):
    """The Markov chain started at the user's last page (`Markov(start="last_page")`)."""

    def __init__(self, max_len: int = 40):
        super().__init__(max_len, start="last_page")


BASELINES = {"most_popular": MostPopular, "last_session": LastSession, "markov": Markov,
             "markov_last_page": MarkovFromLastPage, "recency_top_m": RecencyTopM}


HISTORY_FEATURES = ("log_sessions", "log_pages", "log_distinct_pages", "log_carts", "log_purchases", "cart_in_last",
                    "purchase_in_last", "log_sessions_since_cart", "log_sessions_since_purchase", "log_last_length")


def history_features(histories: Sequence[History]) -> np.ndarray:
    """(n_users, len(HISTORY_FEATURES)) counts and recencies of the user's history, log-scaled."""
    rows = []
    for history in histories:
        flat = [p for s in history for p in s]
        since = {}
        for age, session in enumerate(reversed(history)):
            for page in (CART, PURCHASE):
                if page in session:
                    since.setdefault(page, age)
        last = history[-1] if history else []
        rows.append((np.log1p(len(history)), np.log1p(len(flat)), np.log1p(len(set(flat))), np.log1p(flat.count(CART)),
                     np.log1p(flat.count(PURCHASE)), float(CART in last), float(PURCHASE in last),
                     np.log1p(since.get(CART, len(history) + 1)), np.log1p(since.get(PURCHASE, len(history) + 1)),
                     np.log1p(len(last))))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(HISTORY_FEATURES))


class HistoryOutcomes:
    """P(the next session holds Cart), P(... Purchase): logistic regressions on `history_features`, plus any
    extra columns given (e.g. an LM's own probability, to combine both signals). An outcome never seen in
    the fitting data gets its base rate."""

    def __init__(self, C: float = 1.0):
        self.C = C

    def fit(self, histories: Sequence[History], outcomes: dict[str, np.ndarray], extra: np.ndarray | None = None) -> HistoryOutcomes:
        x = self._x(histories, extra)
        self.mean_, self.scale_ = x.mean(0), x.std(0) + 1e-9
        self.models_: dict[str, LogisticRegression | float] = {}
        for name, y in outcomes.items():
            y = np.asarray(y, dtype=bool)
            self.models_[name] = (LogisticRegression(C=self.C, max_iter=2000).fit((x - self.mean_) / self.scale_, y)
                                  if 0 < y.sum() < len(y) else float(y.mean()) if len(y) else 0.0)
        return self

    def predict_proba(self, histories: Sequence[History], extra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        x = (self._x(histories, extra) - self.mean_) / self.scale_
        return {name: m.predict_proba(x)[:, 1] if isinstance(m, LogisticRegression) else np.full(len(x), m)
                for name, m in self.models_.items()}

    def stack(self, histories: Sequence[History], lm_logits: np.ndarray, outcomes: dict[str, np.ndarray]) -> StackedOutcomes:
        """A model's outcome log-odds beside this one's (fitted on other users), combined by a logistic
        regression on `histories` (e.g. validation users, whose LM probabilities are out of sample)."""
        return StackedOutcomes(self, self.C).fit(histories, lm_logits, outcomes)

    @staticmethod
    def _x(histories: Sequence[History], extra: np.ndarray | None) -> np.ndarray:
        x = history_features(histories)
        return x if extra is None else np.column_stack([x, np.asarray(extra, dtype=np.float64).reshape(len(x), -1)])



class StackedOutcomes:
    """Per outcome, a logistic regression on [the history model's log-odds, a model's (e.g. an LM's) own
    log-odds] of that outcome: two inputs, so a few hundred validation users fit it (`HistoryOutcomes.stack`).
    `logits` has one column per outcome, in the order of the history model's outcomes."""

    def __init__(self, history: HistoryOutcomes, C: float = 1.0):
        self.history, self.C = history, C

    def fit(self, histories: Sequence[History], logits: np.ndarray, outcomes: dict[str, np.ndarray]) -> StackedOutcomes:
        x = self._x(histories, logits)
        self.models_ = {name: LogisticRegression(C=self.C, max_iter=2000).fit(x[name], np.asarray(y, dtype=bool))
                        if 0 < np.sum(y) < len(y) else None for name, y in outcomes.items()}
        return self

    def predict_proba(self, histories: Sequence[History], logits: np.ndarray) -> dict[str, np.ndarray]:
        x = self._x(histories, logits)
        base = self.history.predict_proba(histories)
        return {name: m.predict_proba(x[name])[:, 1] if m is not None else base[name] for name, m in self.models_.items()}

    def _x(self, histories: Sequence[History], logits: np.ndarray) -> dict[str, np.ndarray]:
        base = self.history.predict_proba(histories)
        logits = np.asarray(logits, dtype=np.float64).reshape(len(histories), -1)
        out = {}
        for j, (name, p) in enumerate(base.items()):
            p = np.clip(p, 1e-4, 1 - 1e-4)
            out[name] = np.column_stack([np.log(p / (1 - p)), logits[:, j]])
        return out
