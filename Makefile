# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   - create .venv, install, match a 2,000-attendee synthetic event, verify it
#   make test   - install the test tools, run ruff, mypy and the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench reliability install clean openapi invoke

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/matchmaker demo --users $${USERS:-2000}

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit -q

# The SAM template is validated (cfn-lint), built without Docker and scanned by checkov on
# every run: a broken template fails the tests like broken code does.
test: lint typecheck sam-validate sam-build checkov
	$(VENV)/bin/pytest -q

# The reliability suite alone (it is also part of `make test`), with its figures printed.
reliability: $(STAMP)
	$(VENV)/bin/pytest tests/reliability -m reliability -q -s -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/matchmaker bench --sizes $${SIZES:-500,2000,10000,50000} --json bench-results.json
	$(VENV)/bin/matchmaker bench --latency --latency-attendees $${LATENCY_ATTENDEES:-10000} \
		--json bench-latency.json

# Regenerate the committed OpenAPI document (a test fails when it drifts from the code).
openapi: $(STAMP)
	$(PY) -c 'import json; from handlers.api import openapi_document; \
	open("docs/openapi.json", "w").write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")'

clean:
	rm -rf $(VENV) .tools .aws-sam .mypy_cache .pytest_cache .ruff_cache .hypothesis

# AWS: sam-validate, sam-build, checkov, and the build-<Function> targets that sam build runs.
include mk/lambda.mk
# `make invoke FUNCTION=ApiFunction EVENT=events/api/get_event.json`: sam local invoke (Docker).
include mk/invoke.mk
