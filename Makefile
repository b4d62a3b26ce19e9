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
# collectd-core: the real collectd 5.12 (tcpconns + write_graphite) that must write the same host
# name as sockscope's collectd naming (tests/test_graphite_e2e.py).
DEB_PACKAGES += collectd-core
# systemd-analyze (verify/security of systemd/sockscope.service; systemd need not be PID 1),
# curl (scrapes from inside a test namespace), openssl (test certificates), time (GNU
# time: the bench sanity test measures ss's own peak RSS with it).
DEB_PACKAGES += systemd curl openssl time
# tmux: `sockscope snapshot --watch` is tested in a real terminal (tests/test_cli.py).
DEB_PACKAGES += tmux
# nftables: the connections tests drop packets in a test namespace (retransmissions, SYNs
# that time out: tests/test_connections.py).
DEB_PACKAGES += nftables
# python3-venv: ensurepip for Debian's python3, which `make install` builds its venv from
# (tests/test_packaging.py installs into a staging directory).
DEB_PACKAGES += python3-venv

.PHONY: run test lint venv venv-test system-deps clean install uninstall bench bench-1m bench-scrape bench-soak

# `make install` as root: a venv in $(PREFIX) built from a system interpreter (refused if
# it lives under /home, /root or /run/user, which the unit's ProtectHome=yes hides), the
# config in $(CONFDIR) (a changed one is kept), the unit in $(UNITDIR). With DESTDIR the
# tree is staged there and names only $(PREFIX), ready to package or move. Then:
# systemctl daemon-reload; systemctl enable --now sockscope. `make uninstall` removes it
# all but a changed config. docs/service.md explains each step.
PREFIX ?= /opt/sockscope
CONFDIR ?= /etc/sockscope
UNITDIR ?= /etc/systemd/system
INSTALL_PYTHON ?= /usr/bin/python3
# extra pip arguments, e.g. --no-index --find-links DIR to build offline
PIP_INSTALL_ARGS ?=
INSTALL_ENV = DESTDIR='$(DESTDIR)' PREFIX='$(PREFIX)' CONFDIR='$(CONFDIR)' UNITDIR='$(UNITDIR)'

install:
	@$(INSTALL_ENV) INSTALL_PYTHON='$(INSTALL_PYTHON)' PIP_INSTALL_ARGS='$(PIP_INSTALL_ARGS)' sh scripts/install.sh

uninstall:
	@$(INSTALL_ENV) sh scripts/uninstall.sh

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

# Installs the missing Debian packages when run as root (scripts/deb-install.sh holds
# back and disables the services apt would start: the tests start their own servers).
system-deps:
	@sh scripts/deb-install.sh $(DEB_PACKAGES)

# ruff (lint + import order) and mypy (daemon/) first: versions pinned in the test extra,
# rules in pyproject.toml.
lint: venv-test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: system-deps venv-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Side-by-side benchmark (root: its own network namespace; docs/performance.md). Installs
# collectd-core and prometheus-node-exporter with their services held back and disabled.
# bench-1m adds a 1M-socket table: ~3.5 GB of kernel memory, several minutes.
BENCH_ARGS ?=
# collectd's tcpconns and node_exporter 1.5 to compare with; GNU time for ss's own peak RSS.
BENCH_DEB_PACKAGES := collectd-core prometheus-node-exporter iproute2 time
bench: venv
	@sh scripts/deb-install.sh $(BENCH_DEB_PACKAGES)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-1m: venv
	@sh scripts/deb-install.sh $(BENCH_DEB_PACKAGES)
	$(BIN)/python -m bench.run --1m $(BENCH_ARGS)

# The real daemon under scrapes (bench/scrape.py): /metrics render at 100k and 1M, 50
# concurrent scrapers for 60 s vs the poll cadence; bench-soak: RSS over 10,000 polls on a
# churning table (several minutes). Neither is part of `make test`.
bench-scrape: venv
	@sh scripts/deb-install.sh $(BENCH_DEB_PACKAGES)
	$(BIN)/python -m bench.scrape --1m $(BENCH_ARGS)

bench-soak: venv
	$(BIN)/python -m bench.scrape --sizes '' --soak $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build daemon/*.egg-info .pytest_cache .mypy_cache .ruff_cache
