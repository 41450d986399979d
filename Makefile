# Two commands for a fresh machine with only Python:
#   make demo   - install into .venv, build the tiny offline model, train it
#   make test   - install into .venv, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch. Installed before the package so pip does not pull several GB of
# CUDA wheels; on a GPU machine, install the torch build you want first and `make install` keeps it.
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp file: reinstall only when the package metadata or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

build/tiny/model/config.json: scripts/build_tiny.py | $(VENV)/.installed
	$(BIN)/python scripts/build_tiny.py --out build/tiny

demo: install build/tiny/model/config.json
	$(BIN)/qlora train configs/tiny.yaml --output-dir runs/tiny --overwrite

# pytest exits 5 when it collects no tests: say so plainly (a suite that tests nothing is broken).
test: install
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: is tests/ missing?" >&2; fi; exit $$rc

clean:
	rm -rf build runs $(VENV)
