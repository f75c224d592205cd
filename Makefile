# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; CUDA machines install their own torch first and skip this pin.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv run test lint protos bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Extra options for `pdserve serve`, e.g. make run ARGS="--port 50052 --model small".
ARGS ?=
run: $(STAMP)
	$(VENV)/bin/pdserve serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
