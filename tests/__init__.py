"""cedargate's tests. A package so that `tests.support`, the helpers they share with bench/, is importable."""
