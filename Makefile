# Two commands do everything on a fresh machine:
#   make test   set up .venv and run the test suite
#   make demo   set up .venv, install the demo corpus, run recipes/demo end to end
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORPUS_DIR ?= /usr/share/asterisk/sounds/en_US_f_Allison
PYTEST_ARGS ?=

.PHONY: setup corpus test test-fast demo clean gpu-check

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip wheel
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev,eval]'
	$(PY) -c "import torch, torchaudio, wavedistill; print('environment ready: torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# The demo corpus: one real speaker, 568 prompts, 8 kHz (Debian: asterisk-core-sounds-en-wav).
corpus:
	@if [ -d "$(CORPUS_DIR)" ] && ls "$(CORPUS_DIR)"/*.wav >/dev/null 2>&1; then \
	  echo "demo corpus present: $(CORPUS_DIR)"; \
	else \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq asterisk-core-sounds-en-wav; \
	fi

test: setup corpus
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine: kernels vs reference, generation and training speed, one JSON (GPU_CHECK_OUT).
gpu-check: setup
	PY=$(PY) bash benchmarks/gpu_check.sh

demo: setup corpus
	bash recipes/demo/run.sh --wav-dir "$(CORPUS_DIR)"

clean:
	rm -rf exp/demo data/demo
