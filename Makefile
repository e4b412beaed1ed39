# The two commands of the README. Each sets up what it needs and is safe to run twice.
#   make test   Debian packages, a virtualenv in .venv with the exact versions of
#               requirements.lock and the package, libtpu of
#               requirements-tpu-plan.lock (tests/test_tpu_plan.py), then pytest.
#   make demo   the same virtualenv without libtpu, then the main job
#               (configs/experiment.py) on the local synthesized corpus:
#               pre-training, layer importance, five federated runs, report.md
#               in $(DEMO_WORKDIR). Run again, it reuses what is done.
# `pip install .` (setup.py) takes version ranges instead; its extras are
# [data], [study], [tpu-plan] and [dev].

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TPU_STAMP := $(VENV)/.installed-tpu-plan
DEBIAN_PACKAGES := espeak-ng flite fortunes-min fortunes bible-kjv
DEVICES ?= 4
DEMO_WORKDIR ?= runs/demo
DEMO_ARGS ?=
export XLA_FLAGS ?= --xla_force_host_platform_device_count=$(DEVICES)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test demo setup debian-packages clean

debian-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c "import ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q --require-hashes -r requirements.lock
	$(VENV_PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(TPU_STAMP): $(STAMP) requirements-tpu-plan.lock
	$(VENV_PY) -m pip install -q --require-hashes -r requirements-tpu-plan.lock
	touch $(TPU_STAMP)

setup: debian-packages $(STAMP)

# Two pytest-xdist workers; tests/conftest.py hands out one module per work
# unit, the longest first.
TEST_WORKERS ?= 2
test: setup $(TPU_STAMP)
	$(VENV_PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --no-loadscope-reorder tests

# Progress goes to the terminal (stage banners and progress bars); the full log
# to $(DEMO_WORKDIR)/logs. Compiled programs are cached for the next run.
demo: setup
	@mkdir -p $(DEMO_WORKDIR)/logs
	JAX_COMPILATION_CACHE_DIR=$(abspath $(DEMO_WORKDIR))/.jax_cache \
	$(VENV_PY) -m conformer_fl.main --config=configs/experiment.py \
	  --workdir=$(DEMO_WORKDIR) --log_dir=$(DEMO_WORKDIR)/logs \
	  $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
