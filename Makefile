# The two commands of the README. Each sets up what it needs and is safe to run twice.
#   make test   Debian packages, a virtualenv in .venv with the package and its dev
#               extras, then pytest.
#   make demo   the main job on the local synthesized corpus (not there yet: it
#               says so and exits with status 2).

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := espeak-ng flite fortunes-min
DEVICES ?= 4
export XLA_FLAGS ?= --xla_force_host_platform_device_count=$(DEVICES)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test demo setup debian-packages clean

debian-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: debian-packages $(STAMP)

test: setup
	$(VENV_PY) -m pytest -q tests

demo:
	@echo "make demo is not there yet: it arrives with the Federated Dropout experiment."
	@echo "Meanwhile see README.md (Training) for the central, analysis and federated runs."
	@exit 2

clean:
	rm -rf $(VENV) build *.egg-info
