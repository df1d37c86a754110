"""A table of one NamedTuple row per order, keyed by ``order_id``: its load and save.

Payments (``payments``) and fulfilment (``shipments``) keep such a table on either
backend; the SQL of reading rows by order id, writing them whole and counting them
lives here once per backend (``SqliteOrderRows``, ``PostgresOrderRows``), as
``stores/outbox.py`` does for the outbox. Each store calls them inside its own
transactions.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ordermesh.stores.postgres import PostgresDatabase
    from ordermesh.stores.sqlite import SqliteDatabase

RowT = TypeVar("RowT", bound=tuple[Any, ...])


class SqliteOrderRows(Generic[RowT]):
    """The rows of ``table`` (columns ``fields``, ``order_id`` first) in a SQLite store.

    ``row`` builds a row from the stored values, ``values`` the other way (SQLite keeps
    no booleans: a store with one converts it there)."""

    def __init__(
        self,
        db: SqliteDatabase,
        table: str,
        fields: Sequence[str],
        row: Callable[[Sequence[Any]], RowT],
        values: Callable[[RowT], Sequence[Any]] | None = None,
    ) -> None:
        self._db = db
        self.table = table
        self.columns = ", ".join(fields)
        self._row = row
        self._values = values
        self._replace = (
            f"INSERT OR REPLACE INTO {table} ({self.columns})"
            f" VALUES ({', '.join('?' * len(fields))})"
        )

    def load(self, order_ids: Collection[str]) -> dict[str, RowT]:
        rows = self._db.select_in(
            f"SELECT {self.columns} FROM {self.table} WHERE order_id IN ({{marks}})", order_ids
        )
        return {row[0]: self._row(row) for row in rows}

    def save(self, rows: Sequence[RowT]) -> None:
        """Insert or replace ``rows``; inside the store's open transaction."""
        convert = self._values
        params = list(rows) if convert is None else [convert(r) for r in rows]
        self._db.write_many(f"save {self.table}", self._replace, params)

    def count(self, what: str, where: str) -> int:
        with self._db.read(what) as conn:
            (count,) = conn.execute(f"SELECT count(*) FROM {self.table} WHERE {where}").fetchone()
        return int(count)


class PostgresOrderRows(Generic[RowT]):
    """The rows of ``table`` (columns ``fields``, ``order_id`` first) in a PostgreSQL store.

    ``load`` inside a transaction locks its rows (``FOR UPDATE``) and ``save`` writes in
    order_id order: every writer takes the locks of one batch in the same order, so two
    over the same orders queue up rather than deadlock."""

    def __init__(
        self,
        db: PostgresDatabase,
        table: str,
        fields: Sequence[str],
        row: Callable[[Sequence[Any]], RowT],
    ) -> None:
        self._db = db
        self.table = table
        self.columns = ", ".join(fields)
        self._row = row
        self._upsert = (
            f"INSERT INTO {table} ({self.columns}) VALUES ({', '.join(['%s'] * len(fields))})"
            " ON CONFLICT (order_id) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in fields[1:])
        )

    def load(self, order_ids: Collection[str]) -> dict[str, RowT]:
        if not order_ids:
            return {}
        lock = " ORDER BY order_id FOR UPDATE" if self._db.in_transaction else ""
        with self._db.reader(f"load {self.table}") as conn:
            rows = conn.execute(
                f"SELECT {self.columns} FROM {self.table} WHERE order_id = ANY(%s){lock}",
                (sorted(order_ids),),
            ).fetchall()
        return {row[0]: self._row(row) for row in rows}

    def save(self, rows: Sequence[RowT]) -> None:
        """Insert or replace ``rows``; inside the store's open transaction."""
        if not rows:
            return
        conn = self._db.writer()
        with self._db.translate(f"save {self.table}"), conn.cursor() as cur:
            cur.executemany(self._upsert, [tuple(r) for r in sorted(rows)])

    def count(self, what: str, where: str) -> int:
        with self._db.reader(what) as conn:
            row = conn.execute(f"SELECT count(*) FROM {self.table} WHERE {where}").fetchone()
        return int(row[0]) if row else 0
