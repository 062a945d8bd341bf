# The two commands of the README, each working on a fresh clone with Python 3.11 and pip:
#   make replicate   the embedded-default replication (synthetic data, offline backbone) into results/; a run already
#                    there is re-run into results/_scratch/verify and compared with the committed numbers
#   make test        every notebook under nbdev_test, plus pytest tests/
# and the documentation site:
#   make docs        every notebook (committed outputs, not executed), docs/*.md and the API as HTML in _site/html
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install replicate test docs export clean-nbs check-clean

# a virtual environment of our own, the package in editable mode, and a Jupyter kernel for papermill
$(STAMP): settings.ini setup.py
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vqflow_nb)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

replicate: $(STAMP)
	$(BIN)/vqflow-replicate --config replicate/synthetic.yaml --verify
	$(BIN)/vqflow-compare --dataset synthetic --config replicate/synthetic.yaml

test: $(STAMP)
	$(BIN)/python tools/run_tests.py

docs: $(STAMP)
	$(BIN)/python tools/build_site.py

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

# fails when the notebooks are not clean or the package is not in sync with them
check-clean: $(STAMP)
	$(BIN)/nbdev_clean && $(BIN)/nbdev_export
	@git diff --quiet -- nbs vqflow_nb README.md || { git status --short -- nbs vqflow_nb README.md; echo "nbdev_clean/nbdev_export changed tracked files: run 'make export clean-nbs' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- vqflow_nb)" || { git status --short -- vqflow_nb; echo "nbdev_export created untracked files in vqflow_nb/"; exit 1; }

# mutation testing of the maths modules with cosmic-ray (not in CI: ~40 min on 2 cores); writes results/benchmarks/mutation.md
.PHONY: mutation
mutation: $(STAMP)
	nice -n 10 $(BIN)/python benchmarks/mutation.py
