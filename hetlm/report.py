"""The experiment report: one self-contained HTML page of a finished run folder.

`write_report(RUN)` reads what `run_experiment` left in the folder (results.json, config.json,
prepared/, generations/, outcomes/, clusters/, embeddings.npz) and writes RUN/report.html, with every
figure embedded as a base64 PNG and saved as RUN/report/figures/<name>.png. The page loads nothing
(no fonts, scripts or links; inline CSS only), so the one file opens offline. Page names come from
user logs and are always HTML-escaped. A figure whose data an older run lacks becomes a visible note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score, precision_recall_curve

from . import metrics as M
from .experiment import BERTSCORE_NOTE, artefact_path, paper_tables
from .tokenizer import load_tokenizer, page_vocabulary

REPORT_FILE = "report.html"
FIGURES_DIR = Path("report") / "figures"
SET_METRICS = ["HR", "IoA", "IoP", "IoU"]
STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.3, "legend.fontsize": 8, "legend.frameon": False}


class MissingData(Exception):
    """What a figure needs is not in the run folder (e.g. a run made before it was saved)."""


@dataclass(frozen=True)
class ReportFigure:
    name: str
    title: str
    caption: str
    png: bytes | None = None   # None: skipped, see note
    note: str = ""


@dataclass(frozen=True)
class Report:
    html: Path
    figures: list[Path]        # the PNG files written
    notes: list[str]           # what was skipped, and why


@dataclass
class RunFolder:
    """A finished run folder; artefacts are read on first use."""

    path: Path
    results: dict = field(init=False)

    def __post_init__(self):
        self.path = Path(self.path)
        file = self.path / "results.json"
        if not file.is_file():
            raise ValueError(f"{file} not found: not a finished `hetlm experiment` run folder")
        self.results = json.loads(file.read_text())

    def json(self, rel: str) -> dict | None:
        file = self.path / rel
        return json.loads(file.read_text()) if file.is_file() else None

    def models(self, *kinds: str) -> list[str]:
        """Model names in results order, of the given kinds (all when none given)."""
        return [n for n, r in self.results["results"].items() if not kinds or r.get("kind") in kinds]

    def artefact(self, folder: str, name: str) -> pl.DataFrame | None:
        file = artefact_path(self.path, folder, name)
        return pl.read_parquet(file) if file.is_file() else None

    @cached_property
    def generations(self) -> dict[str, pl.DataFrame]:
        found = {name: self.artefact("generations", name) for name in self.models()}
        return {name: df for name, df in found.items() if df is not None}

    @cached_property
    def per_user(self) -> dict[str, pl.DataFrame]:
        """HR, IoA, IoP, IoU, Val-P, New-P of every test user per model, recomputed from the generations."""
        tokenizer_dir = self.path / "prepared" / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise MissingData(f"no tokenizer in {tokenizer_dir.parent} (needed for valid pages)")
        vocabulary = set(page_vocabulary(load_tokenizer(tokenizer_dir)))
        return {name: M.evaluate_generations(df["generated"].to_list(), df["target"].to_list(),
                                             [[p for s in h for p in s] for h in df["history"].to_list()],
                                             vocabulary).per_user
                for name, df in self.generations.items()}


# ---------------------------------------------------------------- figures


def _grid(n: int, ncols: int, height: float, panel_width: float = 5.5) -> tuple[Figure, list]:
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _colour(i: int):
    return colormaps["tab10"](i % 10)


def _plot_train_val(ax, history: dict, colour, label: str) -> None:
    """Per-step training loss (thin) and its moving average; validation NLL of the next sessions (what selects
    the model) as markers."""
    steps = [h["step"] for h in history.get("train", [])]
    loss = np.array([h["loss"] for h in history.get("train", [])])
    if len(loss):
        window = max(1, len(loss) // 25)
        ax.plot(steps, loss, color=colour, lw=0.6, alpha=0.35)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=colour, lw=1.4, label=label)
    val = history.get("val", [])
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o--", color=colour, ms=4, lw=1,
                label=None if len(loss) else label)


def _plot_hetlm(ax_lm, ax_sel, history: dict) -> None:
    steps, val = history["steps"], history.get("val", [])
    clusters = sorted({k for h in steps for k in h.get("critic", {})}, key=int)
    for k in clusters:
        # A cluster's predictor trains only on the steps whose batch routed samples to it.
        points = [(h["step"], h["critic"][k]) for h in steps if k in h.get("critic", {})]
        ax_lm.plot(*zip(*points), ".-", color=_colour(int(k)), lw=0.7, ms=3, alpha=0.7, label=f"cluster {k}")
        vpoints = [(h["step"], h["predictor"][k]) for h in val if k in h.get("predictor", {})]
        if vpoints:
            ax_lm.plot(*zip(*vpoints), "o--", color=_colour(int(k)), ms=5, lw=1)
    if val:
        ax_lm.plot([h["step"] for h in val], [h["combined_nll"] for h in val], "ks--", ms=5, lw=1.2,
                   label="all clusters, routed")
    for i, part in enumerate(("LA", "L1", "L2", "L3")):
        if not steps or part not in steps[0]:  # hard EM (assignment="likelihood") logs only its actor loss LA
            continue
        ax_sel.plot([h["step"] for h in steps], [h[part] for h in steps], color=_colour(i), lw=1, label=part)
        if val:
            ax_sel.plot([h["step"] for h in val], [h[f"selector_{part}"] for h in val], "o--", color=_colour(i), ms=5,
                        lw=1)
    ax_sel.set_yscale("log")


def _legend_outside(ax) -> None:
    """Colours as the axes labelled them, plus what line and markers stand for."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    styles = [Line2D([], [], color="0.3", lw=1.4), Line2D([], [], color="0.3", ls="--", marker="o", ms=4, lw=1)]
    ax.legend(handles + styles, labels + ["training (per step)", "validation"], loc="upper left",
              bbox_to_anchor=(1.01, 1))


def training_curves(run: RunFolder) -> Figure:
    histories = run.results.get("histories") or {}
    if not histories:
        raise MissingData("results.json holds no training histories")
    panels = sum(2 if "steps" in h else 1 for h in histories.values())
    fig, axes = _grid(panels, 1, 2.6, panel_width=10.5)
    axes_left = iter(axes)
    for name, history in histories.items():
        ax = next(axes_left)
        if "steps" in history:              # HeTLM: critic per cluster, and the selector (actor)
            ax_sel = next(axes_left)
            _plot_hetlm(ax, ax_sel, history)
            ax_sel.set(title=f"{name}: selector (actor) loss", xlabel="step", ylabel="loss (log scale)")
            _legend_outside(ax_sel)
        elif "train" in history or "val" in history:   # one LM
            _plot_train_val(ax, history, _colour(0), "LM")
        else:                               # k-means: one LM per cluster
            for k, h in history.items():
                _plot_train_val(ax, h, _colour(int(k)), f"cluster {k}")
        ax.set(title=f"{name}: LM loss", xlabel="step", ylabel="cross-entropy")
        _legend_outside(ax)
    return fig


def _wrapped(items: list[str], per_line: int) -> str:
    """Items joined by commas, `per_line` to a line (tick labels that stay within their bar's width)."""
    return "\n".join(", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line))


def cluster_sizes(run: RunFolder) -> Figure:
    runs = {n: h["cluster_sizes"] for n, h in (run.results.get("histories") or {}).items() if h.get("cluster_sizes")}
    if not runs:
        raise MissingData("no HeTLM run with a cluster-size history")
    fig, axes = _grid(len(runs), 2, 3.2)
    for ax, (name, epochs) in zip(axes, runs.items()):
        clusters = sorted({k for e in epochs for k in e["sizes"]}, key=int)
        labels = [("k-means start" if e["epoch"] == 0 else f"after epoch {e['epoch']}") + "\n"
                  + _wrapped([f"{k}: {v}" for k, v in e["sizes"].items() if v], per_line=2) for e in epochs]
        bottom = np.zeros(len(epochs))
        for k in clusters:
            sizes = np.array([e["sizes"].get(k, 0) for e in epochs], dtype=float)
            ax.bar(labels, sizes, bottom=bottom, color=_colour(int(k)), label=f"cluster {k}", width=0.6)
            bottom += sizes
        for x, e in enumerate(epochs):
            ax.annotate(f"K={sum(v > 0 for v in e['sizes'].values())}", (x, bottom[x]), ha="center",
                        va="bottom", fontweight="bold")
        ax.set(title=name, ylabel="training samples", ylim=(0, 1.12 * bottom.max()))
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def cluster_metric_bars(run: RunFolder) -> Figure:
    clustered = run.models("clusterwise")
    if not clustered:
        raise MissingData("no clusterwise model in this run")
    singles = run.models("single")
    results = run.results["results"]
    fig, axes = _grid(len(clustered), 1, 3.0, panel_width=10.5)
    for ax, name in zip(axes, clustered):
        r = results[name]
        bars = [(f"cluster {k} (N={m['n']})", m, _colour(int(k)))
                for k, m in sorted(r["clusters"].items(), key=lambda kv: int(kv[0]))]
        bars.append((f"Combined (N={r['combined']['n']})", r["combined"], "0.25"))
        width = 0.8 / len(bars)
        x = np.arange(len(SET_METRICS))
        for i, (label, m, colour) in enumerate(bars):
            ax.bar(x - 0.4 + width * (i + 0.5), [m[k] for k in SET_METRICS], width, color=colour, label=label)
        for i, single in enumerate(singles):
            ax.hlines([results[single]["combined"][k] for k in SET_METRICS], x - 0.42, x + 0.42, color=_colour(7 + i),
                      ls="--", lw=1.5, label=f"{single} (all users)")
        ax.set_xticks(x, SET_METRICS)
        ax.set(title=name, ylabel="mean over test users")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def iou_distribution(run: RunFolder) -> Figure:
    per_user = run.per_user
    if not per_user:
        raise MissingData("no generations/*.parquet in the run folder")
    names = list(per_user)[::-1]    # first model on top
    values = [per_user[n]["IoU"].to_numpy() for n in names]
    fig = Figure(figsize=(10, 0.5 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.boxplot(values, orientation="horizontal", showmeans=True, widths=0.6, tick_labels=names,
               meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="k", ms=5),
               flierprops=dict(marker=".", ms=3, alpha=0.4))
    for y, v in enumerate(values, start=1):
        ax.annotate(f"mean {v.mean():.3f}, zero for {np.mean(v == 0):.0%}", (1.02, y), va="center",
                    xycoords=("axes fraction", "data"), fontsize=8)
    ax.set(xlabel="IoU of the generated and the actual next session (per test user)", xlim=(-0.02, 1.02))
    return fig


def embedding_projection(run: RunFolder) -> Figure:
    file = run.path / "embeddings.npz"
    if not file.is_file():
        raise MissingData("no embeddings.npz (the run had no clusterwise model, or predates it)")
    clustered = run.models("clusterwise")
    if not clustered:
        raise MissingData("no clusterwise model in this run")
    z = np.load(file)
    projector, method = _projector()
    projector.fit(z["train"])
    fig, axes = _grid(len(clustered), 2, 4.2)
    for ax, name in zip(axes, clustered):
        split, clusters = _final_clusters(run, name)
        xy = projector.transform(z[split])
        for k in np.unique(clusters):
            mask = clusters == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.6, color=_colour(int(k)), label=f"cluster {k} (n={mask.sum()})",
                       rasterized=True)
        ax.set(title=f"{name}: {split} samples", xlabel=f"{method} 1", ylabel=f"{method} 2")
        ax.legend(markerscale=2.5)
    return fig


def _projector():
    """UMAP when the package is installed, else PCA (scikit-learn)."""
    try:
        from umap import UMAP
        return UMAP(n_components=2, random_state=0), "UMAP"
    except ImportError:
        return PCA(n_components=2, random_state=0), "PCA"


def _final_clusters(run: RunFolder, name: str) -> tuple[str, np.ndarray]:
    """The final cluster of each training sample; test users (as routed) for runs without clusters/."""
    saved = run.artefact("clusters", name)
    if saved is not None:
        return "train", saved.filter(pl.col("split") == "train").sort("row")["cluster"].to_numpy()
    if name not in run.generations:
        raise MissingData(f"no clusters/ or generations/ file for {name}")
    return "test", run.generations[name]["cluster"].to_numpy()


def _outcomes(run: RunFolder, column: str = "purchase") -> dict[str, pl.DataFrame]:
    found = {name: run.artefact("outcomes", name) for name in run.models("single", "clusterwise")}
    usable = {n: df.drop_nans(f"p_{column}") for n, df in found.items() if df is not None}
    usable = {n: df for n, df in usable.items() if df.height and 0 < df[column].sum() < df.height}
    if not usable:
        raise MissingData(f"no outcomes/*.parquet with {column} probabilities and both outcome classes")
    return usable


def purchase_precision_recall(run: RunFolder) -> Figure:
    outcomes = _outcomes(run)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, df) in enumerate(outcomes.items()):
        truth, prob = df["purchase"].to_numpy(), df["p_purchase"].to_numpy()
        precision, recall, _ = precision_recall_curve(truth, prob)
        ax.plot(recall, precision, color=_colour(i), lw=1.4,
                label=f"{name} (AP {average_precision_score(truth, prob):.3f})", drawstyle="steps-post")
    base = next(iter(outcomes.values()))["purchase"].mean()
    ax.axhline(base, color="0.4", ls=":", label=f"purchase rate {base:.3f} (chance)")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return fig


def _estimator(run: RunFolder) -> str:
    n = run.results.get("outcome_samples")
    return (f"the share of {n} sampled next sessions per user that hold a purchase (Monte Carlo)" if n
            else "P(first page of the next session = Purchase)")


def purchase_calibration(run: RunFolder) -> Figure:
    outcomes = _outcomes(run)
    # A first-page probability sits orders of magnitude below the purchase rate: only log axes show it.
    log_axes = not run.results.get("outcome_samples")
    fig = Figure(figsize=(11, 4.5), layout="constrained")  # room for the legend beside the axes
    ax = fig.subplots()
    lowest = 1.0
    for i, (name, df) in enumerate(outcomes.items()):
        truth = df["purchase"].to_numpy()
        curves = [("p_purchase", "o-", "")]
        if "p_purchase_calibrated" in df.columns:
            curves.append(("p_purchase_calibrated", "s--", ", recalibrated on val"))
        for column, style, what in curves:
            prob = df[column].to_numpy()
            observed, predicted = calibration_curve(truth, prob, n_bins=10, strategy="quantile")
            shown = (observed > 0) & (predicted > 0) if log_axes else np.ones(len(observed), bool)  # log: no 0
            ax.plot(predicted[shown], observed[shown], style, color=_colour(i), ms=4, lw=1.2, mfc="none" if what else None,
                    label=f"{name}{what} (mean p {prob.mean():.3f}, rate {truth.mean():.3f})")
            lowest = min([lowest, *predicted[shown], *observed[shown]])
    lowest = 10 ** math.floor(math.log10(lowest)) if log_axes else 0.0
    ax.plot([lowest, 1], [lowest, 1], color="0.4", ls=":", label="perfectly calibrated")
    scale = "log" if log_axes else "linear"
    ax.set(xscale=scale, yscale=scale, xlim=(lowest, 1), ylim=(lowest, 1),
           xlabel="mean predicted P(purchase) in the bin", ylabel="share of users who purchased")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return fig


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: Callable[[RunFolder], str]
    draw: Callable[[RunFolder], Figure]


def _n_test(run: RunFolder) -> int:
    return run.results["results"][run.results["reference"]]["combined"]["n"]


FIGURES = [
    FigureSpec("training_curves", "Training and validation loss (paper Figure 3)",
               lambda run: "Cross-entropy per token against the optimiser step, for each LM and for the HeTLM selector. "
                           "Thin lines: training loss of each step (batch); thick lines: its moving average; "
                           "markers: loss on the validation samples. HeTLM panels: each cluster's predictor "
                           "(critic) on the samples routed to it, and the selector's actor loss LA = L1 + alpha L2 "
                           "+ beta L3 with its parts.",
               training_curves),
    FigureSpec("cluster_sizes", "Cluster sizes during HeTLM training",
               lambda run: "Training samples the selector routes to each cluster: at the k-means start and after each "
                           "epoch. Clusters left empty after an epoch are retired, so K (above each bar) shrinks.",
               cluster_sizes),
    FigureSpec("cluster_metrics", "Per-cluster page generation",
               lambda run: f"HR, IoA, IoP and IoU of each cluster of the clusterwise models and their Combined value on "
                           f"the {_n_test(run)} test users (N = test users routed to the cluster). Dashed lines: the "
                           f"single LMs on all test users.",
               cluster_metric_bars),
    FigureSpec("iou_per_user", "Per-user IoU",
               lambda run: f"Distribution over the {_n_test(run)} test users of the IoU between the generated and the "
                           f"actual next session (recomputed from generations/). Box: quartiles; diamond: mean; "
                           f"the variance metrics of Table 5 summarise this spread.",
               iou_distribution),
    FigureSpec("embedding_projection", "User embeddings by final cluster",
               lambda run: "2-D projection (fitted on the training samples) of the user embeddings the clusters are "
                           "built from, each point coloured by its final cluster (HeTLM: the selector's choice after "
                           "training; k-means: nearest centroid). Runs that did not save clusters/ show the test users "
                           "as routed.",
               embedding_projection),
    FigureSpec("purchase_precision_recall", "Purchase prediction: precision-recall",
               lambda run: f"Precision-recall curve of each LM's purchase probability (outcomes/*.parquet: "
                           f"{_estimator(run)}) against whether the actual next session of the {_n_test(run)} test "
                           f"users holds a purchase. AP: average precision.",
               purchase_precision_recall),
    FigureSpec("purchase_calibration", "Purchase prediction: calibration",
               lambda run: f"Reliability curve of {_estimator(run)}: test users binned by predicted P(purchase) "
                           f"(10 bins of equal size); x: mean prediction in the bin, y: share of the bin who "
                           f"purchased. Points above the diagonal: the model under-estimates. Dashed, hollow: after "
                           f"Platt scaling fitted on the validation users (when the run has it). "
                           + ("Log-log axes (bins where nobody purchased are not drawn): a first-page probability "
                              "misses purchases later in the session, so it sits far below the rate."
                              if not run.results.get("outcome_samples") else ""),
               purchase_calibration),
]


def render_figures(run: RunFolder) -> list[ReportFigure]:
    """Every figure as PNG, or a note saying why it was skipped."""
    out = []
    for spec in FIGURES:
        try:
            with rc_context(STYLE):
                fig = spec.draw(run)
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=110)
            out.append(ReportFigure(spec.name, spec.title, spec.caption(run), buffer.getvalue()))
        except MissingData as missing:
            out.append(ReportFigure(spec.name, spec.title, "", note=f"Not shown: {missing}."))
    return out


# ---------------------------------------------------------------- HTML


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


def _pages(pages: list[str], actual: set[str]) -> str:
    chips = "".join(f"<span class='page{' hit' if p in actual else ''}'>{_esc(p)}</span>" for p in pages)
    return chips or "<span class='empty'>(empty)</span>"


def pick_examples(run: RunFolder, n: int = 4, max_pages: int = 15) -> list[int]:
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


def example_users(run: RunFolder, n: int = 4, shown_sessions: int = 3) -> str:
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
            where = f" (cluster {generated['cluster']})" if run.results["results"][name].get("kind") == "clusterwise" else ""
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


def render_html(run: RunFolder, figures: list[ReportFigure]) -> str:
    results, data = run.results, run.results.get("data", {})
    summary = run.json("prepared/summary.json") or data
    config = run.json("config.json")
    sections: list[tuple[str, str, str]] = []   # (anchor, title, body)
    sections.append(("figures", "Figures", "".join(_figure_html(f) for f in figures)))
    tables = "".join(f"<h3>{_esc(title)}</h3>{html_table(rows)}" for title, rows in paper_tables(results).items())
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
    if results.get("environment"):
        sections.append(("environment", "Environment", settings_table(results["environment"])))
    nav = "".join(f"<li><a href='#{a}'>{_esc(t)}</a></li>" for a, t, _ in sections)
    body = "".join(f"<h2 id='{a}'>{_esc(t)}</h2>{b}" for a, t, b in sections)
    n_test = _n_test(run)
    samples = data.get("samples", {})
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(results['name'])}: HeTLM experiment report</title><style>{CSS}</style></head><body>"
            f"<h1>{_esc(results['name'])}</h1><p class='sub'>HeTLM experiment report. Data: "
            f"{_esc(data.get('source', '?'))}, {_esc(data.get('users', '?'))} users, {_esc(data.get('pages', '?'))} "
            f"pages, samples {_esc(json.dumps(samples))}; {n_test} test users. Reference model for composites: "
            f"<b>{_esc(results['reference'])}</b>.</p><nav><ol>{nav}</ol></nav>{body}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write the report of a finished run (default RUN/report.html; figures in RUN/report/figures/)."""
    run = RunFolder(Path(run_dir))
    out = Path(out) if out else run.path / REPORT_FILE
    figures = render_figures(run)
    figure_dir = run.path / FIGURES_DIR
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fig in figures:
        png = figure_dir / f"{fig.name}.png"
        if fig.png is None:
            png.unlink(missing_ok=True)   # no stale figure from an earlier report
        else:
            png.write_bytes(fig.png)
            written.append(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(run, figures), encoding="utf-8")
    return Report(out, written, [f"{f.title}: {f.note}" for f in figures if f.png is None])
