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
