"""Test-set inference time of a clusterwise model (K small LMs: route each user, then generate with
its cluster's LM) against the parameter-matched single larger LM (paper Table 17: ratio 0.39).

Both are built here on the shipped Taobao sample with few training steps (--train-steps: timing does
not depend on quality): a tiny LM, K k-means cluster LMs fine-tuned from it (page-bag user
embeddings), and `scale_preset(tiny, K)` trained from scratch. Two times per model: loading it from
disk plus embedding the test users for routing (the clusterwise model loads MiniLM, once per process),
and `hetlm.evaluate.predict` (routing, next-session generation and first-page scores of every test
user). Two ratios: the models' inference alone, as the paper's Table 17 compares LMs, and end to end.

    .venv/bin/python bench/bench_inference.py [--clusters 3] [--train-steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train import prepared_taobao, trained_lm
from bench.common import peak_rss_mb, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()

    import polars as pl
    from transformers import AutoModelForCausalLM

    from hetlm.cluster.base import ClusterwiseLM, load_model
    from hetlm.cluster.kmeans import KMeansClusterwise
    from hetlm.encoders import encoder_from_settings
    from hetlm.evaluate import GenerationConfig, predict
    from hetlm.models import build_model, count_parameters, scale_preset
    from hetlm.tokenizer import load_tokenizer
    from hetlm.train import TrainConfig, train_lm

    prepared = prepared_taobao()
    tokenizer = load_tokenizer(prepared / "tokenizer")
    train, val, test = (pl.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test"))
    small = AutoModelForCausalLM.from_pretrained(trained_lm(prepared, steps=args.train_steps))
    settings = {"name": "pagebag", "model_name_or_path": None, "cache_dir": None}
    encoder = encoder_from_settings(settings)
    config = TrainConfig(max_steps=args.train_steps, save_every=10**9, device="cpu")
    larger_shape, _ = scale_preset("tiny", args.clusters, len(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        clusterwise = KMeansClusterwise(args.clusters, Path(tmp) / "kmeans", config, progress=False).fit(
            small, train, encoder.transform(train["history"].to_list()), val, encoder.transform(val["history"].to_list()),
            encoder=settings)
        clusterwise.save_pretrained(Path(tmp) / "kmeans_model", tokenizer)
        torch.manual_seed(0)
        larger = build_model(larger_shape, len(tokenizer))
        train_lm(larger, train, None, config, Path(tmp) / "larger", progress=False)
        ClusterwiseLM.single(larger, tokenizer).save_pretrained(Path(tmp) / "larger_model")

        rows = []
        for name, path in ((f"k-means clusterwise, K={args.clusters}", "kmeans_model"), ("larger single LM", "larger_model")):
            started = time.perf_counter()
            model = load_model(Path(tmp) / path)
            z = model.embed(test["history"].to_list())
            loaded = time.perf_counter()
            predictions = predict(model, test, tokenizer, GenerationConfig(), z, progress=False)
            done = time.perf_counter()
            params = sum(count_parameters(m) for m in model.models.values())
            rows.append({"model": name, "parameters": params, "users": test.height, "load_and_embed_s": loaded - started,
                         "predict_s": done - loaded, "seconds": done - started,
                         "generation_s": predictions.seconds["generation"], "scoring_s": predictions.seconds["scoring"]})
    record("bench_inference", vars(args) | {"data": "taobao-sample test users", "larger_preset": str(larger_shape)}, rows, {
        "inference_time_ratio_clusterwise_over_larger": rows[0]["predict_s"] / rows[1]["predict_s"],
        "end_to_end_ratio_clusterwise_over_larger": rows[0]["seconds"] / rows[1]["seconds"],
        "paper_ratio": 0.39,
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
