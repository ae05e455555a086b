"""Does HeTLM keep its clusters, and shrink K for a reason? The paper's (alpha, beta) pairs under each
choice of the actor-critic loop, on three logs.

    .venv/bin/python bench/hetlm_variants.py [--datasets planted taobao globo] [--globo-users 1500] [--epochs 1]
        [--variants ...] [--name hetlm_variants]   (HETLM_SHARED_DATA: where globo-news/ is)

Not a speed benchmark: a small ablation, recorded like one so its table is produced by a run. Variants
(`VARIANTS`): the paper's four (alpha, beta) pairs with this repo's defaults (L1 = summed NLL of the next
session from the predictors before the critic step, no label smoothing, balanced critic steps, routing
argmax without dropout), (5, 9) with the former defaults (per-token NLL of history + next session after
the critic step, label smoothing 0.4, a critic step per batch whatever its size), and the hard-EM
mixture (`assignment="likelihood"`: each user goes to the predictor that best predicts its history).

Logs:
  - planted: the synthetic log of tests/test_hetlm.py (3 groups that k-means with K=6 over-splits; the
    micro LM and settings of that test): final K and the adjusted Rand index against the planted groups;
  - taobao: the shipped sample (tiny LM pre-trained 3 epochs, page-bag embeddings, K=6, batch 32, lr 1e-3);
  - globo: the shared Globo news log, `--split user`, the first --globo-users (1,500) users (by id) with 3+
    sessions, articles as pages; the Taobao settings.
Per variant: final K, the largest cluster's share of the training samples, the cluster sizes, and the
test users' per-token NLL of their next session under the predictor they are routed to (the model's own
routing: selector, or likelihood for hard EM).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from common import REPO, SHARED_DATA, SHIPPED, record  # first: it sets OMP_WAIT_POLICY etc. before torch loads

# isort: split
import numpy as np
import polars as pl
import torch
from sklearn.metrics import adjusted_rand_score

from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
from hetlm.cluster.kmeans import kmeans_labels
from hetlm.cluster.likelihood import nll_matrix
from hetlm.data import SequenceDataset
from hetlm.encoders import make_encoder
from hetlm.models import Preset, build_model
from hetlm.prepare import PrepareConfig, prepare
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig, train_lm

sys.path.insert(0, str(REPO))
from tests.synthetic import planted_samples  # noqa: E402

PAPER_PAIRS = [(1.0, 0.0), (2.0, 1.0), (3.0, 1.0), (5.0, 9.0)]
FORMER_DEFAULTS = {"l1_tokens": "all", "l1_reduce": "mean", "l1_nll": "after_critic", "critic_balance": "none",
                   "selector_label_smoothing": 0.4}
PAPER_KEYS = {f"a={a:g} b={b:g}": f"a{a:g}_b{b:g}" for a, b in PAPER_PAIRS}  # variant -> summary key part
VARIANTS = {f"a={a:g} b={b:g}": {"alpha": a, "beta": b} for a, b in PAPER_PAIRS} | {
    "a=5 b=9, former defaults": {"alpha": 5.0, "beta": 9.0} | FORMER_DEFAULTS,
    "hard EM (likelihood routing)": {"assignment": "likelihood", "critic_warmup_epochs": 1},
}
GLOBO = SHARED_DATA / "globo-news" / "clicks_even_users.parquet"


def globo_subsample(out: Path, n_users: int) -> Path:
    """The first n_users user ids with 3+ sessions: deterministic, small enough for a shared CPU."""
    clicks = pl.read_parquet(GLOBO)
    users = (clicks.group_by("user_id").agg(pl.col("session_id").n_unique().alias("sessions"))
             .filter(pl.col("sessions") >= 3).sort("user_id").head(n_users)["user_id"])
    path = out / "globo_subsample.parquet"
    clicks.filter(pl.col("user_id").is_in(users.implode())).write_parquet(path)
    return path


def real_log(name: str, tmp: Path, n_globo_users: int) -> dict:
    """Prepared samples, page-bag embeddings and a tiny LM pre-trained on them."""
    if name == "taobao":
        summary = prepare("taobao", SHIPPED, tmp / name, PrepareConfig(max_train_targets_per_user=3))
    else:
        summary = prepare("generic", globo_subsample(tmp, n_globo_users), tmp / name,
                          PrepareConfig(max_train_targets_per_user=3, split="user"), user="user_id",
                          page="click_article_id", time="click_timestamp", time_unit="ms", session="session_id",
                          page_prefix="article_")
    train, val, test = (pl.read_parquet(tmp / name / f"{s}.parquet") for s in ("train", "val", "test"))
    encoder = make_encoder("pagebag", cache_dir=str(tmp / "cache"), show_progress=False)
    z = {s: encoder.transform(df["history"].to_list()) for s, df in (("train", train), ("test", test))}
    torch.manual_seed(0)
    small = build_model("tiny", len(load_tokenizer(tmp / name / "tokenizer")))
    train_lm(small, train, val, TrainConfig(lr=3e-3, epochs=3, batch_size=32, early_stopping_patience=None),
             tmp / f"{name}_small", progress=False)
    return {"train": train, "test": test, "z": z, "base": small, "users": summary["users"],
            "config": dict(n_clusters=6, batch_size=32, selector_lr=1e-3, predictor_lr=1e-3, eval_every=10**9)}


def planted_log(tmp: Path) -> dict:
    train, groups, z, vocab_size = planted_samples(seed=0)
    torch.manual_seed(0)
    micro = build_model(Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), vocab_size)
    train_lm(micro, train, None, TrainConfig(lr=3e-3, epochs=5, batch_size=16), tmp / "micro", progress=False)
    return {"train": train, "test": None, "z": {"train": z}, "base": micro, "groups": groups,
            "config": dict(n_clusters=6, epochs=6, batch_size=16, selector_lr=1e-2, predictor_lr=3e-3,
                           selector_pretrain_epochs=300, device="cpu")}


def routed_test_nll(model, test: pl.DataFrame, z_test: np.ndarray) -> float:
    """Mean per-token NLL of each test user's next session under the predictor it is routed to."""
    dataset = SequenceDataset.from_samples(test)
    clusters = model.route(z_test, input_ids=test["input_ids"].to_list())
    nll = nll_matrix(model.models, dataset, list(range(len(dataset))), max(model.active) + 1, tokens="target")
    return float(nll[torch.arange(len(dataset)), torch.as_tensor(clusters)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["planted", "taobao", "globo"],
                        choices=["planted", "taobao", "globo"])
    parser.add_argument("--epochs", type=int, default=1, help="actor-critic epochs on the real logs")
    parser.add_argument("--globo-users", type=int, default=1500)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="on the real logs (the planted log gets them all)")
    parser.add_argument("--name", default="hetlm_variants", help="bench/results/<name>.jsonl (logs run apart)")
    args = parser.parse_args()

    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            log = planted_log(Path(tmp)) if name == "planted" else real_log(name, Path(tmp), args.globo_users)
            z = log["z"]["train"]
            start = np.bincount(kmeans_labels(z, 6)[0], minlength=6)
            summary[f"{name}_kmeans_largest_share"] = float(start.max() / start.sum())
            if name == "planted":
                summary["planted_kmeans_ARI"] = adjusted_rand_score(log["groups"], kmeans_labels(z, 6)[0])
            for variant, options in VARIANTS.items():
                if name != "planted" and variant not in args.variants:
                    continue
                epochs = {} if name == "planted" else {"epochs": args.epochs}
                model = HeTLM(HeTLMConfig(**log["config"] | epochs | options), progress=False).fit(
                    copy.deepcopy(log["base"]), log["train"], z).model_
                sizes = sorted(model.sizes.values(), reverse=True)
                row = {"log": name, "variant": variant, "K": len(model.models), "largest_share": sizes[0] / sum(sizes),
                       "sizes": "/".join(map(str, sizes))}
                if name == "planted":
                    row["ARI"] = adjusted_rand_score(log["groups"], model.route(z, input_ids=log["train"]["input_ids"].to_list()))
                else:
                    row["test_nll_routed"] = routed_test_nll(model, log["test"], log["z"]["test"])
                rows.append(row)
                print(row, flush=True)
                if variant in PAPER_KEYS:
                    key = f"{name}_{PAPER_KEYS[variant]}"
                    summary[f"{key}_K"], summary[f"{key}_largest_share"] = row["K"], row["largest_share"]
            if name != "planted":
                summary[f"{name}_users"] = log["users"]
    planted = [r["ARI"] for r in rows if r["log"] == "planted" and r["variant"] in PAPER_KEYS]
    if planted:
        summary["planted_min_ARI_paper_pairs"] = min(planted)
    # one column set for the table: absent figures as "-"
    columns = ["log", "variant", "K", "largest_share", "sizes", "ARI", "test_nll_routed"]
    rows = [{c: row.get(c, "-") for c in columns} for row in rows]
    record(args.name, {"logs": args.datasets, "epochs_real_logs": args.epochs, "globo_users": args.globo_users,
                              "initial_K": 6, "encoder (real logs)": "pagebag"}, rows, summary)


if __name__ == "__main__":
    main()
