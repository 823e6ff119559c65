"""Free TCP ports on loopback, for the local services dmlray starts (Ray, SeaweedFS)."""

from __future__ import annotations

import socket


def free_ports(n: int, grpc_offset: int = 0) -> list[int]:
    """n distinct free ports; with grpc_offset, port + offset must be a valid port too."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)  # held open until all are chosen: no duplicates
            if port + grpc_offset < 65536:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports
