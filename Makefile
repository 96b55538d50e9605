# mta — the two commands a new machine needs:
#   make run    set up .venv and run `twistd -n mta` on the embedded defaults (127.0.0.1:2525 ...)
#   make test   set up both virtualenvs and run the whole suite twice: newest PyPI
#               releases (.venv) and Debian 12's packaged libraries (.venv-debian);
#               as root, it first apt-get installs what is missing (it prints the
#               lists: bash .ci/install-debian-deps --list shows them beforehand)
# Also: make test-latest, make test-debian, make lint, make bench, make clean.
# PYTEST_ARGS="-k smtp -x" narrows a run.

PYTHON        ?= python3
DEBIAN_PYTHON ?= /usr/bin/python3
VENV          ?= .venv
DEBIAN_VENV   ?= .venv-debian
PYTEST_ARGS   ?=
PYTEST        := -m pytest -p no:cacheprovider tests
# The Debian 12 packages the second run uses (installed by .ci/install-debian-deps).
DEBIAN_MODULES := twisted OpenSSL service_identity argon2 attr zope.interface pytest dns prometheus_client bcrypt pyasn1 dkim psycopg

SHELL := /bin/bash
comma := ,
.DEFAULT_GOAL := help
.PHONY: help run test test-latest test-debian lint format bench clean venv debian-venv deb
.PHONY: bench-submission bench-outbound

help:
	@sed -n 's/^#   make /  make /p; s/^#               /              /p; s/^# Also/Also/p' Makefile

# ---------------------------------------------------------------- virtualenvs

# editable_mode=compat puts the checkout itself on sys.path (a .pth line), which is what
# lets twistd find twisted/plugins/mta_plugin.py; setuptools' default editable finder
# maps only the mta package and the plugin would be invisible to `twistd`.
$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "== $(VENV): $(PYTHON) -m venv, pip install -e '.[test]'"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

$(DEBIAN_VENV)/.installed: setup.cfg pyproject.toml
	@echo "== $(DEBIAN_VENV): Debian 12's python3-* libraries + this package (--no-deps)"
	@if ! $(DEBIAN_PYTHON) -c 'import $(subst $(eval) ,$(comma),$(DEBIAN_MODULES))' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== $(DEBIAN_VENV): Debian's python3-* libraries are missing and this is root:"; \
	    echo "   apt-get installs them and the test tools (.ci/install-debian-deps; README.rst, Quick start)"; \
	    bash .ci/install-debian-deps; \
	  else \
	    echo "Debian's python3 libraries are missing; as root run: bash .ci/install-debian-deps" >&2; \
	    exit 1; \
	  fi; \
	fi
	$(DEBIAN_PYTHON) -m venv --system-site-packages $(DEBIAN_VENV)
	$(DEBIAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e .
	@# Debian 12 packages pytest-twisted 1.13 (python3-pytest-twisted); PyPI's otherwise.
	$(DEBIAN_VENV)/bin/python -c 'import pytest_twisted' 2>/dev/null || \
	  $(DEBIAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'pytest-twisted>=1.13'
	@touch $@

debian-venv: $(DEBIAN_VENV)/.installed


# ---------------------------------------------------------------- run

run: $(VENV)/.installed
	$(VENV)/bin/twistd -n --pidfile= mta

# ---------------------------------------------------------------- tests

test: $(VENV)/.installed $(DEBIAN_VENV)/.installed
	@rc=0; \
	$(MAKE) --no-print-directory test-latest || rc=1; \
	$(MAKE) --no-print-directory test-debian || rc=1; \
	if [ $$rc = 0 ]; then echo "== make test: both runs passed"; else echo "== make test: FAILED (see above)"; fi; \
	exit $$rc

test-latest: $(VENV)/.installed
	@echo "== tests on the newest releases: $$($(VENV)/bin/python -c 'import sys, twisted; print("Python", sys.version.split()[0], "Twisted", twisted.__version__)')"
	$(VENV)/bin/python $(PYTEST) $(PYTEST_ARGS)

test-debian: $(DEBIAN_VENV)/.installed
	@echo "== tests on Debian 12's packages: $$($(DEBIAN_VENV)/bin/python -c 'import sys, twisted; print("Python", sys.version.split()[0], "Twisted", twisted.__version__, "from", twisted.__file__)')"
	$(DEBIAN_VENV)/bin/python $(PYTEST) $(PYTEST_ARGS)

# ---------------------------------------------------------------- lint, bench

$(VENV)/.ruff: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check ruff
	@touch $@

# bench/ is the reference harness copied verbatim; it is not held to our style.
LINT_PATHS := mta tests twisted/plugins

lint: $(VENV)/.ruff
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(VENV)/.ruff
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

bench: $(VENV)/.installed
	bash bench/run_mta.sh

# AUTH + TLS submission (issue #3) and outbound relay (issue #4), mta next to Postfix;
# SCALE=0.1 for a smoke run.  See bench/README.md.
bench-submission: $(VENV)/.installed
	bash bench/run_submission.sh

bench-outbound: $(VENV)/.installed
	bash bench/run_outbound.sh

# ---------------------------------------------------------------- Debian package

# make deb: dist/deb/mta_<version>_all.deb (dpkg-buildpackage -us -uc -b) built in a
# clean copy of the tree in a temporary directory (no .git, virtualenvs, var/, caches
# or dropin.cache get in; the checkout is not touched), then lintian: errors fail.
# Build dependencies: .ci/apt/deb.txt.  DEB_DIST=DIR puts the .deb elsewhere.  PATH is
# Debian's own, so the build uses /usr/bin/python3, not a virtualenv's or pyenv's.
DEB_DIST ?= dist/deb

deb:
	@set -euo pipefail; \
	build=$$(mktemp -d "$${TMPDIR:-/tmp}/mta-deb.XXXXXX"); \
	trap 'rm -rf "$$build"' EXIT; \
	mkdir -p "$$build/mta" "$(DEB_DIST)"; \
	tar -cf - --exclude=./.git --exclude='./.venv*' --exclude=./var --exclude=./dist \
	  --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ --exclude=dropin.cache \
	  --exclude=.pytest_cache --exclude=.ruff_cache . | tar -C "$$build/mta" -xf -; \
	echo "== make deb: dpkg-buildpackage -us -uc -b in $$build/mta"; \
	(cd "$$build/mta" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b); \
	echo "== make deb: lintian (errors fail, warnings are listed)"; \
	lintian --fail-on error --display-info "$$build"/mta_*.changes; \
	cp "$$build"/mta_*.deb "$(DEB_DIST)/"; \
	echo "== make deb: $$(ls "$(DEB_DIST)"/mta_*.deb)"

# ---------------------------------------------------------------- clean

clean:
	rm -rf $(VENV) $(DEBIAN_VENV) build dist *.egg-info .pytest_cache .ruff_cache twisted/plugins/dropin.cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
