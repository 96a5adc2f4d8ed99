"""Slow and non-reading clients against the gateway served by uvicorn with `server_config` (the settings `tuneloop
serve` uses), over real loopback sockets, with a stub vLLM behind it: a slowloris head, a silent connection, a
trickled body and a stream nobody reads are each cut off near their bound, and a normal request is answered
meanwhile. Bounds are set to fractions of a second here; the defaults are in serving.* (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import select

from tests.serving.test_gateway import Gateway, _gateway
from tuneloop.ports import free_port
from tuneloop.serving.gateway import create_app
from tuneloop.serving.server import server_config
from tuneloop.tables import TrafficRow

# Appended to the serving: section that _gateway writes.
BOUNDS = "  head_timeout_s: 0.5\n  body_timeout_s: 0.5\n  send_timeout_s: 0.5\n"


@contextlib.contextmanager
def served(gateway: Gateway) -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(server_config(gateway.config, create_app(gateway.ctx), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _closed_after(sock: socket.socket, *, trickle: bytes = b"", every_s: float = 0.1, limit_s: float = 10) -> float:
    """Seconds until the server closes `sock`, sending `trickle` one byte every `every_s` meanwhile."""
    started = time.monotonic()
    sock.settimeout(every_s)
    position = 0
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if position < len(trickle):
            try:
                sock.send(trickle[position:position + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            position += 1
    raise AssertionError(f"the connection was still open after {limit_s} s")


def test_slowloris_and_silent_connections_are_closed_at_the_head_bound(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path, BOUNDS):
        with served(gateway) as port:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
            with socket.create_connection(("127.0.0.1", port)) as slowloris, \
                    socket.create_connection(("127.0.0.1", port)) as silent:
                waited = _closed_after(slowloris, trickle=head, every_s=0.05)
                assert 0.4 < waited < 3, f"a byte every 50 ms kept the head open for {waited:.1f} s"
                assert _closed_after(silent) < 3
            # a kept-alive connection gets a fresh deadline for its next head
            with socket.create_connection(("127.0.0.1", port)) as kept:
                kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert kept.recv(65536).startswith(b"HTTP/1.1 200")
                assert _closed_after(kept, trickle=b"GET /healthz HTTP/1.1\r\nHost: x", every_s=0.05) < 3
            answered = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                  json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
            assert answered.status_code == 200




def test_a_trickled_body_is_refused_with_408_before_it_reaches_the_engine(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path, BOUNDS):
        with served(gateway) as port, socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"model\": ")
            client.settimeout(5)
            answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and b"did not arrive within" in answer
        assert gateway.vllm.bodies == [], "nothing reached the engine"


def test_a_stream_nobody_reads_is_closed_and_still_captured(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path, BOUNDS):
        gateway.vllm.stream_parts = ["x" * 4096] * 5000  # 20 MB of events: more than the socket buffers hold
        with served(gateway) as port, socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            body = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "a long story"}]}'
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 20
            rows: list[TrafficRow] = []
            while not rows and time.monotonic() < deadline:  # never reading: the relay must end by itself
                time.sleep(0.2)
                with gateway.store.session() as session:
                    rows = list(session.scalars(select(TrafficRow).where(TrafficRow.stream.is_(True))))
            assert rows, "the relay of a stream nobody reads never ended (its upstream connection is still held)"
            sent = len(rows[0].completion or "")
            assert 0 < sent < 4096 * 5000, "captured what was relayed before the cut, not the whole answer"
            answered = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                  json={"model": "sentiment", "messages": [{"role": "user", "content": "ok"}]})
            assert answered.status_code == 200
