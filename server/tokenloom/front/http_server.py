"""uvicorn serving the HTTP front in the server's own event loop, on a socket bound here.

The socket is bound before anything is served, without SO_REUSEPORT, so a port in use is an error
at start (as for gRPC), not a port shared with another process. Signals stay the server's: uvicorn
does not install its own handlers, and stops when `stop` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile

import uvicorn

from .http_app import HttpFront

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def capture_signals(self):  # the tokenloom server handles SIGTERM/SIGINT and drains both fronts
        return contextlib.nullcontext()


class HttpServer:
    def __init__(self, front: HttpFront, host: str, port: int, tls: tuple[bytes | None, bytes | None] = (None, None),
                 close_seconds: float = 0.2):
        self.front = front
        self.host, self.port = host, port
        self.sock = _bind(host, port)
        config = uvicorn.Config(front.app, lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=close_seconds, ws="none", loop="none")
        config.load()
        cert, key = tls
        if cert is not None:
            config.ssl = _ssl_context(cert, key)
        self.scheme = "https" if cert is not None else "http"
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # uvicorn failed to start: its exception
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP (OpenAI API, explorer) on %s://%s:%d", self.scheme, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening; connections still open get uvicorn's graceful shutdown, then are closed."""
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port,
                                                             type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; not SO_REUSEPORT
        sock.bind(address)
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc} "
                          f"(is another server on port {port}? --http-port 0 turns HTTP off)") from None
    sock.set_inheritable(True)
    return sock


def _ssl_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server context from PEM bytes (the ssl module reads only files: a private temp dir, removed at once)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(tmp, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
            paths.append(path)
        context.load_cert_chain(*paths)
    return context
