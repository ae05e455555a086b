"""Events -> sessions -> cleaned sessions -> next-session samples (all polars, no row loops).

Sessions table: user, session (sequence number within the user, from 0), start (ms), pages (list[str]).
Samples table: user, split, target_start, history (list[list[str]]), target (list[str]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import polars as pl
from pydantic import BaseModel

from .ingest.base import CART, PURCHASE


class DataError(ValueError):
    """The log cannot give samples under these settings (found before any training starts)."""


@dataclass
class CleaningReport:
    """Rows (events) removed or changed by each cleaning step, by reason."""

    dropped: dict[str, int] = field(default_factory=dict)
    long_session_cutoff: int | None = None

    def add(self, reason: str, rows: int) -> None:
        if rows:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(rows)


def _user_starts() -> pl.Expr:
    """True on the first row of each user, in a frame sorted by user."""
    return (pl.col("user") != pl.col("user").shift(1)).fill_null(True)


def _index_within_user() -> pl.Expr:
    """0, 1, 2, ... within each user, in a frame sorted by user.

    Sorted-run arithmetic instead of `.over("user")`: window functions over a million small groups
    (MSNBC) are orders of magnitude slower.
    """
    idx = pl.int_range(pl.len(), dtype=pl.Int64)
    return idx - pl.when(_user_starts()).then(idx).forward_fill()


def _cumsum_within_user(expr: pl.Expr) -> pl.Expr:
    """Running sum of `expr` within each user, in a frame sorted by user."""
    total = expr.cum_sum()
    before = total - expr
    return total - pl.when(_user_starts()).then(before).forward_fill()


def sessionize(events: pl.DataFrame, gap_minutes: float = 30.0, use_log_sessions: bool = True) -> pl.DataFrame:
    """One row per event with `session` = the user's session number, ordered by time.

    Rows with a session id from the log keep it (when `use_log_sessions`); the others are split
    where two consecutive events of a user are more than `gap_minutes` apart.
    """
    gap_ms = int(gap_minutes * 60_000)
    ev = events.with_row_index("_order").sort("user", "ts", "_order")
    gap_id = (_user_starts() | (pl.col("ts").diff() > gap_ms)).fill_null(True).cum_sum()
    key = pl.lit("gap:") + gap_id.cast(pl.Utf8)
    if use_log_sessions and events["session"].null_count() < events.height:
        key = pl.coalesce(pl.lit("log:") + pl.col("session"), key)
    ev = ev.with_columns(_key=key).drop("session")
    # Sessions are numbered by their first event's time, so log ids interleaved in time stay ordered.
    starts = (
        ev.group_by("user", "_key").agg(start=pl.col("ts").min(), first=pl.col("_order").min())
        .sort("user", "start", "first")
        .with_columns(session=_index_within_user())
    )
    return (
        ev.join(starts.select("user", "_key", "session", "start"), on=["user", "_key"])
        .sort("user", "session", "ts", "_order")
        .select("user", "session", "start", "ts", "page")
    )


def clean_sessions(
    events: pl.DataFrame,
    report: CleaningReport,
    collapse_repeats: bool = True,
    min_session_len: int = 2,
    long_session_percentile: float | None = 99.0,
    long_sessions: str = "truncate",
    min_sessions: int = 2,
    long_session_cutoff: int | None = None,
) -> pl.DataFrame:
    """Sessionized events -> sessions table, with the paper's filters; every removed row is counted.

    `long_session_cutoff` replaces the percentile of this table's lengths (a partitioned prepare
    computes it once over all partitions, see `length_cutoff`).
    """
    return limit_sessions(
        group_sessions(events, report, collapse_repeats, min_session_len), report, long_session_percentile,
        long_sessions, min_sessions, long_session_cutoff, min_session_len,
    )


CLEANING_KEY = "hetlm_session_cleaning"  # in tokenizer_config.json


@dataclass(frozen=True)
class SessionCleaning:
    """How `hetlm prepare` made a log's sessions, with the values one prepared log fixed.

    prepare stores it in its tokenizer's tokenizer_config.json (`save_to`), which every model folder's copy
    of the tokenizer keeps, so `hetlm score` and `hetlm serve` clean a user's sessions as the training
    sessions were cleaned: long sessions are cut at the training log's percentile, not at one of the log
    being scored or of a single request. long_session_cutoff None (a tokenizer saved before it was
    stored): no long-session cut.
    """

    gap_minutes: float = 30.0
    use_log_sessions: bool = True
    collapse_repeats: bool = True
    min_session_len: int = 2
    long_sessions: str = "truncate"
    long_session_percentile: float | None = None  # what the cutoff was, for the reasons in reports
    long_session_cutoff: int | None = None        # pages

    def clean(self, events: pl.DataFrame, report: CleaningReport) -> pl.DataFrame:
        """Sessionized events -> cleaned sessions (a user needs one session, not two: there is no target)."""
        percentile = (self.long_session_percentile or 100.0) if self.long_session_cutoff is not None else None
        return clean_sessions(events, report, self.collapse_repeats, self.min_session_len, percentile,
                              self.long_sessions, 1, self.long_session_cutoff)

    def clean_user(self, sessions: list[list[str]]) -> tuple[list[list[str]], dict[str, int]]:
        """One user's sessions (oldest first) after cleaning, and the pages removed by reason."""
        index = [i for i, s in enumerate(sessions) for _ in s]
        events = pl.DataFrame({"user": [0] * len(index), "session": index, "start": index,
                               "page": [p for s in sessions for p in s]},
                              schema={"user": pl.Int64, "session": pl.Int64, "start": pl.Int64, "page": pl.Utf8})
        report = CleaningReport()
        return self.clean(events, report)["pages"].to_list(), report.dropped

    def save_to(self, tokenizer) -> None:
        """Record in the tokenizer (written by its next save_pretrained)."""
        tokenizer.init_kwargs[CLEANING_KEY] = asdict(self)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SessionCleaning:
        return cls(**tokenizer.init_kwargs.get(CLEANING_KEY, {}))


def group_sessions(events: pl.DataFrame, report: CleaningReport, collapse_repeats: bool = True,
                   min_session_len: int = 2) -> pl.DataFrame:
    """The first filters of `clean_sessions`: sessionized events -> sessions (user, session, start, pages)
    without immediate repeats and short sessions; their lengths give the long-session cutoff."""
    ev = events
    if collapse_repeats:
        same = [pl.col(c) == pl.col(c).shift(1) for c in ("user", "session", "page")]
        repeat = pl.all_horizontal(same).fill_null(False)
        report.add("immediate repeat of the same page (collapsed)", ev.select(repeat.sum()).item())
        ev = ev.filter(~repeat)
    sessions = ev.group_by("user", "session", maintain_order=True).agg(
        start=pl.col("start").first(), pages=pl.col("page")
    ).with_columns(n=pl.col("pages").list.len())
    short = pl.col("n") < min_session_len
    report.add(f"session shorter than {min_session_len} pages", sessions.filter(short)["n"].sum())
    return sessions.filter(~short).drop("n")


def limit_sessions(
    sessions: pl.DataFrame,
    report: CleaningReport,
    long_session_percentile: float | None = 99.0,
    long_sessions: str = "truncate",
    min_sessions: int = 2,
    long_session_cutoff: int | None = None,
    min_session_len: int = 2,
) -> pl.DataFrame:
    """The last filters of `clean_sessions` on `group_sessions`' table: long sessions, users with too
    few sessions, then sessions renumbered 0..n-1."""
    sessions = sessions.with_columns(n=pl.col("pages").list.len())
    if long_session_percentile is not None and sessions.height:
        cutoff = long_session_cutoff or length_cutoff(sessions["n"], long_session_percentile, min_session_len)
        report.long_session_cutoff = cutoff
        long = sessions.filter(pl.col("n") > cutoff)
        if long_sessions == "truncate":
            report.add(f"page beyond the {long_session_percentile:g}th-percentile session length ({cutoff})",
                       (long["n"] - cutoff).sum())
            sessions = sessions.with_columns(pages=pl.col("pages").list.head(cutoff))
        elif long_sessions == "drop":
            report.add(f"session longer than the {long_session_percentile:g}th percentile ({cutoff})",
                       long["n"].sum())
            sessions = sessions.filter(pl.col("n") <= cutoff)
        else:
            raise ValueError(f"long_sessions must be 'truncate' or 'drop', not {long_sessions!r}")

    sessions = sessions.with_columns(n=pl.col("pages").list.len())
    per_user = sessions.group_by("user").agg(n_sessions=pl.len())
    sessions = sessions.join(per_user, on="user")
    few = pl.col("n_sessions") < min_sessions
    report.add(f"user with fewer than {min_sessions} sessions", sessions.filter(few)["n"].sum())
    sessions = sessions.filter(~few)
    # Renumber so session numbers are 0..n-1 again after the filters.
    return sessions.sort("user", "start", "session").with_columns(
        session=_index_within_user()
    ).select("user", "session", "start", "pages")


def length_cutoff(lengths: pl.Series, percentile: float, min_session_len: int) -> int:
    """Session length above which sessions count as long: the percentile, at least min_session_len."""
    return max(int(lengths.quantile(percentile / 100, "higher")), min_session_len)


def split_within_sessions(sessions: pl.DataFrame, min_target_len: int = 1) -> pl.DataFrame:
    """For logs of single anonymous visits: each visit becomes a 'history' (its first half) and a
    'next session' (the rest), so the next-pages task still exists. Documented in the summary."""
    n = pl.col("pages").list.len()
    half = n // 2
    return (
        sessions.filter(n >= 2 * min_target_len)
        .with_columns(first=pl.col("pages").list.head(half), rest=pl.col("pages").list.slice(half))
        .select(
            "user",
            pl.concat_list(
                pl.struct(session=pl.lit(0, pl.Int64), pages=pl.col("first"), start=pl.col("start")),
                pl.struct(session=pl.lit(1, pl.Int64), pages=pl.col("rest"), start=pl.col("start") + 1),
            ).alias("parts"),
        )
        .explode("parts").unnest("parts").select("user", "session", "start", "pages")
    )


class SplitConfig(BaseModel):
    """How prepare splits the samples (PrepareConfig's fields of the same names, checked there)."""

    split: str = "time"              # "time": by target start time; "user": the paper's one sample per user
    test_fraction: float = 0.1
    val_fraction: float = 0.05
    test_targets: str = "first"      # "first" test/val sample per user, or "all"
    max_train_targets_per_user: int | None = None  # keep only each user's most recent training targets
    seed: int = 0


def time_split_quantiles(s: SplitConfig) -> tuple[float, float]:
    """The quantiles of the candidate targets' start times that are the (test, val) cutoffs."""
    return 1 - s.test_fraction, 1 - s.test_fraction - s.val_fraction


def time_cutoffs(starts: pl.Series, s: SplitConfig) -> tuple[int, int]:
    """(test, val) cutoffs of the time split: quantiles of the candidate targets' start times."""
    test, val = (int(starts.quantile(q, "higher")) for q in time_split_quantiles(s))
    return test, val


def assign_splits(sessions: pl.DataFrame, s: SplitConfig,
                  cutoffs: tuple[int, int] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Targets table (user, session, start, split) and the sessions allowed in training.

    Time split: targets starting at or after the test cutoff are test, those in the window before it
    val, the rest train. Every session a training sample uses starts before the val cutoff, so no
    val/test target appears in training data. User split: users are drawn into train/val/test and
    their last session is the target. `cutoffs` (time split) replaces the quantiles of this table's
    targets (a partitioned prepare computes them once over all partitions, see `time_cutoffs`).
    """
    candidates = sessions.filter(pl.col("session") >= 1)
    if candidates.height == 0 and cutoffs is None:
        raise DataError("no user has two sessions after cleaning: nothing to predict")
    if s.split == "time":
        t_test, t_val = cutoffs or time_cutoffs(candidates["start"], s)
        split = (pl.when(pl.col("start") >= t_test).then(pl.lit("test"))
                 .when(pl.col("start") >= t_val).then(pl.lit("val")).otherwise(pl.lit("train")))
        targets = candidates.with_columns(split=split)
        if s.test_targets == "first":
            first = pl.struct("user", "split").is_first_distinct()
            targets = targets.sort("user", "session").filter((pl.col("split") == "train") | first)
        if s.max_train_targets_per_user is not None:
            # Older targets' sessions still reach training inside the kept samples' histories.
            is_train = pl.col("split") == "train"
            recent = (targets.filter(is_train).sort("user", "session", descending=[False, True])
                      .filter(_index_within_user() < s.max_train_targets_per_user))
            targets = pl.concat([recent, targets.filter(~is_train)])
        train_sessions = sessions.filter(pl.col("start") < t_val)
    elif s.split == "user":
        last = candidates.sort("user", "session").filter(pl.col("user").is_last_distinct())
        u = pl.col("user").hash(s.seed) / float(2**64)
        split = (pl.when(u < s.test_fraction).then(pl.lit("test"))
                 .when(u < s.test_fraction + s.val_fraction).then(pl.lit("val")).otherwise(pl.lit("train")))
        targets = last.with_columns(split=split)
        train_users = targets.filter(pl.col("split") == "train")["user"]
        train_sessions = sessions.filter(pl.col("user").is_in(train_users.implode()))
    else:
        raise ValueError(f"split must be 'time' or 'user', not {s.split!r}")
    return targets.select("user", "session", "start", "split"), train_sessions


def session_ids(sessions: pl.DataFrame, vocab: dict[str, int], unk_id: int, bos_id: int, eos_id: int) -> pl.DataFrame:
    """Add `ids`: each session as [BOS] page ids [EOS], pages outside `vocab` -> unk_id."""
    mapped = pl.col("pages").list.eval(pl.element().replace_strict(vocab, default=unk_id, return_dtype=pl.Int32))
    return sessions.with_columns(
        ids=pl.concat_list(pl.lit([bos_id], pl.List(pl.Int32)), mapped, pl.lit([eos_id], pl.List(pl.Int32)))
    )


def build_samples(sessions: pl.DataFrame, targets: pl.DataFrame, history_budget: int) -> pl.DataFrame:
    """Pair each target with the most recent whole past sessions whose tokens fit `history_budget`.

    A session costs len(pages) + 2 tokens ([BOS] ... [EOS]). For target j the history starts at the
    first session k with cost(k..j-1) <= budget, found by an as-of join on cumulative cost. Each target
    then gets its own past sessions k..j-1 only (one row per (target, past session), grouped back), so
    the work per target is bounded by the budget: memory is linear in a user's sessions, not quadratic
    (joining every target with its user's whole session list was, for users with thousands of sessions).
    """
    cost = pl.col("pages").list.len().cast(pl.Int64) + 2
    sess = sessions.sort("user", "session").with_columns(cum_before=_cumsum_within_user(cost) - cost)
    tgt = (
        targets.join(sess.select("user", "session", "cum_before", "pages", "ids"), on=["user", "session"])
        .with_columns(need=pl.col("cum_before") - history_budget)
        .sort("need")
    )
    starts = sess.select("user", k="session", need="cum_before").sort("need")
    tgt = tgt.join_asof(starts, on="need", by="user", strategy="forward", check_sortedness=False).with_row_index("_target")
    past = (
        tgt.select("_target", "user", session=pl.int_ranges("k", "session")).explode("session")
        .join(sess.select("user", "session", "pages", "ids"), on=["user", "session"])
        .sort("_target", "session")
        .group_by("_target", maintain_order=True)
        .agg(history=pl.col("pages"), input_ids=pl.col("ids").explode())
    )
    return (
        tgt.join(past, on="_target", how="left")
        .select(
            "user", "split", target_start="start",
            history=pl.col("history").fill_null(pl.lit([], pl.List(pl.List(pl.Utf8)))), target="pages",
            input_ids=pl.col("input_ids").fill_null(pl.lit([], pl.List(pl.Int32))), target_ids="ids",
        )
        .with_columns(
            cart=pl.col("target").list.contains(CART), purchase=pl.col("target").list.contains(PURCHASE)
        )
        .sort("split", "target_start", "user")
    )
