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

Resume and checkpoints: hetlm_state.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
)
from transformers import PreTrainedModel

from ..data import SequenceDataset, length_bucketed_batches, pad_sequences, sorted_batches
from ..distributed import gather_objects, init_distributed
from ..nll import autocast, token_nll
from ..progress import Estimate, progress_bar
from ..train import resolve_device
from .base import ClusterwiseLM, centroids_of
from .estimator import ClusterwiseEstimator
from .hetlm_state import (
    CHECKPOINT,
    HeTLMRun,
    collect_predictors,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    start_run,
)
from .likelihood import likelihood_assignment, nll_matrix


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
    save_every: int = Field(500, ge=1)             # batches between resumable checkpoints when the HeTLM has an out_dir
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


class HeTLM(ClusterwiseEstimator):
    """Endogenous clusterwise LMs, an estimator in scikit-learn's manner: the settings in the constructor, the
    data in `fit`, which runs Algorithm 1 and returns self with the fitted attributes

        model_          the trained ClusterwiseLM (kind "hetlm"; `save_pretrained`, `route`)
        history_        HeTLMHistory: losses per step, validation per evaluation, cluster sizes per epoch
        labels_         each training sample's final cluster
        n_clusters_     the final K, after empty clusters were retired
        tau_, pretrain_agreement_   the L3 temperature used, the pre-trained selector's agreement with k-means

    `out_dir` (checkpoint/ and hetlm_history.json) and `resume` are constructor settings, as scikit-learn's
    `warm_start` and `verbose` are: how a fit runs, not what it is fitted on, so that a resumed fit is the same
    call on the same data.
    """

    def __init__(self, config: HeTLMConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = True, set_decoder: bool = True):
        self.config = config or HeTLMConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume      # continue from the latest checkpoint in out_dir (or start afresh if none)
        self.progress = progress
        self.set_decoder = set_decoder  # save_pretrained fits the set decoder on the validation users

    def fit(self, base_model: PreTrainedModel, train: pl.DataFrame, z_train: np.ndarray,
            val: pl.DataFrame | None = None, z_val: np.ndarray | None = None, encoder: dict | None = None) -> HeTLM:
        """Algorithm 1 from `base_model` (each predictor starts as a copy of it) on the training samples and
        their users' embeddings z_train (validated on val, z_val); `encoder`: the settings of the encoder that
        made z, recorded in the model for routing new users."""
        c = self.config
        self._dist = init_distributed()  # under torchrun: this rank trains the predictors it owns
        device = resolve_device(c.device)
        train_set = SequenceDataset.from_samples(train, c.max_len)
        val_set = SequenceDataset.from_samples(val, c.max_len) if val is not None and val.height else None
        zv = torch.as_tensor(z_val, dtype=torch.float32) if val_set is not None else None
        checkpoint = latest_checkpoint(self.out_dir) if self.resume and self.out_dir is not None else None
        run = (load_checkpoint(checkpoint, c, base_model, device, self._dist) if checkpoint
               else start_run(c, base_model, z_train, device, self._dist))
        started = time.perf_counter() - run.state["seconds"]
        self._train(run, train_set, z_train, val_set, zv, device, started)

        selector, models = run.selector, collect_predictors(run, base_model, device, self._dist)
        selector.net.eval()
        for m in models.values():
            m.eval()
        self.labels_ = self._assign(run, train_set, z_train)
        self.history_, self.n_clusters_ = run.history, len(models)
        self.tau_, self.pretrain_agreement_ = run.state["tau"], run.state["pretrain_agreement"]
        info = {"config": c.model_dump(), "tau": self.tau_, "selector_pretrain_agreement": self.pretrain_agreement_,
                "initial_k": c.n_clusters, "final_k": self.n_clusters_, "seconds": time.perf_counter() - started,
                "history": asdict(self.history_)}
        routing = "likelihood" if c.assignment == "likelihood" else "selector"
        self.model_ = ClusterwiseLM("hetlm", models, centroids_of(z_train, self.labels_, c.n_clusters),
                                    selector=selector, routing=routing, encoder=encoder or {},
                                    sizes={k: int((self.labels_ == k).sum()) for k in models}, info=info)
        if self.out_dir is not None and self._dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "hetlm_history.json").write_text(json.dumps(asdict(self.history_)))
        self._keep_validation(val, z_val)
        return self

    def _train(self, run: HeTLMRun, train_set: SequenceDataset, z_train: np.ndarray, val_set: SequenceDataset | None,
               zv: torch.Tensor | None, device: torch.device, started: float) -> None:
        """The critic warm-up and actor-critic epochs, from wherever `run` stands."""
        c, s = self.config, run.state
        z, kmeans_assigned = torch.as_tensor(z_train, dtype=torch.float32), torch.as_tensor(s["kmeans_labels"])
        n_batches = math.ceil(len(train_set) / c.batch_size)
        total_epochs = c.critic_warmup_epochs + c.epochs
        bar = progress_bar(TextColumn("[bold]HeTLM"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                           TimeElapsedColumn(), disable=not (self.progress and self._dist.is_main))
        done = s["epoch"] * n_batches + s["position"]
        estimate = Estimate("HeTLM", total_epochs * n_batches, "batches", done, "validation and the end-of-epoch "
                            "reassignment add to it", show=self.progress and self._dist.is_main)
        with bar:
            task = bar.add_task("hetlm", total=total_epochs * n_batches, info="", completed=done)
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
                        run.history.steps.append({"step": s["step"], "epoch": epoch, **parts})
                        if val_set is not None and s["step"] % c.eval_every == 0:
                            self._validate(run, val_set, zv)
                    s["position"] += 1
                    if s["position"] < len(batches) and (s["epoch"] * n_batches + s["position"]) % c.save_every == 0:
                        self._checkpoint(run, started)
                    status = "warm-up" if warmup else f"LA {parts['LA']:.3f} K={len(run.selector.active_clusters)}"
                    bar.update(task, advance=1, info=status)
                    estimate.update(s["epoch"] * n_batches + s["position"])
                if not warmup:
                    if val_set is not None:
                        self._validate(run, val_set, zv)
                    self._retire_empty(run, train_set, z_train, epoch + 1)
                s["epoch"], s["position"] = s["epoch"] + 1, 0
                self._checkpoint(run, started)

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, run: HeTLMRun, started: float) -> None:
        """A resumable checkpoint in out_dir/checkpoint (none without an out_dir)."""
        if self.out_dir is not None:
            run.state["seconds"] = time.perf_counter() - started
            save_checkpoint(run, self.out_dir / CHECKPOINT, self._dist)


    # ------------------------------------------------------------ one batch

    def _seed(self, key: tuple[int, int], stream: int) -> None:
        """Dropout and row draws seeded by (epoch, batch, stream), stream 0 the selector and k + 1 predictor k:
        the same numbers whichever process runs which predictor."""
        torch.manual_seed(int(np.random.SeedSequence([self.config.seed, *key, stream]).generate_state(1)[0]))

    def _actor_critic_step(self, run: HeTLMRun, dataset: SequenceDataset, z: torch.Tensor, batch: list[int],
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
            loss, parts = actor_loss(pi, nll, z[batch], c.alpha, c.beta, c.l3, run.state["tau"], rows, c.l1, c.l2_balance)
        if self._dist.world_size > 1:  # every predictor's loss in the history, whichever rank trained it
            critic = dict(sorted(((k, v) for part in gather_objects(critic) for k, v in part.items()),
                                 key=lambda kv: int(kv[0])))
        run.actor_opt.zero_grad()
        loss.backward()
        run.actor_opt.step()
        return {**parts, "critic": critic}

    def _critic_step(self, run: HeTLMRun, dataset: SequenceDataset, batch: list[int], assigned: torch.Tensor,
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
    def _validate(self, run: HeTLMRun, val_set: SequenceDataset, zv: torch.Tensor) -> None:
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
            _, parts = actor_loss(pi, l1, zv, c.alpha, c.beta, c.l3, run.state["tau"], l1=c.l1, l2_balance=c.l2_balance)
            routed = pi.argmax(1)
        per_cluster = {str(k): float(nll[routed == k, k].mean()) for k in run.selector.active_clusters
                       if (routed == k).any()}
        combined = float(nll[torch.arange(len(routed)), routed].mean())
        run.history.val.append({"step": run.state["step"], **{f"selector_{k}": v for k, v in parts.items()},
                                 "predictor": per_cluster, "combined_nll": combined})
        net.train()

    def _assign(self, run: HeTLMRun, train_set: SequenceDataset, z_train: np.ndarray) -> np.ndarray:
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

    def _retire_empty(self, run: HeTLMRun, train_set: SequenceDataset, z_train: np.ndarray, epoch: int) -> None:
        """Endogenous K: a cluster no training sample is assigned to is retired with its predictor."""
        assigned = self._assign(run, train_set, z_train)
        run.history.record_sizes(assigned, run.selector.active_clusters, epoch)
        empty = [k for k in run.selector.active_clusters if not (assigned == k).any()]
        if empty and len(empty) < len(run.selector.active_clusters):
            run.selector.retire(empty)
            for k in set(empty) & set(run.models):
                del run.models[k], run.optimizers[k]
                run.pending.pop(k, None)
            run.history.retired.append({"epoch": epoch, "clusters": empty})
