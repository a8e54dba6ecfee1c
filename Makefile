# Two commands set everything up on a fresh machine:
#   make quickstart   create .venv, install raysim, run scenarios/quickstart.yaml end to end
#   make test         create .venv, install raysim with its test extras, run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: quickstart test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/raysim run scenarios/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
