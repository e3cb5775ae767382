# Two commands on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moda-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv demo ui test test-gpu gpu-wheels gpu-smoke lint repro-cpu repro-cpu-paper repro-cpu-phase sweep-cpu sweep-cpu-seeds clean

# The venv is (re)built when the dependency pins change. constraints.txt pins
# every transitive package of a set known to install offline (pip freeze).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moda demo --config configs/demo.yaml

# After `make demo`: browse its flow runs and artifacts (Ctrl-C stops the server).
ui: $(STAMP)
	$(VENV)/bin/moda ui

# One pytest-xdist worker a core (each tied to its own: tests/conftest.py), a test module's tests
# on one worker (its module fixtures made once); `make test TEST_WORKERS=0` runs them in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadscope

# MoDE's table on 2 CPU cores (<= 90 min): bench/results/repro_cpu_*.md holds a measured run.
repro-cpu: $(STAMP)
	$(VENV)/bin/moda synth configs/repro-cpu.yaml
	$(VENV)/bin/moda run configs/repro-cpu.yaml

# The paper's accounting on the same data and model (<= 90 min): bench/results/repro_cpu_paper_*.md.
repro-cpu-paper: $(STAMP)
	$(VENV)/bin/moda synth configs/repro-cpu-paper.yaml
	$(VENV)/bin/moda run configs/repro-cpu-paper.yaml

repro-cpu-phase: $(STAMP)
	$(VENV)/bin/moda synth configs/repro-cpu-phase.yaml
	$(VENV)/bin/moda run configs/repro-cpu-phase.yaml

# The scaling-law sweep on 2 CPU cores (<= 45 min): bench/results/sweep_cpu_*.md holds a measured run.
sweep-cpu: $(STAMP)
	$(VENV)/bin/moda synth configs/sweep-cpu.yaml
	$(VENV)/bin/moda sweep configs/sweep-cpu.yaml

sweep-cpu-seeds: $(STAMP)
	$(VENV)/bin/moda synth configs/sweep-cpu-seeds.yaml
	$(VENV)/bin/moda sweep configs/sweep-cpu-seeds.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Tests marked gpu: on a CPU every one is skipped, each with its reason, and the command exits 0.
test-gpu: $(STAMP)
	$(PY) -m pytest -v -ra -m gpu

# The wheels bench/gpu/run.sh needs on a bare device (bench/gpu/wheels.txt), into .whl/ (ignored by git).
gpu-wheels:
	mkdir -p .whl
	grep -v '^#' bench/gpu/wheels.txt | xargs $(PYTHON) -m pip download -q --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
	du -ch .whl/*.whl | tail -1

# The GPU suite's code paths at toy sizes on this CPU (what CI runs through tests/bench/test_gpu_suite.py).
gpu-smoke: $(STAMP)
	bash bench/gpu/run.sh --smoke runs/gpu-smoke

clean:
	rm -rf runs .prefect data/demo
