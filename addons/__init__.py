"""mitmproxy addons: thin adapters that feed each intercepted call to the cedargate core."""

from __future__ import annotations


def default_addons(runtime=None, open_files: int | None = None) -> list:
    from addons.agent_auth import AgentAuth
    from addons.client_limits import ClientLimits
    from addons.enforcer import Enforcer

    # ClientLimits last: it reads what the others decided (AgentAuth's credentials, relayed tunnels).
    return [
        AgentAuth(runtime.agents if runtime else None),
        Enforcer(runtime),
        ClientLimits(runtime.settings if runtime else None, open_files),
    ]
