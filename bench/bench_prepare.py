"""`hetlm prepare` events/s against the same steps written in pandas, on MSNBC (4.7M page views).

The pandas pipeline is what a user would write with vectorised pandas (string split, explode, shift,
groupby, quantile): read the .seq from the zip, name the pages, collapse immediate repeats, drop
visits shorter than 2 pages, truncate visits above the 99th-percentile length, cut each visit into a
history (first half) and a target (the rest), split by target time (last 10 % test, 5 % before val),
build the vocabulary from training sessions and map pages to ids. It must give the same number of
samples per split as hetlm. Each pipeline runs in its own process (peak RSS is per process).

    .venv/bin/python bench/bench_prepare.py [--repeats 1] [--visits 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED_DATA, peak_rss_mb, record

MSNBC = SHARED_DATA / "msnbc" / "msnbc990928.zip"
BOS, EOS, FIRST_PAGE_ID = 2, 3, 4


def seq_file(visits: int, folder: Path) -> Path:
    """The MSNBC zip, or a .seq of its first `visits` visits (0 = all)."""
    if not visits:
        return MSNBC
    lines = zipfile.ZipFile(MSNBC).read("msnbc990928.seq").decode().split("\n")
    header = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("%"))
    path = folder / "msnbc_head.seq"
    path.write_text("\n".join(lines[:header + 1 + visits]) + "\n")
    return path


def run_hetlm(path: str, out: str) -> dict:
    from hetlm.prepare import prepare

    started = time.perf_counter()
    summary = prepare("msnbc", path, out)
    return {"seconds": time.perf_counter() - started, "events": summary["events_read"],
            "samples": summary["samples"], "peak_rss_mb": peak_rss_mb()}


def run_pandas(path: str, test_fraction: float = 0.1, val_fraction: float = 0.05) -> dict:
    import numpy as np
    import pandas as pd

    started = time.perf_counter()
    raw = zipfile.ZipFile(path).read("msnbc990928.seq") if zipfile.is_zipfile(path) else Path(path).read_bytes()
    lines = pd.Series(raw.decode().split("\n"))
    lines = lines[(lines.str.strip() != "") & ~lines.str.startswith("%")]
    names = dict(enumerate(lines.iloc[0].split(), start=1))
    visits = lines.iloc[1:].reset_index(drop=True).str.split()
    events = visits.explode().dropna().astype(int).map(names).rename("page").rename_axis("user").reset_index()
    n_events = len(events)

    repeat = (events["page"] == events["page"].shift()) & (events["user"] == events["user"].shift())
    sessions = events[~repeat].groupby("user")["page"].agg(list)
    lengths = sessions.str.len()
    sessions = sessions[lengths >= 2]
    cutoff = int(np.quantile(sessions.str.len(), 0.99, method="higher"))
    sessions = sessions.str[:cutoff]

    pages = sessions.explode().to_frame("page")
    first_half = pages.groupby(level=0).cumcount() < (sessions.str.len() // 2).reindex(pages.index)
    history = pages[first_half].groupby(level=0)["page"].agg(list)
    target = pages[~first_half].groupby(level=0)["page"].agg(list)
    target_start = sessions.index.to_numpy() * 100_000 + 1  # a visit's clock is its index (as hetlm's)
    t_test = np.quantile(target_start, 1 - test_fraction, method="higher")
    t_val = np.quantile(target_start, 1 - test_fraction - val_fraction, method="higher")
    split = pd.Series(np.select([target_start >= t_test, target_start >= t_val], ["test", "val"], "train"),
                      index=sessions.index)

    # Vocabulary: pages of sessions that start before the val cutoff, most frequent first.
    train_pages = pd.concat([history[target_start - 1 < t_val], target[target_start < t_val]]).explode()
    counts = train_pages.value_counts().rename("n").rename_axis("page").reset_index()
    counts = counts.sort_values(["n", "page"], ascending=[False, True])
    vocab = dict(zip(counts["page"], range(FIRST_PAGE_ID, FIRST_PAGE_ID + len(counts))))

    def ids(column: pd.Series) -> pd.Series:
        exploded = column.explode()
        mapped = exploded.map(vocab).fillna(1).astype(int)  # [UNK] = 1
        return mapped.groupby(level=0).agg(list).map(lambda x: [BOS, *x, EOS])

    samples = pd.DataFrame({"split": split, "history": history, "target": target,
                            "input_ids": ids(history), "target_ids": ids(target)})
    return {"seconds": time.perf_counter() - started, "events": n_events,
            "samples": samples["split"].value_counts().reindex(["train", "val", "test"]).to_dict(),
            "peak_rss_mb": peak_rss_mb()}


def in_child(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--visits", type=int, default=0, help="first N visits of MSNBC only (0 = all 989,818)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(seq_file(args.visits, Path(tmp)))
        runs = {"hetlm": [], "pandas": []}
        for _ in range(args.repeats):  # interleaved, so machine load falls on both alike
            runs["hetlm"].append(in_child(run_hetlm, path, str(Path(tmp) / "out")))
            runs["pandas"].append(in_child(run_pandas, path))
    best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
    if {k: int(v) for k, v in best["pandas"]["samples"].items()} != best["hetlm"]["samples"]:
        raise AssertionError(f"sample counts differ: hetlm {best['hetlm']['samples']} pandas {best['pandas']['samples']}")
    rows = [{"pipeline": name, "events": r["events"], "seconds": r["seconds"], "events_per_s": r["events"] / r["seconds"],
             "peak_rss_mb": r["peak_rss_mb"], "samples": sum(r["samples"].values())} for name, r in best.items()]
    record("bench_prepare", vars(args) | {"data": "msnbc"}, rows, {
        "speedup_hetlm_over_pandas": best["pandas"]["seconds"] / best["hetlm"]["seconds"],
        "peak_rss_ratio_hetlm_over_pandas": best["hetlm"]["peak_rss_mb"] / best["pandas"]["peak_rss_mb"],
        "same_samples_per_split": True,
    })


if __name__ == "__main__":
    main()
