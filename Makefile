# One entry point per job; CI runs `make test` (see .ci/run), exactly as the README says.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXAMPLE_RELEASE := releases/example
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo serve test test-fast check proto release-homedepot evaluate-homedepot clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml scripts/install-redis.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	scripts/install-redis.sh  # redis-server for the Redis profile store's tests (skipped when on PATH)
	touch $(STAMP)

$(EXAMPLE_RELEASE)/manifest.json: $(STAMP) examples/catalog.csv examples/judgments.csv
	# The demo favours a quick start: the pretrained encoder, and no gate against an older example release.
	$(BIN)/python -m offline.export --catalog examples/catalog.csv --judgments examples/judgments.csv \
		--out $(EXAMPLE_RELEASE) --force --no-finetune --allow-regression

# The main job: build the example release, start tritonserver (CPU) and the ranker, show a Rank call.
demo: $(EXAMPLE_RELEASE)/manifest.json
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/demo.sh $(EXAMPLE_RELEASE)

serve: $(EXAMPLE_RELEASE)/manifest.json
	$(BIN)/python -m ranker serve --release $(EXAMPLE_RELEASE)

# Everything that runs on a CPU machine: unit, integration (real tritonserver + gRPC), slow.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not triton and not gpu" tests

check: $(STAMP)
	$(BIN)/ruff check ranker offline tests triton_models scripts
	$(BIN)/mypy ranker offline

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/ranker/v1/ranker.proto

# The full Home Depot release and its evaluation (needs ../shared/data).
release-homedepot: $(STAMP)
	$(BIN)/python -m offline.export --catalog ../shared/data/homedepot/products.csv \
		--judgments ../shared/data/homedepot/judgments.csv --out releases/homedepot --force

evaluate-homedepot: $(STAMP)
	$(BIN)/python -m offline.evaluate --release releases/homedepot --products ../shared/data/homedepot/products.csv \
		--judgments ../shared/data/homedepot/judgments.csv --json

clean:
	rm -rf releases build .pytest_cache
