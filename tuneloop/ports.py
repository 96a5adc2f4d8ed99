"""A free TCP port on loopback, for servers tuneloop starts beside itself (an engine replica's vLLM, and the
throwaway servers of the tests and benchmarks). The port is free when asked; a server that binds it later can
still lose a race to another process, which its own start-up then reports."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
