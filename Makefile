# The two commands of the README. Both create the virtual environment when it is missing.
#   make demo   -- the main job: the embedded DeepSeek model with the 'mixed' plan, compared with as loaded
#   make test   -- the whole test suite (notebooks and the browser test included)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ciuic-installed
# A CPU build of torch; an unpinned torch would pull gigabytes of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv lab clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ciuic-lab demo

test: $(STAMP)
	$(PY) -m pytest -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

clean:
	rm -rf $(VENV) build *.egg-info
