"""Exogenous clusterwise baseline: k-means on user embeddings (fixed K), one fine-tuned LM per cluster."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.cluster import KMeans
from transformers import PreTrainedModel

from ..train import TrainConfig, train_lm
from .base import ClusterwiseLM, nearest_centroid


def kmeans_labels(z: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z)
    return km.labels_, km.cluster_centers_.astype(np.float32)


def fit_kmeans_clusterwise(
    base_model: PreTrainedModel, train: pl.DataFrame, z_train: np.ndarray, val: pl.DataFrame, z_val: np.ndarray,
    n_clusters: int, config: TrainConfig, out_dir: str | Path, encoder: dict | None = None, progress: bool = True,
) -> ClusterwiseLM:
    """k-means on z_train; each cluster fine-tunes a copy of `base_model` on its users' samples.
    Validation samples are routed to the nearest centroid, as test users will be."""
    labels, centroids = kmeans_labels(z_train, n_clusters, config.seed)
    val_labels = nearest_centroid(z_val, centroids, list(range(n_clusters))) if len(z_val) else np.array([])
    models, sizes, histories = {}, {}, {}
    for k in range(n_clusters):
        mask = labels == k
        if not mask.any():
            continue
        model = copy.deepcopy(base_model)
        result = train_lm(model, train.filter(pl.Series(mask)), val.filter(pl.Series(val_labels == k)),
                          config.model_copy(update={"seed": config.seed + k}), Path(out_dir) / f"train_cluster_{k}",
                          progress=progress)
        models[k], sizes[k], histories[k] = model.eval(), int(mask.sum()), result.history
    return ClusterwiseLM("kmeans", models, centroids, routing="centroid", encoder=encoder or {}, sizes=sizes,
                         info={"n_clusters": n_clusters, "histories": histories})
