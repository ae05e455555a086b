#!/usr/bin/env bash
# The GPU check in one command (under 8 minutes on one GPU, no network): each paper preset trains 50 bf16
# steps over a 10k-page vocabulary and generates for 500 users, one HeTLM epoch with 3 clusters, and a
# 2-process torchrun step with 2+ GPUs; writes bench/results/gpu_check.jsonl (see bench/gpu_check.py).
#
#   bash bench/gpu_check.sh [--prepared DIR]     # on a GPU machine
#   bash bench/gpu_check.sh --cpu-smoke          # the same code at toy sizes on the CPU (a test runs it)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$repo/bench/gpu_check.py" "$@"
