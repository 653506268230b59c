# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU path: pin torch so pip takes the local CPU wheel instead of GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	# Triton's compiler (no GPU needed): tests/model/test_kernels_ir.py compiles the kernels for
	# sm_90 and checks their pipelined loops; the version the H200 box runs.
	$(BIN)/pip install -q triton==3.6.0
	$(BIN)/pip uninstall -q -y mhc 2>/dev/null || true  # this project's pre-rename dist name
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check mhc_model mhc_convert tests fixtures bench examples tools
	$(BIN)/python -m pytest tests

fixtures: $(STAMP)
	$(BIN)/python fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) build *.egg-info demo-out
