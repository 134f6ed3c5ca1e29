# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
TF_PACKAGE ?= tensorflow-cpu

.PHONY: install demo test test-fast clean

install:
	TF_PACKAGE=$(TF_PACKAGE) VENV=$(VENV) scripts/install.sh

demo: install
	$(VENV)/bin/fgl-demo --out runs/demo

test: install
	$(VENV)/bin/python -m pytest -q tests

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf runs data/generated
