# The two commands of the quick start: `make demo` and `make test`. Both create .venv on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all bench install clean

$(VENV)/.installed: pyproject.toml tools/install.sh tools/build_learn2learn.sh
	bash tools/install.sh

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m metaray.platform.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu or gpu"

# The peers (higher, torchopt, boat-torch, learn2learn) get their own .venv-bench; see tools/setup_bench_env.sh.
# `make bench BENCH_ARGS=--quick` checks the results page builds in a few minutes.
bench: $(VENV)/.installed
	bash tools/setup_bench_env.sh
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench build
