# Two commands for a fresh machine with only Python:
#   make demo   - install into .venv, build the tiny offline model, train it, merge it, score it, ask it
#   make test   - install into .venv, run the whole test suite (CI runs it)
#   make test-fast - install into .venv, run the fast tier, for the edit-and-test loop: every test
#                 not marked `slow` (recipe validation, the data pipeline, templates and masking,
#                 error messages, a short 4-bit QLoRA training run checking what it did to the
#                 weights, merge arithmetic); under 90 s on 2 CPU cores. `make test` runs it too.
#                 Marked `slow` (pyproject.toml): the session's 200-step tiny run and every test
#                 that uses it, training runs, subprocess launches, signals, resumes.
#   make test-architectures - every model family trained, merged and sampled (minutes; CI runs it)
#   make test-multinode     - two machines simulated over loopback: checkpoints, kills, resume (CI runs it)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed before the package, and only when .venv has none, so a GPU build you put
# there first is kept. On this project's machines `torch==2.13.0` resolves to a CPU wheel on
# disk. Elsewhere on Linux, PyPI's torch is the CUDA build (several GB): for a CPU-only machine
# run `make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo`.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: install demo test test-fast test-architectures test-multinode clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp file: reinstall only when the package metadata or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,export]"
	touch $@

install: $(VENV)/.installed

build/tiny/model/config.json: scripts/build_tiny.py | $(VENV)/.installed
	$(BIN)/python scripts/build_tiny.py --out build/tiny

demo: install build/tiny/model/config.json
	$(BIN)/qlora train configs/tiny.yaml --output-dir runs/tiny --overwrite
	$(BIN)/qlora merge runs/tiny --compare --overwrite
	$(BIN)/qlora eval runs/tiny --compare-base --split train
	$(BIN)/qlora generate runs/tiny --prompt "What is the opposite of hot?" --greedy

# pytest exits 5 when it collects no tests: say so plainly (a suite that tests nothing is broken).
test: install
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: is tests/ missing?" >&2; fi; exit $$rc

# The fast tier: the default selection (pyproject.toml's addopts) less the tests marked `slow`.
test-fast: install
	@$(BIN)/python -m pytest -q -m "not slow and not architectures and not multinode"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: is tests/ missing?" >&2; fi; exit $$rc

# The architecture matrix's slow half (tests/test_architectures.py, marker `architectures`): each
# family trained a few steps, reloaded, merged and sampled. `make test` runs its load half only.
test-architectures: install
	$(BIN)/python -m pytest -q -m architectures tests/test_architectures.py

test-multinode: install
	$(BIN)/python -m pytest -q -m multinode tests/test_multinode.py

clean:
	rm -rf build runs $(VENV)
