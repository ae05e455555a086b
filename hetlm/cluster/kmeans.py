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
from .estimator import ClusterwiseEstimator


def kmeans_labels(z: np.ndarray, n_clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(z)
    return km.labels_, km.cluster_centers_.astype(np.float32)


class KMeansClusterwise(ClusterwiseEstimator):
    """k-means on the users' embeddings; each cluster fine-tunes a copy of the base LM on its users' samples
    (`finetune`, seed + k for cluster k), in out_dir/train_cluster_<k>. An estimator like `HeTLM`: `fit`
    returns self with

        model_          the ClusterwiseLM (kind "kmeans", nearest-centroid routing)
        labels_         each training sample's k-means cluster
        n_clusters_     the clusters that got training samples (and an LM)
        histories_      each cluster's training history (`TrainResult.history`), by cluster id
    """

    def __init__(self, n_clusters: int, out_dir: str | Path, finetune: TrainConfig | None = None,
                 progress: bool = True, set_decoder: bool = True):
        self.n_clusters = n_clusters
        self.out_dir = Path(out_dir)
        self.finetune = finetune or TrainConfig()
        self.progress = progress
        self.set_decoder = set_decoder  # save_pretrained fits the set decoder on the validation users

    def fit(self, base_model: PreTrainedModel, train: pl.DataFrame, z_train: np.ndarray, val: pl.DataFrame,
            z_val: np.ndarray, encoder: dict | None = None) -> KMeansClusterwise:
        """Validation samples are routed to the nearest centroid, as test users will be; `encoder`: the
        settings of the encoder that made z, recorded in the model for routing new users."""
        config = self.finetune
        self.labels_, centroids = kmeans_labels(z_train, self.n_clusters, config.seed)
        clusters = list(range(self.n_clusters))
        val_labels = nearest_centroid(z_val, centroids, clusters) if len(z_val) else np.array([])
        models, sizes, self.histories_ = {}, {}, {}
        for k in clusters:
            mask = self.labels_ == k
            if not mask.any():
                continue
            model = copy.deepcopy(base_model)
            result = train_lm(model, train.filter(pl.Series(mask)), val.filter(pl.Series(val_labels == k)),
                              config.model_copy(update={"seed": config.seed + k}), self.out_dir / f"train_cluster_{k}",
                              progress=self.progress)
            models[k], sizes[k], self.histories_[k] = model.eval(), int(mask.sum()), result.history
        self.n_clusters_ = len(models)
        self.model_ = ClusterwiseLM("kmeans", models, centroids, routing="centroid", encoder=encoder or {},
                                    sizes=sizes, info={"n_clusters": self.n_clusters})
        self._keep_validation(val, z_val)
        return self
