# sd-operator: one entry point for development, tests and delivery.
# `make dev` runs the main job on the local cluster; `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ROOT      := $(abspath .)
VENV      := $(ROOT)/.venv
PY        := $(VENV)/bin/python
BIN       := $(ROOT)/.local/bin
CLUSTER   := $(PY) tools/cluster/localcluster.py
export PATH := $(BIN):$(VENV)/bin:$(PATH)

# Debian packages the tooling needs: openssl (cluster PKI), redis-server (cache tests), nginx (benchmark baseline).
# iproute2 and util-linux: the local pod runner's addresses (ip) and namespaces (unshare, tools/netns.sh).
# chromium: the headless browser the web console's tests drive (tests/browser, Playwright; never `playwright install`).
APT_PACKAGES := openssl redis-server nginx-light iproute2 util-linux chromium
# What only the benchmarks need: wrk (the gateway overhead bench's load generator).
BENCH_APT_PACKAGES := wrk

.PHONY: help deps venv constraints tools crds cluster-up cluster-down cluster-status cluster-clean dev dev-down lint unit e2e \
        integration browser test bench images dist clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## install the Debian packages the tooling needs (only the missing ones)
	@missing=$$(for p in $(APT_PACKAGES) $(EXTRA_APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing $$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	fi

$(VENV)/.installed: operator/pyproject.toml operator/constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -c operator/constraints.txt -e 'operator[dev]'
	touch $@

venv: $(VENV)/.installed ## create the Python virtualenv with the pinned dependencies

constraints: venv ## re-pin the full dependency set after changing operator/pyproject.toml
	{ echo '# The full pinned set (pip freeze) that the Makefile installs against; regenerate with `make constraints`.'; \
	  $(VENV)/bin/pip freeze --exclude-editable; } > operator/constraints.txt

tools: ## build the pinned control-plane binaries and helm (cached outside the tree)
	@bash tools/build-tools.sh

CRD_DIRS := crds $(if $(wildcard charts/sd-operator/Chart.yaml),charts/sd-operator/crds)
crds: venv ## generate the CRDs from the API models into crds/ (and the chart's crds/)
	$(VENV)/bin/sd-operator crds $(addprefix --out ,$(CRD_DIRS))

cluster-up: deps venv tools ## start etcd, apiserver, controller-manager, scheduler and kwok on 127.0.0.1
	@$(CLUSTER) up

cluster-down: ## stop the local cluster; leaves no process and no bound port
	@$(CLUSTER) down

cluster-status: ## show which components of the local cluster run
	@$(CLUSTER) status

cluster-clean: ## stop the local cluster and delete its data
	@$(CLUSTER) clean

dev: deps venv tools ## the main job: everything runs locally (pods as processes); prints three commands to try
	@$(PY) tools/dev.py

dev-down: ## stop a `make dev` session started in another terminal
	@$(PY) tools/dev.py down

lint: venv ## ruff (lint and format) and mypy
	$(VENV)/bin/ruff check operator tests tools bench deploy images
	$(VENV)/bin/ruff format --check operator tests tools bench deploy images
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --config images/.hadolint.yaml images/*/Dockerfile

unit: venv ## unit tests (no cluster)
	$(PY) -m pytest tests/unit

integration: deps venv tools ## integration tests on a real local cluster (or the one named by KUBECONFIG)
	$(PY) -m pytest tests/integration

# Locally inside a loopback-only network namespace with the pod runner (tools/netns.sh); with KUBECONFIG
# set, against that cluster (its operator and gateway installed; see tests/e2e/conftest.py).
e2e: deps venv tools ## end-to-end: real pods' commands, downloads, gateway, batches, training
	@if [ -n "$$KUBECONFIG" ]; then $(PY) -m pytest tests/e2e; else tools/netns.sh $(PY) -m pytest tests/e2e; fi

browser: deps venv tools ## the web console in headless Chromium against the real gateway, emulators and cluster
	$(PY) -m pytest tests/browser

# The two cluster suites side by side (separate clusters; logs printed whole, one after the other).
test: deps venv tools lint unit ## everything CI runs: lint, unit, then integration and e2e side by side
	@bash tools/parallel.sh "$(MAKE) --no-print-directory integration" "$(MAKE) --no-print-directory e2e && $(MAKE) --no-print-directory browser"

bench: EXTRA_APT_PACKAGES := $(BENCH_APT_PACKAGES)
bench: deps venv tools ## benchmarks (numbers for the closing notes; not run by `make test`)
	$(PY) bench/sdinstances.py --count 200 500 1000 --idle-seconds 60
	$(PY) bench/batch_throughput.py --items 200 --speed 1.0
	$(PY) bench/gateway_dispatch.py
	$(PY) bench/gateway_overhead.py
	$(PY) bench/autoscale_trace.py
	tools/netns.sh $(PY) bench/cold_start.py

dist: crds tools ## render dist/install.yaml (CRDs, Namespace, the chart's defaults) for kubectl apply --server-side
	@bash tools/dist.sh

images: ## build the container images (docker buildx; says so and skips where no Docker engine answers)
	@bash images/build.sh

clean: cluster-down ## remove the venv and local state (the tool cache stays)
	rm -rf $(VENV) .local .pytest_cache .mypy_cache .ruff_cache dist
