"""An OpenAI-style HTTP server over a Catalog, on the standard library's ThreadingHTTPServer.

    serve(catalog, "127.0.0.1", 8000)     # until SIGINT or SIGTERM; port 0 picks a free one
    server = make_server(catalog, port=0) # or drive it yourself: server.serve_forever() in a thread

    GET  /health            {"status": "ok", "models": [...], "rss_bytes": resident memory of this process}
    GET  /v1/models         the catalog's names, OpenAI's list shape (and /v1/models/NAME for one)
    POST /v1/completions    {model, prompt, max_tokens, temperature, seed}: see openai_api.py

Any client of OpenAI's completions API works against http://HOST:PORT/v1:

    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").completions.create(model="support", prompt="hi")

A client's mistake gets a 4xx with OpenAI's error body naming the field; only a failure inside the
server is a 500, and the server goes on serving after either. One line per request goes to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from pipeline.serve.catalog import Catalog, RequestRejected, UnknownModel
from pipeline.serve.openai_api import (
    ApiError, completion_request, completion_response, error_body, model_entry, models_response,
)

MAX_BODY_BYTES = 1 << 20
"""Larger request bodies are refused (413) from Content-Length alone, before a byte of them is read."""
_ROUTES = {"/health": ("GET",), "/v1/models": ("GET",), "/v1/completions": ("POST",)}


class CatalogServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its catalog; handler threads are daemons (ThreadingHTTPServer's default)."""

    def __init__(self, address: tuple[str, int], catalog: Catalog):
        super().__init__(address, _Handler)
        self.catalog = catalog
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(catalog: Catalog, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound server (port 0: a free one, see `server.server_address`), not yet serving."""
    return CatalogServer((host, port), catalog)


def serve(catalog: Catalog, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT or SIGTERM, then stop taking requests and close the socket."""
    server = make_server(catalog, host, port)
    names = catalog.names()
    print(f"serving {len(names)} models at {server.url}: {', '.join(names)}", flush=True)
    stop = threading.Event()
    # serve_forever runs in a thread: `shutdown()` waits for its loop to end, so a signal handler
    # on the thread running the loop would wait for itself.
    loop = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    loop.start()
    try:
        while loop.is_alive() and not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped", file=sys.stderr, flush=True)


def resident_bytes() -> int | None:
    """Resident memory of this process: /proc on Linux, else psutil when installed, else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class _Handler(BaseHTTPRequestHandler):
    server: CatalogServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "tunepipe-serve"
    timeout = 120  # an idle keep-alive connection gives its thread back after this many seconds

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _handle(self) -> None:
        try:
            status, payload, headers = self._route()
        except ApiError as e:
            status, payload, headers = e.status, error_body(e.message, e.param, e.code), {}
        except Exception as e:  # a failure of ours: one line to the client, the traceback to our log
            traceback.print_exc(file=sys.stderr)
            first = (str(e).strip().splitlines() or [""])[0]
            status, payload, headers = 500, error_body(f"internal error: {type(e).__name__}: {first}"[:300],
                                                       kind="server_error"), {}
        try:
            self._send_json(status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer: nothing to tell it
            self.close_connection = True

    def _route(self) -> tuple[int, dict, dict]:
        body = self._read_body()
        path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
        catalog = self.server.catalog
        if path.startswith("/v1/models/"):
            allowed, name = ("GET",), path[len("/v1/models/"):]
        else:
            allowed, name = _ROUTES.get(path), None
        if allowed is None:
            raise ApiError(404, f"no such path: {path}; served: {', '.join(_ROUTES)}")
        if self.command not in allowed:
            message = f"{self.command} is not allowed on {path}; use {', '.join(allowed)}"
            return 405, error_body(message), {"Allow": ", ".join(allowed)}
        if path == "/health":
            return 200, {"status": "ok", "models": catalog.names(), "rss_bytes": resident_bytes()}, {}
        if path == "/v1/models":
            return 200, models_response(catalog.names(), self.server.created), {}
        if name is not None:
            if name not in catalog.names():
                raise ApiError(404, f"model {name!r} is not served here", "model", "model_not_found")
            return 200, model_entry(name, self.server.created), {}
        return 200, self._complete(body), {}

    def _complete(self, body: bytes) -> dict:
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        request = completion_request(parsed)
        try:
            done = self.server.catalog.complete(request.model, request.prompt, request.max_tokens,
                                                request.temperature, request.seed)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model", "model_not_found") from None
        except RequestRejected as e:
            raise ApiError(400, str(e), e.param) from None
        return completion_response(request.model, done)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):  # chunked: not parsed here; its bytes would be read as the next request
                self.close_connection = True
                raise ApiError(411, "send the body with a Content-Length header")
            return b""
        if not length.strip().isdigit():
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread, so this connection cannot carry another request
            raise ApiError(413, f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) < int(length):
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(body)} of its {int(length)} bytes (Content-Length)")
        return body

    def _send_json(self, status: int, payload: dict, headers: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) in OpenAI's error shape."""
        self.close_connection = True
        self._send_json(code, error_body(message or self.responses.get(code, ("error",))[0]), {})

    def parse_request(self) -> bool:
        self._started = time.monotonic()
        return super().parse_request()

    def log_request(self, code="-", size="-") -> None:
        ms = (time.monotonic() - getattr(self, "_started", time.monotonic())) * 1000
        sys.stderr.write(f"{self.command or '-'} {getattr(self, 'path', '-')} {int(code)} {ms:.0f}ms\n")

    def log_message(self, format, *args) -> None:
        pass  # http.server's default lines (client address, date, request line) are replaced by log_request's
