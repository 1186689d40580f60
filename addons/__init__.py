"""mitmproxy addons: thin adapters that feed each intercepted call to the cedargate core."""

from __future__ import annotations


def default_addons(runtime=None) -> list:
    from addons.agent_auth import AgentAuth
    from addons.enforcer import Enforcer
    from addons.passthrough import Passthrough
    from addons.trailers import Http1Trailers

    enforcer = Enforcer(runtime)
    return [Http1Trailers(), AgentAuth(runtime.agents if runtime else None), enforcer,
            Passthrough(lambda: enforcer.runtime)]
