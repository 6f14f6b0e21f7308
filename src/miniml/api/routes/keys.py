from __future__ import annotations

from fastapi import APIRouter

from miniml.api.deps import AdminDep, DbDep
from miniml.schemas.keys import KeyCreate, KeyCreated, KeyRead
from miniml.services import keys

router = APIRouter(prefix="/api/v1/keys", tags=["keys"])


@router.post("", status_code=201)
def create_key(body: KeyCreate, db: DbDep, caller: AdminDep) -> KeyCreated:
    """Create an API key; the secret is in this response only."""
    with db.begin() as session:
        read, raw = keys.create_key(session, caller, body)
    return KeyCreated(**read.model_dump(), key=raw)


@router.get("")
def list_keys(db: DbDep, caller: AdminDep) -> list[KeyRead]:
    """List keys (never their secrets)."""
    with db.begin() as session:
        return keys.list_keys(session)


@router.delete("/{key_id}")
def revoke_key(key_id: str, db: DbDep, caller: AdminDep) -> KeyRead:
    """Revoke a key; its access tokens stop working too."""
    with db.begin() as session:
        return keys.revoke_key(session, key_id)
