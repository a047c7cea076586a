# imds-tracer: `make run` starts the agent, `make test` runs every test.
# Both install what is missing first (OS packages, kernel headers, the venv).

PYTHON_OS  ?= /usr/bin/python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
OS_STAMP   := .os-deps.stamp
# OS packages: BCC from the distribution (not PyPI), headers for it to compile against,
# and the real tools the tests drive (tcpdump, curl, iproute2, promtool, dpkg-deb, tshark);
# the kernel lab's qemu, debootstrap and busybox-static (tests/lab/vm.py, tests/matrix).
OS_PACKAGES ?= python3-bpfcc bpftool python3-venv python3-pip iproute2 tcpdump curl \
	prometheus dpkg-dev fakeroot rpm tshark systemd logrotate help2man \
	python3-psutil python3-prometheus-client python3-scapy python3-seccomp \
	qemu-system-x86 debootstrap busybox-static

.PHONY: all deps os-deps venv run test test-host test-unit test-matrix lab-setup bench bench-matrix deb rpm clean

all: test

os-deps: $(OS_STAMP)
$(OS_STAMP): scripts/install-os-deps.sh
	OS_PACKAGES="$(OS_PACKAGES)" sh scripts/install-os-deps.sh
	touch $@

venv: $(STAMP)
$(STAMP): pyproject.toml | $(OS_STAMP)
	test -x $(PY) || $(PYTHON_OS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

deps: venv

run: deps
	$(VENV)/bin/imds-tracer run $(ARGS)

# everything: unit, replay, faults, packaging, this kernel's tests, and the kernel lab's
# Debian 11/12/13 guests on their own kernels (tests/matrix; cache: IMDS_TRACER_LAB_CACHE)
test: deps
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# this host only (no guests)
test-host: deps
	$(PY) -m pytest -ra --ignore=tests/matrix $(PYTEST_ARGS)

# the kernel lab alone
test-matrix: deps
	$(PY) -m pytest -ra tests/matrix $(PYTEST_ARGS)

lab-setup: deps
	$(PY) -m tests.lab.vm setup

test-unit: deps
	$(PY) -m pytest -ra tests/unit tests/replay $(PYTEST_ARGS)

bench: deps
	$(PY) bench/run_all.py

# the unrelated-send overhead of auto's backend in each kernel-lab guest (bench/RESULTS.md)
bench-matrix: deps
	$(PY) bench/matrix_bench.py

deb: deps
	sh packaging/deb/build.sh

rpm: deps
	sh packaging/rpm/build.sh

clean:
	rm -rf $(VENV) $(OS_STAMP) dist build *.egg-info .pytest_cache
