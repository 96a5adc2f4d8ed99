"""Bounds on slow and non-reading clients, at the two places they can hold the gateway: the server and the ASGI app.

uvicorn bounds an idle keep-alive connection (5 s) and the size of a request head (16 KiB), but not its time: a
connection that sends nothing, or one byte of its head every few seconds (slowloris), is held forever, and since
uvicorn's connection limit counts such connections, a thousand of them turn every new request into a 503.
`HeadTimeoutProtocol` closes a connection whose request line and headers are not complete within `head_timeout_s`
of the connection opening (or of the previous response on a kept-alive connection).

`ClientTimeouts` (ASGI middleware, the outermost layer) bounds the body and the answer: the whole body must arrive
within `body_timeout_s` of the request head (else 408, before anything reaches the engine), and every chunk of the
answer must be taken by the client within `send_timeout_s`; a client that stops reading a stream has it closed, so
its upstream connection to vLLM and its place in a graceful shutdown are freed. A stream may last as long as the
engine takes: only a stalled client is cut off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tuneloop.errors import RequestTimeout
from tuneloop.serving.protocol import error_response

log = logging.getLogger(__name__)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head."""

    head_timeout_s: float = 10.0

    def __init__(self, config: UvicornConfig, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, head_timeout_s: float) -> type[HeadTimeoutProtocol]:
        return type("HeadTimeoutProtocol", (cls,), {"head_timeout_s": head_timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        waiting = self.conn.their_state is self._idle
        super().handle_events()
        if waiting and self.conn.their_state is not self._idle:  # a complete request head arrived
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next request on this kept-alive connection gets its own deadline

    @property
    def _idle(self) -> Any:
        import h11

        return h11.IDLE

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is self._idle and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request head within %.0f s", self.client,
                     self.head_timeout_s)
            self.transport.close()


class ClientStalled(Exception):
    """The client did not take a chunk of the answer within the send timeout: not an error of ours, so the
    gateway's error handler lets it pass unlogged to `ClientTimeouts`, which closes the connection."""


class ClientTimeouts:
    """ASGI middleware: a deadline on the request body and an idle timeout on each chunk of the answer."""

    def __init__(self, app: ASGIApp, *, body_timeout_s: float, send_timeout_s: float) -> None:
        self.app, self.body_timeout_s, self.send_timeout_s = app, body_timeout_s, send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self.body_timeout_s
        body_done = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def timed_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            await self.app(scope, timed_receive, timed_send)
        except ClientStalled:
            # Returning without finishing the response makes uvicorn close the connection; the stream's generator
            # is closed on the way out, which releases its upstream connection and captures what was sent.
            log.warning("closed a response to %s: the client took no data for %g s", scope.get("client"),
                        self.send_timeout_s)
        except RequestTimeout as exc:  # raised outside the app's own error handling (a body read by middleware)
            if not started:
                await error_response(408, str(exc), "request_timeout")(scope, receive, send)
