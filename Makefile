# The two commands of the README: `make test` and `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/synthetic

.PHONY: test demo venv venv-test bench-torch clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: requirements.txt requirements-nodeps.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.runtime-installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

venv: $(VENV)/.runtime-installed
venv-test: $(VENV)/.test-installed

test: venv-test
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m eees_jax.main --config=configs/synthetic.py --workdir=$(WORKDIR)

# JAX against PyTorch on the same RN50 model (bench/vs_torch.py; PyTorch from the test extras).
# About 35 minutes on 2 CPU cores (--rounds=2 took 25); writes its section of BENCHMARKS.md.
bench-torch: venv-test
	$(BIN)/python -m bench.vs_torch $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
