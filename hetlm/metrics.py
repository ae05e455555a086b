"""Evaluation of next-session generation: the paper's 20 metrics, composites, BLEU, BERTScore,
ranking metrics and outcome AUC.

Inputs are plain lists of page-name strings per test user. A generation is what a model decoded for
the next session up to [EOS] (excluded); it may hold "[UNK]" or other stray strings, which count as
invalid pages (Val-P) and as wrong guesses in the set metrics.

Documented choices where the paper is silent:
- G (generated set) holds every distinct generated string, invalid ones included, so hallucinated
  tokens lower IoP / IoU. A (actual set) holds the distinct pages of the actual next session.
- HR, IoA, IoP, IoU are 0 where their denominator is 0 (e.g. an empty generation or session).
- Val-P and New-P count generated *tokens* (repeats count): Val-P = valid tokens / generated tokens,
  New-P = valid tokens not among the user's input pages / valid tokens. A user with an empty
  generation (resp. no valid token) has Val-P (resp. New-P) = NaN, left out of the mean: there is
  nothing to judge, and 0 or 1 would reward or punish silence.
- Variances are population variances across users (ddof = 0), as numpy's default.
- Outcome metrics treat users as a binary classification (prediction: the outcome page is in G;
  truth: it is in A). Precision with no positive prediction, recall with no actual positive, and F1
  with precision + recall = 0 are 0 (scikit-learn's zero_division=0 convention).
- Composite: by default a model beats the baseline on a metric only when strictly better (higher, or
  lower for variances); ties and NaNs count as not better. The paper's text says "greater than" too, but
  its Table 3 follows from its Table 4 only when a tie counts as a win (`ties="win"`), so both are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from rich.markup import escape
from rich.table import Table
from sacrebleu.metrics import BLEU
from sklearn.metrics import roc_auc_score

from hetlm.encoders import load_minilm, page_text
from hetlm.ingest.base import CART, PURCHASE
from hetlm.tokenizer import SPECIALS

GENERATION_MEANS = ["HR", "IoA", "IoP", "IoU", "Val-P", "New-P"]
OUTCOME_METRICS = [
    "Acc-Cart", "Acc-Purchase", "Acc-Cart/Purchase",
    "Rec-Cart", "Rec-Purchase", "Rec-Cart/Purchase",
    "Prec-Cart", "Prec-Purchase", "Prec-Cart/Purchase",
    "F1-Cart/Purchase",
]  # fmt: skip
VARIANCES = ["HR-var", "IoA-var", "IoP-var", "IoU-var"]
METRIC_GROUPS = {"generation means": GENERATION_MEANS, "outcomes": OUTCOME_METRICS, "variances": VARIANCES}
METRIC_NAMES = GENERATION_MEANS + OUTCOME_METRICS + VARIANCES
HIGHER_IS_BETTER = {name: name not in VARIANCES for name in METRIC_NAMES}

# Per-user set metrics whose spread across users is the paper's alignment measure.
_ALIGNMENT = ["HR", "IoA", "IoP", "IoU"]


# ---------------------------------------------------------------- per-user set metrics


@dataclass(frozen=True)
class UserScores:
    """Set metrics of one user's generation against the actual next session."""

    hr: float
    ioa: float
    iop: float
    iou: float
    val_p: float
    new_p: float


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def is_valid_page(token: str, vocabulary: set[str]) -> bool:
    """A real page: non-empty, not a special token, and known to the vocabulary."""
    return bool(token) and token not in SPECIALS and token in vocabulary


def set_iou(generated: Iterable, actual: Iterable) -> float:
    """IoU of two collections as sets of distinct items (what `user_scores` reports as IoU); 0 when both are empty."""
    g, a = set(generated), set(actual)
    return _ratio(len(g & a), len(g | a))


def user_scores(
    generated: Sequence[str], actual: Sequence[str], history: Iterable[str], vocabulary: set[str]
) -> UserScores:
    """HR, IoA, IoP, IoU on distinct pages; Val-P, New-P on generated tokens (NaN when undefined)."""
    g, a = set(generated), set(actual)
    hits = len(g & a)
    valid = [t for t in generated if is_valid_page(t, vocabulary)]
    seen = set(history)
    new = sum(t not in seen for t in valid)
    return UserScores(
        hr=float(hits > 0),
        ioa=_ratio(hits, len(a)),
        iop=_ratio(hits, len(g)),
        iou=_ratio(hits, len(g | a)),
        val_p=len(valid) / len(generated) if generated else math.nan,
        new_p=new / len(valid) if valid else math.nan,
    )


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class BinaryScores:
    accuracy: float
    recall: float
    precision: float
    f1: float


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> BinaryScores:
    """Accuracy, recall, precision, F1 of boolean arrays; 0 where a denominator is 0."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    tp = float(np.sum(predicted & truth))
    recall = _ratio(tp, float(truth.sum()))
    precision = _ratio(tp, float(predicted.sum()))
    return BinaryScores(
        accuracy=float(np.mean(predicted == truth)) if len(truth) else 0.0,
        recall=recall,
        precision=precision,
        f1=_ratio(2 * precision * recall, precision + recall),
    )


OUTCOME_LABELS = {"Cart": (CART,), "Purchase": (PURCHASE,), "Cart/Purchase": (CART, PURCHASE)}


def contains_outcome(sessions: Sequence[Sequence[str]], label: str = "Cart/Purchase") -> np.ndarray:
    """Per session: whether it holds the outcome page(s) of `label` (a key of OUTCOME_LABELS)."""
    pages = set(OUTCOME_LABELS[label])
    return np.array([not pages.isdisjoint(s) for s in sessions], dtype=bool)


def outcome_metrics(generated: Sequence[Sequence[str]], actual: Sequence[Sequence[str]]) -> dict[str, float]:
    """The paper's 10 outcome metrics (Table 4): outcome page(s) present in G vs present in A."""
    scores = {
        label: binary_scores(contains_outcome(generated, label), contains_outcome(actual, label))
        for label in OUTCOME_LABELS
    }
    out: dict[str, float] = {}
    for label, s in scores.items():
        out |= {f"Acc-{label}": s.accuracy, f"Rec-{label}": s.recall, f"Prec-{label}": s.precision}
    out["F1-Cart/Purchase"] = scores["Cart/Purchase"].f1
    return out


# ---------------------------------------------------------------- the 20 metrics


@dataclass
class EvalResult:
    """Per-user scores (one row per user, in input order) and the 20 paper metrics (METRIC_NAMES order)."""

    per_user: pl.DataFrame
    metrics: dict[str, float]

    @property
    def n_users(self) -> int:
        return self.per_user.height


def _nanmean(values: pl.Series) -> float:
    kept = values.drop_nans().drop_nulls()
    return float(kept.mean()) if kept.len() else math.nan


def evaluate_generations(
    generated: list[list[str]],
    actual: list[list[str]],
    history: list[list[str]],
    vocabulary: set[str],
) -> EvalResult:
    """Score each user's generation; history is the user's input pages, flattened."""
    if not len(generated) == len(actual) == len(history):
        raise ValueError(f"lengths differ: {len(generated)} generated, {len(actual)} actual, {len(history)} histories")
    rows = [user_scores(g, a, h, vocabulary) for g, a, h in zip(generated, actual, history)]
    per_user = pl.DataFrame(
        {
            "HR": [r.hr for r in rows],
            "IoA": [r.ioa for r in rows],
            "IoP": [r.iop for r in rows],
            "IoU": [r.iou for r in rows],
            "Val-P": [r.val_p for r in rows],
            "New-P": [r.new_p for r in rows],
        },
        schema={name: pl.Float64 for name in GENERATION_MEANS},
    )
    metrics = {name: _nanmean(per_user[name]) for name in GENERATION_MEANS}
    metrics |= outcome_metrics(generated, actual)
    metrics |= {f"{name}-var": float(np.var(per_user[name].to_numpy())) if rows else math.nan for name in _ALIGNMENT}
    return EvalResult(per_user=per_user, metrics={name: metrics[name] for name in METRIC_NAMES})


# ---------------------------------------------------------------- composite (paper Table 3)


def _beats(name: str, model: float, baseline: float, ties: str = "loss") -> bool:
    # NaN compares False both ways, so a NaN never beats anything.
    if ties == "win" and model == baseline:
        return True
    return model > baseline if HIGHER_IS_BETTER[name] else model < baseline


def composite_score(model: dict[str, float], baseline: dict[str, float], ties: str = "loss") -> dict[str, float]:
    """Share of metrics on which `model` beats `baseline`, per group and overall (over all 20).
    ties="loss": only strict wins count; "win": a tie counts as a win, as the paper's Table 3 implies."""
    if ties not in ("loss", "win"):
        raise ValueError(f"ties must be 'loss' or 'win', not {ties!r}")
    missing = [n for n in METRIC_NAMES if n not in model or n not in baseline]
    if missing:
        raise KeyError(f"metrics missing for the composite: {missing}")
    wins = {name: _beats(name, model[name], baseline[name], ties) for name in METRIC_NAMES}
    out = {group: sum(wins[n] for n in names) / len(names) for group, names in METRIC_GROUPS.items()}
    out["overall"] = sum(wins.values()) / len(wins)
    return out


# ---------------------------------------------------------------- BLEU and BERTScore


def bert_text(pages: Sequence[str]) -> str:
    """Pages as text for BERTScore: '_' back to spaces, pages joined by spaces.

    Spaces, not the ", " of `hetlm.encoders.session_text`: commas would match each other in every
    pair and inflate the scores.
    """
    return " ".join(page_text(p) for p in pages)


def bleu(generated: Sequence[Sequence[str]], actual: Sequence[Sequence[str]], effective_order: bool = True) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with one page = one word.

    effective_order=True ignores n-gram orders with no n-grams in the corpus, so that corpora of
    short sessions (< 4 pages) are not scored 0; False is sacrebleu's corpus default.
    """
    scorer = BLEU(tokenize="none", effective_order=effective_order)
    return float(scorer.corpus_score([" ".join(g) for g in generated], [[" ".join(a) for a in actual]]).score)


@dataclass(frozen=True)
class PairScore:
    precision: float
    recall: float
    f1: float


def _greedy_match(candidate: np.ndarray, reference: np.ndarray) -> PairScore:
    """BERTScore of one pair from L2-normalised token embeddings; 0 when either side has no token."""
    if len(candidate) == 0 or len(reference) == 0:
        return PairScore(0.0, 0.0, 0.0)
    similarity = candidate @ reference.T
    precision = float(similarity.max(axis=1).mean())
    recall = float(similarity.max(axis=0).mean())
    return PairScore(precision, recall, _ratio(2 * precision * recall, precision + recall))


def _token_embeddings(encoder, texts: list[str]) -> list[np.ndarray]:
    """Normalised token embeddings per text, without [CLS] and [SEP] (as BERTScore drops them)."""
    encoded = encoder.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
    out = []
    for tokens in encoded:
        tokens = tokens.detach().cpu().float().numpy()[1:-1]
        norms = np.linalg.norm(tokens, axis=1, keepdims=True)
        out.append(tokens / np.maximum(norms, 1e-12))
    return out


def bert_score(generated: Sequence[Sequence[str]], actual: Sequence[Sequence[str]], encoder=None) -> dict[str, float]:
    """BERTScore-style P, R, F1 (means over users) of page names as text.

    Greedy cosine matching of contextual token embeddings, no idf weighting, no baseline rescaling,
    computed with all-MiniLM-L6-v2 (default encoder: `hetlm.encoders.load_minilm()`), NOT the
    roberta-large of standard BERTScore: the numbers are not comparable with the paper's.
    A pair with an empty side scores 0.
    """
    if len(generated) != len(actual):
        raise ValueError(f"lengths differ: {len(generated)} generated, {len(actual)} actual")
    if not generated:
        return {"P": math.nan, "R": math.nan, "F1": math.nan}
    encoder = encoder if encoder is not None else load_minilm()
    candidates = _token_embeddings(encoder, [bert_text(g) for g in generated])
    references = _token_embeddings(encoder, [bert_text(a) for a in actual])
    pairs = [_greedy_match(c, r) for c, r in zip(candidates, references)]
    return {
        "P": float(np.mean([p.precision for p in pairs])),
        "R": float(np.mean([p.recall for p in pairs])),
        "F1": float(np.mean([p.f1 for p in pairs])),
    }


# ---------------------------------------------------------------- ranking and probabilities


def page_ranks(scores: np.ndarray, true_first_page_ids: np.ndarray) -> np.ndarray:
    """Each user's rank of its actual first next page under its page scores: the number of pages scored
    >= the true page (ties ranked ahead of it, so a constant scorer gets no credit)."""
    scores = np.asarray(scores, dtype=float)
    ids = np.asarray(true_first_page_ids, dtype=int)
    if scores.ndim != 2 or ids.shape != (scores.shape[0],):
        raise ValueError(f"need scores (n_users, vocab) and ids (n_users,), got {scores.shape} and {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= scores.shape[1]):
        raise ValueError("true page ids must index the score columns")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    true_scores = scores[np.arange(len(ids)), ids]
    return (scores >= true_scores[:, None]).sum(axis=1)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k with one relevant page: 1/log2(rank + 1) when rank <= k, else 0."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1), 0.0)


def ranking_metrics(
    scores: np.ndarray, true_first_page_ids: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR of the actual first next page under per-user page scores (ranks as
    `page_ranks` counts them). Users without a first page must be left out by the caller.
    """
    return rank_metrics(page_ranks(scores, true_first_page_ids), ks)


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR of per-user ranks of the one relevant page (1 = first)."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"Recall@{k}"] = float(np.mean(ranks <= k))
        out[f"NDCG@{k}"] = float(np.mean(ndcg_at(ranks, k)))
    out["MRR"] = float(np.mean(1.0 / ranks))
    return out


def outcome_auc(prob: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of outcome probabilities; NaN when the truth has one class only."""
    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, np.asarray(prob, dtype=float)))


def f1_counts(predicted: np.ndarray, truth: np.ndarray, axis: int = -1) -> np.ndarray:
    """F1 of boolean arrays along `axis`: 2 TP / (predicted positives + actual positives), 0 when both are 0
    (equal to `binary_scores(...).f1`; vectorised for bootstrap draws)."""
    tp = np.sum(predicted & truth, axis=axis)
    positives = np.sum(predicted, axis=axis) + np.sum(truth, axis=axis)
    return np.where(positives > 0, 2 * tp / np.maximum(positives, 1), 0.0)


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, statistic=None, n_boot: int = 2000, seed: int = 0,
                     chunk: int = 200) -> dict[str, float]:
    """The difference statistic(ours) - statistic(theirs) over users (rows), and its paired bootstrap 95% interval:
    users are drawn with replacement, the same users for both. `statistic` maps arrays of shape (draws, users, ...)
    to (draws,); default the mean over users. Draws go `chunk` at a time so memory stays draws x users small."""
    statistic = statistic or (lambda x: x.mean(axis=1))
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if len(ours) != len(theirs) or not len(ours):
        raise ValueError(f"need the same users on both sides, got {len(ours)} and {len(theirs)}")
    rng, gaps = np.random.default_rng(seed), []
    for start in range(0, n_boot, chunk):
        draws = rng.integers(0, len(ours), (min(chunk, n_boot - start), len(ours)))
        gaps.append(statistic(ours[draws]) - statistic(theirs[draws]))
    gaps = np.concatenate(gaps)
    gap = float(statistic(ours[None])[0] - statistic(theirs[None])[0])
    return {"gap": gap, "lo": float(np.quantile(gaps, 0.025)), "hi": float(np.quantile(gaps, 0.975))}


def effective_k(sizes: Iterable[float]) -> float:
    """exp(entropy) of the cluster shares: K for K equal clusters, 1 when one cluster holds every user, 1.5 for
    sizes (1903, 34, 34, 34, 35, 35); NaN when there is no user."""
    sizes = np.asarray([s for s in sizes if s > 0], dtype=float)
    if not sizes.size:
        return math.nan
    share = sizes / sizes.sum()
    return float(np.exp(-(share * np.log(share)).sum()))


# ---------------------------------------------------------------- tables


def _columns(rows: dict[str, dict[str, float]], metrics: Sequence[str] | None) -> list[str]:
    """The asked metrics, or every metric of the rows in order of first appearance."""
    if metrics is not None:
        return list(metrics)
    return list(dict.fromkeys(name for row in rows.values() for name in row))


def _cell(row: dict[str, float], name: str) -> str:
    return f"{row[name]:.3f}" if name in row else "–"


def format_table(
    rows: dict[str, dict[str, float]], metrics: Sequence[str] | None = None, title: str | None = None
) -> Table:
    """A rich table: one row per model, one column per metric, 3 decimals."""
    columns = _columns(rows, metrics)
    table = Table(title=title)
    table.add_column("model")
    for name in columns:
        table.add_column(name, justify="right")
    for model, row in rows.items():  # escaped: rich would read '[routed by likelihood]' as markup and drop it
        table.add_row(escape(model), *(_cell(row, name) for name in columns))
    return table


def format_transposed(rows: dict[str, dict[str, float]], width: int = 100) -> list[Table]:
    """The same numbers with one row per metric and one column per model (rows), in as many tables as it takes
    for each to fit `width` terminal columns: 20+ metric columns side by side do not fit a terminal."""
    metrics = _columns(rows, None)
    label = max(len(m) for m in metrics) + 4 if metrics else 10
    per_table = max(1, (width - label) // 11)  # a model column: up to 8 characters and borders
    models = list(rows)
    tables = []
    for start in range(0, len(models), per_table):
        table = Table()
        table.add_column("metric")
        for model in models[start:start + per_table]:
            table.add_column(model, justify="right")
        for name in metrics:
            table.add_row(name, *(_cell(rows[model], name) for model in models[start:start + per_table]))
        tables.append(table)
    return tables


def markdown_table(rows: dict[str, dict[str, float]], metrics: Sequence[str] | None = None) -> str:
    """The same table in Markdown."""
    columns = _columns(rows, metrics)
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        *("| " + " | ".join([model, *(_cell(row, name) for name in columns)]) + " |" for model, row in rows.items()),
    ]
    return "\n".join(lines) + "\n"
