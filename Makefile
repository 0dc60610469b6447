PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m jobs.pipeline --config $(CONFIG)

# RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S is a stall detector, not a speed limit: 600 s because a
# shared, loaded CI box can starve one op for minutes; pytest-timeout still bounds every test
test: install
	RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S=600 $(BIN)/python -m pytest -q -ra --durations=40 tests

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	$(BIN)/python -m bench.bench_metrics
	$(BIN)/python -m bench.bench_map_head
	$(BIN)/python -m bench.bench_extract
	$(BIN)/python -m bench.bench_train_step

clean:
	rm -rf runs .pytest_cache

# local stack (Ray head + MLflow server + S3 server on 127.0.0.1): cluster-up, cluster-down, submit-demo
-include cluster/local.mk
