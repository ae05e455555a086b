"""One trainer for causal-LM training on page sequences: the single LM, each k-means LM, HeTLM's critics.

A training sequence is a user's past sessions followed by the next session (input_ids + target_ids); the
loss is next-token NLL on every non-pad token. The loop, in order: length-bucketed batches -> grad
accumulation -> clip -> AdamW step at the scheduled lr -> validation / early stopping / best model ->
resumable checkpoint. Everything needed to continue a run exactly lives in out_dir/checkpoint/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_model
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from hetlm.tokenizer import PAD_ID

log = logging.getLogger(__name__)

IGNORE = -100  # label of pad positions (cross-entropy skips it)


@dataclass
class TrainConfig:
    lr: float = 1e-3  # for random init; the paper's 1e-5 suits fine-tuning released weights
    weight_decay: float = 0.01
    batch_size: int = 32
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
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    save_every: int = 500  # steps between resumable checkpoints (one is also written at the end)
    load_best_at_end: bool = True  # leave the best validated weights in the model

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, not {self.schedule!r}")


@dataclass
class TrainResult:
    steps: int
    epochs: int  # epochs completed
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    tokens_per_s: float  # non-pad training tokens per second of training steps
    history: dict
    out_dir: Path


# ---------------------------------------------------------------- data


def sample_pairs(samples) -> list[tuple[Sequence[int], Sequence[int]]]:
    """(input_ids, target_ids) pairs from a frame with those columns, mappings, or pairs."""
    if hasattr(samples, "columns"):  # polars / pandas frame
        return list(zip(samples["input_ids"].to_list(), samples["target_ids"].to_list()))
    return [(s["input_ids"], s["target_ids"]) if isinstance(s, Mapping) else (s[0], s[1]) for s in samples]


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


def pad_sequences(sequences: Sequence[torch.Tensor], side: Literal["right", "left"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), padded with [PAD] to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, span], mask[row, span] = s, 1
    return ids, mask


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


def token_nll(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of each next token, shape (batch, len - 1): entry j scores token j + 1; 0 where it is padding."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    # Shift the labels, not the logits: slicing the (batch, len, vocab) logits would copy them.
    labels = F.pad(ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE), (0, 1), value=IGNORE)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(labels.shape)[:, :-1]


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, dataset: SequenceDataset, batch_size: int, bf16: bool = False) -> float:
    """Mean NLL per non-pad token over the dataset: the training objective, on held-out users."""
    was_training, device = model.training, model.device
    model.eval()
    total, count = 0.0, 0
    for batch in sorted_batches(dataset.lengths, batch_size):
        ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in batch]))
        with _autocast(device, bf16):
            total += token_nll(model, ids, mask).sum().item()
        count += int(mask[:, 1:].sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def sequence_nll(model: PreTrainedModel, samples, batch_size: int = 64, max_len: int = 512, bf16: bool = False) -> np.ndarray:
    """Per-sample mean NLL of the next session's pages and [EOS] given the past sessions and its [BOS]
    (the [BOS] itself is given at generation time, so it is not scored)."""
    dataset = SequenceDataset.from_samples(samples, max_len)
    was_training, device = model.training, model.device
    model.eval()
    out = np.zeros(len(dataset))
    for batch in sorted_batches(dataset.lengths, batch_size):
        ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in batch]))
        with _autocast(device, bf16):
            nll = token_nll(model, ids, mask)
        positions = torch.arange(nll.shape[1], device=device)
        starts = torch.tensor([dataset.target_starts[i] for i in batch], device=device)
        scored = (positions[None, :] >= starts[:, None]) & (mask[:, 1:] == 1)
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
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


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
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
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
    """Model (safetensors) + trainer_state.pt (optimizer, RNG, progress; tensors and plain types only)."""
    def write(tmp: Path) -> None:
        save_model(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state(), **progress}, tmp / "trainer_state.pt")
    write_dir_atomically(path, write)


def load_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from `path` (or its `.old` twin left by a crash mid-swap)."""
    if not path.exists():
        path = path.with_name(path.name + ".old")
    load_model(model, path / "model.safetensors", device=str(model.device))  # resolves tied weights
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)  # RNG states live on the CPU
    optimizer.load_state_dict(state.pop("optimizer"))
    _set_rng_state(state.pop("rng"))
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
             resume: bool = False, progress: bool = True) -> TrainResult:
    """Train `model` in place; out_dir gets checkpoint/ (resumable), best/ (save_pretrained) and history.json.

    Samples: a frame with input_ids / target_ids columns, (input_ids, target_ids) pairs, or a
    SequenceDataset. Without validation samples there is no early stopping and best/ is the final model.
    With resume=True and a checkpoint in out_dir, training continues exactly where it stopped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    if config.bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("bf16 on a CPU without native bfloat16 matmuls (AVX512-BF16 / AMX) is several times slower than float32")
    model.to(device).train()
    train_set = SequenceDataset.from_samples(train_samples, config.max_len)
    val_set = SequenceDataset.from_samples(val_samples, config.max_len) if val_samples is not None and len(val_samples) else None
    optimizer = make_optimizer(model, config)

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

    def validate() -> None:
        val_loss = evaluate_loss(model, val_set, config.batch_size, config.bf16)
        history["val"].append({"step": state["step"], "epoch": state["epoch"], "val_loss": val_loss})
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_step=state["step"], evals_since_best=0)
            write_dir_atomically(out_dir / "best", lambda tmp: save_model(model, tmp))
        else:
            state["evals_since_best"] += 1
            patience = config.early_stopping_patience
            state["stopped_early"] = patience is not None and state["evals_since_best"] >= patience
        log.info("step %d: val loss %.4f (best %.4f at step %d)", state["step"], val_loss, state["best_val_loss"], state["best_step"])
        (out_dir / "history.json").write_text(json.dumps(history))

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress)
    with bar:
        task = bar.add_task("train", total=total_steps, completed=state["step"], info="")
        while state["step"] < total_steps and not state["stopped_early"]:
            batches = length_bucketed_batches(train_set.lengths, config.batch_size, config.bucket_batches,
                                              np.random.default_rng([config.seed, state["epoch"]]))
            loader = DataLoader(train_set, batch_sampler=batches[state["position"] * config.grad_accum:],
                                collate_fn=pad_sequences, num_workers=config.num_workers,
                                generator=torch.Generator().manual_seed(config.seed))  # leaves the global RNG alone
            for micro_batches in _groups(loader, config.grad_accum):
                started = time.perf_counter()
                lr = lr_at(state["step"], total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Normalise by the step's token count so every token weighs the same, whatever the padding.
                n_tokens = sum(int(mask[:, 1:].sum()) for _, mask in micro_batches)
                loss = 0.0
                for ids, mask in micro_batches:
                    ids, mask = ids.to(device), mask.to(device)
                    with _autocast(device, config.bf16):
                        micro_loss = token_nll(model, ids, mask).sum() / n_tokens
                    micro_loss.backward()
                    loss += micro_loss.item()
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
                if val_set is not None and (state["step"] % config.eval_every == 0 or epoch_end):
                    validate()
                finished = state["step"] >= total_steps or state["stopped_early"]
                if state["step"] % config.save_every == 0 or finished:
                    save_checkpoint(out_dir / "checkpoint", model, optimizer, state)
                val = f" val {history['val'][-1]['val_loss']:.3f}" if history["val"] else ""
                bar.update(task, completed=state["step"], info=f"loss {loss:.3f}{val} {n_tokens / elapsed:,.0f} tok/s")
                if finished:
                    break

    if val_set is None:
        write_dir_atomically(out_dir / "best", lambda tmp: save_model(model, tmp))
    elif config.load_best_at_end and (out_dir / "best").exists():
        load_model(model, out_dir / "best" / "model.safetensors", device=str(device))
    (out_dir / "history.json").write_text(json.dumps(history))
    return TrainResult(
        steps=state["step"], epochs=state["epoch"], best_val_loss=state["best_val_loss"], best_step=state["best_step"],
        stopped_early=state["stopped_early"], tokens_per_s=state["train_tokens"] / max(state["train_time"], 1e-9),
        history=history, out_dir=out_dir,
    )
