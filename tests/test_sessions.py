"""Sessionization, cleaning, samples and the time split, checked against an independent
plain-Python computation on a slice of the real Taobao log."""

import csv
import gzip
import itertools
import math

import polars as pl
import pytest

from hetlm.prepare import PrepareConfig, prepare
from hetlm.sessions import CleaningReport, clean_sessions, sessionize
from hetlm.tokenizer import BOS_ID, EOS_ID, load_tokenizer

from .conftest import SHIPPED

N_ROWS = 20_000
GAP_MS = 30 * 60_000


def _python_sessions(rows, min_len=2):
    """Reference: sort by (user, ts) keeping file order on ties, split on > 30 min gaps,
    collapse repeats, drop short sessions and users with < 2 sessions."""
    names = {"cart": "Cart", "buy": "Purchase", "fav": "Favorite"}
    events = sorted(
        ((u, int(ts) * 1000, i, names.get(b, f"category_{c}")) for i, (u, _, c, b, ts) in enumerate(rows)),
        key=lambda e: (e[0], e[1], e[2]),
    )
    users = {}
    for user, evs in itertools.groupby(events, key=lambda e: e[0]):
        sessions, last_ts = [], None
        for _, ts, _, page in evs:
            if last_ts is None or ts - last_ts > GAP_MS:
                sessions.append((ts, []))
            if not sessions[-1][1] or sessions[-1][1][-1] != page:
                sessions[-1][1].append(page)
            last_ts = ts
        kept = [(start, pages) for start, pages in sessions if len(pages) >= min_len]
        if len(kept) >= 2:
            users[user] = kept
    return users


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("slice") / "slice.csv"
    with gzip.open(SHIPPED, "rt") as f:
        lines = list(itertools.islice(f, N_ROWS))
    path.write_text("".join(lines))
    return path, list(csv.reader(lines))


def test_sessions_match_reference(slice_file):
    from hetlm.ingest import read_events

    path, rows = slice_file
    ref = _python_sessions(rows)
    report = CleaningReport()
    sessions = clean_sessions(
        sessionize(read_events("taobao", path).events), report, long_session_percentile=None
    )
    assert sessions["user"].n_unique() == len(ref)
    assert sessions.height == sum(len(s) for s in ref.values())
    got = {u: [(r["start"], r["pages"]) for r in df.sort("session").iter_rows(named=True)]
           for (u,), df in sessions.group_by("user")}
    assert got == ref


def test_prepare_counts_and_no_leakage(slice_file, tmp_path):
    path, rows = slice_file
    cfg = PrepareConfig(long_session_percentile=None, test_fraction=0.2, val_fraction=0.1, test_targets="all")
    summary = prepare("taobao", path, tmp_path, cfg)
    ref = _python_sessions(rows)

    # Independent time split: quantiles of the start times of sessions that can be targets.
    starts = sorted(s for sess in ref.values() for s, _ in sess[1:])
    q = lambda p: starts[math.ceil(p * (len(starts) - 1))]  # noqa: E731
    t_test, t_val = q(0.8), q(0.7)
    expected = {"train": 0, "val": 0, "test": 0}
    for sess in ref.values():
        for start, _ in sess[1:]:
            expected["test" if start >= t_test else "val" if start >= t_val else "train"] += 1
    assert summary["samples"] == expected
    assert summary["users"] == len(ref)
    assert summary["sessions"] == sum(len(s) for s in ref.values())

    train = pl.read_parquet(tmp_path / "train.parquet")
    test = pl.read_parquet(tmp_path / "test.parquet")
    # No leakage: every session a training sample holds (history or target) is one that started
    # before the val cutoff, hence is no test target; test targets all start at/after the test cutoff.
    assert test.height and all(start >= t_test for start in test["target_start"])
    first_start = {}
    for u, sess in ref.items():
        for start, pages in sess:
            first_start.setdefault((u, tuple(pages)), start)
    for row in train.iter_rows(named=True):
        assert row["target_start"] < t_val
        for pages in [*row["history"], row["target"]]:
            assert first_start[(row["user"], tuple(pages))] < t_val


def test_samples_are_tokenized_consistently(taobao_prepared):
    out, summary = taobao_prepared
    tok = load_tokenizer(out / "tokenizer")
    df = pl.read_parquet(out / "test.parquet")
    for row in df.head(50).iter_rows(named=True):
        assert row["target_ids"][0] == BOS_ID and row["target_ids"][-1] == EOS_ID
        assert tok.convert_ids_to_tokens(row["target_ids"][1:-1]) == [
            p if p in tok.get_vocab() else "[UNK]" for p in row["target"]
        ]
        flat = [t for s in row["history"] for t in ["[BOS]", *s, "[EOS]"]]
        assert len(row["input_ids"]) == len(flat)
        assert len(row["input_ids"]) + len(row["target_ids"]) <= 512
    assert summary["samples"]["test"] == df.height > 0


def test_history_budget_keeps_most_recent_sessions(tmp_path):
    path = tmp_path / "log.csv"
    # One user, 6 sessions of 3 pages each (5 tokens with [BOS]/[EOS]), 2 h apart.
    path.write_text("".join(
        f"u,{i},{10 * s + i},pv,{s * 7200 + i}\n" for s in range(6) for i in range(3)
    ))
    cfg = PrepareConfig(max_len=16, long_session_percentile=None, split="user", test_fraction=0.01,
                        val_fraction=0.0)
    prepare("taobao", path, tmp_path / "out", cfg)
    row = pl.read_parquet(tmp_path / "out" / "train.parquet").row(0, named=True)
    # budget = 16 - 5 = 11 tokens -> the 2 most recent past sessions (sessions 3 and 4)
    assert row["history"] == [[f"category_{30 + i}" for i in range(3)], [f"category_{40 + i}" for i in range(3)]]


def test_max_len_smaller_than_a_session_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        prepare("taobao", SHIPPED, tmp_path, PrepareConfig(max_len=20))


def test_train_targets_can_be_capped_per_user(tmp_path):
    full = prepare("taobao", SHIPPED, tmp_path / "full")
    capped = prepare("taobao", SHIPPED, tmp_path / "capped", PrepareConfig(max_train_targets_per_user=2))
    train_full = pl.read_parquet(tmp_path / "full" / "train.parquet")
    train = pl.read_parquet(tmp_path / "capped" / "train.parquet")
    assert train.group_by("user").len()["len"].max() == 2
    # The kept ones are each user's two most recent training targets; val/test are unchanged.
    expected = train_full.sort("target_start", descending=True).group_by("user", maintain_order=True).head(2)
    assert set(zip(train["user"], train["target_start"])) == set(zip(expected["user"], expected["target_start"]))
    assert capped["samples"]["test"] == full["samples"]["test"]
