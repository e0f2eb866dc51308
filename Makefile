# The two commands of the quick start: `make demo` and `make test`. Both create .venv on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench install clean

$(VENV)/.installed: pyproject.toml tools/install.sh tools/build_learn2learn.sh
	bash tools/install.sh

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m metaray.platform.cli demo

# `make test` is what CI runs: every test, the slow ones included (after the install: ~15 min on a quiet 2-core machine, 873 s
# measured; a loaded one took 1548-1849 s). It prints the 25 slowest.
# `make test-fast` is the default pytest selection (`-m 'not slow'`, ~3 min) for the edit-test loop.
# GPU tests are marked `gpu` and skip cleanly where torch sees no CUDA device.
# The monitoring tests need a real Prometheus: tools/install_monitoring.sh installs it (once; not for `make demo`).
test: $(VENV)/.installed
	bash tools/install_monitoring.sh
	$(PY) -m pytest -q -m "slow or not slow" --durations=25

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q

# The peers (higher, torchopt, boat-torch, learn2learn) get their own .venv-bench; see tools/setup_bench_env.sh.
# `make bench BENCH_ARGS=--quick` checks the results page builds in a few minutes.
bench: $(VENV)/.installed
	bash tools/setup_bench_env.sh
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench build
