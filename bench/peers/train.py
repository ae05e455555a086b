"""Train one RecBole sequential recommender on the files of `bench/peers/inputs.py` and write its
page scores for every val and test context (runs in bench/peers/.venv, never imports hetlm).

RecBole's own Trainer does the training, with RecBole's defaults for the model and the changes a
user makes for this task: cross-entropy over all items, validation on the val samples' first pages
(full ranking, NDCG@10, RecBole's early stopping), and a cap on the CPU time of training, checked
before every batch: on a CPU shared with others a wall-clock cap would give each peer whatever share
of the cores the others left it, so the figures would follow the machine's load.
The best validation state is kept in memory rather than in RecBole's checkpoint file: RecBole
pickles its Config into that file and reads it back with torch.load, which torch >= 2.6 refuses by
default (weights_only=True); nothing in site-packages is patched.

Writes to OUT: scores_valid.npy, scores_test.npy (float32, one row per context, one column per
hetlm token id; -inf for special tokens and pages the peer never saw) and result.json.

    bench/peers/.venv/bin/python bench/peers/train.py INPUTS OUT --model SASRec --max-cpu-seconds 120
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.trainer import Trainer
from recbole.utils import get_model, init_seed

N_SPECIALS = 4  # hetlm's [PAD] [UNK] [BOS] [EOS] are token ids 0-3


class TimeUp(Exception):
    """The training time cap passed; raised after a validation, so the best state is already kept."""


class CappedTrainer(Trainer):
    """RecBole's Trainer with a cap on training CPU seconds and the best validation state kept in memory."""

    def __init__(self, config, model, max_cpu_seconds: float):
        super().__init__(config, model)
        self.max_cpu_seconds, self.cpu_seconds = max_cpu_seconds, 0.0
        self.best_state, self.best_epoch, self.epochs_run = None, None, 0

    def time_is_up(self) -> bool:
        return self.cpu_seconds >= self.max_cpu_seconds

    def _batches_until_time_is_up(self, train_data):
        """Training batches while the CPU time of training (loading batches and the steps on them, not
        validation) is under the cap."""
        spent_before, started = self.cpu_seconds, time.process_time()
        for batch in train_data:
            self.cpu_seconds = spent_before + time.process_time() - started
            if self.time_is_up():
                return
            yield batch
        self.cpu_seconds = spent_before + time.process_time() - started

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.epochs_run = epoch_idx + 1
        return super()._train_epoch(self._batches_until_time_is_up(train_data), epoch_idx, loss_func, False)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        self.best_state, self.best_epoch = copy.deepcopy(self.model.state_dict()), epoch

    def stop_when_time_is_up(self, epoch_idx, valid_score):
        print(f"epoch {epoch_idx}: valid NDCG@10 {valid_score:.4f} (best {self.best_valid_score:.4f}, "
              f"epoch {self.best_epoch})", flush=True)
        if self.time_is_up():
            raise TimeUp


def recbole_config(inputs: Path, model: str, args) -> Config:
    return Config(model=model, dataset=inputs.name, config_dict={
        "data_path": str(inputs.parent), "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "alias_of_item_id": ["item_id_list"],
        "MAX_ITEM_LIST_LENGTH": args.max_len, "loss_type": "CE", "train_neg_sample_args": None,
        "train_batch_size": args.batch_size, "eval_batch_size": 1024, "epochs": args.max_epochs,
        "stopping_step": args.stopping_step, "learning_rate": args.lr,
        "eval_args": {"split": {"RS": [1.0, 0.0, 0.0]}, "order": "TO", "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "use_gpu": False, "device": "cpu", "seed": args.seed, "show_progress": False,
        "checkpoint_dir": str(args.out / "saved"),
    })


def page_scores(model, dataset, contexts: list[list[int]], n_tokens: int, max_len: int) -> tuple[np.ndarray, int]:
    """(len(contexts), n_tokens) scores; the number of context pages the peer never saw (left out)."""
    known = dataset.field2token_id[dataset.iid_field]
    columns = np.array([int(token) for token in dataset.field2id_token[dataset.iid_field][1:]])
    unseen = 0
    out = np.full((len(contexts), n_tokens), -np.inf, dtype=np.float32)
    model.eval()
    for start in range(0, len(contexts), 1024):
        batch = contexts[start:start + 1024]
        seq = torch.zeros(len(batch), max_len, dtype=torch.long)
        lengths = torch.ones(len(batch), dtype=torch.long)  # an empty context reads as one padding item
        for i, context in enumerate(batch):
            ids = [known[str(page)] for page in context if str(page) in known]
            unseen += len(context) - len(ids)
            if ids:
                seq[i, :len(ids)], lengths[i] = torch.tensor(ids), len(ids)
        with torch.no_grad():
            scores = model.full_sort_predict(Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths}))
        out[start:start + len(batch), columns] = scores[:, 1:].numpy()
    out[:, :N_SPECIALS] = -np.inf
    return out, unseen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, help="a folder written by bench/peers/inputs.py")
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", required=True, help="SASRec | GRU4Rec | NARM (any RecBole sequential model)")
    parser.add_argument("--max-cpu-seconds", type=float, default=120.0, help="cap on the CPU time of training")
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--stopping-step", type=int, default=10, help="RecBole's early-stopping patience (epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--max-len", type=int, default=50, help="context pages (the inputs' max_len)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value options from the command line too
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole 1.2.1 on pandas 2.x / torch 2.x
    inputs = args.inputs.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(args.out)  # RecBole's Trainer writes its tensorboard folder into the working directory
    args.out = Path(".")
    config = recbole_config(inputs, args.model, args)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset)
    trainer = CappedTrainer(config, model, args.max_cpu_seconds)

    started = time.perf_counter()
    try:
        trainer.fit(train_data, valid_data, verbose=False, callback_fn=trainer.stop_when_time_is_up)
        stopped = "early stopping" if trainer.epochs_run < args.max_epochs else "max epochs"
    except TimeUp:
        stopped = "time cap"
    train_seconds = time.perf_counter() - started
    model.load_state_dict(trainer.best_state)
    recbole_test = trainer.evaluate(test_data, load_best_model=False)

    contexts = json.loads((inputs / "contexts.json").read_text())
    unseen = {}
    for split in ("valid", "test"):
        scores, unseen[split] = page_scores(model, dataset, contexts[split], contexts["n_tokens"], args.max_len)
        np.save(args.out / f"scores_{split}.npy", scores)
    settings = {key: config[key] for key in ("MAX_ITEM_LIST_LENGTH", "train_batch_size", "learning_rate", "loss_type",
                                             "stopping_step", "seed")}
    settings |= {key: config[key] for key in config.final_config_dict
                 if key in {"n_layers", "n_heads", "hidden_size", "inner_size", "embedding_size", "num_layers",
                            "hidden_dropout_prob", "attn_dropout_prob", "dropout_prob", "dropout_probs"}}
    result = {
        "model": args.model, "settings": settings | {"max_cpu_seconds": args.max_cpu_seconds,
                                                     "torch_threads": args.threads},
        "train_seconds": train_seconds, "train_cpu_seconds": trainer.cpu_seconds, "stopped": stopped,
        "epochs": trainer.epochs_run,
        "best_epoch": trainer.best_epoch, "best_valid_ndcg10": float(trainer.best_valid_score),
        "recbole_test": {k: float(v) for k, v in recbole_test.items()},
        "train_rows": len(train_data._dataset), "parameters": sum(p.numel() for p in model.parameters()),
        "context_pages_unseen": unseen, "versions": {"recbole": __import__("recbole").__version__,
                                                      "torch": torch.__version__, "numpy": np.__version__},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "train_seconds", "train_cpu_seconds", "stopped", "epochs",
                                              "best_epoch", "best_valid_ndcg10", "recbole_test")}))


if __name__ == "__main__":
    main()
