"""Loopback ports for the servers Baton starts on one machine (Redis, routers, benchmark peers).

A port the OS hands out for `bind(port 0)` comes from the kernel's ephemeral range, the same range
every other listener started with port 0 draws from: Ray's GCS, raylets, object managers and
agents, and gRPC servers. Choosing a port there, closing it and binding it again later races all
of them. So `free_port` picks among the ports below the ephemeral range and above Ray's worker
ports, where only servers given an explicit port live, and checks that the one it picks is free.
Where the kernel leaves no such room, it falls back to the OS's choice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
# Ray hands its worker processes ports 10002-19999 unless told otherwise.
FIRST_PORT = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
MIN_CHOICE = 1000  # fewer candidate ports than this: let the OS choose
TRIES = 64
_RANDOM = random.SystemRandom()  # not the seedable module state: seeded tests would collide


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (the Linux default where it cannot tell)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _os_choice(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now, outside the range port-0 binds draw from (another
    process that chooses the same way could still win it between this call and the bind)."""
    last = ephemeral_start() - 1
    if last - FIRST_PORT + 1 >= MIN_CHOICE:
        for port in _RANDOM.sample(range(FIRST_PORT, last + 1), TRIES):
            if _bindable(host, port):
                return port
    return _os_choice(host)
