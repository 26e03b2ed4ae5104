# `make test` is what CI runs (.ci/run). It runs two lanes, each in its own venv, pinned by a lock:
#   py311  .venv        Python 3.11, jax 0.10.x, every test (the torch reference tests too); editable
#   py312  .venv-py312  Python 3.12, the newest jax, no torch: the tests not marked `torch`; the package is
#                       installed as a user installs it (`pip install .`) and checked outside the checkout
# Why torch is pinned (and only in the py311 lane): the comment on the `torch` extra in pyproject.toml.
# The locks (requirements/*.lock) are pip's resolution in a fresh venv: `make lock` regenerates them.
# A Python is found by scripts/find_python.sh; name one with e.g. `make test PYTHON312=/path/to/python3.12`.
#
#   make test         both lanes          make test-py311 / test-py312 / check-install   one part
#   make demo         train the tiny model and generate from it (runtime and plotting only: .venv-demo)
#   make lint         ruff                make lock    regenerate both locks             make clean

PIP_VERSION := 26.3
PYTHON311 ?= $(shell scripts/find_python.sh 3.11)
PYTHON312 ?= $(shell scripts/find_python.sh 3.12)
PYTEST := -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider

.PHONY: test test-py311 test-py312 check-install demo lint lock install clean

# $(call venv,DIR,PYTHON,LOCK,PIP INSTALL ARGUMENTS): the venv (made once), pinned pip, then the project
# with the lock's versions (an existing venv is brought to them).
define venv
	@test -n "$(2)" || { echo "error: no Python for $(1) (see above)" >&2; exit 1; }
	test -x $(1)/bin/python || $(2) -m venv $(1)
	$(1)/bin/pip install -q pip==$(PIP_VERSION)
	$(1)/bin/pip install -q -c $(3) $(4)
	touch $(1)/.installed
endef

# What each venv installs (the extras are in pyproject.toml).
PY311_INSTALL := -e '.[test,torch,plot]'
PY312_INSTALL := '.[test,plot]'
DEMO_INSTALL := -e '.[plot]'

.venv/.installed: pyproject.toml requirements/py311.lock
	$(call venv,.venv,$(PYTHON311),requirements/py311.lock,$(PY311_INSTALL))

.venv-py312/.installed: pyproject.toml requirements/py312.lock
	$(call venv,.venv-py312,$(PYTHON312),requirements/py312.lock,$(PY312_INSTALL))

.venv-demo/.installed: pyproject.toml requirements/py311.lock
	$(call venv,.venv-demo,$(PYTHON311),requirements/py311.lock,$(DEMO_INSTALL))

install: .venv/.installed .venv-py312/.installed

test: test-py311 test-py312

test-py311: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/python $(PYTEST) tests

# The installed copy is rebuilt from the checkout first; the tests import the checkout (PYTHONPATH).
test-py312: check-install
	PYTHONPATH=$(CURDIR) .venv-py312/bin/python $(PYTEST) -m "not torch" tests

check-install: .venv-py312/.installed
	scripts/check_install.sh .venv-py312

demo: .venv-demo/.installed
	.venv-demo/bin/python demo.py

lint: .venv/.installed
	.venv/bin/ruff check .

lock:
	scripts/lock.sh $(PYTHON311) requirements/py311.lock test,torch,plot
	scripts/lock.sh $(PYTHON312) requirements/py312.lock test,plot

clean:
	rm -rf .venv .venv-py312 .venv-demo
