from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from miniml.api import mlflow_users
from miniml.api.deps import AdminDep, DbDep
from miniml.schemas.keys import KeyCreate, KeyCreated, KeyGrants, KeyRead
from miniml.services import keys

router = APIRouter(prefix="/api/v1/keys", tags=["keys"])


@router.post("", status_code=201)
def create_key(body: KeyCreate, request: Request, db: DbDep, caller: AdminDep) -> KeyCreated:
    """Create an API key; the secret is in this response only. It also signs in to MLflow (username: its id)."""
    with db.begin() as session:
        read, raw = keys.create_key(session, caller, body)
    mlflow_users.created(request.app.state.mlflow_access, read.id, read.role, read.projects, raw)
    return KeyCreated(**read.model_dump(), key=raw)


@router.get("")
def list_keys(db: DbDep, caller: AdminDep) -> list[KeyRead]:
    """List keys (never their secrets)."""
    with db.begin() as session:
        return keys.list_keys(session)


@router.put("/{key_id}/projects")
def set_key_projects(
    key_id: Annotated[str, Path(max_length=64)], body: KeyGrants, db: DbDep, caller: AdminDep
) -> KeyRead:
    """Grant a viewer or engineer key exactly these projects. The api applies it at once; MLflow's
    read grants follow within jobs.mlflow_sync_s."""
    with db.begin() as session:
        return keys.set_grants(session, key_id, body.projects)


@router.delete("/{key_id}")
def revoke_key(key_id: Annotated[str, Path(max_length=64)], request: Request, db: DbDep, caller: AdminDep) -> KeyRead:
    """Revoke a key; its access tokens and its MLflow sign-in stop working too."""
    with db.begin() as session:
        read = keys.revoke_key(session, key_id)
    mlflow_users.revoked(request.app.state.mlflow_access, key_id)
    return read
