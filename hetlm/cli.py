"""The `hetlm` command line: a thin layer over the Python API, one command per stage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

SHIPPED_DATA = Path(__file__).resolve().parent.parent / "data" / "taobao-sample" / "UserBehavior_sample.csv.gz"


@app.callback()
def _root() -> None:
    """hetlm: learn the language of browsing from click logs."""


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(2)


@app.command()
def prepare(
    source: str = typer.Argument(..., help="generic | taobao | rees46 | ga360 | otto | msnbc"),
    path: Path = typer.Argument(..., help="the log file"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    user: Optional[str] = typer.Option(None, help="generic: user column"),
    page: Optional[str] = typer.Option(None, help="generic: page column"),
    time: Optional[str] = typer.Option(None, help="generic: timestamp column (unix or date/time text)"),
    session: Optional[str] = typer.Option(None, help="generic: session id column"),
    event: Optional[str] = typer.Option(None, help="generic: event type column (cart/purchase values)"),
    order: Optional[str] = typer.Option(None, help="generic: numeric column added to the time in ms"),
    sep: Optional[str] = typer.Option(None, help="generic: CSV delimiter"),
    time_format: Optional[str] = typer.Option(None, help="generic: strftime format of the time column"),
    time_unit: Optional[str] = typer.Option(None, help="generic: unit of a numeric time column (s or ms)"),
    page_prefix: Optional[str] = typer.Option(None, help="generic: text put before each page value"),
    gap_minutes: float = typer.Option(30.0, help="inactivity gap that splits sessions"),
    collapse_repeats: bool = typer.Option(True, help="collapse immediate repeats of the same page"),
    min_session_len: int = typer.Option(2, help="drop sessions shorter than this (pages)"),
    long_percentile: float = typer.Option(99.0, help="session-length percentile cutoff"),
    long_sessions: str = typer.Option("truncate", help="truncate | drop sessions above the cutoff"),
    samples: str = typer.Option("auto", help="auto | next-session | within-session"),
    split: str = typer.Option("time", help="time (targets after a cutoff are test) | user (paper)"),
    test_fraction: float = typer.Option(0.1),
    val_fraction: float = typer.Option(0.05),
    test_targets: str = typer.Option("first", help="first | all test targets per user"),
    max_len: int = typer.Option(512, help="token budget of history + target"),
    min_page_count: int = typer.Option(1, help="pages seen fewer times in training -> [UNK]"),
    skip_bad_rows: bool = typer.Option(False, help="drop bad rows and count them instead of stopping"),
    seed: int = typer.Option(0),
) -> None:
    """Click log -> tokenized next-session samples (train/val/test Parquet), tokenizer, summary."""
    from pydantic import ValidationError

    from .ingest import IngestError
    from .prepare import PrepareConfig, prepare as run_prepare

    generic = dict(user=user, page=page, time=time, session=session, event=event, order=order, sep=sep,
                   time_format=time_format, time_unit=time_unit, page_prefix=page_prefix)
    options = {k: v for k, v in generic.items() if v is not None}
    if source != "generic" and options:
        _fail(ValueError(f"options {sorted(options)} apply to the generic source only"))
    try:
        cfg = PrepareConfig(
            gap_minutes=gap_minutes, collapse_repeats=collapse_repeats, min_session_len=min_session_len,
            long_session_percentile=long_percentile, long_sessions=long_sessions, samples=samples,
            split=split, test_fraction=test_fraction, val_fraction=val_fraction, test_targets=test_targets,
            max_len=max_len, min_page_count=min_page_count, seed=seed,
            on_bad_rows="skip" if skip_bad_rows else "error",
        )
        summary = run_prepare(source, path, out, cfg, **options)
    except (IngestError, ValidationError, ValueError, FileNotFoundError) as err:
        _fail(err)
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"prepared {summary['source']} -> {out}", show_header=False)
    for key in ("users", "sessions", "pages", "samples", "sample_mode", "outcome_rates",
                "tokens_per_sample", "dropped_rows", "seconds", "events_per_second"):
        value = summary[key]
        t.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(t)
