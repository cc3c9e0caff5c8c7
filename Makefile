# xencbt: the two commands a user needs are `make demo` and `make check`.
# Both start with `make deps`, which is idempotent and takes seconds once done.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.deps-stamp
DEB_PKGS := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-utils \
            python3-cryptography python3-rich python3-venv python3-pip e2fsprogs openssl \
            strace
# backup --cluster (jobs/cluster.py) and its tests; without recommends, which would pull
# pandas, scipy and a system pytest the venv would then take for its own.
CLUSTER_PKGS := python3-distributed
# For the VM mount tests (tests/vmharness.py); installed without recommends (no GUI).
VM_PKGS := qemu-system-x86 busybox-static nbd-client cpio
# For `xencbt files` (libguestfs; its appliance boots a kernel from /boot) and its tests
# (tests/test_cli_files.py; cryptsetup-bin makes the guest's LUKS header); without recommends.
GUESTFS_PKGS := libguestfs-tools python3-guestfs libguestfs-xfs linux-image-amd64 cryptsetup-bin

.PHONY: deps demo check lint test faults mutants bench clean deb deb-check rpm rpm-check man

# $(call apt_ensure,PACKAGES[,APT-OPTIONS]): install the ones not installed yet; dpkg-query
# first, so a second run never touches apt.
define apt_ensure
	@missing=$$(for p in $(1); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(2) $$missing; \
	fi
endef

deps: $(STAMP)

# Debian packages are checked with dpkg-query first so a second run does not
# touch apt at all; the venv is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(call apt_ensure,$(DEB_PKGS))
	$(call apt_ensure,$(CLUSTER_PKGS),--no-install-recommends)
	$(call apt_ensure,$(VM_PKGS),--no-install-recommends)
	$(call apt_ensure,$(GUESTFS_PKGS),--no-install-recommends)
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: deps
	$(PY) -m xensim.backupdemo

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The suite waits far more than it computes, so it runs on more workers than cores
# (pytest-xdist; tests/conftest.py keeps tests sharing a module fixture on one worker and
# gives each worker its own slots, secret watch and temp dirs): about 17 min on 2 cores,
# against over an hour in one process (JOBS=1).  Windows a test must hold open are held by events
# (the product's test hook, xensim's read gate), not timers, so load does not move them.
# The 20 slowest tests are printed at the end.
JOBS ?= 3
PYTEST_PAR = $(if $(filter 1,$(JOBS)),-p no:xdist,-n $(JOBS) --dist loadgroup)

test: deps
	$(VENV)/bin/pytest $(PYTEST_PAR) --durations=20

check: lint test

# The fault-and-abuse suite alone (it is also part of `make check`).
faults: deps
	$(VENV)/bin/pytest -m reliability

# Known bugs planted one at a time in a scratch copy; each must be caught (tests/mutants.py).
mutants: deps
	$(PY) tests/mutants.py

# Benchmarks against the direct TLS path (not part of `make check`; < 15 min on 2 cores).
# BENCH_QUICK=1 for a one-minute smoke run; results in bench/results/, table: see README.
bench: deps
	$(PY) -m bench.run

# The man pages (packaging/man/*.pod) built with pod2man into build/man (MAN_OUT=DIR for
# another folder), as the .deb and the .rpm build and ship them; read one with
# `man -l build/man/xencbt.1`.
MAN_PAGES := nbdkit-xencbt-plugin xencbt xensim
MAN_OUT ?= build/man

man:
	@command -v pod2man >/dev/null || { echo "make man: pod2man (perl) is needed" >&2; exit 1; }
	@mkdir -p $(MAN_OUT)
	@for page in $(MAN_PAGES); do \
	  pod2man --section=1 --center=xencbt --release="xencbt $$(packaging/version.sh)" \
	    --name="$$page" --errors=die packaging/man/$$page.pod $(MAN_OUT)/$$page.1 || exit 1; \
	done
	@echo "built: $(patsubst %,$(MAN_OUT)/%.1,$(MAN_PAGES)) (man -l $(MAN_OUT)/xencbt.1)"

# Packages (packaging/): Debian packages into dist/, then install, use and purge them.
DEB_BUILD_PKGS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
                  perl lintian
RPM_BUILD_PKGS := rpm perl


deb:
	$(call apt_ensure,$(DEB_BUILD_PKGS))
	packaging/build-deb.sh

# Run after the tests, never during them: installed, the package would shadow the venv.
deb-check: deb
	packaging/test-installed.sh

rpm:
	$(call apt_ensure,$(RPM_BUILD_PKGS))
	packaging/rpm/build-rpm.sh

# The built rpms inspected without EL9 (requires, provides, files, scriptlets, rpmlint);
# seconds once the tools are installed (CI runs it).
rpm-check: rpm
	$(call apt_ensure,rpmlint)
	packaging/rpm/check-rpm.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
