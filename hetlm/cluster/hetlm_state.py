"""What a HeTLM fit updates (`HeTLMRun`): how it starts, what it records (`HeTLMHistory`), its resumable
checkpoints.

With an `out_dir`, `HeTLM.fit` writes out_dir/checkpoint/ (atomically) every `save_every` batches and at each
epoch end; `HeTLM(..., resume=True).fit(...)` continues from it to the same result as an uninterrupted run:
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
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model
from safetensors.torch import save_model as save_weights
from transformers import PreTrainedModel

from ..checkpoint import rng_state, set_rng_state, swap_in
from ..distributed import DistInfo, barrier, broadcast_module, owned_clusters
from ..train import TrainConfig, make_optimizer
from .kmeans import kmeans_labels
from .selector import Selector

log = logging.getLogger(__name__)

CHECKPOINT, STATE_FILE, TRAINER_STATE = "checkpoint", "state.json", "trainer_state.pt"
CRITIC_STATE = "critic_state.rank{rank}.pt"  # the optimizer and RNG states of one process's predictors


@dataclass
class HeTLMHistory:
    """Everything plotted in the report: losses per step, validation per eval, cluster sizes per epoch.
    Plain JSON types (cluster ids as string keys), so a resumed history equals an uninterrupted one."""

    steps: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    cluster_sizes: list[dict] = field(default_factory=list)
    retired: list[dict] = field(default_factory=list)

    def record_sizes(self, assigned: np.ndarray, active: list[int], epoch: int) -> None:
        self.cluster_sizes.append({"epoch": epoch, "sizes": {str(k): int((assigned == k).sum()) for k in active}})


@dataclass
class HeTLMRun:
    """Everything Algorithm 1 updates; `state` is plain data (state.json of a checkpoint)."""

    selector: Selector
    models: dict[int, PreTrainedModel]     # the predictors this process trains
    optimizers: dict[int, torch.optim.Optimizer]
    actor_opt: torch.optim.Optimizer
    state: dict
    history: HeTLMHistory
    pending: dict[int, int] = field(default_factory=dict)  # samples in each predictor's accumulated gradient


def new_run(config, selector: Selector, models: dict[int, PreTrainedModel], state: dict,
            history: HeTLMHistory) -> HeTLMRun:
    """The run of `config` (a HeTLMConfig) with fresh optimizers for the actor and the predictors."""
    c = config
    critic = TrainConfig(lr=c.predictor_lr, weight_decay=c.predictor_weight_decay, batch_size=c.batch_size)
    selector.net.train()
    actor_opt = torch.optim.AdamW(selector.net.parameters(), lr=c.selector_lr, weight_decay=c.selector_weight_decay)
    return HeTLMRun(selector, models, {k: make_optimizer(m, critic) for k, m in models.items()}, actor_opt, state,
                    history)


def start_run(config, base_model: PreTrainedModel, z_train: np.ndarray, device: torch.device,
              dist: DistInfo) -> HeTLMRun:
    """Algorithm 1's steps 1-3 for `config` (a HeTLMConfig): k-means on z, the selector pre-trained on its
    labels, the predictors this process owns copied from the base LM."""
    c = config
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
    models = {k: copy.deepcopy(base_model).to(device).train() for k in owned_clusters(c.n_clusters, dist)}
    history = HeTLMHistory()
    history.record_sizes(selector.predict(z_train), selector.active_clusters, epoch=0)
    return new_run(c, selector, models, state, history)


def collect_predictors(run: HeTLMRun, base_model: PreTrainedModel, device: torch.device,
                       dist: DistInfo) -> dict[int, PreTrainedModel]:
    """Every active predictor on every rank, each from the rank that trained it (a no-op in one process)."""
    if dist.world_size == 1:
        return run.models
    models = {}
    for k in run.selector.active_clusters:
        models[k] = run.models.get(k) or copy.deepcopy(base_model).to(device)
        broadcast_module(models[k], src=k % dist.world_size)
    return models


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """out_dir/checkpoint, or the `.old` twin a crash between the two renames leaves; a `.tmp` is never complete."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (Path(out_dir) / name / STATE_FILE).exists():
            return Path(out_dir) / name
    return None


def save_checkpoint(run: HeTLMRun, path: Path, dist: DistInfo) -> None:
    """Every rank writes its own predictors and their optimizer states into one folder; rank 0 adds the
    selector, the actor's optimizer and state.json, then swaps the folder in (one process: the same)."""
    tmp = path.with_name(path.name + ".tmp")
    if dist.is_main:
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
                "pending": pending}, tmp / CRITIC_STATE.format(rank=dist.rank))
    barrier()
    if dist.is_main:
        run.selector.save_pretrained(tmp / "selector")
        torch.save({"actor": run.actor_opt.state_dict()}, tmp / TRAINER_STATE)
        state = {**run.state, "active": run.selector.active_clusters, "world_size": dist.world_size,
                 "history": asdict(run.history)}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        swap_in(tmp, path)
    barrier()  # nobody reads a checkpoint before it is complete


def load_checkpoint(path: Path, config, base_model: PreTrainedModel, device: torch.device,
                    dist: DistInfo) -> HeTLMRun:
    """The run of `config` saved in `path`, by any number of processes: each rank loads the predictors it owns
    now. Safetensors for the weights; the .pt files hold only tensors and plain types."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["config"] != json.loads(json.dumps(config.model_dump())):
        log.warning("resuming %s with a different HeTLMConfig than it was started with", path)
    selector = Selector.from_pretrained(path / "selector")
    owned = set(owned_clusters(config.n_clusters, dist))
    models = {}
    for k in (k for k in state.pop("active") if k in owned):
        models[k] = copy.deepcopy(base_model).to(device).train()
        load_model(models[k], path / f"cluster_{k}" / "model.safetensors", device=str(device))
    run = new_run(config, selector, models, state, HeTLMHistory(**state.pop("history")))
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
    # last: loading the selector re-seeds torch. Dropout is re-seeded every step (`HeTLM._seed`), so a run
    # resumed on another number of processes still follows the same path.
    set_rng_state(saved[min(dist.rank, len(saved) - 1)]["rng"])
    log.info("resumed %s at step %d (epoch %d)", path, state["step"], state["epoch"])
    return run
