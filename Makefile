# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch lies on this machine's disk; a bare `torch` requirement would pull a
# multi-GB CUDA build, so the exact version is installed first and the project's range accepts it.
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint bench clean

$(BIN)/activate: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,multislice]"
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv
	$(BIN)/python -m ccstae_hpc.demo --out demo_out

test: venv
	$(BIN)/ruff check ccstae_hpc flows tests benchmarks
	$(BIN)/python -m pytest -q -x -rs --timeout=1200

bench: venv
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf demo_out .pytest_cache
