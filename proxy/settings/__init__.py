"""Settings: cedargate.yaml validated, and the agents' credentials.

May import `proxy.vocabulary` and `proxy.calls`.
"""
