# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch: a wheel of TORCH_SPEC that pip finds without an index (a find-links folder in pip's
# configuration, as on CI) is used as it is, without download. Otherwise a machine with an
# NVIDIA driver takes the default build from PyPI (CUDA), and any other machine the CPU build
# from PyTorch's CPU wheel index (PyPI's own torch for Linux is the CUDA build, several GB).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
TORCH_SPEC ?= torch==$(TORCH_VERSION)

.PHONY: venv run test lint protos bench clean kernels

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null \
	  || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ./clients/python -e ".[test]"
	$(PY) -m pdserve.engine.cpu_kernels  # the C++ CPU kernels (skipped without a compiler)
	touch $(STAMP)

venv: $(STAMP)

# Extra options for `pdserve serve`, e.g. make run ARGS="--port 50052 --model small".
ARGS ?=
run: $(STAMP)
	$(VENV)/bin/pdserve serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pdserve.engine.cpu_kernels  # up to date with engine/csrc (a no-op when built)
	$(PY) -m pytest -q -ra --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rebuild the C++ CPU kernels (engine/csrc) after editing them; engines also rebuild on
# first use when the sources changed.
kernels: $(STAMP)
	$(PY) -m pdserve.engine.cpu_kernels --force

protos: $(STAMP)
	$(PY) -m pdserve.protos.generate

clean:
	rm -rf $(VENV) build *.egg-info clients/python/build clients/python/*.egg-info
