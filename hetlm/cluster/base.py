"""K cluster LMs behind a router: what k-means clusterwise training and HeTLM both produce.

A saved ClusterwiseLM is a folder:
    clusterwise.json      kind, encoder settings, active clusters, cluster sizes, routing default
    centroids.npy         (K, d) centroid of each cluster's training embeddings (nearest-centroid routing)
    selector/             the HeTLM actor (absent for k-means)
    cluster_<k>/          one `save_pretrained` causal LM per active cluster (loads in plain transformers)
    tokenizer/            the page tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..train import save_model
from .likelihood import history_dataset, likelihood_assignment
from .selector import Selector

CONFIG_FILE = "clusterwise.json"


def nearest_centroid(z: np.ndarray, centroids: np.ndarray, active: list[int]) -> np.ndarray:
    d = ((z[:, None, :] - centroids[None, active, :]) ** 2).sum(-1)
    return np.asarray(active)[d.argmin(1)]


def centroids_of(z: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Mean embedding of each cluster (zeros for an empty one)."""
    out = np.zeros((n_clusters, z.shape[1]), dtype=np.float32)
    for k in range(n_clusters):
        if (labels == k).any():
            out[k] = z[labels == k].mean(0)
    return out


@dataclass
class ClusterwiseLM:
    kind: str                                  # "kmeans" or "hetlm"
    models: dict[int, PreTrainedModel]         # active cluster id -> its LM
    centroids: np.ndarray
    selector: Selector | None = None
    routing: str = "selector"                  # default routing: "selector", "centroid" or "likelihood"
    encoder: dict = field(default_factory=dict)  # encoder name and settings used for z
    sizes: dict[int, int] = field(default_factory=dict)  # training samples per cluster
    info: dict = field(default_factory=dict)

    @property
    def active(self) -> list[int]:
        return sorted(self.models)

    def route(self, z: np.ndarray | None, routing: str | None = None, input_ids: list[list[int]] | None = None,
              batch_size: int = 64) -> np.ndarray:
        """Cluster id of each user: argmax of the selector or the nearest centroid (from embeddings z), or
        "likelihood": the cluster LM that gives the user's own history (input_ids) the lowest NLL (no encoder)."""
        routing = routing or self.routing
        if routing == "selector":
            if self.selector is None:
                raise ValueError(f"a {self.kind} model has no selector; route by 'centroid' or 'likelihood'")
            return self.selector.predict(z)
        if routing == "centroid":
            return nearest_centroid(z, self.centroids, self.active)
        if routing == "likelihood":
            if input_ids is None:
                raise ValueError("likelihood routing needs the users' input_ids")
            dataset = history_dataset(input_ids, self.max_len)
            return likelihood_assignment(self.models, dataset, self.active, max(self.active) + 1,
                                         batch_size=batch_size).numpy()
        raise ValueError(f"routing must be 'selector', 'centroid' or 'likelihood', not {routing!r}")

    @property
    def max_len(self) -> int:
        """Longest sequence the cluster LMs were trained on (HeTLM's max_len; 512 otherwise)."""
        return self.info.get("config", {}).get("max_len", 512)

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for k, model in self.models.items():
            save_model(model, path / f"cluster_{k}")
        np.save(path / "centroids.npy", self.centroids)
        if self.selector is not None:
            self.selector.save_pretrained(path / "selector")
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "tokenizer")
        config = dict(kind=self.kind, active=self.active, routing=self.routing, encoder=self.encoder,
                      sizes={str(k): v for k, v in self.sizes.items()}, info=self.info)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> ClusterwiseLM:
        """Load a saved folder (safetensors only)."""
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        models = {
            k: AutoModelForCausalLM.from_pretrained(path / f"cluster_{k}", use_safetensors=True).to(device).eval()
            for k in config["active"]
        }
        selector = Selector.from_pretrained(path / "selector") if (path / "selector").exists() else None
        return cls(kind=config["kind"], models=models, centroids=np.load(path / "centroids.npy"),
                   selector=selector, routing=config["routing"], encoder=config["encoder"],
                   sizes={int(k): v for k, v in config["sizes"].items()}, info=config.get("info", {}))


def load_model(model_dir: str | Path, device: str = "cpu") -> PreTrainedModel | ClusterwiseLM:
    """A clusterwise folder (clusterwise.json) or a single save_pretrained LM folder; a ValueError naming the
    folder when it is neither, or is incomplete or damaged (a missing cluster, truncated weights, a changed
    config)."""
    model_dir = Path(model_dir)
    clusterwise = (model_dir / CONFIG_FILE).is_file()
    if not clusterwise and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is neither a save_pretrained LM folder nor a clusterwise model folder")
    try:
        if clusterwise:
            return ClusterwiseLM.from_pretrained(model_dir, device)
        return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    except Exception as err:  # noqa: BLE001 (whatever the loaders raise, the user needs the folder and the cause)
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"the model folder {model_dir} cannot be loaded ({type(err).__name__}: {cause}); it is "
                         "incomplete or was changed: save or copy it again") from err
