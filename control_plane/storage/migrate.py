"""Copy the worker store from one database to another (SQLite to PostgreSQL, say).

``python -m control_plane copy-db --from sqlite:///var/data/control_plane.db
--to postgresql+psycopg://llava@db/llava`` creates the schema in the target (tables,
views), copies every table in foreign-key order in batches through SQLAlchemy (so
each column's type is converted by the target's driver: booleans, JSON, timestamps),
and moves PostgreSQL's id sequences past the copied ids. It refuses a target that
already holds rows. Stop the control plane(s) first, so the history does not change
while it is copied. Poll leases are not copied: they are only valid while their
holder runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import func, insert, select, text

from control_plane.storage.db import Database
from control_plane.storage.schema import Base, PollLease

__all__ = ["copy_database"]

log = logging.getLogger(__name__)


def copy_database(
    source_url: str,
    target_url: str,
    batch_size: int = 5000,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Copy every table of the store from ``source_url`` to ``target_url``; rows per table."""
    source, target = Database(source_url), Database(target_url)
    try:
        source.create_schema()  # an older source gains the newer columns (as NULL)
        target.create_schema()
        tables = [t for t in Base.metadata.sorted_tables if t.name != PollLease.__tablename__]
        with target.engine.connect() as conn:
            busy = [t.name for t in tables if conn.execute(select(func.count()).select_from(t)).scalar_one()]
        if busy:
            raise ValueError(f"the target database already has rows in {', '.join(busy)}; give an empty one")
        copied: dict[str, int] = {}
        with source.engine.connect() as src, target.engine.begin() as dst:
            for table in tables:
                n = 0
                order = list(table.primary_key.columns)
                result = src.execution_options(yield_per=batch_size).execute(select(table).order_by(*order))
                for rows in result.mappings().partitions(batch_size):
                    dst.execute(insert(table), [dict(r) for r in rows])
                    n += len(rows)
                copied[table.name] = n
                if progress is not None:
                    progress(table.name, n)
            if target.dialect == "postgresql":
                for table in tables:
                    for column in table.primary_key.columns:
                        if column.autoincrement is True or (
                            column.autoincrement == "auto" and column.type.python_type is int
                        ):
                            dst.execute(
                                text(
                                    f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                                    f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"
                                )
                            )
        return copied
    finally:
        source.dispose()
        target.dispose()
