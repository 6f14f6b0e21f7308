"""Model provenance end to end: a pickle registered straight into MLflow, a signed version whose
artifacts were changed, and signature tags copied onto another version are never deserialised;
the old version keeps serving and the deployment says why."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from miniml.sdk.client import Client
from miniml.tracking.signing import TAG_DIGEST, TAG_SIGNATURE, verified_copy
from tests.conftest import LiveApi
from tests.inference.test_serving import predict, stack, wait_served

__all__ = ["stack"]  # the fixture, shared with the serving tests


class Marker:
    """Unpickling this runs a command: it must never happen inside the platform."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def _register_pickle(mlflow_uri: str, registered: str, marker: Path) -> str:
    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            Marker(marker), name="model", serialization_format="cloudpickle", registered_model_name=registered
        )
    # MLflow's own log_model loads what it saved once, in this test process: the marker proves
    # nothing yet. From here on it must never appear again.
    marker.unlink(missing_ok=True)
    return str(info.registered_model_version)


def _deployment_error(api: LiveApi, project: str, name: str, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        read = httpx.get(f"{api.url}/api/v1/projects/{project}/deployments/{name}", headers=api.headers).json()
        errors = [str(r.get("error")) for r in read["replicas"] if r.get("error")]
        if any(needle in e for e in errors):
            return errors[0]
        time.sleep(0.3)
    raise AssertionError(f"the deployment never reported {needle!r}: {read}")


def _retarget(api: LiveApi, project: str, name: str, version: str) -> None:
    url = f"{api.url}/api/v1/projects/{project}/deployments/{name}"
    assert httpx.patch(url, json={"target": int(version)}, headers=api.headers).status_code == 200


def test_unsigned_and_tampered_versions_are_never_loaded(
    stack: tuple[LiveApi, Client, TestClient, str], mlflow_uri: str, tmp_path: Path
) -> None:
    api, client, inference, project = stack
    registered = f"{project}.iris"
    client.deployments.create(project, "prov", "iris", target=1)
    wait_served(inference, "prov", {"1"})

    # 1. A pickle that runs a command, registered straight into MLflow as a new version.
    marker = tmp_path / "pwned"
    evil = _register_pickle(mlflow_uri, registered, marker)
    _retarget(api, project, "prov", evil)
    error = _deployment_error(api, project, "prov", "no platform signature")
    assert f"version {evil}" in error
    assert not marker.exists()
    answer = predict(inference, "prov", api.key)
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"  # type: ignore[attr-defined]

    # 2. A signed version's tags copied onto the pickle: the digest no longer matches its files.
    mc = MlflowClient(mlflow_uri)
    signed = mc.get_model_version(registered, "2").tags
    for tag in (TAG_DIGEST, TAG_SIGNATURE):
        mc.set_model_version_tag(registered, evil, tag, signed[tag])
    _retarget(api, project, "prov", "2")
    wait_served(inference, "prov", {"2"})
    _retarget(api, project, "prov", evil)
    _deployment_error(api, project, "prov", "changed after it was signed")
    assert not marker.exists()
    assert predict(inference, "prov", api.key).json()["model_version"] == "2"  # type: ignore[attr-defined]

    # 3. A forged signature (made with another key) is refused before any download.
    mc.set_model_version_tag(registered, evil, TAG_SIGNATURE, "0" * 64)
    with pytest.raises(Exception, match="did not make"):
        verified_copy(mlflow_uri, registered, evil, b"x" * 32, tmp_path / "dl")
    assert not (tmp_path / "dl").exists() and not marker.exists()


def test_a_signed_versions_artifacts_changed_in_the_store_are_refused(
    stack: tuple[LiveApi, Client, TestClient, str], mlflow_uri: str, tmp_path: Path
) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from miniml.tracking.signing import signing_key

    api, _client, _inference, project = stack
    registered = f"{project}.iris"
    key = signing_key(None, api.settings.data_dir)
    folder = verified_copy(mlflow_uri, registered, "1", key, tmp_path / "ok")  # as signed: fine
    mc = MlflowClient(mlflow_uri)
    source = mc.get_model_version(registered, "1").source
    model_id = source.removeprefix("models:/")
    repo = get_artifact_repository(mc.get_logged_model(model_id).artifact_location)
    extra = tmp_path / "requirements.txt"
    extra.write_text((folder / "requirements.txt").read_text() + "evil-package==1.0\n")
    repo.log_artifact(str(extra))
    with pytest.raises(Exception, match="changed after it was signed"):
        verified_copy(mlflow_uri, registered, "1", key, tmp_path / "again")
