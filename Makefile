# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the main job (prune, retrain, bench, report) on built-in synthetic data
#   make test   - set up, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv test demo bench recovery lint gpu-check postgres mutants

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,yolo]'
	touch $(STAMP)

venv: $(STAMP)

# tests/test_compress.py starts a real PostgreSQL server (a search study shared by workers): installed
# on a fresh Debian machine, quietly, only when missing (a few seconds of apt once; nothing after)
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  SUDO=""; [ "$$(id -u)" -ne 0 ] && SUDO="sudo"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	fi

# The suite runs on 2 pytest-xdist workers (each uses one torch thread: tests/conftest.py). loadfile
# keeps a test file on one worker, so a module's fixtures are built once; --no-loadscope-reorder keeps
# the conftest's longest-file-first order (xdist would otherwise order files by their number of tests).
# TEST_WORKERS=0 runs it in one process. docs/contributing.md: "Run the tests".
TEST_WORKERS ?= 2
test: $(STAMP) postgres  # PYTEST_ARGS: extra pytest options (CI: --durations=15)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/surgery sweep recipes/quickstart.yaml

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/python benchmarks/prune_speed.py --csv benchmarks/prune_speed.csv

DEVICE ?= cpu
# slow: two data seeds, so roughly twice a one-seed run, which took about an hour from scratch on 2 shared
# cores when it swept three families (five now, not re-timed; docs/benchmarks/accuracy.md); DEVICE=cuda on a GPU
recovery: $(STAMP)
	$(BIN)/python benchmarks/recovery_families.py --device $(DEVICE) --seeds 0,1

lint: $(STAMP)
	$(BIN)/ruff check surgery cli tests benchmarks

# A mutation pass over the pruning pipeline against its own tests (benchmarks/mutants.py: a fixed
# list of plausible bugs, each applied to a copy of the tree); lists the survivors. ~15 min on 2 cores.
mutants: $(STAMP)
	$(BIN)/python benchmarks/mutants.py

# On a machine with a CUDA device, as one script within 540 s of device time (benchmarks/gpu_check.py):
# the `gpu` tests, --keep-latency on CUDA re-measured by bench, then GPU latency (benchmarks/gpu_latency.csv).
# GPU_PY=python3 uses an existing interpreter (one that has surgery's dependencies) instead of .venv.
ifdef GPU_PY
gpu-check:
else
GPU_PY := $(BIN)/python
gpu-check: $(STAMP)
endif
	$(GPU_PY) benchmarks/gpu_check.py
