"""The selector h_phi (HeTLM's actor): an MLP from a user embedding to a distribution over clusters.

scikit-learn shaped (`fit` on k-means labels, `predict_proba`, `predict`) and saved like an HF model:
`save_pretrained(dir)` writes selector_config.json + selector.safetensors, `Selector.from_pretrained(dir)`
reads them.
Retired clusters stay in the output layer but are masked out (probability 0), so cluster ids are stable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "selector_config.json", "selector.safetensors"


class SelectorNet(nn.Module):
    def __init__(self, dim: int, n_clusters: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_clusters)
        )
        # Retired clusters are masked with -inf before the softmax.
        self.register_buffer("active", torch.ones(n_clusters, dtype=torch.bool))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Probabilities pi (n, K) over the active clusters."""
        logits = self.mlp(z).masked_fill(~self.active, float("-inf"))
        return torch.softmax(logits, dim=-1)


class Selector:
    """MLP actor. `fit(z, labels)` pre-trains it to reproduce given (k-means) labels."""

    def __init__(self, n_clusters: int = 6, hidden: int = 256, dropout: float = 0.1, lr: float = 1e-3,
                 weight_decay: float = 1e-4, epochs: int = 200, batch_size: int = 256, label_smoothing: float = 0.0,
                 seed: int = 0, stop_at_agreement: float | None = None):
        # Label smoothing of the pre-training targets: HeTLM passes HeTLMConfig.selector_label_smoothing,
        # whose default (0) this one matches and whose comment says why.
        self.n_clusters, self.hidden, self.dropout, self.label_smoothing = n_clusters, hidden, dropout, label_smoothing
        self.lr, self.weight_decay, self.epochs, self.batch_size, self.seed = lr, weight_decay, epochs, batch_size, seed
        # Stop pre-training after the first epoch whose argmax agrees with the labels on this share of the
        # samples: trained on, the softmax saturates and passes almost no gradient to the actor's losses.
        self.stop_at_agreement = stop_at_agreement
        self.net: SelectorNet | None = None
        self.pretrain_history: list[float] = []

    def _init(self, dim: int) -> SelectorNet:
        torch.manual_seed(self.seed)
        self.net = SelectorNet(dim, self.n_clusters, self.hidden, self.dropout)
        return self.net

    def fit(self, z: np.ndarray, labels: np.ndarray) -> Selector:
        """Cross-entropy pre-training on the k-means labels (Algorithm 1, step 2)."""
        net = self._init(z.shape[1])
        x, y = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        net.train()
        for _ in range(self.epochs):
            total = 0.0
            for idx in torch.randperm(len(x), generator=gen).split(self.batch_size):
                # log pi as logits: softmax(log pi) = pi, and retired clusters stay at ~0.
                loss = nn.functional.cross_entropy(torch.log(net(x[idx]) + 1e-12), y[idx],
                                                   label_smoothing=self.label_smoothing)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            self.pretrain_history.append(total / len(x))
            if self.stop_at_agreement is not None:
                net.eval()
                with torch.no_grad():
                    agreement = (net(x).argmax(1) == y).float().mean().item()
                net.train()
                if agreement >= self.stop_at_agreement:
                    break
        net.eval()
        return self

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.as_tensor(z, dtype=torch.float32)).numpy()

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.predict_proba(z).argmax(axis=1)

    @property
    def active_clusters(self) -> list[int]:
        return [int(k) for k in torch.nonzero(self.net.active).flatten()]

    def retire(self, clusters: list[int]) -> None:
        self.net.active[clusters] = False

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dim = self.net.mlp[0].in_features
        config = dict(dim=dim, n_clusters=self.n_clusters, hidden=self.hidden, dropout=self.dropout,
                      label_smoothing=self.label_smoothing, lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                      batch_size=self.batch_size, seed=self.seed, stop_at_agreement=self.stop_at_agreement)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Selector:
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        dim = config.pop("dim")
        selector = cls(**config)
        selector._init(dim).load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        selector.net.eval()
        return selector
