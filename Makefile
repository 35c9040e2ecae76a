# Everything a fresh Debian 12 machine needs is installed from here:
#   make demo   - vhost-user-blk + rng daemons, a tiny QEMU guest writes, reads back and verifies
#   make test   - lint and the whole test suite (unit tests and real QEMU guests)
#   make bench  - vfiouserd against qemu-storage-daemon, side by side
# Downloads are cached under .cache/ (pip, Debian packages, the guest build).

PYTHON ?= python3
VENV := .venv
CACHE := .cache
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEB_PACKAGES := qemu-system-x86 qemu-utils gcc libcap-dev libseccomp2 util-linux strace systemd
export PIP_CACHE_DIR := $(CURDIR)/$(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all test unit lint demo bench deps venv guest clean

all: test

# Debian packages (QEMU 7.2 with qemu-storage-daemon, headers for python-prctl,
# strace to record the jailed daemon's system calls, systemd for
# systemd-analyze, which judges the units), and package lists fresh enough for `apt-get download` of the guest kernel.
$(CACHE)/deps.stamp: Makefile
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] || ! apt-cache policy linux-image-cloud-amd64 | grep -q 'Candidate: [0-9]'; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

deps: $(CACHE)/deps.stamp

$(VENV)/stamp: $(CACHE)/deps.stamp pyproject.toml setup.py vfiouserd/_native_build.py \
		vfiouserd/fastpath.c vfiouserd/fastpath.h devices/blk_fastpath.c devices/blk_fastpath.h
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/stamp

guest: $(VENV)/stamp
	$(VENV)/bin/python guest/build.py

lint: $(VENV)/stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(VENV)/stamp
	$(VENV)/bin/pytest -m "not qemu"

test: lint guest
	$(VENV)/bin/pytest

demo: guest
	$(VENV)/bin/python guest/demo.py

bench: guest
	$(VENV)/bin/python bench/blk.py
	$(VENV)/bin/python bench/downtime.py

clean:
	rm -rf $(VENV) $(CACHE)/guest build *.egg-info
