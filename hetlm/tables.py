"""The results tables of a finished run (the paper's Tables 2-6 and 17, and tables beyond it), with descriptive
titles: rows for tables.md and for the HTML report. What each column means: hetlm.glossary."""

from __future__ import annotations

import re

from . import metrics as M
from .runs import ModelResult, RunResult

Rows = dict[str, dict[str, float]]

BERTSCORE_NOTE = ("BERTScore is computed with all-MiniLM-L6-v2 token embeddings (not roberta-large): not comparable "
                  "with the paper's BERTScore values.")
CLUSTER_ROW = " / cluster "   # a clusterwise model's row of one cluster: '<model> / cluster <k> (N=<n>)'


def _trained(run: RunResult, name: str) -> tuple[str, ModelResult] | None:
    """The clusterwise model a row's numbers come from (a set-decoder row's LM, a routed row's model), or None."""
    base = name.removesuffix(" · set decoder")
    result = run.results.get(base)
    if result is None or result.kind != "clusterwise" or not result.train_cluster_sizes:
        return None
    return re.sub(r" \[routed by \w+\]$", "", base), result


def cluster_counts(run: RunResult, name: str) -> dict[str, float] | None:
    """K at start, K kept and effective K (train samples, and the row's test users as routed) of a clusterwise
    model's row; None for other rows."""
    found = _trained(run, name)
    if found is None:
        return None
    trained, result = found
    start = run.histories.get(trained, {}).get("cluster_sizes") or [{"sizes": result.train_cluster_sizes}]
    routed = run.results[name].clusters or result.clusters
    return {"K at start": len(start[0]["sizes"]), "K kept": sum(v > 0 for v in result.train_cluster_sizes.values()),
            "effective K (train)": M.effective_k(result.train_cluster_sizes.values()),
            "effective K (test)": M.effective_k(m["n"] for m in routed.values())}


def cluster_label(run: RunResult, name: str) -> str:
    """'K 6 → 3 kept, effective 1.5' for a clusterwise model's row ('' for other rows)."""
    counts = cluster_counts(run, name)
    if counts is None:
        return ""
    kept = f" → {counts['K kept']} kept" if counts["K kept"] != counts["K at start"] else ""
    return f"K {counts['K at start']}{kept}, effective {counts['effective K (train)']:.1f}"


def _rows(run: RunResult, metric_names: list[str]) -> Rows:
    """One row per model; a clusterwise model gives one row per cluster and its Combined row (labelled with its
    effective K)."""
    out = {}
    for name, r in run.results.items():
        if r.kind == "clusterwise":
            for k, m in sorted(r.clusters.items()):
                out[f"{name}{CLUSTER_ROW}{k} (N={m['n']})"] = {n: m[n] for n in metric_names}
            out[f"{name} / Combined (N={r.combined['n']}, {cluster_label(run, name)})"] = {
                n: r.combined[n] for n in metric_names}
        else:
            out[name] = {n: r.combined[n] for n in metric_names}
    return out


def paper_tables(run: RunResult) -> dict[str, Rows]:
    """Title -> rows (model -> metrics): every table of a run."""
    results, ref = run.results, run.reference
    bleu_bert = {n: {k: v for k, v in r.extra.items() if k.startswith(("BLEU", "BERTScore"))} for n, r in results.items()}
    ranking = {n: {k: v for k, v in r.extra.items() if not k.startswith(("BLEU", "BERTScore"))}
               for n, r in results.items()}
    n_draws = run.outcome_samples
    outcome_estimator = f"Monte Carlo, {n_draws} sampled sessions per user" if n_draws else "P(first page = Cart / Purchase)"
    outcomes = {n: r.outcomes for n, r in results.items() if r.outcomes is not None} | run.outcome_baselines
    timing = {n: {"params (M)": r.params / 1e6, "inference s (test set)": r.inference_seconds}
              for n, r in results.items() if r.inference_seconds is not None}
    clusters = {n: c for n in results if (c := cluster_counts(run, n)) is not None and results[n].kind == "clusterwise"}
    return {
        "Page generation: the generated next session against the actual one (paper's Table 2; higher is better)":
            _rows(run, M.GENERATION_MEANS),
        f"Composite score against {ref}: share of the 20 metrics where the model is better, ties are not wins "
        f"(paper's Table 3, strict)": {n: r.composite for n, r in results.items() if r.composite is not None},
        f"Composite score against {ref}, ties counted as wins (paper's Table 3 as the paper counts)":
            {n: r.composite_ties_win for n, r in results.items() if r.composite_ties_win is not None},
        "Outcomes from the generated session: Cart and Purchase as a classification of users (paper's Table 4; "
        "higher is better)": _rows(run, M.OUTCOME_METRICS),
        "Spread of page generation across users (paper's Table 5; lower is better)": _rows(run, M.VARIANCES),
        "Sequence similarity: BLEU and BERTScore (paper's Table 6)": bleu_bert,
        "Ranking of the next session's first page, and outcome AUC of its probability (beyond the paper)": ranking,
        f"P(Cart) and P(Purchase) in the next session ({outcome_estimator}; beyond the paper)": outcomes,
        "Clusters: K at start, kept, and effective K": clusters,
        "Model size and inference time of the whole test set (paper's Table 17)": timing,
        "Stage wall times (s)": {"seconds": run.seconds},
    }


def tables_markdown(run: RunResult) -> str:
    """Every table of a finished run, as Markdown."""
    data = run.data
    parts = [
        f"# {run.name}: results\n",
        f"Data: {data['source']} `{data['path']}`: {data['users']} users, {data['pages']} pages, samples "
        f"{data['samples']}. Test users: {run.n_test}. Reference for composites: **{run.reference}**.\n",
        BERTSCORE_NOTE + " What each column means: docs/metrics.md.\n",
    ]
    for title, rows in paper_tables(run).items():
        parts += [f"## {title}\n", M.markdown_table(rows)]
    return "\n".join(parts)
