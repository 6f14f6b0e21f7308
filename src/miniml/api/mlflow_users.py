"""Keeps MLflow's users and grants in step with the platform's keys (see tracking/access.py).

A key's MLflow user is made when the key is (its password is the key, which is never stored);
grants for new projects and models and the removal of revoked or expired keys follow within a
sync interval, and a revocation at once. MLflow being down never fails a platform call: the
next sync catches up.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from miniml.domain.roles import Role
from miniml.services import keys
from miniml.tracking.access import MlflowAccess, MlflowUser

log = logging.getLogger("miniml.api")
_WAIT_FOR_MLFLOW_S = 180.0


def _run(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # MLflow down or refusing: the periodic sync retries
        log.warning("MLflow access not synced", extra={"what": what, "error": f"{type(exc).__name__}: {exc}"[:300]})


def created(access: MlflowAccess | None, key_id: str, role: Role, projects: list[str], raw: str) -> None:
    """A new person's key: its MLflow user and grants, in the background."""
    if access is None or role.is_service:
        return
    user = MlflowUser(  # people read MLflow; only the platform writes it (services/keys.py)
        username=key_id,
        admin=role is Role.admin,
        projects={} if role is Role.admin else dict.fromkeys(projects, "READ"),
    )

    def work() -> None:
        # The user can only be made now (its password is the key, never stored): wait for an
        # MLflow that is still starting (the first admin key is made while it boots).
        deadline = time.monotonic() + _WAIT_FOR_MLFLOW_S
        while True:
            try:
                access.create_user(key_id, raw, admin=user.admin)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        access.apply([user], gone=set())

    threading.Thread(target=_run, args=(f"key {key_id} created", work), daemon=True).start()


def revoked(access: MlflowAccess | None, key_id: str) -> None:
    if access is not None:
        _run(f"key {key_id} revoked", access.delete_user, key_id)


def sync(access: MlflowAccess | None, db: sessionmaker[Session]) -> None:
    """Grant what is missing, remove the users of keys that no longer work."""
    if access is None:
        return
    with db.begin() as session:
        users, gone = keys.mlflow_users(session)
    _run("periodic sync", lambda: access.apply(users, gone=gone))
