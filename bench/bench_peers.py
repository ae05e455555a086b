"""The recommenders a user would try instead of hetlm: RecBole SASRec, GRU4Rec and NARM, trained on the
training samples of the prepared logs of bench/logs.py and scored on the same test samples with hetlm's
own metrics.

Per log: the prepared folder -> RecBole's files (bench/peers/inputs.py) -> each peer trained in the
peers' own environment (bench/peers/train.py in bench/peers/.venv, made by `make peers`; one torch
thread, a cap on training CPU seconds, early stopping on validation NDCG@10) -> its page scores for every val and
test sample, read back here:

- ranking of the next session's first page: `hetlm.metrics.ranking_metrics`, full ranking over the page
  vocabulary, test samples whose first page is [UNK] left out (as hetlm's own evaluation does);
- a next-session set: the peer's top-m pages, m (1..--max-m) the one with the best mean IoU on the val
  samples, scored on the test samples with the paper's set metrics (`hetlm.metrics.evaluate_generations`).

    .venv/bin/python bench/bench_peers.py [--logs taobao msnbc globo] [--models SASRec GRU4Rec NARM]
                                          [--max-cpu-seconds 300]

A peer already trained under the same cap in --work is read back, not trained again (delete
--work/models to retrain).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, record
from bench.logs import LOGS, describe, prepared_log
from bench.peers.inputs import write_inputs

# isort: split
import numpy as np
import polars as pl

from hetlm.cluster.base import load_model
from hetlm.metrics import EvalResult, evaluate_generations, ndcg_at, page_ranks, paired_bootstrap, ranking_metrics
from hetlm.runs import RunFolder
from hetlm.set_decoder import SetDecoder
from hetlm.tokenizer import SPECIALS, load_tokenizer, page_vocabulary

PEERS_PYTHON = REPO / "bench" / "peers" / ".venv" / "bin" / "python"
DRIVER = REPO / "bench" / "peers" / "train.py"
MODELS = ("SASRec", "GRU4Rec", "NARM")
RANKING_METRICS = ("Recall@1", "Recall@10", "NDCG@10", "MRR")
SET_METRICS = ("HR", "IoA", "IoP", "IoU", "New-P")
PAIRED_METRICS = ("Recall@10", "NDCG@10", "IoU")
BOOTSTRAP = 2000


def train_peer(inputs: Path, out: Path, model: str, max_cpu_seconds: float) -> dict:
    """Run the driver in the peers' environment (unless `out` holds its result under this cap); its result.json."""
    done = out / "result.json"
    if done.exists() and json.loads(done.read_text())["settings"].get("max_cpu_seconds") == max_cpu_seconds:
        return json.loads(done.read_text())
    if not PEERS_PYTHON.exists():
        sys.exit(f"{PEERS_PYTHON} is missing: `make peers` creates the peers' environment")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([str(PEERS_PYTHON), str(DRIVER), str(inputs), str(out), "--model", model,
                    "--max-cpu-seconds", str(max_cpu_seconds)], env=env, check=True)
    return json.loads(done.read_text())


def top_pages(scores: np.ndarray, m: int, names: np.ndarray) -> list[list[str]]:
    """Each row's m best-scored pages (ties: lower token id first)."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    return names[best].tolist()


def set_scores(scores: np.ndarray, samples: pl.DataFrame, m: int, names: np.ndarray,
               vocabulary: set[str]) -> EvalResult:
    history = [[page for session in h for page in session] for h in samples["history"].to_list()]
    return evaluate_generations(top_pages(scores, m, names), samples["target"].to_list(), history, vocabulary)


def first_pages(samples: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's first next page id, and which of them are known pages (the ranked samples)."""
    first = np.array([ids[1] for ids in samples["target_ids"].to_list()])
    return first, first >= len(SPECIALS)


def first_page_ranking(scores: np.ndarray, samples: pl.DataFrame) -> dict[str, float]:
    first, known = first_pages(samples)
    ranking = ranking_metrics(scores[known], first[known])
    return {k: ranking[k] for k in RANKING_METRICS} | {"ranked": int(known.sum())}


def per_user(scores: np.ndarray, samples: pl.DataFrame, iou: list[float]) -> dict[str, np.ndarray]:
    """Each test user's Recall@10 and NDCG@10 of the first page (ranked users) and IoU (all users)."""
    first, known = first_pages(samples)
    ranks = page_ranks(scores[known], first[known])
    return {"Recall@10": (ranks <= 10).astype(float), "NDCG@10": ndcg_at(ranks, 10), "IoU": np.asarray(iou, float)}


def paired_gap(ours: np.ndarray, theirs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean per-user difference (ours - theirs) and its paired bootstrap 95% interval over users."""
    return paired_bootstrap(ours, theirs, n_boot=BOOTSTRAP, seed=seed)


def hetlm_per_user(run: Path, prepared: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per hetlm row of a quality run (bench/quality.py's run folder of this log), each test user's figures
    (`per_user`): the single LM ranks by its first-page log-probabilities, its set-decoder row by the
    decoder's page scores, as the run scored them. Empty when the run is missing or was prepared differently."""
    folder = RunFolder(run)
    if not (run / "results.json").exists() or not (folder.model("small") / "set_decoder.json").exists():
        return {}
    test, ran = (pl.read_parquet(path / "test.parquet") for path in (prepared, run / "prepared"))
    if ran["user"].to_list() != test["user"].to_list() or ran["input_ids"].to_list() != test["input_ids"].to_list():
        return {}
    results = folder.read_results().results
    model = load_model(folder.model("small")).models[0]
    decoder = SetDecoder.from_pretrained(folder.model("small"))
    inputs = test["input_ids"].to_list()
    evidence = decoder.evidence(model, inputs)
    scores = {"single": evidence.first_page_logprobs, "set decoder": decoder.page_scores(inputs, evidence)}
    out = {}
    for name, result in results.items():
        if result.kind in scores:
            out[name] = per_user(scores[result.kind], test, result.per_user_iou)
            recall = result.extra.get("Recall@10")
            if recall is not None and not np.isclose(out[name]["Recall@10"].mean(), recall):
                raise RuntimeError(f"{run}: {name} re-scored to Recall@10 {out[name]['Recall@10'].mean():.4f}, "
                                   f"the run recorded {recall:.4f}")
    return out


def evaluate_peer(folder: Path, prepared: Path, max_m: int, hetlm: dict[str, dict[str, np.ndarray]]) -> dict:
    """Ranking and top-m set metrics of one trained peer on the test samples, and each hetlm row's paired
    gap to it (`hetlm`: per-user figures from `hetlm_per_user`)."""
    tokenizer = load_tokenizer(prepared / "tokenizer")
    names = np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    vocabulary = set(page_vocabulary(tokenizer))
    val, test = (pl.read_parquet(prepared / f"{split}.parquet") for split in ("val", "test"))
    val_scores, test_scores = (np.load(folder / f"scores_{split}.npy") for split in ("valid", "test"))
    val_iou = {m: set_scores(val_scores, val, m, names, vocabulary).metrics["IoU"] for m in range(1, max_m + 1)}
    m = max(val_iou, key=lambda k: (val_iou[k], -k))
    sets = set_scores(test_scores, test, m, names, vocabulary)
    theirs = per_user(test_scores, test, sets.per_user["IoU"].to_list())
    paired = {name: {metric: paired_gap(ours[metric], theirs[metric]) for metric in PAIRED_METRICS}
              for name, ours in hetlm.items()}
    return (first_page_ranking(test_scores, test) | {"m": m, "val IoU": val_iou[m]}
            | {k: sets.metrics[k] for k in SET_METRICS} | {"paired": paired})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="+", default=list(LOGS), choices=LOGS)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--max-cpu-seconds", type=float, default=300.0, help="each peer's training cap (CPU seconds)")
    parser.add_argument("--max-m", type=int, default=20, help="largest top-m set tried on validation")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "peers")
    parser.add_argument("--hetlm-runs", type=Path, default=REPO / "runs" / "quality",
                        help="bench/quality.py's --work: its run of each log gives hetlm's per-user figures for the "
                             "paired intervals")
    args = parser.parse_args()

    rows, peers = [], {}
    for log in args.logs:
        prepared = prepared_log(log, args.work / "prepared")
        inputs = args.work / "inputs" / log
        counts = write_inputs(prepared, inputs)
        print(f"{log}: {counts} RecBole rows (train, valid, test)", flush=True)
        hetlm = hetlm_per_user(args.hetlm_runs / log, prepared)
        for model in args.models:
            folder = args.work / "models" / log / model
            result = train_peer(inputs, folder, model, args.max_cpu_seconds)
            peers[model] = result["settings"] | {"versions": result["versions"]}
            metrics = evaluate_peer(folder, prepared, args.max_m, hetlm)
            rows.append({"log": log, "peer": model} | metrics | {
                "train_s": result["train_seconds"], "train_cpu_s": result["train_cpu_seconds"],
                "epochs": result["epochs"], "best_epoch": result["best_epoch"],
                "stopped": result["stopped"], "val NDCG@10": result["best_valid_ndcg10"],
                "RecBole test NDCG@10": result["recbole_test"]["ndcg@10"], "train rows": result["train_rows"],
            })
    record("peers", {"logs": {log: describe(log) for log in args.logs}, "max_cpu_seconds": args.max_cpu_seconds,
                     "torch_threads": 1, "max_m": args.max_m, "peers": peers, "bootstrap": BOOTSTRAP}, rows,
           {f"best {metric} {log}": max(r[metric] for r in rows if r["log"] == log)
            for log in args.logs for metric in ("Recall@10", "NDCG@10", "IoU")})


if __name__ == "__main__":
    main()
