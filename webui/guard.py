"""The outermost layer of the web server: who may talk to the app, and what it answers before Gradio.

:class:`Guard` is a plain ASGI middleware wrapped around Gradio's whole FastAPI app (outside
Gradio's own CORS middleware, see :func:`guarded_app`), so every request passes it first:

* **Trusted hosts** (DNS rebinding): a ``Host`` header that names none of the hosts the app was
  started for (the localhost names, the ``--host`` address, the ``--trusted-host`` list) gets
  ``421 Misdirected Request`` and no CORS header. A page on ``evil.example`` whose name was
  re-pointed at 127.0.0.1 therefore cannot drive the app through the visitor's browser.
* **Same origin only**: a request with an ``Origin`` other than the app's own (the ``Host`` it
  was sent to) is refused with 403 unless it is a plain ``GET``/``HEAD``, and no response to a
  foreign origin carries ``Access-Control-*`` headers. Scripts (``gradio_client``, ``curl``)
  send no ``Origin`` and are unaffected.
* **Closed routes**: uploads (a text-to-image model takes no files) and Gradio's ``/monitoring`` pages
  answer 404. With an editing model (``max_upload``) the upload routes are open, for input images.
* **Request size**: a body over :data:`MAX_BODY_BYTES` is refused with 413 before it is read
  (each text field has its own, smaller limit in :mod:`webui.inputs`); an upload's body may be
  ``max_upload`` plus :data:`UPLOAD_OVERHEAD_BYTES` of form encoding.
* **Stopping**: once :attr:`Guard.stopping` is set (SIGTERM, SIGINT), new work is refused with 503.
* **Security headers** on every answer: ``frame-ancestors 'self'`` (no framing by other sites),
  ``nosniff``, ``same-origin`` referrers. The CSP sets no ``script-src``: Gradio's page needs its
  inline scripts.
* **Multi-user mode** behind an authenticating reverse proxy (``--user-header``): a request without
  that header gets 401 (the app must then be reachable only through the proxy).
* ``GET /healthz``: ``ok`` (or ``stopping``), answered here without touching Gradio or the device.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

logger = logging.getLogger("diffusion_preview.guard")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
MAX_BODY_BYTES = 4 * 1024 * 1024
UPLOAD_PREFIXES = ("/gradio_api/upload", "/gradio_api/upload_progress")
CLOSED_PREFIXES = (*UPLOAD_PREFIXES, "/upload", "/monitoring", "/gradio_api/monitoring")
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and headers around one uploaded file
SAFE_METHODS = ("GET", "HEAD")
OPEN_PATHS = ("/gradio_api/startup-events",)  # Gradio calls it itself at launch, without a user
SECURITY_HEADERS = (
    (b"content-security-policy", b"frame-ancestors 'self'; base-uri 'self'; object-src 'none'; form-action 'self'"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


def host_name(value: str) -> str:
    """The host name of a ``Host`` header or a URL's netloc: lower case, no port, no brackets, no final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:7860
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def trusted_hosts(bind: str, extra: Iterable[str] = (), share: bool = False) -> tuple[str, ...]:
    """The host names requests may name: the localhost names, the bound address (unless it is the
    wildcard 0.0.0.0 / ::), every ``--trusted-host`` entry (``*.example.com`` matches subdomains),
    and ``*.gradio.live`` with ``--share``."""
    names = list(LOCAL_HOSTS)
    if host_name(bind) not in WILDCARD_BINDS:
        names.append(host_name(bind))
    for entry in extra:
        for item in str(entry).split(","):
            if item.strip():
                names.append(item.strip().lower().rstrip("."))
    if share:
        names.append("*.gradio.live")
    return tuple(dict.fromkeys(names))


def is_trusted(host: str, trusted: Iterable[str]) -> bool:
    name = host_name(host)
    if not name:
        return False
    for entry in trusted:
        if entry.startswith("*.") and name.endswith(entry[1:]) and len(name) > len(entry) - 1:
            return True
        if name == entry:
            return True
    try:  # 127.0.0.2 and other loopback spellings are this machine too
        return ipaddress.ip_address(name).is_loopback and any(h in LOCAL_HOSTS for h in trusted)
    except ValueError:
        return False


def same_origin(origin: str, host: str) -> bool:
    """Whether ``Origin: origin`` is the app's own origin for a request sent to ``Host: host``."""
    if origin in ("", "null"):
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


class Guard:
    """ASGI middleware; see the module docstring. ``stopping`` is set on shutdown."""

    def __init__(self, app: Any, trusted: Iterable[str], *, max_body: int = MAX_BODY_BYTES,
                 stopping: threading.Event | None = None, user_header: str | None = None,
                 max_upload: int | None = None) -> None:
        self.app = app
        self.max_upload = max_upload  # None: uploads closed; else the largest file an upload may carry
        self.user_header = user_header.lower() if user_header else None
        self.trusted = tuple(trusted)
        self.max_body = max_body
        self.stopping = stopping if stopping is not None else threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        client = (scope.get("client") or ("?",))[0]
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        if not is_trusted(host, self.trusted):
            logger.warning("refused a request from %s for the untrusted Host %r (%s %s)", client, host[:100],
                           method, path[:100])
            await self._answer(scope, receive, send, 421, "This host name is not served here.")
            return
        origin = headers.get("origin")
        foreign = origin is not None and not same_origin(origin, host) and not self._declared(origin)
        if foreign and (method not in SAFE_METHODS or scope["type"] == "websocket"):
            logger.warning("refused a cross-origin %s %s from %s (Origin %r)", method, path[:100], client,
                           origin[:100])
            await self._answer(scope, receive, send, 403, "Cross-origin requests are not accepted.")
            return
        if path == "/healthz":
            await self._answer(scope, receive, send, 503 if self.stopping.is_set() else 200,
                               "stopping" if self.stopping.is_set() else "ok")
            return
        if self.user_header and not headers.get(self.user_header, "").strip() and path not in OPEN_PATHS:
            logger.warning("refused %s %s from %s: no %s header (multi-user mode)", method, path[:100], client,
                           self.user_header)
            await self._answer(scope, receive, send, 401, "Sign in through the proxy first.")
            return
        upload = self.max_upload is not None and path in UPLOAD_PREFIXES
        if path.startswith(CLOSED_PREFIXES) and not upload:
            logger.info("refused %s %s from %s: the route is closed", method, path[:100], client)
            await self._answer(scope, receive, send, 404, "Not found.")
            return
        if self.stopping.is_set() and method not in SAFE_METHODS:
            await self._answer(scope, receive, send, 503, "The app is shutting down.")
            return
        limit = self.max_upload + UPLOAD_OVERHEAD_BYTES if upload and self.max_upload is not None else self.max_body
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > limit):
            logger.warning("refused %s %s from %s: body of %s bytes (limit %d)", method, path[:100], client,
                           length[:20], limit)
            await self._answer(scope, receive, send, 413, f"Requests are limited to {limit} bytes.")
            return
        if not length and "transfer-encoding" in headers and method not in SAFE_METHODS:
            await self._answer(scope, receive, send, 411, "Send a Content-Length header.")
            return

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", [])
                        if not (foreign and k.lower().startswith(b"access-control-"))]
                present = {k.lower() for k, _ in kept}
                kept += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, guarded_send)

    def _declared(self, origin: str) -> bool:
        """An origin on a name given with ``--trusted-host`` (a proxy in front may rewrite ``Host`` to
        127.0.0.1 while the browser's ``Origin`` keeps the public name)."""
        parts = urlsplit(origin)
        declared = [h for h in self.trusted if h not in LOCAL_HOSTS and not h.endswith("gradio.live")]
        return parts.scheme in ("http", "https") and bool(declared) and is_trusted(parts.netloc, declared)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, status: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body if scope.get("method") != "HEAD" else b""})


def guarded_app(trusted: Iterable[str], stopping: threading.Event | None = None,
                user_header: str | None = None, max_upload: int | None = None) -> Any:
    """A Gradio ``App`` whose whole middleware stack (Gradio's CORS included) sits inside a :class:`Guard`.

    ``max_upload``: open the upload routes for files of at most this many bytes (an editing model's input
    image); ``None`` keeps them closed.

    Passed to ``Blocks.launch(_app=...)``: Gradio then configures this app instead of making its own,
    and Starlette builds the middleware stack on the first request, through :meth:`build_middleware_stack`.
    """
    from gradio.routes import App, ORJSONResponse

    class GuardedApp(App):
        def build_middleware_stack(self) -> Any:
            return Guard(super().build_middleware_stack(), trusted, stopping=stopping, user_header=user_header,
                         max_upload=max_upload)

    return GuardedApp(default_response_class=ORJSONResponse)
