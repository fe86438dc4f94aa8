# attnlm: the commands a newcomer needs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch lies on this machine's disk; GPU users override, e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
RUN_DIR ?= runs/tiny
ARTIFACT ?= artifacts/tiny
PYTEST_ARGS ?=

export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-slow lint format train export generate demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check attnlm training serving tests bench
	$(VENV)/bin/ruff format --check attnlm training serving tests bench

format: install
	$(VENV)/bin/ruff check --fix attnlm training serving tests bench
	$(VENV)/bin/ruff format attnlm training serving tests bench

train: install
	$(VENV)/bin/attnlm fit --config configs/tiny.yaml --trainer.default_root_dir $(RUN_DIR)

export: install
	$(VENV)/bin/attnlm export --checkpoint $(RUN_DIR)/checkpoints/best.ckpt --out $(ARTIFACT)

generate: install
	$(VENV)/bin/attnlm generate --artifact $(ARTIFACT) --prompt "The cat that was sitting on the mat" --num_samples 3

demo: train export generate

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs artifacts .pytest_cache
