# The two commands the README promises: `make run` and `make test`. Both set up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
# The end-to-end tests' real MCP server and agent run in a venv of their own
# (the MCP SDK's dependencies clash with mitmproxy 11's pins).
MCP_VENV := .venv-mcp
MCP_REQS := tests/e2e/mcp_peers/requirements.txt

.PHONY: run test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(MCP_VENV)/.installed: $(MCP_REQS)
	python3 -m venv $(MCP_VENV)
	$(MCP_VENV)/bin/python -m pip install -q --upgrade pip
	$(MCP_VENV)/bin/python -m pip install -q -r $(MCP_REQS)
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/cedargate run --config cedargate.yaml

test: $(VENV)/.installed $(MCP_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/proxy_overhead.py
	$(PY) bench/policy_scaling.py
	$(PY) bench/manifest_matching.py
	$(PY) bench/mcp_mapping.py
	$(PY) bench/held_calls.py
