"""Multi-process training (torchrun + DDP, gloo on the CPU) against one process on the same global batches."""

import json
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.train import (
    all_reduce_mean,
    broadcast_module,
    dist_info,
    gather_columns,
    init_distributed,
    owned_clusters,
)

# Global batch 16 x grad_accum 2 = 32 samples per step, each process taking every other sample of each batch.
TRAIN_ARGS = ["--preset", "tiny", "--max-steps", "6", "--batch-size", "16", "--grad-accum", "2", "--eval-every", "3",
              "--epochs", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def sliced(taobao_prepared, tmp_path_factory):
    """The first 200 training and 40 validation samples of the shipped Taobao sample."""
    prepared, _ = taobao_prepared
    out = tmp_path_factory.mktemp("taobao_slice")
    pl.read_parquet(prepared / "train.parquet").head(200).write_parquet(out / "train.parquet")
    pl.read_parquet(prepared / "val.parquet").head(40).write_parquet(out / "val.parquet")
    shutil.copytree(prepared / "tokenizer", out / "tokenizer")
    return out


def one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def test_two_processes_train_like_one(sliced, tmp_path):
    # --processes 2 re-runs the command as `python -m torch.distributed.run --nproc_per_node=2 -m hetlm.cli ...`
    # (what .venv/bin/torchrun runs): two gloo ranks on this CPU.
    two = subprocess.run([sys.executable, "-m", "hetlm.cli", "train", str(sliced), "--out", str(tmp_path / "two"),
                          *TRAIN_ARGS, "--processes", "2"],
                         env=one_thread_env(), capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("6 steps, best val loss") == 1  # only rank 0 reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(app, ["train", str(sliced), "--out", str(tmp_path / "one"), *TRAIN_ARGS])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output

    runs = {name: json.loads((tmp_path / name / "history.json").read_text()) for name in ("one", "two")}
    # Same samples, same weights: only the float32 summation order differs (each rank sums its half of the
    # step's NLL, then the all-reduce adds the halves), a relative error near 1e-7 per step that AdamW
    # carries forward; 1e-5 leaves room for that and none for a wrong shard, weight or batch.
    losses = {name: [e["loss"] for e in run["train"]] for name, run in runs.items()}
    assert len(losses["two"]) == 6 and losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["one"][-1] < losses["one"][0]
    val = {name: [e["val_loss"] for e in run["val"]] for name, run in runs.items()}
    assert len(val["two"]) == 2 and val["two"] == pytest.approx(val["one"], rel=1e-5)
    state = torch.load(tmp_path / "two" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == 2  # each rank's RNG, for an exact resume
    assert (tmp_path / "two" / "best" / "tokenizer.json").exists()


def _helpers_on_two_ranks(rank: int, init_file: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = init_distributed()  # already joined: just reports
    assert (info.rank, info.world_size, info.is_main) == (rank, 2, rank == 0)
    try:
        # HeTLM: each rank fills the NLL columns of the clusters it owns; every rank gets the whole matrix.
        owned = owned_clusters(5, dist_info())
        nll = torch.full((3, 5), -1.0)
        nll[:, owned] = torch.tensor(owned, dtype=torch.float32) + 10 * torch.arange(3.0)[:, None]
        assert torch.equal(gather_columns(nll, owned), torch.arange(5.0) + 10 * torch.arange(3.0)[:, None])
        assert all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        torch.manual_seed(rank)  # different selectors until broadcast
        selector = torch.nn.Linear(4, 5)
        broadcast_module(selector)
        torch.manual_seed(0)
        assert torch.equal(selector.weight, torch.nn.Linear(4, 5).weight)
    finally:
        dist.destroy_process_group()


def test_distributed_helpers_on_two_ranks(tmp_path):
    # Forked, not spawned: the ranks inherit the imported modules instead of importing transformers again.
    mp.start_processes(_helpers_on_two_ranks, args=(str(tmp_path / "rendezvous"),), nprocs=2, start_method="fork")
