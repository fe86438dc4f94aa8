# attnlm: the commands a newcomer needs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch lies on this machine's disk; GPU users override, e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
RUN_DIR ?= runs/tiny
# configs/serve.yaml serves this folder
ARTIFACT ?= artifacts/tiny
PYTEST_ARGS ?=

export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-slow lint format train export generate artifact serve serve-bg stop demo bench probe-report clean docker-train docker-serve docker-smoke

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
	$(VENV)/bin/ruff check attnlm training serving tests bench scripts
	$(VENV)/bin/ruff format --check attnlm training serving tests bench scripts

format: install
	$(VENV)/bin/ruff check --fix attnlm training serving tests bench scripts
	$(VENV)/bin/ruff format attnlm training serving tests bench scripts

train: install
	$(VENV)/bin/attnlm fit --config configs/tiny.yaml --trainer.default_root_dir $(RUN_DIR)

export: install
	$(VENV)/bin/attnlm export --checkpoint $(RUN_DIR)/checkpoints/best.ckpt --out $(ARTIFACT)

generate: install
	$(VENV)/bin/attnlm generate --artifact $(ARTIFACT) --prompt "The cat that was sitting on the mat" --num_samples 3

artifact: install
	@[ -f $(ARTIFACT)/model.safetensors ] || $(MAKE) train export

serve: artifact
	$(PY) -m serving.app_args configs/serve.yaml
	RAY_AUTH_MODE=disabled RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:middlewares $(VENV)/bin/serve run configs/serve.yaml

serve-bg: artifact
	VENV=$(VENV) bash scripts/demo_serve.sh

stop:
	@if [ -f runs/serve.pid ]; then kill -TERM $$(cat runs/serve.pid) 2>/dev/null || true; rm -f runs/serve.pid; echo "stopped"; fi

demo: train export generate serve-bg

bench: install
	$(PY) bench/train_throughput.py

# The probe study: configs/probe/* (3 architectures x 2 sizes) x 3 seeds on the same data and
# budget, probed over training and on the hard set; writes docs/probe.md and docs/img/probe*.png
# (~40 min on 2 cores). PROBE_QUICK=1: the same on tiny settings, into a temp dir (~1-2 min).
probe-report: install
	$(PY) scripts/probe_report.py

# Container images (CUDA PyTorch base; see docker/README.md). Need a Docker engine.
docker-train:
	docker build -f docker/train.Dockerfile -t attnlm-train .

docker-serve:
	docker build -f docker/serve.Dockerfile -t attnlm-serve .

# Build the serve image for real with podman from a local CPU stand-in base (made once: debootstrap
# + python + torch), run it on 127.0.0.1 with artifacts/tiny (or an untrained tiny export) mounted,
# check /health and a completion. Needs root (apt-get, debootstrap), not Docker Hub. SMOKE_TRAIN=1
# also builds the train image. See scripts/docker_smoke.sh.
docker-smoke: install
	VENV=$(VENV) bash scripts/docker_smoke.sh

clean:
	rm -rf runs artifacts .pytest_cache
