"""The experiment report of a small real run: artefacts the run saves for it, the page rendered in headless
Chromium (every figure loads, every table is there), `hetlm report`, and run folders lacking artefacts."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.figures import FIGURES
from hetlm.report import write_report
from hetlm.runs import RunFolder
from hetlm.tables import paper_tables

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
LM_KINDS = ("single", "clusterwise")


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
    if CHROMIUM is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium chromium-driver)")
    # A copy of the report with a script that writes what each image loaded into the page.
    probe = tmp_path / "probe.html"
    probe.write_text((small_run / "report.html").read_text().replace("</body>", """<script>
        window.addEventListener('load', () => {
          const p = document.createElement('pre'); p.id = 'probe';
          p.textContent = JSON.stringify({images: [...document.images].map(i => i.naturalWidth),
                                          tables: [...document.querySelectorAll('h3')].map(h => h.textContent)});
          document.body.appendChild(p);
        });</script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, dom.stderr[-2000:]
    probed = json.loads(html.unescape(found.group(1)))
    assert len(probed["images"]) == len(FIGURES) and all(width > 0 for width in probed["images"]), probed
    titles = paper_tables(RunFolder(small_run).read_results())
    assert set(titles) <= set(probed["tables"])
    assert sum(t.startswith("Test user") for t in probed["tables"]) == 4   # the example users

    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", "--window-size=1280,4000",
                    (small_run / "report.html").as_uri()], check=False, capture_output=True, timeout=120)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("HETLM_REPORT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["HETLM_REPORT_SCREENSHOT"])


def test_report_command(small_run, tmp_path):
    run = _copy(small_run, tmp_path / "run")
    (run / "report.html").unlink()
    shutil.rmtree(run / "report")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert f"{len(FIGURES)} figures" in result.output and (run / "report.html").is_file()
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
