"""One trainer for causal-LM training on page sequences: the single LM, each k-means LM, HeTLM's critics.

A training sequence is a user's past sessions followed by the next session (input_ids + target_ids); the
loss is next-token NLL on every non-pad token. The loop, in order: length-bucketed batches -> grad
accumulation -> clip -> AdamW step at the scheduled lr -> validation / early stopping / best model ->
resumable checkpoint. Everything needed to continue a run exactly lives in out_dir/checkpoint/.

Multi-process (torchrun + DistributedDataParallel): every rank builds the same batches (same seed) and
takes every world_size-th sample of each; batch_size is the global batch, so a run trains the same
whatever the number of processes. Rank 0 alone writes checkpoints, best/ and history.json.
Training samples can also stream from a Parquet file (ParquetSequences): only their lengths stay in memory.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from hetlm.progress import progress_bar
from hetlm.tokenizer import PAD_ID

log = logging.getLogger(__name__)

IGNORE = -100  # label of pad positions (cross-entropy skips it)
T = TypeVar("T")


@dataclass
class TrainConfig:
    lr: float = 1e-3  # for random init; the paper's 1e-5 suits fine-tuning released weights
    weight_decay: float = 0.01
    batch_size: int = 32  # samples per forward pass over all ranks (each rank takes batch_size / world_size)
    grad_accum: int = 1
    epochs: int = 10
    max_steps: int | None = None  # optimizer steps; caps the epochs and sets the schedule's length
    warmup_ratio: float = 0.05
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up; cosine and linear end at 0
    grad_clip: float = 1.0
    bf16: bool = False  # bfloat16 autocast (CPU or GPU); weights and optimizer stay float32
    eval_every: int = 200  # steps; validation also runs at the end of every epoch
    early_stopping_patience: int | None = 5  # evaluations without improvement; None = never stop early
    max_len: int = 512  # longer sequences keep their most recent tokens
    bucket_batches: int = 50  # length bucketing: sort by length within chunks of this many batches
    stream_buffer: int = 4  # streamed Parquet training samples: row groups shuffled together (2 buffers cached)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    save_every: int = 500  # steps between resumable checkpoints (one is also written at the end)
    load_best_at_end: bool = True  # leave the best validated weights in the model
    # Speed settings, defaults as measured on a CPU (bench/bench_train.py --ablate); none changes what is learned.
    # Packing gains nothing after length bucketing: little padding is left, samples of similar lengths do not
    # share a row, and an attention mask over a packed row costs its full width.
    pack: bool = False  # a rank's share of a batch packed into rows as wide as its longest sample (pack_sequences)
    adamw: Literal["fused", "foreach", "for-loop"] = "fused"  # torch's AdamW kernel; fused steps fastest
    compile: bool = False  # torch.compile the model for training: compiling costs more than short runs gain

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, not {self.schedule!r}")
        check_limits(self, positive=("lr", "grad_clip"), non_negative=("weight_decay", "warmup_ratio"),
                     at_least_one=("batch_size", "grad_accum", "epochs", "max_steps", "eval_every",
                                   "early_stopping_patience", "bucket_batches", "stream_buffer", "save_every"))
        if self.warmup_ratio >= 1 or self.max_len < 2:
            raise ValueError(f"warmup_ratio must be below 1 ({self.warmup_ratio}) and max_len at least 2 ({self.max_len})")
        if self.adamw not in ("fused", "foreach", "for-loop"):
            raise ValueError(f"adamw must be fused, foreach or for-loop, not {self.adamw!r}")


def check_limits(config, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 at_least_one: Sequence[str] = ()) -> None:
    """A ValueError naming the first field of `config` out of its range (found before any training starts,
    not as NaN tables after it); NaN and infinities are out of every range, None (unset) is in."""
    for names, ok, what in ((positive, lambda v: v > 0, "above 0"), (non_negative, lambda v: v >= 0, "0 or more"),
                            (at_least_one, lambda v: v >= 1, "1 or more")):
        for name in names:
            value = getattr(config, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name} must be a finite number {what}, not {value!r}")


@dataclass
class TrainResult:
    steps: int
    epochs: int  # epochs completed
    best_val_loss: float | None  # validation NLL per next-session token (ValLoss.target) of the best model
    best_step: int | None
    stopped_early: bool
    tokens_per_s: float  # non-pad training tokens per second of training steps
    history: dict
    out_dir: Path


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this process on its node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in the job: rank 0 of 1 unless torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR...).
    A no-op in a single process or when already joined. backend: nccl on GPUs, gloo on CPUs."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return dist_info()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    dist.init_process_group(backend)
    # A process that exits with the group alive can abort in gloo's teardown ("terminate called without an
    # active exception", about 1 run in 3 here), so scripts that never call close_distributed still exit cleanly.
    atexit.register(close_distributed)
    return dist_info()


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's disjoint part of a global batch: every world_size-th item from the rank-th. Strided, so
    the ranks share a length-sorted batch evenly."""
    return list(items[rank::world_size])


def owned_clusters(n_clusters: int, info: DistInfo) -> list[int]:
    """Clusters whose predictor lives on this rank (HeTLM over several processes): k % world_size == rank."""
    return [k for k in range(n_clusters) if k % info.world_size == info.rank]


def _collective(tensor: torch.Tensor, reduce: bool, src: int = 0) -> torch.Tensor:
    """A copy of `tensor` summed (reduce) or broadcast from rank `src` over the ranks, on the device the
    backend needs (nccl: this GPU); returned on the tensor's own device."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tensor.detach().to(comm, copy=True)
    if reduce:
        dist.all_reduce(buffer)
    else:
        dist.broadcast(buffer, src=src)
    return buffer.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _collective(tensor, reduce=True)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / dist_info().world_size


def gather_columns(matrix: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """The full (rows, K) matrix on every rank when each rank filled only its own `columns` (e.g. the
    NLL of its clusters' predictors): an all-reduce sum of the zero-filled matrices."""
    own = torch.zeros_like(matrix)
    own[:, list(columns)] = matrix[:, list(columns)]
    return all_reduce_sum(own)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers those of rank `src` (e.g. HeTLM's selector from rank 0,
    or each predictor from the rank that trained it)."""
    for tensor in module.state_dict().values():
        tensor.copy_(_collective(tensor, reduce=False, src=src))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- data


def sample_pairs(samples) -> list[tuple[Sequence[int], Sequence[int]]]:
    """(input_ids, target_ids) pairs from a frame with those columns, mappings, or pairs."""
    if hasattr(samples, "columns"):  # polars / pandas frame
        return list(zip(samples["input_ids"].to_list(), samples["target_ids"].to_list()))
    return [(s["input_ids"], s["target_ids"]) if isinstance(s, Mapping) else (s[0], s[1]) for s in samples]


def _windows(input_lengths: np.ndarray, target_lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(length, target start) of each sequence input + target once cut to its max_len most recent tokens."""
    cut = np.maximum(0, input_lengths + target_lengths - max_len)
    return input_lengths + target_lengths - cut, np.maximum(0, input_lengths - cut)


class SequenceDataset(Dataset):
    """Training sequences (input + target, at most max_len most recent tokens) and where each target starts."""

    def __init__(self, sequences: list[torch.Tensor], target_starts: list[int]):
        self.sequences, self.target_starts = sequences, target_starts
        self.lengths = np.array([len(s) for s in sequences])

    @classmethod
    def from_samples(cls, samples, max_len: int = 512) -> SequenceDataset:
        if isinstance(samples, SequenceDataset):
            return samples
        sequences, starts = [], []
        for input_ids, target_ids in sample_pairs(samples):
            sequence = list(input_ids) + list(target_ids)
            cut = max(0, len(sequence) - max_len)
            sequences.append(torch.tensor(sequence[cut:], dtype=torch.long))
            starts.append(max(0, len(input_ids) - cut))
        return cls(sequences, starts)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.sequences[i]

    def epoch_batches(self, batch_size: int, bucket_batches: int, rng: np.random.Generator) -> list[list[int]]:
        return length_bucketed_batches(self.lengths, batch_size, bucket_batches, rng)


class ParquetSequences(Dataset):
    """Training sequences read lazily from a Parquet file of samples (input_ids, target_ids columns).

    Only lengths and target starts stay in memory (one pass over the file at open, a row group at a
    time). A sequence is read with its whole row group, and the row groups last used (two shuffle
    buffers) stay cached; `epoch_batches` orders an epoch so that each row group is read once. The
    row group size set when the file was written is the unit of memory: keep it moderate (10^4 rows).
    """

    COLUMNS = ("input_ids", "target_ids")

    def __init__(self, path: str | Path, max_len: int = 512, buffer_row_groups: int = 4):
        self.path, self.max_len, self.buffer_row_groups = Path(path), max_len, buffer_row_groups
        self.row_group_reads = 0  # how often a row group was read from disk (memory / IO checks)
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        file = pq.ParquetFile(self.path)
        meta = file.metadata
        missing = set(self.COLUMNS) - set(file.schema_arrow.names)
        if missing:
            raise ValueError(f"{self.path}: no column {sorted(missing)} (a train.parquet of `hetlm prepare` has them)")
        self.offsets = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        n_input, n_target = [], []
        for g in range(meta.num_row_groups):
            (_, input_offsets), (_, target_offsets) = self._read(g)
            n_input.append(np.diff(input_offsets))
            n_target.append(np.diff(target_offsets))
        self.lengths, self.target_starts = _windows(np.concatenate(n_input or [[]]).astype(np.int64),
                                                    np.concatenate(n_target or [[]]).astype(np.int64), max_len)

    def _read(self, group: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """(flat token ids, row offsets) of each column of one row group."""
        self.row_group_reads += 1
        table = pq.ParquetFile(self.path).read_row_group(group, columns=list(self.COLUMNS))
        out = []
        for name in self.COLUMNS:
            column = table.column(name).combine_chunks()
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
            out.append((pc.list_flatten(column).to_numpy(), np.concatenate([[0], np.cumsum(lengths)])))  # int32 as stored
        return tuple(out)

    def _row_group(self, group: int) -> tuple:
        if group in self._cache:
            self._cache.move_to_end(group)
        else:
            self._cache[group] = self._read(group)
            if len(self._cache) > 2 * self.buffer_row_groups:
                self._cache.popitem(last=False)
        return self._cache[group]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        group = int(np.searchsorted(self.offsets, i, side="right")) - 1
        row = i - self.offsets[group]
        (inputs, input_offsets), (targets, target_offsets) = self._row_group(group)
        sequence = np.concatenate([inputs[input_offsets[row]:input_offsets[row + 1]],
                                   targets[target_offsets[row]:target_offsets[row + 1]]])
        return torch.from_numpy(sequence[len(sequence) - self.lengths[i]:].astype(np.int64))

    def epoch_batches(self, batch_size: int, bucket_batches: int, rng: np.random.Generator) -> list[list[int]]:
        """A file of at most one buffer of row groups: the in-memory plan (length_bucketed_batches).
        Else row groups are shuffled into buffers of `buffer_row_groups`, each length-bucketed on its own;
        a buffer's partial batch is completed with the next buffer's first rows and goes first there, so
        an epoch has ceil(n / batch_size) batches, as in memory, and touches a row group in one buffer
        and the next only (which the cache of two buffers holds)."""
        n_groups = len(self.offsets) - 1
        if n_groups <= self.buffer_row_groups:
            return length_bucketed_batches(self.lengths, batch_size, bucket_batches, rng)
        order = rng.permutation(n_groups)
        batches, carry = [], []
        for start in range(0, n_groups, self.buffer_row_groups):
            rows = np.concatenate([np.arange(self.offsets[g], self.offsets[g + 1]) for g in order[start:start + self.buffer_row_groups]])
            rows = rng.permutation(rows)
            if carry:
                need = batch_size - len(carry)
                carry, rows = carry + rows[:need].tolist(), rows[need:]
                if len(carry) < batch_size:
                    continue  # a buffer smaller than a batch
                batches.append(carry)
            carry = []
            for batch in length_bucketed_batches(self.lengths[rows], batch_size, bucket_batches, rng):
                if len(batch) < batch_size:
                    carry = rows[batch].tolist()
                else:
                    batches.append(rows[batch].tolist())
        return batches + ([carry] if carry else [])


def as_dataset(samples, max_len: int, stream_buffer: int | None = None) -> SequenceDataset | ParquetSequences:
    """A dataset of training sequences from samples (see train_lm) or a Parquet file of samples: streamed
    with `stream_buffer` row groups per shuffle buffer, or read into memory (input_ids, target_ids only)."""
    if isinstance(samples, ParquetSequences):
        return samples
    if isinstance(samples, (str, Path)):
        if stream_buffer is not None:
            return ParquetSequences(samples, max_len, stream_buffer)
        samples = pq.read_table(samples, columns=list(ParquetSequences.COLUMNS)).to_pydict()
        samples = list(zip(samples["input_ids"], samples["target_ids"]))
    return SequenceDataset.from_samples(samples, max_len)


def pad_sequences(sequences: Sequence[torch.Tensor], side: Literal["right", "left"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), padded with [PAD] to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, span], mask[row, span] = s, 1
    return ids, mask


def pack_sequences(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids): the sequences packed first-fit-decreasing into as few rows as the
    longest one's width allows, [PAD] at the end of a row. Positions restart at 0 at each sequence (and at the
    padding), so a Hugging Face decoder given position_ids and no attention_mask attends within a sequence only."""
    width = max(len(s) for s in sequences)
    rows, room = [], []
    for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        row = next((r for r, free in enumerate(room) if free >= len(sequences[i])), None)
        if row is None:
            row = len(rows)
            rows.append([])
            room.append(width)
        rows[row].append(i)
        room[row] -= len(sequences[i])
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for row, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(sequences[i])
            ids[row, at:at + n], mask[row, at:at + n], positions[row, at:at + n] = sequences[i], 1, torch.arange(n)
            at += n
        positions[row, at:] = torch.arange(width - at)
    return ids, mask, positions


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, bucket_batches: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within chunks of `bucket_batches` batches, cut,
    shuffle the batches. Padding stays small while the data order stays random."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches in length order (evaluation: no shuffling needed, least padding)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- loss


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


@torch.no_grad()
def packing_is_exact(model: PreTrainedModel) -> bool:
    """Whether `model` keeps packed samples apart: a sample's logits do not change with the sample packed before
    it. Families whose mask follows position_ids do (Llama, Qwen2); OPT, whose mask ignores them, does not."""
    was_training = model.training
    model.eval()  # no dropout
    logits = []
    for first in ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]):
        ids = torch.tensor([first + [3, 1, 4, 1]]) % model.config.vocab_size
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
        logits.append(model(input_ids=ids.to(model.device), position_ids=positions.to(model.device), use_cache=False).logits[0, 5:])
    model.train(was_training)
    return torch.allclose(*logits, rtol=0, atol=1e-6)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _target_mask(nll: torch.Tensor, mask: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """Which entries of `token_nll` score the next session: its pages and [EOS] (entry j scores token j + 1,
    and the target's [BOS] is given at generation time, so it is not scored)."""
    positions = torch.arange(nll.shape[1], device=nll.device)
    starts = torch.as_tensor(starts, device=nll.device)
    return (positions[None, :] >= starts[:, None]) & (mask[:, 1:] == 1)


@dataclass(frozen=True)
class ValLoss:
    """Validation NLL per token: of the next sessions alone (what users are scored on; it selects and
    early-stops models) and of every token (the training objective; under the time split the validation
    histories are training sessions, so this one also rewards memorising them)."""

    target: float
    all_tokens: float


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, dataset: SequenceDataset, batch_size: int, bf16: bool = False) -> ValLoss:
    """Mean NLL per target token and per non-pad token over the dataset, on held-out users.
    Under torch.distributed each rank scores a share of the batches (every rank must call it)."""
    was_training, device = model.training, model.device
    info = dist_info()
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # target NLL, target tokens, all NLL, all tokens
    for batch in shard(sorted_batches(dataset.lengths, batch_size), info.rank, info.world_size):
        ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in batch]))
        with _autocast(device, bf16):
            nll = token_nll(model, ids, mask)
        scored = _target_mask(nll, mask, [dataset.target_starts[i] for i in batch])
        sums += torch.tensor([(nll * scored).sum().item(), scored.sum().item(), nll.sum().item(),
                              mask[:, 1:].sum().item()], dtype=torch.float64)
    model.train(was_training)
    if info.world_size > 1:
        sums = all_reduce_sum(sums)
    target, n_target, total, n_total = sums.tolist()
    return ValLoss(target=target / max(n_target, 1), all_tokens=total / max(n_total, 1))


@torch.no_grad()
def sequence_nll(model: PreTrainedModel, samples, batch_size: int = 64, max_len: int = 512, bf16: bool = False) -> np.ndarray:
    """Per-sample mean NLL of the next session's pages and [EOS] given the past sessions and its [BOS]."""
    dataset = SequenceDataset.from_samples(samples, max_len)
    was_training, device = model.training, model.device
    model.eval()
    out = np.zeros(len(dataset))
    for batch in sorted_batches(dataset.lengths, batch_size):
        ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in batch]))
        with _autocast(device, bf16):
            nll = token_nll(model, ids, mask)
        scored = _target_mask(nll, mask, [dataset.target_starts[i] for i in batch])
        out[batch] = ((nll * scored).sum(1) / scored.sum(1).clamp(min=1)).cpu().numpy()
    model.train(was_training)
    return out


# ---------------------------------------------------------------- optimisation


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = int(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "linear":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on embeddings (incl. a tied head), norms and biases."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[config.adamw]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), **implementation)


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------- checkpoints


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temp dir, then swap it in with renames: a crash leaves `final` or `final.old` complete."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    swap_in(tmp, final)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp` (two renames; `final.old` holds the previous one between them)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: PreTrainedModel, path: Path) -> None:
    """save_pretrained (safetensors) without transformers' per-shard progress bar."""
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),  # tensors load weights_only
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Model (safetensors) + trainer_state.pt (optimizer, each rank's RNG, progress; tensors and plain
    types only). Under torch.distributed every rank calls it (the RNG states are gathered); rank 0 writes."""
    rng = _gather_objects(_rng_state())  # ranks draw different dropout masks, so each keeps its own stream

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng, **progress}, tmp / "trainer_state.pt")
    if dist_info().is_main:
        write_dir_atomically(path, write)
    _barrier()  # nobody reads a checkpoint before it is complete


def load_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from `path` (or its `.old` twin left by a crash mid-swap).
    A rank the saved run did not have takes rank 0's RNG."""
    if not path.exists():
        path = path.with_name(path.name + ".old")
    load_model(model, path / "model.safetensors", device=str(model.device))  # resolves tied weights
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)  # RNG states live on the CPU
    optimizer.load_state_dict(state.pop("optimizer"))
    rng = state.pop("rng")
    rng = [rng] if isinstance(rng, dict) else rng  # checkpoints written before multi-process training
    _set_rng_state(rng[dist_info().rank] if dist_info().rank < len(rng) else rng[0])
    return state


def has_checkpoint(out_dir: Path) -> bool:
    return any((out_dir / name / "trainer_state.pt").exists() for name in ("checkpoint", "checkpoint.old"))


# ---------------------------------------------------------------- the loop


def _groups(items: Iterable, size: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_lm(model: PreTrainedModel, train_samples, val_samples, config: TrainConfig, out_dir: str | Path,
             resume: bool = False, progress: bool = True, stream: bool = False) -> TrainResult:
    """Train `model` in place; out_dir gets checkpoint/ (resumable), best/ (save_pretrained) and history.json.

    Samples: a frame with input_ids / target_ids columns, (input_ids, target_ids) pairs, a
    SequenceDataset / ParquetSequences, or a Parquet file of samples, whose training samples are
    streamed with stream=True (validation samples are always read into memory). Without validation
    samples there is no early stopping and best/ is the final model. With resume=True and a checkpoint
    in out_dir, training continues exactly where it stopped.

    Under torchrun every process calls this alike: DistributedDataParallel over the ranks, each taking
    a disjoint share of every batch; validation is shared out and summed (every rank gets the same
    loss, so early stopping agrees); rank 0 writes the run folder and shows progress.
    """
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    info = init_distributed("nccl" if device.type == "cuda" else "gloo")
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("bf16 on a CPU without native bfloat16 matmuls (AVX512-BF16 / AMX) is several times slower than float32")
    model.to(device).train()
    train_set = as_dataset(train_samples, config.max_len, config.stream_buffer if stream else None)
    if len(train_set) == 0:
        raise ValueError("no training samples: nothing to train (see the prepared summary's dropped_rows)")
    val_set = as_dataset(val_samples, config.max_len) if val_samples is not None else None
    val_set = val_set if val_set is not None and len(val_set) else None
    optimizer = make_optimizer(model, config)
    pack = config.pack and packing_is_exact(model)
    if config.pack and not pack:
        log.info("%s attends across packed samples: batches are padded instead", type(model).__name__)

    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    # Progress is plain data so that it round-trips through the checkpoint; position = next step within the epoch.
    state = {"step": 0, "epoch": 0, "position": 0, "best_val_loss": None, "best_step": None,
             "evals_since_best": 0, "stopped_early": False, "train_time": 0.0, "train_tokens": 0,
             "history": {"train": [], "val": []}, "config": dataclasses.asdict(config)}
    if resume and has_checkpoint(out_dir):
        saved = load_checkpoint(out_dir / "checkpoint", model, optimizer)
        if saved["config"] != state["config"]:
            log.warning("resuming %s with a different TrainConfig than it was started with", out_dir)
        state.update({k: v for k, v in saved.items() if k != "config"})
        log.info("resumed %s at step %d (epoch %d)", out_dir, state["step"], state["epoch"])
    else:
        torch.manual_seed(config.seed)  # dropout; data order has its own seeded generator per epoch
    history = state["history"]
    # DDP copies rank 0's weights to every rank, then averages gradients in backward.
    ddp = None if info.world_size == 1 else DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    net = model if ddp is None else ddp
    if config.compile:
        net = torch.compile(net, dynamic=True)  # batch widths vary: one graph for all of them

    def validate() -> None:
        # Models are selected and early-stopped on the next sessions' NLL: what users are scored on.
        loss = evaluate_loss(model, val_set, config.batch_size, config.bf16)
        history["val"].append({"step": state["step"], "epoch": state["epoch"], "val_loss": loss.target,
                               "val_loss_all_tokens": loss.all_tokens})
        if state["best_val_loss"] is None or loss.target < state["best_val_loss"]:
            state.update(best_val_loss=loss.target, best_step=state["step"], evals_since_best=0)
            if info.is_main:
                write_dir_atomically(out_dir / "best", lambda tmp: save_model(model, tmp))
        else:
            state["evals_since_best"] += 1
            patience = config.early_stopping_patience
            state["stopped_early"] = patience is not None and state["evals_since_best"] >= patience
        log.info("step %d: val next-session NLL %.4f (best %.4f at step %d), all tokens %.4f", state["step"],
                 loss.target, state["best_val_loss"], state["best_step"], loss.all_tokens)
        if info.is_main:
            (out_dir / "history.json").write_text(json.dumps(history))

    bar = progress_bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not (progress and info.is_main))
    with bar:
        task = bar.add_task("train", total=total_steps, completed=state["step"], info="")
        while state["step"] < total_steps and not state["stopped_early"]:
            batches = train_set.epoch_batches(config.batch_size, config.bucket_batches,
                                              np.random.default_rng([config.seed, state["epoch"]]))
            batches = batches[state["position"] * config.grad_accum:]
            # A rank whose share of a (last, small) batch is empty runs the batch's first sample at weight 0:
            # every rank must join each gradient all-reduce.
            local = [shard(b, info.rank, info.world_size) or b[:1] for b in batches]
            loader = DataLoader(train_set, batch_sampler=local, collate_fn=pack_sequences if pack else pad_sequences,
                                num_workers=config.num_workers,
                                generator=torch.Generator().manual_seed(config.seed))  # leaves the global RNG alone
            for step_batches, micro_batches in zip(_groups(batches, config.grad_accum), _groups(loader, config.grad_accum)):
                started = time.perf_counter()
                lr = lr_at(state["step"], total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Normalise by the step's token count over all ranks so every token weighs the same, whatever
                # the padding; times world_size because DDP averages the ranks' gradients.
                n_tokens = sum(int((train_set.lengths[b] - 1).sum()) for b in step_batches)
                loss = torch.zeros((), device=device)  # read once per step: one host sync, not one per micro-batch
                for i, (tensors, batch) in enumerate(zip(micro_batches, step_batches)):
                    weight = info.world_size / n_tokens if len(batch) > info.rank else 0.0
                    last = i == len(micro_batches) - 1
                    with nullcontext() if last or ddp is None else ddp.no_sync():  # all-reduce once per step
                        with _autocast(device, config.bf16):
                            micro_loss = token_nll(net, *(t.to(device, non_blocking=True) for t in tensors)).sum() * weight
                        micro_loss.backward()
                    loss += micro_loss.detach() / info.world_size
                loss = (all_reduce_sum(loss) if info.world_size > 1 else loss).item()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - started

                state["step"] += 1
                state["position"] += 1
                state["train_time"] += elapsed
                state["train_tokens"] += n_tokens
                history["train"].append({"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr,
                                         "tokens_per_s": n_tokens / elapsed})
                epoch_end = state["position"] == steps_per_epoch
                if epoch_end:
                    state["epoch"] += 1
                    state["position"] = 0
                # The last step is validated too, so best/ holds a model however few steps run.
                last = state["step"] >= total_steps
                if val_set is not None and (state["step"] % config.eval_every == 0 or epoch_end or last):
                    validate()
                finished = state["step"] >= total_steps or state["stopped_early"]
                if state["step"] % config.save_every == 0 or finished:
                    save_checkpoint(out_dir / "checkpoint", model, optimizer, state)
                val = f" val {history['val'][-1]['val_loss']:.3f}" if history["val"] else ""
                bar.update(task, completed=state["step"], info=f"loss {loss:.3f}{val} {n_tokens / elapsed:,.0f} tok/s")
                if finished:
                    break

    if val_set is None and info.is_main:
        write_dir_atomically(out_dir / "best", lambda tmp: save_model(model, tmp))
    _barrier()  # best/ is complete before any rank loads it
    if val_set is not None and config.load_best_at_end and (out_dir / "best").exists():
        load_model(model, out_dir / "best" / "model.safetensors", device=str(device))
    if info.is_main:
        (out_dir / "history.json").write_text(json.dumps(history))
    return TrainResult(
        steps=state["step"], epochs=state["epoch"], best_val_loss=state["best_val_loss"], best_step=state["best_step"],
        stopped_early=state["stopped_early"], tokens_per_s=state["train_tokens"] / max(state["train_time"], 1e-9),
        history=history, out_dir=out_dir,
    )
