"""Generation users/s: hetlm's batched, KV-cached, page-constrained greedy decoder against `model.generate`
one user at a time, batched `model.generate` (left padding) with the same page constraint, and batched
`model.generate` without it; and the set decoder (hetlm.set_decoder, default settings, fitted on the
validation users before timing) against greedy: its time per user must stay within 3x greedy's.

All four decode greedily, up to --max-new-tokens, the next session of the shipped Taobao sample's
test users with the same tiny LM (trained --train-steps steps here: a model for timing, not quality).
All decode the same --users users (default: all test users), so early [EOS]s weigh alike; the
table also counts the pages each one generated. Each decoder runs --repeats times, interleaved, and
the median time is reported (the machine may be shared).

    .venv/bin/python bench/bench_generate.py [--users 486] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train import prepared_taobao, trained_lm
from bench.common import peak_rss_mb, record
from hetlm.tokenizer import EOS_ID


SET_DECODER = "hetlm set decoder (first-page scores + expected-IoU sets)"


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


@torch.inference_mode()
def one_at_a_time(model, prompts: list[list[int]], config) -> int:
    """Pages generated (the new tokens before [EOS])."""
    pages = 0
    for prompt in prompts:
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
        pages += out.index(EOS_ID) if EOS_ID in out else len(out)
    return pages


@torch.inference_mode()
def batched(model, prompts: list[list[int]], batch_size: int, config) -> int:
    """Batches in the users' order, left-padded (the plain HF recipe); pages generated."""
    from hetlm.data import pad_sequences

    pages = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_sequences([torch.tensor(p) for p in prompts[start:start + batch_size]], side="left")
        for row in model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:].tolist():
            pages += row.index(EOS_ID) if EOS_ID in row else len(row)
    return pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=None, help="test users to decode (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=200, help="a model that writes sessions, not only [EOS]")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each decoder; the median time is reported")
    args = parser.parse_args()

    import polars as pl
    from transformers import AutoModelForCausalLM, GenerationConfig

    from hetlm.generate import NEVER_EMITTED, generate_next_sessions, session_prompts
    from hetlm.tokenizer import BOS_ID, PAD_ID

    prepared = prepared_taobao()
    model = AutoModelForCausalLM.from_pretrained(trained_lm(prepared, steps=args.train_steps)).eval()
    inputs = pl.read_parquet(prepared / "test.parquet")["input_ids"].to_list()[:args.users]
    prompts = [p.tolist() for p in session_prompts(inputs, model.config.max_position_embeddings - args.max_new_tokens)]
    base = {"max_new_tokens": args.max_new_tokens, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    constrained, plain = GenerationConfig(**base, suppress_tokens=NEVER_EMITTED), GenerationConfig(**base)

    from hetlm.set_decoder import SetDecoder, outcome_page_ids
    from hetlm.tokenizer import load_tokenizer

    val = pl.read_parquet(prepared / "val.parquet")
    decoder = SetDecoder()
    decoder.fit(val["input_ids"].to_list(), decoder.evidence(model, val["input_ids"].to_list(), args.batch_size),
                val["target_ids"].to_list(), outcome_page_ids(load_tokenizer(prepared / "tokenizer")))
    runs = {
        SET_DECODER: lambda: sum(map(len, decoder.predict(inputs, decoder.evidence(model, inputs, args.batch_size)))),
        "hetlm generate_next_sessions": lambda: sum(map(len, generate_next_sessions(
            model, inputs, args.max_new_tokens, args.batch_size, progress=False))),
        "model.generate, one user at a time": lambda: one_at_a_time(model, prompts, constrained),
        "batched model.generate, left padding, page constraint": lambda: batched(model, prompts, args.batch_size, constrained),
        "batched model.generate, no page constraint": lambda: batched(model, prompts, args.batch_size, plain),
    }
    times, pages = {name: [] for name in runs}, {}
    for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits every decoder
        for name, run in runs.items():
            seconds, pages[name] = timed(run)
            times[name].append(seconds)
    rows = []
    for name, seconds in times.items():
        seconds = statistics.median(seconds)
        rows.append({"decoder": name, "users": len(inputs), "pages": pages[name], "seconds": seconds,
                     "users_per_s": len(inputs) / seconds})
    rate = {row["decoder"]: row["users_per_s"] for row in rows}
    hetlm = rate["hetlm generate_next_sessions"]
    record("bench_generate", vars(args) | {"data": "taobao-sample test users",
                                            "set_decoder": {"n_samples": decoder.n_samples, "top_first": decoder.top_first}}, rows, {
        "set_decoder_time_over_greedy": hetlm / rate[SET_DECODER],
        "speedup_over_one_at_a_time": hetlm / rate["model.generate, one user at a time"],
        "speedup_over_batched_generate": hetlm / rate["batched model.generate, left padding, page constraint"],
        "speedup_over_batched_unconstrained": hetlm / rate["batched model.generate, no page constraint"],
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
