"""Multi-process training (torchrun + DDP, gloo on the CPU) against one process on the same global batches."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from hetlm.cli import app
from hetlm.distributed import (
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
    (out / "summary.json").write_text("{}")  # made by hand: a summary without fingerprints, so nothing to check
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
    assert two.stdout.count("6 steps, best validation next-session NLL") == 1  # only rank 0 reports

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
    assert (tmp_path / "two" / "best" / "tokenizer" / "tokenizer.json").exists()


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


HETLM_FIT = """
import atexit, json, os, sys
import numpy as np, polars as pl, torch
from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
from hetlm.distributed import dist_info
from hetlm.models import build_model
from hetlm.tokenizer import load_tokenizer

data, out = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
checkpoints = sys.argv[4] if len(sys.argv) > 4 else None  # out_dir of fit: checkpoints, and resume from them
# Registered first, so it runs after the hooks fit registers: has the process group been closed by then?
atexit.register(lambda: open(f"{out}.rank{os.environ.get('RANK', '0')}.group_open_at_exit", "w").write(
    str(torch.distributed.is_initialized())))
train, val = (pl.read_parquet(f"{data}/{split}.parquet").head(96) for split in ("train", "val"))
vocab = len(load_tokenizer(f"{data}/tokenizer"))
projection = np.random.default_rng(0).normal(size=(vocab, 16))

def embed(samples):  # the user's pages, randomly projected: a cheap, fixed encoder for this test
    z = np.stack([projection[np.asarray(ids)].mean(0) for ids in samples["input_ids"].to_list()])
    return z / np.linalg.norm(z, axis=1, keepdims=True)

torch.manual_seed(0)
base = build_model("tiny", vocab)
config = HeTLMConfig(n_clusters=3, epochs=epochs, batch_size=16, selector_pretrain_epochs=20, eval_every=4, seed=1)
result = HeTLM(config, checkpoints, resume=checkpoints is not None, progress=False).fit(
    base, train, embed(train), val, embed(val)).model_
info = result.info
weights = {k: float(sum(p.detach().double().sum() for p in m.parameters())) for k, m in result.models.items()}
json.dump({"history": info["history"], "sizes": result.sizes, "weights": weights,
           "selector": float(sum(p.detach().double().sum() for p in result.selector.net.parameters()))},
          open(f"{out}.rank{dist_info().rank}.json", "w"))
"""


ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run_fit(launcher: list[str], script, *args) -> None:
    run = subprocess.run([*launcher, str(script), *map(str, args)], env=one_thread_env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def hetlm_one_process(sliced, tmp_path_factory):
    """The fit script and the result of its 2-epoch run in one process, the reference of the tests below."""
    folder = tmp_path_factory.mktemp("hetlm_fit")
    script = folder / "fit.py"
    script.write_text(HETLM_FIT)
    _run_fit(ONE, script, sliced, folder / "one")
    return script, json.loads((folder / "one.rank0.json").read_text())


def test_hetlm_on_two_processes_fits_like_one(sliced, hetlm_one_process, tmp_path):
    """Predictors spread over two gloo ranks (cluster k on rank k % 2), the selector kept in step: the same
    run as one process. Each NLL column is computed by the same weights on the same batch and the
    all-reduce only adds zeros to it, so the numbers agree to float noise."""
    script, one = hetlm_one_process
    _run_fit(TWO, script, sliced, tmp_path / "two")
    two, two_rank1 = (json.loads((tmp_path / f).read_text()) for f in ("two.rank0.json", "two.rank1.json"))
    steps = {name: [s["LA"] for s in run["history"]["steps"]] for name, run in (("one", one), ("two", two))}
    assert len(steps["one"]) == 12 and steps["two"] == pytest.approx(steps["one"], rel=1e-5)
    # every predictor's critic loss reaches rank 0's history, whichever rank trained it
    assert [sorted(s["critic"]) for s in two["history"]["steps"]] == [sorted(s["critic"]) for s in one["history"]["steps"]]
    assert two["history"]["cluster_sizes"] == one["history"]["cluster_sizes"] and two["sizes"] == one["sizes"]
    assert [v["combined_nll"] for v in two["history"]["val"]] == pytest.approx(
        [v["combined_nll"] for v in one["history"]["val"]], rel=1e-5)
    assert two["weights"] == pytest.approx(one["weights"], rel=1e-5) and two_rank1["weights"] == two["weights"]
    assert two_rank1["selector"] == two["selector"] == pytest.approx(one["selector"], rel=1e-6)
    # The script never closes the group; init_distributed's exit hook does, since exiting with gloo alive can
    # abort the process.
    assert [(tmp_path / f"two.rank{r}.group_open_at_exit").read_text() for r in (0, 1)] == ["False", "False"]


def test_experiment_fits_hetlm_in_two_processes_like_one(sliced, hetlm_one_process, tmp_path):
    """`hetlm experiment` with hetlm.processes = 2 fits HeTLM in 2 processes (torchrun) on the files of its run
    folder: the model it reads back equals the one-process fit of the same data, base LM and embeddings."""
    from hetlm.cluster.hetlm import HeTLMConfig
    from hetlm.experiment import _fit_in_processes
    from hetlm.models import build_model
    from hetlm.runs import RunFolder
    from hetlm.tokenizer import load_tokenizer

    _, one = hetlm_one_process
    run = tmp_path / "run"
    (run / "prepared").mkdir(parents=True)
    # the fit script's data: the first 96 training and validation samples, its projection embeddings, its base
    train, val = (pl.read_parquet(sliced / f"{split}.parquet").head(96) for split in ("train", "val"))
    train.write_parquet(run / "prepared" / "train.parquet")
    val.write_parquet(run / "prepared" / "val.parquet")
    shutil.copytree(sliced / "tokenizer", run / "prepared" / "tokenizer")
    shutil.copy(sliced / "summary.json", run / "prepared" / "summary.json")
    vocab = len(load_tokenizer(sliced / "tokenizer"))
    projection = np.random.default_rng(0).normal(size=(vocab, 16))

    def embed(samples):
        z = np.stack([projection[np.asarray(ids)].mean(0) for ids in samples["input_ids"].to_list()])
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    np.savez(run / "embeddings.npz", train=embed(train), val=embed(val))
    torch.manual_seed(0)
    build_model("tiny", vocab).save_pretrained(run / "models" / "small")
    config = HeTLMConfig(n_clusters=3, epochs=2, batch_size=16, selector_pretrain_epochs=20, eval_every=4, seed=1)
    model = _fit_in_processes(RunFolder(run), "hetlm_two", config, {"name": "projection"}, 2, progress=False)

    history = model.info["history"]
    assert [s["LA"] for s in history["steps"]] == pytest.approx([s["LA"] for s in one["history"]["steps"]], rel=1e-5)
    assert history["cluster_sizes"] == one["history"]["cluster_sizes"]
    assert {str(k): v for k, v in model.sizes.items()} == one["sizes"]
    weights = {str(k): float(sum(p.detach().double().sum() for p in m.parameters())) for k, m in model.models.items()}
    assert weights == pytest.approx(one["weights"], rel=1e-5)
    assert model.encoder == {"name": "projection"} and (run / "models" / "hetlm_two" / "tokenizer").is_dir()
    assert (run / "train" / "hetlm_two" / "checkpoint").is_dir()


def test_hetlm_checkpoint_of_two_processes_resumes_on_two_or_one(sliced, hetlm_one_process, tmp_path):
    """Two ranks each write their predictors (and optimizer states) into one checkpoint after epoch 1; the run
    then resumes to epoch 2 on two processes and, from a copy, on one: both equal a run never stopped."""
    script, straight = hetlm_one_process
    _run_fit(TWO, script, sliced, tmp_path / "first", 1, tmp_path / "run")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert "critic_state.rank0.pt" in saved and "critic_state.rank1.pt" in saved and "selector" in saved
    shutil.copytree(tmp_path / "run", tmp_path / "run_copy")
    _run_fit(TWO, script, sliced, tmp_path / "on_two", 2, tmp_path / "run")
    _run_fit(ONE, script, sliced, tmp_path / "on_one", 2, tmp_path / "run_copy")
    for name in ("on_two", "on_one"):
        resumed = json.loads((tmp_path / f"{name}.rank0.json").read_text())
        assert [s["LA"] for s in resumed["history"]["steps"]] == pytest.approx(
            [s["LA"] for s in straight["history"]["steps"]], rel=1e-5), name
        assert resumed["history"]["cluster_sizes"] == straight["history"]["cluster_sizes"]
        assert resumed["weights"] == pytest.approx(straight["weights"], rel=1e-5)
        assert resumed["selector"] == pytest.approx(straight["selector"], rel=1e-6)


TRAIN_FIT = """
import sys
import polars as pl, torch
from hetlm.models import build_model
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig, train_lm

data, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "resume"
train, val = (pl.read_parquet(f"{data}/{split}.parquet") for split in ("train", "val"))
torch.manual_seed(0)
model = build_model("tiny", len(load_tokenizer(f"{data}/tokenizer")), "opt")  # OPT has dropout: RNG states matter
config = TrainConfig(lr=3e-3, batch_size=16, max_steps=16, eval_every=4, save_every=2, seed=3,
                     early_stopping_patience=None, device="cpu")
train_lm(model, train, val, config, out, resume=resume, progress=False)
"""


def test_two_process_training_resumes_after_sigkill(sliced, tmp_path):
    """torchrun and both ranks SIGKILLed after a checkpoint; two new processes resume to the unbroken run."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_FIT)
    _run_fit(TWO, script, sliced, tmp_path / "straight", "fresh")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*TWO, str(script), str(sliced), str(killed), "fresh"], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint" / "trainer_state.pt").exists():
            assert proc.poll() is None, "training ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
    finally:
        proc.wait()
    saved = next(d for d in (killed / "checkpoint", killed / "checkpoint.old") if (d / "trainer_state.pt").exists())
    step = torch.load(saved / "trainer_state.pt", weights_only=True)["step"]
    assert 0 < step < 16
    _run_fit(TWO, script, sliced, killed, "resume")
    straight, resumed = (json.loads((d / "history.json").read_text()) for d in (tmp_path / "straight", killed))
    assert len(resumed["train"]) == 16
    assert [e["loss"] for e in resumed["train"]] == pytest.approx([e["loss"] for e in straight["train"]], abs=1e-6)
    a, b = (load_file(d / "checkpoint" / "model.safetensors") for d in (tmp_path / "straight", killed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
