"""Next-token NLL of a causal LM over padded or packed batches: the training loss (token_nll) and the
score of a user's next session given the past ones (target_mask, sequence_nll).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from hetlm.data import SequenceDataset, pad_sequences, sorted_batches

IGNORE = -100  # label of pad positions (cross-entropy skips it)


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast when `bf16` (CPU or GPU); weights stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def token_nll(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """NLL of each next token, shape (batch, len - 1): entry j scores token j + 1; 0 where it is padding.
    With position_ids (packed rows, pack_sequences) each sample attends to itself only, and a sample's first
    token is not scored (it does not follow the previous sample), as in a row of its own."""
    if position_ids is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        unscored = mask[:, 1:] == 0
    else:
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits  # a cache hides the packing
        unscored = (mask[:, 1:] == 0) | (position_ids[:, 1:] == 0)
    # Shift the labels, not the logits: slicing the (batch, len, vocab) logits would copy them.
    labels = F.pad(ids[:, 1:].masked_fill(unscored, IGNORE), (0, 1), value=IGNORE)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(labels.shape)[:, :-1]


def target_mask(nll: torch.Tensor, mask: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """Which entries of `token_nll` score the next session: its pages and [EOS] (entry j scores token j + 1,
    and the target's [BOS] is given at generation time, so it is not scored)."""
    positions = torch.arange(nll.shape[1], device=nll.device)
    starts = torch.as_tensor(starts, device=nll.device)
    return (positions[None, :] >= starts[:, None]) & (mask[:, 1:] == 1)


@torch.no_grad()
def sequence_nll(model: PreTrainedModel, samples, batch_size: int = 64, max_len: int = 512, bf16: bool = False) -> np.ndarray:
    """Per-sample mean NLL of the next session's pages and [EOS] given the past sessions and its [BOS]."""
    dataset = SequenceDataset.from_samples(samples, max_len)
    was_training, device = model.training, model.device
    model.eval()
    out = np.zeros(len(dataset))
    for batch in sorted_batches(dataset.lengths, batch_size):
        ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in batch]))
        with autocast(device, bf16):
            nll = token_nll(model, ids, mask)
        scored = target_mask(nll, mask, [dataset.target_starts[i] for i in batch])
        out[batch] = ((nll * scored).sum(1) / scored.sum(1).clamp(min=1)).cpu().numpy()
    model.train(was_training)
    return out
