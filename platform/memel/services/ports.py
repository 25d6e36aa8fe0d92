"""Is a TCP port free to bind, and which free ports can a server use."""

from __future__ import annotations

import contextlib
import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """True when a server could listen on ``host:port`` now (bound with SO_REUSEADDR, as servers do)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str, count: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``count`` distinct ports the OS reports free on ``host`` (none of ``exclude``)."""
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port not in ports and port not in exclude:
                ports.append(port)
    return ports
