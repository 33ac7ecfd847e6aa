# The README's two commands:  `make demo`  and  `make test`.
# Both create .venv on first use. On a machine without a torch in that venv, torch is pinned
# to the CPU wheel (constraints-cpu.txt) so pip never resolves a multi-GB CUDA build; a torch
# already visible to the venv (e.g. `make test VENV_FLAGS=--system-site-packages` on a GPU
# box) is kept and pinned as it is. The same for triton (the `kernels` extra, flash-linear-
# attention's kernels, tested on CPU under Triton's interpreter): a triton already there is
# kept, else constraints-cpu.txt's pin is used.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/pins.txt
	$(PY) -c "import triton; print('triton==' + triton.__version__)" >> $(VENV)/pins.txt 2>/dev/null \
		|| grep '^triton==' constraints-cpu.txt >> $(VENV)/pins.txt
	PIP_CONSTRAINT=$(CURDIR)/$(VENV)/pins.txt $(PY) -m pip install -q -e ".[dev,kernels,hf]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m megaret.train --config configs/tiny.yaml train.steps=300 train.log_interval=25

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
