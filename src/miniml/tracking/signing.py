"""Model provenance: every version the platform registers carries its signature, and nothing is
deserialised before the signature and the digest check out.

The digest covers every artifact file of the version (path and SHA-256 of each, sorted), so a
changed ``MLmodel``, a swapped ``model.pkl`` or an added file all break it. The signature is an
HMAC-SHA256 over the registered name and that digest with a key that only the workers (which sign)
and the inference service (which verifies) hold: whoever can write to MLflow can register a
version, but not one that will ever be loaded. Both are kept as tags of the model version.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

from miniml.errors import InvalidInput
from miniml.tracking.access import secret_file

TAG_DIGEST = "miniml.digest"
TAG_SIGNATURE = "miniml.signature"
_CONTEXT = b"miniml-model-v1"


class UnsignedModel(InvalidInput):
    """A version without a valid platform signature, or whose artifacts no longer match it."""


def signing_key(configured: str | None, data_dir: Path) -> bytes:
    """The configured key, or ``<data_dir>/signing.key``, created (0600) by whichever role needs it first."""
    return (configured or secret_file(data_dir / "signing.key")).encode()


def digest_of(folder: Path) -> str:
    """SHA-256 over the sorted (relative path, SHA-256 of content) of every file under ``folder``."""
    outer = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        if path.is_symlink():
            raise UnsignedModel(f"The model's artifacts hold a symbolic link ({path.name}); it is not loaded.")
        inner = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
        outer.update(path.relative_to(folder).as_posix().encode() + b"\0" + inner.hexdigest().encode() + b"\n")
    return outer.hexdigest()


def signature_of(key: bytes, registered: str, digest: str) -> str:
    return hmac.new(key, _CONTEXT + b"\n" + registered.encode() + b"\n" + digest.encode(), hashlib.sha256).hexdigest()


def _download(tracking_uri: str, registered: str, version: str, dest: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered}/{version}", dst_path=str(dest)))


def sign_version(tracking_uri: str, registered: str, version: str, key: bytes, *, folder: Path | None = None) -> str:
    """Sign a registered version over the artifacts as stored (downloaded back, or ``folder``); return the digest."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="miniml-sign-") as tmp:
        digest = digest_of(folder or _download(tracking_uri, registered, version, Path(tmp)))
    client.set_model_version_tag(registered, version, TAG_DIGEST, digest)
    client.set_model_version_tag(registered, version, TAG_SIGNATURE, signature_of(key, registered, digest))
    return digest


def verified_copy(tracking_uri: str, registered: str, version: str, key: bytes, dest: Path) -> Path:
    """Download a version's artifacts into ``dest`` and return their folder, only if signed and unchanged.

    Raises:
        UnsignedModel: no signature, a signature made with another key or for another model, or
            artifacts that changed since signing. Nothing has been deserialised then.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags: dict[str, Any] = dict(client.get_model_version(registered, version).tags or {})
    digest, signature = str(tags.get(TAG_DIGEST, "")), str(tags.get(TAG_SIGNATURE, ""))
    if not digest or not signature:
        raise UnsignedModel(
            f"Version {version} of {registered} carries no platform signature, so it is not loaded; "
            "train it with a job, or import it through the api (POST …/models/{name}/versions)."
        )
    if not hmac.compare_digest(signature_of(key, registered, digest), signature):
        raise UnsignedModel(
            f"Version {version} of {registered} has a signature this platform did not make, so it is not loaded."
        )
    folder = _download(tracking_uri, registered, version, dest)
    if not hmac.compare_digest(digest_of(folder), digest):
        raise UnsignedModel(
            f"The artifacts of version {version} of {registered} changed after it was signed, so it is not loaded."
        )
    return folder


def load_verified(tracking_uri: str, registered: str, version: str, key: bytes) -> tuple[Any, Any]:
    """The scikit-learn model of a version and its MLflow signature, loaded only after ``verified_copy``."""
    model, signature, _example = load_verified_with_example(tracking_uri, registered, version, key)
    return model, signature


def load_verified_with_example(tracking_uri: str, registered: str, version: str, key: bytes) -> tuple[Any, Any, Any]:
    """``load_verified`` plus the rows logged with the version as its input example (a DataFrame, or None)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="miniml-load-") as tmp:
        folder = verified_copy(tracking_uri, registered, version, key, Path(tmp))
        model = mlflow.sklearn.load_model(str(folder))
        meta = mlflow.models.Model.load(str(folder / "MLmodel"))
        try:
            example = meta.load_input_example(str(folder))
        except Exception:  # an example MLflow cannot read back is no example
            example = None
    return model, meta.signature, example
