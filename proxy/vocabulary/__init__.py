"""The words every layer shares: the catalogue of refusals (problem types), the canonical
JSON, printable text, host names.

Owns no state. Imports nothing of cedargate's.
"""
