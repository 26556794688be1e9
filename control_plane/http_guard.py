"""Connection timeouts toward clients, which an ASGI app cannot enforce itself.

uvicorn times out only idle keep-alive connections. A connection that sends part of
its headers, or announces a body and sends part of it, stays open forever; a client
that stops reading its stream leaves the response's ``send`` blocked for good, and with
it the request's slot on a node (seen: 200 half-sent requests still open after 75 s; 6
clients that read nothing made every new request a 429 while the nodes sat idle).

:func:`guarded_protocol` extends uvicorn's httptools protocol with three timers, armed
only at a request's boundaries and when the send buffer fills (never per token):

* **headers**: from the connection's first byte (or a keep-alive request's first byte)
  to the end of its headers; past it, ``408`` and the connection is closed;
* **body**: from the end of the headers to the end of the body; past it, ``408`` (if
  no response has started) and the connection is closed;
* **send**: while the transport's write buffer is above its high-water mark and does not
  shrink (the client reads nothing; one that reads slowly is left alone); past it, the
  connection is aborted: the app sees the client go away, which frees the slot and
  cancels the generation on the node.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ClientTimeouts", "guarded_protocol"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds a client may take to send its headers and its body, and to read what is sent."""

    header_s: float
    body_s: float
    send_s: float


def _timeout_response(message: str) -> bytes:
    body = message.encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


def _expects_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return b"chunked" in value.lower()
    return False


def guarded_protocol(timeouts: ClientTimeouts) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the header, body and send timeouts of ``timeouts``
    (pass it as uvicorn's ``http`` argument)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._send_timer: asyncio.TimerHandle | None = None
            self._buffered = 0  # bytes in the write buffer when the send timer was armed

        # -- headers -------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel("_header_timer")
            super().on_headers_complete()
            if _expects_body(self.headers):
                self._body_timer = self.loop.call_later(timeouts.body_s, self._body_timeout)

        def on_message_complete(self) -> None:
            self._cancel("_body_timer")
            super().on_message_complete()

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(timeouts.header_s, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A response of this connection is still going out (pipelining): the
                # next request's headers may wait for it.
                self._arm_header_timer()
                return
            log.info(
                "client %s sent no complete headers within %g s; closing", self.client, timeouts.header_s
            )
            self.transport.write(
                _timeout_response(f"the request headers did not arrive within {timeouts.header_s:g} s")
            )
            self.transport.close()

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self.transport.is_closing():
                return
            log.info("client %s sent no complete body within %g s; closing", self.client, timeouts.body_s)
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                self.transport.write(
                    _timeout_response(f"the request body did not arrive within {timeouts.body_s:g} s")
                )
            if cycle is not None:  # the app, waiting for the body, sees the client go; it sends nothing more
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        # -- sending ---------------------------------------------------------------------
        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._arm_send_timer()

        def resume_writing(self) -> None:
            self._cancel("_send_timer")
            super().resume_writing()

        def _arm_send_timer(self) -> None:
            self._buffered = self.transport.get_write_buffer_size()
            self._send_timer = self.loop.call_later(timeouts.send_s, self._send_timeout)

        def _send_timeout(self) -> None:
            self._send_timer = None
            if not self.flow.write_paused or self.transport.is_closing():
                return
            if self.transport.get_write_buffer_size() < self._buffered:
                self._arm_send_timer()  # it reads, slowly: a slow reader is not a dead one
                return
            log.info("client %s read nothing for %g s; disconnecting it", self.client, timeouts.send_s)
            # abort, not close: close waits for the buffer to drain, which this client prevents
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            for name in ("_header_timer", "_body_timer", "_send_timer"):
                self._cancel(name)
            super().connection_lost(exc)

        def _cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    return GuardedHttpToolsProtocol
