# The project's verbs. CI runs `make test`, exactly as a newcomer does.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
HOST   ?= 127.0.0.1
RERANK_PORT ?= 8000

.PHONY: install install-train install-dev demo run test train eval bench lint docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps keep `make demo` and `make test` from reinstalling on every run.
$(VENV)/.serve: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.train: $(VENV)/.serve
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PIP) -e '.[train,dev]'
	touch $@

install: $(VENV)/.serve
install-train: $(VENV)/.train
install-dev: $(VENV)/.dev

# Quick start 1: the service on an embedded Redis with the default model.
demo run: install
	@echo "reranker: http://$(HOST):$(RERANK_PORT)  (POST /rerank, POST /events, GET /docs, GET /metrics)"
	RERANK_PORT=$(RERANK_PORT) $(BIN)/rerank serve --host $(HOST) --port $(RERANK_PORT)

# Quick start 2: the test suite (starts its own redis-server).
test: install-dev
	$(BIN)/pytest -q

train: install-train
	$(BIN)/rerank train

eval: install-train
	$(BIN)/rerank eval

bench: install-dev
	$(BIN)/python loadtest/bench.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app
	$(BIN)/mypy

docker:
	docker build -t rerank:latest .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
