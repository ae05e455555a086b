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

Choices where the paper is silent or its loss collapsed real data to one cluster (docs/method.md,
docs/findings.md; bench/hetlm_variants.py), each a HeTLMConfig field:
- l_ik (`l1_tokens`, `l1_reduce`): by default the NLL of sample i's next session (its history sessions
  are training data: their NLL measures memorisation), summed over its tokens as the paper's
  L_LLM = -sum O_i log P_i; "all" / "mean" give the former per-token NLL of history + next session.
- `l1_nll`: the NLL matrix comes from the predictors before the batch's critic step (after it, the
  predictor a user was just trained with on this very batch looks better than it is).
- c = argmax of the selector without dropout, as at inference.
- `critic_balance`: "accumulate" steps a predictor once it has gathered batch_size samples, so a small
  cluster's predictor does not take noisy few-sample steps while the largest one steps every batch
  (and becomes best on average, which L1 rewards).
- `selector_label_smoothing`: 0 (the selector mimics the k-means labels).
- `l1="centered"` uses l_ik - mean_i l_ik in L1 (a user goes where a predictor is relatively good, not to
  the predictor that is best on average), and `l2_balance` subtracts that weight x the entropy of the
  batch's mean assignment from L2.
- `assignment="likelihood"`: hard EM, no selector in the loop: c_i = argmin_k of predictor k's NLL of
  user i's history (new users are routed the same way, `ClusterwiseLM.route(..., "likelihood")`); the
  selector only learns to imitate c (cross-entropy), for routing by embedding. Needs a critic warm-up.

Speed: L1 needs every predictor on every batch sample, K no-grad forwards per step, so an exact epoch
costs several single-LM epochs (measured by bench/bench_hetlm_epoch.py: BENCHMARKS.md).
`nll_pass="batched"` runs the K predictors as one forward vmapped over their stacked weights (torch.func),
same numbers; on a CPU the work is already compute-bound (and CPU attention has no vmap rule), so the
default stays "sequential". `actor_rows` (off by default) is the approximation that is faster: L1 on a
random subset of each batch's rows.

Resume: with `out_dir`, `fit` writes out_dir/checkpoint/ (atomically) every `save_every` batches and at
each epoch end; `fit(..., resume=True)` continues from it to the same result as an uninterrupted run:
    state.json          progress (epoch, position in the epoch's batch order, step), tau, k-means labels, history
    selector/           the actor (Selector.save_pretrained; its mask holds the retired clusters)
    cluster_<k>/        model.safetensors: each active predictor's weights (written by the rank that owns it)
    trainer_state.pt    AdamW state of the actor
    critic_state.rank<r>.pt   AdamW states of the predictors process r trained, its RNG states and the
                              gradients they gathered but have not stepped on (critic_balance="accumulate")
Over several processes every rank writes its own predictors into the folder before rank 0 swaps it in, and
a run can resume on another number of processes (each loads the predictors it owns then).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_model
from safetensors.torch import save_model as save_weights
from transformers import PreTrainedModel

from ..checkpoint import rng_state, set_rng_state, swap_in
from ..data import SequenceDataset, length_bucketed_batches, pad_sequences, sorted_batches
from ..distributed import (
    barrier,
    broadcast_module,
    gather_objects,
    init_distributed,
    owned_clusters,
)
from ..nll import autocast, token_nll
from ..progress import progress_bar
from ..train import TrainConfig, make_optimizer, resolve_device
from .base import ClusterwiseLM, centroids_of
from .kmeans import kmeans_labels
from .likelihood import likelihood_assignment, nll_matrix
from .selector import Selector

log = logging.getLogger(__name__)

CHECKPOINT, STATE_FILE, TRAINER_STATE = "checkpoint", "state.json", "trainer_state.pt"
CRITIC_STATE = "critic_state.rank{rank}.pt"  # the optimizer and RNG states of one process's predictors


class HeTLMConfig(BaseModel):
    """Defaults are the paper's Table 15 values; CPU profiles override some, and say so."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_clusters: int = Field(6, ge=1)
    alpha: float = Field(5.0, ge=0)
    beta: float = Field(9.0, ge=0)
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    selector_lr: float = Field(5e-5, gt=0)
    predictor_lr: float = Field(1e-5, gt=0)
    selector_weight_decay: float = Field(1e-4, ge=0)
    predictor_weight_decay: float = Field(0.01, ge=0)
    selector_hidden: int = Field(256, ge=1)
    selector_pretrain_epochs: int = Field(200, ge=0)
    selector_pretrain_lr: float = Field(1e-3, gt=0)
    # Not in the paper (0 = its selector "mimics" the k-means labels): a soft start lets L2 move every user
    # onto the biggest cluster in the first epoch.
    selector_label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Not in the paper: pre-training stops once the selector's argmax agrees with the k-means labels on this
    # share of the samples (None: all selector_pretrain_epochs). Trained on, the softmax saturates: L1, L2
    # and L3 then pass it almost no gradient and no user ever moves (bench/hetlm_variants.py).
    selector_pretrain_agreement: float | None = 0.99
    # Not in the paper: epochs in which each predictor first trains on its k-means cluster alone, before
    # any actor step. With identical predictors, the one of the largest cluster otherwise gets ahead
    # and L1 can pull every user to it.
    critic_warmup_epochs: int = Field(0, ge=0)
    # L1's l_ik: the NLL of the next session only ("target": pages and [EOS], as nll.sequence_nll; the
    # history sessions are training data, so their NLL measures memorisation) or of history + next session
    # ("all"), summed over its tokens as the paper's L_LLM = -sum O_i log P_i ("sum") or per token ("mean",
    # which makes alpha and beta ~tokens-per-sequence times stronger against L1).
    l1_tokens: Literal["target", "all"] = "target"
    l1_reduce: Literal["sum", "mean"] = "sum"
    # The NLL matrix of L1 from the predictors before this batch's critic step (the paper does not say; after
    # it, the predictor a user was just trained with on this very batch looks better than it is).
    l1_nll: Literal["before_critic", "after_critic"] = "before_critic"
    # Not in the paper: "centered" scores each predictor's NLL against its own batch mean (l_ik - mean_i l_ik),
    # so L1 routes a user by where a predictor is relatively good, not to whichever predictor is best on
    # average (the one that got the most critic steps), which pulls every user to one cluster.
    l1: Literal["paper", "centered"] = "paper"
    # Not in the paper: L2 minus this weight x the entropy of the batch's mean assignment (weight 1: minus the
    # mutual information of user and cluster, as in RIM/IMSAT clustering). The paper's L2 alone (0) is
    # lowered fastest by raising one cluster's output bias for everyone, which also collapses K.
    l2_balance: float = Field(0.0, ge=0)
    # Critic steps of equal weight whatever a cluster's share of the batch: "accumulate" gradients until a
    # predictor has seen batch_size samples, then step; "share": step at predictor_lr x its share of the
    # batch; "none" (Algorithm 1 as written): a step per batch on however few samples it was assigned, so
    # the biggest cluster's predictor gets the most steps, becomes best on average and L1 pulls users to it.
    critic_balance: Literal["accumulate", "share", "none"] = "accumulate"
    # Who assigns a sample to a predictor: the selector (Algorithm 1), or "likelihood": the predictor with
    # the lowest NLL of the user's own history (hard-EM mixture of LMs; no text encoder needed, new users
    # are routed the same way). Then the actor only learns to imitate that assignment (cross-entropy), so
    # the model can also route by embedding; alpha, beta and L1's options do not apply.
    assignment: Literal["selector", "likelihood"] = "selector"
    l3: Literal["paper", "scaled"] = "scaled"
    # scaled L3 temperature; None = mean pairwise L1 distance of the k-means centroids
    l3_tau: float | None = Field(None, gt=0)
    eval_every: int = Field(50, ge=1)              # steps between validation points (paper Figure 3)
    # How L1's NLL matrix is computed: one pass per predictor, or one vmapped pass of all (same numbers;
    # no consistent gain on a CPU; may help on an accelerator, where K small launches cost more than the work).
    nll_pass: Literal["batched", "sequential"] = "sequential"
    # Not exact (None = Algorithm 1): L1 from the NLL matrix of this many random rows of each batch, an
    # unbiased estimate of it at actor_rows / batch_size of the cost; L2 and L3 still use the whole batch.
    actor_rows: int | None = Field(None, ge=1)
    save_every: int = Field(500, ge=1)             # batches between resumable checkpoints when fit has an out_dir
    max_len: int = Field(512, ge=1)
    bf16: bool = False
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _trains_something(self) -> HeTLMConfig:
        if self.assignment == "likelihood" and self.critic_warmup_epochs < 1:
            raise ValueError("assignment='likelihood' needs critic_warmup_epochs >= 1: predictors that are still "
                             "identical copies give every user to the first one")
        if self.epochs + self.critic_warmup_epochs < 1:
            raise ValueError("epochs + critic_warmup_epochs must be 1 or more: nothing would be trained")
        return self


@dataclass
class HeTLMHistory:
    """Everything plotted in the report: losses per step, validation per eval, cluster sizes per epoch.
    Plain JSON types (cluster ids as string keys), so a resumed history equals an uninterrupted one."""

    steps: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    cluster_sizes: list[dict] = field(default_factory=list)
    retired: list[dict] = field(default_factory=list)


def actor_loss(pi: torch.Tensor, nll: torch.Tensor, z: torch.Tensor, alpha: float, beta: float,
               l3: str = "scaled", tau: float = 1.0, rows: torch.Tensor | None = None, l1: str = "paper",
               l2_balance: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L_A = L1 + alpha L2 + beta L3 over the active clusters (columns of pi with any mass).
    nll holds the NLL of every row of pi, or only of `rows` (then L1 is their mean)."""
    active = pi.sum(0) > 0
    p, l = pi[:, active], nll[:, active]
    if l1 == "centered":
        l = l - l.mean(0, keepdim=True)
    elif l1 != "paper":
        raise ValueError(f"l1 must be 'paper' or 'centered', not {l1!r}")
    l1 = ((p if rows is None else p[rows]) * l).sum(1).mean()
    l2 = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
    if l2_balance:
        marginal = p.mean(0)
        l2 = l2 + l2_balance * (marginal * torch.log(marginal.clamp_min(1e-12))).sum()
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


@dataclass
class _Run:
    """Everything Algorithm 1 updates; `state` is plain data (state.json of a checkpoint)."""

    selector: Selector
    models: dict[int, PreTrainedModel]
    optimizers: dict[int, torch.optim.Optimizer]
    actor_opt: torch.optim.Optimizer
    state: dict
    pending: dict[int, int] = field(default_factory=dict)  # samples in each predictor's accumulated gradient


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """out_dir/checkpoint, or the `.old` twin a crash between the two renames leaves; a `.tmp` is never complete."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (Path(out_dir) / name / STATE_FILE).exists():
            return Path(out_dir) / name
    return None


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
            progress: bool = True, out_dir: str | Path | None = None, resume: bool = False) -> ClusterwiseLM:
        """Algorithm 1. With out_dir, checkpoints go to out_dir/checkpoint; resume=True continues from the
        latest one (or starts afresh when there is none)."""
        c = self.config
        self.dist = init_distributed()  # under torchrun: this rank trains the predictors it owns
        device = resolve_device(c.device)
        train_set = SequenceDataset.from_samples(train, c.max_len)
        val_set = SequenceDataset.from_samples(val, c.max_len) if val is not None and val.height else None
        z = torch.as_tensor(z_train, dtype=torch.float32)
        zv = torch.as_tensor(z_val, dtype=torch.float32) if val_set is not None else None
        out_dir = Path(out_dir) if out_dir is not None else None
        checkpoint = latest_checkpoint(out_dir) if resume and out_dir is not None else None
        run = self._resume(checkpoint, base_model, device) if checkpoint else self._start(base_model, z_train, device)
        s = run.state
        self.tau, self.pretrain_agreement = s["tau"], s["pretrain_agreement"]
        kmeans_assigned = torch.as_tensor(s["kmeans_labels"])

        n_batches = math.ceil(len(train_set) / c.batch_size)
        total_epochs = c.critic_warmup_epochs + c.epochs
        started = time.perf_counter() - s["seconds"]
        bar = progress_bar(TextColumn("[bold]HeTLM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), disable=not (progress and self.dist.is_main))
        with bar:
            task = bar.add_task("hetlm", total=total_epochs * n_batches, info="",
                                completed=s["epoch"] * n_batches + s["position"])
            while s["epoch"] < total_epochs:
                warmup = s["epoch"] < c.critic_warmup_epochs
                epoch = s["epoch"] - c.critic_warmup_epochs  # actor-critic epoch
                # One seeded order per epoch, so a resumed run sees the same batches.
                batches = length_bucketed_batches(train_set.lengths, c.batch_size, 50,
                                                  np.random.default_rng([c.seed, s["epoch"]]))
                for batch in batches[s["position"]:]:
                    key = (s["epoch"], s["position"])
                    if warmup:  # each predictor on its k-means cluster
                        self._critic_step(run, train_set, batch, kmeans_assigned[batch], device, key)
                    else:
                        parts = self._actor_critic_step(run, train_set, z, batch, device, key)
                        s["step"] += 1
                        self.history.steps.append({"step": s["step"], "epoch": epoch, **parts})
                        if val_set is not None and s["step"] % c.eval_every == 0:
                            self._validate(run, val_set, zv)
                    s["position"] += 1
                    if out_dir is not None and s["position"] < len(batches) and \
                            (s["epoch"] * n_batches + s["position"]) % c.save_every == 0:
                        self._save(run, out_dir / CHECKPOINT, started)
                    status = "warm-up" if warmup else f"LA {parts['LA']:.3f} K={len(run.selector.active_clusters)}"
                    bar.update(task, advance=1, info=status)
                if not warmup:
                    if val_set is not None:
                        self._validate(run, val_set, zv)
                    self._retire_empty(run, train_set, z_train, epoch + 1)
                s["epoch"], s["position"] = s["epoch"] + 1, 0
                if out_dir is not None:
                    self._save(run, out_dir / CHECKPOINT, started)

        selector, models = run.selector, self._collect_predictors(run, base_model, device)
        selector.net.eval()
        for m in models.values():
            m.eval()
        final = self._assign(run, train_set, z_train)
        sizes = {k: int((final == k).sum()) for k in models}
        info = {"config": c.model_dump(), "tau": self.tau, "selector_pretrain_agreement": self.pretrain_agreement,
                "initial_k": c.n_clusters, "final_k": len(models), "seconds": time.perf_counter() - started,
                "history": asdict(self.history)}
        self.result_ = ClusterwiseLM("hetlm", models, centroids_of(z_train, final, c.n_clusters), selector=selector,
                                     routing="likelihood" if c.assignment == "likelihood" else "selector",
                                     encoder=encoder or {}, sizes=sizes, info=info)
        if out_dir is not None and self.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "hetlm_history.json").write_text(json.dumps(asdict(self.history)))
        return self.result_

    def _collect_predictors(self, run: _Run, base_model: PreTrainedModel, device) -> dict[int, PreTrainedModel]:
        """Every active predictor on every rank, each from the rank that trained it (a no-op in one process)."""
        if self.dist.world_size == 1:
            return run.models
        models = {}
        for k in run.selector.active_clusters:
            models[k] = run.models.get(k) or copy.deepcopy(base_model).to(device)
            broadcast_module(models[k], src=k % self.dist.world_size)
        return models

    # ------------------------------------------------------------ set-up and checkpoints

    def _optimizers(self, selector: Selector, models: dict[int, PreTrainedModel], state: dict) -> _Run:
        c = self.config
        critic_cfg = self._critic_config()
        selector.net.train()
        actor_opt = torch.optim.AdamW(selector.net.parameters(), lr=c.selector_lr, weight_decay=c.selector_weight_decay)
        return _Run(selector, models, {k: make_optimizer(m, critic_cfg) for k, m in models.items()}, actor_opt, state)

    def _start(self, base_model: PreTrainedModel, z_train: np.ndarray, device: torch.device) -> _Run:
        """Steps 1-3: k-means on z, the selector pre-trained on its labels, predictors copied from the base LM."""
        c = self.config
        torch.manual_seed(c.seed)
        labels, km_centroids = kmeans_labels(z_train, c.n_clusters, c.seed)
        selector = Selector(c.n_clusters, hidden=c.selector_hidden, lr=c.selector_pretrain_lr,
                            weight_decay=c.selector_weight_decay, epochs=c.selector_pretrain_epochs,
                            label_smoothing=c.selector_label_smoothing, seed=c.seed,
                            stop_at_agreement=c.selector_pretrain_agreement).fit(z_train, labels)
        state = {"epoch": 0, "position": 0, "step": 0, "seconds": 0.0,
                 "tau": c.l3_tau or float(torch.pdist(torch.as_tensor(km_centroids), p=1).mean()),
                 "pretrain_agreement": float((selector.predict(z_train) == labels).mean()),
                 "kmeans_labels": labels.tolist(), "config": c.model_dump()}
        broadcast_module(selector.net)  # same seed, same fit on every rank; this makes sure
        models = {k: copy.deepcopy(base_model).to(device).train() for k in owned_clusters(c.n_clusters, self.dist)}
        self.history = HeTLMHistory()
        self._record_sizes(selector.predict(z_train), selector.active_clusters, epoch=0)
        return self._optimizers(selector, models, state)

    def _save(self, run: _Run, path: Path, started: float) -> None:
        """Every rank writes its own predictors and their optimizer states into one folder; rank 0 adds the
        selector, the actor's optimizer and state.json, then swaps the folder in (one process: the same)."""
        run.state["seconds"] = time.perf_counter() - started
        tmp, rank = path.with_name(path.name + ".tmp"), self.dist.rank
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for k, model in run.models.items():
            # safetensors directly: transformers' save_pretrained writes on rank 0 only under torch.distributed
            (tmp / f"cluster_{k}").mkdir()
            save_weights(model, tmp / f"cluster_{k}" / "model.safetensors")
        # with critic_balance="accumulate": the gradients a predictor has gathered and not stepped on yet
        pending = {k: {"samples": n, "grads": [p.grad for p in run.models[k].parameters()]}
                   for k, n in run.pending.items() if n}
        torch.save({"critic": {k: opt.state_dict() for k, opt in run.optimizers.items()}, "rng": rng_state(),
                    "pending": pending}, tmp / CRITIC_STATE.format(rank=rank))
        barrier()
        if self.dist.is_main:
            run.selector.save_pretrained(tmp / "selector")
            torch.save({"actor": run.actor_opt.state_dict()}, tmp / TRAINER_STATE)
            state = {**run.state, "active": run.selector.active_clusters, "world_size": self.dist.world_size,
                     "history": asdict(self.history)}
            (tmp / STATE_FILE).write_text(json.dumps(state))
            swap_in(tmp, path)
        barrier()  # nobody reads a checkpoint before it is complete

    def _resume(self, path: Path, base_model: PreTrainedModel, device: torch.device) -> _Run:
        """The run saved in `path`, by any number of processes: each rank loads the predictors it owns now.
        Safetensors for the weights; the .pt files hold only tensors and plain types."""
        state = json.loads((path / STATE_FILE).read_text())
        if state["config"] != json.loads(json.dumps(self.config.model_dump())):
            log.warning("resuming %s with a different HeTLMConfig than it was started with", path)
        selector = Selector.from_pretrained(path / "selector")
        owned = set(owned_clusters(self.config.n_clusters, self.dist))
        models = {}
        for k in (k for k in state.pop("active") if k in owned):
            models[k] = copy.deepcopy(base_model).to(device).train()
            load_model(models[k], path / f"cluster_{k}" / "model.safetensors", device=str(device))
        self.history = HeTLMHistory(**state.pop("history"))
        run = self._optimizers(selector, models, state)
        saved = [torch.load(path / CRITIC_STATE.format(rank=r), map_location="cpu", weights_only=True)
                 for r in range(state.pop("world_size"))]
        critic = {k: opt for part in saved for k, opt in part["critic"].items()}
        for k, opt in run.optimizers.items():
            opt.load_state_dict(critic[k])
        for k, part in ((k, part) for saved_rank in saved for k, part in saved_rank.get("pending", {}).items()):
            if k in run.models:
                run.pending[k] = part["samples"]
                for p, grad in zip(run.models[k].parameters(), part["grads"]):
                    p.grad = None if grad is None else grad.to(p.device)
        run.actor_opt.load_state_dict(torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)["actor"])
        # last: loading the selector re-seeds torch. Dropout is re-seeded every step (`_seed`), so a run resumed
        # on another number of processes still follows the same path.
        set_rng_state(saved[min(self.dist.rank, len(saved) - 1)]["rng"])
        log.info("resumed %s at step %d (epoch %d)", path, state["step"], state["epoch"])
        return run

    # ------------------------------------------------------------ one batch

    def _seed(self, key: tuple[int, int], stream: int) -> None:
        """Dropout and row draws seeded by (epoch, batch, stream), stream 0 the selector and k + 1 predictor k:
        the same numbers whichever process runs which predictor."""
        torch.manual_seed(int(np.random.SeedSequence([self.config.seed, *key, stream]).generate_state(1)[0]))

    def _actor_critic_step(self, run: _Run, dataset: SequenceDataset, z: torch.Tensor, batch: list[int],
                           device: torch.device, key: tuple[int, int]) -> dict:
        c, net = self.config, run.selector.net
        self._seed(key, 0)
        pi = net(z[batch])
        if c.assignment == "likelihood":
            assigned = likelihood_assignment(run.models, dataset, run.selector.active_clusters, c.n_clusters, batch,
                                             c.bf16, batch_size=len(batch))
            critic = self._critic_step(run, dataset, batch, assigned, device, key)
            # the actor learns the assignment, so that the model can also route by embedding
            loss = torch.nn.functional.cross_entropy(torch.log(pi.clamp_min(1e-12)), assigned)
            parts = {"LA": loss.item()}
        else:
            with torch.no_grad():  # the routing argmax without dropout, as at inference
                net.eval()
                assigned = net(z[batch]).argmax(1)
                net.train()
            rows = None if c.actor_rows is None or c.actor_rows >= len(batch) else torch.randperm(len(batch))[:c.actor_rows]
            scored = batch if rows is None else [batch[i] for i in rows.tolist()]

            def l1_nll():
                return nll_matrix(run.models, dataset, scored, c.n_clusters, c.bf16, c.nll_pass == "batched",
                                  c.l1_tokens, c.l1_reduce)

            nll = l1_nll() if c.l1_nll == "before_critic" else None
            critic = self._critic_step(run, dataset, batch, assigned, device, key)
            nll = l1_nll() if nll is None else nll
            loss, parts = actor_loss(pi, nll, z[batch], c.alpha, c.beta, c.l3, self.tau, rows, c.l1, c.l2_balance)
        if self.dist.world_size > 1:  # every predictor's loss in the history, whichever rank trained it
            critic = dict(sorted(((k, v) for part in gather_objects(critic) for k, v in part.items()),
                                 key=lambda kv: int(kv[0])))
        run.actor_opt.zero_grad()
        loss.backward()
        run.actor_opt.step()
        return {**parts, "critic": critic}

    def _critic_step(self, run: _Run, dataset: SequenceDataset, batch: list[int], assigned: torch.Tensor,
                     device: torch.device, key: tuple[int, int]) -> dict[str, float]:
        """An NLL gradient of each (of this rank's) predictors on the batch samples assigned to it, and a step
        as `critic_balance` says."""
        c, losses = self.config, {}
        for k in assigned.unique().tolist():
            if k not in run.models:  # another rank's predictor
                continue
            self._seed(key, k + 1)
            idx = [batch[i] for i in torch.nonzero(assigned == k).flatten().tolist()]
            ids, mask = (t.to(device) for t in pad_sequences([dataset[i] for i in idx]))
            model, optimizer = run.models[k], run.optimizers[k]
            with autocast(device, c.bf16):
                loss = token_nll(model, ids, mask).sum() / mask[:, 1:].sum()
            share = len(idx) / c.batch_size
            # accumulate: the mean of the accumulated chunks' losses, each weighted by its samples
            (loss * share if c.critic_balance == "accumulate" else loss).backward()
            run.pending[k] = run.pending.get(k, 0) + len(idx)
            if c.critic_balance != "accumulate" or run.pending[k] >= c.batch_size:
                for group in optimizer.param_groups:
                    group["lr"] = c.predictor_lr * (min(1.0, share) if c.critic_balance == "share" else 1.0)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.pending[k] = 0
            losses[str(k)] = loss.item()
        return losses

    # ------------------------------------------------------------ per evaluation, per epoch

    @torch.no_grad()
    def _validate(self, run: _Run, val_set: SequenceDataset, zv: torch.Tensor) -> None:
        """Selector loss L_A and each predictor's NLL of the next session (target tokens, per token: what
        generation is judged on) on the validation users routed to it."""
        c, net = self.config, run.selector.net
        net.eval()
        pi = net(zv)
        k_all, batched = pi.shape[1], c.nll_pass == "batched"
        batches = sorted_batches(val_set.lengths, 64)  # length-sorted: little padding

        def matrix(tokens: str, reduce: str) -> torch.Tensor:
            out = torch.zeros(len(val_set), k_all)
            for batch in batches:
                out[batch] = nll_matrix(run.models, val_set, batch, k_all, c.bf16, batched, tokens, reduce)
            return out

        nll = matrix("target", "mean")
        if c.assignment == "likelihood":
            routed = likelihood_assignment(run.models, val_set, run.selector.active_clusters, k_all, bf16=c.bf16)
            parts = {"LA": float(torch.nn.functional.cross_entropy(torch.log(pi.clamp_min(1e-12)), routed))}
        else:
            l1 = nll if (c.l1_tokens, c.l1_reduce) == ("target", "mean") else matrix(c.l1_tokens, c.l1_reduce)
            _, parts = actor_loss(pi, l1, zv, c.alpha, c.beta, c.l3, self.tau, l1=c.l1, l2_balance=c.l2_balance)
            routed = pi.argmax(1)
        per_cluster = {str(k): float(nll[routed == k, k].mean()) for k in run.selector.active_clusters
                       if (routed == k).any()}
        combined = float(nll[torch.arange(len(routed)), routed].mean())
        self.history.val.append({"step": run.state["step"], **{f"selector_{k}": v for k, v in parts.items()},
                                 "predictor": per_cluster, "combined_nll": combined})
        net.train()

    def _assign(self, run: _Run, train_set: SequenceDataset, z_train: np.ndarray) -> np.ndarray:
        """Each training sample's cluster now: the selector's argmax (without dropout) or, with
        assignment="likelihood", the predictor that best predicts its history."""
        if self.config.assignment == "likelihood":
            return likelihood_assignment(run.models, train_set, run.selector.active_clusters, self.config.n_clusters,
                                         bf16=self.config.bf16).numpy()
        mode = run.selector.net.training
        run.selector.net.eval()
        assigned = run.selector.predict(z_train)
        run.selector.net.train(mode)
        return assigned

    def _record_sizes(self, assigned: np.ndarray, active: list[int], epoch: int) -> None:
        self.history.cluster_sizes.append({"epoch": epoch, "sizes": {str(k): int((assigned == k).sum()) for k in active}})

    def _retire_empty(self, run: _Run, train_set: SequenceDataset, z_train: np.ndarray, epoch: int) -> None:
        """Endogenous K: a cluster no training sample is assigned to is retired with its predictor."""
        assigned = self._assign(run, train_set, z_train)
        self._record_sizes(assigned, run.selector.active_clusters, epoch)
        empty = [k for k in run.selector.active_clusters if not (assigned == k).any()]
        if empty and len(empty) < len(run.selector.active_clusters):
            run.selector.retire(empty)
            for k in set(empty) & set(run.models):
                del run.models[k], run.optimizers[k]
                run.pending.pop(k, None)
            self.history.retired.append({"epoch": epoch, "clusters": empty})
