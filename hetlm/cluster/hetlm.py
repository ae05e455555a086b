"""HeTLM: clusterwise LMs with endogenous clusters, trained actor-critic (paper Algorithm 1).

    z = f(x)                                   frozen encoder, precomputed
    selector pre-trained on k-means(z, K) labels
    predictors theta_1..K = copies of the pre-trained small LM
    for each batch b:
        pi = h_phi(z_b);  c = argmax pi
        critic: for each k, a step of theta_k on {i in b : c_i = k} by its NLL
        actor:  a step of phi on  L1 + alpha L2 + beta L3
                L1 = mean_i sum_k pi_ik l_ik     l_ik = NLL of predictor k on sample i (detached)
                L2 = mean_i -sum_k pi_ik log pi_ik
                L3 = paper:  sigmoid(-sum_{k!=k'} ||e_k - e_k'||_1)
                     scaled: mean_{k<k'} sigmoid(-||e_k - e_k'||_1 / tau)
                e_k = sum_i pi_ik z_i / sum_i pi_ik  (soft centroids over the batch, so L3 has a gradient)
    after each epoch: clusters that no training sample is assigned to (argmax) are retired.

l_ik is the mean NLL per token of sample i's whole sequence (history + next session), the same loss the
critic minimises, so the selector sends a user to the predictor that models that user best.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel

from ..train import (
    SequenceDataset, TrainConfig, _autocast, length_bucketed_batches, make_optimizer, pad_sequences,
    resolve_device, sorted_batches, token_nll,
)
from .base import ClusterwiseLM, centroids_of
from .kmeans import kmeans_labels
from .selector import Selector


@dataclass
class HeTLMConfig:
    """Defaults are the paper's Table 15 values; CPU profiles override some, and say so."""

    n_clusters: int = 6
    alpha: float = 5.0
    beta: float = 9.0
    epochs: int = 10
    batch_size: int = 16
    selector_lr: float = 5e-5
    predictor_lr: float = 1e-5
    selector_weight_decay: float = 1e-4
    predictor_weight_decay: float = 0.01
    selector_hidden: int = 256
    selector_pretrain_epochs: int = 200
    selector_pretrain_lr: float = 1e-3
    selector_label_smoothing: float = 0.4  # not in the paper: see Selector
    # Not in the paper: epochs in which each predictor first trains on its k-means cluster alone, before
    # any actor step. With identical predictors, the one of the largest cluster otherwise gets ahead
    # and L1 can pull every user to it.
    critic_warmup_epochs: int = 0
    l3: Literal["paper", "scaled"] = "scaled"
    l3_tau: float | None = None        # scaled L3 temperature; None = mean pairwise L1 distance of the k-means centroids
    eval_every: int = 50               # steps between validation points (paper Figure 3)
    max_len: int = 512
    bf16: bool = False
    seed: int = 0
    device: str = "auto"


@dataclass
class HeTLMHistory:
    """Everything plotted in the report: losses per step, validation per eval, cluster sizes per epoch."""

    steps: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    cluster_sizes: list[dict] = field(default_factory=list)
    retired: list[dict] = field(default_factory=list)


def actor_loss(pi: torch.Tensor, nll: torch.Tensor, z: torch.Tensor, alpha: float, beta: float,
               l3: str = "scaled", tau: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L_A = L1 + alpha L2 + beta L3 over the active clusters (columns of pi with any mass)."""
    active = pi.sum(0) > 0
    p, l = pi[:, active], nll[:, active]
    l1 = (p * l).sum(1).mean()
    l2 = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
    e = (p.T @ z) / p.sum(0).clamp_min(1e-12)[:, None]
    dist = torch.cdist(e, e, p=1)
    pairs = torch.triu_indices(len(e), len(e), offset=1)
    d = dist[pairs[0], pairs[1]]
    if l3 == "paper":
        l3_value = torch.sigmoid(-2 * d.sum())  # sum over ordered pairs k != k'
    elif l3 == "scaled":
        l3_value = torch.sigmoid(-d / tau).mean() if len(d) else d.new_zeros(())
    else:
        raise ValueError(f"l3 must be 'paper' or 'scaled', not {l3!r}")
    loss = l1 + alpha * l2 + beta * l3_value
    return loss, {"L1": l1.item(), "L2": l2.item(), "L3": l3_value.item(), "LA": loss.item()}


@torch.no_grad()
def nll_matrix(models: dict[int, PreTrainedModel], dataset: SequenceDataset, idx: list[int], n_clusters: int,
               bf16: bool = False) -> torch.Tensor:
    """(len(idx), K) mean token NLL of each sample under each active predictor (0 for retired ones)."""
    ids, mask = pad_sequences([dataset[i] for i in idx])
    out = torch.zeros(len(idx), n_clusters)
    for k, model in models.items():
        was_training = model.training
        model.eval()
        with _autocast(model.device, bf16):
            nll = token_nll(model, ids.to(model.device), mask.to(model.device)).float().cpu()
        model.train(was_training)
        out[:, k] = nll.sum(1) / mask[:, 1:].sum(1).clamp_min(1)
    return out


class HeTLM:
    """Endogenous clusterwise LMs. `fit` runs Algorithm 1; `result_` is the trained ClusterwiseLM."""

    def __init__(self, config: HeTLMConfig | None = None):
        self.config = config or HeTLMConfig()
        self.history = HeTLMHistory()

    def _critic_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(lr=c.predictor_lr, weight_decay=c.predictor_weight_decay, batch_size=c.batch_size)

    def fit(self, base_model: PreTrainedModel, train: pl.DataFrame, z_train: np.ndarray,
            val: pl.DataFrame | None = None, z_val: np.ndarray | None = None, encoder: dict | None = None,
            progress: bool = True, out_dir: str | Path | None = None) -> ClusterwiseLM:
        c = self.config
        torch.manual_seed(c.seed)
        device = resolve_device(c.device)
        train_set = SequenceDataset.from_samples(train, c.max_len)
        val_set = SequenceDataset.from_samples(val, c.max_len) if val is not None and val.height else None
        z = torch.as_tensor(z_train, dtype=torch.float32)
        zv = torch.as_tensor(z_val, dtype=torch.float32) if val_set is not None else None

        # Steps 1-2: k-means on z, selector pre-trained to reproduce its labels.
        labels, km_centroids = kmeans_labels(z_train, c.n_clusters, c.seed)
        selector = Selector(c.n_clusters, hidden=c.selector_hidden, lr=c.selector_pretrain_lr,
                            weight_decay=c.selector_weight_decay, epochs=c.selector_pretrain_epochs,
                            label_smoothing=c.selector_label_smoothing, seed=c.seed).fit(z_train, labels)
        self.pretrain_agreement = float((selector.predict(z_train) == labels).mean())
        tau = c.l3_tau or float(torch.pdist(torch.as_tensor(km_centroids), p=1).mean())
        self.tau = tau

        # Step 3: every predictor starts from the pre-trained small LM.
        models = {k: copy.deepcopy(base_model).to(device).train() for k in range(c.n_clusters)}
        critic_cfg = self._critic_config()
        optimizers = {k: make_optimizer(m, critic_cfg) for k, m in models.items()}
        net = selector.net
        net.train()
        actor_opt = torch.optim.AdamW(net.parameters(), lr=c.selector_lr, weight_decay=c.selector_weight_decay)
        self._record_sizes(selector, z_train, epoch=0)

        rng = np.random.default_rng(c.seed)
        kmeans_assigned = torch.as_tensor(labels)
        for _ in range(c.critic_warmup_epochs):
            for batch in length_bucketed_batches(train_set.lengths, c.batch_size, 50, rng):
                self._critic_step(models, optimizers, train_set, batch, kmeans_assigned[batch], device)
        n_batches = math.ceil(len(train_set) / c.batch_size)
        step, started = 0, time.perf_counter()
        bar = Progress(TextColumn("[bold]HeTLM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), disable=not progress)
        with bar:
            task = bar.add_task("hetlm", total=c.epochs * n_batches, info="")
            for epoch in range(c.epochs):
                for batch in length_bucketed_batches(train_set.lengths, c.batch_size, 50, rng):
                    pi = net(z[batch])
                    assigned = pi.argmax(1).detach()
                    critic = self._critic_step(models, optimizers, train_set, batch, assigned, device)
                    nll = nll_matrix(models, train_set, batch, c.n_clusters, c.bf16)
                    loss, parts = actor_loss(pi, nll, z[batch], c.alpha, c.beta, c.l3, tau)
                    actor_opt.zero_grad()
                    loss.backward()
                    actor_opt.step()
                    step += 1
                    self.history.steps.append({"step": step, "epoch": epoch, **parts, "critic": critic})
                    if val_set is not None and step % c.eval_every == 0:
                        self._validate(net, models, val_set, zv, step, tau)
                    bar.update(task, advance=1, info=f"LA {parts['LA']:.3f} K={len(models)}")
                if val_set is not None:
                    self._validate(net, models, val_set, zv, step, tau)
                self._retire_empty(selector, models, optimizers, z_train, epoch + 1)
        net.eval()
        for m in models.values():
            m.eval()
        final = selector.predict(z_train)
        sizes = {k: int((final == k).sum()) for k in models}
        info = {"config": asdict(c), "tau": tau, "selector_pretrain_agreement": self.pretrain_agreement,
                "initial_k": c.n_clusters, "final_k": len(models), "seconds": time.perf_counter() - started,
                "history": asdict(self.history)}
        self.result_ = ClusterwiseLM("hetlm", models, centroids_of(z_train, final, c.n_clusters), selector=selector,
                                     routing="selector", encoder=encoder or {}, sizes=sizes, info=info)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "hetlm_history.json").write_text(json.dumps(asdict(self.history)))
        return self.result_

    def _critic_step(self, models, optimizers, dataset, batch, assigned, device) -> dict[int, float]:
        """One NLL step of each predictor on the batch samples assigned to it."""
        losses = {}
        for k in assigned.unique().tolist():
            idx = [batch[i] for i in torch.nonzero(assigned == k).flatten().tolist()]
            ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in idx]))
            with _autocast(device, self.config.bf16):
                loss = token_nll(models[k], ids, mask).sum() / mask[:, 1:].sum()
            optimizers[k].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[k].parameters(), 1.0)
            optimizers[k].step()
            losses[k] = loss.item()
        return losses

    @torch.no_grad()
    def _validate(self, net, models, val_set, zv, step, tau) -> None:
        """Selector loss L_A and each predictor's NLL on the validation users routed to it."""
        net.eval()
        pi = net(zv)
        nll = torch.zeros(len(val_set), pi.shape[1])
        for batch in sorted_batches(val_set.lengths, 64):  # length-sorted: little padding
            nll[batch] = nll_matrix(models, val_set, batch, pi.shape[1], self.config.bf16)
        _, parts = actor_loss(pi, nll, zv, self.config.alpha, self.config.beta, self.config.l3, tau)
        routed = pi.argmax(1)
        per_cluster = {int(k): float(nll[routed == k, k].mean()) for k in models if (routed == k).any()}
        combined = float(nll[torch.arange(len(routed)), routed].mean())
        self.history.val.append({"step": step, **{f"selector_{k}": v for k, v in parts.items()},
                                 "predictor": per_cluster, "combined_nll": combined})
        net.train()

    def _record_sizes(self, selector, z_train, epoch) -> np.ndarray:
        assigned = selector.predict(z_train)
        self.history.cluster_sizes.append(
            {"epoch": epoch, "sizes": {int(k): int((assigned == k).sum()) for k in selector.active_clusters}}
        )
        return assigned

    def _retire_empty(self, selector, models, optimizers, z_train, epoch) -> None:
        """Endogenous K: a cluster no training sample is assigned to is retired with its predictor."""
        selector.net.eval()
        assigned = self._record_sizes(selector, z_train, epoch)
        selector.net.train()
        empty = [k for k in selector.active_clusters if not (assigned == k).any()]
        if empty and len(empty) < len(models):
            selector.retire(empty)
            for k in empty:
                del models[k], optimizers[k]
            self.history.retired.append({"epoch": epoch, "clusters": empty})
