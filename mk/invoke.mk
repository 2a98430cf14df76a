# `make invoke FUNCTION=<LogicalId> EVENT=<event file>`: one function of the built stack
# under `sam local invoke` (Docker), with events/local-env.json pointing it at a local
# PostgreSQL and a moto server. See docs/deploy.md, "sam local invoke".
#
#   make sam-build
#   make invoke FUNCTION=ApiFunction EVENT=events/api/get_event.json
#
# Included from the top-level Makefile, after mk/lambda.mk (SAM, SAM_ENV).

SAM ?= .tools/sam/bin/sam
SAM_ENV ?= AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} SAM_CLI_TELEMETRY=0
INVOKE_ENV_VARS ?= events/local-env.json

.PHONY: invoke

invoke:
	@test -n "$(FUNCTION)" || { echo "make invoke: FUNCTION is missing, e.g. make invoke FUNCTION=ApiFunction EVENT=events/api/get_event.json" >&2; exit 2; }
	@test -n "$(EVENT)" || { echo "make invoke: EVENT is missing, e.g. make invoke FUNCTION=$(FUNCTION) EVENT=events/..." >&2; exit 2; }
	@test -f "$(EVENT)" || { echo "make invoke: no event file $(EVENT)" >&2; exit 2; }
	@test -x "$(SAM)" || { echo "make invoke: no SAM CLI at $(SAM): run make sam-build first" >&2; exit 2; }
	@test -d ".aws-sam/build/$(FUNCTION)" || { echo "make invoke: .aws-sam/build/$(FUNCTION) is missing (is $(FUNCTION) a function of template.yaml? run make sam-build)" >&2; exit 2; }
	$(SAM_ENV) $(SAM) local invoke $(FUNCTION) -e $(EVENT) --env-vars $(INVOKE_ENV_VARS)
