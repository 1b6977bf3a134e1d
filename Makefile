# gptpipe — two commands on a fresh machine:
#   make run    create .venv if missing, install, run the default pipeline (configs/tiny.yaml)
#   make test   same bootstrap, then the test suite (three xdist workers)
#   make check  lint + the quick tier (unit and contract tests, no slow/browser/container): minutes
# TORCH_SPEC picks the torch build (CI uses the local CPU wheel: TORCH_SPEC=torch==2.13.0).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch
RECIPE     ?= configs/tiny.yaml
PYTEST_ARGS ?=
# Three workers on the 2-core CI machine: much of the slow tier waits on servers, containers and
# child processes, and every test process runs single-threaded under xdist (tests/conftest.py,
# configs/micro.yaml), so a third worker fills those waits instead of contending at thread barriers.
# --dist loadgroup keeps each xdist_group (tests/conftest.py) on one worker, so a worker does not
# start its own copy of a shared server set or export.
PYTEST_WORKERS ?= 3
# --no-loadscope-reorder: hand groups out in collection order, which tests/conftest.py starts with
# the longest ones (xdist's default order is by test count, which put the default recipe last).
XDIST      := -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder
QUICK      := not slow and not browser and not container
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.gptpipe-installed

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test check lint install clean help services services-down stack-up stack-down

help:
	@echo "make run    - run the pipeline on $(RECIPE) (embedded Prefect + MLflow, artifacts in ./runs)"
	@echo "make test   - run the whole test suite ($(PYTEST_WORKERS) xdist workers; PYTEST_ARGS=... to narrow it)"
	@echo "make check  - lint + the quick tier: tests not marked slow/browser/container (1-2 min on 2 cores)"
	@echo "make lint   - ruff check + ruff format --check (configured in pyproject.toml)"
	@echo "make services / services-down - local Prefect + MLflow + S3 servers (see docs/deployment.md)"
	@echo "make clean  - remove runs/ and Prefect state (keeps .venv)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gptpipe run --config $(RECIPE)

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The loop to run first: lint, then the unit and contract tests (markers in pyproject.toml).
check: lint
	$(BIN)/python -m pytest $(XDIST) -m "$(QUICK)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

services: $(STAMP)   ## Prefect server + MLflow server + S3 endpoint on 127.0.0.1 (no Docker needed)
	$(BIN)/gptpipe services up

services-down:
	$(BIN)/gptpipe services down

stack-up:   ## the Docker Compose stack (Postgres, MinIO, MLflow, Prefect server + GPU worker); see infra/README.md
	docker compose --env-file infra/.env -f infra/compose.yaml up -d --wait

stack-down:
	docker compose --env-file infra/.env -f infra/compose.yaml down

clean:
	rm -rf runs .prefect test-artifacts
