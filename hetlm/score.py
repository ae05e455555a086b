"""Scoring users with a trained model: the batch scorer of `hetlm score` and of the HTTP service.

For each user (a history: sessions of page names, oldest first) a `Scorer` gives
    cluster, cluster_prob   the routed cluster and how sure the routing is (see `route_users`);
                            for a single LM cluster is None and cluster_prob 1
    next_session            the predicted next session: by the model folder's expected-IoU set decoder
                            (`hetlm.set_decoder`, the default where the folder has one), greedy, or sampled
                            with the user's seed; `decoder` names which
    top_pages, top_probs    the k most likely first pages of the next session (the decoder's first step)
    p_cart_first_page,      P(the next session's first page is Cart / Purchase), exact from the first step's
    p_purchase_first_page   logits (no sampling, always filled; it leaves out outcomes later in the session, so
                            it is a lower bound of p_cart / p_purchase, good for ranking users)
    p_cart, p_purchase      P(Cart / Purchase anywhere in the next session), Monte Carlo over n_samples drawn
    se_cart, se_purchase    sessions (`hetlm.outcomes`) with standard errors; NaN when n_samples = 0 (the
                            default: no sampling) or the page is not in the vocabulary
    p_*_calibrated          p_cart / p_purchase after the model folder's Platt scaling (`OutcomeCalibrator`,
                            written by `hetlm experiment`); NaN when the folder has none or n_samples = 0
    unknown_pages           pages of the history used that the tokenizer does not know (mapped to [UNK])
    sessions_used           how many of the most recent sessions fit the model's context
The prompt is built as `hetlm prepare` builds a sample's history (`sessions.build_samples`): the most
recent whole sessions that fit, each [BOS] p1..pn [EOS], then [BOS] of the session to predict.
Every user's result depends on that user only (greedy decoding is left-padded, sampling uses per-user
random streams), so a batch scored together gives what each user scored alone gives.

`score_log` reads a raw click log with any ingest adapter, cleans sessions as `hetlm prepare` cleaned the
model's training log (`SessionCleaning`, stored with the tokenizer: repeats collapsed, short sessions
dropped, long ones cut at the training log's cutoff; users need one session, not two) and writes one row
per user to Parquet, batch by batch, into a scratch file renamed onto the output when complete; with `partitions` > 1 it reads the log in chunks and scores its users one
hashed part at a time (as `prepare --partitions`), so memory does not grow with the log.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel

from .cluster.base import ClusterwiseLM, for_each_cluster, load_model
from .ingest import read_events
from .outputs import work_dir, writable_folder
from .partitioned import partition_events
from .progress import Estimate, progress_bar
from .outcomes import (
    OUTCOMES,
    Decoding,
    OutcomeCalibrator,
    decode,
    estimate_outcomes,
    monte_carlo_rows,
    outcome_ids,
    row_seed,
)
from .set_decoder import Evidence, SetDecoder
from .sessions import CleaningReport, SessionCleaning, build_samples, session_ids, sessionize
from .tokenizer import BOS_ID, EOS_ID, SPECIALS, UNK_ID

History = Sequence[Sequence[str]]


class ScoreConfig(BaseModel):
    """What to compute for a user."""

    model_config = ConfigDict(extra="forbid")

    # Strict numbers: JSON `true` is not k = 1; NaN and infinities are not temperatures.
    k: int = Field(10, ge=1, le=1000, strict=True, description="number of most likely next pages returned")
    strategy: Literal["set", "greedy", "sample"] | None = Field(
        None, description="how the next session is decoded: set (the expected-IoU set decoder), greedy or sample; "
                          "default: set where the model folder has a fitted set decoder, else greedy")
    temperature: float = Field(1.0, ge=0.01, le=100, allow_inf_nan=False,
                               description="sampling temperature of the next session (below 0.01 logits overflow)")
    seed: int = Field(0, ge=0, lt=2**63, strict=True,
                      description="seed of the sampled next session and of the outcome estimate")
    n_samples: int = Field(0, ge=0, le=1024, strict=True, description="sessions drawn for the Monte Carlo P(Cart), "
                           "P(Purchase) in the whole next session (e.g. 32); 0 draws none (fast): p_cart and "
                           "p_purchase are NaN, the exact p_*_first_page are always given")


@dataclass
class UserScore:
    cluster: int | None
    cluster_prob: float
    next_session: list[str]
    top_pages: list[str]
    top_probs: list[float]
    p_cart: float
    se_cart: float
    p_purchase: float
    se_purchase: float
    unknown_pages: list[str]
    sessions_used: int
    p_cart_calibrated: float = float("nan")      # after the model folder's OutcomeCalibrator, if it has one
    p_purchase_calibrated: float = float("nan")
    decoder: str = "greedy"                      # how next_session was decoded: set, greedy or sample
    p_cart_first_page: float = float("nan")      # exact P(first page is Cart); NaN: no Cart page in the vocabulary
    p_purchase_first_page: float = float("nan")


SCORE_SCHEMA = {
    "user": pl.Utf8, "cluster": pl.Int64, "cluster_prob": pl.Float64, "next_session": pl.List(pl.Utf8),
    "top_pages": pl.List(pl.Utf8), "top_probs": pl.List(pl.Float64), "p_cart": pl.Float64, "se_cart": pl.Float64,
    "p_purchase": pl.Float64, "se_purchase": pl.Float64, "unknown_pages": pl.List(pl.Utf8),
    "sessions_used": pl.Int64, "p_cart_calibrated": pl.Float64, "p_purchase_calibrated": pl.Float64,
    "decoder": pl.Utf8, "p_cart_first_page": pl.Float64, "p_purchase_first_page": pl.Float64,
}


def route_users(model: ClusterwiseLM, z: np.ndarray | None, routing: str | None = None,
                input_ids: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each user's cluster (`ClusterwiseLM.route`) and its probability (1 for a single LM).

    Selector routing: the selector's probability of the chosen cluster. Centroid routing (k-means) has
    no probabilistic model, so we report the soft assignment softmax_k(-||z - c_k||^2 / tau): the posterior
    of a mixture of equal-weight isotropic Gaussians of variance tau / 2 at the active centroids, with tau
    the mean squared distance between pairs of active centroids (a scale fixed by the model alone, so a
    user's value does not depend on who else is scored). It ranks users by how clearly they belong to
    their cluster; it is not calibrated.
    """
    routing = routing or model.routing
    clusters = model.route(z, routing, input_ids)
    if not model.routed:
        return clusters, np.ones(len(clusters))
    if routing == "selector":
        return clusters, model.selector.predict_proba(z)[np.arange(len(z)), clusters]
    centroids = model.centroids[model.active]
    d2 = ((z[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    pairs = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    tau = pairs.sum() / (len(centroids) * (len(centroids) - 1)) if len(centroids) > 1 else 1.0
    soft = torch.softmax(torch.as_tensor(-d2 / max(tau, 1e-12)), dim=1).numpy()
    return clusters, soft[np.arange(len(z)), np.searchsorted(model.active, clusters)]


def fit_histories(sessions: pl.DataFrame, vocab: dict[str, int], budget: int) -> pl.DataFrame:
    """user, history, input_ids: each user's most recent whole sessions that fit `budget` tokens.

    Built by `sessions.build_samples`, as `hetlm prepare` builds histories: the target is an empty
    placeholder session after the user's last one. Users whose last session alone exceeds the budget
    get no row.
    """
    after_last = sessions.group_by("user").agg(session=pl.col("session").max() + 1, start=pl.col("start").max() + 1)
    placeholder = after_last.with_columns(pages=pl.lit([], dtype=pl.List(pl.Utf8))).select(sessions.columns)
    with_ids = session_ids(pl.concat([sessions, placeholder], how="vertical_relaxed"), vocab, UNK_ID, BOS_ID, EOS_ID)
    samples = build_samples(with_ids, after_last.with_columns(split=pl.lit("score")), budget)
    return samples.filter(pl.col("history").list.len() > 0).select("user", "history", "input_ids").sort("user")


def sessions_frame(histories: Sequence[History]) -> pl.DataFrame:
    """The sessions table (user = index, session, start, pages) of histories given as lists of pages."""
    rows = [(i, j, list(s)) for i, h in enumerate(histories) for j, s in enumerate(h)]
    return pl.DataFrame({"user": [r[0] for r in rows], "session": [r[1] for r in rows],
                         "start": [r[1] for r in rows], "pages": [r[2] for r in rows]},
                        schema={"user": pl.Int64, "session": pl.Int64, "start": pl.Int64, "pages": pl.List(pl.Utf8)})


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")


@dataclass
class _Decoded:
    """One user's decodings by its cluster's LM."""

    next_session: list[int]
    draws: list[list[int]]             # the outcome estimate's sessions
    top: tuple[list[int], list[float]]  # the k likeliest first pages and their probabilities
    first_page_logprobs: np.ndarray | None  # users decoded by the set decoder: log P(first page)
    first_page_outcomes: dict[str, float]  # outcome -> P(first page = its page), exact (NaN: not in the vocabulary)


@dataclass
class Scorer:
    """A loaded model (with its tokenizer and user encoder), its set decoder and outcome calibrator."""

    model: ClusterwiseLM
    routing: str | None = None
    max_new_tokens: int = 40
    batch_size: int = 64                # decoded rows per forward pass
    calibrator: OutcomeCalibrator | None = None  # Platt scaling of P(Cart), P(Purchase) (experiment model folders)
    set_decoder: SetDecoder | None = None  # the model folder's fitted set decoder (experiment and train write one)
    cleaning: SessionCleaning | None = None  # None: the one recorded in the tokenizer by `hetlm prepare`
    embedding_cache: str | Path | None = None  # a folder caching the routing encoder's embeddings (default: none)
    vocab: dict[str, int] = field(init=False, repr=False)
    outcome_ids: dict[str, int | None] = field(init=False)

    def __post_init__(self):
        _check_positive("batch_size", self.batch_size)
        _check_positive("max_new_tokens", self.max_new_tokens)
        positions = min(lm.config.max_position_embeddings for lm in self.model.models.values())
        if self.history_budget < 1:  # checked now: else no user fits, or every request fails
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a history: the model has "
                             f"{positions} positions for history, [BOS] and the generated session; use at most "
                             f"{positions - 2}")
        if self.routing not in (None, "selector", "centroid"):
            raise ValueError(f"routing must be 'selector' or 'centroid', not {self.routing!r}")
        if self.routing and not self.model.routed:
            raise ValueError("routing applies to clusterwise models only; this is a single LM")
        if (self.routing or self.model.routing) == "selector" and self.model.selector is None:
            raise ValueError(f"this {self.model.kind} model has no selector; route by 'centroid'")
        if self.embedding_cache is not None and self.model.routed:
            self.model.encoder = self.model.encoder | {"cache_dir": str(self.embedding_cache)}
        self.model.user_encoder  # noqa: B018 (loaded now: a missing encoder fails at start, not at a request)
        self.cleaning = self.cleaning or SessionCleaning.from_tokenizer(self.tokenizer)
        self.vocab = self.tokenizer.get_vocab()
        self.outcome_ids = outcome_ids(self.tokenizer)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu",
                        **kwargs) -> Scorer:
        """The model folder's model (`load_model`), set decoder and outcome calibrator."""
        decoder = SetDecoder.from_pretrained(model_dir) if SetDecoder.exists(model_dir) else None
        return cls(load_model(model_dir, device, tokenizer_dir), calibrator=OutcomeCalibrator.from_pretrained(model_dir),
                   set_decoder=decoder, **kwargs)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def n_pages(self) -> int:
        return len(self.tokenizer) - len(SPECIALS)

    @property
    def history_budget(self) -> int:
        """Tokens of history that fit beside [BOS] and the generated session."""
        return min(lm.config.max_position_embeddings for lm in self.model.models.values()) - self.max_new_tokens - 1

    def describe(self) -> dict[str, Any]:
        lm = next(iter(self.model.models.values()))
        info = {"kind": self.model.kind, "pages": self.n_pages,
                "model_type": lm.config.model_type,
                "parameters_per_lm": sum(p.numel() for p in lm.parameters()),
                "max_position_embeddings": lm.config.max_position_embeddings,
                "history_budget_tokens": self.history_budget, "max_new_tokens": self.max_new_tokens,
                "outcome_pages": {name: i is not None for name, i in self.outcome_ids.items()}}
        if self.model.routed:
            encoder = self.model.encoder
            info |= {"clusters": self.model.active, "cluster_sizes": self.model.sizes,
                     "routing": self.routing or self.model.routing,
                     # by name only: the settings may hold local paths, not for clients to see
                     "encoder": {"name": encoder.get("name"), "pooling": encoder.get("pooling"),
                                 "model": Path(encoder["model_name_or_path"]).name
                                 if encoder.get("model_name_or_path") else "all-MiniLM-L6-v2 (packaged)"}}
        info["outcome_calibration"] = asdict(self.calibrator) if self.calibrator is not None else None
        info["default_decoder"] = self.strategy(ScoreConfig())
        info["cleaning"] = asdict(self.cleaning)
        return info

    def strategy(self, options: ScoreConfig) -> str:
        """The decoder a user's options ask for; an explicit 'set' needs a fitted set decoder."""
        if options.strategy is None:
            return "set" if self.set_decoder is not None else "greedy"
        if options.strategy == "set" and self.set_decoder is None:
            raise ValueError("strategy 'set' needs a fitted set decoder (set_decoder.json, written by `hetlm train` "
                             "and `hetlm experiment` into the model folder); this model has none: use greedy")
        return options.strategy

    def score(self, histories: Sequence[History], options: Sequence[ScoreConfig],
              between_passes: Callable[[], None] | None = None) -> list[UserScore]:
        """One `UserScore` per history (raises ValueError if a history's last session does not fit);
        `between_passes` is called before each decoding pass (`outcomes.decode`)."""
        fitted = fit_histories(sessions_frame(histories), self.vocab, self.history_budget)
        if fitted.height < len(histories):
            missing = sorted(set(range(len(histories))) - set(fitted["user"].to_list()))
            raise ValueError(f"history {missing[0]}: its most recent session does not fit the model's context "
                             f"({self.history_budget} tokens)")
        return self.score_fitted(fitted, options, between_passes)

    def score_fitted(self, fitted: pl.DataFrame, options: Sequence[ScoreConfig],
                     between_passes: Callable[[], None] | None = None) -> list[UserScore]:
        """Scores of users whose histories are already fitted (a `fit_histories` frame)."""
        histories, inputs = fitted["history"].to_list(), fitted["input_ids"].to_list()
        clusters, cluster_probs = route_users(self.model, self.model.embed(histories), self.routing, inputs)
        strategies = [self.strategy(o) for o in options]
        decoded = for_each_cluster(self.model, clusters, lambda lm, idx: self._decode(
            lm, idx.tolist(), inputs, options, strategies, between_passes))
        next_sessions = [d.next_session for d in decoded]
        set_users = [i for i, d in enumerate(decoded) if d.first_page_logprobs is not None]
        if set_users:
            evidence = Evidence(np.stack([decoded[i].first_page_logprobs for i in set_users]),
                                [decoded[i].draws[:self.set_decoder.n_samples] for i in set_users])
            for i, pages in zip(set_users, self.set_decoder.predict([inputs[i] for i in set_users], evidence)):
                next_sessions[i] = pages
        return [self._user_score(i, clusters, cluster_probs, next_sessions[i], decoded[i], histories, strategies[i])
                for i in range(len(inputs))]

    def _decode(self, lm: PreTrainedModel, users: list[int], inputs: list[list[int]],
                options: Sequence[ScoreConfig], strategies: list[str],
                between_passes: Callable[[], None] | None = None) -> list[_Decoded]:
        """The decodings of these users (all routed to `lm`), in one batched `decode`."""
        owner, is_next, rows = self._rows(users, inputs, options)
        next_rows = [j for j, first in enumerate(is_next) if first]  # one per user, in the order of `users`
        decoded = decode(lm, [inputs[i] for i in owner], rows, self.max_new_tokens, self.batch_size,
                         first_pages_of=next_rows, between_passes=between_passes)
        next_session: dict[int, list[int]] = {}
        draws: dict[int, list[list[int]]] = {i: [] for i in users}
        for i, first, session in zip(owner, is_next, decoded.sessions):
            if first:
                next_session[i] = session
            else:
                draws[i].append(session)
        logprobs = torch.from_numpy(np.stack([decoded.first_page_logprobs[j] for j in next_rows]))
        best = torch.topk(logprobs, min(max(options[i].k for i in users), self.n_pages), dim=1)
        out = []
        for j, i in enumerate(users):
            kk = min(options[i].k, self.n_pages)
            first_outcomes = {name: float("nan") if page is None else float(logprobs[j, page].exp())
                              for name, page in self.outcome_ids.items()}
            out.append(_Decoded(next_session[i], draws[i],
                                (best.indices[j, :kk].tolist(), best.values[j, :kk].exp().tolist()),
                                logprobs[j].numpy() if strategies[i] == "set" else None, first_outcomes))
        return out

    def _rows(self, users: list[int], inputs: list[list[int]], options: Sequence[ScoreConfig]):
        """The decoded rows of these users, each one's next session then its outcome draws: the user
        of each row, whether it is the next session, and how it is decoded."""
        owner, is_next, rows = [], [], []
        for i in users:
            o = options[i]
            temperature = o.temperature if o.strategy == "sample" else None
            rows += [Decoding(temperature, row_seed(o.seed, inputs[i], "next"))]
            rows += monte_carlo_rows(inputs[i], o.n_samples, o.seed)
            owner += [i] * (1 + o.n_samples)
            is_next += [True] + [False] * o.n_samples
        return owner, is_next, rows

    def _user_score(self, i, clusters, cluster_probs, next_session, decoded, histories, decoder) -> UserScore:
        nan = {name: float("nan") for name in OUTCOMES}
        p, se = nan, nan
        if decoded.draws:
            outcomes = estimate_outcomes([decoded.draws], self.outcome_ids)
            p = {name: outcomes.p[name][0] for name in OUTCOMES}
            se = {name: outcomes.se[name][0] for name in OUTCOMES}
        pages, probs = decoded.top
        unknown = list(dict.fromkeys(p for s in histories[i] for p in s if p not in self.vocab))
        return UserScore(
            cluster=int(clusters[i]) if self.model.routed else None, cluster_prob=float(cluster_probs[i]),
            next_session=self.tokenizer.convert_ids_to_tokens(next_session),
            top_pages=self.tokenizer.convert_ids_to_tokens(pages), top_probs=probs,
            p_cart=float(p["cart"]), se_cart=float(se["cart"]), p_purchase=float(p["purchase"]),
            se_purchase=float(se["purchase"]), unknown_pages=unknown, sessions_used=len(histories[i]),
            decoder=decoder, **{f"p_{name}_first_page": decoded.first_page_outcomes[name] for name in OUTCOMES},
            **{f"p_{name}_calibrated": float(self.calibrator.transform(name, [p[name]])[0])
               # fitted on Monte Carlo estimates (`hetlm experiment` with outcome_samples > 0), not first-page ones
               for name in OUTCOMES if self.calibrator is not None and decoded.draws},
        )


def user_sessions(events: pl.DataFrame, cleaning: SessionCleaning | None = None) -> pl.DataFrame:
    """The sessions of a log's events (null pages dropped), cleaned by `cleaning` (default: prepare's
    defaults, no long-session cut)."""
    cleaning = cleaning or SessionCleaning()
    events = sessionize(events.drop_nulls("page"), cleaning.gap_minutes, cleaning.use_log_sessions)
    return cleaning.clean(events, CleaningReport())


def log_sessions(source: str, path: str | Path, cleaning: SessionCleaning | None = None, on_bad_rows: str = "error",
                 **source_options: Any) -> tuple[pl.DataFrame, int]:
    """`user_sessions` of a raw log, and the number of users in the log."""
    events = read_events(source, path, on_bad_rows=on_bad_rows, **source_options).events
    return user_sessions(events, cleaning), events.drop_nulls("page")["user"].n_unique()


def iter_scores(scorer: Scorer, fitted: pl.DataFrame, options: ScoreConfig | None = None,
                batch_users: int = 64) -> Iterator[pa.Table]:
    """Arrow tables of at most `batch_users` scored users each (SCORE_SCHEMA), computed lazily."""
    options = options or ScoreConfig()
    _check_positive("batch_users", batch_users)
    for start in range(0, fitted.height, batch_users):
        batch = fitted.slice(start, batch_users)
        scores = scorer.score_fitted(batch, [options] * batch.height)
        rows = [{"user": str(u)} | asdict(s) for u, s in zip(batch["user"].to_list(), scores)]
        yield pl.DataFrame(rows, schema=SCORE_SCHEMA).to_arrow()


@dataclass
class ScoreSummary:
    users_in_log: int
    users_scored: int
    out: str
    notes: list[str] = field(default_factory=list)  # why columns are NaN, why users got no row


def score_notes(scorer: Scorer, options: ScoreConfig, users_in_log: int, users_scored: int) -> list[str]:
    """What a scores file leaves empty, and why (its NaN columns, the users with no row)."""
    notes = []
    if users_scored < users_in_log:
        notes.append(f"{users_in_log - users_scored} users have no row: no session left after cleaning, or their "
                     f"last session is longer than the model's history budget ({scorer.history_budget} tokens "
                     f"beside max_new_tokens {scorer.max_new_tokens})")
    missing = [OUTCOMES[name] for name, i in scorer.outcome_ids.items() if i is None]
    if options.n_samples == 0:
        notes.append("p_cart, p_purchase are NaN: n_samples is 0 (no sessions drawn to estimate them); "
                     "p_cart_first_page, p_purchase_first_page are exact, or pass --n-samples 32 for the "
                     "whole next session")
    elif missing:
        notes.append(f"{', '.join(missing)} is not a page of the model's vocabulary (its training log has no such "
                     "outcome events): its probability is NaN")
    if scorer.calibrator is None:
        notes.append("p_cart_calibrated, p_purchase_calibrated are NaN: the model folder has no outcome calibration "
                     f"({OutcomeCalibrator.FILE}: `hetlm experiment` fits one on the validation users when "
                     "outcome_samples > 0); use p_cart, "
                     "p_purchase (uncalibrated)")
    return notes


def score_log(scorer: Scorer, source: str, path: str | Path, out: str | Path, options: ScoreConfig | None = None,
              on_bad_rows: str = "error", batch_users: int = 64, progress: bool = True, partitions: int = 1,
              **source_options: Any) -> ScoreSummary:
    """Score every user of a raw log (see the module docstring) into the Parquet file `out`; sessions are
    cleaned by `scorer.cleaning`.

    partitions > 1: the log is read in chunks and its users hashed into that many parts on disk (as `prepare
    --partitions` does), scored one part at a time, so peak memory is about one part's, not the log's.
    Rows are ordered by user within each part. Users left with no session after cleaning, or whose last
    session does not fit the model's context, get no row (users_in_log - users_scored of them).
    """
    out = Path(out)
    _check_positive("batch_users", batch_users)  # before the log is read
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of a Parquet file")
    writable_folder(out.parent, "the folder of --out")
    columns = [TextColumn("scoring users"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    writer, users_in_log, scored, done = None, 0, 0, 0
    # Written inside a scratch folder and renamed onto `out` when complete: an interrupted run leaves the
    # previous file (or none), never a partial one that reads as whole.
    with work_dir(out.parent, f".{out.name}.score-") as work, progress_bar(*columns, disable=not progress) as bar:
        partial = work / "partial.parquet"
        if partitions > 1:
            parts = partition_events(source, path, partitions, work, on_bad_rows, **source_options)
        else:
            parts = [read_events(source, path, on_bad_rows=on_bad_rows, **source_options).events.lazy()]
        users = [part.drop_nulls("page").select(pl.col("user").n_unique()).collect().item() for part in parts]
        users_in_log = sum(users)
        task = bar.add_task("score", total=users_in_log)
        estimate = Estimate("score", users_in_log, "users", show=progress)
        try:
            for part, n_users in zip(parts, users):
                fitted = fit_histories(user_sessions(part.collect(), scorer.cleaning), scorer.vocab,
                                       scorer.history_budget)
                for table in iter_scores(scorer, fitted, options, batch_users):
                    writer = writer or pq.ParquetWriter(partial, table.schema)
                    writer.write_table(table)
                    bar.advance(task, table.num_rows)
                    done += table.num_rows
                    estimate.update(done)
                bar.advance(task, n_users - fitted.height)  # users with no row
                done += n_users - fitted.height
                scored += fitted.height
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no user to score: still an empty file with the schema
            pl.DataFrame(schema=SCORE_SCHEMA).write_parquet(partial)
        os.replace(partial, out)
    return ScoreSummary(users_in_log, scored, str(out), score_notes(scorer, options or ScoreConfig(), users_in_log,
                                                                     scored))
