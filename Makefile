# Two entry points for a new user (see README): `make demo` and `make test`.
# Both set everything up themselves: a virtual environment pinned to the local CPU torch,
# the Debian packages the pipeline uses (tesseract OCR, a CJK font), the offline
# LPIPS/DISTS weight cache.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin
CORES  ?= 2
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-fast setup venv system-deps weights clean-results mlflow-ui

demo: setup
	snakemake --cores $(CORES) all
	@echo; cat results/latest/tables/metrics.md; echo
	@tvt runs
	@echo "Browse the runs: make mlflow-ui   (http://127.0.0.1:5000)"

test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: setup  # without the end-to-end pipeline, SLURM and multi-process training runs
	@$(BIN)/python -m pytest -q -m "not slow"

setup: venv system-deps weights

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt build-constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U "pip>=25.3"
	$(BIN)/python -m pip install -c constraints.txt --build-constraint build-constraints.txt -e ".[dev]"
	touch $@

system-deps:
	@bash scripts/system-deps.sh

weights: venv  # into .tvt-cache/weights, where the stages look without any variable
	@tvt weights fetch

clean-results:
	rm -rf results resources logs .snakemake dvc.yaml dvc.lock

mlflow-ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///results/mlflow.db --workers 1
