# The two commands the README promises: `make run` and `make test`. Both set up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/cedargate run --config cedargate.yaml

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/proxy_overhead.py
	$(PY) bench/policy_scaling.py
	$(PY) bench/manifest_matching.py
	$(PY) bench/held_calls.py
