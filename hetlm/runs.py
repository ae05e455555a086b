"""The run folder of `hetlm experiment`: where each file lives, how model folders and per-model files are
named, and results.json as typed records (`RunResult`, one `ModelResult` per evaluated model).

    config.json                      the resolved ExperimentConfig
    prepared/                        `hetlm prepare`'s output: samples, tokenizer, summary.json
    embeddings.npz                   the users' embeddings of each split (runs with a clusterwise model)
    models/<folder>/                 each trained model (save_pretrained; folder names below)
    train/<folder>/                  its checkpoints and training logs
    generations/<model>.parquet      each evaluated model's next session of every test user
    outcomes/<model>.parquet         LMs: P(Cart), P(Purchase) per test user
    clusters/<model>.parquet         clusterwise models: the final cluster of each train and test sample
    results.json                     RunResult
    tables.md                        the paper's tables (hetlm.tables)
    report.html, report/figures/     hetlm.report
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from .outputs import write_atomically
from .provenance import sha256

Artefact = Literal["generations", "outcomes", "clusters"]
Metrics = dict[str, float | int]
# models/<folder>/ of the two single LMs; clusterwise ones are named by `kmeans_folder` and `hetlm_folder`
SMALL, LARGER = "small", "larger"
SPLITS = ("train", "val", "test")


def kmeans_folder(n_clusters: int) -> str:
    return f"kmeans_k{n_clusters}"


def hetlm_folder(label: str) -> str:
    """'a=5 b=9 l1=centered' -> hetlm_a5_b9_l1_centered."""
    return "hetlm_" + re.sub(r"[^\w.-]+", "_", label.replace("a=", "a").replace(" b=", "_b"))


def slug(name: str) -> str:
    """A model's name as a file name: 'tiny HeTLM a=5 b=9' -> tiny_hetlm_a_5_b_9."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


class RunFolder:
    """The paths of one run folder (nothing is read or created on construction)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.prepared = self.path / "prepared"
        self.embeddings = self.path / "embeddings.npz"
        self.embedding_cache = self.path / "embedding_cache"  # the encoder's, unless the config names one
        self.results_file = self.path / "results.json"
        self.tables_file = self.path / "tables.md"
        self.report_file = self.path / "report.html"
        self.figures_dir = self.path / "report" / "figures"

    def split(self, split: str) -> Path:
        return self.prepared / f"{split}.parquet"

    def model(self, folder: str) -> Path:
        return self.path / "models" / folder

    def train(self, folder: str) -> Path:
        return self.path / "train" / folder

    def artefact(self, kind: Artefact, name: str) -> Path:
        """RUN/<kind>/<model>.parquet, the model's name as a slug ('baseline: markov' -> baseline_markov)."""
        return self.path / kind / f"{slug(name.replace('baseline: ', 'baseline_'))}.parquet"

    def write_artefact(self, kind: Artefact, name: str, table: pl.DataFrame) -> Path:
        path = self.artefact(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(path)
        return path

    def read_artefact(self, kind: Artefact, name: str) -> pl.DataFrame | None:
        path = self.artefact(kind, name)
        return pl.read_parquet(path) if path.is_file() else None

    def read_results(self) -> RunResult:
        if not self.results_file.is_file():
            raise ValueError(f"{self.results_file} not found: not a finished `hetlm experiment` run folder")
        try:
            return RunResult.from_json(self.results_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:  # JSON and pydantic errors are ValueErrors
            raise ValueError(f"{self.results_file} is not a readable results file (truncated or edited?): "
                             f"{str(err).splitlines()[0]}") from None

    def write_results(self, run: RunResult) -> None:
        write_atomically(self.results_file, run.to_json())

    def holds_run(self) -> bool:
        """Whether the folder holds (part of) a run: its config.json, written first, or results.json."""
        return self.config_file.is_file() or self.results_file.is_file()

    def layout_entries(self) -> list[Path]:
        """The entries of the layout above that exist (results.json first)."""
        return [p for p in self._layout() if p.exists()]

    def _layout(self) -> list[Path]:
        return [self.results_file, self.config_file, self.prepared, self.embeddings, self.embedding_cache,
                self.tables_file, self.report_file, self.path / "report"] + [
                self.path / kind for kind in ("models", "train", "generations", "outcomes", "clusters")]

    def clear(self) -> None:
        """Remove the run's entries (results.json first, so a folder half cleared never reads as finished);
        other files in the folder stay."""
        for entry in self.layout_entries():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def mismatches(self, result: RunResult) -> list[str]:
        """The folder's files whose sha256 differs from the one results.json recorded (a folder that mixes
        two runs, or changed since). A file that is gone is not one (the report notes what it cannot show)."""
        return [name for name, digest in result.data_fingerprint.items()
                if name != "input" and (self.path / name).is_file() and sha256(self.path / name) != digest]

    def describe(self) -> str:
        """What the folder holds, for a message after an interrupted or failed run."""
        if self.results_file.is_file():
            missing = [f.name for f in (self.tables_file, self.report_file) if not f.is_file()]
            rewrite = f"; missing {', '.join(missing)}: `hetlm report {self.path}` writes the report" if missing else ""
            return f"{self.path} holds a finished run (results.json){rewrite}"
        if self.holds_run():
            kept = [p.name for p in (self.prepared, self.path / "models") if p.exists()]
            return (f"{self.path} holds an unfinished run ({', '.join(kept) or 'config.json'}; no results.json): "
                    f"the same command starts it again (the folder's run files are replaced)")
        return f"nothing was written to {self.path}"


class ModelResult(BaseModel):
    """One evaluated model of a run: a trained LM (or one of its extra routings), its set-decoder row, or a
    baseline. Metrics: the paper's per cluster and Combined; BLEU, BERTScore, ranking and AUC in `extra`."""
    model_config = ConfigDict(extra="forbid")

    kind: Literal["single", "clusterwise", "set decoder", "baseline"]
    combined: Metrics
    clusters: dict[int, Metrics]
    extra: Metrics
    per_user_iou: list[float]
    first_page_ranks: list[int | None] | None = None  # each test user's rank of the actual first page (None: unknown)
    params: int | None = None                       # LMs
    inference_seconds: float | None = None          # LMs: routing and generation of the test set
    train_cluster_sizes: dict[int, int] | None = None  # clusterwise
    routing: str | None = None                      # clusterwise
    outcomes: dict[str, float] | None = None        # LMs: AUC and Brier of P(Cart), P(Purchase)
    decoder: dict[str, Any] | None = None           # set decoder: its size rule and validation IoU
    # vs the run's reference (paper Table 3): share of metrics where the model is better, per group and overall;
    # strict (ties lose), and with ties counted as wins as the paper counts
    composite: dict[str, float] | None = None
    composite_ties_win: dict[str, float] | None = None


class RunResult(BaseModel):
    """results.json: what a run measured, with its data and environment."""
    model_config = ConfigDict(extra="forbid")

    name: str
    reference: str                                  # the model the composites compare with
    outcome_samples: int
    data: dict[str, Any]                            # prepared/summary.json
    results: dict[str, ModelResult]                 # model name -> its result, in evaluation order
    outcome_baselines: dict[str, dict[str, float]] = {}  # outcome models beside the LMs: AUC, Brier
    seconds: dict[str, float] = {}                  # wall time of each stage
    histories: dict[str, Any] = {}                  # trained model name -> its training history
    environment: dict[str, Any] = {}
    data_fingerprint: dict[str, str] = {}           # sha256 of the input log and the prepared samples

    def models(self, *kinds: str) -> list[str]:
        """Model names in results order, of the given kinds (all when none given)."""
        return [n for n, r in self.results.items() if not kinds or r.kind in kinds]

    @property
    def n_test(self) -> int:
        return int(self.results[self.reference].combined["n"])

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        return cls.model_validate(json.loads(text))  # json, not pydantic's parser: results hold NaN


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
