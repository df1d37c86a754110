"""The transactional outbox: events recorded with the state change that caused them.

A worker that performs durable work (payments' gateway calls, fulfilment's shipments)
records the outcome and the event(s) announcing it in one transaction, as rows of its
store's ``outbox`` table. A publisher (``apps/worker.py``) then claims unpublished rows,
produces them, and marks them published only once Kafka acknowledged them: a crash in
between produces them again (at-least-once), and no outcome is ever recorded without its
event, nor an event produced for an outcome that was rolled back.

Claims carry a lease (``claimed_until``): of N instances sharing one database, one
produces a row at a time; a row whose claimer died is claimed again once its lease ran
out. The SQL lives here once for both backends (``SqliteOutbox``, ``PostgresOutbox``);
each store calls them inside its own transactions, and takes the methods the publisher
calls from ``WithOutbox``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

if TYPE_CHECKING:
    from ordermesh.stores.postgres import PostgresDatabase
    from ordermesh.stores.sqlite import SqliteDatabase


class OutboxRecord(NamedTuple):
    """An event to publish: topic (with its prefix), key and value."""

    topic: str
    key: bytes
    value: bytes


class OutboxRow(NamedTuple):
    """A stored outbox record with its id (ids grow in the order rows were recorded)."""

    id: int
    topic: str
    key: bytes
    value: bytes


class OutboxStore(Protocol):
    """What the publisher needs of a store with an outbox; safe to call from one thread."""

    def claim_outbox(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` unpublished rows no live claim holds, oldest first, now
        claimed until ``now + lease_s``."""
        ...

    def mark_published(self, ids: Sequence[int], now: float) -> None:
        """Record that Kafka acknowledged these rows (they are never produced again)."""
        ...

    def release_outbox(self, ids: Sequence[int]) -> None:
        """Drop the claims on these rows (their produce failed): claimable at once."""
        ...

    def unpublished_count(self) -> int: ...


class OutboxTable(Protocol):
    """The outbox of one store: ``SqliteOutbox`` or ``PostgresOutbox``."""

    def add(self, records: Sequence[OutboxRecord], now: float) -> None: ...

    def claim(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]: ...

    def mark_published(self, ids: Sequence[int], now: float) -> None: ...

    def release(self, ids: Sequence[int]) -> None: ...

    def unpublished_count(self) -> int: ...


class WithOutbox:
    """``add_outbox`` and the ``OutboxStore`` methods of a store, over ``self._outbox``."""

    _outbox: OutboxTable

    def add_outbox(self, records: Sequence[OutboxRecord], now: float) -> None:
        """Record events to publish; inside the store's open transaction."""
        self._outbox.add(records, now)

    def claim_outbox(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        return self._outbox.claim(now, lease_s, limit)

    def mark_published(self, ids: Sequence[int], now: float) -> None:
        self._outbox.mark_published(ids, now)

    def release_outbox(self, ids: Sequence[int]) -> None:
        self._outbox.release(ids)

    def unpublished_count(self) -> int:
        return self._outbox.unpublished_count()


SQLITE_TABLE: Final = (
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        key BLOB NOT NULL,
        value BLOB NOT NULL,
        created_at REAL NOT NULL,
        claimed_until REAL NOT NULL DEFAULT 0,
        published_at REAL
    )
    """,
    # published rows stay (an audit trail) but cost the claim nothing
    "CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL",
)

POSTGRES_TABLE: Final = (
    """
    CREATE TABLE outbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        topic TEXT NOT NULL,
        key BYTEA NOT NULL,
        value BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        published_at DOUBLE PRECISION
    )
    """,
    "CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL",
)


class SqliteOutbox:
    """The outbox table of a SQLite store (``SQLITE_TABLE`` in its migrations)."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    def add(self, records: Sequence[OutboxRecord], now: float) -> None:
        """Insert ``records``; inside the store's open transaction."""
        self._db.write_many(
            "add to outbox",
            "INSERT INTO outbox (topic, key, value, created_at) VALUES (?, ?, ?, ?)",
            [(r.topic, r.key, r.value, now) for r in records],
        )

    def claim(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        db = self._db
        with db.transaction():
            conn = db.writer()
            with db.translate("claim outbox"):
                rows = conn.execute(
                    "SELECT id, topic, key, value FROM outbox"
                    " WHERE published_at IS NULL AND claimed_until < ? ORDER BY id LIMIT ?",
                    (now, limit),
                ).fetchall()
            db.write_many(
                "claim outbox",
                "UPDATE outbox SET claimed_until = ? WHERE id = ?",
                [(now + lease_s, row[0]) for row in rows],
            )
        return [OutboxRow(int(i), t, bytes(k), bytes(v)) for i, t, k, v in rows]

    def mark_published(self, ids: Sequence[int], now: float) -> None:
        if not ids:
            return
        with self._db.transaction():
            self._db.write_many(
                "mark published",
                "UPDATE outbox SET published_at = ? WHERE id = ?",
                [(now, i) for i in ids],
            )

    def release(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._db.transaction():
            self._db.write_many(
                "release outbox",
                "UPDATE outbox SET claimed_until = 0 WHERE id = ? AND published_at IS NULL",
                [(i,) for i in ids],
            )

    def unpublished_count(self) -> int:
        with self._db.read("count outbox") as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            ).fetchone()
        return int(count)


class PostgresOutbox:
    """The outbox table of a PostgreSQL store (``POSTGRES_TABLE`` in its migrations)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def add(self, records: Sequence[OutboxRecord], now: float) -> None:
        """Insert ``records``; inside the store's open transaction."""
        if not records:
            return
        conn = self._db.writer()
        with self._db.translate("add to outbox"), conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO outbox (topic, key, value, created_at) VALUES (%s, %s, %s, %s)",
                [(r.topic, r.key, r.value, now) for r in records],
            )

    def claim(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        # SKIP LOCKED: instances claiming at once split the rows instead of queueing
        with self._db.transaction():
            conn = self._db.writer()
            with self._db.translate("claim outbox"):
                rows = conn.execute(
                    "UPDATE outbox SET claimed_until = %s WHERE id IN ("
                    " SELECT id FROM outbox WHERE published_at IS NULL AND claimed_until < %s"
                    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                    " RETURNING id, topic, key, value",
                    (now + lease_s, now, limit),
                ).fetchall()
        found = [OutboxRow(int(i), t, bytes(k), bytes(v)) for i, t, k, v in rows]
        return sorted(found)

    def mark_published(self, ids: Sequence[int], now: float) -> None:
        if not ids:
            return
        with self._db.reader("mark published") as conn:
            conn.execute("UPDATE outbox SET published_at = %s WHERE id = ANY(%s)", (now, list(ids)))

    def release(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._db.reader("release outbox") as conn:
            conn.execute(
                "UPDATE outbox SET claimed_until = 0 WHERE id = ANY(%s) AND published_at IS NULL",
                (list(ids),),
            )

    def unpublished_count(self) -> int:
        with self._db.reader("count outbox") as conn:
            row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else 0
