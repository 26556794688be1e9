"""How one batch of the writer's row operations becomes statements: the inserts of a table
as one ``executemany``, then the updates of a table by primary key (an update of a row
inserted in the same batch folded into the insert, several updates of a row into one),
tables parents first."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.orm import Session

from control_plane.storage.schema import Base

__all__ = ["Op", "write_rows"]


@dataclass
class Op:
    kind: str  # "insert" | "update" | "call" | "mark" (flush: set done once written)
    model: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    call: Callable[[Session], None] | None = None
    done: threading.Event | None = None

    @property
    def table(self) -> str:
        """The table it writes, for counts and logs (``call`` for an arbitrary write)."""
        return str(self.model.__table__.name) if self.model is not None else "call"

    @property
    def size(self) -> int:
        """Rows it writes (a ``call`` counts as one)."""
        return len(self.rows) or 1


# Why rows are lost: the queue was full (the caller's row was refused at once), the row's
# own write failed (retried alone, it still failed: a value the column cannot hold, a
# constraint), or the database was unavailable (its batch was given up, see BatchWriter).


def write_rows(s: Session, ops: list[Op]) -> None:
    """Inserts and updates of one batch segment: one executemany per table and kind."""
    if not ops:
        return
    inserts: dict[Table, list[dict[str, Any]]] = {}
    inserted: dict[Table, dict[Any, dict[str, Any]]] = {}  # table -> primary key -> row
    updates: dict[Table, dict[Any, dict[str, Any]]] = {}
    for op in ops:
        table = op.model.__table__
        pk = _pk_column(table)
        for row in op.rows:
            key = row.get(pk) if pk is not None else None
            if op.kind == "insert":
                row = dict(row)
                inserts.setdefault(table, []).append(row)
                if key is not None:
                    inserted.setdefault(table, {})[key] = row
                continue
            pending = inserted.get(table, {}).get(key)
            if pending is not None:  # inserted in this batch: insert the final values
                pending.update(row)
                continue
            earlier = updates.setdefault(table, {}).get(key)
            if earlier is not None:
                earlier.update(row)
            else:
                updates[table][key] = dict(row)
    conn = s.connection()
    for table in _ordered(inserts):
        rows = inserts[table]
        start = 0
        for i in range(1, len(rows) + 1):  # executemany takes the columns of its first row
            if i == len(rows) or rows[i].keys() != rows[start].keys():
                conn.execute(insert(table), rows[start:i])
                start = i
    for table in _ordered(updates):
        pk = _pk_column(table)
        assert pk is not None, f"updates of {table.name} need a single-column primary key"
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in updates[table].values():
            params = {k: v for k, v in row.items() if k != pk}
            params["_pk"] = row[pk]
            by_keys.setdefault(tuple(sorted(params)), []).append(params)
        stmt = update(table).where(table.c[pk] == bindparam("_pk"))
        for rows in by_keys.values():
            conn.execute(stmt, rows)


def _pk_column(table: Table) -> str | None:
    cols = list(table.primary_key.columns)
    return cols[0].key if len(cols) == 1 else None


def _ordered(by_table: dict[Table, Any]) -> list[Table]:
    """The tables of ``by_table``, parents before children (foreign keys)."""
    order = _table_order()
    return sorted(by_table, key=lambda t: order.get(t, len(order)))


@functools.cache
def _table_order() -> dict[Table, int]:
    return {t: i for i, t in enumerate(Base.metadata.sorted_tables)}
