"""The commands (`cedargate run`, `check`, `explain`, `audit`, `overrides`, ...) and the composition of
the running program: the only package that knows both adapters, `addons/` and `override_api/`.
"""
