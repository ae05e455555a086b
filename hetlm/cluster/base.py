"""K cluster LMs behind a router: what k-means clusterwise training and HeTLM produce, and (K = 1, kind
"single") a single LM, so that evaluation, outcomes, scoring and serving run every model one way
(`for_each_cluster`) and every saved model folder loads by itself (`load_model`).

A saved clusterwise model is a folder:
    clusterwise.json      kind, encoder settings, active clusters, cluster sizes, routing default
    centroids.npy         (K, d) centroid of each cluster's training embeddings (nearest-centroid routing)
    selector/             the HeTLM actor (absent for k-means)
    cluster_<k>/          one `save_pretrained` causal LM per active cluster (loads in plain transformers)
    tokenizer/            the page tokenizer
A saved single LM is a `save_pretrained` folder (loads in plain transformers) with its tokenizer/.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..checkpoint import hf_bars_off, save_model, write_dir_atomically
from ..encoders import encoder_from_settings
from ..tokenizer import SPECIALS, CustomCodeError, load_tokenizer, refuse_custom_code
from .likelihood import history_dataset, likelihood_assignment
from .selector import Selector

CONFIG_FILE = "clusterwise.json"
TOKENIZER_DIR = "tokenizer"
T = TypeVar("T")


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
    kind: str                                  # "kmeans", "hetlm" or "single" (one LM, `ClusterwiseLM.single`)
    models: dict[int, PreTrainedModel]         # active cluster id -> its LM
    centroids: np.ndarray
    selector: Selector | None = None
    routing: str = "selector"                  # default routing: "selector", "centroid", "likelihood" ("none": single)
    encoder: dict = field(default_factory=dict)  # encoder name and settings used for z
    sizes: dict[int, int] = field(default_factory=dict)  # training samples per cluster
    info: dict = field(default_factory=dict)
    tokenizer: Any = field(default=None, repr=False)  # the page tokenizer (set by `from_pretrained`)

    @classmethod
    def single(cls, model: PreTrainedModel, tokenizer=None) -> ClusterwiseLM:
        """One LM as a clusterwise model with K = 1: every user goes to it, no encoder needed."""
        return cls("single", {0: model}, np.zeros((1, 0), dtype=np.float32), routing="none", tokenizer=tokenizer)

    @property
    def active(self) -> list[int]:
        return sorted(self.models)

    @property
    def routed(self) -> bool:
        """Whether users are routed between LMs (False for a single LM)."""
        return self.kind != "single"

    @functools.cached_property
    def user_encoder(self):
        """The encoder (the one the model was trained with) whose embeddings route users; None for a single LM."""
        return encoder_from_settings(self.encoder).set_params(show_progress=False) if self.routed else None

    def embed(self, histories: list[list[list[str]]]) -> np.ndarray | None:
        """The embeddings z that route these users (their histories: sessions of pages); None for a single LM."""
        return None if self.user_encoder is None else self.user_encoder.transform(histories)

    def route(self, z: np.ndarray | None, routing: str | None = None, input_ids: list[list[int]] | None = None,
              batch_size: int = 64) -> np.ndarray:
        """Cluster id of each user: argmax of the selector or the nearest centroid (from embeddings z), or
        "likelihood": the cluster LM that gives the user's own history (input_ids) the lowest NLL (no encoder).
        A single LM sends every user (rows of z or input_ids) to its one LM."""
        routing = routing or self.routing
        if not self.routed:
            if routing != "none":
                raise ValueError(f"routing applies to clusterwise models only; this is a single LM, not {routing!r}")
            return np.zeros(len(input_ids if input_ids is not None else z), dtype=int)
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
        """The folder described in the module docstring; `tokenizer` (default: the model's own) goes inside."""
        path = Path(path)
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError(f"no tokenizer to save in {path}: a model folder carries its page tokenizer")
        # Written whole or not at all (a full disk must not leave a config without its weights).
        write_dir_atomically(path, lambda tmp: self._write(tmp, tokenizer))

    def _write(self, path: Path, tokenizer) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(path / TOKENIZER_DIR)
        if not self.routed:
            save_model(self.models[0], path)
            return
        for k, model in self.models.items():
            save_model(model, path / f"cluster_{k}")
        np.save(path / "centroids.npy", self.centroids)
        if self.selector is not None:
            self.selector.save_pretrained(path / "selector")
        # The encoder's cache_dir is a path of this machine: a loaded folder never names where caches go.
        encoder = {k: v for k, v in self.encoder.items() if k != "cache_dir"}
        config = dict(kind=self.kind, active=self.active, routing=self.routing, encoder=encoder,
                      sizes={str(k): v for k, v in self.sizes.items()}, info=self.info)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", tokenizer_dir: str | Path | None = None
                        ) -> ClusterwiseLM:
        """Load a saved clusterwise or single-LM folder (safetensors only) with its tokenizer, or the one in
        `tokenizer_dir`."""
        path = Path(path)
        tokenizer = load_tokenizer(tokenizer_dir or path / TOKENIZER_DIR)
        if not (path / CONFIG_FILE).is_file():
            return cls.single(_load_lm(path, device), tokenizer)
        config = json.loads((path / CONFIG_FILE).read_text())
        models = {k: _load_lm(path / f"cluster_{k}", device) for k in config["active"]}
        selector = Selector.from_pretrained(path / "selector") if (path / "selector").exists() else None
        return cls(kind=config["kind"], models=models, centroids=np.load(path / "centroids.npy"),
                   selector=selector, routing=config["routing"],
                   encoder={k: v for k, v in config["encoder"].items() if k != "cache_dir"},  # see save_pretrained
                   sizes={int(k): v for k, v in config["sizes"].items()}, info=config.get("info", {}),
                   tokenizer=tokenizer)


def _load_lm(path: Path, device: str) -> PreTrainedModel:
    refuse_custom_code(path, "config.json")
    with hf_bars_off():
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False).to(device).eval()


def for_each_cluster(model: ClusterwiseLM, clusters: np.ndarray,
                     fn: Callable[[PreTrainedModel, np.ndarray], Sequence[T]]) -> list[T]:
    """`fn(lm, idx)` on each cluster's LM with the indices of the rows routed to it (`clusters`, from
    `ClusterwiseLM.route`), its per-row results put back in input order."""
    out: list = [None] * len(clusters)
    for k, lm in model.models.items():
        idx = np.flatnonzero(clusters == k)
        if len(idx):
            for i, result in zip(idx, fn(lm, idx), strict=True):
                out[i] = result
    return out


def load_model(model_dir: str | Path, device: str = "cpu", tokenizer_dir: str | Path | None = None) -> ClusterwiseLM:
    """A saved clusterwise or single-LM folder with its tokenizer (or `tokenizer_dir`, which must then be the
    vocabulary the model was trained with); a ValueError naming the folder when it lacks a tokenizer, is
    neither kind of folder, or is incomplete or damaged (a missing cluster, truncated weights, a changed
    config)."""
    model_dir = Path(model_dir)
    own = model_dir / TOKENIZER_DIR
    if not (Path(tokenizer_dir or own) / "tokenizer.json").is_file():
        raise ValueError(f"no page tokenizer found in {tokenizer_dir or own}: a model folder carries the tokenizer it "
                         "was trained with in tokenizer/; save it there or give the tokenizer folder of the model's "
                         "prepared data (PREPARED/tokenizer)")
    if not (model_dir / CONFIG_FILE).is_file() and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is neither a save_pretrained LM folder nor a clusterwise model folder")
    try:
        model = ClusterwiseLM.from_pretrained(model_dir, device, tokenizer_dir)
    except CustomCodeError:
        raise
    except Exception as err:  # noqa: BLE001 (whatever the loaders raise, the user needs the folder and the cause)
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"the model folder {model_dir} cannot be loaded ({type(err).__name__}: {cause}); it is "
                         "incomplete or was changed: save or copy it again") from err
    if tokenizer_dir is not None and (own / "tokenizer.json").is_file():
        _check_same_vocabulary(load_tokenizer(own), model.tokenizer, own, tokenizer_dir)
    sizes = sorted({lm.config.vocab_size for lm in model.models.values()})
    if sizes != [len(model.tokenizer)]:
        raise ValueError(f"the model {model_dir} has {' / '.join(map(str, sizes))} tokens, the tokenizer "
                         f"{tokenizer_dir or own} {len(model.tokenizer)}: the model was trained on another vocabulary; "
                         "use the tokenizer of the model's prepared data")
    return model


def _check_same_vocabulary(own, given, own_dir: Path, given_dir: str | Path) -> None:
    """Another dataset's tokenizer would give wrong pages and probabilities without any error."""
    if own.get_vocab() != given.get_vocab():
        raise ValueError(f"the tokenizer {given_dir} ({len(given) - len(SPECIALS)} pages) is not the one the model "
                         f"was trained with ({own_dir}, {len(own) - len(SPECIALS)} pages"
                         f"{', the same count but other pages or ids' if len(own) == len(given) else ''}); "
                         "use the tokenizer of the model's prepared data")
