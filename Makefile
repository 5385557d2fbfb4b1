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

# The demo brings up the local stack, writes the digits dataset as shards to its S3 store (once),
# and submits the smoke job to the Ray head as a Ray job, following its log to the end:
# EfficientNet-B0, 2 workers, DDP, 3 epochs, tracked in one MLflow run whose link it prints.
# Run again, the finished job prints its result. `make down` stops the stack.
demo: $(STAMP)
	$(BIN)/compound up
	$(BIN)/compound data shards sklearn:digits s3://shards/digits/ --image-size 64 --shard-size 0.25 --if-missing
	$(BIN)/compound job submit jobs/examples/b0-cpu-smoke.yaml --follow

down: $(STAMP)
	$(BIN)/compound down

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_effnet.py
	$(BIN)/python tests/benchmarks/bench_loader.py
	$(BIN)/python tests/benchmarks/bench_orchestration.py
	$(BIN)/python tests/benchmarks/bench_training.py
	$(BIN)/python tests/benchmarks/bench_activation_checkpointing.py
	$(BIN)/python tests/benchmarks/bench_sweep.py
	$(BIN)/python tests/benchmarks/bench_quantize.py
	$(BIN)/python tests/benchmarks/bench_distill.py

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable --exclude compound > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
