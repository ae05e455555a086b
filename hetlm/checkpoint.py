"""Run-folder I/O that survives a crash: folders swapped in atomically, model weights without progress
bars, and resumable checkpoints (model, optimizer, each rank's RNG streams, the trainer's progress).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from hetlm.distributed import barrier, dist_info, gather_objects


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temp dir, then swap it in with renames: a crash leaves `final` or `final.old` complete. A failed
    write (a full disk, Ctrl-C) removes the temp dir; writers' own errors for a failed write (safetensors',
    torch's "unexpected pos") become an OSError naming the folder."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException as err:
        # safetensors names the OS error; torch's writer does not, so also look at the space left, before the
        # temp dir frees its share
        full = "os error 28" in str(err) or shutil.disk_usage(final.parent).free < 1 << 20
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (SafetensorError, RuntimeError)):
            raise OSError(errno.ENOSPC if full else errno.EIO, f"writing failed ({err})", str(final)) from err
        raise
    swap_in(tmp, final)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp` (two renames; `final.old` holds the previous one between them)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def hf_bars_off():
    """transformers' own progress bars (per-shard saving, "Loading weights" per model) off inside: a
    clusterwise folder is K models, and their K bars say nothing a user needs."""
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def save_model(model: PreTrainedModel, path: Path) -> None:
    """save_pretrained (safetensors) without transformers' per-shard progress bar."""
    with hf_bars_off():
        model.save_pretrained(path)


def rng_state() -> dict:
    """This process's torch, CUDA, Python and NumPy random states, as tensors and plain types (set_rng_state)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),  # tensors load weights_only
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Model (safetensors) + trainer_state.pt (optimizer, each rank's RNG, progress; tensors and plain
    types only). Under torch.distributed every rank calls it (the RNG states are gathered); rank 0 writes."""
    rng = gather_objects(rng_state())  # ranks draw different dropout masks, so each keeps its own stream

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng, **progress}, tmp / "trainer_state.pt")
    if dist_info().is_main:
        write_dir_atomically(path, write)
    barrier()  # nobody reads a checkpoint before it is complete


def load_checkpoint(path: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                    expect: dict | None = None) -> dict:
    """Restore model, optimizer and this rank's RNG from `path` (or its `.old` twin left by a crash mid-swap).
    A rank the saved run did not have takes rank 0's RNG. `expect`: what the checkpoint's recorded
    "identity" must equal (checkpoints written before identities were recorded are not checked)."""
    shown = path
    if not path.exists():
        path = path.with_name(path.name + ".old")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)  # RNG states live on the CPU
    saved = state.get("identity")
    if expect is not None and saved is not None and saved != expect:
        differ = ", ".join(f"{k} {saved.get(k)!r} (now {v!r})" for k, v in expect.items() if saved.get(k) != v)
        raise ValueError(f"{shown} belongs to another run, so it cannot be resumed: its {differ}; train without "
                         "--resume to start afresh, or into another --out")
    try:
        load_model(model, path / "model.safetensors", device=str(model.device))  # resolves tied weights
    except RuntimeError as err:  # a checkpoint from before identities were recorded, of another shape
        raise ValueError(f"{shown} holds a model of another shape, so it cannot be resumed "
                         f"({str(err).splitlines()[0]}); train without --resume, or into another --out") from None
    optimizer.load_state_dict(state.pop("optimizer"))
    rng = state.pop("rng")
    rng = [rng] if isinstance(rng, dict) else rng  # checkpoints written before multi-process training
    set_rng_state(rng[dist_info().rank] if dist_info().rank < len(rng) else rng[0])
    return state


def has_checkpoint(out_dir: Path) -> bool:
    return any((out_dir / name / "trainer_state.pt").exists() for name in ("checkpoint", "checkpoint.old"))
