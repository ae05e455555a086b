"""What the k-means clusterwise and HeTLM estimators share once `fit` has set `model_`: saving the fitted model
folder as `hetlm experiment` and `hetlm fit-hetlm` do (with the set decoder), and routing users."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from ..evaluate import fit_default_set_decoder
from .base import ClusterwiseLM


class ClusterwiseEstimator:
    model_: ClusterwiseLM
    set_decoder: bool  # constructor setting: save_pretrained fits the set decoder on fit's validation users
    _validation: tuple[pl.DataFrame, np.ndarray] | None = None  # kept by `fit` for that

    def _keep_validation(self, val: pl.DataFrame | None, z_val: np.ndarray | None) -> None:
        self._validation = (val, z_val) if self.set_decoder and val is not None and val.height else None

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """The fitted model's folder (`ClusterwiseLM.save_pretrained`); `load_model(path)` loads it. With
        `set_decoder` (the default) and validation users given to `fit`, the folder also gets the expected-IoU
        set decoder fitted on them (`set_decoder.json`, as `hetlm train` writes): `Scorer`, `hetlm score`,
        `serve` and `generate --strategy set` decode with it."""
        self.model_.save_pretrained(path, tokenizer)
        if self._validation is not None:
            model = dataclasses.replace(self.model_, tokenizer=tokenizer if tokenizer is not None else self.model_.tokenizer)
            fit_default_set_decoder(model, *self._validation).save_pretrained(path)

    def predict(self, z: np.ndarray | None, input_ids: list[list[int]] | None = None) -> np.ndarray:
        """Each user's cluster (from embeddings z, or input_ids for likelihood routing), as the fitted model
        routes by default (`ClusterwiseLM.route`)."""
        return self.model_.route(z, input_ids=input_ids)
