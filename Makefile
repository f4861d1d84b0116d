# The commands of the README. Each creates or updates .venv from requirements.lock first.
#   make run  [ARGS="--preset full ..."]   run the pipeline (local_runner.py)
#   make test [PYTEST_ARGS="-k data"]      run the test suite
#   make notebooks [ARGS="--port 8899"]    the notebooks in the classic Notebook UI, where TFMA's
#                                          widgets render (notebooks/server.py, docs/notebooks.md)
VENV   := .venv
PY     := $(VENV)/bin/python
# python3.10 from pyenv (.python-version) or the system; tfx 1.16 needs Python 3.10.
BASE_PYTHON ?= $(shell command -v python3.10 || command -v python)

.PHONY: run test venv notebooks
run: $(VENV)/.installed
	$(PY) local_runner.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

notebooks: $(VENV)/.installed
	$(PY) -m notebooks.server $(ARGS)

$(VENV)/.installed: requirements.lock
	@test -x $(PY) || $(BASE_PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 10), "need Python 3.10, got " + sys.version' \
	  || { echo "$(VENV) is not Python 3.10: remove it and run again"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -c 'from notebooks import server; print("TFMA nbextension enabled:", server.enable())'
	touch $@
