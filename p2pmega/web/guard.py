"""Who may talk to the local web app: the per-run token, the loopback ``Host``, and the headers every answer gets.

A page on any other site can make the user's browser send requests to 127.0.0.1, and DNS rebinding can make
such a page same-origin with it; neither can know the token, and a rebound name fails the ``Host`` check. The
token comes once in the URL that ``p2pmega ui`` prints, then lives in an HttpOnly, SameSite=Strict cookie
(Jupyter's recipe).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

# 256 bits, as Jupyter's token: far beyond guessing through a local port.
TOKEN_BYTES = 32
# What the page may load and whom it may talk to: its own origin only, nothing inline, never inside a frame.
# QR codes are SVG images from the app itself; no third-party assets anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The URL may carry the token on the first request; no page is ever told it.
    "Referrer-Policy": "no-referrer",
    # Links with keys pass through these answers: keep none of them in a cache.
    "Cache-Control": "no-store",
}

# The page the token URL answers with: it sets the cookie, then loads the app without the token.
_MOVE_ON = (
    '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=/">'
    '<title>p2pmega</title><a href="/">open p2pmega</a>\n'
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Guard:
    """The middleware that refuses (403) every request without the token or with a foreign ``Host``/``Origin``."""

    def __init__(self, *, host: str, port: int, token: str) -> None:
        self.token = token.encode()
        # The address the app is bound to, and the loopback name browsers resolve without DNS.
        self.hosts = frozenset({f"{host}:{port}", f"localhost:{port}"})
        self.origins = frozenset(f"http://{h}" for h in self.hosts)
        # Cookies are per host, not per port: two apps on one machine must not overwrite each other's.
        self.cookie = f"p2pmega-ui-{port}"

    def url(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/?token={self.token.decode()}"

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Host") not in self.hosts:
            return _forbidden("this address is not the app's own (Host)")
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD") and (origin is None or origin not in self.origins):
            return _forbidden("the request did not come from the app's page (Origin)")
        if "token" in request.query:
            if not self._valid(request.query.get("token")):
                return _forbidden("wrong token; use the URL that `p2pmega ui` printed")
            # The token moves into a cookie, and out of the address bar and the history. Not by a redirect: when
            # the URL was opened from another site (the opener file, a link), the browser would withhold a Strict
            # cookie from the redirected request; a refresh that this page itself makes is same-site.
            response = web.Response(text=_MOVE_ON, content_type="text/html")
            response.set_cookie(
                self.cookie, self.token.decode(), httponly=True, samesite="Strict", path="/"
            )
            return response
        if not self._valid(request.cookies.get(self.cookie)):
            return _forbidden("no token; open the URL that `p2pmega ui` printed")
        return await handler(request)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, refusals and errors included (an ``on_response_prepare`` signal)."""
    response.headers.update(SECURITY_HEADERS)


def _forbidden(reason: str) -> web.Response:
    return web.Response(status=403, text=f"403 forbidden: {reason}\n")
