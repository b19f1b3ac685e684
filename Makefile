# The two commands of the README: `make test` and `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/synthetic
# glibc's allocator, tuned for XLA:CPU (BENCHMARKS.md, "glibc malloc tunables"): every step, XLA
# allocates its temporaries (219 MB for the synthetic CLIP's pretraining step) and Eigen its
# contraction blocks, which glibc maps fresh and unmaps again, so the kernel zeroes and faults
# them in page by page (sys time was 28% of `make demo`'s CPU time). Keep freed memory
# (trim_threshold), serve up to 32 MB from the heap (mmap_threshold), grow it in 64 MB steps
# (top_pad) and back larger blocks with transparent huge pages (hugetlb=1, glibc >= 2.35). Results
# are bit-identical; glibc reads this only at process start, and other C libraries ignore it.
# `make GLIBC_TUNABLES= demo` runs without it; export the same value for runs outside make.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=68719476736:glibc.malloc.mmap_threshold=33554432:glibc.malloc.top_pad=67108864
export GLIBC_TUNABLES

.PHONY: test demo venv venv-test bench-torch clean print-tunables

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

# `export $(make -s print-tunables)` gives a shell the same allocator settings for runs outside make.
print-tunables:
	@echo GLIBC_TUNABLES=$(GLIBC_TUNABLES)

clean:
	rm -rf $(VENV) .pytest_cache
