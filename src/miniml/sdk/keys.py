from __future__ import annotations

from typing import TYPE_CHECKING

from miniml.domain.roles import Role
from miniml.schemas.keys import KeyCreate, KeyCreated, KeyRead, TokenRead
from miniml.sdk.bodies import request_body

if TYPE_CHECKING:
    from miniml.sdk.client import Client


class Keys:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        role: Role | str,
        *,
        projects: list[str] | None = None,
        name: str = "",
        expires_in_days: float | None = None,
    ) -> KeyCreated:
        """Create a key; ``.key`` holds the secret, shown only here.

        Raises:
            Forbidden: the caller is not admin.
            InvalidInput: a non-admin key without projects, or an unknown project.
        """
        body = request_body(
            KeyCreate, {"role": role, "projects": projects or [], "name": name, "expires_in_days": expires_in_days}
        )
        return KeyCreated.model_validate(self._c.request("POST", "/api/v1/keys", json=body.model_dump()).json())

    def list(self) -> list[KeyRead]:
        """List keys (never their secrets)."""
        return [KeyRead.model_validate(k) for k in self._c.request("GET", "/api/v1/keys").json()]

    def revoke(self, key_id: str) -> KeyRead:
        """Revoke a key.

        Raises:
            NotFound: no such key.
        """
        return KeyRead.model_validate(self._c.request("DELETE", f"/api/v1/keys/{key_id}").json())

    def token(self) -> TokenRead:
        """Exchange this client's key for a short-lived access token."""
        return TokenRead.model_validate(self._c.request("POST", "/api/v1/auth/token").json())
