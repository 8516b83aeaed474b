# Two commands for a new user (see README): `make demo` runs the main job, `make test` the test suite.
# Both create the project's virtual environment in .venv when it is missing and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Short MAE pretraining on real data (Fashion-MNIST: Debian's dataset-fashion-mnist, or --download when online),
# with reconstruction figures in $(DEMO_DIR)/vis and the loss curve in $(DEMO_DIR)/loss_curve.png.
demo: $(STAMP)
	$(PY) main_pretrain.py --dataset fashion_mnist --model mae_vit_tiny_patch4 --input_size 28 \
		--max_train_images 4096 --epochs 3 --warmup_epochs 1 --batch_size 64 --blr 1.5e-4 --norm_pix_loss \
		--num_workers 2 --vis_freq 1 --output_dir $(DEMO_DIR) --log_dir $(DEMO_DIR)

clean-venv:
	rm -rf $(VENV)
