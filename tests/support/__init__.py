"""What the tests and the benchmarks share: the one started core (`runtime`), the one logging upstream
(`upstream`) and the one launcher of a real cedargate process (`launch`).

Importable as `tests.support` from the repository root: pytest puts the root on sys.path (the
`pythonpath` setting in pyproject.toml) and bench/ scripts add it themselves.
"""
