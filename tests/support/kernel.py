"""What the kernel says of a running cedargate's connections (Linux /proc), read by the end-to-end tests
and by the benchmarks in bench/: which process holds each connection accepted on the proxy's port, that
is which worker of `cedargate run --workers N` accepted it."""

from __future__ import annotations

import os
from pathlib import Path

ESTABLISHED = "01"  # the state column of /proc/net/tcp


def connections_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections accepted on `port` each of `pids` holds (0 for one that is gone)."""
    accepted = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == ESTABLISHED and int(fields[1].rsplit(":", 1)[1], 16) == port:
                accepted.add(fields[9])  # the socket's inode
    return {pid: len(_sockets(pid) & accepted) for pid in pids}


def _sockets(pid: int) -> set[str]:
    """The inodes of the sockets `pid` has open."""
    sockets = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone
        return sockets
    for fd in descriptors:
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:["):-1])
    return sockets
