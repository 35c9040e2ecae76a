# Everything a fresh Debian 12 machine needs is installed from here:
#   make demo   - vhost-user-blk + rng daemons, a tiny QEMU guest writes, reads back and verifies
#   make test   - lint and the whole test suite (unit tests, real QEMU guests, a real systemd,
#                 libvirt)
#   make bench  - vfiouserd against qemu-storage-daemon, side by side, and what the
#                 control socket's clients (stats, trace, a misbehaving one) cost its I/O
#   make fuzz   - the stateful fuzzer against each device's real daemon, DURATION seconds
#                 each (default 600), SEED=N (default 1); findings under .cache/fuzz/
# Downloads are cached under .cache/ (pip, Debian packages, the guest build); the QEMU
# with vfio-user-pci that the project builds (make qemu, about 6 minutes on 2 cores the
# first time) under ~/.cache/vfiouserd (VFIOUSERD_CACHE), keyed by version.

PYTHON ?= python3
VENV := .venv
CACHE := .cache
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEB_PACKAGES := qemu-system-x86 qemu-utils gcc libc6-dev libcap-dev libseccomp2 util-linux strace systemd \
	python3-dev python3-venv libvirt-daemon-system libvirt-clients \
	dpkg-dev libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev libaio-dev flex bison \
	gcc-multilib ninja-build pkg-config socat passt
export PIP_CACHE_DIR := $(CURDIR)/$(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all test unit lint demo bench fuzz descriptors deps venv bytecode guest qemu clean

all: test

# Debian packages: QEMU 7.2 with qemu-storage-daemon; headers for python-prctl;
# strace to record the jailed daemon's system calls; systemd, which judges the
# units and runs them for real in the tests; Debian's Python with its headers
# (the tests install vfiouserd with it where a dynamic user can run it); libvirt;
# what building QEMU from Debian's source package needs (guest/qemu_build.py); socat, the
# host side of the console tests; and package
# lists fresh enough for `apt-get download` of the guest kernel.
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
		vfiouserd/fastpath.c vfiouserd/fastpath.h devices/blk_fastpath.c devices/blk_fastpath.h \
		devices/net_fastpath.c devices/net_fastpath.h sandbox/waiter.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/python -m compileall -q $(VENV)/lib $(PACKAGE_DIRS)
	@touch $@

venv: $(VENV)/stamp

# Every module a daemon loads compiled to a .pyc file, as pip does when it
# installs a package: an editable install compiles none of the tree's, and
# where PYTHONDONTWRITEBYTECODE is set, a daemon started from the tree would
# compile each of them again at every start (about 60 ms and 3 MiB more per
# daemon). With the venv's python, for its cache tag; files up to date stay.
# Then the code attrs, dataclasses and namedtuple generate as the daemon
# imports them (vfiouserd/generated_code.py), compiled once for every device.
PACKAGE_DIRS := vfiouserd protocol devices sandbox systemd

bytecode: $(VENV)/stamp
	$(VENV)/bin/python -m compileall -q $(PACKAGE_DIRS)
	$(VENV)/bin/python -m vfiouserd.generated_code

guest: $(VENV)/stamp bytecode
	$(VENV)/bin/python guest/build.py

# QEMU >= 10.1 with vfio-user-pci, built from Debian unstable's source package
# and cached outside the clone; nothing is built when the cache has it.
qemu: $(VENV)/stamp
	$(VENV)/bin/python guest/qemu_build.py

# The vhost-user descriptors in systemd/ come from the plugin registry;
# tests/test_descriptors.py fails when they are out of date.
descriptors: $(VENV)/stamp
	$(VENV)/bin/vfiouserd descriptors --bin-dir /usr/local/bin --output systemd

# mypy --strict over the bytes, the devices, the rings, guest memory, the
# handover records and both protocol sessions. The package maps folders to
# module names (pyproject's package-dir), which mypy cannot follow: it reads
# a tree of links under .cache/typed instead.
TYPED := $(CACHE)/typed
TYPED_MODULES := -p vfiouserd.protocol -p vfiouserd.devices -m vfiouserd.virtqueue \
	-m vfiouserd.virtio_pci -m vfiouserd.device_harness -m vfiouserd.changes \
	-m vfiouserd.memory -m vfiouserd.inflight -m vfiouserd.state -m vfiouserd.handover \
	-p vfiouserd.vhost_user -p vfiouserd.vfio_user -m vfiouserd.eventfds \
	-m vfiouserd.control -m vfiouserd.trace -m vfiouserd.stats -m vfiouserd.faults \
	-m vfiouserd.client.control -m vfiouserd.client.lab -m vfiouserd.client.nvme \
	-m vfiouserd.plugins -m vfiouserd.startup -m vfiouserd.upgrade -m vfiouserd.server \
	-m vfiouserd.generated_code -m vfiouserd.module_code

lint: $(VENV)/stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPED)/vfiouserd && mkdir -p $(TYPED)/vfiouserd
	for path in vfiouserd/*.py vfiouserd/*/ ; do ln -s $(CURDIR)/$$path $(TYPED)/vfiouserd/; done
	for folder in protocol devices sandbox; do ln -s $(CURDIR)/$$folder $(TYPED)/vfiouserd/$$folder; done
	cd $(TYPED) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml $(TYPED_MODULES)

unit: $(VENV)/stamp bytecode
	$(VENV)/bin/pytest -m "not qemu"

test: lint guest qemu
	$(VENV)/bin/pytest

demo: guest
	$(VENV)/bin/python guest/demo.py

bench: guest
	$(VENV)/bin/python bench/blk.py
	$(VENV)/bin/python bench/downtime.py
	$(VENV)/bin/python bench/input.py
	$(VENV)/bin/python bench/console.py
	$(VENV)/bin/python bench/net.py
	$(VENV)/bin/python bench/lab.py
	$(VENV)/bin/python bench/footprint.py

# Every device gets its turn even when an earlier one had findings; the
# target fails if any had. Replay a finding with the command its FINDING line
# prints (run from the top of the tree with $(VENV)/bin/python).
DURATION ?= 600
SEED ?= 1
FUZZ_DEVICES := vhost-user-blk vhost-user-rng vhost-user-console vhost-user-vsock vhost-user-net vfio-user-blk vfio-user-example

fuzz: $(VENV)/stamp bytecode
	@status=0; for device in $(FUZZ_DEVICES); do \
		mkdir -p $(CACHE)/fuzz/$$device; \
		$(VENV)/bin/python -m fuzz.run --device $$device --duration $(DURATION) --seed $(SEED) \
			--workdir $(CACHE)/fuzz/$$device || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) $(CACHE)/guest build *.egg-info
