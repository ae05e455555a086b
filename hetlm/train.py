"""One trainer for causal-LM training on page sequences: the single LM, each k-means LM, HeTLM's critics.

A training sequence is a user's past sessions followed by the next session (input_ids + target_ids); the
loss is next-token NLL on every non-pad token (hetlm.nll). The loop, in order: length-bucketed batches
(hetlm.data) -> grad accumulation -> clip -> AdamW step at the scheduled lr -> validation / early stopping /
best model -> resumable checkpoint (hetlm.checkpoint). Everything needed to continue a run exactly lives in
out_dir/checkpoint/.

Multi-process (torchrun + DistributedDataParallel, hetlm.distributed): every rank builds the same batches
(same seed) and takes every world_size-th sample of each; batch_size is the global batch, so a run trains
the same whatever the number of processes. Rank 0 alone writes checkpoints, best/ and history.json.
Training samples can also stream from a Parquet file (ParquetSequences): only their lengths stay in memory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from hetlm.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint, save_model, write_dir_atomically
from hetlm.data import (
    ParquetSequences,
    SequenceDataset,
    as_dataset,
    groups,
    pack_sequences,
    pad_sequences,
    sorted_batches,
)
from hetlm.distributed import DistInfo, all_reduce_sum, barrier, dist_info, init_distributed, shard
from hetlm.nll import autocast, target_mask, token_nll
from hetlm.outputs import write_atomically
from hetlm.progress import Estimate, progress_bar

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    # Ranges are checked here, before any training starts, not found as NaN tables after it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(1e-3, gt=0)  # for random init; the paper's 1e-5 suits fine-tuning released weights
    weight_decay: float = Field(0.01, ge=0)
    # samples per forward pass over all ranks (each rank takes batch_size / world_size)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; caps the epochs and sets the schedule's length
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up; cosine and linear end at 0
    grad_clip: float = Field(1.0, gt=0)
    bf16: bool = False  # bfloat16 autocast (CPU or GPU); weights and optimizer stay float32
    eval_every: int = Field(200, ge=1)  # steps; validation also runs at the end of every epoch
    early_stopping_patience: int | None = Field(5, ge=1)  # evaluations without improvement; None = never stop early
    max_len: int = Field(512, ge=2)  # longer sequences keep their most recent tokens
    bucket_batches: int = Field(50, ge=1)  # length bucketing: sort by length within chunks of this many batches
    # streamed Parquet training samples: row groups shuffled together (2 buffers cached)
    stream_buffer: int = Field(4, ge=1)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    save_every: int = Field(500, ge=1)  # steps between resumable checkpoints (one is also written at the end)
    load_best_at_end: bool = True  # leave the best validated weights in the model
    # Speed settings, defaults as measured on a CPU (bench/bench_train.py --ablate); none changes what is learned.
    # Packing gains nothing after length bucketing: little padding is left, samples of similar lengths do not
    # share a row, and an attention mask over a packed row costs its full width.
    pack: bool = False  # a rank's share of a batch packed into rows as wide as its longest sample (pack_sequences)
    adamw: Literal["fused", "foreach", "for-loop"] = "fused"  # torch's AdamW kernel; fused steps fastest
    compile: bool = False  # torch.compile the model for training: compiling costs more than short runs gain


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


# ---------------------------------------------------------------- validation and optimisation


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
        with autocast(device, bf16):
            nll = token_nll(model, ids, mask)
        scored = target_mask(nll, mask, [dataset.target_starts[i] for i in batch])
        sums += torch.tensor([(nll * scored).sum().item(), scored.sum().item(), nll.sum().item(),
                              mask[:, 1:].sum().item()], dtype=torch.float64)
    model.train(was_training)
    if info.world_size > 1:
        sums = all_reduce_sum(sums)
    target, n_target, total, n_total = sums.tolist()
    return ValLoss(target=target / max(n_target, 1), all_tokens=total / max(n_total, 1))


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


# ---------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the steps of one train_lm call share. `state` is its progress, plain data so that it round-trips
    through the checkpoint (position = next step within the epoch)."""

    model: PreTrainedModel
    net: torch.nn.Module  # runs the training forward passes: the model, wrapped by DDP and/or torch.compile
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    out_dir: Path
    device: torch.device
    info: DistInfo
    train_set: SequenceDataset | ParquetSequences
    val_set: SequenceDataset | None
    pack: bool
    steps_per_epoch: int
    total_steps: int
    state: dict

    def epoch_loader(self) -> tuple[list[list[int]], DataLoader]:
        """The current epoch's global batches from `position` on, and a loader of this rank's share of each."""
        config, info = self.config, self.info
        batches = self.train_set.epoch_batches(config.batch_size, config.bucket_batches,
                                               np.random.default_rng([config.seed, self.state["epoch"]]))
        batches = batches[self.state["position"] * config.grad_accum:]
        # A rank whose share of a (last, small) batch is empty runs the batch's first sample at weight 0:
        # every rank must join each gradient all-reduce.
        local = [shard(b, info.rank, info.world_size) or b[:1] for b in batches]
        loader = DataLoader(self.train_set, batch_sampler=local, collate_fn=pack_sequences if self.pack else pad_sequences,
                            num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed))  # leaves the global RNG alone
        return batches, loader

    def step(self, step_batches: list[list[int]], micro_batches: list[tuple[torch.Tensor, ...]]) -> tuple[float, float, bool]:
        """One optimizer step over its micro-batches, recorded in the state: (loss, tokens/s, whether it ended the epoch)."""
        config, info, state = self.config, self.info, self.state
        started = time.perf_counter()
        lr = lr_at(state["step"], self.total_steps, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Normalise by the step's token count over all ranks so every token weighs the same, whatever
        # the padding; times world_size because DDP averages the ranks' gradients.
        n_tokens = sum(int((self.train_set.lengths[b] - 1).sum()) for b in step_batches)
        loss = torch.zeros((), device=self.device)  # read once per step: one host sync, not one per micro-batch
        for i, (tensors, batch) in enumerate(zip(micro_batches, step_batches)):
            weight = info.world_size / n_tokens if len(batch) > info.rank else 0.0
            last = i == len(micro_batches) - 1
            with nullcontext() if last or self.ddp is None else self.ddp.no_sync():  # all-reduce once per step
                with autocast(self.device, config.bf16):
                    micro_loss = token_nll(self.net, *(t.to(self.device, non_blocking=True) for t in tensors)).sum() * weight
                micro_loss.backward()
            loss += micro_loss.detach() / info.world_size
        loss = (all_reduce_sum(loss) if info.world_size > 1 else loss).item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started

        state["step"] += 1
        state["position"] += 1
        state["train_time"] += elapsed
        state["train_tokens"] += n_tokens
        state["history"]["train"].append({"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr,
                                          "tokens_per_s": n_tokens / elapsed})
        epoch_end = state["position"] == self.steps_per_epoch
        if epoch_end:
            state["epoch"] += 1
            state["position"] = 0
        return loss, n_tokens / elapsed, epoch_end

    def validate(self) -> None:
        # Models are selected and early-stopped on the next sessions' NLL: what users are scored on.
        config, state = self.config, self.state
        loss = evaluate_loss(self.model, self.val_set, config.batch_size, config.bf16)
        state["history"]["val"].append({"step": state["step"], "epoch": state["epoch"], "val_loss": loss.target,
                                        "val_loss_all_tokens": loss.all_tokens})
        if state["best_val_loss"] is None or loss.target < state["best_val_loss"]:
            state.update(best_val_loss=loss.target, best_step=state["step"], evals_since_best=0)
            if self.info.is_main:
                write_dir_atomically(self.out_dir / "best", lambda tmp: save_model(self.model, tmp))
        else:
            state["evals_since_best"] += 1
            patience = config.early_stopping_patience
            state["stopped_early"] = patience is not None and state["evals_since_best"] >= patience
        log.info("step %d: val next-session NLL %.4f (best %.4f at step %d), all tokens %.4f", state["step"],
                 loss.target, state["best_val_loss"], state["best_step"], loss.all_tokens)
        if self.info.is_main:
            write_atomically(self.out_dir / "history.json", json.dumps(state["history"]))

    def finish(self) -> TrainResult:
        """best/ complete on every rank (the final model when nothing was validated), loaded if asked."""
        state, history = self.state, self.state["history"]
        if self.val_set is None and self.info.is_main:
            write_dir_atomically(self.out_dir / "best", lambda tmp: save_model(self.model, tmp))
        barrier()  # best/ is complete before any rank loads it
        if self.val_set is not None and self.config.load_best_at_end and (self.out_dir / "best").exists():
            load_model(self.model, self.out_dir / "best" / "model.safetensors", device=str(self.device))
        if self.info.is_main:
            write_atomically(self.out_dir / "history.json", json.dumps(history))
        return TrainResult(
            steps=state["step"], epochs=state["epoch"], best_val_loss=state["best_val_loss"], best_step=state["best_step"],
            stopped_early=state["stopped_early"], tokens_per_s=state["train_tokens"] / max(state["train_time"], 1e-9),
            history=history, out_dir=self.out_dir,
        )


def identity(model: PreTrainedModel, data: dict | None = None) -> dict:
    """What a checkpoint must share with a run to be resumed by it: the model's shape and `data` (e.g. the
    vocabulary's fingerprint: another log with as many pages names other pages by the same ids)."""
    c = model.config
    return {"model_type": c.model_type, "vocab_size": c.vocab_size, "max_positions": c.max_position_embeddings,
            "parameters": sum(p.numel() for p in model.parameters())} | (data or {})


def _start(model: PreTrainedModel, train_samples, val_samples, config: TrainConfig, out_dir: Path, resume: bool,
           stream: bool, data: dict | None = None) -> _Run:
    """Device, process group, datasets, optimizer and progress: fresh (seeded) or from out_dir's checkpoint."""
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

    state = {"step": 0, "epoch": 0, "position": 0, "best_val_loss": None, "best_step": None,
             "evals_since_best": 0, "stopped_early": False, "train_time": 0.0, "train_tokens": 0,
             "history": {"train": [], "val": []}, "config": config.model_dump(), "identity": identity(model, data)}
    if not resume and info.is_main:
        _remove_previous_run(out_dir)
    barrier()
    if resume and has_checkpoint(out_dir):
        saved = load_checkpoint(out_dir / "checkpoint", model, optimizer, expect=state["identity"])
        if saved["config"] != state["config"]:
            log.warning("resuming %s with a different TrainConfig than it was started with", out_dir)
        state.update({k: v for k, v in saved.items() if k != "config"})
        log.info("resumed %s at step %d (epoch %d)", out_dir, state["step"], state["epoch"])
    else:
        torch.manual_seed(config.seed)  # dropout; data order has its own seeded generator per epoch
    # DDP copies rank 0's weights to every rank, then averages gradients in backward.
    ddp = None if info.world_size == 1 else DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    net = model if ddp is None else ddp
    if config.compile:
        net = torch.compile(net, dynamic=True)  # batch widths vary: one graph for all of them
    return _Run(model, net, ddp, optimizer, config, out_dir, device, info, train_set, val_set, pack,
                steps_per_epoch, total_steps, state)


def _remove_previous_run(out_dir: Path) -> None:
    """A fresh run into a used out_dir: the old run's checkpoint, best/ and history go first, so a run stopped
    before its first save never leaves them beside its own files as if they were its."""
    old = [out_dir / name for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "best", "best.old", "best.tmp")
           if (out_dir / name).exists()]
    if old:
        log.warning("starting afresh in %s (no resume): removing the previous run's %s", out_dir,
                    ", ".join(p.name for p in old))
    for path in old:
        shutil.rmtree(path)
    (out_dir / "history.json").unlink(missing_ok=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a whole step, once a checkpoint (and best/, if validated) was saved."""

    def __init__(self, out_dir: Path, step: int, best_step: int | None):
        super().__init__(f"stopped at step {step}: {out_dir / 'checkpoint'} saved"
                         + (f", best/ holds step {best_step}" if best_step is not None else ", no best/ yet"))
        self.out_dir, self.step, self.best_step = out_dir, step, best_step


class _StopRequest:
    """The first Ctrl-C (SIGINT) asks training to stop after the current step and save; the second stops at
    once. Only in a single process's main thread: under torchrun every rank would have to agree."""

    def __init__(self, info: DistInfo):
        self.requested = False
        self.active = info.world_size == 1 and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _StopRequest:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        log.warning("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def train_lm(model: PreTrainedModel, train_samples, val_samples, config: TrainConfig, out_dir: str | Path,
             resume: bool = False, progress: bool = True, stream: bool = False,
             data: dict | None = None) -> TrainResult:
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
    run = _start(model, train_samples, val_samples, config, out_dir, resume, stream, data)
    state, history = run.state, run.state["history"]
    bar = progress_bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), disable=not (progress and run.info.is_main))
    estimate = Estimate("train", run.total_steps, "steps", state["step"], "validation passes add to it, early "
                        "stopping may end it sooner", show=progress and run.info.is_main)
    with bar, _StopRequest(run.info) as stop:
        task = bar.add_task("train", total=run.total_steps, completed=state["step"], info="")
        while state["step"] < run.total_steps and not (state["stopped_early"] or stop.requested):
            batches, loader = run.epoch_loader()
            for step_batches, micro_batches in zip(groups(batches, config.grad_accum), groups(loader, config.grad_accum)):
                loss, tokens_per_s, epoch_end = run.step(step_batches, micro_batches)
                # The last step is validated too, so best/ holds a model however few steps run.
                last = state["step"] >= run.total_steps
                if run.val_set is not None and (state["step"] % config.eval_every == 0 or epoch_end or last):
                    run.validate()
                finished = state["step"] >= run.total_steps or state["stopped_early"] or stop.requested
                if state["step"] % config.save_every == 0 or finished:
                    save_checkpoint(out_dir / "checkpoint", model, run.optimizer, state)
                val = f" val {history['val'][-1]['val_loss']:.3f}" if history["val"] else ""
                bar.update(task, completed=state["step"], info=f"loss {loss:.3f}{val} {tokens_per_s:,.0f} tok/s")
                estimate.update(state["step"])
                if finished:
                    break
    if stop.requested:
        if run.info.is_main:
            write_atomically(out_dir / "history.json", json.dumps(history))
        raise TrainingInterrupted(out_dir, state["step"], state["best_step"])
    return run.finish()
