"""The prepared logs the quality benchmarks compare models on, made the same way by every script that
uses them, so rows from different benchmarks (bench_peers, quality) are on the same samples.

- taobao: the shipped Taobao sample, prepared as `make demo` prepares it (configs/quick.json).
- msnbc: the first MSNBC_VISITS visits of the shared MSNBC log, within-session samples.
- globo: the users of the shared Globo log whose id is a multiple of GLOBO_USER_STRIDE (2 x the
  stride of the even-user file), `--split user` (one sample per user: news is fresh every day).

`prepared_log(name, root)` prepares once into root/<name>/ and returns that folder (a folder with
train/val/test.parquet, tokenizer/, summary.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED_DATA, SHIPPED

from hetlm.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
QUICK_CONFIG = REPO / "configs" / "quick.json"
MSNBC_VISITS = 100_000
GLOBO = SHARED_DATA / "globo-news" / "clicks_even_users.parquet"
GLOBO_USER_STRIDE = 20
GLOBO_COLUMNS = {"user": "user_id", "session": "session_id", "page": "click_article_id",
                 "time": "click_timestamp", "time_unit": "ms"}
LOGS = ("taobao", "msnbc", "globo")


def describe(name: str) -> str:
    return {
        "taobao": "shipped Taobao sample, configs/quick.json prepare settings",
        "msnbc": f"MSNBC first {MSNBC_VISITS:,} visits, within-session samples",
        "globo": f"Globo users with user_id % {GLOBO_USER_STRIDE} == 0, split by user",
    }[name]


def prepared_log(name: str, root: str | Path) -> Path:
    """root/<name>: the log prepared as described above (reused when already there)."""
    out = Path(root) / name
    if (out / "summary.json").exists():
        return out
    raw = Path(root) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if name == "taobao":
        from hetlm.experiment import ExperimentConfig

        prepare("taobao", SHIPPED, out, ExperimentConfig.from_file(QUICK_CONFIG).prepare)
    elif name == "msnbc":
        from bench.bench_prepare import seq_file

        prepare("msnbc", seq_file(MSNBC_VISITS, raw), out)
    elif name == "globo":
        path = raw / "globo_users.parquet"
        pl.read_parquet(GLOBO).filter(pl.col("user_id") % GLOBO_USER_STRIDE == 0).write_parquet(path)
        prepare("generic", path, out, PrepareConfig(split="user"), **GLOBO_COLUMNS)
    else:
        raise ValueError(f"unknown log {name!r}; known: {', '.join(LOGS)}")
    return out
