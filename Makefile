# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The RecBole peers (bench/bench_peers.py) in an environment of their own: RecBole 1.2.1 needs numpy < 2.
PEERS_VENV := bench/peers/.venv
PEERS_STAMP := $(PEERS_VENV)/.installed
# Each peer's training cap in CPU seconds (about 5 minutes, as a user trying them would give them).
PEERS_CPU_SECONDS ?= 300
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test peers clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel on disk; a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

$(PEERS_STAMP): bench/peers/requirements.txt
	test -d $(PEERS_VENV) || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -r bench/peers/requirements.txt
	touch $(PEERS_STAMP)

# RecBole SASRec, GRU4Rec, NARM on the benchmark logs -> bench/results/peers.jsonl -> BENCHMARKS.md.
peers: $(STAMP) $(PEERS_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/bench_peers.py --max-cpu-seconds $(PEERS_CPU_SECONDS)
	$(BIN)/python bench/report.py

demo: $(STAMP)
	$(BIN)/hetlm demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
