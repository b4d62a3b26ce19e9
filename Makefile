# The two commands a newcomer types: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config/sockscope.yaml
PYTEST_ARGS ?=
BIN := $(VENV)/bin

# Debian packages the tests drive for real: ip/ss/nstat (iproute2), promtool (prometheus).
DEB_PACKAGES := iproute2 prometheus
# carbon-cache and whisper (python3-whisper: whisper-fetch + the module) for the Graphite tests.
DEB_PACKAGES += graphite-carbon python3-whisper
# systemd-analyze (verify/security of systemd/sockscope.service; systemd need not be PID 1),
# curl (scrapes from inside a test namespace), openssl (test certificates).
DEB_PACKAGES += systemd curl openssl

.PHONY: run test venv venv-test system-deps clean install bench bench-1m bench-scrape bench-soak

# `make install` as root: a venv under $(PREFIX), the config in $(CONFDIR) (an existing one
# is kept), the unit in $(UNITDIR). Then: systemctl daemon-reload; systemctl enable --now
# sockscope. docs/service.md explains each step and the unit's settings.
PREFIX ?= /opt/sockscope
CONFDIR ?= /etc/sockscope
UNITDIR ?= /etc/systemd/system

install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install --quiet --disable-pip-version-check .
	install -d -m 0755 $(DESTDIR)$(CONFDIR)
	[ -e $(DESTDIR)$(CONFDIR)/sockscope.yaml ] || install -m 0644 config/sockscope.yaml $(DESTDIR)$(CONFDIR)/sockscope.yaml
	install -D -m 0644 systemd/sockscope.service $(DESTDIR)$(UNITDIR)/sockscope.service
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now sockscope"

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

# Side-by-side benchmark (root: its own network namespace; docs/performance.md). Installs
# collectd-core and prometheus-node-exporter with their services held back and disabled.
# bench-1m adds a 1M-socket table: ~3.5 GB of kernel memory, several minutes.
BENCH_ARGS ?=
bench: venv
	bench/deps.sh
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-1m: venv
	bench/deps.sh
	$(BIN)/python -m bench.run --1m $(BENCH_ARGS)

# The real daemon under scrapes (bench/scrape.py): /metrics render at 100k and 1M, 50
# concurrent scrapers for 60 s vs the poll cadence; bench-soak: RSS over 10,000 polls on a
# churning table (several minutes). Neither is part of `make test`.
bench-scrape: venv
	bench/deps.sh
	$(BIN)/python -m bench.scrape --1m $(BENCH_ARGS)

bench-soak: venv
	$(BIN)/python -m bench.scrape --sizes '' --soak $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build daemon/*.egg-info .pytest_cache
