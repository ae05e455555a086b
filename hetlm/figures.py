"""The figures of the experiment report, drawn from a finished run folder (`FinishedRun`): each a matplotlib
Figure, or `MissingData` when the run lacks what it needs (an older run, or no clusterwise model).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps, rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import calibration_curve
from sklearn.decomposition import PCA
from scipy.stats import t as t_dist
from sklearn.metrics import average_precision_score, precision_recall_curve

from . import metrics as M
from .runs import RunFolder
from .tables import cluster_label
from .tokenizer import load_tokenizer, page_vocabulary

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


class FinishedRun:
    """A finished run folder: its results.json, and its artefacts read on first use."""

    def __init__(self, path: str | Path):
        self.folder = RunFolder(path)
        self.result = self.folder.read_results()

    def models(self, *kinds: str) -> list[str]:
        return self.result.models(*kinds)

    def artefact(self, kind: str, name: str) -> pl.DataFrame | None:
        return self.folder.read_artefact(kind, name)

    @cached_property
    def generations(self) -> dict[str, pl.DataFrame]:
        found = {name: self.artefact("generations", name) for name in self.models()}
        return {name: df for name, df in found.items() if df is not None}

    @cached_property
    def per_user(self) -> dict[str, pl.DataFrame]:
        """HR, IoA, IoP, IoU, Val-P, New-P of every test user per model, recomputed from the generations."""
        tokenizer_dir = self.folder.prepared / "tokenizer"
        if not tokenizer_dir.is_dir():
            raise MissingData(f"no tokenizer in {tokenizer_dir.parent} (needed for valid pages)")
        vocabulary = set(page_vocabulary(load_tokenizer(tokenizer_dir)))
        return {name: M.evaluate_generations(df["generated"].to_list(), df["target"].to_list(),
                                             [[p for s in h for p in s] for h in df["history"].to_list()],
                                             vocabulary).per_user
                for name, df in self.generations.items()}


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


def _smooth(steps: list, values: list) -> tuple[list, np.ndarray]:
    """Moving average over about a 10th of the points: per-step losses are too noisy to read."""
    window = max(1, round(len(values) / 10))
    return steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid")


def _plot_curve(ax, train: list[tuple], val: list[tuple], colour, label: str | None = None,
                best: bool = False) -> None:
    """(step, loss) pairs: training as a moving average (line), validation as dashed markers; `best`: a star on the
    lowest validation point (the saved model)."""
    if train:
        ax.plot(*_smooth(*map(list, zip(*train))), color=colour, lw=1.3, label=label)
    if val:
        ax.plot(*zip(*val), "o--", color=colour, ms=3.5, lw=0.9, label=None if train else label)
        if best:
            step, loss = min(val, key=lambda v: v[1])
            ax.plot(step, loss, "*", color="k", ms=11, zorder=5, label=f"best validation (step {step})")


def _lm_points(history: dict) -> tuple[list[tuple], list[tuple]]:
    """One trainer's history (hetlm.train): training and validation (step, loss); validation is the next-session NLL."""
    return ([(h["step"], h["loss"]) for h in history.get("train", [])],
            [(h["step"], h["val_loss"]) for h in history.get("val", []) if h.get("val_loss") is not None])


def _cluster_panels(subfig, title: str, clusters: dict[str, tuple[list, list]], sizes: dict, routed: list | None):
    """One small panel per cluster (shared y axis), and for HeTLM one of all clusters as routed."""
    n = len(clusters) + (routed is not None)
    axes = subfig.subplots(1, n, sharey=True, squeeze=False).ravel()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    for ax, (k, (train, val)) in zip(axes, clusters.items()):
        _plot_curve(ax, train, val, _colour(int(k)))
        size = sizes.get(int(k), sizes.get(k, 0))
        ax.set_title(f"cluster {k}: {size:,} samples" if size else f"cluster {k}: retired", fontsize=8)
        ax.set_xlabel("step")
    if routed is not None:
        _plot_curve(axes[-1], [], routed, "k")
        axes[-1].set_title("all clusters, routed", fontsize=8)
        axes[-1].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy")
    subfig.suptitle(f"{title} (line: training, moving average; dashed markers: validation)", fontsize=9.5)


def _selector_panel(subfig, name: str, history: dict) -> None:
    steps, val = history["steps"], history.get("val", [])
    ax = subfig.subplots()
    parts = [p for p in ("LA", "L1", "L2", "L3") if steps and p in steps[0]]  # hard EM logs only its actor loss LA
    for i, part in enumerate(parts):
        _plot_curve(ax, [(h["step"], h[part]) for h in steps], [(h["step"], h[f"selector_{part}"]) for h in val],
                    _colour(i), part)
    # L1 centred on each sample's mean NLL can be 0 or negative: a log axis only where every value is positive
    if all(h[p] > 0 for h in steps for p in parts):
        ax.set_yscale("log")
    ax.set(title=f"{name}: selector (actor) loss", xlabel="step", ylabel="loss")
    _legend_outside(ax)


def _legend_outside(ax) -> None:
    """Colours as the axes labelled them, plus what line and markers stand for."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    styles = [Line2D([], [], color="0.3", lw=1.3), Line2D([], [], color="0.3", ls="--", marker="o", ms=3.5, lw=0.9)]
    ax.legend(handles + styles, labels + ["training (moving average)", "validation"], loc="upper left",
              bbox_to_anchor=(1.01, 1))


def training_curves(run: FinishedRun) -> Figure:
    """One row per LM; a clusterwise model's row has one small panel per cluster (HeTLM: and a row for its
    selector), so no panel holds more than one LM's curves."""
    histories = run.result.histories
    if not histories:
        raise MissingData("results.json holds no training histories")
    rows = sum(2 if "steps" in h else 1 for h in histories.values())
    fig = Figure(figsize=(10.5, 2.5 * rows), layout="constrained")
    subfigs = iter(fig.subfigures(rows, 1, squeeze=False).ravel())
    for name, history in histories.items():
        result = run.result.results.get(name)
        sizes = (result.train_cluster_sizes if result is not None else None) or {}
        if "steps" in history:              # HeTLM: each cluster's predictor (critic), and the selector (actor)
            steps, val = history["steps"], history.get("val", [])
            clusters = sorted({k for h in steps for k in h.get("critic", {})}, key=int)
            curves = {k: ([(h["step"], h["critic"][k]) for h in steps if k in h.get("critic", {})],
                          [(h["step"], h["predictor"][k]) for h in val if k in h.get("predictor", {})]) for k in clusters}
            _cluster_panels(next(subfigs), f"{name}: LM loss per cluster", curves, sizes,
                            [(h["step"], h["combined_nll"]) for h in val])
            _selector_panel(next(subfigs), name, history)
        elif "train" in history or "val" in history:   # one LM
            ax = next(subfigs).subplots()
            _plot_curve(ax, *_lm_points(history), _colour(0), "LM", best=True)
            ax.set(title=f"{name}: LM loss", xlabel="step", ylabel="cross-entropy")
            _legend_outside(ax)
        else:                               # k-means: one LM per cluster
            _cluster_panels(next(subfigs), f"{name}: LM loss per cluster",
                            {k: _lm_points(h) for k, h in sorted(history.items(), key=lambda kv: int(kv[0]))}, sizes,
                            None)
    return fig


def _wrapped(items: list[str], per_line: int) -> str:
    """Items joined by commas, `per_line` to a line (tick labels that stay within their bar's width)."""
    return "\n".join(", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line))


def cluster_sizes(run: FinishedRun) -> Figure:
    runs = {n: h["cluster_sizes"] for n, h in run.result.histories.items() if h.get("cluster_sizes")}
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
            ax.annotate(f"K={sum(v > 0 for v in e['sizes'].values())}, effective {M.effective_k(e['sizes'].values()):.1f}",
                        (x, bottom[x]), ha="center", va="bottom", fontweight="bold")
        ax.set(title=name, ylabel="training samples", ylim=(0, 1.12 * bottom.max()))
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def mean_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its t-based 95% interval (nan for fewer than 2 values: no interval)."""
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float(values.mean()) if len(values) else math.nan, math.nan
    return float(values.mean()), float(t_dist.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


SMALL_CLUSTER = 5  # test users: bars of smaller clusters are hatched


def cluster_metric_bars(run: FinishedRun) -> Figure:
    clustered = [n for n in run.models("clusterwise") if n in run.generations]
    if not clustered:
        raise MissingData("no clusterwise model with generations/ in this run")
    singles = run.models("single")
    results, per_user = run.result.results, run.per_user
    fig, axes = _grid(len(clustered), 1, 2.7, panel_width=10.5)
    for ax, name in zip(axes, clustered):
        users, routed = per_user[name], run.generations[name]["cluster"].to_numpy()
        bars = [(f"cluster {k} (N={m['n']}{', no interval' if m['n'] < 2 else ''})", routed == k, m["n"], _colour(k))
                for k, m in sorted(results[name].clusters.items())]
        bars.append((f"Combined (N={len(routed)})", np.ones(len(routed), bool), len(routed), "0.25"))
        width = 0.8 / len(bars)
        x = np.arange(len(SET_METRICS))
        for i, (label, rows, n, colour) in enumerate(bars):
            means, half = np.array([mean_interval(users[k].to_numpy()[rows]) for k in SET_METRICS]).T
            reach = np.array([np.minimum(half, means), np.minimum(half, 1 - means)])  # the metrics lie in [0, 1]
            small = n < SMALL_CLUSTER
            ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=reach, capsize=2,
                   color=colour, alpha=0.45 if small else 1.0, hatch="//" if small else None, edgecolor=colour,
                   error_kw={"lw": 0.8, "ecolor": "0.2"}, label=label)
        for i, single in enumerate(singles):
            ax.hlines([results[single].combined[k] for k in SET_METRICS], x - 0.42, x + 0.42, color=_colour(7 + i),
                      ls="--", lw=1.5, label=f"{single} (all users)")
        ax.set_xticks(x, SET_METRICS)
        ax.set(title=f"{name}: {cluster_label(run.result, name)}", ylabel="mean over test users", ylim=(0, 1.02))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def iou_distribution(run: FinishedRun) -> Figure:
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


def embedding_projection(run: FinishedRun) -> Figure:
    file = run.folder.embeddings
    if not file.is_file():
        raise MissingData("no embeddings.npz (the run had no clusterwise model, or predates it)")
    clustered = run.models("clusterwise")
    if not clustered:
        raise MissingData("no clusterwise model in this run")
    z = np.load(file)
    projector, method = _projector()
    projector.fit(z["train"])
    fig, axes = _grid(len(clustered), 3, 3.4, panel_width=3.7)
    for ax, name in zip(axes, clustered):
        split, clusters = _final_clusters(run, name)
        xy = projector.transform(z[split])
        for k in np.unique(clusters):
            mask = clusters == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.6, color=_colour(int(k)), label=f"cluster {k} (n={mask.sum()})",
                       rasterized=True)
        ax.set_title("\n".join([*textwrap.wrap(name, 44), f"{split} samples"]), fontsize=8.5)
        ax.set(xlabel=f"{method} 1", ylabel=f"{method} 2")
        ax.legend(markerscale=2.5, fontsize=7)
    return fig


def _projector():
    """UMAP when the package is installed, else PCA (scikit-learn)."""
    try:
        from umap import UMAP
        return UMAP(n_components=2, random_state=0), "UMAP"
    except ImportError:
        return PCA(n_components=2, random_state=0), "PCA"


def _final_clusters(run: FinishedRun, name: str) -> tuple[str, np.ndarray]:
    """The final cluster of each training sample; test users (as routed) for runs without clusters/."""
    saved = run.artefact("clusters", name)
    if saved is not None:
        return "train", saved.filter(pl.col("split") == "train").sort("row")["cluster"].to_numpy()
    if name not in run.generations:
        raise MissingData(f"no clusters/ or generations/ file for {name}")
    return "test", run.generations[name]["cluster"].to_numpy()


def _outcomes(run: FinishedRun, column: str = "purchase") -> dict[str, pl.DataFrame]:
    found = {name: run.artefact("outcomes", name) for name in run.models("single", "clusterwise")}
    usable = {n: df.drop_nans(f"p_{column}") for n, df in found.items() if df is not None}
    usable = {n: df for n, df in usable.items() if df.height and 0 < df[column].sum() < df.height}
    if not usable:
        raise MissingData(f"no outcomes/*.parquet with {column} probabilities and both outcome classes")
    return usable


def purchase_precision_recall(run: FinishedRun) -> Figure:
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


def _estimator(run: FinishedRun) -> str:
    n = run.result.outcome_samples
    return (f"the share of {n} sampled next sessions per user that hold a purchase (Monte Carlo)" if n
            else "P(first page of the next session = Purchase)")


def purchase_calibration(run: FinishedRun) -> Figure:
    outcomes = _outcomes(run)
    # A first-page probability sits orders of magnitude below the purchase rate: only log axes show it.
    log_axes = not run.result.outcome_samples
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
    caption: Callable[[FinishedRun], str]
    draw: Callable[[FinishedRun], Figure]


FIGURES = [
    FigureSpec("training_curves", "Training and validation loss (the paper's Figure 3)",
               lambda run: "Cross-entropy per token against the optimiser step, one row per model. Lines: the "
                           "training loss, as a moving average over about a 10th of the steps; dashed markers: the "
                           "validation users' next-session NLL (what picks the saved model; star: its lowest point). "
                           "Clusterwise models: one small panel per cluster's LM (its training samples in the title; "
                           "HeTLM: its predictor, the critic, on the samples routed to it), and for HeTLM all clusters "
                           "together as routed, and the selector's actor loss LA = L1 + alpha L2 + beta L3 with its "
                           "parts (log axis, linear when L1 is centred and can be negative).",
               training_curves),
    FigureSpec("cluster_sizes", "Cluster sizes during HeTLM training",
               lambda run: "Training samples the selector routes to each cluster: at the k-means start and after each "
                           "epoch. Clusters left empty after an epoch are retired, so K (above each bar) shrinks. "
                           "Effective K = exp(entropy of the cluster shares): K for equal clusters, near 1 when one "
                           "cluster holds almost every sample.",
               cluster_sizes),
    FigureSpec("cluster_metrics", "Per-cluster page generation",
               lambda run: f"HR, IoA, IoP and IoU of each cluster of the clusterwise models and their Combined value on "
                           f"the {run.result.n_test} test users (N = test users routed to the cluster), with the 95% "
                           f"interval of each mean (t-based over the cluster's users, cut at 0 and 1; none for N=1). Hatched, pale bars: "
                           f"clusters of fewer than {SMALL_CLUSTER} test users, whose means say little. Dashed lines: the "
                           f"single LMs on all test users. Titles: K at start, kept, and the effective K of the "
                           f"training samples (exp of the entropy of the cluster shares).",
               cluster_metric_bars),
    FigureSpec("iou_per_user", "Per-user IoU",
               lambda run: f"Distribution over the {run.result.n_test} test users of the IoU between the generated and the "
                           f"actual next session (recomputed from generations/). Box: quartiles; diamond: mean; "
                           f"the spread-across-users table (variances) summarises it.",
               iou_distribution),
    FigureSpec("embedding_projection", "User embeddings by final cluster",
               lambda run: "2-D projection (fitted on the training samples) of the user embeddings the clusters are "
                           "built from, each point coloured by its final cluster (HeTLM: the selector's choice after "
                           "training; k-means: nearest centroid). Runs that did not save clusters/ show the test users "
                           "as routed.",
               embedding_projection),
    FigureSpec("purchase_precision_recall", "Purchase prediction: precision-recall",
               lambda run: f"Precision-recall curve of each LM's purchase probability (outcomes/*.parquet: "
                           f"{_estimator(run)}) against whether the actual next session of the {run.result.n_test} test "
                           f"users holds a purchase. AP: average precision.",
               purchase_precision_recall),
    FigureSpec("purchase_calibration", "Purchase prediction: calibration",
               lambda run: f"Reliability curve of {_estimator(run)}: test users binned by predicted P(purchase) "
                           f"(10 bins of equal size); x: mean prediction in the bin, y: share of the bin who "
                           f"purchased. Points above the diagonal: the model under-estimates. Dashed, hollow: after "
                           f"Platt scaling fitted on the validation users (when the run has it). "
                           + ("Log-log axes (bins where nobody purchased are not drawn): a first-page probability "
                              "misses purchases later in the session, so it sits far below the rate."
                              if not run.result.outcome_samples else ""),
               purchase_calibration),
]


def render_figures(run: FinishedRun) -> list[ReportFigure]:
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
