"""Model import: a skops file uploaded to the api is checked by a worker against the allowlist,
registered with the example rows' signature and signed; anything else is refused and stored nowhere."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import httpx
import pandas as pd
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from miniml.orchestration.runner import run_job
from miniml.sdk.client import Client
from miniml.tracking.signing import load_verified, signing_key
from tests.conftest import LiveApi, assert_problem
from tests.orchestration.test_runner import live

__all__ = ["live"]  # the runner tests' fixture: a live api on the session's MLflow, iris uploaded

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


def url_of(name: str) -> str:
    return f"/api/v1/projects/demo/models/{name}/versions"


@pytest.fixture
def name() -> str:
    """The session's MLflow is shared by every test: each imports under a model name of its own."""
    return f"outside-{uuid.uuid4().hex[:8]}"


class Outsider:
    """A type no allowlist names: importing it must never construct it."""

    marker: Path | None = None

    def predict(self, x: object) -> list[str]:
        return ["x"]

    def __setstate__(self, state: dict[str, object]) -> None:
        Path(str(state["marker"])).touch()


def _post(api: LiveApi, name: str, content: bytes, filename: str, **params: str) -> httpx.Response:
    return httpx.post(
        f"{api.url}{url_of(name)}",
        params={"dataset": "iris", "target": "target", **params},
        files={"file": (filename, content)},
        headers=api.headers,
        timeout=30,
    )


def test_a_skops_pipeline_is_imported_signed_and_served_safely(
    live: tuple[LiveApi, Client], mlflow_uri: str, name: str
) -> None:
    api, client = live
    frame = pd.read_csv(IRIS)
    x, y = frame.drop(columns=["target"]), frame["target"]
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    answer = _post(api, name, sio.dumps(pipe), "model.skops")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["kind"] == "import" and job["state"] == "queued"
    done = run_job(api.worker_client(), api.settings, job["id"], "demo")
    assert done is not None and done.state == "succeeded", client.jobs.logs("demo", job["id"])
    assert done.model_name == f"demo.{name}" and done.model_version == "1"
    key = signing_key(None, api.settings.data_dir)
    model, signature = load_verified(mlflow_uri, f"demo.{name}", "1", key)
    assert list(signature.inputs.input_names()) == list(x.columns)
    assert list(model.predict(x.head(10))) == list(pipe.predict(x.head(10)))
    versions = client.models.versions("demo", name)
    assert [v.version for v in versions] == ["1"]


def test_a_type_outside_the_allowlist_is_never_constructed(
    live: tuple[LiveApi, Client], tmp_path: Path, name: str
) -> None:
    api, client = live
    marker = tmp_path / "constructed"
    evil = Outsider()
    evil.__dict__["marker"] = str(marker)
    answer = _post(api, name, sio.dumps(evil), "model.skops")
    assert answer.status_code == 202, answer.text
    done = run_job(api.worker_client(), api.settings, answer.json()["id"], "demo")
    assert done is not None and done.state == "failed"
    assert "outside the allowlist" in str(done.reason) and "Outsider" in str(done.reason)
    assert not marker.exists()
    assert name not in {m.name for m in client.models.list("demo")}


@pytest.mark.parametrize(
    ("content", "filename", "status", "needle"),
    [
        (pickle.dumps({"a": 1}), "model.pkl", 422, "not a skops file"),
        (pickle.dumps({"a": 1}), "model.skops", 422, "not a skops file"),
        (b"PK\x03\x04 not really", "model.skops", 202, ""),
    ],
    ids=["pickle", "pickle-renamed", "broken-zip"],
)
def test_what_is_not_skops_is_refused_and_stored_nowhere(
    live: tuple[LiveApi, Client], content: bytes, filename: str, status: int, needle: str, name: str
) -> None:
    api, client = live
    answer = _post(api, name, content, filename)
    if status == 422:
        assert_problem(answer, 422, needle)
        assert client.jobs.list("demo") == []
    else:  # a zip that is not a skops file: the worker's check fails the job, nothing is registered
        done = run_job(api.worker_client(), api.settings, answer.json()["id"], "demo")
        assert done is not None and done.state == "failed"
        assert name not in {m.name for m in client.models.list("demo")}
    imports = list((api.settings.data_dir / "objects").rglob("imports/*"))
    assert imports == [] or status == 202
    assert not list((api.settings.data_dir / "tmp").glob("upload-*"))


def test_bad_import_requests_name_the_problem(live: tuple[LiveApi, Client], name: str) -> None:
    api, _client = live
    ok = b"PK\x03\x04"
    assert_problem(_post(api, name, ok, "m.skops", dataset="nope"), 422, "nope")
    assert_problem(_post(api, name, ok, "m.skops", target="species"), 422, "species")
    bad_name = httpx.post(
        f"{api.url}/api/v1/projects/demo/models/..%2Fx/versions",
        params={"dataset": "iris"},
        files={"file": ("m.skops", ok)},
        headers=api.headers,
    )
    assert bad_name.status_code in (404, 422)
    viewer = {"X-API-Key": _client.keys.create("viewer", projects=["demo"]).key}
    forbidden = httpx.post(
        f"{api.url}{url_of(name)}", params={"dataset": "iris"}, files={"file": ("m.skops", ok)}, headers=viewer
    )
    assert_problem(forbidden, 403, "engineer")
    assert not list((api.settings.data_dir / "objects").rglob("imports/*"))
