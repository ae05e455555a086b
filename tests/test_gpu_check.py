import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_cpu_smoke(taobao_prepared, tmp_path):
    """bench/gpu_check.sh --cpu-smoke: the GPU check's code at toy sizes, one line of results."""
    out = tmp_path / "gpu_check.jsonl"
    subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--prepared", str(taobao_prepared[0]),
                    "--out", str(out)], check=True, env=os.environ | {"PYTHON": sys.executable}, capture_output=True)
    (line,) = out.read_text().splitlines()
    result = json.loads(line)
    rows = {row["check"].split(":")[0]: row for row in result["rows"]}
    assert {"opt-350m", "smollm2-360m", "qwen2.5-0.5b"} <= set(rows) and result["settings"]["vocab"] == 10_000
    for preset in ("opt-350m", "smollm2-360m", "qwen2.5-0.5b"):
        assert rows[preset]["tokens_per_s"] > 0 and rows[preset]["users_per_s"] > 0
        assert math.isfinite(rows[preset]["final_loss"])
    hetlm = next(row for row in result["rows"] if row["check"].startswith("HeTLM epoch, 3 clusters"))
    assert hetlm["samples_per_s"] > 0
    assert result["summary"]["within_8_min"] and result["summary"]["ddp_step"].startswith("skipped")
