"""The data folder holds secrets (the JWT secret in the metadata DB, keys, the signing key), so it
is private to the user that runs the platform: folders 0700, files 0600.

Every role calls ``secure_data_dir`` as it starts: it sets the process umask (children such as
MLflow and Prefect inherit it, so what they create is private too) and tightens what an older
install left readable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def secure_data_dir(data_dir: Path) -> None:
    """Create the data folder 0700 if needed; make everything under it private to this user."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(data_dir):
        _tighten(Path(root), 0o700)
        for name in files:
            _tighten(Path(root) / name, 0o600)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]


def _tighten(path: Path, private: int) -> None:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            return
        os.chmod(path, stat.S_IMODE(st.st_mode) & private)
    except (FileNotFoundError, PermissionError):  # a file that went away, or one we do not own
        return


def write_secret_file(path: Path, value: str) -> Path:
    """Write a secret (a key) readable by this user only, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # before a byte is written: an older file may have had a looser mode
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return path


def read_key_file(data_dir: Path, role: str) -> str | None:
    """A service's key as the api wrote it, or None."""
    path = data_dir / f"{role}.key"
    return path.read_text().strip() if path.exists() else None
