# Every target creates .venv and installs when it is missing or older than the dependency files,
# so each works as the first command on a fresh clone with nothing but Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo down test test-all bench lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# Until the end-to-end job exists, the demo brings up the local stack, writes the digits dataset
# as shards to its S3 store, shows the model family and a verified ONNX export.
# `make down` stops the stack.
demo: $(STAMP)
	$(BIN)/compound up
	$(BIN)/compound data shards sklearn:digits s3://shards/digits/ --image-size 64 --shard-size 1 --overwrite
	$(BIN)/compound model list
	$(BIN)/compound model export efficientnet_b0 --out out/efficientnet_b0.onnx

down: $(STAMP)
	$(BIN)/compound down

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_effnet.py
	$(BIN)/python tests/benchmarks/bench_loader.py

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable --exclude compound > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
