"""Free TCP ports on loopback, for the local services dmlray starts (Ray, SeaweedFS)."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_ports(n: int, grpc_offset: int = 0) -> list[int]:
    """n distinct free loopback ports; with ``grpc_offset``, port + offset is free too
    (SeaweedFS derives its gRPC ports that way)."""
    ports: list[int] = []
    held: list[socket.socket] = []  # held open until all are chosen: no duplicates
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((HOST, 0))
            held.append(s)
            port = s.getsockname()[1]
            if port in ports or port + grpc_offset in ports or port + grpc_offset > 65535:
                continue
            if grpc_offset:
                try:
                    t = socket.socket()
                    t.bind((HOST, port + grpc_offset))
                    held.append(t)
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports
