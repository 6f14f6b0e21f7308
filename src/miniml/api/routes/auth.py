from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from miniml.api.deps import AnyCallerDep, DbDep, SettingsDep
from miniml.errors import Unauthorized
from miniml.schemas.deployments import CallerRead
from miniml.schemas.keys import TokenRead, TokenRequest
from miniml.services import keys

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post("/token")
def create_token(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    body: TokenRequest | None = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> TokenRead:
    """Exchange an API key for a short-lived access token (JWT)."""
    raw = (body.api_key if body else None) or x_api_key
    if not raw:
        raise Unauthorized("Send the API key as X-API-Key or as {'api_key': ...} to get a token.")
    with db.begin() as session:
        caller = keys.authenticate_key(session, raw)
    request.state.key_id = caller.key_id
    ttl = settings.auth.jwt_ttl_s
    token = keys.issue_token(caller, secret=request.app.state.jwt_secret, ttl_s=ttl)
    return TokenRead(access_token=token, expires_in=ttl)


@router.get("/whoami")
def whoami(caller: AnyCallerDep) -> CallerRead:
    """The calling key's id, role and projects (None: every project); the inference service checks callers here."""
    return CallerRead(
        key_id=caller.key_id,
        role=caller.role.value,
        projects=sorted(caller.projects) if caller.projects is not None else None,
    )
