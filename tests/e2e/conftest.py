"""Fixtures for the end-to-end tests; the harness itself is in e2e_support.py, importable by tests."""

from e2e_support import cedargate, database_url, nginx, raw_upstream, sni_front, upstream  # noqa: F401  (pytest fixtures)
