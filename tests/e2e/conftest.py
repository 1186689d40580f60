"""Fixtures for the end-to-end tests; the harness itself is in e2e_support.py, importable by tests."""

from e2e_support import cedargate, database_url, raw_upstream, upstream  # noqa: F401  (pytest fixtures)
