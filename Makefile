# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch lies on this machine's disk; a bare `torch` requirement would pull a
# multi-GB CUDA build, so the exact version is installed first and the project's range accepts it.
TORCH ?= torch==2.13.0
# py4DSTEM's benchmark-only environment (see bench-peers below)
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.py4dstem-0.14.18
# test processes (pytest-xdist): the two cores here; tests/conftest.py keeps the tests that
# share an expensive session fixture in one process and starts the longest groups first.
# OpenMP's threads wait passively in tests: two processes training torch at once took 91 s
# with spinning threads, 42 s without (26 s alone; results identical to the bit)
TEST_PROCS ?= 2

.PHONY: venv demo test lint bench bench-all clean

# compileall: an editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set
# (this machine) every command, Dask worker and test process compiled the project's modules
# again, 0.3-0.5 s each (python -X importtime, 2026-12-07); a stale file is ignored
$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,multislice]"
	$(BIN)/python -m compileall -q ccstae_hpc flows benchmarks
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv
	$(BIN)/python -m ccstae_hpc.demo --out demo_out

test: venv
	$(BIN)/ruff check ccstae_hpc flows tests benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -x -rs --timeout=1200 --durations=30 \
		-n $(TEST_PROCS) --dist loadgroup --no-loadscope-reorder

# The report's benchmarks (~30 min on 2 cores), then benchmarks/REPORT.md with its plots;
# bench-all also runs the others (ingest of 4 GB, 1 GB vs 8 GB memory, ...), each by hand.
# The abTEM comparison is bench_dose's abTEM rows (bench_multislice, in bench-all, repeats
# its noise-free and 1e5 e- cases with an in-script per-pattern CoM)
REPORT_BENCHES := bench_peers bench_training bench_dose bench_efficiency bench_memory \
	bench_gpu_projection bench_ablation

bench: venv $(PEERS_STAMP)
	for b in $(REPORT_BENCHES); do t=$$(date +%s); $(BIN)/python benchmarks/$$b.py || exit 1; \
		echo "make bench: $$b took $$(( $$(date +%s) - t )) s"; done
	$(BIN)/python benchmarks/report.py

bench-all: venv $(PEERS_STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
	$(BIN)/python benchmarks/report.py

# Peer benchmark: py4DSTEM 0.14.18 needs numpy<2, so it gets its own environment, created once
# (the stamp is written only after the install succeeded; PEERS_STAMP is defined at the top)

.PHONY: bench-peers

$(PEERS_STAMP):
	test -d $(PEERS) || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q "py4DSTEM==0.14.18" "numpy<2"
	touch $(PEERS_STAMP)

bench-peers: venv $(PEERS_STAMP)
	$(BIN)/python benchmarks/peers/check_py4dstem.py --single-phase
	$(BIN)/python benchmarks/peers/check_py4dstem.py

clean:
	rm -rf demo_out .pytest_cache
