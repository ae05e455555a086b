"""hetlm: learn the language of browsing from click logs, one command per stage (prepare, train, generate,
evaluate, experiment, report, score, serve)."""

# A thin layer over the Python API. Long because it declares every command's options (typer reads them from
# the signatures; the log-reading options are shared as annotated types, but each command that reads a log
# must still list them); the work is done by the modules each command calls, imported inside the commands
# so that `hetlm --help`, `--version` and a path error stay fast.

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

# How a log is read and cut into sessions: options shared by `prepare`, `score` and `serve`.
UserColumn = Annotated[Optional[str], typer.Option(help="generic: user column; ga4: user_pseudo_id (default) or user_id")]
PageColumn = Annotated[Optional[str], typer.Option(
    help="generic: page column; ga4: page_location (default) or page_title; adobe: post_pagename (default) or post_page_url")]
TimeColumn = Annotated[Optional[str], typer.Option(help="generic: timestamp column (unix or date/time text)")]
SessionColumn = Annotated[Optional[str], typer.Option(help="generic: session id column")]
EventColumn = Annotated[Optional[str], typer.Option(help="generic: event type column (cart/purchase values)")]
OrderColumn = Annotated[Optional[str], typer.Option(help="generic: numeric column added to the time in ms")]
Separator = Annotated[Optional[str], typer.Option(help="generic: CSV delimiter")]
TimeFormat = Annotated[Optional[str], typer.Option(help="generic: strftime format of the time column")]
TimeUnit = Annotated[Optional[str], typer.Option(help="generic: unit of a numeric time column (s or ms)")]
PagePrefix = Annotated[Optional[str], typer.Option(help="generic: text put before each page value")]
ItemField = Annotated[Optional[str], typer.Option(help="ga4: view_item pages from item_name (default), item_category or none")]
CartEvents = Annotated[Optional[str], typer.Option(
    help="generic, ga4, adobe: comma list of event values read as Cart (e.g. 3 or addtocart; ga4 add_to_cart, adobe 12)")]
PurchaseEvents = Annotated[Optional[str], typer.Option(
    help="generic, ga4, adobe: comma list of event values read as Purchase (e.g. 6 or transaction; ga4 purchase, adobe 1)")]
_GAP, _COLLAPSE = "inactivity gap that splits sessions", "collapse immediate repeats of the same page"
_MIN_LEN, _LONG = "drop sessions shorter than this (pages)", "truncate | drop sessions above the cutoff"
GapMinutes = Annotated[float, typer.Option(help=_GAP)]
CollapseRepeats = Annotated[bool, typer.Option(help=_COLLAPSE)]
MinSessionLen = Annotated[int, typer.Option(help=_MIN_LEN)]
LongPercentile = Annotated[float, typer.Option(help="session-length percentile cutoff")]
LongSessions = Annotated[str, typer.Option(help=_LONG)]


def _as_trained(kind: type, text: str):
    """score/serve: an option that changes how prepare cleaned the model's training log (`SessionCleaning`)."""
    return Annotated[Optional[kind], typer.Option(help=f"{text} (default: as the model's training log was prepared)")]


GapOverride, CollapseOverride = _as_trained(float, _GAP), _as_trained(bool, _COLLAPSE)
MinLenOverride, LongOverride = _as_trained(int, _MIN_LEN), _as_trained(str, _LONG)
LongCutoffOverride = _as_trained(int, "session length (pages) above which sessions are long")
SkipBadRows = Annotated[bool, typer.Option(help="drop bad rows and count them instead of stopping")]
EmbeddingCache = Annotated[Optional[Path], typer.Option(
    help="clusterwise models: folder caching the routing encoder's embeddings (default: no disk cache)")]
Partitions = Annotated[int, typer.Option(help="logs larger than memory: hash users into N partitions done one at a time")]


def _override_cleaning(scorer, **given) -> None:
    """The given (not None) options replace the scorer's cleaning settings."""
    scorer.cleaning = dataclasses.replace(scorer.cleaning, **{k: v for k, v in given.items() if v is not None})


# Every command's settings: its config model from --config, then the typed options given, then --set.
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="JSON file of the command's settings")]


def _overrides(example: str):
    """--set, with an example key of the command's own config (SET_EXAMPLES; a test loads each)."""
    return Annotated[Optional[list[str]], typer.Option(
        "--set", help=f"KEY=VALUE setting, applied last (repeatable; dotted keys reach nested ones), e.g. {example}")]


# command -> a --set example valid for its config model
SET_EXAMPLES = {"prepare": "gap_minutes=60", "train": "train.warmup_ratio=0.1", "fit-hetlm": "epochs=2",
                "generate": "max_new_tokens=20", "experiment": "pretrain.epochs=1", "score": "n_samples=32",
                "serve": "max_batch=16"}


def _given(ctx: typer.Context, fields: dict[str, str] | None = None, **options) -> dict:
    """The options given on the command line (not left at their defaults), named as the config's fields
    (`fields` maps the option names that differ)."""
    fields = fields or {}
    # By name: typer may run on its own copy of click, whose ParameterSource is another enum than click's.
    return {fields.get(name, name): value for name, value in options.items()
            if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}


def _config(model_cls, path: Optional[Path], options: dict, overrides: Optional[list[str]]):
    """The command's config (`hetlm.config.load_config`); a bad file, key or value stops with its message."""
    from .config import load_config

    try:
        return load_config(model_cls, path, options, overrides or ())
    except (ValueError, OSError) as err:
        _fail(err)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=max(Console().width, 200))  # 20+ metric columns stay readable

# Not --nproc: torchrun's parser would take it for an abbreviation of its own --nproc-per-node.
Processes = Annotated[int, typer.Option(help="processes on this machine (one per GPU): runs this command under torchrun")]


def _become_torchrun(processes: int) -> None:
    """With processes > 1 and not yet under torchrun: replace this process by torchrun running this command."""
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={processes}", "-m", "hetlm.cli", *sys.argv[1:]])


def _environment_defaults() -> None:
    """The environment every command runs in, unless the user set otherwise: nothing downloaded, and no
    tokenizer or OpenMP threads competing with torch. Set when a command runs (not when this module is
    imported), before any command imports transformers or torch, which read it at their import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting slow torch 10x or more when the CPU is shared.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"hetlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """hetlm: learn the language of browsing from click logs."""
    _environment_defaults()


def _fail(err: Exception) -> None:
    from .outputs import os_error_message

    console.print(f"[bold red]error:[/] {os_error_message(err) if isinstance(err, OSError) else err}")
    raise typer.Exit(2)


def _on_interrupt(left: str):
    """A command that, on Ctrl-C (at any point: its imports take seconds), says what its --out holds."""
    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                console.print(f"[bold red]interrupted:[/] nothing written to {kwargs['out']} ({left}); rerun to finish")
                raise typer.Exit(130) from None
        return run
    return wrap


def _write_run_record(out: Path, config: dict, prepared: Path) -> None:
    """out/run.json: the resolved settings, versions, git revision and the prepared data's fingerprints."""
    from .outputs import write_atomically
    from .provenance import environment, sha256

    out.mkdir(parents=True, exist_ok=True)
    data = {f"{s}.parquet": sha256(prepared / f"{s}.parquet") for s in ("train", "val")
            if (prepared / f"{s}.parquet").exists()}
    record = {"config": config, "data": str(prepared), "data_fingerprint": data, "environment": environment()}
    write_atomically(out / "run.json", json.dumps(record, indent=1))


@app.command()
@_on_interrupt("its previous complete output, if any, is unchanged")
def prepare(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="generic | taobao | rees46 | ga360 | otto | msnbc | ga4 | adobe"),
    path: Path = typer.Argument(..., help="the log file (ga360, ga4, adobe: or a folder, or a quoted glob)"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    user: UserColumn = None,
    page: PageColumn = None,
    time: TimeColumn = None,
    session: SessionColumn = None,
    event: EventColumn = None,
    order: OrderColumn = None,
    sep: Separator = None,
    time_format: TimeFormat = None,
    time_unit: TimeUnit = None,
    page_prefix: PagePrefix = None,
    items: ItemField = None,
    cart_events: CartEvents = None,
    purchase_events: PurchaseEvents = None,
    gap_minutes: GapMinutes = 30.0,
    collapse_repeats: CollapseRepeats = True,
    min_session_len: MinSessionLen = 2,
    long_percentile: LongPercentile = 99.0,
    long_sessions: LongSessions = "truncate",
    samples: str = typer.Option("auto", help="auto | next-session | within-session"),
    split: str = typer.Option("time", help="time (targets after a cutoff are test) | user (paper)"),
    test_fraction: float = typer.Option(0.1, help="time split: share of the latest target start times that are test; "
                                                 "user split: share of the users"),
    val_fraction: float = typer.Option(0.05, help="the same for validation (just before the test cutoff)"),
    test_targets: str = typer.Option("first", help="first | all test targets per user"),
    max_train_targets: Optional[int] = typer.Option(None, help="keep each user's N most recent training targets"),
    max_len: int = typer.Option(512, help="token budget of history + target"),
    min_page_count: int = typer.Option(1, help="pages seen fewer times in training -> [UNK]"),
    skip_bad_rows: SkipBadRows = False,
    partitions: Partitions = 1,
    sample_users: Optional[float] = typer.Option(None, help="keep this fraction of the users (a hash sample, "
                                                 "the same every run): to try a big log quickly"),
    seed: int = typer.Option(0, help="seed of the user split and of --sample-users"),
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["prepare"]) = None,
) -> None:
    """Click log -> tokenized next-session samples (train/val/test Parquet), tokenizer, summary.

    ga360, ga4 and adobe logs may be a folder or a quoted glob of day files. Every setting: --config (JSON of
    `PrepareConfig`) and --set <field>=..."""
    from pydantic import ValidationError

    from .ingest import IngestError
    from .ingest.base import SKIP_FLAG, skip_spelling
    from .prepare import PrepareConfig
    from .prepare import prepare as run_prepare

    options = _source_options(source, user=user, page=page, time=time, session=session, event=event, order=order,
                              sep=sep, time_format=time_format, time_unit=time_unit, page_prefix=page_prefix,
                              items=items, cart_events=cart_events, purchase_events=purchase_events)
    given = _given(ctx, {"long_percentile": "long_session_percentile", "max_train_targets": "max_train_targets_per_user",
                         "skip_bad_rows": "on_bad_rows"},
                   gap_minutes=gap_minutes, collapse_repeats=collapse_repeats, min_session_len=min_session_len,
                   long_percentile=long_percentile, long_sessions=long_sessions, samples=samples, split=split,
                   test_fraction=test_fraction, val_fraction=val_fraction, test_targets=test_targets,
                   max_train_targets=max_train_targets, max_len=max_len, min_page_count=min_page_count,
                   partitions=partitions, sample_users=sample_users, seed=seed,
                   skip_bad_rows="skip" if skip_bad_rows else "error")
    cfg = _config(PrepareConfig, config, given, overrides)
    try:
        with _warnings_shown():
            summary = run_prepare(source, path, out, cfg, **options)
    except (IngestError, ValidationError, ValueError, OSError) as err:
        with skip_spelling(SKIP_FLAG):
            _fail(err)
    _print_summary(summary, out)


# The log options each source takes.
SOURCE_OPTIONS = {
    "generic": {"user", "page", "time", "session", "event", "order", "sep", "time_format", "time_unit", "page_prefix",
                "cart_events", "purchase_events"},
    "ga4": {"user", "page", "items", "cart_events", "purchase_events"},
    "adobe": {"page", "cart_events", "purchase_events"},
}


def _source_options(source: str, **given: Optional[str]) -> dict[str, str]:
    """The log options that were given (an error for options the source does not take)."""
    options = {k: v for k, v in given.items() if v is not None}
    wrong = sorted(set(options) - SOURCE_OPTIONS.get(source, set()))
    if wrong:
        takes = sorted(SOURCE_OPTIONS.get(source, set()))
        _fail(ValueError(f"options {wrong} do not apply to the {source} source"
                         + (f" (it takes {takes})" if takes else " (only to generic, ga4 and adobe logs)")))
    if options.get("items") == "none":
        options["items"] = None
    return options


@contextlib.contextmanager
def _warnings_shown():
    """Warnings about the log (e.g. no outcome events) printed plainly, not as Python's source lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for warning in caught:
                console.print(f"[bold yellow]warning:[/] {warning.message}", highlight=False)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    from .prepare import summary_rows

    t = Table(title=f"prepared {summary['source']} -> {out} (all figures: {out / 'summary.json'})", show_header=False)
    for label, text in summary_rows(summary):
        t.add_row(label, text)
    console.print(t, highlight=False)


def _writable(out: Path, file: bool = False) -> None:
    """Stop unless --out can be written: a folder (or, `file`, a file in one) that exists or can be made."""
    from .outputs import writable_folder

    try:
        if file and out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file path")
        writable_folder(out.parent if file else out, "the folder of --out" if file else "--out")
    except ValueError as err:
        _fail(err)


def _check_prepared(prepared: Path) -> dict:
    """Its summary; stop unless `prepared` is a complete, unchanged output of `hetlm prepare`
    (`outputs.check_prepared`)."""
    from .outputs import IncompleteOutput, check_prepared

    try:
        return check_prepared(prepared)
    except IncompleteOutput as err:
        _fail(err)


def _exists(path: Path, what: str) -> None:
    if not path.exists():
        _fail(FileNotFoundError(f"{what} {path} does not exist"))


def _split_path(prepared: Path, split: str) -> Path:
    path = prepared / f"{split}.parquet"
    if not path.is_file():
        _fail(FileNotFoundError(f"{path} not found: run `hetlm prepare ... --out {prepared}` first"))
    return path


def _load_split(prepared: Path, split: str):
    import polars as pl

    return pl.read_parquet(_split_path(prepared, split))


@app.command()
def train(
    ctx: typer.Context,
    prepared: Path = typer.Argument(..., help="folder written by `hetlm prepare`"),
    out: Path = typer.Option(..., "--out", help="run folder: best/ (save_pretrained), checkpoint/, history.json"),
    preset: str = typer.Option("tiny", help="tiny | small | base | opt-350m | opt-2.7b | qwen2.5-0.5b | qwen2.5-7b | smollm2-360m"),
    family: Optional[str] = typer.Option(None, help="llama | qwen2 | opt (for tiny/small/base)"),
    init_from: Optional[Path] = typer.Option(None, help="released weights (save_pretrained folder) to start from"),
    epochs: int = typer.Option(3, help="passes over the training samples (early stopping may end sooner)"),
    lr: float = typer.Option(1e-3, help="peak learning rate (warm-up, then cosine)"),
    batch_size: int = typer.Option(32, help="samples per step (over all processes)"),
    grad_accum: int = typer.Option(1, help="batches accumulated per optimizer step"),
    max_steps: Optional[int] = typer.Option(None, help="cap on optimizer steps"),
    bf16: bool = typer.Option(False, help="bfloat16 autocast (CPU or GPU)"),
    eval_every: int = typer.Option(50, help="steps between validations (also at each epoch's end)"),
    patience: Optional[int] = typer.Option(3, help="early stopping: validations without a better next-session NLL"),
    resume: bool = typer.Option(False, help="continue from out/checkpoint"),
    seed: int = typer.Option(0, help="seed of the initial weights and of the batch order"),
    stream: bool = typer.Option(False, help="stream training samples from train.parquet row group by row group"),
    processes: Processes = 1,
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["train"]) = None,
) -> None:
    """Train a page-level LM on prepared samples (causal LM loss on history + next session).

    Every setting: --config (JSON of `SingleConfig`: model, train) and --set model.<field>=... or
    train.<field>=... (any TrainConfig field). Several processes: `--processes N`, or `torchrun
    --nproc_per_node N -m hetlm.cli train ...`; --batch-size is the global batch, shared out over the processes."""
    _become_torchrun(processes)
    _check_prepared(prepared)  # before the imports of torch and transformers: a wrong path fails at once
    from .distributed import close_distributed, init_distributed
    from .single import SingleConfig, train_single
    from .tokenizer import load_tokenizer
    from .train import TrainingInterrupted

    model = _given(ctx, preset=preset, family=family, init_from=init_from and str(init_from))
    training = _given(ctx, {"patience": "early_stopping_patience"}, epochs=epochs, lr=lr, batch_size=batch_size,
                      grad_accum=grad_accum, max_steps=max_steps, bf16=bf16, eval_every=eval_every, patience=patience,
                      seed=seed)
    cfg = _config(SingleConfig, config, {"model": model, "train": training}, overrides)
    prepared_with = _check_prepared(prepared).get("config", {})  # a folder made by hand may say nothing
    _writable(out)
    main = init_distributed().is_main
    train_samples = _split_path(prepared, "train") if stream else _load_split(prepared, "train")
    val = _load_split(prepared, "val")
    if main and val.height == 0:
        console.print(f"[bold yellow]warning:[/] {prepared / 'val.parquet'} holds no samples: nothing is validated, "
                      "training does not stop early and best/ is the model after the last step. To validate, "
                      f"prepare again with --split user, a larger --val-fraction (now "
                      f"{prepared_with.get('val_fraction', '?')}) or a longer log.", highlight=False)
    if main:
        m = cfg.model
        _write_run_record(out, {"preset": m.preset, "family": m.family, "init_from": m.init_from,
                                "train": cfg.train.model_dump()}, prepared)
    try:
        _, result = train_single(cfg.model, cfg.train, train_samples, val, load_tokenizer(prepared / "tokenizer"), out,
                                 max_positions=prepared_with.get("max_len", 512), resume=resume, stream=stream)
    except (KeyError, ValueError, OSError) as err:
        _fail(err)
    except TrainingInterrupted as stopped:
        console.print(f"[bold red]interrupted:[/] {stopped}; continue with `hetlm train {prepared} --out {out} "
                      "--resume` (the same settings)")
        raise typer.Exit(130) from None
    finally:
        close_distributed()
    if main:
        validated = (f"best validation next-session NLL {result.best_val_loss:.4f} at step {result.best_step}"
                     if result.best_val_loss is not None else "not validated (best/ is the last step)")
        console.print(f"{result.steps} steps, {validated}, {result.tokens_per_s:,.0f} tokens/s -> {out / 'best'}")


@app.command("fit-hetlm")
def fit_hetlm(
    prepared: Path = typer.Argument(..., help="output folder of `hetlm prepare`"),
    base: Path = typer.Option(..., help="the pre-trained LM every predictor starts from (save_pretrained folder)"),
    embeddings: Path = typer.Option(..., help=".npz with the users' embeddings of train and val (arrays 'train', 'val')"),
    out: Path = typer.Option(..., "--out", help="model folder (clusterwise, with the tokenizer)"),
    encoder: Optional[Path] = typer.Option(None, help="JSON of the encoder settings, recorded in the model for routing"),
    checkpoints: Optional[Path] = typer.Option(None, help="folder for checkpoints (and --resume)"),
    resume: bool = typer.Option(False, help="continue from the latest checkpoint in --checkpoints"),
    progress: bool = typer.Option(True),
    processes: Processes = 1,
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["fit-hetlm"]) = None,
) -> None:
    """HeTLM (Algorithm 1) on prepared samples and saved embeddings; with --processes N its predictors are
    spread over N processes (torchrun; one per GPU), the selector kept the same in all. Its settings:
    --config (JSON of `HeTLMConfig` fields; default: the paper's) and --set <field>=..."""
    _become_torchrun(processes)
    from .cluster.hetlm import HeTLMConfig
    from .distributed import close_distributed, dist_info
    from .fit_hetlm import HeTLMJob, fit_from_files

    cfg = _config(HeTLMConfig, config, {}, overrides)
    try:
        settings = json.loads(encoder.read_text()) if encoder else None
        model = fit_from_files(HeTLMJob(prepared=prepared, base=base, embeddings=embeddings, out=out, config=cfg,
                                        encoder=settings, checkpoints=checkpoints, resume=resume, progress=progress))
        main = dist_info().is_main
    except (ValueError, OSError) as err:
        _fail(err)
    finally:
        close_distributed()
    if main:
        console.print(f"HeTLM: K = {len(model.models)} of {cfg.n_clusters}, sizes {model.sizes} -> {out}")


@app.command()
def generate(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="a model folder: one LM (e.g. RUN/best) or clusterwise"),
    prepared: Path = typer.Argument(..., help="folder written by `hetlm prepare`"),
    out: Path = typer.Option(..., "--out", help="Parquet file of generations"),
    split: str = typer.Option("test", help="which prepared samples: test | val | train"),
    max_new_tokens: int = typer.Option(40, help="longest next session generated (pages)"),
    batch_size: int = typer.Option(64, help="users decoded per forward pass"),
    strategy: str = typer.Option("greedy", help="greedy | beam | sample | set (the model folder's expected-IoU set "
                                                "decoder, set_decoder.json, fitted by `hetlm train` / `experiment`)"),
    num_beams: int = typer.Option(4, help="beam: beams kept per user"),
    temperature: float = typer.Option(1.0, help="sample: softmax temperature"),
    top_k: int = typer.Option(0, help="sample: draw from the k likeliest pages only (0: all)"),
    top_p: float = typer.Option(1.0, help="sample: draw from the smallest set of pages with this probability"),
    routing: Optional[str] = typer.Option(None, help="clusterwise models: selector | centroid | likelihood"),
    seed: int = typer.Option(0, help="sample: seed of the draws"),
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["generate"]) = None,
) -> None:
    """Generate each user's next session (constrained to pages, batched, KV-cached). Every decoding setting:
    --config (JSON of `GenerationConfig`) and --set <field>=..."""
    _check_prepared(prepared)  # before the imports of torch and transformers: a wrong path fails at once
    _exists(model_dir, "the model folder")
    from .cluster.base import load_model
    from .evaluate import GenerationConfig, predict, save_generations, set_decoded_pages
    from .set_decoder import SetDecoder

    settings = _config(GenerationConfig, config, _given(
        ctx, max_new_tokens=max_new_tokens, batch_size=batch_size, strategy=strategy, num_beams=num_beams,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed), overrides)
    _check_prepared(prepared)
    _writable(out, file=True)
    df = _load_split(prepared, split)
    try:
        model = load_model(model_dir, tokenizer_dir=prepared / "tokenizer")  # the vocabulary of the samples' ids
    except (ValueError, OSError) as err:
        _fail(err)
    z = model.embed(df["history"].to_list())
    if settings.strategy == "set":
        if not SetDecoder.exists(model_dir):
            _fail(ValueError(f"--strategy set needs a fitted set decoder ({model_dir}/set_decoder.json, written by "
                             "`hetlm train`, `hetlm experiment` and the estimators' save_pretrained); use greedy"))
        decoder = SetDecoder.from_pretrained(model_dir)
        pred = predict(model, df, model.tokenizer, settings, z, routing, greedy=False, n_samples=decoder.n_samples)
        pages = set_decoded_pages(decoder, pred, df, model.tokenizer)
    else:
        pred = predict(model, df, model.tokenizer, settings, z, routing)
        pages = pred.pages
    save_generations(out, df, pages, pred.clusters)
    console.print(f"{len(pages)} next sessions in {sum(pred.seconds.values()):.1f} s -> {out}")


@app.command()
def evaluate(
    generations: Path = typer.Argument(..., help="Parquet written by `hetlm generate`"),
    prepared: Path = typer.Argument(..., help="folder written by `hetlm prepare` (for the page vocabulary)"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file of the metrics"),
    bert_score: bool = typer.Option(False, help="BERTScore-style P/R/F1 with the bundled MiniLM"),
) -> None:
    """The paper's 20 metrics (per cluster and Combined), BLEU and optionally BERTScore."""
    import polars as pl

    from .evaluate import compute_metrics
    from .metrics import format_transposed
    from .tokenizer import load_tokenizer, page_vocabulary

    _check_prepared(prepared)
    if not generations.is_file():
        _fail(FileNotFoundError(f"{generations} not found: write it with `hetlm generate MODEL {prepared} --out "
                                f"{generations}`"))
    try:
        df = pl.read_parquet(generations)
    except (OSError, pl.exceptions.PolarsError) as err:
        _fail(ValueError(f"{generations} is not readable Parquet ({str(err).splitlines()[0]})"))
    missing = {"generated", "target", "history", "cluster"} - set(df.columns)
    if missing:
        _fail(ValueError(f"{generations} is not a generations file written by `hetlm generate` (no columns "
                         f"{sorted(missing)})"))
    if df.height == 0:
        _fail(ValueError(f"{generations} holds no generations: nothing to evaluate"))
    vocabulary = set(page_vocabulary(load_tokenizer(prepared / "tokenizer")))
    encoder = None
    if bert_score:
        from .encoders import load_minilm
        encoder = load_minilm()
    result = compute_metrics(df["generated"].to_list(), df, vocabulary, df["cluster"].to_numpy(), bert_encoder=encoder)
    rows = {"Combined": result["combined"] | result["extra"]}
    if len(result["clusters"]) > 1:
        rows |= {f"cluster {k}": m for k, m in result["clusters"].items()}
    for table in format_transposed(rows):
        console.print(table)
    if out:
        out.write_text(json.dumps(result, indent=1, default=float))
        console.print(f"-> {out}")


@app.command()
def experiment(
    config: Path = typer.Argument(..., help="experiment config (JSON of `ExperimentConfig`), e.g. configs/quick.json"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    data: Optional[Path] = typer.Option(None, help="override the config's log file"),
    source: Optional[str] = typer.Option(None, help="override the config's source format"),
    progress: bool = typer.Option(True),
    overrides: _overrides(SET_EXAMPLES["experiment"]) = None,
    overwrite: bool = typer.Option(False, help="replace a run of another config that --out holds"),
) -> None:
    """The paper's Step 2: small LM, k-means, HeTLM, larger LM, baselines; Tables 2-6 and 17. Any setting
    of the config can be changed with --set (e.g. --set pretrain.epochs=1 --set hetlm.enabled=false)."""
    _exists(config, "the experiment config")  # before the imports of torch and transformers
    from .experiment import ExperimentConfig, run_experiment
    from .ingest import IngestError
    from .ingest.base import skip_spelling
    from .sessions import DataError

    given = {k: v for k, v in (("path", str(data) if data else None), ("source", source)) if v is not None}
    from .runs import RunFolder

    cfg = _config(ExperimentConfig, config, given, overrides)
    if data and config and not any(o.startswith("name=") for o in overrides or ()):
        # the config's name describes its own log: a run on another one is named after that log
        cfg = cfg.model_copy(update={"name": f"{data.name} ({cfg.source}), settings of {config.name}"})
    try:
        run_experiment(cfg, out, progress=progress, overwrite=overwrite)
    except (IngestError, DataError) as err:
        with skip_spelling("--set prepare.on_bad_rows=skip"):  # experiment has no --skip-bad-rows
            _fail(err)
    except (ValueError, OSError) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted:[/] {RunFolder(out).describe()}")
        raise typer.Exit(130) from None


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "configs" / "quick.json",
                                help="the quick profile on the shipped Taobao sample"),
    overrides: _overrides(SET_EXAMPLES["experiment"]) = None,
) -> None:
    """The main job on the dataset shipped in the repo: `experiment configs/quick.json`."""
    experiment(config, out, None, None, True, overrides, False)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a finished `hetlm experiment` run folder"),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default RUN_DIR/report.html)"),
) -> None:
    """Re-write the self-contained HTML report (figures, tables, example users) of a finished run."""
    from .report import write_report

    try:
        result = write_report(run_dir, out)
    except (ValueError, OSError) as err:
        _fail(err)
    for note in result.notes:
        console.print(f"[yellow]{note}")
    for line in result.verdict.lines() if result.verdict else []:
        console.print(escape(line))
    console.print(f"{len(result.figures)} figures -> {result.html}")


@app.command()
@_on_interrupt("the previous file, if any, is unchanged")
def score(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="a model folder (one LM or clusterwise, with its tokenizer/)"),
    events: Path = typer.Argument(..., help="the click log to score (every user in it)"),
    source: str = typer.Option(..., help="generic | taobao | rees46 | ga360 | otto | msnbc | ga4 | adobe"),
    out: Path = typer.Option(..., "--out", help="Parquet file, one row per user"),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer folder (default: the model folder's tokenizer/)"),
    k: int = typer.Option(10, help="top-k next pages"),
    strategy: Optional[str] = typer.Option(None, help="set | greedy | sample (the next session); default: set (the "
                                                       "expected-IoU set decoder) where the model folder has one, else greedy"),
    temperature: float = typer.Option(1.0, help="sampling temperature of the next session"),
    n_samples: int = typer.Option(0, help="sessions sampled per user for the Monte Carlo p_cart, p_purchase (P(Cart / "
                                           "Purchase anywhere in the next session); slow, e.g. 32); 0 samples none and "
                                           "leaves them NaN. The exact p_*_first_page columns are always given"),
    seed: int = typer.Option(0, help="seed of the sampled sessions (a user's numbers depend only on it and the history)"),
    routing: Optional[str] = typer.Option(None, help="clusterwise models: selector | centroid | likelihood"),
    max_new_tokens: int = typer.Option(40, help="longest next session generated (pages)"),
    batch_users: int = typer.Option(64, help="users scored and written per batch"),
    batch_size: int = typer.Option(64, help="decoded sequences per forward pass"),
    embedding_cache: EmbeddingCache = None,
    user: UserColumn = None,
    page: PageColumn = None,
    time: TimeColumn = None,
    session: SessionColumn = None,
    event: EventColumn = None,
    order: OrderColumn = None,
    sep: Separator = None,
    time_format: TimeFormat = None,
    time_unit: TimeUnit = None,
    page_prefix: PagePrefix = None,
    items: ItemField = None,
    cart_events: CartEvents = None,
    purchase_events: PurchaseEvents = None,
    gap_minutes: GapOverride = None,
    collapse_repeats: CollapseOverride = None,
    min_session_len: MinLenOverride = None,
    long_sessions: LongOverride = None,
    long_session_cutoff: LongCutoffOverride = None,
    skip_bad_rows: SkipBadRows = False,
    partitions: Partitions = 1,
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["score"]) = None,
) -> None:
    """Score every user of a click log: cluster, next session, top-k next pages, P(Cart), P(Purchase).
    What is computed for each user: --config (JSON of `ScoreConfig`) and --set <field>=..."""
    _exists(model_dir, "the model folder")  # before the imports of torch and transformers
    from pydantic import ValidationError

    from .ingest import IngestError
    from .ingest.base import SKIP_FLAG, skip_spelling
    from .score import ScoreConfig, Scorer, score_log

    options = _source_options(source, user=user, page=page, time=time, session=session, event=event, order=order,
                              sep=sep, time_format=time_format, time_unit=time_unit, page_prefix=page_prefix,
                              items=items, cart_events=cart_events, purchase_events=purchase_events)
    settings = _config(ScoreConfig, config, _given(ctx, k=k, strategy=strategy, temperature=temperature,
                                                   n_samples=n_samples, seed=seed), overrides)
    try:
        scorer = Scorer.from_pretrained(model_dir, tokenizer, routing=routing, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, embedding_cache=embedding_cache)
        _override_cleaning(scorer, gap_minutes=gap_minutes, collapse_repeats=collapse_repeats,
                           min_session_len=min_session_len, long_sessions=long_sessions,
                           long_session_cutoff=long_session_cutoff)
        with _warnings_shown():
            summary = score_log(scorer, source, events, out, settings, "skip" if skip_bad_rows else "error",
                                batch_users, partitions=partitions, **options)
    except (IngestError, ValidationError, ValueError, OSError) as err:
        with skip_spelling(SKIP_FLAG):
            _fail(err)
    console.print(f"{summary.users_scored} of {summary.users_in_log} users scored -> {summary.out}")
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command()
def serve(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="a model folder (one LM or clusterwise, with its tokenizer/)"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer folder (default: the model folder's tokenizer/)"),
    routing: Optional[str] = typer.Option(None, help="clusterwise models: selector | centroid | likelihood"),
    max_new_tokens: int = typer.Option(40, help="longest next session generated (pages)"),
    max_batch: int = typer.Option(32, help="requests scored together"),
    max_wait_ms: float = typer.Option(5.0, help="how long a request waits for others to batch with"),
    max_body_bytes: int = typer.Option(1 << 20, help="larger request bodies get 413"),
    max_sessions: int = typer.Option(1000, help="requests with more sessions get 413"),
    max_pages: int = typer.Option(20_000, help="requests with more pages get 413"),
    allowed_host: Optional[list[str]] = typer.Option(
        None, help="Host header name clients may use, beside the loopback names and --host (repeatable; * any)"),
    token: Optional[str] = typer.Option(None, envvar="HETLM_SERVE_TOKEN", show_default=False,
                                        help="bearer token every request but /health must send (16+ characters; "
                                             "set it when binding beyond loopback)"),
    embedding_cache: EmbeddingCache = None,
    collapse_repeats: CollapseOverride = None,
    min_session_len: MinLenOverride = None,
    long_sessions: LongOverride = None,
    long_session_cutoff: LongCutoffOverride = None,
    config: ConfigFile = None,
    overrides: _overrides(SET_EXAMPLES["serve"]) = None,
) -> None:
    """HTTP service: POST /predict (a user's sessions -> predictions), GET /health, GET /model, /docs.
    Its limits and batching: --config (JSON of `ServeConfig`) and --set <field>=..."""
    from .score import Scorer
    from .serve import ServeConfig
    from .serve import serve as run_server

    given = _given(ctx, max_body_bytes=max_body_bytes, max_sessions=max_sessions, max_pages=max_pages,
                   max_batch=max_batch, max_wait_ms=max_wait_ms, token=token)
    if allowed_host:
        given["allowed_hosts"] = [*ServeConfig().allowed_hosts, *allowed_host]
    limits = _config(ServeConfig, config, given, overrides)
    if host not in ("127.0.0.1", "localhost", "::1") and limits.token is None:
        console.print(f"[yellow]serving on {host} without a token: anyone who can reach it may use it "
                      "(--token or HETLM_SERVE_TOKEN)")
    try:
        scorer = Scorer.from_pretrained(model_dir, tokenizer, routing=routing, max_new_tokens=max_new_tokens,
                                        embedding_cache=embedding_cache)
        _override_cleaning(scorer, collapse_repeats=collapse_repeats, min_session_len=min_session_len,
                           long_sessions=long_sessions, long_session_cutoff=long_session_cutoff)
        run_server(scorer, host, port, limits=limits)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


if __name__ == "__main__":  # `python -m hetlm.cli`: what torchrun runs
    app()
