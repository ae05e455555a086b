import gzip
import itertools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting slow torch 10x or more when the CPU is shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "taobao-sample" / "UserBehavior_sample.csv.gz"
SHARED_DATA = Path(os.environ.get("HETLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shipped_head(path: Path, rows: int) -> Path:
    """The first `rows` rows of the shipped Taobao sample, written to `path` as plain CSV."""
    with gzip.open(SHIPPED, "rt") as f:
        path.write_text("".join(itertools.islice(f, rows)))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (set HETLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def taobao_prepared(tmp_path_factory):
    """The shipped Taobao sample prepared with default settings (shared by several tests)."""
    from hetlm.prepare import prepare

    out = tmp_path_factory.mktemp("taobao_prepared")
    summary = prepare("taobao", SHIPPED, out)
    return out, summary


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """Every stage of `hetlm experiment` on the first 12,000 rows of the shipped Taobao sample, a few steps each
    (the report tests read it; the CLI test runs its config.json again and must get the same metrics)."""
    from hetlm.experiment import ExperimentConfig, run_experiment

    root = tmp_path_factory.mktemp("report")
    log = shipped_head(root / "log.csv", 12_000)
    config = ExperimentConfig.model_validate({
        "name": "report test", "path": str(log),
        "prepare": {"max_train_targets_per_user": 1, "max_len": 128},
        "pretrain": {"max_steps": 12, "batch_size": 32, "eval_every": 6, "max_len": 128},
        "encoder": {"name": "pagebag", "cache_dir": str(root / "cache")},
        "kmeans": {"n_clusters": 2, "finetune": {"max_steps": 4, "batch_size": 32, "eval_every": 2, "max_len": 128}},
        "hetlm": {"runs": [[5, 9], {"alpha": 0, "beta": 0, "l1": "centered"}],
                  "config": {"n_clusters": 3, "epochs": 1, "batch_size": 16, "selector_pretrain_epochs": 20,
                             "eval_every": 3, "max_len": 128}},
        "larger": {"factor": 1.5},
        "generation": {"max_new_tokens": 6},
        "bert_score": False, "outcome_samples": 2, "extra_routings": ["likelihood"],
    })
    run_experiment(config, root / "run", progress=False)
    return root / "run"
