"""API keys: generated, shown once, stored as a SHA-256 hash, revocable, optionally expiring.

A key reads ``mml_<id>_<secret>``: the id finds the row, the 256-bit secret is compared by hash
in constant time. A plain hash suffices because the secret is random, not a password.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables
from miniml.db.tables import utcnow
from miniml.domain.roles import Role
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, InvalidInput, NotFound, Unauthorized
from miniml.schemas.keys import KeyCreate, KeyRead
from miniml.tracking.access import MlflowUser

KEY_PREFIX = "mml"
# Writing last_used_at on every request would make every read a write; once a minute is plenty.
_LAST_USED_RESOLUTION = timedelta(seconds=60)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def to_read(key: tables.ApiKey) -> KeyRead:
    return KeyRead(
        id=key.id,
        name=key.name,
        role=Role(key.role),
        projects=sorted(g.project.name for g in key.grants),
        created_at=key.created_at,
        created_by=key.created_by,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
    )


def _new_key(
    session: Session, *, role: Role, name: str, created_by: str | None, expires_at: datetime | None
) -> tuple[tables.ApiKey, str]:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = tables.ApiKey(
        id=key_id,
        name=name,
        secret_hash=_hash(secret),
        role=role.value,
        created_by=created_by,
        expires_at=expires_at,
    )
    session.add(row)
    return row, f"{KEY_PREFIX}_{key_id}_{secret}"


def _grantable(session: Session, role: Role, names: list[str]) -> list[tables.Project]:
    """The projects a key of ``role`` may be granted: one or more existing ones for a person below
    admin, none for admins and services (they reach every project)."""
    if role.is_service:
        if names:
            raise InvalidInput(f"A {role.value} key serves every project; leave 'projects' empty for a service key.")
        return []
    if role is Role.admin:
        if names:
            raise InvalidInput("Admin keys reach every project; leave 'projects' empty for role admin.")
        return []
    if not names:
        raise InvalidInput(
            f"A {role.value} key needs at least one project in 'projects'; only admin keys reach every project."
        )
    wanted = sorted(set(names))
    projects = list(session.scalars(select(tables.Project).where(tables.Project.name.in_(wanted))))
    missing = sorted(set(wanted) - {p.name for p in projects})
    if missing:
        raise InvalidInput(f"Project(s) {', '.join(missing)} do not exist; create them first.")
    return projects


def set_grants(session: Session, key_id: str, names: list[str]) -> KeyRead:
    """Grant a viewer or engineer key exactly these projects (at once: tokens resolve grants per call)."""
    row = session.get(tables.ApiKey, key_id, with_for_update=True)
    if row is None:
        raise NotFound(f"Key {key_id!r} does not exist.")
    if row.revoked_at is not None:
        raise Conflict(f"Key {key_id} is revoked; make a new key instead.")
    role = Role(row.role)
    if role is Role.admin or role.is_service:
        raise InvalidInput(f"A {role.value} key reaches every project; only viewer and engineer keys have grants.")
    projects = _grantable(session, role, names)
    row.grants = [tables.KeyGrant(project_id=p.id, project=p) for p in projects]
    session.flush()
    return to_read(row)


def create_key(session: Session, caller: Caller, body: KeyCreate) -> tuple[KeyRead, str]:
    projects = _grantable(session, body.role, list(body.projects))
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    row, raw = _new_key(session, role=body.role, name=body.name, created_by=caller.key_id, expires_at=expires_at)
    row.grants = [tables.KeyGrant(project_id=p.id, project=p) for p in projects]
    session.flush()
    return to_read(row), raw


def bootstrap_admin_key(session: Session, *, given: str | None = None) -> str | None:
    """Create the first admin key when there is no key at all (or store ``given``); return it, or None."""
    if session.scalar(select(func.count()).select_from(tables.ApiKey)):
        return None
    if given:
        register_given_key(session, given, Role.admin, what="MINIML_AUTH__ADMIN_KEY")
        return given
    _row, raw = _new_key(session, role=Role.admin, name="bootstrap admin", created_by=None, expires_at=None)
    session.flush()
    return raw


def new_raw_key() -> str:
    """A fresh key in the platform's format, stored nowhere (``miniml new-key``): for keys an operator
    gives the platform (a Kubernetes Secret) instead of having them made."""
    return f"{KEY_PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def _parse(raw: str, what: str) -> tuple[str, str]:
    parts = raw.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not re.fullmatch(r"[0-9a-f]{12}", parts[1]) or len(parts[2]) < 32:
        raise ValueError(
            f"{what} is not a miniml key: expected 'mml_<12 hex digits>_<at least 32 characters>'; "
            "make one with `miniml new-key`."
        )
    return parts[1], parts[2]


def register_given_key(session: Session, raw: str, role: Role, *, what: str) -> bool:
    """Store a key the operator made (``what`` names its setting) with ``role``; True if stored now.

    Idempotent: the same key again is a no-op, and a revoked one stays revoked. Another key under
    its id, or the same key with another role, is refused."""
    key_id, secret = _parse(raw, what)
    row = session.get(tables.ApiKey, key_id)
    if row is None:
        try:
            with session.begin_nested():  # two api replicas starting at once: the second finds the first's
                session.add(
                    tables.ApiKey(
                        id=key_id,
                        name=f"{role.value} (given)",
                        secret_hash=_hash(secret),
                        role=role.value,
                        created_by=None,
                    )
                )
            return True
        except IntegrityError:
            row = session.get(tables.ApiKey, key_id, populate_existing=True)
            if row is None:
                raise
    if not hmac.compare_digest(row.secret_hash, _hash(secret)) or row.role != role.value:
        raise ValueError(
            f"{what}: key id {key_id} is already taken by another key or role; make a new key with `miniml new-key`."
        )
    return False


def create_service_key(session: Session, role: Role) -> str:
    """A key for one of the platform's own services (worker, inference); returns the raw key."""
    assert role.is_service
    _row, raw = _new_key(session, role=role, name=f"{role.value} service", created_by=None, expires_at=None)
    session.flush()
    return raw


def service_key_id(session: Session, role: Role) -> str | None:
    """The newest usable key of a service role, or None."""
    now = utcnow()
    return session.scalar(
        select(tables.ApiKey.id)
        .where(tables.ApiKey.role == role.value, tables.ApiKey.revoked_at.is_(None))
        .where((tables.ApiKey.expires_at.is_(None)) | (tables.ApiKey.expires_at > now))
        .order_by(tables.ApiKey.created_at.desc())
        .limit(1)
    )


def mlflow_users(session: Session) -> tuple[list[MlflowUser], set[str]]:
    """What MLflow should know of each person's key: usable ones, and the ids of keys that no longer work."""
    now = utcnow()
    users: list[MlflowUser] = []
    gone: set[str] = set()
    for row in session.scalars(select(tables.ApiKey)):
        role = Role(row.role)
        if role.is_service:
            continue
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            gone.add(row.id)
            continue
        # People read MLflow; only the platform writes it: an EDIT grant would let an engineer put
        # files into a model's artifacts before a worker signs them, or move the production alias.
        projects = {} if role is Role.admin else {g.project.name: "READ" for g in row.grants}
        users.append(MlflowUser(username=row.id, admin=role is Role.admin, projects=projects))
    return users, gone


def list_keys(session: Session) -> list[KeyRead]:
    return [to_read(k) for k in session.scalars(select(tables.ApiKey).order_by(tables.ApiKey.created_at))]


def revoke_key(session: Session, key_id: str) -> KeyRead:
    row = session.get(tables.ApiKey, key_id)
    if row is None:
        raise NotFound(f"Key {key_id!r} does not exist.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return to_read(row)


def _caller_of(session: Session, row: tables.ApiKey | None) -> Caller:
    now = utcnow()
    if row is None:
        raise Unauthorized("Unknown API key. Check the key, or ask an admin for a new one.")
    if row.revoked_at is not None:
        raise Unauthorized(f"API key {row.id} was revoked. Ask an admin for a new one.")
    expires = row.expires_at
    if expires is not None and expires <= now:
        raise Unauthorized(f"API key {row.id} expired at {expires.isoformat()}. Ask an admin for a new one.")
    last = row.last_used_at
    if last is None or now - last > _LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    role = Role(row.role)
    projects = None if role is Role.admin or role.is_service else frozenset(g.project.name for g in row.grants)
    return Caller(key_id=row.id, role=role, projects=projects)


def authenticate_key(session: Session, raw: str) -> Caller:
    parts = raw.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise Unauthorized("Malformed API key: expected 'mml_<id>_<secret>' as printed when it was created.")
    row = session.get(tables.ApiKey, parts[1])
    if row is None or not hmac.compare_digest(row.secret_hash, _hash(parts[2])):
        raise Unauthorized("Unknown API key. Check the key, or ask an admin for a new one.")
    return _caller_of(session, row)


# PyJWT is imported where a token is made or read: it brings the cryptography package (~10 MB),
# which an api used with API keys alone never needs.


def issue_token(caller: Caller, *, secret: str, ttl_s: int) -> str:
    import jwt

    now = utcnow()
    claims = {"sub": caller.key_id, "role": caller.role.value, "iat": now, "exp": now + timedelta(seconds=ttl_s)}
    return jwt.encode(claims, secret, algorithm="HS256")


def authenticate_token(session: Session, token: str, *, secret: str) -> Caller:
    """A token stands for its key: a revoked or expired key ends its tokens too."""
    import jwt

    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("Access token expired; exchange your API key for a new one at /api/v1/auth/token.") from None
    except jwt.PyJWTError:
        raise Unauthorized("Invalid access token (bad signature or format).") from None
    return _caller_of(session, session.get(tables.ApiKey, str(claims["sub"])))
