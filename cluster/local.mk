# Local stack on 127.0.0.1: a Ray head (token auth), an MLflow server, moto's S3 server.
# Included from the Makefile (uses its $(BIN) and `install`). Ports: cluster/local-stack.yaml.
#   make cluster-up       start all three, wait until each answers; pids/ports in runs/stack/stack.json
#   make submit-demo      `ray job submit` the pipeline with run.root=s3://..., tracking on the server
#   make cluster-down     stop exactly the processes cluster-up started (never `ray stop`)
#   make cluster-status   the stack's state and its live pids
STACK_CONFIG ?= cluster/local-stack.yaml
STACK := $(BIN)/python -m cluster.local --config $(STACK_CONFIG)

.PHONY: cluster-up cluster-down cluster-status submit-demo

cluster-up: install
	$(STACK) up

cluster-down:
	$(STACK) down

cluster-status:
	$(STACK) status

submit-demo: install
	$(STACK) submit-demo
