"""What a CONNECT tunnel may carry: calls to the one authority it was opened to, and nothing else.

Calls inside a tunnel are decided on the host of its CONNECT, so every other name a client gives for
where its call goes must be that host, or a server could route the call by it instead: an
absolute-form request target (RFC 9112 section 3.2.2: a server takes the target's authority over
Host) and the TLS server name (an SNI-routing front picks its backend by it). Which tunnels are
relayed uninspected (`passthrough_hosts`) is decided here too, on the CONNECT authority alone:
mitmproxy's `ignore_hosts` also matched the SNI and the Host header, which the client chooses.
Plain functions of plain values; `proxy.calls.mapping` turns a problem into a refusal.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from proxy.vocabulary.hosts import canonical_host

DEFAULT_PORTS = {"http": 80, "https": 443}


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) as host and port; ValueError if the port is not a number."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if port and not port.isdigit():
        raise ValueError(f"{authority!r} has no valid port")
    return host, int(port) if port else None


def authority_of(scheme: str, host: str, port: int) -> str:
    """The Host header value naming `host:port`, the port left out when it is the scheme's default."""
    name = f"[{host}]" if ":" in host else host
    return name if DEFAULT_PORTS.get(scheme) == port else f"{name}:{port}"


def target_problem(authority: str, scheme: str, host: str, port: int) -> str | None:
    """Why an absolute-form target with `authority`, sent in a tunnel to `host:port`, cannot be forwarded.

    None when it names the tunnel's own host and port (the port left out meaning the scheme's default).
    """
    try:
        named, named_port = split_authority(authority)
    except ValueError:
        named, named_port = authority, None
    if canonical_host(named) == canonical_host(host) and (named_port or DEFAULT_PORTS.get(scheme)) == port:
        return None
    return (f"the request target names {authority!r}, but the call goes through a tunnel to "
            f"{authority_of(scheme, host, port)!r}, which is what was decided; a server would route it "
            "by the target: inside a CONNECT tunnel send the path alone (origin-form), or open a tunnel "
            "to the host you mean")


def server_name_problem(server_name: str | None, host: str) -> str | None:
    """Why a TLS server name (SNI) sent in a tunnel to `host` cannot be forwarded; None when it is `host`.

    No server name is fine: a client connecting to an address sends none, and cedargate then sends
    the tunnel's own host upstream.
    """
    if not server_name or canonical_host(server_name) == canonical_host(host):
        return None
    return (f"the TLS server name (SNI) is {server_name!r}, but the tunnel goes to {host!r}, which is what "
            "was decided; a server may route by the server name: send the tunnel's host as SNI")


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(canonical_host(host))
    except ValueError:
        return False
    return True


class Passthrough:
    """The tunnels relayed uninspected: `passthrough_hosts` regexes, each matching the whole CONNECT
    host (canonical form) or the whole `host:port`.

    Whole, not searched as mitmproxy's `ignore_hosts` are: `pinned[.]example` must not also admit
    `pinned.example.attacker.test`, a host the agent chose.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(re.compile(p, re.IGNORECASE) for p in patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def covers(self, host: str, port: int) -> bool:
        host = canonical_host(host)
        authority = f"{host}:{port}"
        return any(p.fullmatch(host) or p.fullmatch(authority) for p in self.patterns)

    def admits(self, host: str, port: int, server_name: str | None) -> bool:
        """Whether a TLS tunnel to `host:port` whose client sent `server_name` is passed through.

        Only when the CONNECT authority is listed and the server name is that host: a front at the
        address might route another name to another backend. A client sends no server name only
        to an address; to a name, one is required.
        """
        if not self.covers(host, port):
            return False
        if server_name is None:
            return is_address(host)
        return server_name_problem(server_name, host) is None
