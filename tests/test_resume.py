"""Interrupted training resumes to the result of an uninterrupted run (issue 8).

A real training process on a slice of the shipped Taobao sample is SIGKILLed after a checkpoint, a new
process resumes it, and its history and weights must equal those of a run that was never interrupted.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
from hetlm.cluster.hetlm_state import CHECKPOINT, STATE_FILE, latest_checkpoint
from hetlm.models import Preset, build_model
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig, train_lm

from .conftest import REPO

MICRO = Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
N_TRAIN, N_VAL = 96, 8


def _slices(prepared: Path) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray, np.ndarray, int]:
    """The first users of the prepared sample, and a cheap page-bag embedding (a fixed random projection)."""
    train = pl.read_parquet(prepared / "train.parquet").head(N_TRAIN)
    val = pl.read_parquet(prepared / "val.parquet").head(N_VAL)
    vocab = len(load_tokenizer(prepared / "tokenizer"))
    projection = np.random.default_rng(0).normal(size=(vocab, 16))

    def embed(df: pl.DataFrame) -> np.ndarray:
        bags = np.zeros((df.height, vocab))
        for row, ids in enumerate(df["input_ids"].to_list()):
            np.add.at(bags[row], ids, 1.0)
        z = bags @ projection
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)

    return train, val, embed(train), embed(val), vocab


def _micro_opt(vocab: int):
    torch.manual_seed(0)
    return build_model(MICRO, vocab, "opt")  # OPT has dropout: the RNG state must survive the kill too


SINGLE = TrainConfig(lr=3e-3, batch_size=8, epochs=2, eval_every=5, save_every=4, early_stopping_patience=None,
                     device="cpu")
# 96 users, batches of 8: 12 batches per epoch. K=8 on 96 users leaves tiny clusters that the briefly
# pre-trained selector never picks; they are retired after the first epoch, before the kill (checked below).
HETLM = HeTLMConfig(n_clusters=8, epochs=2, batch_size=8, selector_lr=1e-3, predictor_lr=3e-3,
                    selector_pretrain_epochs=20, eval_every=8, save_every=6, device="cpu",
                    # the former defaults, under which some clusters retire and others stay on this data
                    selector_label_smoothing=0.4, selector_pretrain_agreement=None, l1_tokens="all", l1_reduce="mean",
                    l1_nll="after_critic", critic_balance="none")


def run_single(prepared: str, out: str, resume: bool = False) -> None:
    torch.set_num_threads(1)  # the same kernels in every process, so the same floats
    train, val, _, _, vocab = _slices(Path(prepared))
    train_lm(_micro_opt(vocab), train, val, SINGLE, out, resume=resume, progress=False)


def run_hetlm(prepared: str, out: str, resume: bool = False) -> None:
    torch.set_num_threads(1)
    train, val, z, zv, vocab = _slices(Path(prepared))
    model = HeTLM(HETLM, out, resume, progress=False).fit(_micro_opt(vocab), train, z, val, zv)
    model.save_pretrained(Path(out) / "final", load_tokenizer(Path(prepared) / "tokenizer"))


def _python(call: str) -> list[str]:
    return [sys.executable, "-c", f"from tests.test_resume import *; {call}"]


def _kill_after(cmd: list[str], ready, timeout: float = 600) -> None:
    """Start cmd, SIGKILL it as soon as ready() holds, and fail if it finished first."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def _resume(call: str) -> None:
    done = subprocess.run(_python(call), cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _state(path: Path) -> dict | None:
    try:  # the checkpoint may be swapped while we read it
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def prepared(taobao_prepared) -> str:
    return str(taobao_prepared[0])


def test_single_lm_resumes_after_sigkill(prepared, tmp_path):
    threads = torch.get_num_threads()
    run_single(prepared, str(tmp_path / "straight"))
    torch.set_num_threads(threads)
    killed = tmp_path / "killed"
    _kill_after(_python(f"run_single({prepared!r}, {str(killed)!r})"),
                lambda: (killed / "checkpoint" / "trainer_state.pt").exists())
    saved = torch.load(killed / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert 0 < saved["step"] < 24  # killed mid-way
    _resume(f"run_single({prepared!r}, {str(killed)!r}, resume=True)")

    straight, resumed = (json.loads((d / "history.json").read_text()) for d in (tmp_path / "straight", killed))
    assert len(resumed["train"]) == 24
    assert [e["loss"] for e in resumed["train"]] == pytest.approx([e["loss"] for e in straight["train"]], abs=1e-6)
    assert [e["val_loss"] for e in resumed["val"]] == pytest.approx([e["val_loss"] for e in straight["val"]], abs=1e-6)
    _assert_same_tensors(tmp_path / "straight" / "checkpoint" / "model.safetensors",
                         killed / "checkpoint" / "model.safetensors")


def test_hetlm_resumes_after_sigkill_with_a_retired_cluster(prepared, tmp_path):
    threads = torch.get_num_threads()
    run_hetlm(prepared, str(tmp_path / "straight"))
    torch.set_num_threads(threads)
    killed = tmp_path / "killed"

    def retired_and_mid_epoch() -> bool:
        state = _state(killed / CHECKPOINT)
        return state is not None and state["epoch"] >= 1 and state["position"] > 0 and bool(state["history"]["retired"])

    _kill_after(_python(f"run_hetlm({prepared!r}, {str(killed)!r})"), retired_and_mid_epoch)
    state = _state(latest_checkpoint(killed))
    assert state["epoch"] < HETLM.epochs and state["history"]["retired"]
    _resume(f"run_hetlm({prepared!r}, {str(killed)!r}, resume=True)")

    straight, resumed = (json.loads((d / "hetlm_history.json").read_text()) for d in (tmp_path / "straight", killed))
    assert len(resumed["steps"]) == HETLM.epochs * 12 and resumed["retired"] == straight["retired"]
    assert resumed["cluster_sizes"] == straight["cluster_sizes"]
    for a, b in zip(straight["steps"], resumed["steps"]):
        assert a["critic"].keys() == b["critic"].keys()
        assert [a["LA"], *a["critic"].values()] == pytest.approx([b["LA"], *b["critic"].values()], abs=1e-5)
    assert [v["combined_nll"] for v in resumed["val"]] == pytest.approx([v["combined_nll"] for v in straight["val"]], abs=1e-5)
    final = json.loads((killed / "final" / "clusterwise.json").read_text())
    assert final["active"] == json.loads((tmp_path / "straight" / "final" / "clusterwise.json").read_text())["active"]
    assert 1 < len(final["active"]) < HETLM.n_clusters
    for k in final["active"]:
        _assert_same_tensors(tmp_path / "straight" / "final" / f"cluster_{k}" / "model.safetensors",
                             killed / "final" / f"cluster_{k}" / "model.safetensors")
    _assert_same_tensors(tmp_path / "straight" / "final" / "selector" / "selector.safetensors",
                         killed / "final" / "selector" / "selector.safetensors")


def test_half_written_checkpoint_is_ignored(prepared, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, _, z, _, vocab = _slices(Path(prepared))
        config = HeTLMConfig(n_clusters=3, epochs=2, batch_size=16, predictor_lr=3e-3, selector_pretrain_epochs=10,
                             save_every=10**6, device="cpu")
        straight = HeTLM(config, progress=False).fit(_micro_opt(vocab), train, z)
        out = tmp_path / "run"
        HeTLM(config.model_copy(update={"epochs": 1}), out, progress=False).fit(_micro_opt(vocab), train, z)
        # A crash inside write_dir_atomically: the newer copy is half-written in .tmp, the complete one
        # was already moved to .old.
        os.replace(out / CHECKPOINT, out / f"{CHECKPOINT}.old")
        shutil.copytree(out / f"{CHECKPOINT}.old", out / f"{CHECKPOINT}.tmp")
        (out / f"{CHECKPOINT}.tmp" / STATE_FILE).write_text('{"epoch": 2, "posi')
        assert latest_checkpoint(out) == out / f"{CHECKPOINT}.old"
        resumed = HeTLM(config, out, resume=True, progress=False).fit(_micro_opt(vocab), train, z)
    finally:
        torch.set_num_threads(threads)
    assert [s["LA"] for s in resumed.history_.steps] == pytest.approx(
        [s["LA"] for s in straight.history_.steps], abs=1e-6)
    assert latest_checkpoint(out) == out / CHECKPOINT and not (out / f"{CHECKPOINT}.tmp").exists()
    assert _state(out / CHECKPOINT)["epoch"] == 2
