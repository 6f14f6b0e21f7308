"""Alembic environment: runs against the engine handed in by miniml.db.engine.upgrade."""

from alembic import context

from miniml.db.engine import VERSION_TABLE
from miniml.db.tables import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    # Our own version table: Optuna's RDB storage shares this DB and keeps its own "alembic_version".
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        version_table=VERSION_TABLE,
        include_name=lambda name, type_, _parent: type_ != "table" or name in Base.metadata.tables,
    )
    context.run_migrations()
