"""The paper's Tables 2-6 and 17 (and two beyond it) from a finished run's results: rows for tables.md and
for the HTML report."""

from __future__ import annotations

from . import metrics as M
from .runs import RunResult

Rows = dict[str, dict[str, float]]

BERTSCORE_NOTE = ("BERTScore is computed with all-MiniLM-L6-v2 token embeddings (not roberta-large): not comparable "
                  "with the paper's BERTScore values.")


def _rows(run: RunResult, metric_names: list[str]) -> Rows:
    """One row per model; a clusterwise model gives one row per cluster and its Combined row."""
    out = {}
    for name, r in run.results.items():
        if r.kind == "clusterwise":
            for k, m in sorted(r.clusters.items()):
                out[f"{name} / cluster {k} (N={m['n']})"] = {n: m[n] for n in metric_names}
            out[f"{name} / Combined (N={r.combined['n']})"] = {n: r.combined[n] for n in metric_names}
        else:
            out[name] = {n: r.combined[n] for n in metric_names}
    return out


def paper_tables(run: RunResult) -> dict[str, Rows]:
    """Title -> rows (model -> metrics)."""
    results, ref = run.results, run.reference
    bleu_bert = {n: {k: v for k, v in r.extra.items() if k.startswith(("BLEU", "BERTScore"))} for n, r in results.items()}
    ranking = {n: {k: v for k, v in r.extra.items() if not k.startswith(("BLEU", "BERTScore"))}
               for n, r in results.items()}
    n_draws = run.outcome_samples
    outcome_estimator = f"Monte Carlo, {n_draws} sampled sessions per user" if n_draws else "P(first page = Cart / Purchase)"
    outcomes = {n: r.outcomes for n, r in results.items() if r.outcomes is not None} | run.outcome_baselines
    timing = {n: {"params (M)": r.params / 1e6, "inference s (test set)": r.inference_seconds}
              for n, r in results.items() if r.inference_seconds is not None}
    return {
        "Table 2: page generation (higher is better)": _rows(run, M.GENERATION_MEANS),
        f"Table 3: composite vs {ref} (strict: share of metrics where the model is better; ties are not wins)":
            {n: r.composite for n, r in results.items() if r.composite is not None},
        f"Table 3 as the paper counts: composite vs {ref} (ties count as wins)":
            {n: r.composite_ties_win for n, r in results.items() if r.composite_ties_win is not None},
        "Table 4: outcome prediction (higher is better)": _rows(run, M.OUTCOME_METRICS),
        "Table 5: variance of page generation across users (lower is better)": _rows(run, M.VARIANCES),
        "Table 6: BLEU and BERTScore": bleu_bert,
        "Beyond the paper: ranking of the first next page, outcome AUC": ranking,
        f"Beyond the paper: P(Cart) and P(Purchase) in the next session ({outcome_estimator})": outcomes,
        "Table 17: inference time of the whole test set": timing,
        "Stage wall times (s)": {"seconds": run.seconds},
    }


def tables_markdown(run: RunResult) -> str:
    """The paper's tables of a finished run, as Markdown."""
    data = run.data
    parts = [
        f"# {run.name}: results\n",
        f"Data: {data['source']} `{data['path']}`: {data['users']} users, {data['pages']} pages, samples "
        f"{data['samples']}. Test users: {run.n_test}. Reference for composites: **{run.reference}**.\n",
        BERTSCORE_NOTE + "\n",
    ]
    for title, rows in paper_tables(run).items():
        parts += [f"## {title}\n", M.markdown_table(rows)]
    return "\n".join(parts)
