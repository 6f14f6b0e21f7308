"""The error tree, shared by the server and the SDK.

* MiniMLError                 500  unexpected; the body never carries internals
  x BadRequest                400  malformed: a broken multipart body, JSON with a byte-order mark
  x InvalidInput              422  well-formed but unusable: bad name, unknown column, empty search space
  x Unauthorized              401  no key, unknown, revoked or expired key, bad or expired token
  x Forbidden                 403  the key's role is below what the route needs
  x NotFound                  404  no such object, or it belongs to a project the key cannot see
  x Conflict                  409  name taken; invalid state change; object still in use
  x PayloadTooLarge           413  body over the route's limit
  x UpstreamUnavailable       503  the DB (busy or down), MLflow, S3 or Prefect did not answer; safe to retry
  x InsufficientStorage       507  the disk the platform writes to is full

The server maps a class to its status in one table (``api/errors.py``); the SDK maps a response
back to the same class in one function (``sdk/client.py``).
"""

from __future__ import annotations

from typing import Any


class MiniMLError(Exception):
    """Base of every error miniml raises on purpose."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}


class BadRequest(MiniMLError):
    status = 400
    title = "Bad request"


class InvalidInput(MiniMLError):
    status = 422
    title = "Invalid input"


class Unauthorized(MiniMLError):
    status = 401
    title = "Unauthorized"


class Forbidden(MiniMLError):
    status = 403
    title = "Forbidden"


class NotFound(MiniMLError):
    status = 404
    title = "Not found"


class Conflict(MiniMLError):
    status = 409
    title = "Conflict"


class PayloadTooLarge(MiniMLError):
    status = 413
    title = "Payload too large"


class UpstreamUnavailable(MiniMLError):
    status = 503
    title = "Service unavailable"


def _without_sql(text: str) -> str:
    for marker in ("[SQL:", "[parameters:", "(Background on this error", "(sqlite3.", "(psycopg."):
        text = text.split(marker, maxsplit=1)[0]
    return text.strip()


def public_reason(exc: BaseException, *, limit: int = 300) -> str:
    """What a user may read about a failure: our own errors whole, others as their type and first
    line, with no traceback, SQL statement or parameters (those stay in the service's log)."""
    if isinstance(exc, MiniMLError):  # ours, but it may quote MLflow's, which may quote SQL
        return _without_sql(exc.detail)[: limit * 4]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _without_sql(text)
    if type(exc).__module__.split(".")[0] in ("sqlalchemy", "psycopg", "psycopg2", "sqlite3", "asyncpg"):
        text = "a database error"
    text = text.strip()
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


class InsufficientStorage(MiniMLError):
    status = 507
    title = "Insufficient storage"


ERRORS_BY_STATUS: dict[int, type[MiniMLError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        InvalidInput,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        UpstreamUnavailable,
        InsufficientStorage,
    )
}
