import json
import random
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

import hetlm.train
from hetlm.data import ParquetSequences, SequenceDataset, length_bucketed_batches, pack_sequences, pad_sequences
from hetlm.distributed import DistInfo, gather_columns, owned_clusters, shard
from hetlm.models import Preset, build_model
from hetlm.nll import sequence_nll, token_nll
from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID
from hetlm.train import TrainConfig, ValLoss, evaluate_loss, packing_is_exact, train_lm

# A toy site: pages form 6 chains of 4; every session walks one chain, and a user's next session walks
# the same chain as the past ones. Within a session every next page is determined.
CHAIN, N_CHAINS = 4, 6
VOCAB = 4 + CHAIN * N_CHAINS
MICRO = Preset(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def chain_session(chain: int) -> list[int]:
    return [BOS_ID, *range(4 + CHAIN * chain, 4 + CHAIN * (chain + 1)), EOS_ID]


def toy_samples(n_users: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n_users):
        chain = rng.randrange(N_CHAINS)
        history = [t for _ in range(rng.randint(1, 3)) for t in chain_session(chain)]
        samples.append((history, chain_session(chain)))
    return samples


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models gain nothing from threads, and OpenMP spin-waits make them crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(MICRO, VOCAB, family, max_positions=64, **overrides)


QUICK = dict(lr=3e-3, batch_size=16, epochs=6, eval_every=20, warmup_ratio=0.1, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = micro_model()
    val = toy_samples(60, seed=1)
    before = evaluate_loss(model, SequenceDataset.from_samples(val), 32).target
    result = train_lm(model, toy_samples(300, seed=0), val, TrainConfig(**QUICK), out, progress=False)
    return model, result, before, out


def test_training_learns_the_toy_site(trained):
    model, result, before, out = trained
    assert result.best_val_loss < 0.5 * before
    history = json.loads((out / "history.json").read_text())
    assert len(history["train"]) == result.steps == 6 * 19
    assert [e["step"] for e in history["val"]][:2] == [19, 20]  # epoch end, then every 20 steps
    assert all(e["tokens_per_s"] > 0 for e in history["train"])
    assert history["train"][-1]["loss"] < history["train"][0]["loss"] / 2


def test_best_model_reloads_in_plain_transformers(trained):
    model, result, _, out = trained
    reloaded = AutoModelForCausalLM.from_pretrained(out / "best")
    ids = torch.tensor([chain_session(2) + chain_session(2)])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert evaluate_loss(reloaded, SequenceDataset.from_samples(toy_samples(60, seed=1)), 32).target == pytest.approx(result.best_val_loss, abs=1e-5)


def test_sequence_nll_scores_the_next_session_after_its_bos(trained):
    model = trained[0]
    history, target = toy_samples(1, seed=5)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([history + target])).logits[0], -1)
    start = len(history) + 1  # first scored token: the first page after the target's [BOS]
    manual = -np.mean([logp[t - 1, tok].item() for t, tok in enumerate(history + target) if t >= start])
    samples = toy_samples(40, seed=6) + [(history, target)]
    nll = sequence_nll(model, [{"input_ids": h, "target_ids": t} for h, t in samples], batch_size=8)
    assert nll.shape == (41,) and nll[-1] == pytest.approx(manual, abs=1e-5)
    assert sequence_nll(model, [(history, [BOS_ID, 5, 6, 7, EOS_ID])])[0] > nll[-1]  # off-chain target is unlikely


def test_resume_continues_exactly(tmp_path, monkeypatch):
    # OPT has dropout 0.1, so the RNG state must survive the interruption too.
    config = TrainConfig(lr=3e-3, batch_size=4, grad_accum=2, epochs=2, eval_every=3, save_every=4, device="cpu",
                         early_stopping_patience=None)  # 40 users -> 5 steps per epoch, 10 in all
    train, val = toy_samples(40, seed=0), toy_samples(8, seed=1)
    straight = micro_model("opt")
    full = train_lm(straight, train, val, config, tmp_path / "straight", progress=False)

    real_save = hetlm.train.save_checkpoint

    def save_then_crash(*args):
        real_save(*args)
        raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(hetlm.train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_lm(micro_model("opt"), train, val, config, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed_model = micro_model("opt", seed=123)  # weights come from the checkpoint
    resumed = train_lm(resumed_model, train, val, config, tmp_path / "resumed", resume=True, progress=False)

    losses = [torch.tensor([e["loss"] for e in r.history["train"]]) for r in (full, resumed)]
    assert len(losses[0]) == len(losses[1]) == 10
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0)
    assert [e["val_loss"] for e in full.history["val"]] == pytest.approx([e["val_loss"] for e in resumed.history["val"]], abs=1e-6)
    for a, b in zip(straight.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10 and not (tmp_path / "resumed" / "checkpoint.tmp").exists()


def test_early_stopping_after_patience_evaluations(tmp_path):
    config = TrainConfig(lr=1e-30, weight_decay=0.0, batch_size=4, epochs=50, eval_every=2, early_stopping_patience=2,
                         device="cpu")
    result = train_lm(micro_model(), toy_samples(40, seed=0), toy_samples(8, seed=1), config, tmp_path, progress=False)
    # lr 1e-30 (0 is refused) moves no float32 weight: the first evaluation is the best, the next two do not improve on it.
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert train_lm(micro_model(), toy_samples(40, seed=0), toy_samples(8, seed=1), config, tmp_path, resume=True,
                    progress=False).steps == 6  # a finished run resumes to itself


def test_length_bucketing_pads_little_and_covers_everything():
    lengths = np.random.default_rng(0).integers(5, 500, 1000)
    batches = length_bucketed_batches(lengths, 16, 50, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padding = sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in batches)
    assert padding < 0.03 * lengths.sum()  # shuffled batches of 16 would pad ~90 %
    assert batches != length_bucketed_batches(lengths, 16, 50, np.random.default_rng(2))


def test_pad_sequences_both_sides():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    ids, mask = pad_sequences(seqs, side="left")
    assert ids.tolist() == [[5, 6, 7], [PAD_ID, PAD_ID, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences(seqs)
    assert ids.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID]]


def test_pack_sequences_rows_and_positions():
    seqs = [torch.tensor([5, 6, 7, 8]), torch.tensor([9]), torch.tensor([10, 11]), torch.tensor([12, 13, 14])]
    ids, mask, positions = pack_sequences(seqs)
    assert ids.tolist() == [[5, 6, 7, 8], [12, 13, 14, 9], [10, 11, PAD_ID, PAD_ID]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]] and mask.sum() == 10


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_rows_score_as_padded_ones(family):
    model = micro_model(family).eval()
    seqs = [torch.tensor(h + t) for h, t in toy_samples(12, seed=3)]
    padded = token_nll(model, *pad_sequences(seqs))
    packed = token_nll(model, *pack_sequences(seqs))
    assert len(pack_sequences(seqs)[0]) < len(seqs) and (packed > 0).sum() == (padded > 0).sum()
    assert packed.sum().item() == pytest.approx(padded.sum().item(), rel=1e-5)


def test_packing_is_used_only_where_samples_stay_apart(tmp_path):
    assert packing_is_exact(micro_model("llama")) and not packing_is_exact(micro_model("opt"))
    train = toy_samples(64, seed=0)
    losses = {}
    for pack in (True, False):
        config = TrainConfig(lr=3e-3, batch_size=16, max_steps=6, bucket_batches=1, device="cpu", pack=pack)
        result = train_lm(micro_model("llama"), train, None, config, tmp_path / str(pack), progress=False)
        losses[pack] = [e["loss"] for e in result.history["train"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # the same objective, without the padding


def test_long_samples_keep_their_most_recent_tokens():
    data = SequenceDataset.from_samples([(list(range(4, 20)), [BOS_ID, 30, EOS_ID])], max_len=8)
    assert data[0].tolist() == [15, 16, 17, 18, 19, BOS_ID, 30, EOS_ID] and data.target_starts == [5]


def write_samples(path, samples, row_group_size: int):
    frame = pl.DataFrame({"input_ids": [h for h, _ in samples], "target_ids": [t for _, t in samples]},
                         schema={"input_ids": pl.List(pl.Int32), "target_ids": pl.List(pl.Int32)})
    frame.with_columns(user=pl.lit("u")).write_parquet(path, row_group_size=row_group_size)
    return path


def test_streamed_samples_equal_in_memory_ones(tmp_path):
    samples = toy_samples(50, seed=0)
    streamed = ParquetSequences(write_samples(tmp_path / "s.parquet", samples, 8), max_len=16)
    memory = SequenceDataset.from_samples(samples, max_len=16)  # toy sequences reach 24 tokens: some are cut
    assert len(streamed) == 50 and streamed.lengths.tolist() == memory.lengths.tolist()
    assert streamed.target_starts.tolist() == memory.target_starts
    assert all(torch.equal(streamed[i], memory[i]) for i in range(50))


def test_streaming_reads_each_row_group_once_per_epoch(tmp_path):
    samples = toy_samples(300, seed=0)
    data = ParquetSequences(write_samples(tmp_path / "s.parquet", samples, 16), buffer_row_groups=2)
    n_groups = 19  # ceil(300 / 16)
    assert data.row_group_reads == n_groups  # the lengths pass, one row group at a time
    batches = data.epoch_batches(8, 50, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert len(batches) == 38 and all(len(b) == 8 for b in batches[:-1])  # ceil(300 / 8), as in memory
    assert batches != data.epoch_batches(8, 50, np.random.default_rng(1))
    # Every batch draws on the row groups of at most two buffers.
    assert max(len({i // 16 for i in b}) for b in batches) <= 4

    config = TrainConfig(lr=3e-3, batch_size=8, epochs=1, device="cpu", stream_buffer=2)
    result = train_lm(micro_model(), data, None, config, tmp_path / "run", progress=False)
    assert result.steps == 38 and data.row_group_reads == 2 * n_groups and len(data._cache) <= 4


def test_streamed_training_equals_in_memory_training(tmp_path):
    # A file that fits one shuffle buffer gets the in-memory batch order, so the runs must agree exactly.
    train, val = toy_samples(60, seed=0), toy_samples(8, seed=1)
    config = TrainConfig(lr=3e-3, batch_size=8, epochs=2, eval_every=5, device="cpu", stream_buffer=8)
    path = write_samples(tmp_path / "train.parquet", train, 10)
    streamed = train_lm(micro_model(), path, val, config, tmp_path / "streamed", progress=False, stream=True)
    memory = train_lm(micro_model(), train, val, config, tmp_path / "memory", progress=False)
    assert [e["loss"] for e in streamed.history["train"]] == pytest.approx([e["loss"] for e in memory.history["train"]], abs=1e-6)
    assert streamed.best_val_loss == pytest.approx(memory.best_val_loss, abs=1e-6)


def test_streaming_needs_the_token_columns(tmp_path):
    pl.DataFrame({"user": ["a"]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="input_ids"):
        ParquetSequences(tmp_path / "bad.parquet")


def test_shards_of_a_batch_are_disjoint_and_cover_it():
    batch = list(range(10))
    parts = [shard(batch, rank, 3) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == batch and parts[0] == [0, 3, 6, 9]
    assert shard([7], 1, 2) == []  # the trainer runs such a rank on one sample at weight 0


def test_single_process_helpers_for_hetlm():
    assert owned_clusters(6, DistInfo(rank=1, world_size=4)) == [1, 5]
    matrix = torch.arange(12.0).view(3, 4)
    assert torch.equal(gather_columns(matrix, [0, 2]), matrix * torch.tensor([1.0, 0, 1, 0]))


def test_model_selection_follows_the_next_session_nll_not_all_tokens(tmp_path, monkeypatch):
    """Scripted validation losses that disagree: all-token loss falls throughout (memorised histories),
    next-session NLL is lowest at the second evaluation. best/ and early stopping follow the latter."""
    import hetlm.train as train_module

    scripted = iter([ValLoss(target=t, all_tokens=a) for t, a in
                     [(3.0, 2.0), (2.0, 1.5), (2.5, 1.0), (2.8, 0.5), (3.0, 0.2), (3.5, 0.1)]])
    snapshots = []

    def fake_evaluate(model, dataset, batch_size, bf16=False):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(train_module, "evaluate_loss", fake_evaluate)
    model = micro_model()
    config = TrainConfig(**QUICK | dict(eval_every=5, epochs=100, early_stopping_patience=3))
    result = train_lm(model, toy_samples(320, seed=0), toy_samples(8, seed=1), config, tmp_path, progress=False)
    assert result.best_step == 10 and result.best_val_loss == 2.0
    assert result.stopped_early and len(result.history["val"]) == 5  # 3 evaluations without improvement
    assert [e["val_loss_all_tokens"] for e in result.history["val"]] == [2.0, 1.5, 1.0, 0.5, 0.2]
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "best").state_dict()
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert any(not torch.equal(best[k], snapshots[-1][k]) for k in best)


def test_inference_modules_do_not_import_the_trainer():
    """Generation, outcomes, scoring and serving need data/nll helpers, never the training loop."""
    modules = ["hetlm.generate", "hetlm.outcomes", "hetlm.evaluate", "hetlm.set_decoder", "hetlm.score", "hetlm.serve"]
    code = f"import sys; import {', '.join(modules)}; print('hetlm.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_long_tasks_announce_their_timed_duration(capsys):
    """`progress.Estimate` says `about ...` once, from the rate of the steps timed so far."""
    from hetlm.progress import Estimate, duration

    estimate = Estimate("train", total=600, done_at_start=100, after_seconds=0.0, started=time.monotonic() - 10)
    estimate.update(110)  # 10 steps in 10 s: 500 steps take about 8 min
    estimate.update(120)
    said = capsys.readouterr().out
    assert said.count("about") == 1 and "train: about 8 min for 500 steps (timed over the first 10" in said
    assert (duration(40), duration(3 * 60), duration(5400)) == ("40 s", "3 min", "1.5 h")
