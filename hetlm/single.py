"""One page LM trained on prepared samples, from its config to a self-contained model folder: what `hetlm
train` runs, and `hetlm experiment` for its small and larger LMs.

    build (preset, family; released weights) -> train_lm -> ClusterwiseLM.single with its tokenizer
    -> set decoder fitted on the validation users -> model folder (loads with `load_model`)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import polars as pl
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from rich.console import Console

from .cluster.base import ClusterwiseLM
from .config import one_of
from .distributed import init_distributed
from .evaluate import fit_default_set_decoder
from .models import FAMILIES, PRESETS, Preset, build_model, count_parameters, init_from
from .train import TrainConfig, TrainingInterrupted, TrainResult, train_lm

console = Console()


# A preset or family name, checked against those known.
PresetName = Annotated[str, AfterValidator(lambda name: one_of(name, PRESETS, "preset"))]
FamilyName = Annotated[str, AfterValidator(lambda name: one_of(name, FAMILIES, "family"))]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preset: PresetName = "tiny"
    family: FamilyName | None = None
    init_from: str | None = Field(None, description="released weights on disk to start from (all but vocab layers)")
    # A released architecture (opt-350m, ...) trained from random weights at a fine-tuning learning rate
    # (<= 1e-5) learns next to nothing: `hetlm experiment` refuses it unless this is set.
    from_scratch: bool = False
    # Positions of the LM; None: the prepared samples' max_len (more would never be trained, and score and
    # serve would feed histories into them).
    max_positions: int | None = Field(None, ge=8)


class SingleConfig(BaseModel):
    """`hetlm train`'s settings: the LM and how it is trained: at most 3 epochs, validated every 50 steps and
    stopped after 3 validations without a better next-session NLL (on the shipped sample the best comes within
    the first epoch and later epochs overfit; best/ keeps the best validated weights)."""
    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(epochs=3, eval_every=50, early_stopping_patience=3)


def train_single(model: ModelConfig, config: TrainConfig, train, val: pl.DataFrame, tokenizer, out_dir: str | Path,
                 model_dir: str | Path | None = None, shape: Preset | None = None, max_positions: int = 512,
                 seed: int | None = None, resume: bool = False, stream: bool = False, fit_decoder: bool = True,
                 progress: bool = True, name: str | None = None) -> tuple[ClusterwiseLM, TrainResult]:
    """Build the LM `model` describes (or of `shape`, a preset's shape, instead of `model.preset`), with torch
    seeded by `seed` (default config.seed) or from the released weights `model.init_from`, train it on the
    `train` samples (a frame, or a Parquet file with stream=True) into out_dir (best/, checkpoint/, history.json)
    and return it as a single-LM `ClusterwiseLM` with `tokenizer`, beside the training result. The LM has
    `model.max_positions` positions, else `max_positions` (callers pass the prepared max_len); training
    sequences are cut to them. A resumed run must have the same vocabulary (pages and ids) as its checkpoint.

    The model folder carries the tokenizer: `model_dir`, where the trained weights are saved, or by default
    out_dir/best, where `train_lm` left the best validated ones. With fit_decoder, the expected-IoU set
    decoder fitted on the validation users goes there too (score and serve decode with it by default).
    Under torchrun every process calls this alike; process 0 writes the folder.
    """
    name = name or model.preset
    main = init_distributed().is_main
    torch.manual_seed(config.seed if seed is None else seed)
    positions = model.max_positions or max_positions
    config = config.model_copy(update={"max_len": min(config.max_len, positions)})
    lm = build_model(shape or model.preset, len(tokenizer), model.family, max_positions=positions)
    if model.init_from:
        report = init_from(lm, model.init_from)
        if main:
            console.print(f"{name}: init from {model.init_from}: {len(report.loaded)} tensors loaded, "
                          f"{len(report.skipped)} skipped")
    if main:
        console.print(f"{name} ({lm.config.model_type}): {count_parameters(lm) / 1e6:.2f}M parameters")
    folder = Path(model_dir) if model_dir is not None else Path(out_dir) / "best"
    try:
        result = train_lm(lm, train, val, config, out_dir, resume=resume, progress=progress, stream=stream,
                          data={"vocabulary": vocabulary_fingerprint(tokenizer)})
    except TrainingInterrupted:
        if main and model_dir is None and folder.exists():
            tokenizer.save_pretrained(folder / "tokenizer")  # the best weights so far load by themselves
        raise
    single = ClusterwiseLM.single(lm.eval(), tokenizer)
    if main:
        if model_dir is None:
            tokenizer.save_pretrained(folder / "tokenizer")  # beside the best weights: best/ loads by itself
        else:
            single.save_pretrained(folder)
        if fit_decoder:
            _fit_set_decoder(single, val, folder)
    return single, result


def vocabulary_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's pages and their ids."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _fit_set_decoder(model: ClusterwiseLM, val: pl.DataFrame, folder: Path) -> None:
    """The expected-IoU set decoder with its default settings, fitted on the validation users, into `folder`."""
    decoder = fit_default_set_decoder(model, val)
    if decoder is None:
        console.print("no validation users: no set decoder fitted (score and serve will decode greedily)")
        return
    decoder.save_pretrained(folder)
    console.print(f"set decoder fitted on {val.height} validation users: size rule "
                  f"{decoder.size_ or 'expected IoU per user'}, validation IoU {max(decoder.fit_iou_.values()):.3f}")
