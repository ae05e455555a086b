"""Each predictor's NLL of each sample, and the hard assignment of a sample to the predictor that best predicts
its history: what HeTLM's training (L1, hard EM) and likelihood routing (`ClusterwiseLM.route`) both compute."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch.func import functional_call, stack_module_state
from transformers import PreTrainedModel

from ..data import SequenceDataset, pad_sequences
from ..distributed import gather_columns
from ..nll import autocast, token_nll


def stacked_token_nll(models: list[PreTrainedModel], ids: torch.Tensor, mask: torch.Tensor,
                      max_tokens: int = 2**14) -> torch.Tensor:
    """token_nll of each of `models` (same architecture), shape (K, batch, len - 1), from one forward vmapped
    over their stacked weights. Rows go in chunks so that the K x rows x len logits stay near max_tokens."""
    params, buffers = stack_module_state(models)  # a copy: the models train on between calls
    skeleton = models[0]

    def one_model(p, b, ids, mask):
        return token_nll(lambda **inputs: functional_call(skeleton, (p, b), (), inputs), ids, mask)

    batched = torch.vmap(one_model, in_dims=(0, 0, None, None))
    rows = max(1, max_tokens // (len(models) * ids.shape[1]))
    with warnings.catch_warnings():  # CPU flash attention has no vmap rule: it loops over the models, correctly
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return torch.cat([batched(params, buffers, i, m) for i, m in zip(ids.split(rows), mask.split(rows))], dim=1)


@torch.no_grad()
def nll_matrix(models: dict[int, PreTrainedModel], dataset: SequenceDataset, idx: list[int], n_clusters: int,
               bf16: bool = False, batched: bool = False, tokens: str = "all", reduce: str = "mean") -> torch.Tensor:
    """(len(idx), K) NLL of each sample under each active predictor (0 for retired ones), over `tokens`:
    "all" of the sequence, "target" (the next session's pages and [EOS]; its [BOS] is given at generation
    time, as in nll.sequence_nll) or "history" (the past sessions: all a new user brings), as a "sum" or
    a "mean" per token. batched: all predictors in one vmapped pass, else one pass each."""
    out = torch.zeros(len(idx), n_clusters)
    if not models:  # a rank whose predictors were all retired still joins the gather
        return gather_columns(out, [])
    ids, mask = pad_sequences([dataset[i] for i in idx])
    lms = list(models.values())
    device = lms[0].device
    ids, mask = ids.to(device), mask.to(device)
    modes = [m.training for m in lms]
    for m in lms:
        m.eval()
    with autocast(device, bf16):
        if batched and len(lms) > 1:
            nll = stacked_token_nll(lms, ids, mask)
        else:
            nll = torch.stack([token_nll(m, ids, mask) for m in lms])
    for m, mode in zip(lms, modes):
        m.train(mode)
    # entry j of token_nll scores token j + 1; the target's [BOS] sits at its start
    scored = mask[:, 1:] == 1
    if tokens != "all":
        positions = torch.arange(scored.shape[1], device=device)[None, :]
        starts = torch.tensor([dataset.target_starts[i] for i in idx], device=device)[:, None]
        if tokens == "target":
            scored &= positions >= starts
        elif tokens == "history":
            scored &= positions < starts - 1
        else:
            raise ValueError(f"tokens must be 'all', 'target' or 'history', not {tokens!r}")
    total = (nll.float() * scored).sum(2)
    if reduce == "mean":
        total = total / scored.sum(1).clamp_min(1)
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")
    out[:, list(models)] = total.T.cpu()
    return gather_columns(out, list(models))  # over several processes: every rank's columns


def history_dataset(input_ids: list[list[int]], max_len: int = 512) -> SequenceDataset:
    """Users' histories alone (their most recent max_len tokens) as a SequenceDataset whose "target" is
    empty: what likelihood routing scores for a new user."""
    sequences = [torch.tensor(list(ids)[-max_len:], dtype=torch.long) for ids in input_ids]
    return SequenceDataset(sequences, [len(s) for s in sequences])


def likelihood_assignment(models: dict[int, PreTrainedModel], dataset: SequenceDataset, active: list[int],
                          n_clusters: int, idx: list[int] | None = None, bf16: bool = False,
                          batch_size: int = 64) -> torch.Tensor:
    """The `active` predictor with the lowest NLL of each sample's history (hard-EM assignment); `models`
    may hold only this process's predictors (the others' columns come from their ranks)."""
    idx = list(range(len(dataset))) if idx is None else idx
    nll = torch.zeros(len(idx), n_clusters)
    order = np.argsort(dataset.lengths[idx], kind="stable")  # length-sorted batches: little padding
    for rows in np.array_split(order, max(1, math.ceil(len(idx) / batch_size))):
        nll[rows] = nll_matrix(models, dataset, [idx[r] for r in rows], n_clusters, bf16, tokens="history",
                               reduce="sum")
    is_active = torch.zeros(n_clusters, dtype=torch.bool)
    is_active[active] = True
    return nll.masked_fill(~is_active, float("inf")).argmin(1)
