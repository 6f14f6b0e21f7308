"""The data folder is private: created 0700 with 0600 files, and an older install's loose modes
are tightened on start; secrets are written 0600 whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.config import Settings
from miniml.files import secure_data_dir, write_secret_file


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_fresh_start_makes_everything_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = os.umask(0o022)
    try:
        secure_data_dir(data)
        with TestClient(create_app(Settings(data_dir=data))):
            pass
    finally:
        os.umask(old)
    found = modes(data)
    assert {"miniml.db", "admin.key", "worker.key", "inference.key"} <= set(found)
    loose = {p: oct(m) for p, m in found.items() if m & 0o077}
    assert loose == {}


def test_an_old_install_is_tightened_on_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "objects" / "projects").mkdir(parents=True)
    (data / "mlartifacts").mkdir()
    for name in ("miniml.db", "mlflow.db", "admin.key", "objects/projects/x.csv"):
        (data / name).write_text("secret")
        os.chmod(data / name, 0o644)
    for folder in (data, data / "objects", data / "objects" / "projects", data / "mlartifacts"):
        os.chmod(folder, 0o755)
    (data / "link").symlink_to("/etc/hostname")  # never followed, never changed
    old = os.umask(0o022)
    try:
        secure_data_dir(data)
        assert os.umask(0o022) == 0o077  # children inherit a private umask
    finally:
        os.umask(old)
    found = modes(data)
    assert found["."] == 0o700 and found["objects"] == 0o700 and found["objects/projects"] == 0o700
    assert found["miniml.db"] == 0o600 and found["admin.key"] == 0o600 and found["objects/projects/x.csv"] == 0o600
    assert stat.S_IMODE(os.stat("/etc/hostname").st_mode) & 0o044  # the link's target is untouched


def test_secrets_are_written_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = write_secret_file(tmp_path / "k" / "x.key", "v")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "v\n"


def test_an_empty_or_short_secret_is_refused_never_used(tmp_path: Path) -> None:
    import pytest

    from miniml.tracking.access import secret_file
    from miniml.tracking.signing import signing_key

    made = secret_file(tmp_path / "fresh.secret")
    assert len(made) >= 32 and stat.S_IMODE((tmp_path / "fresh.secret").stat().st_mode) == 0o600
    assert secret_file(tmp_path / "fresh.secret") == made  # kept, not made again
    (tmp_path / "signing.key").write_text("")  # a crash between create and write, in older versions
    with pytest.raises(RuntimeError, match="no usable secret"):
        signing_key(None, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_public_reasons_carry_no_sql() -> None:
    from miniml.errors import UpstreamUnavailable, public_reason

    wrapped = UpstreamUnavailable(
        "MLflow failed on close the run: (sqlite3.OperationalError) database is locked "
        "[SQL: UPDATE runs SET status=? WHERE run_uuid = ?] [parameters: ('FAILED', 'abc')]"
    )
    reason = public_reason(wrapped)
    assert "SQL" not in reason and "parameters" not in reason and reason.startswith("MLflow failed")

    class OperationalError(Exception):
        __module__ = "sqlalchemy.exc"

    assert (
        public_reason(OperationalError("SELECT secret FROM api_key [SQL: x]")) == "OperationalError: a database error"
    )
