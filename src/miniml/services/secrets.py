"""Secrets the platform generates for itself and keeps in the metadata DB."""

from __future__ import annotations

import secrets

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables


def read_or_create_secret(session: Session, name: str) -> str:
    """Return the named secret, generating it on first use (every replica then shares it)."""
    row = session.get(tables.PlatformSecret, name)
    if row is not None:
        return row.value
    value = secrets.token_urlsafe(48)
    try:
        with session.begin_nested():
            session.add(tables.PlatformSecret(name=name, value=value))
    except IntegrityError:  # another replica created it first
        row = session.get(tables.PlatformSecret, name)
        assert row is not None
        return row.value
    return value
