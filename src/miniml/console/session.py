"""The console's sign-in: an API key is exchanged (by the api) for its short-lived token, which the
browser keeps only in an httpOnly, SameSite=Strict cookie. Writes carry a CSRF token bound to it."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "miniml_session"
PATH = "/ui"


def token_of(request: Request) -> str | None:
    token = request.cookies.get(COOKIE)
    return token if token and len(token) < 4096 else None


def csrf_for(secret: str, token: str) -> str:
    """What a form of this session must send back: bound to the token, unknowable to another site."""
    return hmac.new(secret.encode(), b"console-csrf:" + token.encode(), hashlib.sha256).hexdigest()[:40]


def csrf_ok(secret: str, token: str, sent: str | None, request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        return False  # a write sent from another origin
    return bool(sent) and hmac.compare_digest(csrf_for(secret, token), str(sent))


def sign_in(response: Response, request: Request, token: str, ttl_s: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=ttl_s,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def sign_out(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")
