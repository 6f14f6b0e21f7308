"""Dependencies as Annotated aliases; every route declares the lowest role it allows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from miniml.config import Settings
from miniml.domain.limits import MAX_ID
from miniml.domain.roles import Role
from miniml.domain.tenancy import Caller
from miniml.errors import Unauthorized
from miniml.services import keys
from miniml.storage import ObjectStore
from miniml.tracking.registry import Registry


def get_db(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.db
    return factory


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


DbDep = Annotated[sessionmaker[Session], Depends(get_db)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

# Every integer in a path or query is bounded: nothing out of range reaches the DB or MLflow.
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A numeric id.")]
VersionPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A version number.")]
AfterQuery = Annotated[int, Query(ge=0, le=MAX_ID, description="Only what comes after this id.")]


def authenticate(
    request: Request,
    db: DbDep,
    x_api_key: Annotated[str | None, Header(description="API key (mml_...)")] = None,
    authorization: Annotated[str | None, Header(description="Bearer <access token>")] = None,
) -> Caller:
    """Resolve the caller from X-API-Key or a Bearer token; 401 when neither is valid."""
    with db.begin() as session:
        if x_api_key:
            caller = keys.authenticate_key(session, x_api_key)
        elif authorization and authorization.lower().startswith("bearer "):
            caller = keys.authenticate_token(session, authorization[7:].strip(), secret=request.app.state.jwt_secret)
        else:
            raise Unauthorized(
                "Missing credentials: send your API key as the X-API-Key header, "
                "or 'Authorization: Bearer <token>' from POST /api/v1/auth/token."
            )
    request.state.key_id = caller.key_id
    return caller


def require(role: Role) -> Callable[[Caller], Caller]:
    def check(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        caller.require_role(role)
        return caller

    check.needed_role = role  # type: ignore[attr-defined]  # read by the role-matrix test and docs
    return check


def any_caller(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    return caller


any_caller.needed_role = "any"  # type: ignore[attr-defined]  # any valid key or token, services included

AnyCallerDep = Annotated[Caller, Depends(any_caller)]
ViewerDep = Annotated[Caller, Depends(require(Role.viewer))]
EngineerDep = Annotated[Caller, Depends(require(Role.engineer))]
AdminDep = Annotated[Caller, Depends(require(Role.admin))]
# The platform's own services: only their keys pass, never a person's (not even an admin's).
WorkerDep = Annotated[Caller, Depends(require(Role.worker))]
InferenceDep = Annotated[Caller, Depends(require(Role.inference))]
