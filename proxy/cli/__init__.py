"""The commands (`cedargate run`, `check`, `explain`, `audit`, `overrides`, ...) and the composition of
the running program: the only package that knows both adapters, `addons/` and `override_api/`.

The program is composed two ways, from the same parts (`fronts`): `serve` for `cedargate run`, and
`standalone` for stock `mitmdump -s addons/enforcer.py`, whose script hands its addons over to it.
"""
