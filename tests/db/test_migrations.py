from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from miniml.db import tables
from miniml.db.engine import (
    alembic_config,
    at_head,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)


def test_migrations_from_empty_to_head_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    assert inspect(engine).get_table_names() == []
    upgrade(engine)
    names = set(inspect(engine).get_table_names())
    assert set(tables.Base.metadata.tables) <= names
    assert "miniml_alembic_version" in names
    upgrade(engine)  # a second upgrade on start is a no-op
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"miniml_alembic_version"}
    engine.dispose()


def test_schema_at_head_matches_the_tables(db_url: str) -> None:
    """Autogenerate finds nothing to do: no change to tables.py went without a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    upgrade(engine)
    with engine.connect() as conn:
        ours = lambda name, type_, _parent: type_ != "table" or name in tables.Base.metadata.tables  # noqa: E731
        diff = compare_metadata(MigrationContext.configure(conn, opts={"include_name": ours}), tables.Base.metadata)
    engine.dispose()
    assert diff == []


def test_the_head_read_from_the_files_is_alembics(db_url: str) -> None:
    from alembic.script import ScriptDirectory

    engine = make_engine(db_url)
    assert head_revision() == ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert current_revision(engine) is None and not at_head(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision() and at_head(engine)
    downgrade(engine, "-1")
    assert current_revision(engine) != head_revision()
    engine.dispose()


def _python(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env, timeout=120)


def test_an_up_to_date_database_starts_without_alembic(tmp_path: Path) -> None:
    """`miniml migrate` in its own process; afterwards the api's start-up check imports no Alembic."""
    env = os.environ | {"MINIML_DATA_DIR": str(tmp_path), "MINIML_DB__URL": ""}
    first = _python("-m", "miniml", "migrate", env=env)
    assert first.returncode == 0 and f"to {head_revision()}" in first.stdout, first.stdout + first.stderr
    again = _python("-m", "miniml", "migrate", env=env)
    assert again.returncode == 0 and "at the newest schema" in again.stdout
    check = _python(
        "-c",
        "import sys\n"
        "from miniml.config import Settings\n"
        "from miniml.db.engine import make_engine, upgrade\n"
        "upgrade(make_engine(Settings().db_url))\n"
        "print('alembic' in sys.modules, 'jwt' in sys.modules)\n",
        env=env,
    )
    assert check.returncode == 0 and check.stdout.split() == ["False", "False"], check.stderr


def test_migrate_names_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    env = os.environ | {
        "MINIML_DATA_DIR": str(tmp_path),
        "MINIML_DB__URL": "postgresql+psycopg://nobody@127.0.0.1:1/none",
        "MINIML_DB__CONNECT_TIMEOUT_S": "1",
    }
    done = _python("-m", "miniml", "migrate", env=env)
    assert done.returncode == 1 and "could not migrate the metadata DB" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.postgres
def test_replicas_migrating_at_once_take_turns(pg_url: str, tmp_path: Path) -> None:
    """Kubernetes starts every api replica's `miniml migrate` init container at once on a new
    database: they take turns on a PostgreSQL advisory lock, all succeed, and the schema is whole."""
    env = dict(os.environ, MINIML_DB__URL=pg_url, MINIML_DATA_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "miniml", "migrate"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    engine = make_engine(pg_url)
    try:
        assert at_head(engine)
    finally:
        engine.dispose()
