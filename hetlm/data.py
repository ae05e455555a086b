"""Training sequences and their batches: samples (a user's past sessions + the next session) read into
memory or streamed from a Parquet file, padded or packed into tensors, and ordered into length-bucketed
(training) or length-sorted (evaluation) batches.

Streaming (ParquetSequences) keeps only the samples' lengths in memory; its epochs read each row group once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from hetlm.tokenizer import PAD_ID


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


def groups(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter): the micro-batches of each optimizer step."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
