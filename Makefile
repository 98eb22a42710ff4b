# Developer entry points. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv

# The CAN VM (scripts/canvm/README.md): User-Mode Linux with a real SocketCAN stack and vcan0 up.
# Needs root; the first run downloads ~45 MB of Debian packages into CANVM_DIR (outside the tree).
CANVM := scripts/canvm/run-in-vm.sh
CANVM_DIR ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/dongle-canvm,/var/tmp/dongle-canvm)
export CANVM_DIR

# The kernel-level tests, plus the CAN driver tests rerun on socketcan/vcan0 instead of
# python-can's virtual bus.
SOCKETCAN_TESTS := tests/socketcan tests/test_can.py tests/test_can_replay.py

.PHONY: help lock wheelhouse test-socketcan test-install soak bench-store bench-memory \
        devicevm-image devicevm-image-arm64 test-device test-device-ci test-device-short test-device-arm64 soak-device

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

test-socketcan: ## run the SocketCAN tests in the CAN VM (root; one-time setup)
	CAN_TEST_INTERFACE=socketcan CAN_TEST_CHANNEL=vcan0 \
	  $(CANVM) $(VENV)/bin/pytest -q -p no:cacheprovider $(SOCKETCAN_TESTS)

# The device's dependencies: requirements.lock (exact pins, wheel hashes), compiled from
# requirements.txt. `make wheelhouse` downloads its wheels for one architecture (default: this
# machine's) into a directory scripts/install.sh --wheelhouse installs from, offline.
ARCH ?= $(shell uname -m)
WHEELHOUSE ?= build/wheelhouse-$(ARCH)

lock: ## re-resolve requirements.txt into requirements.lock (scripts/lock.sh; installs uv into ~/.cache)
	scripts/lock.sh

wheelhouse: ## the locked wheels for ARCH (x86_64|aarch64) into WHEELHOUSE (default build/wheelhouse-ARCH)
	$(VENV)/bin/python -m scripts.refcloud.wheelhouse $(ARCH) $(WHEELHOUSE)

# The VM has no network: install.sh gets the agent's dependencies from a wheelhouse made here.
test-install: ## run scripts/install.sh for real in the CAN VM (throwaway root fs), then provision
	scripts/canvm/setup.sh
	$(VENV)/bin/python -m scripts.refcloud.wheelhouse $$(uname -m) $(CANVM_DIR)/wheelhouse
	DONGLE_WHEELHOUSE=$(CANVM_DIR)/wheelhouse \
	  $(CANVM) $(VENV)/bin/pytest -q -p no:cacheprovider tests/socketcan/test_install_in_vm.py

# The device VM (scripts/devicevm/README.md): Debian 12 with systemd as PID 1 under QEMU (TCG),
# built from Debian packages by debootstrap into /var/tmp/dongle-devicevm (~1.5 GB per arch).
# Needs root; the first build apt-get installs debootstrap, qemu-system-*, qemu-utils, socat
# (arm64 also qemu-user-static, binfmt-support).
DEVICEVM_BUILD := scripts/devicevm/build.sh
DEVICE_TESTS := tests/device

devicevm-image: ## build (or find) the amd64 device VM image (root; ~2 min the first time)
	@$(DEVICEVM_BUILD) --arch amd64 >/dev/null

devicevm-image-arm64: ## build (or find) the arm64 device VM image (root; ~8 min the first time)
	@$(DEVICEVM_BUILD) --arch arm64 >/dev/null

# The installed dongle (tests/device/dongle.py): each run builds a wheelhouse of requirements.lock
# for the guest (pip download into /var/tmp/dongle-devicevm/wheelhouse-ARCH, reused between runs) and
# runs scripts/install.sh in the VM once; the broker and the ELM327-emulator run on the host.
PYTEST_DEVICE = $(VENV)/bin/pytest -q -p no:cacheprovider -s
test-device: devicevm-image ## everything in the amd64 device VM: systemd, watchdog, start limit, power cuts, clock, CAN (~25 min)
	DEVICEVM_ARCH=amd64 DEVICEVM_REQUIRE=1 $(PYTEST_DEVICE) -m "device and not soak" $(DEVICE_TESTS)

# The short form ./scripts/test.sh runs (about 12 minutes): the install, the agent under systemd
# (readiness, journal, status, logs, sandbox, configuration error), the root-owned slots, and
# 3 real power cuts under load.
DEVICE_CI_TESTS := tests/device/test_dongle_systemd.py \
	tests/device/test_dongle_updates.py::test_install_sh_installed_a_root_owned_slot_and_every_unit \
	tests/device/test_dongle_updates.py::test_the_agent_s_user_cannot_modify_any_file_of_any_slot \
	tests/device/test_dongle_powercut.py
test-device-ci: devicevm-image ## the device VM's short form, part of ./scripts/test.sh: install, systemd, sandbox, 3 power cuts (~12 min)
	DEVICEVM_ARCH=amd64 DEVICEVM_REQUIRE=1 $(PYTEST_DEVICE) -m "device and not soak and not device_long" $(DEVICE_CI_TESTS)

test-device-short: devicevm-image ## the device VM tests without the device_long ones (~25 min)
	DEVICEVM_ARCH=amd64 DEVICEVM_REQUIRE=1 $(PYTEST_DEVICE) -m "device and not soak and not device_long" $(DEVICE_TESTS)

test-device-arm64: devicevm-image-arm64 ## arm64 VM (qemu-system-aarch64, virt): install, agent under systemd, telemetry, status, lgpio
	DEVICEVM_ARCH=arm64 DEVICEVM_REQUIRE=1 $(PYTEST_DEVICE) -m "device and not soak and not device_long" \
	  tests/device/test_devicevm.py tests/device/test_dongle_systemd.py

soak-device: devicevm-image ## 30 real power cuts (QEMU killed) of the installed agent under load (~40 min)
	DEVICEVM_ARCH=amd64 DEVICEVM_REQUIRE=1 $(PYTEST_DEVICE) -m "device and soak" --timeout=7200 \
	  tests/device/test_dongle_powercut.py

# Store and forward (docs/store.md): the 50-cut power-cut run and other long tests (pytest marker
# `soak`, excluded from the default suite by pytest.ini).
soak: ## the soak tests: 50 SIGKILL power cuts during heavy ingest, 50 kills during an update (minutes)
	$(VENV)/bin/pytest -q -p no:cacheprovider -m soak --timeout=1800 -s tests/

bench-store: ## wire bytes per frame / sample / vehicle-day and the 24 h backlog drain (bench/bench_store.py)
	$(VENV)/bin/python bench/bench_store.py

bench-memory: ## agent RSS over 10 minutes at 10,000 frames/s (bench/bench_memory.py)
	$(VENV)/bin/python bench/bench_memory.py --duration 600 --rate 10000
