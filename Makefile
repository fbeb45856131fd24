# The README's two commands:  `make demo`  and  `make test`.
# Each sets up .venv (pinned requirements) on first use, then runs.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: demo test test-floor setup setup-test clean

# Pinned requirements first, then the project itself in editable mode (console
# scripts deml-train, deml-evaluate, ... on the venv's PATH; see README "Install").
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# DeML(3,3) on the bundled digits 0-4; Recall@K etc. on the unseen 5-9; pictures.
demo: $(VENV)/.installed
	$(PY) -m deml_jax.main --config configs/demo_digits.py --workdir runs/demo_digits

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs/demo_digits .pytest_cache

# The supported JAX floor (pyproject.toml): a second venv with jax/jaxlib 0.10.0
# and the rest pinned as usual, running the core tests (model, ops, losses,
# parallel step, optimiser, kernels).  CI runs it after `make test`.
VENV_FLOOR ?= .venv-floor
JAX_FLOOR  ?= 0.10.0
FLOOR_TESTS ?= tests/models/test_kernels.py tests/losses tests/ops/test_grad_reverse.py tests/ops/test_random_walk.py tests/test_optim.py tests/test_parallel.py

$(VENV_FLOOR)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_FLOOR)
	$(VENV_FLOOR)/bin/python -m pip install -q --upgrade pip setuptools wheel
	sed -e 's/^jax==.*/jax==$(JAX_FLOOR)/' -e 's/^jaxlib==.*/jaxlib==$(JAX_FLOOR)/' requirements.txt > $(VENV_FLOOR)/requirements-floor.txt
	sed -e 's/^-r requirements.txt/-r requirements-floor.txt/' requirements-test.txt > $(VENV_FLOOR)/requirements-test-floor.txt
	$(VENV_FLOOR)/bin/python -m pip install -q -r $(VENV_FLOOR)/requirements-test-floor.txt
	$(VENV_FLOOR)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-floor: $(VENV_FLOOR)/.installed
	$(VENV_FLOOR)/bin/python -c "import jax; assert jax.__version__ == '$(JAX_FLOOR)', jax.__version__; print('jax', jax.__version__)"
	$(VENV_FLOOR)/bin/python -m pytest $(PYTEST_ARGS) $(FLOOR_TESTS)
