# Two commands do everything on a fresh machine (each installs what it needs into .venv):
#   make notebooks   run the whole notebook suite headless on the embedded default
#   make test        run the tests (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/$(shell date +%Y%m%d-%H%M%S)
PROFILE ?= cpu

.PHONY: setup notebooks test test-slow clean-notebooks default-head

setup:
	@scripts/install.sh $(VENV)
	@$(PY) -m eaglebook.cli prepare

notebooks: setup
	$(PY) -m eaglebook.cli notebooks --run-dir $(RUN_DIR) --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The default EAGLE-3 head for SmolLM2 (hours on a CPU; resumable: rerun to continue).
default-head: setup
	$(PY) -m eaglebook.cli default-head --work-dir runs/default-head $(ARGS)

clean-notebooks:
	$(VENV)/bin/nbstripout --extra-keys "metadata.jupytext metadata.language_info cell.metadata.lines_to_next_cell" notebooks/*.ipynb
