# The README's two commands:  `make demo`  and  `make test`.
# Each sets up .venv (pinned requirements) on first use, then runs.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?= -q

.PHONY: demo test setup setup-test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
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
