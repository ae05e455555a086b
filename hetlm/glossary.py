"""What every metric, column and row name of the results means: one list of terms, shown in the report's
"What the metrics mean" section and written out as docs/metrics.md (`python -m hetlm.glossary > docs/metrics.md`;
a test keeps the file equal to `markdown()`). The definitions follow hetlm.metrics, hetlm.evaluate and
hetlm.outcomes; every column a results table shows must be named by a term here (tested)."""

from __future__ import annotations

from dataclasses import dataclass

from . import metrics as M

OUTCOMES = ("Cart", "Purchase", "Cart/Purchase")
RANK_KS = (1, 5, 10)


@dataclass(frozen=True)
class Term:
    label: str                  # as shown in bold
    meaning: str
    names: tuple[str, ...] = ()  # the column names it defines (default: the label)
    better: str = ""            # "higher", "lower" or "" (neither)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.names or (self.label,)


@dataclass(frozen=True)
class Group:
    title: str
    intro: str
    terms: tuple[Term, ...]


GROUPS = (
    Group("Page generation (per test user, then the mean over test users)",
          "Each model generates every test user's next session from the user's past sessions, greedily (the most "
          "likely page at each step) up to the end-of-session token, or as a set (the `· set decoder` rows). "
          "G is the set of distinct generated strings (stray, invalid ones included), A the set of distinct pages "
          "of the user's actual next session.", (
              Term("HR", "Hit rate: 1 when G and A share at least one page, else 0; its mean is the share of users "
                         "with at least one right page.", better="higher"),
              Term("IoA", "Intersection over actual, |G ∩ A| / |A|: the share of the actual pages that were "
                          "generated (a recall).", better="higher"),
              Term("IoP", "Intersection over prediction, |G ∩ A| / |G|: the share of the generated pages that "
                          "occur in the actual session (a precision); 0 for an empty generation.", better="higher"),
              Term("IoU", "Intersection over union, |G ∩ A| / |G ∪ A| (Jaccard): 1 only when the generated set is "
                          "the actual one. The headline metric: it punishes both missed and extra pages.",
                   better="higher"),
              Term("Val-P", "Valid pages: the share of generated tokens (repeats counted) that are real pages of "
                            "the vocabulary, not [UNK], a special token or a stray string. Users with an empty "
                            "generation are left out of the mean (nan when every generation is empty).",
                   better="higher"),
              Term("New-P", "New pages: the share of the valid generated tokens that are not among the user's past "
                            "pages (exploration rather than repetition). Users with no valid token are left out. "
                            "Counted as higher-is-better in the composites, as in the paper.", better="higher"),
          )),
    Group("Spread across users",
          "Population variance (ddof 0) across the test users of a per-user metric: lower means the model serves "
          "users more evenly.", (
              Term("HR-var, IoA-var, IoP-var, IoU-var", "Variance of HR, IoA, IoP and IoU across the test users.",
                   tuple(M.VARIANCES), "lower"),
          )),
    Group("Outcomes from the generated session",
          "Users as a binary classification: the prediction is that the outcome page (Cart, Purchase, or either "
          "for Cart/Purchase) occurs in the generated session G, the truth that it occurs in the actual one A. A "
          "ratio with nothing to count (no positive prediction, no actual positive) is 0.", (
              Term("Acc-Cart, Acc-Purchase, Acc-Cart/Purchase", "Accuracy: the share of users where prediction "
                   "and truth agree (high even for a model that never predicts the outcome, when it is rare).",
                   tuple(f"Acc-{o}" for o in OUTCOMES), "higher"),
              Term("Rec-Cart, Rec-Purchase, Rec-Cart/Purchase", "Recall: of the users whose next session holds the "
                   "outcome, the share whose generation holds it.", tuple(f"Rec-{o}" for o in OUTCOMES), "higher"),
              Term("Prec-Cart, Prec-Purchase, Prec-Cart/Purchase", "Precision: of the users whose generation holds "
                   "the outcome, the share whose next session holds it.", tuple(f"Prec-{o}" for o in OUTCOMES),
                   "higher"),
              Term("F1-Cart/Purchase", "F1 of Cart-or-Purchase: the harmonic mean of its precision and recall, "
                   "2 TP / (predicted positives + actual positives). The headline outcome metric.", better="higher"),
          )),
    Group("Composite scores against the reference model",
          "The share of the 20 metrics above (6 page-generation means, 10 outcome metrics, 4 variances) on which a "
          "model is better than the run's reference model (the larger single LM when the run trains one, else the "
          "small single LM): higher for means and outcomes, lower for variances. 1 = better on every metric.", (
              Term("generation means", "The share over HR, IoA, IoP, IoU, Val-P and New-P.", better="higher"),
              Term("outcomes", "The share over the 10 outcome metrics.", better="higher"),
              Term("variances", "The share over the 4 variances (lower wins).", better="higher"),
              Term("overall", "The share over all 20.", better="higher"),
              Term("strict / ties as wins", "Strict: a tie (or nan) is not a win. Ties as wins: a tie counts as a "
                   "win, the only reading under which the paper's composite table follows from its outcome table; "
                   "both are shown.", names=()),
          )),
    Group("Sequence similarity", "", (
        Term("BLEU", "Corpus BLEU (sacrebleu, 0-100) of the generated page sequence against the actual one, one "
                     "page = one word; n-gram orders absent from the corpus are ignored (effective order), so short "
                     "sessions are not all 0.", better="higher"),
        Term("BERTScore-P, BERTScore-R, BERTScore-F1", "Page names read as text and matched token by token by "
             "cosine similarity of all-MiniLM-L6-v2 token embeddings (greedy matching, no idf weighting, no "
             "rescaling). P: how well each generated token is matched in the actual session; R: the reverse; F1: "
             "their harmonic mean. Not comparable with standard BERTScore (roberta-large).",
             ("BERTScore-P", "BERTScore-R", "BERTScore-F1"), "higher"),
    )),
    Group("Ranking of the next session's first page",
          "Every page of the vocabulary ranked as the first page of the user's next session: LMs by the "
          "probability of starting the session with it, set decoders and baselines by their own scores. rank = the "
          "number of pages scored at least as high as the actual first page (ties count against the model). Users "
          "whose first page is not in the vocabulary are left out.", (
              Term("Recall@k", "The share of users whose actual first page is among the k top-ranked pages "
                               f"(k = {', '.join(map(str, RANK_KS))}).",
                   tuple(f"Recall@{k}" for k in RANK_KS), "higher"),
              Term("NDCG@k", "Normalised discounted cumulative gain with one relevant page: the mean of "
                             "1 / log2(rank + 1) where rank <= k, else 0 (1 = always ranked first).",
                   tuple(f"NDCG@{k}" for k in RANK_KS), "higher"),
              Term("MRR", "Mean reciprocal rank, the mean of 1 / rank.", better="higher"),
              Term("AUC-Cart(first page), AUC-Purchase(first page)", "ROC AUC of P(the next session starts with "
                   "Cart / Purchase) as a score of whether the actual next session holds it: the chance that a "
                   "user who carts (purchases) is scored above one who does not; 0.5 = chance.",
                   ("AUC-Cart(first page)", "AUC-Purchase(first page)"), "higher"),
          )),
    Group("Outcome probabilities",
          "P(Cart) and P(Purchase) in the next session: with `outcome_samples` > 0 the share of that many sampled "
          "next sessions per user that hold the page (Monte Carlo), else P(the session's first page is Cart / "
          "Purchase). The stacked rows feed an LM's probability and the history features to one logistic "
          "regression fitted on the validation users.", (
              Term("AUC-cart, AUC-purchase", "ROC AUC of the probability against whether the actual next session "
                   "holds the outcome; 0.5 = chance, nan when every test user has the same outcome.",
                   ("AUC-cart", "AUC-purchase"), "higher"),
              Term("Brier-cart, Brier-purchase", "Brier score: the mean squared difference between the probability "
                   "and the 0/1 outcome.", ("Brier-cart", "Brier-purchase"), "lower"),
              Term("Brier-… (base rate)", "The Brier score of predicting the test users' observed rate for everyone: "
                   "a probability is only useful below it.", ("Brier-cart (base rate)", "Brier-purchase (base rate)"),
                   "lower"),
              Term("Brier-… (calibrated on val)", "The Brier score after Platt scaling fitted on the validation "
                   "users (what `hetlm score` reports as `p_cart_calibrated`, `p_purchase_calibrated`).",
                   ("Brier-cart (calibrated on val)", "Brier-purchase (calibrated on val)"), "lower"),
          )),
    Group("Clusters", "Clusterwise models (k-means, HeTLM) route each user to one of K LMs.", (
        Term("K at start", "Clusters the model starts with: k-means' K, HeTLM's initial K (its k-means start)."),
        Term("K kept", "Clusters that still hold training samples at the end; HeTLM retires the ones left empty."),
        Term("effective K", "exp(entropy) of the shares of the samples per cluster, exp(-Σ p_k log p_k): K for K "
                            "equal clusters, 1 when one cluster holds every sample (6 clusters holding 1,903, 34, 34, "
                            "34, 35 and 35 samples give 1.5). Shown for the training samples (train) and for the "
                            "test users as routed (test).",
             ("effective K (train)", "effective K (test)")),
        Term("N", "In a row or bar label: the test users routed to that cluster (or evaluated in all)."),
    )),
    Group("Cost", "", (
        Term("params (M)", "Parameters in millions (of every cluster's LM for a clusterwise model)."),
        Term("inference s (test set)", "Wall seconds to route and generate the whole test set."),
        Term("seconds", "Wall seconds of each stage of the run."),
    )),
    Group("Rows", "", (
        Term("MODEL / cluster k (N=n)", "The model on the n test users routed to cluster k; `Combined`: on every "
             "test user.", names=()),
        Term("MODEL · set decoder", "The same LM, its next session chosen as the set of pages with the highest "
             "expected IoU (fitted on the validation users) instead of greedy generation.", names=()),
        Term("MODEL [routed by r]", "A clusterwise model with users routed another way: selector (HeTLM's "
             "actor), centroid (nearest k-means centroid) or likelihood (the cluster LM that best predicts the "
             "user's own history).", names=()),
        Term("baseline: …", "Models without a neural network: most_popular (the same most frequent pages for "
             "everyone), last_session (the user's last session again), markov (a first-order page chain from the "
             "session start), markov_last_page (from the user's last page), recency_top_m (the user's m pages "
             "with the highest recency-weighted count); for outcomes, a logistic regression on the user's history "
             "counts.", names=()),
        Term("larger single", "One LM with `larger.factor` times the small LM's parameters, by default as many as "
             "the clusterwise models have at their start (the fair comparison for K small LMs).", names=()),
    )),
    Group("Verdict",
          "The report's first box: the best model (the highest test IoU of all rows but the baselines) against, on "
          "each headline metric (IoU, HR, NDCG@10, Recall@10, F1-Cart/Purchase), the strongest baseline: the one "
          "highest on that metric.", (
        Term("difference (95% interval)", "The best model's value minus the strongest baseline's (the baseline "
             "highest on that metric), and its paired bootstrap 95% interval: 2,000 times, the test users are "
             "drawn with replacement and the metric of both models is computed on the same draw; the interval "
             "holds the middle 95% of the differences.", names=()),
        Term("better / no clear difference / worse", "Better: the whole interval lies above 0; worse: below 0; "
             "otherwise no clear difference. Only 'better' beats the baseline.", names=()),
    )),
)

TERMS = tuple(term for group in GROUPS for term in group.terms)


def term_for(column: str) -> Term | None:
    """The term that defines a table column, if any."""
    return next((t for t in TERMS if column in t.columns), None)


def _better(term: Term) -> str:
    return f" ({term.better} is better)" if term.better else ""


def markdown() -> str:
    """docs/metrics.md."""
    parts = ["# What the metrics mean\n",
             "Every number `hetlm experiment` reports (tables.md, results.json, report.html) and `hetlm evaluate` "
             "prints, defined. Written by `python -m hetlm.glossary > docs/metrics.md` from `hetlm/glossary.py`, "
             "which the report's \"What the metrics mean\" section shows too. How the models and the set decoder "
             "work: [method.md](method.md).\n"]
    for group in GROUPS:
        parts.append(f"## {group.title}\n")
        if group.intro:
            parts.append(group.intro + "\n")
        parts.append("\n".join(f"- **{t.label}**{_better(t)}: {t.meaning}" for t in group.terms) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
