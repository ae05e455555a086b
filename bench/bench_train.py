"""Training tokens/s of hetlm's trainer against the Hugging Face `transformers.Trainer`, same model.

Both train the same freshly initialised model (each of --presets, seed 0) on the same training samples
of the shipped Taobao sample, with the same batch size, learning rate and number of optimizer steps.
The HF Trainer is set up as a user would: `DataCollatorForLanguageModeling(mlm=False)` (pads each
batch to its longest sequence), fp32 on CPU, its default fused AdamW; twice: with its default random
sampler (about 2/3 of a batch is padding here) and with `train_sampling_strategy="group_by_length"`,
the one setting a user would turn on (the tuned anchor: the target is stated against it).
hetlm's trainer runs with its defaults (TrainConfig: fused AdamW, no packing, no compile); --ablate
adds, for the first preset, a row per speed setting changed on its own. Throughput counts useful tokens (non-pad next-token targets) per
wall-clock second of the whole `train` call; each run is repeated --repeats times, interleaved, and the
median is reported (the machine may be shared). Model FLOPs utilisation is 6 * parameters * tokens/s
against this machine's fp32 matmul rate, measured here.

Also the helpers the other benches share: the prepared Taobao sample and a briefly trained tiny LM.

    .venv/bin/python bench/bench_train.py [--steps 40] [--batch-size 32] [--presets tiny,small] [--repeats 3] [--ablate]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHIPPED, peak_rss_mb, record

CACHE = Path(tempfile.gettempdir()) / "hetlm-bench"


def prepared_taobao() -> Path:
    """The shipped Taobao sample prepared with default settings (cached under /tmp/hetlm-bench)."""
    from hetlm.prepare import prepare

    out = CACHE / "taobao-prepared"
    if not (out / "summary.json").exists():
        prepare("taobao", SHIPPED, out)
    return out


def trained_lm(prepared: Path, preset: str = "tiny", steps: int = 100, seed: int = 0) -> Path:
    """A `preset` LM trained `steps` steps on `prepared` (cached): a model for timing, not for quality."""
    import polars as pl

    from hetlm.models import build_model
    from hetlm.tokenizer import load_tokenizer
    from hetlm.train import TrainConfig, train_lm

    out = CACHE / f"{preset}-{steps}-steps"
    if not (out / "best" / "model.safetensors").exists():
        torch.manual_seed(seed)
        model = build_model(preset, len(load_tokenizer(prepared / "tokenizer")))
        train_lm(model, pl.read_parquet(prepared / "train.parquet"), None,
                 TrainConfig(max_steps=steps, seed=seed, save_every=10**9), out)
    return out / "best"


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 matmul FLOP/s of this machine with torch's threads (the best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def sequences(prepared: Path, max_len: int) -> list[list[int]]:
    """Training sequences as both trainers see them: input + target, the most recent max_len tokens."""
    import polars as pl

    train = pl.read_parquet(prepared / "train.parquet")
    return [(i + t)[-max_len:] for i, t in zip(train["input_ids"].to_list(), train["target_ids"].to_list())]


def run_hetlm(model, prepared: Path, args, out: Path, **settings) -> dict:
    import polars as pl

    from hetlm.train import TrainConfig, train_lm

    config = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=args.steps, max_len=args.max_len,
                         seed=0, save_every=10**9, device="cpu", **settings)
    train = pl.read_parquet(prepared / "train.parquet")
    started = time.perf_counter()
    result = train_lm(model, train, None, config, out, progress=False)
    seconds = time.perf_counter() - started
    # The trainer's own count of non-pad target tokens, from its final checkpoint.
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    return {"seconds": seconds, "tokens": int(state["train_tokens"]), "steps": result.steps,
            "final_loss": result.history["train"][-1]["loss"]}


def run_hf_trainer(model, prepared: Path, args, out: Path, sampling: str = "random") -> dict:
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hetlm.tokenizer import load_tokenizer

    collate = DataCollatorForLanguageModeling(load_tokenizer(prepared / "tokenizer"), mlm=False)
    counted = {"tokens": 0, "padded": 0}

    def counting_collator(features):
        batch = collate(features)
        counted["tokens"] += int((batch["labels"][:, 1:] != -100).sum())  # next-token targets, as hetlm counts
        counted["padded"] += batch["labels"][:, 1:].numel()
        return batch

    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=round(0.05 * args.steps), lr_scheduler_type="cosine",
        max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True, seed=0, logging_steps=args.steps,
        disable_tqdm=True, train_sampling_strategy=sampling,
    )
    data = [{"input_ids": s} for s in sequences(prepared, args.max_len)]
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=counting_collator)
    started = time.perf_counter()
    metrics = trainer.train().metrics
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": counted["tokens"], "steps": args.steps,
            "final_loss": metrics.get("train_loss"), "padding": 1 - counted["tokens"] / counted["padded"]}


# (row label, runner, its settings); the first row is hetlm's defaults, the last two the HF anchors.
TRAINERS = [
    ("hetlm train_lm", run_hetlm, {}),
    ("HF Trainer, default random sampler", run_hf_trainer, {}),
    ("HF Trainer, group_by_length (tuned)", run_hf_trainer, {"sampling": "group_by_length"}),
]
ABLATIONS = [  # each speed setting of TrainConfig changed on its own
    ("hetlm train_lm, pack=True", run_hetlm, {"pack": True}),
    ("hetlm train_lm, adamw=for-loop", run_hetlm, {"adamw": "for-loop"}),
]
# torch.compile (TrainConfig.compile) is measured on its own (--ablate-compile): its compile workers outlive the
# run and slow whichever run comes next.
COMPILE = [("hetlm train_lm, compile=True", run_hetlm, {"compile": True})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each trainer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--presets", default="tiny,small", help="model presets (hetlm.models.PRESETS), comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer; the median is reported")
    parser.add_argument("--ablate", action="store_true", help="also hetlm with each speed setting changed")
    parser.add_argument("--ablate-compile", action="store_true", help="also hetlm with compile=True")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()

    from hetlm.models import build_model, count_parameters
    from hetlm.tokenizer import load_tokenizer

    prepared = prepared_taobao()
    vocab = len(load_tokenizer(prepared / "tokenizer"))
    peak_flops = matmul_flops()
    rows, summary, parameters = [], {}, {}
    for preset in args.presets.split(","):
        first = preset == args.presets.split(",")[0]
        trainers = TRAINERS + (ABLATIONS if args.ablate and first else []) + (COMPILE if args.ablate_compile and first else [])
        runs = {name: [] for name, _, _ in trainers}
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):  # interleaved, so a busy spell of the machine hits every trainer
                for name, run, settings in trainers:
                    torch.manual_seed(0)
                    model = build_model(preset, vocab)
                    parameters[preset] = count_parameters(model)
                    runs[name].append(run(model, prepared, args, Path(tmp) / f"{name}-{repeat}".replace(" ", "_"), **settings))
        rates = {}
        for name, repeats in runs.items():
            rates[name] = statistics.median(r["tokens"] / r["seconds"] for r in repeats)
            rows.append({"preset": preset, "trainer": name, "steps": repeats[0]["steps"],
                         "useful_tokens": repeats[0]["tokens"], "seconds": statistics.median(r["seconds"] for r in repeats),
                         "tokens_per_s": rates[name], "mfu": 6 * parameters[preset] * rates[name] / peak_flops,
                         "final_loss": repeats[0]["final_loss"], "padding": repeats[0].get("padding", "-")})
        summary[f"speedup_over_tuned_hf_{preset}"] = rates["hetlm train_lm"] / rates["HF Trainer, group_by_length (tuned)"]
        summary[f"speedup_over_default_hf_{preset}"] = rates["hetlm train_lm"] / rates["HF Trainer, default random sampler"]
    speedups = [summary[f"speedup_over_tuned_hf_{p}"] for p in args.presets.split(",")]
    record("bench_train", vars(args) | {"data": "taobao-sample", "parameters": parameters}, rows, summary | {
        "speedup_over_tuned_hf_min": min(speedups),
        "target_1_5x_over_tuned_met": min(speedups) >= 1.5,
        "fp32_matmul_gflops": peak_flops / 1e9,
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
