"""The SDK against the real app in-process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from miniml.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from miniml.sdk.client import Client


def sdk(client: TestClient, key: str | None) -> Client:
    return Client(api_key=key, http=client)


def test_projects_and_keys_through_the_sdk(client: TestClient, admin_key: str) -> None:
    c = sdk(client, admin_key)
    assert c.projects.create("demo", description="d").name == "demo"
    assert [p.name for p in c.projects.list()] == ["demo"]
    assert c.projects.get("demo").description == "d"
    created = c.keys.create("viewer", projects=["demo"], name="ci")
    assert created.key.startswith("mml_") and created.projects == ["demo"]
    assert created.id in {k.id for k in c.keys.list()}
    viewer = sdk(client, created.key)
    assert viewer.keys.token().expires_in > 0
    assert c.keys.revoke(created.id).revoked_at is not None
    c.projects.delete("demo")
    with pytest.raises(NotFound):
        c.projects.get("demo")


def test_sdk_raises_the_servers_error_classes(
    client: TestClient, admin_key: str, make_project: Callable[[str], str], make_key: Callable[..., dict[str, str]]
) -> None:
    c = sdk(client, admin_key)
    c.projects.create("demo")
    with pytest.raises(Conflict, match="already exists"):
        c.projects.create("demo")
    with pytest.raises(InvalidInput, match="not valid"):
        c.projects.create("Bad Name")
    viewer = sdk(client, make_key("viewer", "demo")["X-API-Key"])
    with pytest.raises(Forbidden, match="admin"):
        viewer.projects.create("other")
    with pytest.raises(Unauthorized):
        sdk(client, "mml_nope_nope").projects.list()
    with pytest.raises(NotFound):
        c.keys.revoke("nope")
