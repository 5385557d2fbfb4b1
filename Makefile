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

# The demo brings up the local stack, writes the digits dataset as shards to its S3 store (once), and
# submits the demo pipeline through the compound server's queue, following its driver's log (a Ray job on
# the stack's head): a B7 teacher (tiny sweep) → distillation into B0 → int8 → evaluation
# → registration → gated promotion, printing the MLflow link and the teacher / student / int8 table.
# Then it schedules the pipeline nightly, and prints the demo's wall time. `make down` stops the stack.
demo: $(STAMP)
	@start=$$(date +%s) && \
	$(BIN)/compound up && \
	$(BIN)/compound data shards sklearn:digits s3://shards/digits/ --image-size 64 --shard-size 0.25 --if-missing && \
	$(BIN)/compound pipeline submit pipelines/examples/digits-b0.yaml --follow && \
	$(BIN)/compound schedule add pipelines/examples/digits-b0.yaml --cron "0 2 * * *" --replace && \
	echo "demo wall time: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"

down: $(STAMP)
	$(BIN)/compound down

# Two processes, a file each at a time (each with a stack of its own): while one waits out a drill's
# outage or restart, the other's tests use the cores (README, Development: what it takes here).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m ''

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_effnet.py
	$(BIN)/python tests/benchmarks/bench_loader.py
	$(BIN)/python tests/benchmarks/bench_orchestration.py
	$(BIN)/python tests/benchmarks/bench_training.py
	$(BIN)/python tests/benchmarks/bench_activation_checkpointing.py
	$(BIN)/python tests/benchmarks/bench_sweep.py
	$(BIN)/python tests/benchmarks/bench_quantize.py
	$(BIN)/python tests/benchmarks/bench_distill.py
	$(BIN)/python tests/benchmarks/bench_quality.py

# Re-pin every transitive dependency after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable --exclude compound > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
