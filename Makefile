# torch/torchvision are pinned to the builds this project's machines install from local disk.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: install install-dev test demo lint clean bench

install: $(STAMP)        # the toolkit alone: what `make demo` needs

install-dev: $(DEV)      # plus pytest, ruff and tensorboard: what `make test` and `make lint` need

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(DEV)

test: install-dev
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check genai_cli tests benchmarks

demo: install
	$(VENV)/bin/genai train configs/quickstart.yaml --name quickstart --force
	$(VENV)/bin/genai sample runs/quickstart --out runs/quickstart/samples/demo.png
	@echo "open runs/quickstart/samples/demo.png"

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info genai_cli/__pycache__ tests/__pycache__
