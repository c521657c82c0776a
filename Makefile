# Two commands on a fresh machine:  `make repro` (the whole DVC graph) and `make test` (the test suite).
# Both create .venv and install the pinned project into it when it is missing or pyproject.toml changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev
PYTEST_ARGS ?=
# Test workers (pytest-xdist): on two cores about half the suite waits on one thread (imports, DVC, subprocesses);
# 1 runs it in one process. tests/scheduling.py keeps the tests of one expensive fixture on one worker.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)
# `make team-server HOST=0.0.0.0 PORT=5001`: set on the command line only (`:=`), so a shell's own HOST
# variable (zsh sets one to the machine's name) never opens the server to the network.
HOST := 127.0.0.1
PORT := 5000
TEAM_DIR := .team
ALLOWED_HOSTS :=

.PHONY: venv repro test test-fast bench tables ui team-server postgres download submit lint browser clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

venv: $(STAMP)

## Run the whole pipeline (fisheries + the course's three cases) on the configured sources.
repro: venv
	$(VENV)/bin/dvc repro

## Headless Chromium for the MLflow UI test: Debian's package, installed when we are root and it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: chromium not installed; the browser test will be skipped"; }

## PostgreSQL for `make team-server` and its test: Debian's package, installed when we are root and it is missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	  || echo "note: PostgreSQL not installed; the team-server test will be skipped"; }

test: venv browser postgres
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

## The suite without the tests marked slow (whole DVC graphs, multi-device, fine-tuning, resume and browser runs).
test-fast: venv
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench

## README's result tables from reports/ (the candidate leaderboard first, when the source has a solution file).
tables: venv
	@test ! -s data/interim/solution.csv || $(PY) -m pipeline candidate_leaderboard
	$(PY) -m pipeline readme_tables

## The MLflow UI on loopback only, against the project's tracking store.
ui: venv
	$(PY) -m pipeline ui

## A team's tracking server: MLflow on PostgreSQL (a cluster in TEAM_DIR unless MLFLOW_BACKEND_URI names one),
## artifacts served by it; on 127.0.0.1:5000 unless `make team-server HOST=0.0.0.0 PORT=...`.
team-server: venv postgres
	$(PY) -m pipeline team_server --host $(HOST) --port $(PORT) --dir $(TEAM_DIR) \
	  $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS))

## Fetch the competition files with the official kaggle client (never part of dvc repro).
download: venv
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('kaggle') is None)" \
	  || $(PY) -m pip install --quiet -e '.[kaggle]'
	$(PY) -m pipeline download

## Upload a submission: make submit FILE=reports/submission_stg1.csv MESSAGE="..."
submit: venv
	$(PY) -m pipeline upload $(FILE) --message "$(MESSAGE)"

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf data/interim data/processed
