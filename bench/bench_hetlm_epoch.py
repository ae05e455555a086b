"""One HeTLM epoch vs one single-LM epoch on the shipped Taobao sample (issue 7: target HeTLM <= 1.5x).

    .venv/bin/python bench/bench_hetlm_epoch.py [--prepared DIR] [--batch-size 32] [--clusters 6]

Data: the demo's quick settings (3 most recent training targets per user), tiny preset, page-bag user
embeddings. Times the training loop only (HeTLM's k-means and selector pre-training are excluded), no
validation. Rows: the single LM (hetlm.train.train_lm), HeTLM with the K predictors' NLL matrix from K
sequential passes (the default), from one batched (vmapped) pass (same numbers), and the approximate
`actor_rows` option (L1 on a random subset of each batch).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from common import SHIPPED, peak_rss_mb, record  # first: it sets OMP_WAIT_POLICY etc. before torch loads

# isort: split
import polars as pl
import torch

from hetlm.cluster.hetlm import HeTLM, HeTLMConfig
from hetlm.encoders import make_encoder
from hetlm.models import build_model
from hetlm.prepare import PrepareConfig, prepare
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig, train_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, help="a prepared folder (default: prepare the shipped sample)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=6)
    parser.add_argument("--actor-rows", type=int, default=8, help="rows of the approximate variant")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.prepared
        if prepared is None:
            prepared = Path(tmp) / "prepared"
            prepare("taobao", SHIPPED, prepared, PrepareConfig(max_train_targets_per_user=3))
        train = pl.read_parquet(prepared / "train.parquet")
        z = make_encoder("pagebag", cache_dir=str(Path(tmp) / "cache"), show_progress=False).transform(train["history"].to_list())
        torch.manual_seed(0)
        base = build_model("tiny", len(load_tokenizer(prepared / "tokenizer")))

        def single_epoch() -> float:
            started = time.perf_counter()
            train_lm(copy.deepcopy(base), train, None, TrainConfig(lr=3e-3, epochs=1, batch_size=args.batch_size,
                     early_stopping_patience=None, save_every=10**9), Path(tmp) / "single", progress=False)
            return time.perf_counter() - started

        def hetlm_epoch(**options) -> float:
            cfg = HeTLMConfig(n_clusters=args.clusters, epochs=1, batch_size=args.batch_size, selector_lr=1e-3,
                              predictor_lr=1e-3, **options)
            return HeTLM(cfg, progress=False).fit(base, train, z).model_.info["seconds"]

        # The single LM runs first and last: on a shared machine the load drifts, and the mean of the two
        # is the reference for the ratios.
        seconds = {"single LM (train_lm), first": single_epoch(),
                   "HeTLM, sequential NLL passes (default, exact)": hetlm_epoch(nll_pass="sequential"),
                   "HeTLM, batched NLL pass (exact)": hetlm_epoch(nll_pass="batched"),
                   f"HeTLM, actor_rows={args.actor_rows} (approx.)": hetlm_epoch(actor_rows=args.actor_rows),
                   "single LM (train_lm), last": single_epoch()}
    single = (seconds["single LM (train_lm), first"] + seconds["single LM (train_lm), last"]) / 2
    rows = [{"run": name, "epoch_s": s, "x_single": s / single} for name, s in seconds.items()]

    settings = {"data": str(args.prepared or "shipped taobao sample, quick settings"), "train_samples": train.height,
                "batch_size": args.batch_size, "clusters": args.clusters, "preset": "tiny",
                "actor_rows": args.actor_rows}
    summary = {"exact_x_single": min(rows[1]["x_single"], rows[2]["x_single"]),
               "sequential_x_single": rows[1]["x_single"], "exact_batched_x_single": rows[2]["x_single"],
               "approx_x_single": rows[3]["x_single"], "target_x_single": 1.5, "peak_rss_mb": peak_rss_mb()}
    record("hetlm_epoch", settings, rows, summary)


if __name__ == "__main__":
    main()
