"""The obvious baselines the LMs must beat, as scikit-learn shaped estimators.

A sample is one user: `history` = the user's past sessions (each a list of page strings) and
`target` = the next session. Every estimator has `fit(histories, targets) -> self` and
`predict(histories) -> list[list[str]]` (one generated next session per user, without [BOS]/[EOS]).
Ties between equally frequent pages are broken alphabetically, so results do not depend on data order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from hetlm.tokenizer import BOS, EOS

Session = list[str]
History = Sequence[Session]


def _top(counts: Counter[str], n: int | None = None) -> list[str]:
    """Most frequent keys first, ties alphabetical."""
    return sorted(counts, key=lambda page: (-counts[page], page))[:n]


class MostPopular:
    """The same next session for everyone: the n pages found in the most training target sessions.

    Popularity counts target sessions containing the page (not raw views), since the set metrics
    reward a page once per session. n defaults to the median number of distinct pages per training
    target (rounded half to even, at least 1).
    """

    def __init__(self, n_pages: int | None = None):
        self.n_pages = n_pages

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> MostPopular:
        self.session_counts_ = Counter(page for target in targets for page in set(target))
        self.pages_ = _top(self.session_counts_, self.n_pages or _median_distinct_length(targets))
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [list(self.pages_) for _ in histories]


def _median_distinct_length(sessions: Sequence[Session]) -> int:
    return max(1, round(float(np.median([len(set(s)) for s in sessions])))) if sessions else 1


class LastSession:
    """The next session repeats the user's most recent one, as is (empty without history)."""

    def fit(self, histories: Sequence[History], targets: Sequence[Session]) -> LastSession:
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [list(history[-1]) if history else [] for history in histories]


class Markov:
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
        self.transitions_: dict[str, Counter[str]] = defaultdict(Counter)
        for session in _all_sessions(histories, targets):
            path = [BOS, *session, EOS]
            for current, following in zip(path, path[1:]):
                self.transitions_[current][following] += 1
        return self

    def predict(self, histories: Sequence[History]) -> list[Session]:
        return [self._generate(self._start_page(history)) for history in histories]

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


BASELINES = {"most_popular": MostPopular, "last_session": LastSession, "markov": Markov}
