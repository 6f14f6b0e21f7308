"""Engine and session factory for the metadata DB (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "miniml_alembic_version"  # Optuna's RDB storage keeps its own "alembic_version"
_REVISION_RE = re.compile(r'^(down_revision|revision)\s*=\s*(?:"([^"]*)"|None)', re.MULTILINE)


def make_engine(url: str, *, connect_timeout_s: float = 3.0, pool_size: int = 5) -> Engine:
    """An engine whose every wait for the DB ends within ``connect_timeout_s``: a connection, a free
    slot in the pool, or a lock another writer holds (SQLite's busy timeout, PostgreSQL's
    lock_timeout). Past that the caller gets an OperationalError or a pool TimeoutError, which the
    api answers as a 503 (``api/errors.py``) instead of keeping the client waiting."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, connect_timeout_s)
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, int(connect_timeout_s)),
        "options": f"-c lock_timeout={max(1, int(connect_timeout_s * 1000))}",
    }
    return create_engine(
        url, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args, pool_timeout=connect_timeout_s
    )


def _sqlite_engine(url: str, busy_timeout_s: float) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    on_disk = bool(path) and path != ":memory:"
    if on_disk:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # pysqlite opens a transaction only before the first INSERT, UPDATE or DELETE; IMMEDIATE makes
    # that BEGIN take the write lock, so writers queue on the busy timeout (``timeout``) for it.
    connect_args = {"timeout": busy_timeout_s, "check_same_thread": False, "isolation_level": "IMMEDIATE"}
    # Connections to a file cost nothing to speak of, and writers queue on the lock: a pool limit
    # would only add its own wait on top of the busy timeout.
    pool_args: dict[str, Any] = {"max_overflow": -1} if on_disk else {}
    engine = create_engine(url, connect_args=connect_args, **pool_args)
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "savepoint", _sqlite_lock_before_savepoint)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_lock_before_savepoint(conn: Connection, _name: str) -> None:
    # A SAVEPOINT outside a transaction opens a deferred one: its reads take a snapshot, and its
    # first write then fails at once ("database is locked", no busy wait) if another writer has
    # committed since. Take the write lock first, so this writer queues like the others.
    raw: Any = conn.connection.dbapi_connection
    if raw is not None and not raw.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # through SQLAlchemy: a failure is its OperationalError


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest migration, read from the migration files themselves (without Alembic, which
    costs the api ~11 MB and a few hundred ms to import; it is only needed when there is work)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict(_REVISION_RE.findall(path.read_text(encoding="utf-8")))
        revisions.add(found["revision"])
        if found.get("down_revision"):
            parents.add(found["down_revision"])
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({sorted(heads)}); merge them")
    return heads.pop()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database no migration has touched."""
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one_or_none()
    except DBAPIError:  # no version table yet
        return None


def at_head(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


# PostgreSQL advisory lock key of schema migrations ("miniml" in ASCII).
MIGRATION_LOCK = 0x6D696E696D6C


def upgrade(engine: Engine, revision: str = "head", *, wait_s: float = 600) -> None:
    """Bring the schema to ``revision`` (the api calls this on start); a no-op, without importing
    Alembic, when the database is already at the newest migration.

    On PostgreSQL, processes migrating at once (every api replica's init container on Kubernetes)
    take turns on an advisory lock; each looks again once it holds it, so only the first migrates."""
    if revision == "head" and at_head(engine):
        return
    from alembic import command

    if engine.dialect.name != "postgresql":  # SQLite: one machine, and its write lock already serialises
        command.upgrade(alembic_config(engine), revision)
        return
    deadline = time.monotonic() + wait_s
    with engine.connect() as lock:
        # Tried, not waited for: the engine's lock_timeout (a few seconds) would end a plain wait.
        while not lock.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}).scalar():
            if time.monotonic() > deadline:
                raise TimeoutError(f"another process has been migrating the metadata DB for over {wait_s:.0f}s")
            time.sleep(0.5)
        try:
            if revision != "head" or not at_head(engine):
                command.upgrade(alembic_config(engine), revision)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            lock.commit()


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def ping(engine: Engine) -> None:
    """Return when the DB could take a write now; raise as a request would (after the same waits).

    On SQLite this takes and drops the write lock: under WAL a plain read passes even while another
    connection holds the lock, and every write would wait for it and fail."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql("ROLLBACK")
        else:
            conn.execute(text("SELECT 1"))


# SQLite's SQLITE_BUSY and SQLITE_LOCKED; PostgreSQL's lock_not_available and deadlock_detected.
_SQLITE_BUSY_CODES = {5, 6}
_PG_BUSY_STATES = {"55P03", "40P01"}


def is_busy(exc: BaseException) -> bool:
    """Whether a DB error means "held by other work, retry soon" rather than "not answering"."""
    if isinstance(exc, PoolTimeout):  # every pooled connection is in use
        return True
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _SQLITE_BUSY_CODES:
        return True
    return getattr(orig, "sqlstate", None) in _PG_BUSY_STATES
