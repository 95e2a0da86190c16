"""Serving the local stand-ins: werkzeug's threaded WSGI server in a daemon thread.

The GitHub stand-in and the IMDS stand-in are WSGI applications that route
with a :class:`werkzeug.routing.Map`; this module only runs them. One
:class:`Served` is one listening socket, served by werkzeug's
``ThreadedWSGIServer`` (a thread per request, daemon threads, so a request
held by an injected ``hang`` fault never blocks process exit), started in
well under a millisecond since nothing is imported or compiled per start.

werkzeug's server closes the connection after every response (it sends
``Connection: close``), which is what the ``http.server`` servers these
replaced did with HTTP/1.0; and its request log goes nowhere here: the
stand-ins count requests themselves and the agent logs what it got.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

# werkzeug types its apps with _typeshed's WSGIApplication; this is the same shape, importable at run time.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

SERVE_POLL_S = 0.2
STOP_JOIN_TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler without its access log (it would add a stderr handler)."""

    def log(self, type: str, message: str, *args: Any) -> None:
        """Quiet."""


def _handler(server_version: str) -> type[WSGIRequestHandler]:
    """A handler class whose ``Server`` header is ``server_version`` (what the real service sends)."""
    return type("Handler", (_QuietHandler,), {"server_version": server_version})


class Served:
    """``app`` answering on one socket in a daemon thread until :meth:`stop`."""

    def __init__(self, app: WSGIApp, *, host: str = "127.0.0.1", port: int = 0,
                 sock: socket.socket | None = None, name: str = "standin",
                 server_version: str = "StandIn") -> None:
        """Bind ``host:port`` (0: a free port), or serve ``sock``, a listening socket this takes over."""
        handler = _handler(server_version)
        if sock is None:
            self.server: BaseWSGIServer = make_server(host, port, app, threaded=True, request_handler=handler)
        else:
            bound_host, bound_port = sock.getsockname()[:2]
            # werkzeug serves a dup of the descriptor; ours is closed so the socket has one owner.
            self.server = make_server(bound_host, bound_port, app, threaded=True, request_handler=handler,
                                      fd=sock.fileno())
            sock.close()
        self.port: int = self.server.port
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S},
                                        name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the socket and wait (bounded) for the serving thread."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(STOP_JOIN_TIMEOUT_S)
