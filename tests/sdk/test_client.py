"""The SDK against the real app in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from miniml.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from miniml.sdk.client import Client

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


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


def test_a_body_the_sdk_checks_itself_fails_as_the_api_would(client: TestClient, admin_key: str) -> None:
    """Bodies the SDK validates before sending raise InvalidInput naming the field, like the api's 422."""
    c = sdk(client, admin_key)
    c.projects.create("demo")
    with pytest.raises(InvalidInput, match=r"resources\.memory"):
        c.jobs.create("demo", dataset="iris", target="target", resources={"memory": "4GB"})
    with pytest.raises(InvalidInput, match=r"role"):
        c.keys.create("superuser")
    with pytest.raises(InvalidInput, match=r"traffic"):
        c.deployments.create("demo", "d", "m", traffic="half")  # type: ignore[arg-type]
    assert c.jobs.list("demo") == [] and c.deployments.list("demo") == []  # nothing was sent


def test_datasets_through_the_sdk(client: TestClient, admin_key: str, tmp_path: Path) -> None:
    c = sdk(client, admin_key)
    c.projects.create("demo")
    seen: list[tuple[int, int]] = []
    version = c.datasets.upload("demo", IRIS, progress=lambda sent, total: seen.append((sent, total)))
    assert version.version == 1 and version.rows == 150
    assert seen and seen[-1] == (IRIS.stat().st_size, IRIS.stat().st_size)
    assert c.datasets.upload("demo", IRIS, name="flowers").dataset == "flowers"
    assert [d.name for d in c.datasets.list("demo")] == ["flowers", "iris"]
    assert c.datasets.get("demo", "iris").latest_version == 1
    assert [v.version for v in c.datasets.versions("demo", "iris")] == [1]
    assert c.datasets.profile("demo", "iris", 1)["rows"] == 150
    assert len(c.datasets.preview("demo", "iris", 1, rows=5).rows) == 5
    report = c.datasets.validate("demo", "iris", 1, {"sepal_length": {"max": 5.0}})
    assert not report.ok and report.issues[0].count == sum(
        1 for line in IRIS.read_text().splitlines()[1:] if float(line.split(",")[0]) > 5.0
    )
    out = c.datasets.download("demo", "iris", 1, tmp_path / "copy.csv")
    assert out.read_bytes() == IRIS.read_bytes()
    with pytest.raises(InvalidInput, match="unknown column"):
        c.datasets.validate("demo", "iris", 1, {"nope": {"min": 1}})
    c.datasets.delete_version("demo", "flowers", 1)
    with pytest.raises(NotFound):
        c.datasets.version("demo", "flowers", 1)
    with pytest.raises(NotFound):
        c.datasets.download("demo", "flowers", 1, tmp_path / "none.csv")
