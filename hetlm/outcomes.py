"""Outcome probabilities of the next session (P(Cart), P(Purchase)) from a page LM, and their calibration.

Estimator. The quantity wanted is P(the next session contains the Cart page | history), under the LM's
own distribution over whole sessions. It is a sum over every session the LM can emit, so it has no
closed form; the first-page probability P(first page = Cart) only covers sessions that open with the
cart. We estimate it by Monte Carlo: draw N next sessions from the LM at temperature 1 (ancestral
sampling, [BOS] to [EOS] or `max_new_tokens` pages) and take the fraction that contain the page.
Each draw is an independent Bernoulli trial with the wanted probability p, so the fraction is unbiased
(up to sessions cut at `max_new_tokens`, which can only miss an outcome: a slight under-estimate,
rare when the cap is above the longest kept sessions) with standard error sqrt(p (1 - p) / N).

Sampling is batch independent. A draw uses the Gumbel-max trick: argmax_v(logits_v / T + G_v) with
G_v i.i.d. Gumbel(0, 1) is an exact sample of softmax(logits / T). Each decoded row draws its noise
from its own generator, seeded from (seed, the prompt's ids, the draw's index), so a user's samples
depend only on the prompt, the seed and the model: the same in `hetlm score` and in the HTTP service,
whatever else shares the batch. Rows without a temperature get no noise (greedy decoding), so greedy
rows and sampled rows share one batched `generate` call.

Calibration (`calibration`): Brier score and reliability-curve data on samples whose outcome is known.
Recalibration (`OutcomeCalibrator`): a small LM's probabilities can be further off than always predicting
the base rate; Platt scaling fitted on held-out users (validation) maps them to calibrated ones.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.metrics import brier_score_loss
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .cluster.base import ClusterwiseLM, for_each_cluster
from .data import pad_sequences, sorted_batches
from .generate import NEVER_EMITTED, NoImmediateRepeat, session_prompts
from .ingest.base import CART, PURCHASE
from .progress import progress_bar
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID

OUTCOMES = {"cart": CART, "purchase": PURCHASE}


@dataclass(frozen=True)
class Decoding:
    """How one row is decoded: greedy (temperature None) or sampled at `temperature` from its own seed."""

    temperature: float | None = None
    seed: int = 0


def row_seed(seed: int, prompt: list[int], stream: str) -> int:
    """A generator seed from the user's seed, prompt and the draw's name ('next', 'mc3', ...)."""
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8,
                             key=f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest, "little") >> 1


class RowSampler(LogitsProcessor):
    """Gumbel-max sampling with one generator per row; greedy rows are left as they are. Keeps the first
    step's logits (`first_logits`): the next session's first-page distribution, at no extra pass."""

    def __init__(self, rows: list[Decoding]):
        self.temperature = torch.tensor([d.temperature or 1.0 for d in rows])[:, None]
        self.sampled = [row for row, d in enumerate(rows) if d.temperature is not None]
        self.generators = [torch.Generator().manual_seed(rows[row].seed) for row in self.sampled]
        self.first_logits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_logits is None:
            self.first_logits = scores.clone()
        scores = scores / self.temperature.to(scores.device)
        if self.sampled:
            uniform = torch.empty(len(self.sampled), scores.shape[1])
            for row, generator in zip(uniform, self.generators):  # row by row: each from its own stream
                row.uniform_(generator=generator)
            gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))
            scores[self.sampled] += gumbel.to(scores.device)
        return scores


@dataclass
class Decoded:
    sessions: list[list[int]]              # one per row: page ids, [EOS] excluded
    first_page_logprobs: dict[int, np.ndarray]  # row -> (vocab,) log P(first page), specials -inf


def decode_sessions(model: PreTrainedModel, input_ids_list: list[list[int]], rows: list[Decoding],
                    max_new_tokens: int = 40, batch_size: int = 64, progress: bool = False) -> list[list[int]]:
    """One next session per row (page ids, [EOS] excluded), each decoded as its `Decoding` says (`decode`)."""
    return decode(model, input_ids_list, rows, max_new_tokens, batch_size, progress).sessions


@torch.inference_mode()
def decode(model: PreTrainedModel, input_ids_list: list[list[int]], rows: list[Decoding], max_new_tokens: int = 40,
           batch_size: int = 64, progress: bool = False, first_pages_of: Sequence[int] = (),
           between_passes: Callable[[], None] | None = None) -> Decoded:
    """One next session per row, each decoded as its `Decoding` says, and for the rows `first_pages_of` the
    log-probabilities of the session's first page over pages (as `generate.next_page_scores`, from the
    decoder's own first step instead of another pass over the prompt). `between_passes` is called before each
    pass of `batch_size` rows (the server pauses costly work there while it scores cheap requests).

    Same prompts and constraints as `generate.generate_next_sessions` (history + [BOS], left padded, only
    pages and [EOS] emitted); a greedy row gives the same session as it does there (up to float rounding
    in near ties: here the prompt's last token is a separate step, see `_shared_prompt_cache`).
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                              suppress_tokens=NEVER_EMITTED, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                              pad_token_id=PAD_ID)
    prompts = session_prompts(input_ids_list, model.config.max_position_embeddings - max_new_tokens)
    sessions: list[list[int]] = [[] for _ in prompts]
    wanted, first_pages = set(first_pages_of), {}
    was_training = model.training
    model.eval()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("sample sessions", total=len(prompts))
        for batch in sorted_batches(np.array([len(p) for p in prompts]), batch_size):
            if between_passes is not None:
                between_passes()
            ids, mask = (t.to(model.device) for t in pad_sequences([prompts[i] for i in batch], side="left"))
            sampler = LogitsProcessorList([NoImmediateRepeat(), RowSampler([rows[i] for i in batch])])
            cache = {_cache_kwarg(model): _shared_prompt_cache(model, ids)}
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=sampler, **cache)
            for i, row in zip(batch, out[:, ids.shape[1]:].tolist()):
                sessions[i] = row[:row.index(EOS_ID)] if EOS_ID in row else row
            keep = [j for j, i in enumerate(batch) if i in wanted]
            if keep:
                logits = sampler[-1].first_logits[keep].float()
                logits[:, [PAD_ID, UNK_ID, BOS_ID, EOS_ID]] = float("-inf")
                for i, logprobs in zip((batch[j] for j in keep), torch.log_softmax(logits, dim=-1).cpu().numpy()):
                    first_pages[i] = logprobs
            bar.advance(task, len(batch))
    model.train(was_training)
    return Decoded(sessions, first_pages)


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); keep both working.
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _shared_prompt_cache(model: PreTrainedModel, ids: torch.Tensor):
    """KV cache of each row's prompt but its last token, computed once per distinct prompt and copied to
    its rows: a user's N outcome draws share one prompt, so the prompt costs one pass, not N. `generate`
    then starts from the last prompt token (the same logits as one pass over the prompt, up to rounding)."""
    if ids.shape[1] < 2:  # prompts of [BOS] alone: nothing before the last token
        return None
    unique, row_of = torch.unique(ids, dim=0, return_inverse=True)  # left padding is part of the row
    unique_mask = (unique != PAD_ID).long()  # a prompt holds no [PAD]
    positions = (unique_mask.cumsum(1) - 1).clamp(min=0)
    output = model(input_ids=unique[:, :-1], attention_mask=unique_mask[:, :-1], position_ids=positions[:, :-1],
                   use_cache=True, logits_to_keep=1)
    cache = output[_cache_kwarg(model)]
    cache.reorder_cache(row_of)
    return cache


def monte_carlo_rows(input_ids: list[int], n_samples: int, seed: int) -> list[Decoding]:
    """The N temperature-1 draws of one user's outcome estimate."""
    return [Decoding(1.0, row_seed(seed, input_ids, f"mc{j}")) for j in range(n_samples)]


@dataclass
class OutcomeEstimate:
    """Monte Carlo P(outcome page in the next session) per user, with its standard error (NaN where the
    tokenizer has no such page or no sample was drawn)."""

    p: dict[str, np.ndarray]
    se: dict[str, np.ndarray]
    n_samples: int


def outcome_ids(tokenizer) -> dict[str, int | None]:
    """Token id of each outcome page, None where the page is not in the vocabulary."""
    ids = {name: tokenizer.convert_tokens_to_ids(page) for name, page in OUTCOMES.items()}
    return {name: i if i is not None and i >= len(SPECIALS) else None for name, i in ids.items()}


def estimate_outcomes(samples: list[list[list[int]]], ids: dict[str, int | None]) -> OutcomeEstimate:
    """From each user's sampled sessions (all users drew the same number) to the estimate."""
    n = len(samples[0]) if samples else 0
    p, se = {}, {}
    for name, page_id in ids.items():
        if page_id is None or n == 0:
            p[name] = se[name] = np.full(len(samples), np.nan)
            continue
        p[name] = np.array([np.mean([page_id in s for s in user]) for user in samples])
        se[name] = np.sqrt(p[name] * (1 - p[name]) / n)
    return OutcomeEstimate(p, se, n)


def outcome_probabilities(model: PreTrainedModel, input_ids_list: list[list[int]], tokenizer, n_samples: int = 32,
                          seed: int = 0, max_new_tokens: int = 40, batch_size: int = 64,
                          progress: bool = False) -> OutcomeEstimate:
    """Monte Carlo P(Cart) and P(Purchase) in the next session of each user (see the module docstring)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    prompts = [ids for ids in input_ids_list for _ in range(n_samples)]
    rows = [d for ids in input_ids_list for d in monte_carlo_rows(ids, n_samples, seed)]
    drawn = decode_sessions(model, prompts, rows, max_new_tokens, batch_size, progress)
    per_user = [drawn[i:i + n_samples] for i in range(0, len(drawn), n_samples)]
    return estimate_outcomes(per_user, outcome_ids(tokenizer))


def outcome_table(model: ClusterwiseLM, tokenizer, samples: pl.DataFrame, z: np.ndarray | None = None,
                  routing: str | None = None, n_samples: int = 32, seed: int = 0, max_new_tokens: int = 40,
                  batch_size: int = 64, progress: bool = False) -> pl.DataFrame:
    """Per sample: user, p_cart, p_purchase, cart, purchase (observed), se_cart, se_purchase.

    Each user is estimated by its cluster's LM (`z`, the samples' user embeddings, routes them as in
    `evaluate.predict`; a single LM needs none).
    """
    inputs = samples["input_ids"].to_list()
    if z is None and model.routed and (routing or model.routing) != "likelihood":
        raise ValueError("a clusterwise model needs the user embeddings z to route the samples")

    names = [f"{kind}_{name}" for kind in ("p", "se") for name in OUTCOMES]

    def run(lm: PreTrainedModel, idx: np.ndarray) -> np.ndarray:  # one row of `names` per user
        est = outcome_probabilities(lm, [inputs[i] for i in idx], tokenizer, n_samples, seed, max_new_tokens,
                                    batch_size, progress)
        return np.column_stack([est.p[name] for name in OUTCOMES] + [est.se[name] for name in OUTCOMES])

    rows = for_each_cluster(model, model.route(z, routing, inputs), run)
    columns = dict(zip(names, np.array(rows, dtype=float).reshape(len(inputs), len(names)).T))
    return samples.select("user").with_columns(
        p_cart=columns["p_cart"], p_purchase=columns["p_purchase"], cart=samples["cart"],
        purchase=samples["purchase"], se_cart=columns["se_cart"], se_purchase=columns["se_purchase"],
    )


@dataclass
class Calibration:
    """Brier score (and that of always predicting the observed rate, for reference) and the
    reliability curve: per non-empty bin of predicted probability, its mean prediction, the observed
    outcome rate and the number of users."""

    brier: float
    brier_base_rate: float
    n: int
    bins: list[dict[str, float]] = field(default_factory=list)


def calibration(p: np.ndarray, observed: np.ndarray, n_bins: int = 10) -> Calibration:
    """Calibration of predicted probabilities `p` against 0/1 outcomes, on `n_bins` equal-width bins."""
    p, y = np.asarray(p, dtype=float), np.asarray(observed, dtype=float)
    known = ~np.isnan(p)
    p, y = p[known], y[known]
    if not len(p):
        return Calibration(float("nan"), float("nan"), 0)
    # Equal-width bins as sklearn.calibration.calibration_curve(strategy="uniform"), plus the counts.
    which = np.clip(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p, side="right"), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    mean_p = np.bincount(which, p, n_bins)
    rate = np.bincount(which, y, n_bins)
    bins = [{"mean_predicted": float(mean_p[b] / count[b]), "observed_rate": float(rate[b] / count[b]),
             "count": int(count[b])}
            for b in np.flatnonzero(count)]
    return Calibration(float(brier_score_loss(y, p, pos_label=1)),
                       float(brier_score_loss(y, np.full_like(p, y.mean()), pos_label=1)), len(p), bins)


def outcome_calibration(table: pl.DataFrame, n_bins: int = 10) -> dict[str, Calibration]:
    """Calibration of p_cart and p_purchase of an `outcome_table` against its observed cart / purchase."""
    return {name: calibration(table[f"p_{name}"].to_numpy(), table[name].to_numpy(), n_bins) for name in OUTCOMES}


@dataclass
class OutcomeCalibrator:
    """Platt scaling of each outcome's Monte Carlo probability, fitted on held-out users:
    calibrated p = sigmoid(slope * logit(p) + intercept), p clipped to [1/(2N), 1 - 1/(2N)] first (a
    0-of-N estimate has no logit). A logistic regression on the validation users' estimates gives the
    two numbers; a negative slope (worse than chance on validation) is replaced by the base rate
    (slope 0). Fitted at N draws per user; scoring with another N changes the noise it corrects for.
    Saved as outcome_calibration.json in a model folder, where `hetlm score` / `serve` pick it up.
    """

    coefficients: dict[str, tuple[float, float]] = field(default_factory=dict)  # outcome -> (slope, intercept)
    n_samples: int = 0
    n_users: int = 0

    FILE = "outcome_calibration.json"

    def _logit(self, p: np.ndarray) -> np.ndarray:
        eps = 0.5 / max(self.n_samples, 1)
        p = np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
        return np.log(p / (1 - p))

    def fit(self, table: pl.DataFrame, n_samples: int) -> OutcomeCalibrator:
        """From an `outcome_table` of held-out users (p_cart, p_purchase and the observed cart, purchase)."""
        from sklearn.linear_model import LogisticRegression

        self.n_samples, self.n_users, self.coefficients = n_samples, table.height, {}
        for name in OUTCOMES:
            p, y = table[f"p_{name}"].to_numpy(), table[name].to_numpy().astype(int)
            known = ~np.isnan(p)
            p, y = p[known], y[known]
            if not len(y) or y.min() == y.max():  # nothing to learn a slope from
                continue
            fitted = LogisticRegression(C=1e6).fit(self._logit(p)[:, None], y)
            slope, intercept = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
            if slope < 0:
                rate = y.mean()
                slope, intercept = 0.0, float(np.log(rate / (1 - rate)))
            self.coefficients[name] = (slope, intercept)
        return self

    def transform(self, name: str, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of outcome `name` (NaN where p is NaN or the outcome was not fitted)."""
        p = np.asarray(p, dtype=float)
        if name not in self.coefficients:
            return np.full_like(p, np.nan)
        slope, intercept = self.coefficients[name]
        out = 1 / (1 + np.exp(-(slope * self._logit(p) + intercept)))
        return np.where(np.isnan(p), np.nan, out)

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(
            {"method": "platt", "coefficients": self.coefficients, "n_samples": self.n_samples,
             "n_users": self.n_users}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> OutcomeCalibrator | None:
        """The calibrator saved in a model folder, None when it has none."""
        path = Path(folder) / cls.FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return cls({k: tuple(v) for k, v in saved["coefficients"].items()}, saved["n_samples"], saved["n_users"])
