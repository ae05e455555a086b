"""Peak memory of `hetlm score` as the log grows: partitioned (`--partitions`) against in memory.

Generates a Taobao UserBehavior CSV of --events events (bench_scale's generator: the shipped sample's page,
behaviour and events-per-user frequencies; deterministic), trains a tiny LM with a 128-token context for
--train-steps steps on the shipped sample (timing and memory only: the predictions are not the point), then
scores, each in a child process whose RSS is read back:

1. prefixes of the log (--prefix-events) and the whole log, partitioned with partitions = events /
   --events-per-partition: peak RSS while scoring (the peak is reset after loading the model, which peaks
   higher) and that peak above the RSS with the model loaded, against the log size;
2. the whole log in memory (partitions=1): the same rows (checked), and its memory.

    .venv/bin/python bench/bench_score.py [--events 2000000] [--events-per-partition 250000]

Scoring settings: greedy next session of --max-new-tokens pages, top 10 pages, no outcome draws
(--n-samples 0): the decoder's cost is the same whichever way the log is read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_scale import partitions_for, with_prefixes, write_log
from bench.common import SHIPPED, peak_rss_mb, record

# isort: split
import polars as pl


CONTEXT = 128  # tokens: short prompts keep the decoder's share of time and memory small beside the log's


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or the last reset) of this process."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(model: str, log: str, out: str, partitions: str, max_new_tokens: str, n_samples: str) -> None:
    from hetlm.score import ScoreConfig, Scorer, score_log

    scorer = Scorer.from_pretrained(model, max_new_tokens=int(max_new_tokens))
    loaded = status_mb("VmRSS")
    # Loading torch, transformers and the model peaks above what scoring needs: reset the peak, so the one
    # read at the end is the scoring's.
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    summary = score_log(scorer, "taobao", log, out, ScoreConfig(n_samples=int(n_samples)), progress=False,
                        partitions=int(partitions))
    print(json.dumps({"seconds": time.perf_counter() - started, "rss_model_loaded_mb": loaded,
                      "peak_rss_mb": status_mb("VmHWM"), "peak_rss_with_loading_mb": peak_rss_mb(),
                      "users_in_log": summary.users_in_log,
                      "users_scored": summary.users_scored}))


def run_score(model: Path, log: Path, out: Path, partitions: int, args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(log), str(out), str(partitions),
                           str(args.max_new_tokens), str(args.n_samples)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"score failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_model(workdir: Path, steps: int) -> Path:
    import torch

    from hetlm.models import build_model
    from hetlm.prepare import PrepareConfig, prepare
    from hetlm.tokenizer import load_tokenizer
    from hetlm.train import TrainConfig, train_lm

    prepared = workdir / "prepared"
    prepare("taobao", SHIPPED, prepared, PrepareConfig(max_len=CONTEXT))
    tokenizer = load_tokenizer(prepared / "tokenizer")
    torch.manual_seed(0)
    train_lm(build_model("tiny", len(tokenizer), max_positions=CONTEXT), pl.read_parquet(prepared / "train.parquet"), None,
             TrainConfig(max_steps=steps, early_stopping_patience=None, save_every=10**9), workdir / "lm",
             progress=False)
    tokenizer.save_pretrained(workdir / "lm" / "best" / "tokenizer")  # as `hetlm train` saves it
    return workdir / "lm" / "best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--prefix-events", type=int, nargs="*", default=[500_000])
    parser.add_argument("--events-per-partition", type=int, default=250_000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hetlm-bench-score"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)

    model = train_model(args.workdir, args.train_steps)
    log = args.workdir / "UserBehavior_generated.csv"
    n_events = write_log(log, args.events, args.seed)
    logs = with_prefixes(log, n_events, args.prefix_events, args.workdir)

    rows, runs = [], {}
    for name, path, n in logs + [("full log, in memory", log, n_events)]:
        partitions = 1 if name.endswith("in memory") else partitions_for(n, args.events_per_partition)
        out = args.workdir / f"{name.replace(' ', '_').replace(',', '')}.parquet"
        runs[name] = run = run_score(model, path, out, partitions, args) | {"out": out}
        rows.append({"run": name if partitions == 1 else f"{name}, partitioned", "events": n, "partitions": partitions,
                     "users_scored": run["users_scored"], "seconds": run["seconds"],
                     "users_per_s": run["users_scored"] / run["seconds"], "peak_rss_mb": run["peak_rss_mb"],
                     "peak_above_model_mb": run["peak_rss_mb"] - run["rss_model_loaded_mb"]})

    full, in_memory, smallest = runs["full log"], runs["full log, in memory"], runs[logs[0][0]]
    same = pl.read_parquet(full["out"]).sort("user").drop("top_probs").equals(
        pl.read_parquet(in_memory["out"]).sort("user").drop("top_probs"))
    if not same:
        raise AssertionError("partitioned and in-memory scoring wrote different rows")
    above = {name: run["peak_rss_mb"] - run["rss_model_loaded_mb"] for name, run in runs.items()}
    record("bench_score", vars(args) | {"workdir": str(args.workdir), "model": f"tiny, {args.train_steps} steps"}, rows, {
        "log_events": n_events, "users_in_log": full["users_in_log"],
        "partitioned_peak_above_model_full_over_smallest": above["full log"] / above[logs[0][0]],
        "events_full_over_smallest": n_events / logs[0][2],
        "in_memory_peak_above_model_over_partitioned": above["full log, in memory"] / above["full log"],
        "rows_equal_partitioned_vs_in_memory": same,
        "smallest_peak_rss_mb": smallest["peak_rss_mb"], "full_partitioned_peak_rss_mb": full["peak_rss_mb"],
        "full_in_memory_peak_rss_mb": in_memory["peak_rss_mb"],
    })
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
