"""The experiment report: one self-contained HTML page of a finished run folder.

`write_report(RUN)` reads what `run_experiment` left in the folder (results.json, config.json,
prepared/, generations/, outcomes/, clusters/, embeddings.npz) and writes RUN/report.html, with every
figure (hetlm.figures) embedded as a base64 PNG and saved as RUN/report/figures/<name>.png. The page loads nothing
(no fonts, scripts or links; inline CSS only), so the one file opens offline. Page names come from
user logs and are always HTML-escaped. A figure whose data an older run lacks becomes a visible note.

It opens with the verdict (hetlm.verdict) on the first screen; then the tables (hetlm.tables; the less used ones,
and rows of single clusters, folded in <details>), figures and example users; folded at the end, what the metrics
mean (hetlm.glossary), the run settings, the data summary and the environment.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import glossary
from .figures import FinishedRun, ReportFigure, render_figures
from .metrics import OUTCOME_METRICS
from .outputs import write_atomically
from .tables import BERTSCORE_NOTE, CLUSTER_ROW, cluster_label, paper_tables
from .verdict import BOOTSTRAP, Verdict, run_verdict


@dataclass(frozen=True)
class Report:
    html: Path
    figures: list[Path]        # the PNG files written
    notes: list[str]           # what was skipped, and why
    verdict: Verdict | None    # the best model against the strongest baseline (None: no model or no baseline)


def _esc(value) -> str:
    return html.escape(str(value))


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _esc(value)


def _outcome_groups(columns: list[str]) -> dict[str, list[str]] | None:
    """The outcome metrics by outcome (Cart: Acc-Cart, Rec-Cart, Prec-Cart; ...); None for other columns."""
    if set(columns) != set(OUTCOME_METRICS):
        return None
    groups: dict[str, list[str]] = {}
    for c in columns:
        groups.setdefault(c.split("-", 1)[1], []).append(c)
    return groups


def _table(rows: dict[str, dict], first: str) -> str:
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    groups = _outcome_groups(columns)
    if groups is None:
        head = "<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in [first, *columns]) + "</tr>"
    else:  # a second header row: the table is otherwise as wide as the page
        columns = [c for cs in groups.values() for c in cs]
        head = (f"<tr><th rowspan='2'>{_esc(first)}</th>"
                + "".join(f"<th colspan='{len(cs)}' class='group'>{_esc(g)}</th>" for g, cs in groups.items())
                + "</tr><tr>" + "".join(f"<th title='{_esc(c)}'>{_esc(c.split('-', 1)[0])}</th>" for c in columns)
                + "</tr>")
    body = "".join(f"<tr{' class=baseline' if name.startswith('baseline') else ''}><th scope='row'>{_esc(name)}</th>"
                   + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for name, row in rows.items())
    return f"<div class='scroll'><table><thead>{head}</thead><tbody>{body}</tbody></table></div>"


def html_table(rows: dict[str, dict], first: str = "model") -> str:
    """One row per model (or item), one column per key of the rows (order of first appearance), in a box that
    scrolls sideways when wider than the page; a table of one row is shown as a column, which reads better than a
    wide row. Rows of single clusters go to a folded table below, the Combined rows stay."""
    if len(rows) == 1:
        (name, row), = rows.items()
        rows, first = {key: {name: value} for key, value in row.items()}, ""
    clusters = {n: r for n, r in rows.items() if CLUSTER_ROW in n}
    shown = _table({n: r for n, r in rows.items() if n not in clusters}, first)
    if not clusters:
        return shown
    return shown + (f"<details class='clusters'><summary>Per-cluster rows ({len(clusters)})</summary>"
                    f"{_table(clusters, first)}</details>")


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in d.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def settings_table(d: dict) -> str:
    """Key-value rows of a nested dict (keys joined by dots), values as in JSON."""
    rows = "".join(f"<tr><th scope='row'>{_esc(k)}</th><td class='text'>{_esc(v if isinstance(v, str) else json.dumps(v))}"
                   f"</td></tr>" for k, v in _flatten(d))
    return f"<div class='scroll'><table class='settings'><tbody>{rows}</tbody></table></div>"


PATH_KEYS = {"path", "cache_dir", "model_name_or_path", "init_from"}


def without_local_paths(d: dict, run_dir: Path) -> dict:
    """`d` with every absolute path (the values of PATH_KEYS, at any depth) shown relative to the run folder
    when inside it, else by its name alone: a shared report does not disclose the local file system."""
    def shown(key, value):
        if isinstance(value, dict):
            return without_local_paths(value, run_dir)
        if key in PATH_KEYS and isinstance(value, str) and Path(value).is_absolute():
            path = Path(value)
            return str(path.relative_to(run_dir.resolve())) if path.is_relative_to(run_dir.resolve()) else path.name
        return value
    return {k: shown(k, v) for k, v in d.items()}


def _pages(pages: list[str], actual: set[str]) -> str:
    chips = "".join(f"<span class='page{' hit' if p in actual else ''}'>{_esc(p)}</span>" for p in pages)
    return chips or "<span class='empty'>(empty)</span>"


def pick_examples(run: FinishedRun, n: int = 4, max_pages: int = 15) -> list[int]:
    """Test rows to show: half with the most models overlapping the actual session, half at random (seed 0)."""
    some = next(iter(run.generations.values()))
    lengths = some["target"].list.len().to_numpy()
    hits = sum(df["generated"].list.set_intersection(df["target"]).list.len().to_numpy() > 0
               for df in run.generations.values())
    candidates = np.flatnonzero((lengths >= 2) & (lengths <= max_pages))
    best = candidates[np.argsort(-hits[candidates], kind="stable")][: n // 2]
    rest = np.setdiff1d(candidates, best)
    drawn = np.random.default_rng(0).choice(rest, size=min(n - len(best), len(rest)), replace=False)
    return [int(i) for i in [*best, *sorted(drawn)]]


def example_users(run: FinishedRun, n: int = 4, shown_sessions: int = 3) -> str:
    if not run.generations:
        return "<p class='note'>Not shown: no generations/*.parquet in the run folder.</p>"
    some = next(iter(run.generations.values()))
    blocks = []
    for i in pick_examples(run, n):
        row = some.row(i, named=True)
        actual = set(row["target"])
        history = row["history"]
        lines = [f"<tr><th>input session {j - len(history)}</th><td>{_pages(s, actual)}</td></tr>"
                 for j, s in enumerate(history) if j >= len(history) - shown_sessions]
        if len(history) > shown_sessions:
            hidden = len(history) - shown_sessions
            lines.insert(0, f"<tr><th></th><td class='muted'>{hidden} earlier session{'s' * (hidden > 1)} not "
                            f"shown</td></tr>")
        lines.append(f"<tr class='actual'><th>actual next session</th><td>{_pages(row['target'], set())}</td></tr>")
        for name, df in run.generations.items():
            generated = df.row(i, named=True)
            where = f" (cluster {generated['cluster']})" if run.result.results[name].kind == "clusterwise" else ""
            lines.append(f"<tr><th>{_esc(name)}{where}</th><td>{_pages(generated['generated'], actual)}</td></tr>")
        blocks.append(f"<details class='example'{' open' if not blocks else ''}><summary><h3>Test user "
                      f"{_esc(row['user'])}</h3></summary><table class='example'>{''.join(lines)}</table></details>")
    return "".join(blocks)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; background: #fff;
       margin: 0 auto; max-width: 1120px; padding: 24px 32px 64px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 40px; border-bottom: 2px solid #ddd;
padding-bottom: 4px; } h3 { font-size: 16px; margin: 24px 0 6px; }
.sub { color: #666; margin-top: 0; } nav ol { columns: 2; font-size: 14px; } a { color: #1f5fa8; }
figure { margin: 16px 0 28px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13.5px; color: #444; margin-top: 6px; } figcaption b { color: #222; }
.note { color: #8a5a00; background: #fff6e0; border-left: 4px solid #e0a800; padding: 6px 10px; font-size: 14px; }
.scroll { overflow-x: auto; margin: 8px 0 20px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }
thead th { background: #f3f5f8; border-bottom: 2px solid #ccd; } tbody th { text-align: left; font-weight: 500; }
tbody tr:hover { background: #fafbfd; } td.text { text-align: left; white-space: normal; word-break: break-all; }
table.example { width: 100%; } table.example th { width: 230px; text-align: left; vertical-align: top;
font-weight: 500; white-space: normal; } table.example td { text-align: left; white-space: normal; }
table.example tr.actual { background: #f1f7ee; }
.page { display: inline-block; margin: 1px 3px 1px 0; padding: 0 6px; border-radius: 3px; background: #eef0f3;
        font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.page.hit { background: #ffd966; font-weight: 600; } .empty, .muted { color: #888; font-style: italic; }
thead th:first-child { text-align: left; }
thead th { white-space: normal; vertical-align: bottom; } thead th.text { text-align: left; } thead th.group { text-align: center; }
tbody th { white-space: normal; min-width: 14em; max-width: 26em; }
.scroll { max-width: 100%; } .scroll > table tbody th, .scroll > table thead tr:first-child th:first-child {
  position: sticky; left: 0; background: #fff; z-index: 1; }
.scroll > table thead tr:first-child th:first-child { background: #f3f5f8; }
tr.baseline, .scroll > table tr.baseline th { background: #f7f7f2; }
details > summary { cursor: pointer; color: #1f5fa8; font-size: 14px; }
details.clusters { margin: -12px 0 20px; }
details > summary h3 { display: inline-block; margin: 14px 0 6px; color: #222; }
details.section > summary h2 { display: inline-block; border: 0; margin: 28px 0 4px; color: #222; }
details.section { border-bottom: 2px solid #ddd; }
dl { margin: 4px 0 12px; font-size: 14px; } dt { font-weight: 600; margin-top: 6px; } dd { margin: 0 0 0 18px; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; background: #f3f5f8; padding: 0 3px; }
.verdict { background: #f6f9fc; border: 1px solid #cfdbe8; border-radius: 6px; padding: 4px 18px 8px;
           margin: 14px 0 18px; }
.verdict h2 { margin-top: 10px; border: 0; } .verdict .best { font-size: 16px; margin: 4px 0; }
.verdict .summary { font-size: 15px; margin: 4px 0 8px; } .verdict table { background: #fff; font-size: 14px; }
.verdict .fine, .fine { font-size: 12.5px; color: #555; margin: 4px 0; }
td.outcome { font-weight: 600; } td.better { color: #17692b; } td.worse, td.behind { color: #b02a1e; }
td.no-clear-difference, td.ahead { color: #7a5c00; }
"""


def _figure_html(fig: ReportFigure) -> str:
    if fig.png is None:
        return f"<h3 id='{fig.name}'>{_esc(fig.title)}</h3><p class='note'>{_esc(fig.note)}</p>"
    data = base64.b64encode(fig.png).decode()
    return (f"<figure id='{fig.name}'><img src='data:image/png;base64,{data}' alt='{_esc(fig.title)}'>"
            f"<figcaption><b>{_esc(fig.title)}.</b> {_esc(fig.caption)}</figcaption></figure>")


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def verdict_html(run: FinishedRun, verdict: Verdict | None) -> str:
    """The box at the top: the best model, and each headline metric against the strongest baseline."""
    if verdict is None:
        return ("<section id='verdict' class='verdict'><h2>Verdict</h2><p class='note'>No verdict: the run has no "
                "baseline or no model besides the baselines.</p></section>")
    rows = []
    for c in verdict.comparisons:
        interval = f" [{_signed(c.lo)}, {_signed(c.hi)}]" if c.lo is not None else ""
        rows.append(f"<tr><th scope='row'>{_esc(c.metric)}</th><td>{c.value:.3f}</td>"
                    f"<td class='text'>{_esc(c.baseline.removeprefix('baseline: '))} {c.baseline_value:.3f}</td>"
                    f"<td>{_signed(c.gap)}{interval}</td><td class='text outcome {c.outcome.split(',')[0].replace(' ', '-')}'>"
                    f"{_esc(c.outcome)}</td></tr>")
    clusters = cluster_label(run.result, verdict.model)
    return (f"<section id='verdict' class='verdict'><h2>Verdict</h2>"
            f"<p class='best'>Best model: <b>{_esc(verdict.model)}</b> <span class='muted'>(highest test IoU of the "
            f"{verdict.n_models} models{'; ' + _esc(clusters) if clusters else ''})</span></p>"
            f"<p class='summary'>{_esc(verdict.summary())}</p>"
            f"<div class='scroll'><table><thead><tr><th>headline metric</th><th>best model</th>"
            f"<th class='text'>strongest baseline</th><th>difference (95% interval)</th><th class='text'>verdict</th>"
            f"</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>"
            f"<p class='fine'>On the {verdict.n_test} test users. The strongest baseline is the one highest on each "
            f"metric; the interval is a paired bootstrap over test users ({BOOTSTRAP:,} draws); 'better' means the "
            f"whole interval lies above 0. Definitions: <a href='#metrics'>what the metrics mean</a>.</p></section>")


def _code(text: str) -> str:
    """Escaped text, `x` as <code>x</code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))


def glossary_html() -> str:
    parts = []
    for group in glossary.GROUPS:
        parts.append(f"<h3>{_esc(group.title)}</h3>" + (f"<p>{_code(group.intro)}</p>" if group.intro else ""))
        parts.append("<dl>" + "".join(
            f"<dt>{_esc(t.label)}{f' <span class=muted>({t.better} is better)</span>' if t.better else ''}</dt>"
            f"<dd>{_code(t.meaning)}</dd>" for t in group.terms) + "</dl>")
    return "".join(parts)


# The tables shown open, by title (hetlm.tables): the headline metrics and the clusters; the others are folded.
OPEN_TABLES = ("Page generation", "Outcomes from the generated session", "Ranking of the next session", "Clusters")


def _read_json(file: Path) -> dict | None:
    return json.loads(file.read_text()) if file.is_file() else None


def render_html(run: FinishedRun, figures: list[ReportFigure], verdict: Verdict | None) -> str:
    result, data = run.result, run.result.data
    summary = without_local_paths(_read_json(run.folder.prepared / "summary.json") or data, run.folder.path)
    config = _read_json(run.folder.config_file)
    config = config and without_local_paths(config, run.folder.path)
    shown: list[tuple[str, str, str]] = []   # (anchor, title, body)
    folded: list[tuple[str, str, str]] = []  # the same, in <details>
    tables = "".join(f"<h3>{_esc(title)}</h3>{html_table(rows)}" if title.startswith(OPEN_TABLES) else
                     f"<details class='table'><summary><h3>{_esc(title)}</h3></summary>{html_table(rows)}</details>"
                     for title, rows in paper_tables(result).items())
    shown.append(("tables", "Tables",
                  f"<p>Baselines are the rows named 'baseline: ...'; composite scores compare every model with "
                  f"{_esc(result.reference)}. A clusterwise model's Combined row is over all test users; its rows per "
                  f"cluster are folded below each table, as are the less used tables (click a title to "
                  f"open it). {_esc(BERTSCORE_NOTE)}</p>{tables}"))
    shown.append(("figures", "Figures", "".join(_figure_html(f) for f in figures)))
    shown.append(("examples", "Example test users",
                  "<p>Two users on whose next session the most models overlap, and two drawn at random "
                  "(seed 0). The last input sessions, the actual next session and each model's generation; "
                  "<span class='page hit'>highlighted</span> pages also occur in the actual next session. The first user "
                  "is open; click the others to open them.</p>"
                  + example_users(run)))
    folded.append(("metrics", "What the metrics mean", glossary_html()))
    folded.append(("settings", "Run settings (config.json)",
                   settings_table(config) if config else "<p class='note'>Not shown: no config.json.</p>"))
    summary = {k: v for k, v in summary.items() if k != "config"}   # the prepare settings are in config.json
    folded.append(("data", "Data summary (prepared/summary.json)", settings_table(summary)))
    if result.environment:
        folded.append(("environment", "Environment", settings_table(result.environment)))
    nav = "".join(f"<li><a href='#{a}'>{_esc(t)}</a></li>" for a, t, _ in [("verdict", "Verdict", ""), *shown, *folded])
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{b}" for a, t, b in shown)
    body += "".join(f"<details id='{a}' class='section'><summary><h2>{_esc(t)}</h2></summary>{b}</details>"
                    for a, t, b in folded)
    samples = data.get("samples", {})
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(result.name)}: HeTLM experiment report</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(result.name)}</h1><p class='sub'>HeTLM experiment report. Data: "
            f"{_esc(data.get('source', '?'))}, {_esc(data.get('users', '?'))} users, {_esc(data.get('pages', '?'))} "
            f"pages, samples {_esc(', '.join(f'{k} {v}' for k, v in samples.items()))}; {result.n_test} test users."
            f"</p>{verdict_html(run, verdict)}<nav><ol>{nav}</ol></nav>{body}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write the report of a finished run (default RUN/report.html; figures in RUN/report/figures/)."""
    run = FinishedRun(run_dir)
    changed = run.folder.mismatches(run.result)
    if changed:
        raise ValueError(f"{', '.join(changed)} in {run.folder.path} differ from what results.json recorded: the "
                         f"folder mixes two runs or changed since the run; rerun `hetlm experiment` into a new --out")
    out = Path(out) if out else run.folder.report_file
    figures = render_figures(run)
    run.folder.figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fig in figures:
        png = run.folder.figures_dir / f"{fig.name}.png"
        if fig.png is None:
            png.unlink(missing_ok=True)   # no stale figure from an earlier report
        else:
            write_atomically(png, fig.png)
            written.append(png)
    verdict = run_verdict(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, render_html(run, figures, verdict))  # whole or absent: never a page cut off by a full disk
    return Report(out, written, [f"{f.title}: {f.note}" for f in figures if f.png is None], verdict)
