"""Why HeTLM collapses to one cluster on the Taobao sample, and what the actor-loss options change.

    .venv/bin/python bench/hetlm_variants.py [--epochs 1]

Not a speed benchmark: a small ablation, recorded like one so its table is produced by a run. Each
variant of the actor loss (`HeTLMConfig.l1`, `l2_balance`, alpha, beta) is fitted twice:
  - on the shipped Taobao sample with the demo's quick settings (tiny LM pre-trained 3 epochs, page-bag
    embeddings, K=6, 1 actor-critic epoch, batch 32, lr 1e-3) and evaluated on its 486 test users
    (greedy next sessions): final K, the largest cluster's share of training users, IoU, F1;
  - on the planted synthetic log of tests/test_hetlm.py (3 groups that k-means with K=6 over-splits):
    final K and the adjusted Rand index of the routing against the planted groups.
A variant that keeps Taobao's clusters but cannot merge the planted sub-clusters has lost the
endogenous K; one that merges them but collapses Taobao has the paper's failure.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from common import REPO, SHIPPED, record  # first: it sets OMP_WAIT_POLICY etc. before torch loads

# isort: split
import polars as pl
import torch
from sklearn.metrics import adjusted_rand_score

from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
from hetlm.cluster.kmeans import kmeans_labels
from hetlm.encoders import make_encoder
from hetlm.evaluate import GenerationSettings, predict, score
from hetlm.models import Preset, build_model
from hetlm.prepare import PrepareConfig, prepare
from hetlm.tokenizer import load_tokenizer, page_vocabulary
from hetlm.train import TrainConfig, train_lm

sys.path.insert(0, str(REPO))
from tests.synthetic import planted_samples  # noqa: E402

VARIANTS = {
    "paper (alpha 5, beta 9)": {},
    "paper L1 only (alpha 0, beta 0)": {"alpha": 0.0, "beta": 0.0},
    "l1=centered": {"l1": "centered"},
    "l1=centered, alpha 0, beta 0": {"l1": "centered", "alpha": 0.0, "beta": 0.0},
    "l1=centered, alpha 1, beta 0": {"l1": "centered", "alpha": 1.0, "beta": 0.0},
    "l1=centered, alpha 0, beta 9": {"l1": "centered", "alpha": 0.0, "beta": 9.0},
    "l2_balance=1": {"l2_balance": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="actor-critic epochs on Taobao")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        prepare("taobao", SHIPPED, prepared, PrepareConfig(max_train_targets_per_user=3))
        train, val, test = (pl.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test"))
        tokenizer = load_tokenizer(prepared / "tokenizer")
        encoder = make_encoder("pagebag", cache_dir=str(Path(tmp) / "cache"), show_progress=False)
        z = {name: encoder.transform(df["history"].to_list()) for name, df in (("train", train), ("test", test))}
        torch.manual_seed(0)
        small = build_model("tiny", len(tokenizer))
        train_lm(small, train, val, TrainConfig(lr=3e-3, epochs=3, batch_size=32, early_stopping_patience=None),
                 Path(tmp) / "small", progress=False)

        synthetic, groups, z_synthetic, vocab_size = planted_samples(seed=0)
        torch.manual_seed(0)
        micro = build_model(Preset(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), vocab_size)
        train_lm(micro, synthetic, None, TrainConfig(lr=3e-3, epochs=5, batch_size=16), Path(tmp) / "micro",
                 progress=False)

        vocabulary = set(page_vocabulary(tokenizer))
        rows = []
        for name, options in VARIANTS.items():
            taobao = HeTLM(HeTLMConfig(n_clusters=6, epochs=args.epochs, batch_size=32, selector_lr=1e-3,
                                       predictor_lr=1e-3, eval_every=10**9, **options)
                           ).fit(copy.deepcopy(small), train, z["train"], progress=False)
            pred = predict(taobao, test, tokenizer, GenerationSettings(), z["test"], progress=False)
            metrics = score(pred.pages, test, vocabulary, pred.clusters)["combined"]
            planted = HeTLM(HeTLMConfig(n_clusters=6, epochs=6, batch_size=16, selector_lr=1e-2, predictor_lr=3e-3,
                                        selector_pretrain_epochs=300, device="cpu", **options)
                            ).fit(copy.deepcopy(micro), synthetic, z_synthetic, progress=False)
            sizes = sorted(taobao.sizes.values(), reverse=True)
            rows.append({"variant": name, "taobao_K": len(taobao.models), "taobao_largest_share": sizes[0] / sum(sizes),
                         "taobao_sizes": "/".join(map(str, sizes)), "taobao_IoU": metrics["IoU"],
                         "taobao_F1_cart_or_purchase": metrics["F1-Cart/Purchase"],
                         "planted_K": len(planted.models),
                         "planted_ARI": adjusted_rand_score(groups, planted.route(z_synthetic))})
    # k-means, HeTLM's starting point, is the same for every variant: the last fit's first sizes
    start = sorted(taobao.info["history"]["cluster_sizes"][0]["sizes"].values(), reverse=True)
    summary = {"taobao_kmeans_sizes": "/".join(map(str, start)),
               "planted_kmeans_ARI": adjusted_rand_score(groups, kmeans_labels(z_synthetic, 6)[0])}
    record("hetlm_variants", {"data": "shipped taobao sample (quick settings) and the planted synthetic log",
                              "epochs": args.epochs, "clusters": 6}, rows, summary)


if __name__ == "__main__":
    main()
