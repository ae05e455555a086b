"""The paper's Step 2 on one dataset, from a config: prepare -> small LM -> k-means clusterwise ->
HeTLM (a list of alpha, beta) -> parameter-matched larger LM -> evaluation of all of them and of the
baselines -> the paper's Tables 2-6 and 17, as Markdown and JSON, in one run folder.

Run folder:
    config.json, prepared/ (samples, tokenizer, summary), models/<name>/ (save_pretrained),
    generations/<name>.parquet, outcomes/<name>.parquet (LMs: outcome probabilities per test user),
    clusters/<name>.parquet (clusterwise models: final cluster of each train and test sample),
    results.json, tables.md, report.html (figures also in report/figures/), timings in results.json
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from rich.console import Console

from . import metrics as M
from .baselines import BASELINES, HistoryOutcomes
from .cluster.base import ClusterwiseLM
from .cluster.hetlm import HeTLM, HeTLMConfig
from .cluster.kmeans import fit_kmeans_clusterwise
from .encoders import encoder_from_settings
from .evaluate import (
    GenerationSettings,
    baseline_page_scores,
    compute_metrics,
    first_page_outcomes,
    fit_set_decoder,
    predict,
    save_generations,
    set_decoded_pages,
)
from .ingest import SOURCES
from .models import (
    FAMILIES,
    PRESETS,
    build_model,
    count_parameters,
    init_from,
    preset_parameters,
    scale_preset,
)
from .outcomes import OUTCOMES, OutcomeCalibrator, calibration, outcome_calibration, outcome_table
from .prepare import PrepareConfig, prepare
from .provenance import environment, sha256
from .sessions import DataError
from .set_decoder import SetDecoder
from .tokenizer import load_tokenizer, page_vocabulary
from .train import TrainConfig, resolve_device, train_lm

console = Console(width=200)  # wide tables stay readable in logs and CI
SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data" / "taobao-sample" / "UserBehavior_sample.csv.gz"


def _one_of(value: str, known, what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(known)}")
    return value


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: str = "tiny"
    family: str | None = None
    init_from: str | None = Field(None, description="released weights on disk to start from (all but vocab layers)")
    # A released architecture (opt-350m, ...) trained from random weights at a fine-tuning learning rate
    # (<= 1e-5) learns next to nothing: refused unless this is set.
    from_scratch: bool = False

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        return _one_of(preset, PRESETS, "preset")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str | None) -> str | None:
        return family if family is None else _one_of(family, FAMILIES, "family")


class KMeansSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    n_clusters: int = Field(6, ge=2)
    finetune: TrainConfig = TrainConfig(lr=3e-4, epochs=2, early_stopping_patience=None)


class HeTLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # One HeTLM per run: an (alpha, beta) pair, or a dict of HeTLMConfig fields that replace `config`'s
    # for that run (e.g. {"alpha": 0, "beta": 0, "l1": "centered"}).
    runs: list[tuple[float, float] | dict[str, Any]] = [(5.0, 9.0)]
    config: HeTLMConfig = HeTLMConfig()
    # > 1: each run fits in this many processes (`hetlm fit-hetlm --processes`, torchrun; one per GPU), its
    # predictors spread over them; the other stages stay in this process.
    processes: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _runs_are_configs(self) -> HeTLMSettings:
        self.variants()  # every run must give a valid HeTLMConfig
        return self

    def variants(self) -> list[tuple[str, HeTLMConfig]]:
        """(label, config) per run; the label names alpha, beta and any other field the run sets."""
        fields = {f.name for f in dataclasses.fields(HeTLMConfig)}
        out = []
        for i, run in enumerate(self.runs):
            changes = dict(zip(("alpha", "beta"), run)) if isinstance(run, tuple) else dict(run)
            if set(changes) - fields:
                raise ValueError(f"runs[{i}]: unknown HeTLMConfig fields {sorted(set(changes) - fields)}")
            cfg = TypeAdapter(HeTLMConfig).validate_python(dataclasses.asdict(self.config) | changes)
            others = " ".join(f"{k}={v}" for k, v in changes.items() if k not in ("alpha", "beta"))
            out.append((f"a={cfg.alpha:g} b={cfg.beta:g}" + (f" {others}" if others else ""), cfg))
        return out


class LargerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # x the small LM's parameters. initial_k (the paper: 6 x OPT-350M vs OPT-2.7B) = the largest initial K
    # of the clusterwise runs, what HeTLM and k-means start with; final_k = the largest final K of HeTLM.
    factor: float | Literal["initial_k", "final_k"] = "initial_k"
    # released weights for the larger LM (a shape of the small LM's family): with model.init_from set and
    # this not, the small LM and every cluster LM start from released weights and the larger LM does not.
    init_from: str | None = None
    # a named preset instead of a scaled shape (e.g. "opt-2.7b", whose released weights init_from can load)
    preset: str | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        return preset if preset is None else _one_of(preset, PRESETS, "preset")


class EncoderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sbert", "pagebag"] = "sbert"
    pooling: Literal["mean", "recency"] = "mean"
    model_name_or_path: str | None = None
    cache_dir: str | None = None    # None: <run>/embedding_cache

    @field_validator("model_name_or_path")
    @classmethod
    def _model_on_disk(cls, name: str | None) -> str | None:
        """Checked here, not when the encoder first runs (after pre-training): a folder, or a cached model."""
        from huggingface_hub import try_to_load_from_cache

        if name is None or Path(name).is_dir():
            return name
        try:
            if isinstance(try_to_load_from_cache(name, "modules.json"), str):
                return name
        except ValueError:  # not a valid hub name either
            pass
        raise ValueError(f"{name!r} is neither a SentenceTransformer folder on disk nor a model in the local "
                         "Hugging Face cache (hetlm runs offline)")


class SetDecoderSettings(BaseModel):
    """The expected-IoU set decoder (hetlm.set_decoder), fitted on the validation users of each LM; its rows
    are labelled '<model> · set decoder' beside the paper's greedy rows."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    n_samples: int = Field(0, ge=0)   # sampled sessions per user as extra evidence (0: first-page scores only)
    top_first: int = Field(10, ge=0)
    max_size: int = Field(20, ge=1)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    source: str = "taobao"
    path: str = str(SHIPPED_DATA)
    source_options: dict[str, Any] = {}
    prepare: PrepareConfig = PrepareConfig()
    model: ModelSettings = ModelSettings()
    pretrain: TrainConfig = TrainConfig(epochs=3, early_stopping_patience=None)
    larger: LargerSettings = LargerSettings()
    kmeans: KMeansSettings = KMeansSettings()
    hetlm: HeTLMSettings = HeTLMSettings()
    encoder: EncoderSettings = EncoderSettings()
    generation: GenerationSettings = GenerationSettings()
    set_decoder: SetDecoderSettings = SetDecoderSettings()
    baselines: list[str] = list(BASELINES)
    # Every clusterwise model is also evaluated routed these ways (rows "<model> [routed by <routing>]"):
    # "selector" (HeTLM's actor, on embeddings), "centroid" (nearest cluster centroid of the embeddings),
    # "likelihood" (the cluster LM that best predicts the user's own history; no encoder).
    extra_routings: list[Literal["selector", "centroid", "likelihood"]] = []
    bert_score: bool = True
    # P(Cart)/P(Purchase) in the next session: Monte Carlo over this many sampled sessions per user
    # (hetlm.outcomes); 0 = the probability that the session's first page is Cart/Purchase (no sampling).
    outcome_samples: int = Field(16, ge=0)
    seed: int = 0

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return _one_of(source, SOURCES, "source")

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        return [_one_of(name, BASELINES, "baseline") for name in names]

    @model_validator(mode="after")
    def _fair_starts(self) -> ExperimentConfig:
        model = self.model
        if model.from_scratch:
            return self
        released = PRESETS[model.preset].family is not None
        if released and model.init_from is None and self.pretrain.lr <= 1e-5:
            raise ValueError(f"model.preset {model.preset!r} from random weights at lr {self.pretrain.lr:g}: set "
                             "model.init_from to its released weights, or model.from_scratch: true")
        if model.init_from is not None and self.larger.enabled and self.larger.init_from is None:
            raise ValueError("model.init_from is set but larger.init_from is not: the larger LM would start from "
                             "random weights and every small one from released weights; set larger.init_from, or "
                             "model.from_scratch: true to allow it")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentConfig:
        return cls.model_validate_json(Path(path).read_text())


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


def _fit_hetlm_in_processes(cfg: HeTLMConfig, processes: int, out: Path, folder: str, encoder: dict,
                            progress: bool) -> ClusterwiseLM:
    """One HeTLM run by `hetlm fit-hetlm --processes N` on the files this run has written (prepared samples,
    models/small, embeddings.npz); its model folder is read back."""
    work = out / "train" / folder
    work.mkdir(parents=True, exist_ok=True)
    (work / "hetlm_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (work / "encoder.json").write_text(json.dumps(encoder))
    command = [sys.executable, "-m", "hetlm.cli", "fit-hetlm", str(out / "prepared"), "--base", str(out / "models" / "small"),
               "--embeddings", str(out / "embeddings.npz"), "--config", str(work / "hetlm_config.json"),
               "--encoder", str(work / "encoder.json"), "--out", str(out / "models" / folder), "--checkpoints", str(work),
               "--processes", str(processes), "--progress" if progress else "--no-progress"]
    if subprocess.run(command, check=False).returncode:
        raise RuntimeError(f"HeTLM in {processes} processes failed (its output is above): {' '.join(command)}")
    return ClusterwiseLM.from_pretrained(out / "models" / folder, str(resolve_device(cfg.device)))


def run_experiment(config: ExperimentConfig, out: str | Path, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    clock = Clock()
    torch.manual_seed(config.seed)

    with clock("prepare"):
        summary = prepare(config.source, config.path, out / "prepared", config.prepare, **config.source_options)
    train, val, test = (pl.read_parquet(out / "prepared" / f"{s}.parquet") for s in ("train", "val", "test"))
    tokenizer = load_tokenizer(out / "prepared" / "tokenizer")
    vocabulary = set(page_vocabulary(tokenizer))
    console.print(f"{summary['users']} users, {len(vocabulary)} pages; samples {summary['samples']}")
    _check_clusters_fit(config, summary["users_per_split"]["train"])

    models: dict[str, Any] = {}
    params: dict[str, int] = {}
    histories: dict[str, Any] = {}
    folders: dict[str, Path] = {}  # where each model is saved
    max_len = config.prepare.max_len

    with clock("small LM pre-training"):
        torch.manual_seed(config.seed)
        small = build_model(config.model.preset, len(tokenizer), config.model.family, max_positions=max_len)
        if config.model.init_from:
            report = init_from(small, config.model.init_from)
            console.print(f"init from {config.model.init_from}: {len(report.loaded)} tensors loaded, "
                          f"{len(report.skipped)} skipped")
        result = train_lm(small, train, val, config.pretrain, out / "train" / "small", progress=progress)
        name = f"{config.model.preset} single"
        models[name] = ClusterwiseLM.single(small.eval(), tokenizer)
        params[name], histories[name] = count_parameters(small), result.history
        folders[name] = out / "models" / "small"
        models[name].save_pretrained(folders[name])

    z = {}
    if config.kmeans.enabled or config.hetlm.enabled:
        with clock("encoder"):
            enc = config.encoder
            encoder = encoder_from_settings(enc.model_dump() | {"cache_dir": enc.cache_dir or str(out / "embedding_cache")})
            for split, df in (("train", train), ("val", val), ("test", test)):
                z[split] = encoder.transform(df["history"].to_list())
            np.savez(out / "embeddings.npz", **z)
    encoder_info = config.encoder.model_dump()

    if config.kmeans.enabled:
        k = config.kmeans.n_clusters
        with clock(f"k-means K={k} fine-tuning"):
            km = fit_kmeans_clusterwise(small, train, z["train"], val, z["val"], k, config.kmeans.finetune,
                                        out / "train" / f"kmeans_k{k}", encoder_info, progress)
            name = f"{config.model.preset} k-means K={k}"
            models[name], params[name] = km, sum(count_parameters(m) for m in km.models.values())
            histories[name] = km.info.pop("histories")
            folders[name] = out / "models" / f"kmeans_k{k}"
            km.save_pretrained(folders[name], tokenizer)

    final_ks, initial_ks = [], [config.kmeans.n_clusters] if config.kmeans.enabled else []
    if config.hetlm.enabled:
        for label, cfg in config.hetlm.variants():
            folder = "hetlm_" + re.sub(r"[^\w.-]+", "_", label.replace("a=", "a").replace(" b=", "_b"))
            with clock(f"HeTLM {label}"):
                if config.hetlm.processes > 1:
                    het = _fit_hetlm_in_processes(cfg, config.hetlm.processes, out, folder, encoder_info, progress)
                else:
                    het = HeTLM(cfg).fit(small, train, z["train"], val, z["val"], encoder_info, progress,
                                         out / "train" / folder)
            name = f"{config.model.preset} HeTLM {label}"
            models[name], params[name] = het, sum(count_parameters(m) for m in het.models.values())
            histories[name] = het.info["history"]
            final_ks.append(len(het.models))
            initial_ks.append(cfg.n_clusters)
            folders[name] = out / "models" / folder
            if config.hetlm.processes == 1:  # else `hetlm fit-hetlm` saved it there (and it is read from there)
                het.save_pretrained(folders[name], tokenizer)

    larger_name = None
    if config.larger.enabled:
        factor = config.larger.factor
        if factor == "final_k":
            factor = max(final_ks or initial_ks or [2])
        elif factor == "initial_k":
            factor = max(initial_ks or [2])
        if config.larger.preset:
            shape = config.larger.preset
            n = preset_parameters(shape, len(tokenizer), config.model.family, max_len)
            larger_name = f"larger single ({shape}, {n / 1e6:.1f}M)"
        else:
            shape, n = scale_preset(config.model.preset, factor, len(tokenizer), config.model.family, max_len)
            larger_name = f"larger single ({n / 1e6:.1f}M, >= {factor:g}x)"
        with clock("larger LM training"):
            torch.manual_seed(config.seed)
            larger = build_model(shape, len(tokenizer), config.model.family, max_positions=max_len)
            if config.larger.init_from:
                report = init_from(larger, config.larger.init_from)
                console.print(f"larger LM init from {config.larger.init_from}: {len(report.loaded)} tensors loaded, "
                              f"{len(report.skipped)} skipped")
            result = train_lm(larger, train, val, config.pretrain, out / "train" / "larger", progress=progress)
            models[larger_name] = ClusterwiseLM.single(larger.eval(), tokenizer)
            params[larger_name], histories[larger_name] = n, result.history
            folders[larger_name] = out / "models" / "larger"
            models[larger_name].save_pretrained(folders[larger_name])

    bert_encoder = None
    if config.bert_score:
        from .encoders import load_minilm
        bert_encoder = load_minilm()

    results: dict[str, dict] = {}
    # The outcome baseline a marketer would fit first (on the training users), and each LM stacked with it.
    history_lr = HistoryOutcomes().fit(train["history"].to_list(), {o: train[o].to_numpy() for o in OUTCOMES})
    outcome_baselines = {"baseline: history logistic regression": _outcome_summary(
        _outcome_frame(test, history_lr.predict_proba(test["history"].to_list())))}
    sd = config.set_decoder
    # Each model with its own routing, and each clusterwise model again with every other routing asked for.
    entries = [(name, name, model, None) for name, model in models.items()]
    entries += [(f"{name} [routed by {r}]", name, model, r) for name, model in models.items()
                if model.routed for r in config.extra_routings
                if r != model.routing and (r != "selector" or model.selector is not None)]
    for name, model_name, model, routing in entries:
        clusterwise = model.routed
        with clock(f"inference: {name}"):
            t0 = time.perf_counter()
            zt = encoder.transform(test["history"].to_list()) if clusterwise else None  # cached: Table 17's routing cost
            pred = predict(model, test, tokenizer, config.generation, zt, routing, progress=progress,
                           n_samples=sd.n_samples)
            inference_s = time.perf_counter() - t0 - pred.seconds["scoring"]
            results[name] = compute_metrics(pred.pages, test, vocabulary, pred.clusters, pred.first_page_logprobs,
                                            tokenizer, bert_encoder)
            results[name] |= {"params": params[model_name], "inference_seconds": round(inference_s, 2),
                              "kind": "clusterwise" if clusterwise else "single"}
            if clusterwise:
                results[name] |= {"train_cluster_sizes": model.sizes, "routing": routing or model.routing}
                train_clusters = model.route(z["train"], routing, train["input_ids"].to_list())
                _save_clusters(artefact_path(out, "clusters", name), train, train_clusters, test, pred.clusters)
            save_generations(artefact_path(out, "generations", name), test, pred.pages, pred.clusters)
            zv = z["val"] if clusterwise else None
            # Validation evidence: what the set decoder is fitted on, and the outcome stack without Monte Carlo.
            needed = val.height and (sd.enabled or not config.outcome_samples)
            val_pred = predict(model, val, tokenizer, config.generation, zv, routing, progress=False, greedy=False,
                               n_samples=sd.n_samples) if needed else None
        if sd.enabled and val_pred is not None:
            with clock(f"set decoder: {name}"):
                decoder = fit_set_decoder(SetDecoder(sd.n_samples, sd.top_first, sd.max_size, seed=config.seed,
                                                     max_new_tokens=config.generation.max_new_tokens),
                                          val_pred, val, tokenizer)
                if routing is None:  # the model's own routing is what score/serve use
                    decoder.save_pretrained(folders[model_name])
                set_name = f"{name} · set decoder"
                set_pages = set_decoded_pages(decoder, pred, test, tokenizer)
                ranking = decoder.page_scores(test["input_ids"].to_list(), pred.evidence)
                results[set_name] = compute_metrics(set_pages, test, vocabulary, pred.clusters, ranking,
                                                    tokenizer, bert_encoder) | {
                    "kind": "set decoder", "decoder": {"size": decoder.size_ or "expected IoU per user",
                                                       "validation IoU by size rule": decoder.fit_iou_}}
                save_generations(artefact_path(out, "generations", set_name), test, set_pages, pred.clusters)
        with clock(f"outcomes: {name}"):
            if config.outcome_samples:
                mc = {"n_samples": config.outcome_samples, "seed": config.seed,
                      "max_new_tokens": config.generation.max_new_tokens}
                outcomes = outcome_table(model, tokenizer, test, zt, routing, **mc)
                val_outcomes = outcome_table(model, tokenizer, val, zv, routing, **mc) if val.height else None
                if val_outcomes is not None:  # Platt scaling on the validation users, kept with the model for score/serve
                    calibrator = OutcomeCalibrator().fit(val_outcomes, config.outcome_samples)
                    if routing is None:  # the model's own routing is what score/serve use
                        calibrator.save_pretrained(folders[model_name])
                    outcomes = outcomes.with_columns(**{f"p_{o}_calibrated": calibrator.transform(
                        o, outcomes[f"p_{o}"].to_numpy()) for o in OUTCOMES})
            else:
                outcomes = first_page_outcomes(test, pred.first_page_logprobs, tokenizer)
                val_outcomes = first_page_outcomes(val, val_pred.first_page_logprobs, tokenizer) if val_pred else None
            outcomes.write_parquet(_parent_made(artefact_path(out, "outcomes", name)))
            results[name]["outcomes"] = _outcome_summary(outcomes)
            if val_outcomes is not None:  # the LM's probability stacked with the history model's, on val users
                combined = history_lr.stack(val["history"].to_list(), _logits(val_outcomes),
                                            {o: val[o].to_numpy() for o in OUTCOMES})
                probs = combined.predict_proba(test["history"].to_list(), _logits(outcomes))
                outcome_baselines[f"{name} + history model (stacked on val)"] = _outcome_summary(
                    _outcome_frame(test, probs))

    with clock("baselines"):
        histories_in = train["history"].to_list() + val["history"].to_list()
        targets_in = train["target"].to_list() + val["target"].to_list()
        for bname in config.baselines:
            baseline = BASELINES[bname]().fit(histories_in, targets_in)
            pages = baseline.predict(test["history"].to_list())
            results[f"baseline: {bname}"] = compute_metrics(
                pages, test, vocabulary, bert_encoder=bert_encoder, tokenizer=tokenizer,
                first_page_logprobs=baseline_page_scores(baseline, test, tokenizer)) | {"kind": "baseline"}
            save_generations(artefact_path(out, "generations", f"baseline: {bname}"), test, pages,
                             np.zeros(len(pages), int))

    reference = larger_name or next(iter(models))
    for name, r in results.items():
        if name != reference:
            for ties, key in (("loss", "composite_vs_"), ("win", "composite_ties_win_vs_")):
                r[key + _slug(reference)] = M.composite_score(r["combined"], results[reference]["combined"], ties)

    run = {
        "name": config.name, "reference": reference, "outcome_samples": config.outcome_samples, "data": summary,
        "results": results, "outcome_baselines": outcome_baselines,
        "seconds": clock.seconds, "histories": histories,
        "environment": environment(),
        "data_fingerprint": {"input": sha256(config.path)}
        | {f"prepared/{s}.parquet": sha256(out / "prepared" / f"{s}.parquet") for s in ("train", "val", "test")},
    }
    (out / "results.json").write_text(json.dumps(run, indent=1, default=_json_default))
    (out / "tables.md").write_text(tables_markdown(run))
    from .report import (
        write_report,  # imported here: the report module imports this one (and matplotlib)
    )

    report = write_report(out)
    console.print(M.format_table({n: r["combined"] | r.get("extra", {}) for n, r in results.items()},
                                 metrics=["HR", "IoA", "IoP", "IoU", "Val-P", "New-P", "F1-Cart/Purchase", "BLEU",
                                          "MRR"], title="Combined over test users"))
    console.print(f"stage times (s): {clock.seconds}")
    console.print(f"run folder: {out}  (tables.md, results.json, {report.html.name})")
    return run


def _check_clusters_fit(config: ExperimentConfig, train_users: int) -> None:
    """Before any training: every clustering needs at least as many training users as clusters."""
    asked = [("kmeans.n_clusters", config.kmeans.n_clusters)] if config.kmeans.enabled else []
    if config.hetlm.enabled:
        asked += [(f"hetlm run {label}: n_clusters", cfg.n_clusters) for label, cfg in config.hetlm.variants()]
    for what, k in asked:
        if k > train_users:
            raise DataError(f"{what} = {k} clusters, but the prepared log has {train_users} training users; "
                            f"lower it or use a larger log")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


BERTSCORE_NOTE = ("BERTScore is computed with all-MiniLM-L6-v2 token embeddings (not roberta-large): not comparable "
                  "with the paper's BERTScore values.")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


def artefact_path(run_dir: str | Path, folder: str, name: str) -> Path:
    """RUN/<folder>/<model>.parquet: where a run keeps one model's generations, outcomes or clusters
    (the model's name as a slug; 'baseline: markov' -> baseline_markov)."""
    return Path(run_dir) / folder / f"{_slug(name.replace('baseline: ', 'baseline_'))}.parquet"


def _parent_made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_clusters(path: Path, train: pl.DataFrame, train_clusters: np.ndarray, test: pl.DataFrame,
                   test_clusters: np.ndarray) -> None:
    """Final cluster of every train and test sample; `row` indexes the split's samples (and embeddings)."""
    frames = [df.select("user").with_row_index("row").with_columns(split=pl.lit(split),
                                                                   cluster=pl.Series(c.astype(int)))
              for split, df, c in (("train", train, train_clusters), ("test", test, test_clusters))]
    pl.concat(frames).write_parquet(_parent_made(path))


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


def paper_tables(run: dict) -> dict[str, dict[str, dict[str, float]]]:
    """The paper's Tables 2-6 and 17 (and two beyond it) from a finished run: title -> rows (model -> metrics)."""
    results, ref = run["results"], run["reference"]

    def rows(metric_names, with_clusters=True):
        out = {}
        for name, r in results.items():
            if with_clusters and r.get("kind") == "clusterwise":
                for k, m in sorted(r["clusters"].items(), key=lambda kv: int(kv[0])):
                    out[f"{name} / cluster {k} (N={m['n']})"] = {n: m[n] for n in metric_names}
                out[f"{name} / Combined (N={r['combined']['n']})"] = {n: r["combined"][n] for n in metric_names}
            else:
                out[name] = {n: r["combined"][n] for n in metric_names}
        return out

    composite_key, ties_key = "composite_vs_" + _slug(ref), "composite_ties_win_vs_" + _slug(ref)
    composite = {n: r[composite_key] for n, r in results.items() if composite_key in r}
    composite_ties = {n: r[ties_key] for n, r in results.items() if ties_key in r}
    bleu_bert = {n: {k: v for k, v in r["extra"].items() if k.startswith(("BLEU", "BERTScore"))} for n, r in results.items()}
    ranking = {n: {k: v for k, v in r["extra"].items() if not k.startswith(("BLEU", "BERTScore"))}
               for n, r in results.items()}
    n_draws = run.get("outcome_samples")
    outcome_estimator = f"Monte Carlo, {n_draws} sampled sessions per user" if n_draws else "P(first page = Cart / Purchase)"
    outcomes = {n: r["outcomes"] for n, r in results.items() if "outcomes" in r} | run.get("outcome_baselines", {})
    timing = {n: {"params (M)": r["params"] / 1e6, "inference s (test set)": r["inference_seconds"]}
              for n, r in results.items() if "inference_seconds" in r}
    return {
        "Table 2: page generation (higher is better)": rows(M.GENERATION_MEANS),
        f"Table 3: composite vs {ref} (strict: share of metrics where the model is better; ties are not wins)":
            composite,
        f"Table 3 as the paper counts: composite vs {ref} (ties count as wins)": composite_ties,
        "Table 4: outcome prediction (higher is better)": rows(M.OUTCOME_METRICS),
        "Table 5: variance of page generation across users (lower is better)": rows(M.VARIANCES),
        "Table 6: BLEU and BERTScore": bleu_bert,
        "Beyond the paper: ranking of the first next page, outcome AUC": ranking,
        f"Beyond the paper: P(Cart) and P(Purchase) in the next session ({outcome_estimator})": outcomes,
        "Table 17: inference time of the whole test set": timing,
        "Stage wall times (s)": {"seconds": run["seconds"]},
    }


def tables_markdown(run: dict) -> str:
    """The paper's Tables 2-6 and 17 from a finished run's results, as Markdown."""
    results, ref, data = run["results"], run["reference"], run["data"]
    parts = [
        f"# {run['name']}: results\n",
        f"Data: {data['source']} `{data['path']}`: {data['users']} users, {data['pages']} pages, samples "
        f"{data['samples']}. Test users: {results[ref]['combined']['n']}. Reference for composites: **{ref}**.\n",
        BERTSCORE_NOTE + "\n",
    ]
    for title, rows in paper_tables(run).items():
        parts += [f"## {title}\n", M.markdown_table(rows)]
    return "\n".join(parts)
