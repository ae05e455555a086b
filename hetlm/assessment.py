"""The evaluation stage of `hetlm experiment`: each trained model (`TrainedModel`, one record per model) generates
the test users' next sessions, routed its own way and every other way asked for, and is scored into one
`ModelResult` row, with a set-decoder row and its outcome probabilities; then each baseline. The generations,
outcome and cluster tables go to the run folder (hetlm.runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import metrics as M
from .baselines import BASELINES, HistoryOutcomes
from .cluster.base import ClusterwiseLM
from .encoders import load_minilm
from .evaluate import (
    GenerationConfig,
    baseline_page_scores,
    compute_metrics,
    first_page_outcomes,
    fit_set_decoder,
    predict,
    save_generations,
    set_decoded_pages,
)
from .outcomes import OUTCOMES, OutcomeCalibrator, calibration, outcome_calibration, outcome_table
from .runs import ModelResult, RunFolder
from .set_decoder import SetDecoder
from .tokenizer import page_vocabulary

console = Console(width=200)  # wide tables stay readable in logs and CI


class SetDecoderConfig(BaseModel):
    """The expected-IoU set decoder (hetlm.set_decoder), fitted on the validation users of each LM; its rows
    are labelled '<model> · set decoder' beside the paper's greedy rows."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    n_samples: int = Field(0, ge=0)   # sampled sessions per user as extra evidence (0: first-page scores only)
    top_first: int = Field(10, ge=0)
    max_size: int = Field(20, ge=1)


class Clock:
    """Wall time of each stage, for the closing tables."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                console.rule(f"[bold]{stage}")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[stage] = round(time.perf_counter() - self.t, 2)

        return _Stage()


@dataclass
class Samples:
    """A run's prepared samples and tokenizer, and the users' embeddings once computed."""

    train: pl.DataFrame
    val: pl.DataFrame
    test: pl.DataFrame
    tokenizer: PreTrainedTokenizerBase
    summary: dict
    z: dict[str, np.ndarray] = field(default_factory=dict)  # split -> embeddings (runs with a clusterwise model)

    @cached_property
    def vocabulary(self) -> set[str]:
        return set(page_vocabulary(self.tokenizer))


@dataclass
class TrainedModel:
    """One trained model of a run: what the evaluation stages read."""

    name: str
    model: ClusterwiseLM  # a single LM is one with K = 1
    folder: Path        # models/<folder>: saved there, and its set decoder and outcome calibrator with it
    params: int
    history: dict

    @property
    def clusterwise(self) -> bool:
        return self.model.routed

    @property
    def lm(self) -> PreTrainedModel:
        """A single LM's one LM (what k-means and HeTLM start every cluster from)."""
        if self.model.routed:
            raise ValueError(f"{self.name} has {len(self.model.models)} LMs, not one")
        return self.model.models[0]

    def extra_routings(self, asked: list[str]) -> list[str]:
        """The routings asked for besides the model's own that it can take (none for a single LM)."""
        if not self.clusterwise:
            return []
        return [r for r in asked if r != self.model.routing and (r != "selector" or self.model.selector is not None)]


class Evaluation:
    """Every evaluated model's results (`ModelResult`, in evaluation order) and the outcome models beside the LMs;
    the generations, outcome and cluster tables go to the run folder."""

    def __init__(self, data: Samples, run: RunFolder, clock: Clock, encoder, generation: GenerationConfig,
                 set_decoder: SetDecoderConfig, outcome_samples: int, seed: int, bert_score: bool, progress: bool):
        self.data, self.run, self.clock, self.encoder, self.progress = data, run, clock, encoder, progress
        self.generation, self.set_decoder = generation, set_decoder
        self.outcome_samples, self.seed = outcome_samples, seed
        self.bert_encoder = load_minilm() if bert_score else None
        self.results: dict[str, ModelResult] = {}
        # The outcome baseline a marketer would fit first (on the training users), and each LM stacked with it.
        self.history_lr = HistoryOutcomes().fit(data.train["history"].to_list(),
                                                {o: data.train[o].to_numpy() for o in OUTCOMES})
        self.outcome_baselines = {"baseline: history logistic regression": _outcome_summary(
            _outcome_frame(data.test, self.history_lr.predict_proba(data.test["history"].to_list())))}

    def _score(self, pages: list[list[str]], clusters: np.ndarray | None, first_page_logprobs: np.ndarray,
               **fields) -> ModelResult:
        d = self.data
        return ModelResult(**compute_metrics(pages, d.test, d.vocabulary, clusters, first_page_logprobs, d.tokenizer,
                                   self.bert_encoder), **fields)

    def evaluate_lm(self, trained: TrainedModel, routing: str | None) -> None:
        """A trained LM routed its own way (routing None) or the given way: its row, its set-decoder row, and its
        outcome probabilities."""
        name = trained.name if routing is None else f"{trained.name} [routed by {routing}]"
        with self.clock(f"inference: {name}"):
            zt, pred, val_pred = self._generate(name, trained, routing)
        if self.set_decoder.enabled and val_pred is not None:
            with self.clock(f"set decoder: {name}"):
                self._set_decoder(name, trained, routing, pred, val_pred)
        with self.clock(f"outcomes: {name}"):
            self._outcomes(name, trained, routing, zt, pred, val_pred)

    def _generate(self, name: str, trained: TrainedModel, routing: str | None):
        """Greedy next sessions of the test users (scored), and the validation users' evidence when a set decoder
        or the first-page outcome stack needs it."""
        d, model, sd = self.data, trained.model, self.set_decoder
        t0 = time.perf_counter()
        zt = self.encoder.transform(d.test["history"].to_list()) if trained.clusterwise else None  # Table 17: routing
        pred = predict(model, d.test, d.tokenizer, self.generation, zt, routing, progress=self.progress,
                       n_samples=sd.n_samples)
        inference_s = time.perf_counter() - t0 - pred.seconds["scoring"]
        fields = {"params": trained.params, "inference_seconds": round(inference_s, 2),
                  "kind": "clusterwise" if trained.clusterwise else "single"}
        if trained.clusterwise:
            fields |= {"train_cluster_sizes": model.sizes, "routing": routing or model.routing}
        self.results[name] = self._score(pred.pages, pred.clusters, pred.first_page_logprobs, **fields)
        if trained.clusterwise:
            train_clusters = model.route(d.z["train"], routing, d.train["input_ids"].to_list())
            self.run.write_artefact("clusters", name, _cluster_table(d.train, train_clusters, d.test, pred.clusters))
        save_generations(self.run.artefact("generations", name), d.test, pred.pages, pred.clusters)
        needed = d.val.height and (sd.enabled or not self.outcome_samples)
        val_pred = predict(model, d.val, d.tokenizer, self.generation, d.z["val"] if trained.clusterwise else None,
                           routing, progress=False, greedy=False, n_samples=sd.n_samples) if needed else None
        return zt, pred, val_pred

    def _set_decoder(self, name: str, trained: TrainedModel, routing: str | None, pred, val_pred) -> None:
        """The expected-IoU set decoder fitted on the validation users, and its row '<name> · set decoder'."""
        d, sd = self.data, self.set_decoder
        decoder = fit_set_decoder(SetDecoder(sd.n_samples, sd.top_first, sd.max_size, seed=self.seed,
                                             max_new_tokens=self.generation.max_new_tokens), val_pred, d.val,
                                  d.tokenizer)
        if routing is None:  # the model's own routing is what score/serve use
            decoder.save_pretrained(trained.folder)
        set_name = f"{name} · set decoder"
        pages = set_decoded_pages(decoder, pred, d.test, d.tokenizer)
        ranking = decoder.page_scores(d.test["input_ids"].to_list(), pred.evidence)
        self.results[set_name] = self._score(pages, pred.clusters, ranking, kind="set decoder", decoder={
            "size": decoder.size_ or "expected IoU per user", "validation IoU by size rule": decoder.fit_iou_})
        save_generations(self.run.artefact("generations", set_name), d.test, pages, pred.clusters)

    def _outcomes(self, name: str, trained: TrainedModel, routing: str | None, zt, pred, val_pred) -> None:
        """P(Cart), P(Purchase) of each test user (Monte Carlo, recalibrated on the validation users, or of the first
        page), and the LM's probability stacked with the history model's."""
        d, model = self.data, trained.model
        if self.outcome_samples:
            mc = {"n_samples": self.outcome_samples, "seed": self.seed,
                  "max_new_tokens": self.generation.max_new_tokens}
            zv = d.z["val"] if trained.clusterwise else None
            outcomes = outcome_table(model, d.tokenizer, d.test, zt, routing, **mc)
            val_outcomes = outcome_table(model, d.tokenizer, d.val, zv, routing, **mc) if d.val.height else None
            if val_outcomes is not None:  # Platt scaling on the validation users, kept with the model for score/serve
                calibrator = OutcomeCalibrator().fit(val_outcomes, self.outcome_samples)
                if routing is None:  # the model's own routing is what score/serve use
                    calibrator.save_pretrained(trained.folder)
                outcomes = outcomes.with_columns(**{f"p_{o}_calibrated": calibrator.transform(
                    o, outcomes[f"p_{o}"].to_numpy()) for o in OUTCOMES})
        else:
            outcomes = first_page_outcomes(d.test, pred.first_page_logprobs, d.tokenizer)
            val_outcomes = (first_page_outcomes(d.val, val_pred.first_page_logprobs, d.tokenizer)
                            if val_pred is not None else None)
        self.run.write_artefact("outcomes", name, outcomes)
        self.results[name].outcomes = _outcome_summary(outcomes)
        if val_outcomes is not None:  # the LM's probability stacked with the history model's, on val users
            combined = self.history_lr.stack(d.val["history"].to_list(), _logits(val_outcomes),
                                             {o: d.val[o].to_numpy() for o in OUTCOMES})
            probs = combined.predict_proba(d.test["history"].to_list(), _logits(outcomes))
            self.outcome_baselines[f"{name} + history model (stacked on val)"] = _outcome_summary(
                _outcome_frame(d.test, probs))

    def evaluate_baselines(self, names: list[str]) -> None:
        """Each baseline fitted on the training and validation users."""
        d = self.data
        histories = d.train["history"].to_list() + d.val["history"].to_list()
        targets = d.train["target"].to_list() + d.val["target"].to_list()
        for name in names:
            baseline = BASELINES[name]().fit(histories, targets)
            pages = baseline.predict(d.test["history"].to_list())
            self.results[f"baseline: {name}"] = self._score(pages, None, baseline_page_scores(baseline, d.test,
                                                                                              d.tokenizer),
                                                            kind="baseline")
            save_generations(self.run.artefact("generations", f"baseline: {name}"), d.test, pages,
                             np.zeros(len(pages), int))


def _cluster_table(train: pl.DataFrame, train_clusters: np.ndarray, test: pl.DataFrame,
                   test_clusters: np.ndarray) -> pl.DataFrame:
    """Final cluster of every train and test sample; `row` indexes the split's samples (and embeddings)."""
    frames = [df.select("user").with_row_index("row").with_columns(split=pl.lit(split),
                                                                   cluster=pl.Series(c.astype(int)))
              for split, df, c in (("train", train, train_clusters), ("test", test, test_clusters))]
    return pl.concat(frames)


def _outcome_summary(outcomes: pl.DataFrame) -> dict[str, float]:
    """AUC and Brier score (beside that of always predicting the observed rate, and after recalibration on
    the validation users when the table has it) of each outcome."""
    summary = {}
    for name, cal in outcome_calibration(outcomes).items():
        prob = outcomes[f"p_{name}"].to_numpy()
        known = ~np.isnan(prob)
        summary |= {f"AUC-{name}": M.outcome_auc(prob[known], outcomes[name].to_numpy()[known]) if known.any()
                    else float("nan"), f"Brier-{name}": cal.brier, f"Brier-{name} (base rate)": cal.brier_base_rate}
        if f"p_{name}_calibrated" in outcomes.columns:
            summary[f"Brier-{name} (calibrated on val)"] = calibration(
                outcomes[f"p_{name}_calibrated"].to_numpy(), outcomes[name].to_numpy()).brier
    return summary


def _logits(table: pl.DataFrame) -> np.ndarray:
    """(n, 2) log-odds of an outcome table's P(Cart), P(Purchase); 0 where the page is not in the vocabulary."""
    p = np.column_stack([table[f"p_{o}"].to_numpy() for o in OUTCOMES]).astype(np.float64)
    p = np.clip(np.nan_to_num(p, nan=0.5), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _outcome_frame(samples: pl.DataFrame, probs: dict[str, np.ndarray]) -> pl.DataFrame:
    return samples.select("user", *OUTCOMES).with_columns(**{f"p_{o}": probs[o] for o in OUTCOMES})
