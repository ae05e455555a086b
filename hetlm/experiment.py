"""The paper's Step 2 on one dataset, from a config: prepare -> small LM -> k-means clusterwise ->
HeTLM (a list of alpha, beta) -> parameter-matched larger LM -> evaluation of all of them and of the
baselines (hetlm.assessment) -> the paper's Tables 2-6 and 17 (hetlm.tables), results.json and the report,
in one run folder (its layout: hetlm.runs).

`run_experiment` is a short driver: each training stage returns one `TrainedModel` record, the evaluation
stage one `ModelResult` per evaluated model.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.markup import escape

from . import metrics as M
from .assessment import Clock, Evaluation, Samples, SetDecoderConfig, TrainedModel, console
from .baselines import BASELINES
from .cluster.base import ClusterwiseLM
from .cluster.hetlm import HeTLM, HeTLMConfig
from .cluster.kmeans import KMeansClusterwise
from .config import one_of
from .encoders import encoder_from_settings
from .evaluate import GenerationConfig
from .fit_hetlm import HeTLMJob, fit_in_processes
from .ingest import SOURCES
from .models import PRESETS, Preset, count_parameters, preset_parameters, scale_preset
from .prepare import PrepareConfig, prepare
from .outputs import os_error_message, write_atomically, writable_folder
from .provenance import environment, fingerprint, sha256
from .report import write_report
from .runs import LARGER, SMALL, SPLITS, ModelResult, RunFolder, RunResult, hetlm_folder, kmeans_folder
from .sessions import DataError
from .single import ModelConfig, PresetName, train_single
from .tables import tables_markdown
from .tokenizer import load_tokenizer
from .train import TrainConfig

SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data" / "taobao-sample" / "UserBehavior_sample.csv.gz"


class KMeansConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    n_clusters: int = Field(6, ge=2)
    finetune: TrainConfig = TrainConfig(lr=3e-4, epochs=2, early_stopping_patience=None)


class HeTLMRunsConfig(BaseModel):
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
    def _runs_are_configs(self) -> HeTLMRunsConfig:
        self.variants()  # every run must give a valid HeTLMConfig
        return self

    def variants(self) -> list[tuple[str, HeTLMConfig]]:
        """(label, config) per run; the label names alpha, beta and any other field the run sets."""
        fields = set(HeTLMConfig.model_fields)
        out = []
        for i, run in enumerate(self.runs):
            changes = dict(zip(("alpha", "beta"), run)) if isinstance(run, tuple) else dict(run)
            if set(changes) - fields:
                raise ValueError(f"runs[{i}]: unknown HeTLMConfig fields {sorted(set(changes) - fields)}")
            cfg = HeTLMConfig.model_validate(self.config.model_dump() | changes)
            others = " ".join(f"{k}={v}" for k, v in changes.items() if k not in ("alpha", "beta"))
            out.append((f"a={cfg.alpha:g} b={cfg.beta:g}" + (f" {others}" if others else ""), cfg))
        return out


class LargerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # x the small LM's parameters. initial_k (the paper: 6 x OPT-350M vs OPT-2.7B) = the largest initial K
    # of the clusterwise runs, what HeTLM and k-means start with; final_k = the largest final K of HeTLM.
    # A number must be finite and > 1 (else the "larger" LM is the small one's size); 100 x bounds the search.
    factor: Annotated[float, Field(gt=1, le=100, allow_inf_nan=False)] | Literal["initial_k", "final_k"] = "initial_k"
    # released weights for the larger LM (a shape of the small LM's family): with model.init_from set and
    # this not, the small LM and every cluster LM start from released weights and the larger LM does not.
    init_from: str | None = None
    # a named preset instead of a scaled shape (e.g. "opt-2.7b", whose released weights init_from can load)
    preset: PresetName | None = None


class EncoderConfig(BaseModel):
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


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    source: str = "taobao"
    path: str = str(SHIPPED_DATA)
    source_options: dict[str, Any] = {}
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    pretrain: TrainConfig = TrainConfig(epochs=3, early_stopping_patience=None)
    larger: LargerConfig = LargerConfig()
    kmeans: KMeansConfig = KMeansConfig()
    hetlm: HeTLMRunsConfig = HeTLMRunsConfig()
    encoder: EncoderConfig = EncoderConfig()
    generation: GenerationConfig = GenerationConfig()
    set_decoder: SetDecoderConfig = SetDecoderConfig()
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
        return one_of(source, SOURCES, "source")

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        return [one_of(name, BASELINES, "baseline") for name in names]

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


class RunFolderInUse(ValueError):
    """--out holds another run, and replacing it was not asked for."""


def run_experiment(config: ExperimentConfig, out: str | Path, progress: bool = True,
                   overwrite: bool = False) -> RunResult:
    """The whole experiment into the run folder `out`. A folder that holds a run of another config is
    refused unless `overwrite`; a run of the same config is started again. Either way the old run's files
    are removed first, so the folder never mixes two runs."""
    run, clock = start_run(config, out, overwrite), Clock()
    torch.manual_seed(config.seed)
    with clock("prepare"):
        data = prepare_samples(config, run)
    with clock("small LM pre-training"):
        small = fit_single(config, f"{config.model.preset} single", config.model, data, run, SMALL, progress)
    trained, encoder = [small], None
    if config.kmeans.enabled or config.hetlm.enabled:
        with clock("encoder"):
            encoder = embed(config, data, run)
    if config.kmeans.enabled:
        with clock(f"k-means K={config.kmeans.n_clusters} fine-tuning"):
            trained.append(fit_kmeans(config, small, data, run, progress))
    hetlms = []
    for label, cfg in config.hetlm.variants() if config.hetlm.enabled else []:
        with clock(f"HeTLM {label}"):
            hetlms.append(fit_hetlm(config, label, cfg, small, data, run, progress))
    trained += hetlms
    if config.larger.enabled:
        with clock("larger LM training"):
            trained.append(train_larger(config, data, run, progress, [len(h.model.models) for h in hetlms]))

    evaluation = Evaluation(data, run, clock, encoder, config.generation, config.set_decoder, config.outcome_samples,
                            config.seed, config.bert_score, progress)
    # Each model with its own routing, and each clusterwise model again with every other routing asked for.
    entries = [(t, None) for t in trained] + [(t, r) for t in trained for r in t.extra_routings(config.extra_routings)]
    for model, routing in entries:
        evaluation.evaluate_lm(model, routing)
    with clock("baselines"):
        evaluation.evaluate_baselines(config.baselines)
    reference = trained[-1].name if config.larger.enabled else small.name
    add_composites(evaluation.results, reference)
    result = RunResult(
        name=config.name, reference=reference, outcome_samples=config.outcome_samples, data=data.summary,
        results=evaluation.results, outcome_baselines=evaluation.outcome_baselines, seconds=clock.seconds,
        histories={t.name: t.history for t in trained}, environment=environment(),
        data_fingerprint=run_fingerprints(config, run))
    write_run(result, run, clock)
    return result


def start_run(config: ExperimentConfig, out: str | Path, overwrite: bool) -> RunFolder:
    """The run folder, emptied of any earlier run (see `run_experiment`), with this run's config.json."""
    run = RunFolder(out)
    writable_folder(run.path)
    if not run.holds_run() and run.layout_entries():  # never remove files that no run of ours wrote
        names = ", ".join(p.name for p in run.layout_entries())
        raise RunFolderInUse(f"--out {run.path} holds {names} but no run's config.json: choose another --out")
    if run.holds_run():
        same = run.config_file.is_file() and run.config_file.read_text() == config.model_dump_json(indent=2)
        if not (same or overwrite):
            raise RunFolderInUse(f"--out {run.path} holds another run (its config.json differs from this one); "
                                 f"choose another --out, or pass --overwrite to replace that run")
        console.print(f"replacing the run in {run.path}")
        run.clear()
    write_atomically(run.config_file, config.model_dump_json(indent=2))
    return run


def run_fingerprints(config: ExperimentConfig, run: RunFolder) -> dict[str, str]:
    """sha256 of the input log (a file, or a folder's or glob's files: `provenance.fingerprint`), of the
    prepared samples and of config.json; `hetlm report` checks the last two against the folder."""
    found = {f"prepared/{s}.parquet": sha256(run.split(s)) for s in SPLITS} | {"config.json": sha256(run.config_file)}
    try:
        return {"input": fingerprint(config.path)} | found
    except OSError as err:  # the log moved or changed since prepare: the run is still recorded
        console.print(f"[yellow]warning:[/] the input log is not fingerprinted ({os_error_message(err)})")
        return found


def prepare_samples(config: ExperimentConfig, run: RunFolder) -> Samples:
    summary = prepare(config.source, config.path, run.prepared, config.prepare, **config.source_options)
    data = Samples(*(pl.read_parquet(run.split(s)) for s in SPLITS), load_tokenizer(run.prepared / "tokenizer"),
                   summary)
    console.print(f"{summary['users']} users, {len(data.vocabulary)} pages; samples {summary['samples']}")
    _check_clusters_fit(config, summary["users_per_split"]["train"])
    console.print(plan(config, data.train.height), highlight=False)
    return data


def _steps(train: TrainConfig, samples: int) -> int:
    steps = train.epochs * math.ceil(math.ceil(samples / train.batch_size) / train.grad_accum)
    return min(steps, train.max_steps) if train.max_steps else steps


def plan(config: ExperimentConfig, n_train: int) -> str:
    """What the run will train, in steps, said before it starts; each stage then prints its own `about N min`
    once its first steps are timed (`progress.Estimate`), so a run that would take too long can be stopped early."""
    stages = [f"small LM {_steps(config.pretrain, n_train):,} steps"]
    if config.kmeans.enabled:  # the clusters share the training samples
        stages.append(f"k-means K={config.kmeans.n_clusters} about {_steps(config.kmeans.finetune, n_train):,} steps "
                      "over all clusters")
    for label, cfg in config.hetlm.variants() if config.hetlm.enabled else []:
        batches = (cfg.critic_warmup_epochs + cfg.epochs) * math.ceil(n_train / cfg.batch_size)
        stages.append(f"HeTLM {label} {batches:,} batches of {cfg.n_clusters} predictors")
    if config.larger.enabled:
        stages.append(f"larger LM {_steps(config.pretrain, n_train):,} steps")
    return f"plan: {'; '.join(stages)}; then every model and baseline is evaluated on the test users"


def _check_clusters_fit(config: ExperimentConfig, train_users: int) -> None:
    """Before any training: every clustering needs at least as many training users as clusters."""
    asked = [("kmeans.n_clusters", config.kmeans.n_clusters)] if config.kmeans.enabled else []
    if config.hetlm.enabled:
        asked += [(f"hetlm run {label}: n_clusters", cfg.n_clusters) for label, cfg in config.hetlm.variants()]
    for what, k in asked:
        if k > train_users:
            raise DataError(f"{what} = {k} clusters, but the prepared log has {train_users} training users; "
                            f"lower it or use a larger log")


def fit_single(config: ExperimentConfig, name: str, model: ModelConfig, data: Samples, run: RunFolder, folder: str,
               progress: bool, shape: Preset | None = None, params: int | None = None) -> TrainedModel:
    """One LM (`hetlm.single.train_single`) trained as `config.pretrain` says, into models/<folder>; its set
    decoder is fitted by the evaluation stage, with the run's settings."""
    single, result = train_single(model, config.pretrain, data.train, data.val, data.tokenizer, run.train(folder),
                                  run.model(folder), shape, config.prepare.max_len, config.seed, fit_decoder=False,
                                  progress=progress, name=name)
    return TrainedModel(name, single, run.model(folder), params or count_parameters(single.models[0]),
                        result.history)


def embed(config: ExperimentConfig, data: Samples, run: RunFolder):
    """The users' embeddings of every split (into `data.z` and embeddings.npz); returns the encoder."""
    settings = config.encoder.model_dump()
    encoder = encoder_from_settings(settings | {"cache_dir": settings["cache_dir"] or str(run.embedding_cache)})
    data.z = {split: encoder.transform(df["history"].to_list()) for split, df in zip(SPLITS, (data.train, data.val,
                                                                                            data.test))}
    np.savez(run.embeddings, **data.z)
    return encoder


def fit_kmeans(config: ExperimentConfig, small: TrainedModel, data: Samples, run: RunFolder,
               progress: bool) -> TrainedModel:
    k, folder = config.kmeans.n_clusters, kmeans_folder(config.kmeans.n_clusters)
    # set_decoder=False: the evaluation fits the configured set decoder into the folder (`SetDecoderConfig`)
    km = KMeansClusterwise(k, run.train(folder), config.kmeans.finetune, progress, set_decoder=False).fit(
        small.lm, data.train, data.z["train"], data.val, data.z["val"], config.encoder.model_dump())
    km.save_pretrained(run.model(folder), data.tokenizer)
    return TrainedModel(f"{config.model.preset} k-means K={k}", km.model_, run.model(folder),
                        sum(count_parameters(m) for m in km.model_.models.values()), km.histories_)


def fit_hetlm(config: ExperimentConfig, label: str, cfg: HeTLMConfig, small: TrainedModel, data: Samples,
              run: RunFolder, progress: bool) -> TrainedModel:
    """One HeTLM run, here or (hetlm.processes > 1) in processes started by torchrun on the run folder's files."""
    folder = hetlm_folder(label)
    if config.hetlm.processes > 1:
        het = _fit_in_processes(run, folder, cfg, config.encoder.model_dump(), config.hetlm.processes, progress)
    else:
        het = HeTLM(cfg, run.train(folder), progress=progress, set_decoder=False).fit(
            small.lm, data.train, data.z["train"], data.val, data.z["val"], config.encoder.model_dump()).model_
        het.save_pretrained(run.model(folder), data.tokenizer)
    return TrainedModel(f"{config.model.preset} HeTLM {label}", het, run.model(folder),
                        sum(count_parameters(m) for m in het.models.values()), het.info["history"])


def _fit_in_processes(run: RunFolder, folder: str, cfg: HeTLMConfig, encoder: dict, processes: int,
                      progress: bool) -> ClusterwiseLM:
    """HeTLM in `processes` processes on the files the run has written: prepared samples, models/small,
    embeddings.npz; the model is saved to models/<folder> and read back."""
    job = HeTLMJob(prepared=run.prepared, base=run.model(SMALL), embeddings=run.embeddings, out=run.model(folder),
                   config=cfg, encoder=encoder, checkpoints=run.train(folder), progress=progress,
                   set_decoder=False)
    return fit_in_processes(job, processes, run.train(folder) / "fit_hetlm.json")


def train_larger(config: ExperimentConfig, data: Samples, run: RunFolder, progress: bool,
                 final_ks: list[int]) -> TrainedModel:
    """The single LM with as many parameters as `larger.factor` small LMs (or of the preset `larger.preset`)."""
    initial_ks = [config.kmeans.n_clusters] if config.kmeans.enabled else []
    initial_ks += [cfg.n_clusters for _, cfg in config.hetlm.variants()] if config.hetlm.enabled else []
    factor, max_len = config.larger.factor, config.model.max_positions or config.prepare.max_len
    if factor == "final_k":
        factor = max(final_ks or initial_ks or [2])
    elif factor == "initial_k":
        factor = max(initial_ks or [2])
    model, shape = config.model.model_copy(update={"init_from": config.larger.init_from}), None
    if config.larger.preset:
        model.preset = config.larger.preset
        n = preset_parameters(model.preset, len(data.tokenizer), config.model.family, max_len)
        name = f"larger single ({model.preset}, {n / 1e6:.1f}M)"
    else:
        shape, n = scale_preset(config.model.preset, factor, len(data.tokenizer), config.model.family, max_len)
        name = f"larger single ({n / 1e6:.1f}M, >= {factor:g}x)"
    return fit_single(config, name, model, data, run, LARGER, progress, shape, params=n)


def add_composites(results: dict[str, ModelResult], reference: str) -> None:
    """Each model's composite scores against the reference (paper Table 3), strict and with ties as wins."""
    ref = results[reference].combined
    for name, r in results.items():
        if name != reference:
            r.composite = M.composite_score(r.combined, ref, "loss")
            r.composite_ties_win = M.composite_score(r.combined, ref, "win")


def _write_extra(file: Path, write):
    """What `write()` returns; None (with a warning) if it fails: results.json is written by then, so any
    failure is reported and the run goes on."""
    try:
        return write()
    except Exception as err:  # noqa: BLE001
        reason = os_error_message(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
        console.print(f"[bold yellow]warning:[/] {file.name} not written ({reason})")
        return None


def write_run(result: RunResult, run: RunFolder, clock: Clock) -> None:
    """results.json first, then tables.md and the report: a failing extra is a message, never a lost run."""
    run.write_results(result)
    tables = _write_extra(run.tables_file, lambda: write_atomically(run.tables_file, tables_markdown(result)))
    report = _write_extra(run.report_file, lambda: write_report(run.path))
    console.print(M.format_table({n: r.combined | r.extra for n, r in result.results.items()},
                                 metrics=["HR", "IoA", "IoP", "IoU", "Val-P", "New-P", "F1-Cart/Purchase", "BLEU",
                                          "MRR"], title="Combined over test users"))
    for line in report.verdict.lines() if report and report.verdict else []:
        console.print(escape(line))
    console.print(f"stage times (s): {clock.seconds}")
    written = [f.name for f, ok in ((run.results_file, True), (run.tables_file, tables), (run.report_file, report))
               if ok]
    retry = "" if report else f"; rerun `hetlm report {run.path}` for the report"
    console.print(f"run folder: {run.path}  ({', '.join(written)}{retry})")
