"""The gateway's aiohttp client to the engine against a real socket: answers, streams, and each way an engine fails.

The server is a raw asyncio server on 127.0.0.1 so a test can send exactly the bytes a failing engine would (a
reset mid-stream, silence past the timeout); the live vLLM tests cover the same client against the real engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from tuneloop.ports import free_port
from tuneloop.serving.upstream import AiohttpUpstream, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _head_and_body(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


async def _serve(handler: Handler, scenario: Callable[[str], Awaitable[None]]) -> None:
    port = free_port()
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    try:
        await scenario(f"http://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)  # handlers still closing their side finish before the loop does


def test_a_json_answer_and_the_request_it_carried() -> None:
    seen: dict[str, bytes] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["head"], seen["body"] = await _head_and_body(reader)
        answer = b'{"choices":[{"message":{"content":"negative"}}]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()

    async def scenario(url: str) -> None:
        upstream = AiohttpUpstream(url + "/", {"Authorization": "Bearer engine-key"}, timeout_s=5)
        response = await upstream.open("/v1/chat/completions", json.dumps({"model": "m"}).encode())
        assert response.status == 200
        assert json.loads(await response.read())["choices"][0]["message"]["content"] == "negative"
        await response.close()
        await upstream.close()

    asyncio.run(_serve(handler, scenario))
    assert seen["head"].startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert b"authorization: bearer engine-key" in seen["head"].lower()
    assert b"content-type: application/json" in seen["head"].lower()
    assert json.loads(seen["body"]) == {"model": "m"}


def test_a_stream_arrives_in_order_and_a_reset_mid_stream_is_an_upstream_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head_and_body(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()  # the engine dies before the last chunk

    async def scenario(url: str) -> None:
        upstream = AiohttpUpstream(url, {}, timeout_s=5)
        response = await upstream.open("/v1/chat/completions", b"{}")
        received = b""
        with pytest.raises(UpstreamError):
            async for chunk in response.chunks():
                received += chunk
        assert received == b"data: one\n\ndata: two\n\n"
        await response.close()
        await upstream.close()

    asyncio.run(_serve(handler, scenario))


def test_refused_and_silent_engines_are_upstream_errors() -> None:
    async def refused() -> None:
        upstream = AiohttpUpstream(f"http://127.0.0.1:{free_port()}", {}, timeout_s=5)
        with pytest.raises(UpstreamError):
            await upstream.open("/v1/chat/completions", b"{}")
        await upstream.close()

    asyncio.run(refused())

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head_and_body(reader)
        await reader.read()  # never answers; waits for the client to give up and hang up
        writer.close()
        await writer.wait_closed()

    async def scenario(url: str) -> None:
        upstream = AiohttpUpstream(url, {}, timeout_s=0.3)
        with pytest.raises(UpstreamError):
            await upstream.open("/v1/chat/completions", b"{}")
        await upstream.close()

    asyncio.run(_serve(silent, scenario))
