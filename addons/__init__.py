"""mitmproxy addons: thin adapters that feed each intercepted call to the cedargate core."""

from __future__ import annotations


def default_addons(runtime=None, open_files: int | None = None) -> list:
    from addons.agent_auth import AgentAuth
    from addons.client_limits import ClientLimits
    from addons.enforcer import Enforcer
    from addons.passthrough import Passthrough
    from addons.trailers import Http1Trailers
    from addons.upstream_deadline import UpstreamDeadlines

    enforcer = Enforcer(runtime)
    return [
        Http1Trailers(),
        AgentAuth(runtime.agents if runtime else None),
        enforcer,
        # After the enforcer: it times only the calls the enforcer let go.
        UpstreamDeadlines(runtime.settings if runtime else None),
        Passthrough(lambda: enforcer.runtime),
        # Last: it reads what the others decided (AgentAuth's credentials, relayed tunnels).
        ClientLimits(runtime.settings if runtime else None, open_files, runtime.capacity if runtime else None),
    ]
