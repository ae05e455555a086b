"""Property-based tests (hypothesis) of sessionization, cleaning, the time split and the tokenizer."""

from __future__ import annotations

from itertools import pairwise

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetlm.ingest.base import EVENT_SCHEMA, normalize_pages
from hetlm.sessions import (
    CleaningReport, SplitConfig, assign_splits, build_samples, clean_sessions, session_ids, sessionize,
)
from hetlm.tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID, build_tokenizer

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GAP_MINUTES = 30
GAP_MS = GAP_MINUTES * 60_000

event_rows = st.lists(
    st.tuples(
        st.sampled_from(["u1", "u2", "u3", "u4"]),
        st.integers(0, 10 * GAP_MS),  # ms: a few sessions' worth of time per user
        st.sampled_from(["a", "b", "c", "d"]),
        st.none() | st.sampled_from(["s1", "s2"]),
    ),
    min_size=1, max_size=80,
)


def events_table(rows, log_sessions: bool) -> pl.DataFrame:
    return pl.DataFrame(
        [(u, s if log_sessions else None, ts, p) for u, ts, p, s in rows],
        schema=list(EVENT_SCHEMA), orient="row",
    ).cast(EVENT_SCHEMA)


@FAST
@given(event_rows, st.booleans())
def test_sessionize_puts_every_event_in_one_time_ordered_session(rows, log_sessions):
    events = events_table(rows, log_sessions)
    ev = sessionize(events, GAP_MINUTES)
    key = ["user", "ts", "page"]
    assert ev.select(key).sort(key).equals(events.select(key).sort(key))  # each event once
    # sessions are numbered 0.. by start time, events inside them in time order
    firsts = ev.group_by("user", "session").agg(pl.col("ts").min(), pl.col("start").first()).sort("user", "session")
    assert (firsts["ts"] == firsts["start"]).all()
    for _, df in firsts.group_by("user"):
        assert df["session"].to_list() == list(range(df.height))
        assert df["start"].is_sorted()
    assert ev.group_by("user", "session").agg(ok=pl.col("ts").is_sorted())["ok"].all()
    if not log_sessions:  # gap sessions: no gap inside exceeds the gap, every gap between does
        inside = ev.group_by("user", "session").agg(gap=pl.col("ts").diff().max())["gap"].drop_nulls()
        assert (inside <= GAP_MS).all()
        ends = ev.group_by("user", "session").agg(first=pl.col("ts").min(), last=pl.col("ts").max())
        between = ends.sort("user", "session").select(
            (pl.col("first") - pl.col("last").shift(1)).over("user")
        ).to_series().drop_nulls()
        assert (between > GAP_MS).all()
    else:  # the events of one log session share one session; gap-split events never join a log session
        tagged = events.with_columns(page=pl.format("{}{}", "page", pl.int_range(pl.len())))
        numbered = sessionize(tagged, GAP_MINUTES).join(tagged.select("user", "page", "session"), on=["user", "page"])
        per_log_session = numbered.group_by("user", pl.col("session_right")).agg(pl.col("session").n_unique())
        assert (per_log_session.filter(pl.col("session_right").is_not_null())["session"] == 1).all()
        mixed = numbered.group_by("user", "session").agg(pl.col("session_right").null_count(), n=pl.len())
        assert mixed.select((pl.col("session_right") == 0) | (pl.col("session_right") == pl.col("n"))).to_series().all()


@FAST
@given(event_rows, st.booleans(), st.integers(1, 3), st.integers(2, 3), st.sampled_from(["truncate", "drop"]))
def test_clean_sessions_counts_every_dropped_event(rows, log_sessions, min_len, min_sessions, long_sessions):
    events = events_table(rows, log_sessions)
    report = CleaningReport()
    sessions = clean_sessions(
        sessionize(events, GAP_MINUTES), report, min_session_len=min_len, long_session_percentile=90,
        long_sessions=long_sessions, min_sessions=min_sessions,
    )
    kept = int(sessions["pages"].list.len().sum() or 0)
    assert kept + sum(report.dropped.values()) == events.height
    assert all(a != b for pages in sessions["pages"] for a, b in pairwise(pages))  # no immediate repeat
    assert (sessions["pages"].list.len() >= min_len).all()
    per_user = sessions.group_by("user").agg(n=pl.len(), numbers=pl.col("session").sort(), starts=pl.col("start"))
    assert (per_user["n"] >= min_sessions).all()
    assert all(numbers.to_list() == list(range(len(numbers))) for numbers in per_user["numbers"])
    assert sessions.sort("user", "session").group_by("user", maintain_order=True).agg(
        ok=pl.col("start").is_sorted())["ok"].all()
    if report.long_session_cutoff is not None:
        assert (sessions["pages"].list.len() <= report.long_session_cutoff).all()


session_tables = st.lists(
    st.lists(st.tuples(st.integers(1, 1000), st.lists(st.sampled_from("abcde"), min_size=1, max_size=6)),
             min_size=2, max_size=6),
    min_size=1, max_size=8,
)


def sessions_table(users) -> pl.DataFrame:
    """user u's sessions: (start gap, pages), starts strictly increasing within a user."""
    rows = []
    for u, sessions in enumerate(users):
        start = 0
        for k, (gap, pages) in enumerate(sessions):
            start += gap
            rows.append((f"u{u}", k, start, pages))
    return pl.DataFrame(rows, schema={"user": pl.Utf8, "session": pl.Int64, "start": pl.Int64,
                                      "pages": pl.List(pl.Utf8)}, orient="row")


def all_samples(sessions: pl.DataFrame, split: SplitConfig, budget: int = 10_000) -> pl.DataFrame:
    targets, _ = assign_splits(sessions, split)
    vocab = {p: i + len(SPECIALS) for i, p in enumerate("abcde")}
    return build_samples(session_ids(sessions, vocab, UNK_ID, BOS_ID, EOS_ID), targets, budget)


@FAST
@given(session_tables, st.sampled_from([(0.1, 0.05), (0.3, 0.2), (0.5, 0.4)]), st.sampled_from(["first", "all"]))
def test_time_split_never_leaks_val_or_test_sessions_into_training(users, fractions, test_targets):
    sessions = sessions_table(users)
    split = SplitConfig(split="time", test_fraction=fractions[0], val_fraction=fractions[1], test_targets=test_targets)
    samples = all_samples(sessions, split)
    train, val, test = (samples.filter(pl.col("split") == s) for s in ("train", "val", "test"))
    held_out = pl.concat([val, test])
    if train.height and held_out.height:  # every training session starts before any held-out target
        assert train["target_start"].max() < held_out["target_start"].min()
    if val.height and test.height:
        assert val["target_start"].max() <= test["target_start"].min()
    starts = {(r["user"], r["session"]): r["start"] for r in sessions.iter_rows(named=True)}
    by_pages = {(r["user"], tuple(r["pages"]), r["start"]) for r in sessions.iter_rows(named=True)}
    for r in samples.iter_rows(named=True):
        # the history is the sessions right before the target, oldest first, all of them (budget is ample)
        k = next(s for (u, s), t in starts.items() if u == r["user"] and t == r["target_start"])
        assert [list(p) for p in r["history"]] == [
            sessions.filter((pl.col("user") == r["user"]) & (pl.col("session") == j))["pages"][0].to_list()
            for j in range(k)
        ]
        assert (r["user"], tuple(r["target"]), r["target_start"]) in by_pages
    # per user: training targets, then at most one val and one test target (test_targets="first")
    for user, df in samples.group_by("user"):
        order = {"train": 0, "val": 1, "test": 2}
        ranks = df.sort("target_start")["split"].replace_strict(order).to_list()
        assert ranks == sorted(ranks)
        if test_targets == "first":
            assert (df["split"] == "test").sum() <= 1 and (df["split"] == "val").sum() <= 1
    # every session after a user's first is a target in exactly one split when all test targets are kept
    if test_targets == "all":
        assert samples.height == sessions.filter(pl.col("session") >= 1).height


@FAST
@given(session_tables, st.integers(0, 5))
def test_user_split_gives_each_user_one_sample_with_their_last_session(users, seed):
    sessions = sessions_table(users)
    samples = all_samples(sessions, SplitConfig(split="user", test_fraction=0.3, val_fraction=0.2, seed=seed))
    assert sorted(samples["user"]) == sorted(sessions["user"].unique())
    last = sessions.sort("session").group_by("user").agg(pl.col("start").last())
    assert samples.join(last, on="user").select((pl.col("target_start") == pl.col("start")).all()).item()


@FAST
@given(session_tables, st.integers(3, 20))
def test_history_fits_the_token_budget(users, budget):
    split = SplitConfig(split="time", test_fraction=0.3, val_fraction=0.2, test_targets="all")
    samples = all_samples(sessions_table(users), split, budget)
    assert (samples["input_ids"].list.len() <= budget).all()
    for ids, history in zip(samples["input_ids"], samples["history"]):
        assert len(ids) == sum(len(s) + 2 for s in history)
        assert ids.to_list().count(BOS_ID) == ids.to_list().count(EOS_ID) == len(history)


page_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
) | st.sampled_from(["a,b", 'say "hi"', "tab\there", "two\nlines", "\U0001F600", "x[UNK]y", "[BOS]z", "a;b|c",
                          "sep\x1cchar", "\x1f", "nbsp\u00a0here", "line\u2028sep"])


@FAST
@given(st.lists(page_text, min_size=1, max_size=20), st.lists(page_text, max_size=5))
def test_tokenizer_round_trips_any_page_names(raw_pages, unseen_raw):
    names = pl.Series(raw_pages + unseen_raw, dtype=pl.Utf8).to_frame("p").select(normalize_pages(pl.col("p")))
    normalized = [p for p in names.to_series().to_list() if p is not None and p not in SPECIALS]
    pages, unseen = normalized[: len(raw_pages)], normalized[len(raw_pages):]
    vocab = list(dict.fromkeys(pages))
    tok = build_tokenizer(vocab)
    ids = tok(" ".join(pages), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == pages
    assert ids == [vocab.index(p) + len(SPECIALS) for p in pages]
    assert tok.decode(ids) == " ".join(pages)
    new = [p for p in unseen if p not in vocab]
    assert tok(" ".join(new), add_special_tokens=False)["input_ids"] == [UNK_ID] * len(new)
