"""The gateway's HTTP client to the engine: aiohttp against a real engine, httpx where a test hands in a transport.

Why two: on the request path the client is most of what the gateway adds. In a py-spy profile of `bench gateway`
httpx's `AsyncClient.send` and body read were the largest part of the event loop's busy time, and sending the same
request to an instant upstream took about three times as long with httpx's AsyncClient as with an aiohttp session
(`bench gateway`, table "The parts chosen by measurement"). httpx stays for its transports:
tests and the in-process bench stub answer through `httpx.MockTransport` with no socket at all.

Both speak the same small interface: open a POST, look at the status, then read the whole body or relay its chunks.
Connection and timeout failures of either are `UpstreamError`, which the proxy answers as 503 (before any byte was
relayed) or counts as 502 (mid-stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from tuneloop.serving.protocol import KEEPALIVE_EXPIRY_S

MAX_CONNECTIONS = 256


class UpstreamError(Exception):
    """The engine did not answer: refused, reset, or silent past the timeout."""


class UpstreamResponse(Protocol):
    status: int

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    async def open(self, path: str, body: bytes) -> UpstreamResponse: ...

    async def close(self) -> None: ...


def json_headers(auth: dict[str, str]) -> dict[str, str]:
    return {**auth, "Content-Type": "application/json"}


class AiohttpUpstream:
    """Keep-alive connections to the engine; `timeout_s` bounds the wait for each read (a long stream that keeps
    sending is never cut), `connect_s` the connection."""

    def __init__(self, base_url: str, auth_headers: dict[str, str], *, timeout_s: float,
                 connect_s: float = 2.0) -> None:
        import aiohttp

        self._errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError)
        self._base_url = base_url.rstrip("/")  # joined by hand: aiohttp's base_url refuses a path (a Serve route)
        self._session = aiohttp.ClientSession(
            headers=json_headers(auth_headers), auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_EXPIRY_S),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=timeout_s))

    async def open(self, path: str, body: bytes) -> UpstreamResponse:
        try:
            response = await self._session.post(self._base_url + path, data=body)
        except self._errors as exc:
            raise UpstreamError(exc.__class__.__name__) from exc
        return _AiohttpResponse(response, self._errors)

    async def close(self) -> None:
        await self._session.close()


class _AiohttpResponse:
    def __init__(self, response: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._response, self._errors = response, errors
        self.status: int = response.status

    async def read(self) -> bytes:
        try:
            body: bytes = await self._response.read()
            return body
        except self._errors as exc:
            raise UpstreamError(exc.__class__.__name__) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except self._errors as exc:
            raise UpstreamError(exc.__class__.__name__) from exc

    async def close(self) -> None:
        self._response.release()


class HttpxUpstream:
    """httpx over a given transport (a test's stub engine); real sockets use AiohttpUpstream."""

    def __init__(self, base_url: str, auth_headers: dict[str, str], *, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None, connect_s: float = 2.0) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, transport=transport, headers=json_headers(auth_headers),
                                         timeout=httpx.Timeout(timeout_s, connect=connect_s),
                                         limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                                             max_keepalive_connections=64,
                                                             keepalive_expiry=KEEPALIVE_EXPIRY_S))

    async def open(self, path: str, body: bytes) -> UpstreamResponse:
        try:
            response = await self._client.send(self._client.build_request("POST", path, content=body), stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(exc.__class__.__name__) from exc
        return _HttpxResponse(response)

    async def close(self) -> None:
        await self._client.aclose()


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code

    async def read(self) -> bytes:
        try:
            return await self._response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamError(exc.__class__.__name__) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(exc.__class__.__name__) from exc

    async def close(self) -> None:
        await self._response.aclose()


def make_upstream(base_url: str, auth_headers: dict[str, str], *, timeout_s: float,
                  transport: httpx.AsyncBaseTransport | None = None) -> Upstream:
    if transport is not None:
        return HttpxUpstream(base_url, auth_headers, timeout_s=timeout_s, transport=transport)
    return AiohttpUpstream(base_url, auth_headers, timeout_s=timeout_s)
