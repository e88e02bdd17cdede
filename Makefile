# Two commands on a fresh machine: `make run` (install + main job) and `make test` (install + tests).
# Both install into .venv idempotently: pip runs again only when pyproject.toml or the lock changes. Every package
# is held to locks/project.txt (-c), so what a new machine installs is what the tests passed with.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := locks/project.txt

.PHONY: run real test lint bench clean browser

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	# torch alone first, pinned: this resolves to the CPU wheel, never a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c $(LOCK) torch==2.13.0
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test,scale,gguf,instruct]"
	$(BIN)/pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/rlhf run $(ARGS)

# A real model on a real task: SmolLM2-135M-Instruct learns to follow verifiable instructions
# (examples/instruction-following/README.md). Builds the model, prompts and demonstrations once, then runs the pipeline.
REAL := examples/instruction-following
real: $(STAMP)
	$(BIN)/python $(REAL)/build.py
	PYTHONPATH=$(REAL) $(BIN)/rlhf run --config $(REAL)/config.yaml $(ARGS)

# The report test renders in a real browser: Debian's chromium, installed once (needs apt, as root).
browser:
	@command -v chromium >/dev/null || apt-get install -y -qq chromium >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.quality

clean:
	rm -rf rlhf-artifacts rlhf-mlflow
