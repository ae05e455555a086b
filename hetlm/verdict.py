"""The verdict of a finished run: its best model (highest test IoU, baselines excepted) against the strongest
baseline on each headline metric, with the paired bootstrap 95% interval of the difference over the test users.

Per-user figures come from the run folder: HR and IoU recomputed from generations/ (`FinishedRun.per_user`),
Cart-or-Purchase hits from generations/, ranks of the first page from results.json (`first_page_ranks`, stored
since the report's verdict; older runs get the differences without an interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from . import metrics as M
from .figures import FinishedRun, MissingData

HEADLINE = ["IoU", "HR", "NDCG@10", "Recall@10", "F1-Cart/Purchase"]
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Comparison:
    metric: str
    value: float            # the best model's
    baseline: str           # the strongest baseline on this metric
    baseline_value: float
    gap: float              # value - baseline_value
    lo: float | None        # paired bootstrap 95% interval of the gap; None without per-user figures
    hi: float | None

    @property
    def outcome(self) -> str:
        if self.lo is None:
            return f"{'ahead' if self.gap > 0 else 'behind'}, no interval"
        if self.lo > 0:
            return "better"
        return "worse" if self.hi < 0 else "no clear difference"

    @property
    def beaten(self) -> bool | None:
        """Whether the model beats the baseline; None when an older run lacks the per-user figures to tell."""
        return None if self.lo is None and self.gap > 0 else self.outcome == "better"


@dataclass(frozen=True)
class Verdict:
    model: str
    n_models: int
    n_test: int
    comparisons: list[Comparison]

    @property
    def not_beaten(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.beaten is False]

    def summary(self) -> str:
        """Plain sentences on what the comparisons show: how many headline metrics it wins, and which not."""
        beaten = [c.metric for c in self.comparisons if c.beaten]
        said = [f"It beats the strongest baseline on {len(beaten)} of the {len(self.comparisons)} headline metrics"
                + (f" ({', '.join(beaten)})." if beaten and len(beaten) < len(self.comparisons) else ".")]
        by_outcome: dict[str, list[str]] = {}
        for c in self.comparisons:
            if not c.beaten:
                by_outcome.setdefault(c.outcome, []).append(f"{c.metric} ({c.baseline.removeprefix('baseline: ')})")
        if self.not_beaten:
            said.append("Not beaten on " + "; ".join(f"{', '.join(m)}: {o}" for o, m in by_outcome.items()
                                                     if not o.startswith("ahead")) + ".")
        ahead = by_outcome.get("ahead, no interval")
        if ahead:
            said.append(f"Ahead on {', '.join(ahead)}, without an interval (the run predates per-user ranks).")
        return " ".join(said)

    def lines(self) -> list[str]:
        """For a terminal."""
        rows = [f"{c.metric}: {c.value:.3f} vs {c.baseline} {c.baseline_value:.3f}, {c.gap:+.3f} "
                + (f"[{c.lo:+.3f}, {c.hi:+.3f}] " if c.lo is not None else "") + c.outcome for c in self.comparisons]
        return [f"Best model (test IoU): {self.model}", *rows, self.summary()]


def _value(result, metric: str) -> float:
    return float(result.combined.get(metric, result.extra.get(metric, math.nan)))


def _per_user(run: FinishedRun, name: str, metric: str) -> np.ndarray | None:
    """The figures whose statistic over users is the metric: a value per user (HR, IoU), a rank per ranked user
    (Recall@10, NDCG@10), or (generated, actual) Cart-or-Purchase flags (F1); None when the run lacks them."""
    if metric in ("HR", "IoU"):
        try:
            return run.per_user[name][metric].to_numpy() if name in run.per_user else None
        except MissingData:
            return None
    if metric in ("Recall@10", "NDCG@10"):
        ranks = run.result.results[name].first_page_ranks
        return None if ranks is None else np.array([r or 0 for r in ranks])   # 0: not ranked, dropped below
    if metric == "F1-Cart/Purchase" and name in run.generations:
        df = run.generations[name]
        return np.column_stack([M.contains_outcome(df["generated"].to_list()), M.contains_outcome(df["target"].to_list())])
    return None


def _statistic(metric: str):
    """The metric from resampled per-user figures (draws, users, ...) -> (draws,)."""
    if metric == "Recall@10":
        return lambda ranks: (ranks <= 10).mean(axis=1)
    if metric == "NDCG@10":
        return lambda ranks: M.ndcg_at(ranks, 10).mean(axis=1)
    if metric == "F1-Cart/Purchase":
        return lambda flags: M.f1_counts(flags[..., 0], flags[..., 1], axis=1)
    return None  # the mean


def compare(run: FinishedRun, model: str, baseline: str, metric: str, n_boot: int = BOOTSTRAP) -> Comparison:
    results = run.result.results
    value, base = _value(results[model], metric), _value(results[baseline], metric)
    ours, theirs = _per_user(run, model, metric), _per_user(run, baseline, metric)
    lo = hi = None
    if ours is not None and theirs is not None and len(ours) == len(theirs):
        if metric in ("Recall@10", "NDCG@10"):   # the users whose first page could be ranked (the same for all)
            ranked = ours > 0
            ours, theirs = ours[ranked], theirs[ranked]
        if len(ours):
            paired = M.paired_bootstrap(ours, theirs, _statistic(metric), n_boot=n_boot)
            lo, hi = paired["lo"], paired["hi"]
    return Comparison(metric, value, baseline, base, value - base, lo, hi)


def run_verdict(run: FinishedRun, n_boot: int = BOOTSTRAP) -> Verdict | None:
    """The best model against the strongest baseline on each headline metric the run has; None without both a
    model and a baseline."""
    results = run.result.results
    models = [n for n, r in results.items() if r.kind != "baseline"]
    baselines = [n for n, r in results.items() if r.kind == "baseline"]
    if not models or not baselines:
        return None
    best = max(models, key=lambda n: np.nan_to_num(_value(results[n], "IoU"), nan=-1))  # first of equals
    comparisons = []
    for metric in HEADLINE:
        known = [b for b in baselines if not math.isnan(_value(results[b], metric))]
        if math.isnan(_value(results[best], metric)) or not known:
            continue
        strongest = max(known, key=partial(lambda m, b: _value(results[b], m), metric))
        comparisons.append(compare(run, best, strongest, metric, n_boot))
    return Verdict(best, len(models), run.result.n_test, comparisons)
