"""Embedded services that several ``gptpipe run`` processes on one machine can share.

With no servers configured, each run starts a temporary Prefect API on the SQLite database under
``PREFECT_HOME`` and writes MLflow's SQLite file under ``runs/``. Started together, runs used to
race on the first start: two temporary Prefect servers migrating one database (``duplicate column
name``), two MLflow stores creating their tables or the same experiment. ``prepare`` does those
one-time steps once, under an exclusive lock on a file beside the database, and tells each run's
temporary server not to repeat them; after that, concurrent runs only read and append, which
SQLite serialises (MLflow's connection waits up to a minute for the write lock, see
``stages.core.tracking.default_tracking_uri``).

Migrating a new database runs every one of Prefect's Alembic migrations: ~9 s on 2 cores, paid by
the first run under each ``PREFECT_HOME``. The migrated, empty database is kept once per Prefect
version under ``~/.cache/gptpipe/prefect/`` (``$XDG_CACHE_HOME`` if set), and a new home starts
from a copy of it, which Alembic then finds at head.

For a team (many machines, many runs), use real servers: ``gptpipe services up`` or the Compose
stack (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("gptpipe.flow")


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if missing) for the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_prefect() -> None:
    """Migrate the embedded Prefect database and register its block types once, under a lock."""
    if os.environ.get("PREFECT_API_URL"):
        return  # a real server: it migrated its own database
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration
    from prefect.settings import PREFECT_HOME

    db = provide_database_interface()
    url = db.database_config.connection_url
    database = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None

    async def migrate_and_register() -> None:
        await db.create_db()  # alembic upgrade head: a no-op once at head
        async with await db.session() as session:
            await run_block_auto_registration(session=session)
            await session.commit()

    with exclusive(Path(PREFECT_HOME.value()) / ".gptpipe-migrate.lock"):
        template = _migrated_template()
        fresh = database is not None and not database.exists()
        if fresh and template.is_file():
            _copy_sqlite(template, database)
        asyncio.run(migrate_and_register())
        if fresh and not template.is_file():
            _copy_sqlite(database, template)
    # The temporary server each run starts must not migrate or register again, beside another run.
    os.environ["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
    os.environ["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"


def _migrated_template() -> Path:
    """Where this Prefect version's migrated, empty SQLite database is kept."""
    import prefect

    from stages.storage.user_cache import user_cache

    return user_cache("prefect") / f"prefect-{prefect.__version__}.db"


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its WAL included), renamed into place when whole."""
    import sqlite3

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
        src.backup(dst)
    os.replace(partial, target)


def prepare_mlflow(uri: str, experiment: str, artifact_root: Path | None) -> None:
    """Create an embedded MLflow store's tables and the recipe's experiment once, under a lock."""
    if not uri.startswith("sqlite:"):
        return
    from stages.core.tracking import connect

    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    with exclusive(database.with_name(database.name + ".gptpipe-lock")):
        connect(uri, experiment, artifact_root)
