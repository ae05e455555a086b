"""The experiment report: one self-contained HTML page of a finished run folder.

`write_report(RUN)` reads what `run_experiment` left in the folder (results.json, config.json,
prepared/, generations/, outcomes/, clusters/, embeddings.npz) and writes RUN/report.html, with every
figure (hetlm.figures) embedded as a base64 PNG and saved as RUN/report/figures/<name>.png. The page loads nothing
(no fonts, scripts or links; inline CSS only), so the one file opens offline. Page names come from
user logs and are always HTML-escaped. A figure whose data an older run lacks becomes a visible note.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .figures import FinishedRun, ReportFigure, render_figures
from .outputs import write_atomically
from .tables import BERTSCORE_NOTE, paper_tables


@dataclass(frozen=True)
class Report:
    html: Path
    figures: list[Path]        # the PNG files written
    notes: list[str]           # what was skipped, and why


def _esc(value) -> str:
    return html.escape(str(value))


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return _esc(value)


def html_table(rows: dict[str, dict], first: str = "model") -> str:
    """One row per model (or item), one column per key of the rows (order of first appearance); a table
    of one row is shown as a column, which reads better than a wide row."""
    if len(rows) == 1:
        (name, row), = rows.items()
        rows, first = {key: {name: value} for key, value in row.items()}, ""
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    head = "".join(f"<th>{_esc(c)}</th>" for c in [first, *columns])
    body = "".join(f"<tr><th scope='row'>{_esc(name)}</th>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                   + "</tr>" for name, row in rows.items())
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


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
        blocks.append(f"<h3>Test user {_esc(row['user'])}</h3><table class='example'>{''.join(lines)}</table>")
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
"""


def _figure_html(fig: ReportFigure) -> str:
    if fig.png is None:
        return f"<h3 id='{fig.name}'>{_esc(fig.title)}</h3><p class='note'>{_esc(fig.note)}</p>"
    data = base64.b64encode(fig.png).decode()
    return (f"<figure id='{fig.name}'><img src='data:image/png;base64,{data}' alt='{_esc(fig.title)}'>"
            f"<figcaption><b>{_esc(fig.title)}.</b> {_esc(fig.caption)}</figcaption></figure>")


def _read_json(file: Path) -> dict | None:
    return json.loads(file.read_text()) if file.is_file() else None


def render_html(run: FinishedRun, figures: list[ReportFigure]) -> str:
    result, data = run.result, run.result.data
    summary = without_local_paths(_read_json(run.folder.prepared / "summary.json") or data, run.folder.path)
    config = _read_json(run.folder.config_file)
    config = config and without_local_paths(config, run.folder.path)
    sections: list[tuple[str, str, str]] = []   # (anchor, title, body)
    sections.append(("figures", "Figures", "".join(_figure_html(f) for f in figures)))
    tables = "".join(f"<h3>{_esc(title)}</h3>{html_table(rows)}" for title, rows in paper_tables(result).items())
    sections.append(("tables", "Tables (paper Tables 2-6 and 17)",
                     f"<p>Composite scores are Table 3; the baselines are the rows named 'baseline: ...'. "
                     f"{_esc(BERTSCORE_NOTE)}</p>{tables}"))
    sections.append(("examples", "Example test users",
                     "<p>Two users on whose next session the most models overlap, and two drawn at random "
                     "(seed 0). The last input sessions, the actual next session and each model's generation; "
                     "<span class='page hit'>highlighted</span> pages also occur in the actual next session.</p>"
                     + example_users(run)))
    sections.append(("settings", "Run settings (config.json)",
                     settings_table(config) if config else "<p class='note'>Not shown: no config.json.</p>"))
    summary = {k: v for k, v in summary.items() if k != "config"}   # the prepare settings are in config.json
    sections.append(("data", "Data summary (prepared/summary.json)", settings_table(summary)))
    if result.environment:
        sections.append(("environment", "Environment", settings_table(result.environment)))
    nav = "".join(f"<li><a href='#{a}'>{_esc(t)}</a></li>" for a, t, _ in sections)
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{b}" for a, t, b in sections)
    samples = data.get("samples", {})
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(result.name)}: HeTLM experiment report</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(result.name)}</h1><p class='sub'>HeTLM experiment report. Data: "
            f"{_esc(data.get('source', '?'))}, {_esc(data.get('users', '?'))} users, {_esc(data.get('pages', '?'))} "
            f"pages, samples {_esc(json.dumps(samples))}; {result.n_test} test users. Reference model for composites: "
            f"<b>{_esc(result.reference)}</b>.</p><nav><ol>{nav}</ol></nav>{body}</body></html>")


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
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, render_html(run, figures))  # whole or absent: never a page cut off by a full disk
    return Report(out, written, [f"{f.title}: {f.note}" for f in figures if f.png is None])
