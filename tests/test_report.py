"""The experiment report of a small real run: artefacts the run saves for it, the page rendered in headless
Chromium (every figure loads, every table is there, the verdict on the first screen, nothing wider than the page),
the verdict's numbers, metric definitions for every column, `hetlm report`, and run folders lacking artefacts."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from hetlm import glossary
from hetlm import metrics as M
from hetlm.cli import app
from hetlm.figures import FIGURES, FinishedRun
from hetlm.report import write_report
from hetlm.runs import RunFolder
from hetlm.tables import CLUSTER_ROW, cluster_counts, paper_tables
from hetlm.verdict import HEADLINE, run_verdict

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
LM_KINDS = ("single", "clusterwise")
REPO = Path(__file__).resolve().parents[1]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium chromium-driver)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], check=False, capture_output=True, text=True, timeout=120)


def _probe(page: Path, tmp_path: Path, script: str, window: str = "1280,800") -> dict:
    """The JSON that `script` (a JS expression) gives once the page has loaded in headless Chromium."""
    probe = tmp_path / f"probe_{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", f"""<script>
        window.addEventListener('load', () => {{
          const p = document.createElement('pre'); p.id = 'probe'; p.textContent = JSON.stringify({script});
          document.body.appendChild(p);
        }});</script></body>"""))
    dom = _chromium(tmp_path, f"--window-size={window}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, dom.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def _copy(run: Path, dest: Path) -> Path:
    """The run folder without its model weights and checkpoints (the report does not read them)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("models", "train", "embedding_cache"))
    return dest


def _resource_references(page: str) -> list[str]:
    """Every address the page would load: src= and href= values, url(...) and @import."""
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    return [r for r in refs if not r.startswith(("data:image/png;base64,", "#"))] + re.findall(r"url\(|@import", page)


def test_run_saves_report_and_its_artefacts(small_run):
    folder = RunFolder(small_run)
    results = json.loads((small_run / "results.json").read_text())["results"]
    test = pl.read_parquet(small_run / "prepared" / "test.parquet")
    train = pl.read_parquet(small_run / "prepared" / "train.parquet")
    for name, r in results.items():
        if r["kind"] not in LM_KINDS:
            assert not folder.artefact("outcomes", name).exists()
            continue
        outcomes = pl.read_parquet(folder.artefact("outcomes", name))
        assert outcomes.columns[:5] == ["user", "p_cart", "p_purchase", "cart", "purchase"]
        assert outcomes["user"].to_list() == test["user"].to_list()
        assert outcomes["purchase"].to_list() == test["purchase"].to_list()
        assert outcomes["p_purchase"].is_between(0, 1).all() and outcomes["p_cart"].is_between(0, 1).all()
        if r["kind"] == "clusterwise":
            clusters = pl.read_parquet(folder.artefact("clusters", name))
            generated = pl.read_parquet(folder.artefact("generations", name))
            assert clusters.filter(pl.col("split") == "train")["row"].to_list() == list(range(train.height))
            routed = clusters.filter(pl.col("split") == "test")["cluster"]
            assert routed.to_list() == generated["cluster"].to_list()
            # Every training sample sits in a cluster the saved model still has.
            assert set(clusters["cluster"]) <= {int(k) for k in r["train_cluster_sizes"]} | set(routed)
    page = (small_run / "report.html").read_text()
    assert sorted(p.stem for p in (small_run / "report" / "figures").glob("*.png")) == sorted(f.name for f in FIGURES)
    assert page.count("<img ") == len(FIGURES) and "Not shown" not in page
    assert _resource_references(page) == []
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


def test_report_renders_in_chromium(small_run, tmp_path):
    probed = _probe(small_run / "report.html", tmp_path, "{images: [...document.images].map(i => i.naturalWidth), "
                    "tables: [...document.querySelectorAll('h3')].map(h => h.textContent)}", window="1280,4000")
    assert len(probed["images"]) == len(FIGURES) and all(width > 0 for width in probed["images"]), probed
    titles = paper_tables(RunFolder(small_run).read_results())
    assert set(titles) <= set(probed["tables"])
    assert sum(t.startswith("Test user") for t in probed["tables"]) == 4   # the example users


def test_report_first_screen_shows_the_verdict(small_run, tmp_path):
    """At 1280 x 800 the whole verdict box is on the first screen, the page never scrolls sideways (wide tables
    scroll in their own box), and the run settings are folded."""
    probed = _probe(small_run / "report.html", tmp_path, """{
        verdict: document.getElementById('verdict').getBoundingClientRect().toJSON(),
        best: document.querySelector('#verdict .best').textContent,
        viewport: [window.innerWidth, window.innerHeight],
        page: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
        boxes: [...document.querySelectorAll('.scroll')].map(b => b.getBoundingClientRect().right),
        settings: [document.getElementById('settings').open,
                   document.querySelector('#settings table').checkVisibility()]}""")
    (width, height), verdict = probed["viewport"], probed["verdict"]
    assert 0 <= verdict["top"] and verdict["bottom"] <= height and verdict["height"] > 150, probed
    best = run_verdict(FinishedRun(small_run)).model
    assert f"Best model: {best}" in probed["best"]
    assert probed["page"][0] <= width and max(probed["boxes"]) <= width, probed
    assert probed["settings"] == [False, False], probed

    screenshot = tmp_path / "first_screen.png"
    _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,800", (small_run / "report.html").as_uri())
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("HETLM_REPORT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["HETLM_REPORT_SCREENSHOT"])


def test_verdict_against_the_strongest_baseline(small_run):
    run = FinishedRun(small_run)
    results = run.result.results
    verdict = run_verdict(run)
    models = {n: r for n, r in results.items() if r.kind != "baseline"}
    assert verdict.model == max(models, key=lambda n: models[n].combined["IoU"])
    assert [c.metric for c in verdict.comparisons] == HEADLINE   # the run has ranking metrics and outcomes
    value = lambda name, metric: {**results[name].combined, **results[name].extra}[metric]
    for c in verdict.comparisons:
        baselines = {n: value(n, c.metric) for n, r in results.items() if r.kind == "baseline"}
        assert c.baseline_value == max(baselines.values()) and baselines[c.baseline] == c.baseline_value
        assert c.value == value(verdict.model, c.metric) and c.gap == pytest.approx(c.value - c.baseline_value)
        assert c.lo is not None and c.lo <= c.gap <= c.hi and c.lo < c.hi, c
        assert (c.outcome == "better") == (c.lo > 0) and (c.outcome == "worse") == (c.hi < 0)
    summary = verdict.summary()
    assert ("Not beaten on" in summary) == bool(verdict.not_beaten)
    for c in verdict.not_beaten:
        assert f"{c.metric} ({c.baseline.removeprefix('baseline: ')}" in summary
    page = (small_run / "report.html").read_text()
    assert page.index("id='verdict'") < page.index("id='tables'") and html.escape(summary, quote=False) in page


def test_per_user_figures_give_the_recorded_metrics(small_run):
    """What the verdict resamples: the stored first-page ranks, and the Cart-or-Purchase hits of generations/."""
    run = FinishedRun(small_run)
    for name, r in run.result.results.items():
        ranks = np.array([k for k in r.first_page_ranks if k is not None])
        assert len(r.first_page_ranks) == r.combined["n"]
        assert (ranks <= 10).mean() == pytest.approx(r.extra["Recall@10"])
        assert M.ndcg_at(ranks, 10).mean() == pytest.approx(r.extra["NDCG@10"])
        df = run.generations[name]
        f1 = M.f1_counts(M.contains_outcome(df["generated"].to_list()), M.contains_outcome(df["target"].to_list()))
        assert f1 == pytest.approx(r.combined["F1-Cart/Purchase"])


def test_every_column_is_defined(small_run):
    """Each column of every table has its definition in the report's folded 'What the metrics mean' section, and
    docs/metrics.md is the same list."""
    page = (small_run / "report.html").read_text()
    section = re.search(r"<details id='metrics' class='section'>(.*?)</details>", page, re.DOTALL)
    assert section, "no folded metrics section"
    for title, rows in paper_tables(RunFolder(small_run).read_results()).items():
        # the stage table's one row is what needs a definition; its columns are stage names
        columns = set(rows) if title.startswith("Stage") else {c for row in rows.values() for c in row}
        for column in columns:
            term = glossary.term_for(column)
            assert term is not None, f"{title}: column {column!r} is not defined in hetlm.glossary"
            assert f"<dt>{html.escape(term.label)}" in section.group(1)
    assert (REPO / "docs" / "metrics.md").read_text() == glossary.markdown(), \
        "docs/metrics.md is stale: python -m hetlm.glossary > docs/metrics.md"
    # the README stands alone: its links and the docs it names are in the repo, nothing points at ../shared/reference
    readme = (REPO / "README.md").read_text()
    named = re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`?\b(docs/[\w./-]+\.md)\b", readme)
    assert "docs/metrics.md" in named and all((REPO / name).is_file() for name in named), named
    assert "shared/reference" not in readme


def test_clusters_show_their_effective_k(small_run):
    result = RunFolder(small_run).read_results()
    tables = paper_tables(result)
    clusters = next(rows for title, rows in tables.items() if title.startswith("Clusters"))
    clustered = result.models("clusterwise")
    assert set(clusters) == set(clustered)
    for name in clustered:
        sizes = result.results[name].train_cluster_sizes
        counts = cluster_counts(result, name)
        assert counts["K kept"] == sum(v > 0 for v in sizes.values()) <= counts["K at start"]
        assert counts["effective K (train)"] == pytest.approx(M.effective_k(sizes.values()))
        assert 1 <= counts["effective K (train)"] <= counts["K kept"]
    generation = next(iter(tables.values()))
    assert all("effective" in row for row in generation if "/ Combined" in row)
    page = (small_run / "report.html").read_text()
    folded = re.findall(r"<details class='clusters'>(.*?)</details>", page, re.DOTALL)
    main = re.sub(r"<details.*?</details>", "", page, flags=re.DOTALL)
    assert folded and all(CLUSTER_ROW in f for f in folded) and CLUSTER_ROW not in main
    assert "<th colspan='3' class='group'>Cart</th>" in page   # the outcome table's grouped header


def test_report_command(small_run, tmp_path):
    run = _copy(small_run, tmp_path / "run")
    (run / "report.html").unlink()
    shutil.rmtree(run / "report")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"{len(FIGURES)} figures" in result.output and (run / "report.html").is_file()
    verdict = run_verdict(FinishedRun(run))  # the terminal says what the report's verdict box says
    assert f"Best model (test IoU): {verdict.model}" in result.output
    assert " ".join(verdict.summary().split()) in " ".join(result.output.split())
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a finished" in missing.output and "Traceback" not in missing.output


def test_report_of_a_run_lacking_artefacts(small_run, tmp_path):
    run = _copy(small_run, tmp_path / "run")
    for folder in ("outcomes", "clusters"):
        shutil.rmtree(run / folder)
    (run / "embeddings.npz").unlink()
    (run / "config.json").unlink()
    results = json.loads((run / "results.json").read_text())
    del results["histories"]
    (run / "results.json").write_text(json.dumps(results))
    # Page names come from user logs: one that looks like markup must be shown as text.
    name = next(n for n, r in results["results"].items() if r["kind"] == "single")
    generations = RunFolder(run).artefact("generations", name)
    pl.read_parquet(generations).with_columns(
        pl.col("generated").list.concat(pl.lit(["<script>x</script>"]))).write_parquet(generations)

    report = write_report(run)
    page = report.html.read_text()
    skipped = {"training_curves", "cluster_sizes", "embedding_projection", "purchase_precision_recall",
               "purchase_calibration"}
    assert {p.stem for p in report.figures} == {f.name for f in FIGURES} - skipped
    assert {p.stem for p in (run / "report" / "figures").glob("*.png")} == {p.stem for p in report.figures}
    assert len(report.notes) == len(skipped) and page.count("Not shown") == len(skipped) + 1  # + run settings
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
