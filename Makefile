# mt4ssl: `make demo` (the main job) and `make test`; both set everything up from nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_TOOLS := espeak-ng flite sox libsndfile1
# a single-node SLURM cluster for the launch fault tests (tools/slurm_local.py); optional
DEB_OPTIONAL := slurm-wlm munge

.PHONY: setup sysdeps demo reproduce test bench bench-kmeans lock clean-demo

setup: $(STAMP) sysdeps

# The pinned stack (constraints.txt) and the package in editable mode; redone only when
# pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e ".[test,superb,decode]"
	touch $@

# Debian tools for the synthetic corpus: installed when missing and running as root; SLURM
# and munge too when root (without them the real-cluster tests are skipped, saying why).
sysdeps:
	@bash tools/sysdeps.sh $(DEB_TOOLS)
	@bash tools/sysdeps.sh --optional $(DEB_OPTIONAL)

demo: setup
	bash recipes/tiny/run.sh

# MT4SSL vs HuBERT-like vs data2vec-like at CPU scale, 2 seeds each (about an hour on 2 cores)
reproduce: setup
	bash recipes/tiny/reproduce.sh

test: setup
	$(PY) -m pytest -q

# on a CPU the GPU benchmark runs the tiny preset at a small batch; on a GPU: make bench GPU_BENCH=
GPU_BENCH ?= --set model.preset=tiny model.teacher.top_k=3 --batch-samples 320000 --seconds 4 --updates 10 --warmup 2 --threads 1
bench: setup
	bash recipes/tiny/run.sh --stop-stage 4
	$(PY) benchmarks/offline_targets.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/train_throughput.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/compile_step.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/gpu_throughput.py $(GPU_BENCH)

# k-means at LibriSpeech size (results/perf.md, "k-means at scale"): about 15 min on one core
bench-kmeans: setup
	bash recipes/tiny/run.sh --stop-stage 2
	OMP_NUM_THREADS=1 $(PY) benchmarks/kmeans_scale.py --dim 39 --threads 1
	OMP_NUM_THREADS=1 $(PY) benchmarks/kmeans_scale.py --dim 768 --threads 1

# Re-pin the tested stack from the current venv.
lock: $(STAMP)
	{ echo "# Tested stack (Python 3.11, x86_64). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -vi '^mt4ssl'; } > constraints.txt

clean-demo:
	rm -rf exp/tiny
