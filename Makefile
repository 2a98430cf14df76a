# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   - create .venv, install, match a 2,000-attendee synthetic event, verify it
#   make test   - install the test tools, run ruff, mypy and the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench reliability install clean openapi invoke \
	lock lock-check audit rds-ca rds-ca-check deploy

# Everything from locks/dev.txt, every file checked against its hash (no resolver, no
# newest-on-install-day), then the project itself, built with the locked setuptools.
$(STAMP): pyproject.toml locks/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	@PYTHONPATH=src $(PYTHON) -m tooling.locks check
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r locks/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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
test: lock-check lint typecheck sam-validate sam-build checkov audit
	$(VENV)/bin/pytest -q

# The reliability suite alone (it is also part of `make test`), with its figures printed.
reliability: $(STAMP)
	$(VENV)/bin/pytest tests/reliability -m reliability -q -s -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/matchmaker bench --sizes $${SIZES:-500,2000,10000,50000} --json bench-results.json
	$(VENV)/bin/matchmaker bench --latency --latency-attendees $${LATENCY_ATTENDEES:-10000} \
		--json bench-latency.json
	$(VENV)/bin/matchmaker eval --attendees $${EVAL_ATTENDEES:-1000,5000} --json bench-quality.json
	$(VENV)/bin/matchmaker bench --exposure-cost $${EXPOSURE_COST_ATTENDEES:-10000} --rounds 3

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

# The locks (locks/*.txt, see src/tooling/locks.py): `make lock` re-resolves them after a
# change to pyproject.toml or to mk/lambda.mk's layer groups, keeping every pin that still
# fits; `make lock UPGRADE=1` takes the newest versions allowed. `make lock-check` fails
# when a lock no longer matches its inputs (`make test` runs it first).
UV_VERSION ?= 0.13.9
PIP_AUDIT_VERSION ?= 2.10.1
UV := $(TOOLS_DIR)/uv/bin/uv
PIP_AUDIT := $(TOOLS_DIR)/pip-audit/bin/pip-audit

$(UV):
	$(TOOLS_PYTHON) -m venv $(TOOLS_DIR)/uv
	$(TOOLS_DIR)/uv/bin/python -m pip install --quiet uv==$(UV_VERSION)

$(PIP_AUDIT):
	$(TOOLS_PYTHON) -m venv $(TOOLS_DIR)/pip-audit
	$(TOOLS_DIR)/pip-audit/bin/python -m pip install --quiet pip-audit==$(PIP_AUDIT_VERSION)

lock: $(UV)
	PYTHONPATH=src $(PYTHON) -m tooling.locks write --uv $(UV) $(if $(UPGRADE),--upgrade)

lock-check:
	PYTHONPATH=src $(PYTHON) -m tooling.locks check

# Known vulnerabilities (PyPI's advisory data, through pip-audit) in the dev and Lambda
# locks; skipped with a message when PyPI cannot be reached.
audit: $(PIP_AUDIT)
	PYTHONPATH=src $(PYTHON) -m tooling.locks audit --pip-audit $(PIP_AUDIT)

# The RDS CA bundle (a DB instance's certificates chain to it; docs/deploy.md "Trust roots"):
# `make rds-ca` downloads it over HTTPS, validates it and writes $(RDS_CA_BUNDLE)
# (git-ignored; the build ships it). `make deploy` refuses to deploy without a valid one:
# the login rotation function always connects to the DB instance itself, and every
# function does when RDS Proxy is off. DEPLOY_ARGS go to sam deploy (e.g. --guided, or
# --config-env prod).
rds-ca:
	PYTHONPATH=src $(PYTHON) -m tooling.rds_ca download --out $(RDS_CA_BUNDLE)

rds-ca-check:
	PYTHONPATH=src $(PYTHON) -m tooling.rds_ca check $(RDS_CA_BUNDLE)

deploy: rds-ca-check sam-build
	$(SAM) deploy $(DEPLOY_ARGS)
