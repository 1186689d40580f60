"""The one spelling of a host that policies see, whatever spelling the agent used.

`127.1`, `2130706433` and `0x7f.0.0.1` all connect to 127.0.0.1 (the resolver accepts the old inet_aton
forms), so they must all be `Host::"127.0.0.1"`; otherwise an agent could dodge a forbid on a tagged
host by spelling it differently. Names are lower-cased without a trailing dot, IPv6 is compressed,
and IPv4-mapped IPv6 becomes the IPv4 address it connects to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

_INET_ATON_FORM = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


@functools.lru_cache(maxsize=4096)  # pure, and called several times per call on a handful of hosts
def canonical_host(host: str) -> str:
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address):
        return str(address.ipv4_mapped or address)
    if address is not None:
        return str(address)
    if _INET_ATON_FORM.match(name):
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            return name
    return name


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, in any spelling) is this machine's loopback."""
    name = canonical_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_local(host: str) -> bool:
    """Loopback, or the wildcard address, which a socket bound to "any" also answers on."""
    return is_loopback(host) or canonical_host(host) in ("0.0.0.0", "::")
