"""Next-session quality on every real log we hold: each LM decoder against every baseline.

For each log: `hetlm experiment` with only the single LM (tiny preset, early-stopped on the validation
users' next-session NLL), its greedy decoding (the paper's), its set decoder (fitted on the validation
users), the five heuristic baselines, and the outcome models (the LM's P(first page = Cart / Purchase), the
history logistic regression, and the LM's probability with history features). One line per log goes to
bench/results/quality.jsonl, with the best baseline of each metric and whether the best hetlm row beats it;
`bench/report.py` turns the latest line of each log into the QUALITY section of BENCHMARKS.md.

    .venv/bin/python bench/quality.py [--logs taobao-sample globo-user ...] [--work runs/quality]

Large logs are subsampled deterministically by a hash of the user id (the fraction is in the settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, SHIPPED, record  # noqa: E402
from logs import GLOBO_FRACTION, GLOBO_OPTIONS, MSNBC_VISITS, globo_subset, msnbc_head  # noqa: E402


from hetlm.experiment import ExperimentConfig, run_experiment  # noqa: E402
from hetlm.runs import RunResult  # noqa: E402

# TrainConfig's defaults (lr 1e-3, batch 32, validation every 200 steps and each epoch, patience 5) with up to
# 20 epochs: a harsher recipe (lr 3e-3, patience 3 evaluations 50 steps apart) stopped MSNBC's LM at step 450-800
# on validation noise, 0.04 NDCG@10 below where the same LM ends (docs/findings.md, "Training recipe").
PRETRAIN = {"epochs": 20}
PRETRAIN_SHOWN = {"lr", "batch_size", "epochs", "eval_every", "early_stopping_patience"}
SET_METRICS = ["HR", "IoA", "IoP", "IoU", "F1-Cart/Purchase"]
RANKING = ["Recall@1", "Recall@10", "NDCG@10", "MRR"]
OUTCOMES = ["AUC-cart", "AUC-purchase", "Brier-cart", "Brier-purchase"]
# What the best hetlm row must beat the best baseline on (where the log has outcomes, the last three too).
MIN_TEST_USERS = 30
BEATEN_ON = ["IoU", "HR", "F1-Cart/Purchase", "AUC-cart", "AUC-purchase"]


def globo_path(work: Path, fraction: float) -> Path:
    path = work / f"globo_{fraction:g}.parquet"
    return path if path.exists() else globo_subset(path, fraction)


def msnbc_path(work: Path, visits: int) -> Path:
    path = work / f"msnbc_{visits}.seq"
    return path if path.exists() else msnbc_head(path, visits)


def logs(work: Path, globo_fraction: float, msnbc_visits: int) -> dict[str, dict]:
    """name -> experiment settings (source, path, options, prepare) of each log."""
    taobao_prepare = {"max_train_targets_per_user": 3}
    return {
        "taobao-sample": {"source": "taobao", "path": str(SHIPPED), "prepare": taobao_prepare},
        "taobao-head": {"source": "taobao", "path": str(SHARED_DATA / "taobao-userbehavior" / "UserBehavior_head.csv"),
                        "prepare": taobao_prepare | {"on_bad_rows": "skip"}},
        "globo-time": {"source": "generic", "path": lambda: str(globo_path(work, globo_fraction)),
                       "source_options": GLOBO_OPTIONS, "prepare": {"split": "time", "max_train_targets_per_user": 3},
                       "subsample": f"users with hash < {globo_fraction:g}"},
        "globo-user": {"source": "generic", "path": lambda: str(globo_path(work, globo_fraction)),
                       "source_options": GLOBO_OPTIONS, "prepare": {"split": "user"},
                       "subsample": f"users with hash < {globo_fraction:g}"},
        "msnbc": {"source": "msnbc", "path": lambda: str(msnbc_path(work, msnbc_visits)), "prepare": {},
                  "subsample": f"first {msnbc_visits} visits"},
        "rees46": {"source": "rees46", "path": str(next((SHARED_DATA / "rees46-sample").glob("*.csv*"), "")), "prepare": {}},
        "ga360": {"source": "ga360", "path": str(next((SHARED_DATA / "ga360-merchandise-store").glob("*.json*"), "")),
                  "prepare": {}},
    }


def rows_of(run: RunResult) -> list[dict]:
    """One row per model: set metrics, ranking of the first page, outcome AUC / Brier where computed."""
    rows = []
    for name, r in run.results.items():
        row = {"model": name, "kind": r.kind}
        row |= {m: r.combined.get(m) for m in SET_METRICS}
        row |= {m: r.extra.get(m) for m in RANKING}
        row |= {m: (r.outcomes or {}).get(m) for m in OUTCOMES}
        rows.append(row)
    for name, summary in run.outcome_baselines.items():
        rows.append({"model": name, "kind": "baseline" if name.startswith("baseline") else "outcome model"}
                    | {m: summary.get(m) for m in OUTCOMES})
    return rows


def verdicts(rows: list[dict], has_outcomes: bool) -> dict:
    """Per metric the best hetlm row, the best baseline row and whether the first beats the second."""
    out = {}
    for metric in BEATEN_ON:
        if metric not in ("IoU", "HR") and not has_outcomes:
            continue
        def best(kinds):
            found = [(r[metric], r["model"]) for r in rows if r["kind"] in kinds and _number(r.get(metric))]
            return max(found) if found else (None, None)
        ours, ours_name = best({"single", "set decoder", "outcome model"})
        theirs, theirs_name = best({"baseline"})
        out[metric] = {"hetlm": ours_name, "hetlm_value": ours, "baseline": theirs_name, "baseline_value": theirs,
                       "beaten": None if ours is None or theirs is None else ours > theirs,
                       "gap": None if ours is None or theirs is None else ours - theirs}
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value


def run_log(name: str, spec: dict, work: Path) -> None:
    path = spec["path"]() if callable(spec["path"]) else spec["path"]
    config = ExperimentConfig.model_validate({
        "name": f"quality {name}", "source": spec["source"], "path": path,
        "source_options": spec.get("source_options", {}), "prepare": spec["prepare"],
        "pretrain": PRETRAIN, "encoder": {"name": "pagebag"},
        "kmeans": {"enabled": False}, "hetlm": {"enabled": False}, "larger": {"enabled": False},
        "bert_score": False, "outcome_samples": 0,
    })
    started = time.perf_counter()
    try:
        run = run_experiment(config, work / name, progress=False)
    except ValueError as err:  # e.g. a log too small to yield test users
        print(f"{name}: not measured: {err}")
        record("quality", {"log": name, "source": spec["source"], "path": path, "not_measured": str(err)}, [], {})
        return
    data = run.data
    if data["samples"]["test"] < MIN_TEST_USERS or not data["samples"]["val"]:
        reason = (f"{data['samples']['test']} test and {data['samples']['val']} validation users: too few to compare "
                  f"models (at least {MIN_TEST_USERS} test users and some validation users needed)")
        print(f"{name}: not measured: {reason}")
        record("quality", {"log": name, "source": spec["source"], "path": path, "not_measured": reason}, [], {})
        return
    rows = rows_of(run)
    has_outcomes = any(_number(r.get("AUC-cart")) or _number(r.get("AUC-purchase")) for r in rows)
    settings = {"log": name, "source": spec["source"], "path": path, "subsample": spec.get("subsample", "all"),
                "split": config.prepare.split, "samples": data["samples"], "users": data["users"], "pages": data["pages"],
                "pretrain": config.pretrain.model_dump(include=PRETRAIN_SHOWN), "preset": config.model.preset,
                "seconds": round(time.perf_counter() - started, 1),
                "set_decoder": next((r.decoder for r in run.results.values() if r.decoder is not None), None)}
    record("quality", settings, rows, {"verdicts": verdicts(rows, has_outcomes)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="*", default=None, help="which logs (default: all)")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--globo-fraction", type=float, default=GLOBO_FRACTION)
    parser.add_argument("--msnbc-visits", type=int, default=MSNBC_VISITS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    specs = logs(args.work, args.globo_fraction, args.msnbc_visits)
    for name in args.logs or list(specs):
        run_log(name, specs[name], args.work)


if __name__ == "__main__":
    main()
