# Two commands for a new user (see README): `make demo` runs the main job, `make test` the test suite.
# Both create the project's virtual environment in .venv when it is missing and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output
DEMO_ARGS ?=

.PHONY: demo test clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# End-to-end demo on real data (Fashion-MNIST from ./data, Debian's dataset-fashion-mnist, or downloaded into ./data):
# MAE pretraining with the kNN monitor, then linear probe and fine-tuning of the pretrained encoder vs random init and
# a linear classifier on the raw pixels; prints the table, leaves reconstruction figures and the loss curve in
# $(DEMO_DIR)/pretrain. Scale it with e.g. DEMO_ARGS="--pretrain_epochs 20 --blr 1.5e-3". See demo.py --help.
demo: $(STAMP)
	$(PY) demo.py --output_dir $(DEMO_DIR) $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV)
