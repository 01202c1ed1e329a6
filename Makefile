# Two entry points for a new user (see README): `make demo` and `make test`.
# Both set everything up themselves: a virtual environment pinned to the local CPU torch,
# the Debian packages the pipeline uses (tesseract OCR, a CJK font), the offline
# LPIPS/DISTS weight cache.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin
CORES  ?= 2
# one pytest-xdist worker per core; worksteal evens out the long pipeline tests
PYTEST := $(BIN)/python -m pytest -q -n $(CORES) --dist worksteal
export PATH := $(BIN):$(PATH)

.PHONY: demo test test-fast setup lock venv system-deps weights clean-results mlflow-ui

demo: setup
	snakemake --cores $(CORES) all
	@echo; cat results/latest/tables/metrics.md; echo
	@tvt runs
	@echo "Browse the runs: make mlflow-ui   (http://127.0.0.1:5000)"

test: setup
	@$(PYTEST); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: setup  # without the end-to-end pipeline, SLURM and multi-process training runs
	@$(PYTEST) -m "not slow"

setup: venv system-deps weights

venv: $(VENV)/.installed

# Installs the locked set (every file pinned by sha256), then the project itself without
# resolving anything: a new release of any dependency cannot change a fresh install.
$(VENV)/.installed: pyproject.toml constraints.lock.txt build-constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U "pip>=25.3"
	$(BIN)/python -m pip install --require-hashes --no-deps --build-constraint build-constraints.txt \
		-r constraints.lock.txt
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/check-install.py constraints.lock.txt
	touch $@

# Re-resolve pyproject.toml under constraints.txt and write the lock (review the diff, then commit).
lock: venv
	$(BIN)/python -m pip install --dry-run --ignore-installed --quiet --report .lock-report.json \
		-c constraints.txt --build-constraint build-constraints.txt ".[dev]"
	$(BIN)/python scripts/write-lock.py .lock-report.json constraints.lock.txt
	rm -f .lock-report.json

system-deps:
	@bash scripts/system-deps.sh

weights: venv  # into .tvt-cache/weights, where the stages look without any variable
	@tvt weights fetch

clean-results:
	rm -rf results resources logs .snakemake dvc.yaml dvc.lock

mlflow-ui: venv
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///results/mlflow.db --workers 1
