"""The prepared logs the peers are compared with hetlm on, made as bench/quality.py makes them (same names,
subsamples and prepare settings), so the PEERS rows sit beside quality.jsonl's rows of the same samples.

- taobao-sample: the shipped Taobao sample, prepared as `make demo` prepares it (configs/quick.json).
- msnbc: the first MSNBC_VISITS visits of the shared MSNBC log, within-session samples.
- globo-user: the users of the shared Globo log whose id hashes below GLOBO_FRACTION, `--split user` (one
  sample per user: news is fresh every day).

`prepared_log(name, root)` prepares once into root/<name>/ and returns that folder (train/val/test.parquet,
tokenizer/, summary.json).
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED_DATA, SHIPPED

from hetlm.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parents[1]
QUICK_CONFIG = REPO / "configs" / "quick.json"
MSNBC_VISITS = 30_000
GLOBO_FRACTION = 0.03
GLOBO_OPTIONS = {"user": "user_id", "session": "session_id", "page": "click_article_id", "page_prefix": "article_",
                 "time": "click_timestamp", "time_unit": "ms"}
LOGS = ("taobao-sample", "msnbc", "globo-user")


def describe(name: str) -> str:
    return {
        "taobao-sample": "shipped Taobao sample, configs/quick.json prepare settings",
        "msnbc": f"MSNBC first {MSNBC_VISITS:,} visits, within-session samples",
        "globo-user": f"Globo users whose id hashes below {GLOBO_FRACTION:g}, split by user",
    }[name]


def keep_user(user, fraction: float) -> bool:
    """A deterministic hash sample of users (the same users on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(str(user).encode(), digest_size=8).digest(), "little") / 2**64 < fraction


def msnbc_head(path: Path, visits: int) -> Path:
    with zipfile.ZipFile(SHARED_DATA / "msnbc" / "msnbc990928.zip") as archive:
        lines = archive.read("msnbc990928.seq").decode().splitlines()  # the file's lines end in CRLF
    start = lines.index("% Sequences:") + 2
    path.write_text("\n".join(lines[:start] + lines[start:start + visits]) + "\n")
    return path


def globo_subset(path: Path, fraction: float) -> Path:
    clicks = pl.read_parquet(SHARED_DATA / "globo-news" / "clicks_even_users.parquet")
    users = clicks["user_id"].unique()
    kept = users.filter(users.map_elements(lambda u: keep_user(u, fraction), return_dtype=pl.Boolean))
    clicks.filter(pl.col("user_id").is_in(kept.implode())).write_parquet(path)
    return path


def prepared_log(name: str, root: str | Path) -> Path:
    """root/<name>: the log prepared as described above (reused when already there)."""
    out = Path(root) / name
    if (out / "summary.json").exists():
        return out
    raw = Path(root) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if name == "taobao-sample":
        from hetlm.experiment import ExperimentConfig

        prepare("taobao", SHIPPED, out, ExperimentConfig.from_file(QUICK_CONFIG).prepare)
    elif name == "msnbc":
        prepare("msnbc", msnbc_head(raw / f"msnbc_{MSNBC_VISITS}.seq", MSNBC_VISITS), out)
    elif name == "globo-user":
        path = globo_subset(raw / f"globo_{GLOBO_FRACTION:g}.parquet", GLOBO_FRACTION)
        prepare("generic", path, out, PrepareConfig(split="user"), **GLOBO_OPTIONS)
    else:
        raise ValueError(f"unknown log {name!r}; known: {', '.join(LOGS)}")
    return out
