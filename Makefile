# The two commands a newcomer types: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config/sockscope.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin

# Debian packages the tests drive for real: ip/ss/nstat (iproute2), promtool (prometheus).
DEB_PACKAGES := iproute2 prometheus

.PHONY: run test venv venv-test system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

run: venv
	$(BIN)/sockscope run --config.file $(CONFIG)

# Installs the Debian packages when run as root and one is missing. Services that apt
# would start are held back by a policy-rc.d for the duration of the install, and their
# units are disabled afterwards: the tests start their own servers on loopback.
system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "system-deps: not root, cannot install:$$missing (tests needing them will skip)"; exit 0; fi; \
	echo "system-deps: installing$$missing"; \
	policy_made=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_made=1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
	[ -n "$$policy_made" ] && rm -f /usr/sbin/policy-rc.d; \
	for s in prometheus carbon-cache; do systemctl disable --now $$s >/dev/null 2>&1 || true; done; \
	exit $$rc

test: venv-test system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build daemon/*.egg-info .pytest_cache
