from __future__ import annotations

from sqlalchemy import inspect

from miniml.db import tables
from miniml.db.engine import downgrade, make_engine, upgrade


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
