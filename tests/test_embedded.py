"""The embedded Prefect database: a new ``PREFECT_HOME`` starts from the migrated template that the
first one left in the cache, instead of running every Alembic migration again."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _prepare(home: Path, cache: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(home), "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    code = "from flows.embedded import prepare_prefect; prepare_prefect()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _schema(database: Path) -> tuple[list, list]:
    with sqlite3.connect(database) as db:
        tables = db.execute("select type, name from sqlite_master order by type, name").fetchall()
        return tables, db.execute("select version_num from alembic_version").fetchall()


def test_a_new_prefect_home_starts_from_the_migrated_template(tmp_path):
    cache = tmp_path / "cache"
    _prepare(tmp_path / "first", cache)
    (template,) = (cache / "gptpipe" / "prefect").glob("prefect-*.db")
    assert not list(template.parent.glob(".*partial")), "no half-written template is left"
    tables, head = _schema(template)
    assert head and any(name == "flow_run" for _, name in tables)
    with sqlite3.connect(template) as db:  # a mark that only a copy of the template can carry
        db.execute("create table copied_from_template (x)")

    _prepare(tmp_path / "second", cache)
    assert _schema(tmp_path / "second" / "prefect.db") == _schema(template)
    with sqlite3.connect(tmp_path / "second" / "prefect.db") as db:
        assert db.execute("select count(*) from block_type").fetchone()[0] > 0, "block types are registered"
