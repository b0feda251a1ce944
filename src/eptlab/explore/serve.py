"""Serve the explorer page on 127.0.0.1 with the standard library's HTTP server."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"


class _PageHandler(SimpleHTTPRequestHandler):
    """Serves one file (``/`` and ``/NAME``) and nothing else of its folder: no listing, no
    other files (the folder may hold results or a home directory)."""

    page_name = ""

    def send_head(self):  # type: ignore[no-untyped-def]
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path not in ("/", f"/{self.page_name}"):
            self.send_error(404, "only the explorer page is served")
            return None
        self.path = f"/{self.page_name}"
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass


def make_server(page: Path, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``page`` alone, bound to 127.0.0.1 only (``port=0`` picks a free
    port). Call ``serve_forever()`` on it, or use :func:`serve_in_thread`."""
    handler_type = type("ExplorerPage", (_PageHandler,), {"page_name": page.name})
    handler = functools.partial(handler_type, directory=str(page.parent.resolve()))
    return ThreadingHTTPServer((HOST, port), handler)


def url_of(server: ThreadingHTTPServer, page: Path) -> str:
    return f"http://{HOST}:{server.server_address[1]}/{page.name}"


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server`` in a daemon thread; stop it with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="eptlab-explore", daemon=True)
    thread.start()
    return thread
